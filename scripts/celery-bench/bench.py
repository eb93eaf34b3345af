"""Times Celery on the task corral's runs bench runs (see run.sh).

open:   submit --count tasks at once, wait for every result.
closed: --concurrency tasks in flight at once, a thread waiting on each.
Prints tasks/s and submit->started percentiles; the last line is JSON.
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

from tasks import run_true


def percentile(samples, p):
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(p * len(samples)))] if samples else 0.0


def one():
    submitted = time.time()
    started = run_true.delay().get(timeout=120)
    return (started - submitted) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--mode", choices=["open", "closed"], default="open")
    args = parser.parse_args()
    run_true.delay().get(timeout=60)  # the worker is up and warm
    begun = time.time()
    if args.mode == "open":
        submitted = time.time()
        results = [run_true.delay() for _ in range(args.count)]
        latencies = [(r.get(timeout=300) - submitted) * 1000 for r in results]
    else:
        with ThreadPoolExecutor(args.concurrency) as pool:
            latencies = list(pool.map(lambda _: one(), range(args.count)))
    elapsed = time.time() - begun
    figures = {
        "bench": "celery",
        "mode": args.mode,
        "count": args.count,
        "concurrency": args.concurrency,
        "tasks_per_sec": round(args.count / elapsed, 1),
        "submit_to_started_p50_ms": round(percentile(latencies, 0.5), 2),
        "submit_to_started_p99_ms": round(percentile(latencies, 0.99), 2),
    }
    print(f"throughput            {figures['tasks_per_sec']} tasks/s")
    if args.mode == "closed":
        print(
            f"submit -> started     p50 {figures['submit_to_started_p50_ms']} ms, "
            f"p99 {figures['submit_to_started_p99_ms']} ms"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
