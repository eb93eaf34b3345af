"""Times Celery on the task corral's runs bench runs (see run.sh).

open:   submit --count tasks at once, wait for every result.
closed: --concurrency tasks in flight at once, a thread waiting on each.
Prints tasks/s, submit->started percentiles and, on Linux, the CPU time every
process on the machine spent per task (from /proc/stat, as `corral bench runs`
does: read it on a machine doing nothing else); the last line is JSON.
"""

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from tasks import run_true


def percentile(samples, p):
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(p * len(samples)))] if samples else 0.0


def cpu_times():
    """(busy, total) clock ticks of all cores, or None off Linux: busy is
    user, nice, system, irq and softirq (not idle, iowait or steal)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(f) for f in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    total = sum(fields)
    return total - fields[3] - fields[4] - fields[7], total


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
    cpu_before = cpu_times()
    if args.mode == "open":
        submitted = time.time()
        results = [run_true.delay() for _ in range(args.count)]
        latencies = [(r.get(timeout=300) - submitted) * 1000 for r in results]
    else:
        with ThreadPoolExecutor(args.concurrency) as pool:
            latencies = list(pool.map(lambda _: one(), range(args.count)))
    elapsed = time.time() - begun
    cpu_after = cpu_times()
    figures = {
        "bench": "celery",
        "mode": args.mode,
        "count": args.count,
        "concurrency": args.concurrency,
        "tasks_per_sec": round(args.count / elapsed, 1),
        "submit_to_started_p50_ms": round(percentile(latencies, 0.5), 2),
        "submit_to_started_p99_ms": round(percentile(latencies, 0.99), 2),
    }
    if cpu_before and cpu_after:
        busy = cpu_after[0] - cpu_before[0]
        total = cpu_after[1] - cpu_before[1]
        ticks = os.sysconf("SC_CLK_TCK")
        figures["machine_cpu_ms_per_task"] = round(busy * 1000 / ticks / args.count, 2)
        figures["machine_busy_pct"] = round(100 * busy / total, 2) if total else 0.0
    print(f"throughput            {figures['tasks_per_sec']} tasks/s")
    if args.mode == "closed":
        print(
            f"submit -> started     p50 {figures['submit_to_started_p50_ms']} ms, "
            f"p99 {figures['submit_to_started_p99_ms']} ms"
        )
    if "machine_cpu_ms_per_task" in figures:
        print(
            f"machine CPU           {figures['machine_cpu_ms_per_task']} ms per task "
            f"({figures['machine_busy_pct']}% of all cores busy)"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
