#!/usr/bin/env bash
# Counts the PostgreSQL statements corral makes per run: starts `corral up`
# (the local provider), warms it with 50 runs, then logs every statement
# (log_statement = all, reset after) while `corral bench runs` makes N runs
# at concurrency C, and prints the count per run and the most frequent
# statements. Needs a superuser DATABASE_URL (ALTER SYSTEM), the server's
# log readable at PG_LOG, and port 8470 free.
#
#   scripts/pg-statements.sh                 # 300 runs at concurrency 8
#   N=1000 C=64 scripts/pg-statements.sh
#   BIN=/tmp/old/corral scripts/pg-statements.sh   # another build, for A/B
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../target/release/corral}
N=${N:-300}
C=${C:-8}
PG_LOG=${PG_LOG:-$(ls /var/log/postgresql/postgresql-*-main.log | head -1)}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
HOME_DIR=$(mktemp -d /tmp/pg-statements.XXXX)
UP_LOG=$HOME_DIR/up.log
"$BIN" up --log-file "$UP_LOG" --home "$HOME_DIR/home" > /dev/null 2>&1 &
UP=$!
cleanup() {
    psql -q "$DATABASE_URL" -c "ALTER SYSTEM RESET log_statement" -c "SELECT pg_reload_conf()" > /dev/null || true
    kill "$UP" 2> /dev/null || true
    wait "$UP" 2> /dev/null || true
    rm -rf "$HOME_DIR"
}
trap cleanup EXIT
for _ in $(seq 100); do
    curl -sf http://127.0.0.1:8470/healthz > /dev/null && break
    sleep 0.3
done
"$BIN" bench runs --count 50 --concurrency "$C" > /dev/null 2>&1
psql -q "$DATABASE_URL" -c "ALTER SYSTEM SET log_statement = 'all'" -c "SELECT pg_reload_conf()" > /dev/null
sleep 1
before=$(wc -l < "$PG_LOG")
"$BIN" bench runs --count "$N" --concurrency "$C" 2> /dev/null | tail -1
sleep 2
psql -q "$DATABASE_URL" -c "ALTER SYSTEM RESET log_statement" -c "SELECT pg_reload_conf()" > /dev/null
logged=$(tail -n +"$((before + 1))" "$PG_LOG")
count=$(grep -cE 'LOG:  (statement|execute)' <<< "$logged" || true)
echo "statements: $count for $N runs, $(echo "scale=2; $count / $N" | bc) a run"
grep -oE 'LOG:  (statement|execute [^:]*): .{0,60}' <<< "$logged" |
    sed -E 's/execute [^:]*/execute/' | sort | uniq -c | sort -rn | head -15
