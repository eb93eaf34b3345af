#!/usr/bin/env bash
# Makes sure what corral needs is running on this machine: NATS with
# JetStream on 127.0.0.1:4222 and PostgreSQL on 127.0.0.1:5432. Installs them
# from Debian's packages (nats-server, postgresql) when they are missing, and
# bubblewrap, which isolates local sandboxes.
# Source it (`. scripts/services.sh`) to get NATS_URL and DATABASE_URL set.
set -euo pipefail

NATS_PORT=${NATS_PORT:-4222}
PG_PORT=${PG_PORT:-5432}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:$NATS_PORT}
# The admin URL: tests create a database each through it; `corral up` uses
# the `corral` database on the same server (created if missing).
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:$PG_PORT/postgres}

say() { echo "services: $*" >&2; }

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  say "installing $* from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  sudo_if_needed apt-get update -qq >/dev/null
  sudo_if_needed apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 100); do
    port_open "$1" && return 0
    sleep 0.1
  done
  return 1
}

ensure_nats() {
  if port_open "$NATS_PORT"; then return 0; fi
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
  local bin; bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  local dir=${NATS_STORE_DIR:-/var/lib/nats-server}
  mkdir -p "$dir" 2>/dev/null || dir=$(mktemp -d)
  say "starting nats-server with JetStream on 127.0.0.1:$NATS_PORT (store $dir)"
  nohup "$bin" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$dir" >"${TMPDIR:-/tmp}/corral-nats.log" 2>&1 &
  wait_port "$NATS_PORT" || { say "nats-server did not start; see ${TMPDIR:-/tmp}/corral-nats.log"; exit 1; }
}

ensure_postgres() {
  if ! port_open "$PG_PORT"; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
      apt_install postgresql
    fi
    local version; version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version"
    sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
      || sudo_if_needed pg_ctlcluster "$version" main start
    wait_port "$PG_PORT" || { say "PostgreSQL did not start"; exit 1; }
  fi
  # A fresh cluster asks a password on 127.0.0.1: give `postgres` the one in
  # DATABASE_URL's default. A cluster with trust auth ignores it.
  if command -v psql >/dev/null && ! psql "$DATABASE_URL" -qAtc 'select 1' >/dev/null 2>&1; then
    if id postgres >/dev/null 2>&1; then
      say "setting the password of role postgres for local connections"
      (cd / && sudo_if_needed su postgres -c "psql -qc \"ALTER ROLE postgres PASSWORD 'postgres'\"") >/dev/null
    fi
    psql "$DATABASE_URL" -qAtc 'select 1' >/dev/null || { say "cannot connect to $DATABASE_URL"; exit 1; }
  fi
}

ensure_sandbox_tools() {
  # bwrap makes a local sandbox's namespaces; commands enter them through
  # corral-enter, which the build makes.
  command -v bwrap >/dev/null || apt_install bubblewrap
  # setpriv (util-linux) starts the spawner unprivileged in a test.
  command -v setpriv >/dev/null || apt_install util-linux
  # openssl makes the certificates of the mutual-TLS test.
  command -v openssl >/dev/null || apt_install openssl
}

ensure_browser() {
  # Headless Chromium drives the console's browser tests; without it they
  # print why and skip, so a failed install is said, not fatal.
  if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
    (apt_install chromium chromium-driver) ||
      say "chromium could not be installed: the console's browser tests will be skipped"
  fi
}

ensure_sandbox_tools
ensure_browser
ensure_nats
ensure_postgres
say "NATS_URL=$NATS_URL DATABASE_URL=$DATABASE_URL"
