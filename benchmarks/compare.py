"""The same no-op work through RQ (a dependency already), Celery and dramatiq (the `[bench]` extra), on
the same Redis.

Issue 10 states phibroker's targets as multiples of these (≥ 150× RQ SimpleWorker, ≥ 60× Celery, ≥ 15×
dramatiq), so they run in the same `make bench`, interleaved with phibroker's runs. RQ's rate is taken
from its jobs' own `started_at`/`ended_at` (the burst worker's start-up is not counted); Celery's and
dramatiq's from sending the group to having every result, with a warm worker.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import redis
from rq import Queue
from rq.job import Job

from benchmarks.harness import Logs, percentile, spawn, stop
from benchmarks.jobs import noop

TIMEOUT = 300.0
SIMPLE_WORKER, FORKING_WORKER = "rq.worker.SimpleWorker", "rq.worker.Worker"


# -- RQ ------------------------------------------------------------------------------------------------
def _rq_burst(url: str, queue: str, worker_class: str, logs: Logs) -> None:
    """`rq worker --burst` until the queue is empty; logs quiet, as a tuned deployment would run it."""
    args = ["-m", "rq.cli", "worker", "--burst", "--quiet", "--url", url, "--worker-class", worker_class, queue]
    process, log = spawn(args, logs, f"rq-{worker_class.rsplit('.', 1)[-1]}")
    try:
        code = process.wait(timeout=TIMEOUT)
    finally:
        stop(process)
    if code != 0:
        raise RuntimeError(f"rq worker exited with code {code}:\n{logs.tail(log)}")


def _finished_jobs(r: redis.Redis, ids: list[str]) -> list[Job]:
    jobs = [job for job in Job.fetch_many(ids, connection=r) if job is not None]
    unfinished = [job.id for job in jobs if job.ended_at is None]
    if len(jobs) != len(ids) or unfinished:
        raise RuntimeError(f"rq: {len(ids) - len(jobs) + len(unfinished)} of {len(ids)} jobs did not finish")
    return jobs


def rq_throughput(url: str, n: int, worker_class: str, logs: Logs) -> float:
    """Jobs/s: `n` no-op jobs enqueued (one pipeline), then one burst worker of `worker_class`."""
    r = redis.Redis.from_url(url)
    queue = Queue(f"bench-{uuid.uuid4().hex[:8]}", connection=r)
    jobs = queue.enqueue_many([Queue.prepare_data(noop, result_ttl=600) for _ in range(n)])
    _rq_burst(url, queue.name, worker_class, logs)
    done = _finished_jobs(r, [job.id for job in jobs])
    first = min(job.started_at for job in done if job.started_at)
    last = max(job.ended_at for job in done if job.ended_at)
    r.close()
    return n / (last - first).total_seconds()


def rq_chain_hop(url: str, n: int, logs: Logs) -> float:
    """p50 hop in ms of `n` jobs, each `depends_on` the one before, through a SimpleWorker."""
    r = redis.Redis.from_url(url)
    queue = Queue(f"bench-{uuid.uuid4().hex[:8]}", connection=r)
    ids: list[str] = []
    for _ in range(n):
        ids.append(queue.enqueue(noop, depends_on=ids[-1] if ids else None, result_ttl=600).id)
    _rq_burst(url, queue.name, SIMPLE_WORKER, logs)
    ends = [job.ended_at for job in _finished_jobs(r, ids) if job.ended_at is not None]
    r.close()
    return percentile([(b - a).total_seconds() * 1000 for a, b in zip(ends, ends[1:], strict=False)], 50)


# -- Celery ----------------------------------------------------------------------------------------------
def celery_throughput(url: str, n: int, logs: Logs) -> float:
    """Tasks/s of a `group` of `n` no-op tasks with results, one solo-pool worker, on our Redis."""
    os.environ["BENCH_REDIS_URL"] = url
    from celery import group

    from benchmarks.celery_app import noop as celery_noop

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    args = ["-m", "celery", "-A", "benchmarks.celery_app", "worker", "--pool", "solo", "-Q", queue]
    args += ["--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"]
    process, log = spawn(args, logs, "celery-worker", {"BENCH_REDIS_URL": url})
    try:
        celery_noop.apply_async(queue=queue).get(timeout=60)  # the worker is up and warm
        started = time.perf_counter()
        result: Any = group(celery_noop.s() for _ in range(n)).apply_async(queue=queue)
        result.get(timeout=TIMEOUT)
        return n / (time.perf_counter() - started)
    except Exception as exc:
        raise RuntimeError(f"celery: {exc}\n{logs.tail(log)}") from exc
    finally:
        stop(process)


# -- dramatiq --------------------------------------------------------------------------------------------
def dramatiq_throughput(url: str, n: int, logs: Logs) -> float:
    """Tasks/s of a `group` of `n` no-op messages with results, one worker process of 8 threads."""
    os.environ["BENCH_REDIS_URL"] = url
    import dramatiq

    from benchmarks.dramatiq_app import noop as dramatiq_noop

    args = ["-m", "dramatiq", "benchmarks.dramatiq_app", "--processes", "1", "--threads", "8"]
    process, log = spawn(args, logs, "dramatiq-worker", {"BENCH_REDIS_URL": url})
    try:
        dramatiq_noop.send().get_result(block=True, timeout=60_000)  # the worker is up and warm
        started = time.perf_counter()
        group = dramatiq.group(dramatiq_noop.message() for _ in range(n)).run()
        group.wait(timeout=int(TIMEOUT * 1000))
        return n / (time.perf_counter() - started)
    except Exception as exc:
        raise RuntimeError(f"dramatiq: {exc}\n{logs.tail(log)}") from exc
    finally:
        stop(process)
