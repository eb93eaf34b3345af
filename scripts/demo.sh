#!/usr/bin/env bash
# Runs corral on this machine: starts NATS (JetStream) and PostgreSQL when
# they are not running, then every corral service in one process with the
# local provider, plus a demo run whose output it prints. Ctrl-C stops it.
# In another shell: ./target/release/corral ls, corral run --wait -- ...
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
export DATABASE_URL=${CORRAL_DATABASE_URL:-${DATABASE_URL%/*}/corral}
export CORRAL_HOME=${CORRAL_HOME:-$HOME/.corral}
if [ "$(id -u)" -ne 0 ] && [ -z "${CORRAL_LOCAL__ISOLATION:-}" ]; then
  # Namespaced sandboxes with an unprivileged agent user need root.
  echo "demo: not root, so local sandboxes run without isolation (local.isolation: none):" \
       "the agents can see this machine. Run as root for isolated sandboxes." >&2
  export CORRAL_LOCAL__ISOLATION=none
fi
# corral-enter: the helper local sandbox commands start through.
cargo build --release --bin corral --bin corral-enter
exec ./target/release/corral up --demo "$@"
