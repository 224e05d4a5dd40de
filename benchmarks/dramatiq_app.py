"""The dramatiq app of the comparison, imported only when `dramatiq` is installed (the `[bench]` extra).

Broker and result backend are the benchmark's own Redis, passed in `BENCH_REDIS_URL`, so dramatiq's
figure sits beside phibroker's on the same server. Results are on, as phibroker's always are.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"], namespace="phibroker-bench-dramatiq")
broker.add_middleware(Results(backend=RedisBackend(url=os.environ["BENCH_REDIS_URL"])))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def noop() -> None:
    return None
