"""The yardstick: a bare redis-py streams round trip, producer and consumer in two processes.

It does the least any design on Redis Streams must do for a task — put it on a stream, have another
process read it through a consumer group, write a result, ack — so phibroker's figures are divided by
it. Three shapes: both sides batched (XADDs pipelined ×100, COUNT 100 reads, result XADDs
pipelined with one XACK per read), unbatched (one XADD per task, one result XADD and one XACK per task),
and a chain (one task at a time: the hop). The producer runs in the benchmark process; the consumer is
`python -m benchmarks.bare consume URL TASKS RESULTS MODE`.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from benchmarks.harness import Logs, percentile, spawn, stop

GROUP = "bench"
FIELD = b"m"
STOP = b"stop"
PIPELINE = 100  # XADDs per pipeline on the producer side
READ_COUNT = 100  # COUNT of the consumer's XREADGROUP
TIMEOUT = 120.0


def connect(url: str) -> redis.Redis:
    """RESP2 (the reply shapes below), and no socket timeout under blocking reads (it would cut them off)."""
    return redis.Redis.from_url(url, protocol=2, socket_timeout=None)


# -- the consumer process -----------------------------------------------------------------------------
def consume(url: str, tasks: str, results: str, mode: str) -> None:
    """Read tasks through the group until the stop entry; settle batched or one task at a time."""
    r = connect(url)
    print("ready", flush=True)
    while True:
        reply: Any = r.xreadgroup(GROUP, "consumer", {tasks: ">"}, count=READ_COUNT, block=1000)
        if not reply:
            continue
        entries = reply[0][1]
        if mode == "batched":
            _settle_batch(r, tasks, results, entries)
        else:
            _settle_each(r, tasks, results, entries)
        if any(fields.get(FIELD) == STOP for _, fields in entries):
            return


def _settle_batch(r: redis.Redis, tasks: str, results: str, entries: list[Any]) -> None:
    pipe = r.pipeline(transaction=False)
    for entry_id, _ in entries:
        pipe.xadd(results, {FIELD: entry_id})
    pipe.xack(tasks, GROUP, *[entry_id for entry_id, _ in entries])
    pipe.execute()


def _settle_each(r: redis.Redis, tasks: str, results: str, entries: list[Any]) -> None:
    for entry_id, _ in entries:
        r.xadd(results, {FIELD: entry_id})
        r.xack(tasks, GROUP, entry_id)


# -- the producer side -------------------------------------------------------------------------------
@contextmanager
def _pair(url: str, logs: Logs, mode: str) -> Iterator[tuple[redis.Redis, str, str]]:
    """Fresh streams and a fresh consumer process for one measurement; both gone afterwards."""
    r = connect(url)
    tag = uuid.uuid4().hex[:8]
    tasks, results = f"bare:{tag}:tasks", f"bare:{tag}:results"
    r.xgroup_create(tasks, GROUP, id="0", mkstream=True)
    process, log = spawn(
        ["-m", "benchmarks.bare", "consume", url, tasks, results, mode], logs, "bare-consumer", pipe_stdout=True
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"bare consumer did not start:\n{logs.tail(log)}")
        yield r, tasks, results
        r.xadd(tasks, {FIELD: STOP})
        process.wait(timeout=30)
    finally:
        stop(process)
        r.delete(tasks, results)
        r.close()


def _read_results(r: redis.Redis, results: str, n: int, after: bytes | str = "0") -> bytes | str:
    """Read the results stream until `n` more entries arrived; returns the last id read."""
    got = 0
    deadline = time.monotonic() + TIMEOUT
    while got < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bare round trip: {got} of {n} results after {TIMEOUT:.0f} s")
        reply: Any = r.xread({results: after}, count=1000, block=1000)
        if reply:
            entries = reply[0][1]
            got += len(entries)
            after = entries[-1][0]
    return after


def batched(url: str, n: int, logs: Logs) -> float:
    """Tasks/s with both sides batched: the ceiling a Python design on one Redis can approach."""
    with _pair(url, logs, "batched") as (r, tasks, results):
        started = time.perf_counter()
        for first in range(0, n, PIPELINE):
            pipe = r.pipeline(transaction=False)
            for i in range(first, min(n, first + PIPELINE)):
                pipe.xadd(tasks, {FIELD: b"task-%d" % i})
            pipe.execute()
        _read_results(r, results, n)
        return n / (time.perf_counter() - started)


def unbatched(url: str, n: int, logs: Logs) -> float:
    """Tasks/s with a round trip per command: what a one-message-at-a-time design is capped at."""
    with _pair(url, logs, "single") as (r, tasks, results):
        started = time.perf_counter()
        for i in range(n):
            r.xadd(tasks, {FIELD: b"task-%d" % i})
        _read_results(r, results, n)
        return n / (time.perf_counter() - started)


def chain_hops(url: str, hops: int, logs: Logs) -> list[float]:
    """Each hop in ms: XADD one task, the consumer reads it and XADDs its result, the producer reads that."""
    out = []
    with _pair(url, logs, "batched") as (r, tasks, results):
        last: bytes | str = "0"
        for i in range(hops):
            started = time.perf_counter()
            r.xadd(tasks, {FIELD: b"task-%d" % i})
            last = _read_results(r, results, 1, last)
            out.append((time.perf_counter() - started) * 1000)
    return out


def hop_p50(url: str, hops: int, logs: Logs) -> float:
    return percentile(chain_hops(url, hops, logs), 50)


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "consume":
        raise SystemExit("usage: python -m benchmarks.bare consume URL TASKS RESULTS batched|single")
    consume(*sys.argv[2:])
