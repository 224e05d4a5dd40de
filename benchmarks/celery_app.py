"""The Celery app of the comparison, imported only when `celery` is installed (the `[bench]` extra).

Broker and result backend are the benchmark's own Redis, passed in `BENCH_REDIS_URL`, so Celery's figure
sits beside phibroker's on the same server.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("phibroker-bench", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@app.task
def noop() -> None:
    return None
