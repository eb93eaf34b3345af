#!/usr/bin/env bash
# Celery 5 + Redis on the task `corral bench runs` runs (a `true` process),
# for the comparison in README's capacity section.
#   scripts/celery-bench/run.sh [--count N] [--concurrency C] [--mode open|closed]
# Needs Python with `pip install 'celery[redis]'` and Redis on 127.0.0.1:6379
# (REDIS_URL to change). Starts a prefork worker with C processes, runs
# bench.py, and stops the worker.
set -euo pipefail
cd "$(dirname "$0")"
concurrency=64
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --concurrency) concurrency=$2; shift 2 ;;
    *) shift ;;
  esac
done
python3 -c 'import celery, redis' 2>/dev/null \
  || { echo "celery-bench: pip install 'celery[redis]' first" >&2; exit 1; }
log=$(mktemp)
celery -A tasks worker --pool=prefork --concurrency="$concurrency" --loglevel=warning >"$log" 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null; rm -f "$log"' EXIT
celery -A tasks purge -f >/dev/null
python3 bench.py "${args[@]}" || {
  echo "celery-bench: the bench failed; the worker's log:" >&2
  cat "$log" >&2
  exit 1
}
