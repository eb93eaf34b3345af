#!/usr/bin/env bash
# The test command: starts NATS (JetStream) and PostgreSQL when they are not
# running, builds the binaries the end-to-end tests start as processes, and
# runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
cargo build --workspace --bins
cargo test --workspace "$@"
