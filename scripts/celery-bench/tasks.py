"""The task `corral bench runs` is compared with: start a process (`true`)."""

import os
import subprocess
import time

from celery import Celery

REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
app = Celery("tasks", broker=f"{REDIS}/0", backend=f"{REDIS}/1")


@app.task
def run_true():
    started = time.time()
    subprocess.run(["true"], check=True)
    return started
