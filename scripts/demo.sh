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
cargo build --release -p corral-cli
exec ./target/release/corral up --demo "$@"
