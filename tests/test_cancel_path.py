"""Cancels reach running handlers through the stop notices, not the lease heartbeat: a sync handler's
`ctx.cancelled` is raised, an async handler's task is cancelled, and a handler that raises on its way
out fails as `Cancelled`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from phibroker import Agent, Client, Retryable
from phibroker.runtime.agent import Context
from phibroker.runtime.cancels import unwanted
from phibroker.runtime.worker import Worker
from phibroker.settings import Settings
from phibroker.store.worker import UnitState, WorkerStore
from tests.conftest import Processes, RedisServer, _have_redis, short_settings, until, working

LONG = 120.0  # longer than any wait of these tests: a handler still waiting this long was never told

stopper = Agent("stopper")


def mark(directory: str, name: str) -> None:
    (Path(directory) / name).write_text("")


@stopper.command()
def waits(ctx: Context, marks: str) -> dict[str, Any]:
    mark(marks, "sync-started")
    seen = ctx.cancelled.wait(LONG)
    mark(marks, "sync-cancelled" if seen else "sync-never-told")
    return {"seen": seen}


@stopper.command()
async def awaits(ctx: Context, marks: str) -> None:
    mark(marks, "async-started")
    try:
        await asyncio.Event().wait()  # nothing sets it: only a cancelled task ends
    except asyncio.CancelledError:
        mark(marks, "async-cancelled")
        raise


class SlowHeartbeat(Settings):
    """A worker whose heartbeat, the slow way a cancel reaches a handler, runs at its start and then
    not again within the test: a cancel that arrives can only have come by its stop notice."""

    @property
    def lease_renew(self) -> float:
        return 600.0


@contextmanager
def slow_heartbeat_worker(settings: Settings) -> Iterator[Worker]:
    """A `stopper` worker in this process, whose lease outlasts the test although it is renewed only once."""
    slow = SlowHeartbeat(**{**settings.model_dump(), "reclaim_after": 1200.0})
    with working(Worker(stopper, slow, concurrency=4)) as running:
        yield running


@pytest.fixture
def worker(settings: Settings) -> Iterator[Worker]:
    with slow_heartbeat_worker(settings) as running:
        yield running


def hold_flow(tmp_path: Path, *commands: str) -> tuple[Path, Path]:
    """A workflow of one task per command, and the folder where their handlers leave marks."""
    marks = tmp_path / "marks"
    marks.mkdir()
    tasks = "".join(
        f"  T{i}: {{agent: stopper, command: {c}, payload: {{marks: '{marks}'}}}}\n" for i, c in enumerate(commands)
    )
    path = tmp_path / "hold.yaml"
    path.write_text(f"name: hold\ntasks:\n{tasks}")
    return path, marks


def test_a_cancel_reaches_sync_and_async_handlers_without_the_heartbeat(
    procs: Processes, client: Client, worker: Worker, tmp_path: Path
) -> None:
    procs.coordinator()
    path, marks = hold_flow(tmp_path, "waits", "awaits")
    wf_id = client.submit(path)
    until(lambda: (marks / "sync-started").exists() and (marks / "async-started").exists(), procs)
    client.cancel(wf_id, "stop now")
    until(lambda: (marks / "sync-cancelled").exists() and (marks / "async-cancelled").exists(), procs)
    assert not (marks / "sync-never-told").exists()
    status = client.wait(wf_id, timeout=60)
    assert status["state"] == "cancelled", procs.output()
    assert status["tasks"]["T1"]["state"] == "cancelled"  # it stopped as asked (Sync returned: its result stands)


def test_the_listener_subscribes_again_after_redis_comes_back(tmp_path: Path) -> None:
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=True)  # AOF: the run survives the restart
    server.start()
    settings = short_settings(server.url, tmp_path / "home")
    (tmp_path / "logs").mkdir()
    procs = Processes(settings, tmp_path / "logs")
    channel = settings.keys.agent_stops("stopper")
    observer = redis.Redis.from_url(server.url)
    try:
        with Client(settings) as client, slow_heartbeat_worker(settings):
            procs.coordinator()
            path, marks = hold_flow(tmp_path, "waits")
            wf_id = client.submit(path)
            until(lambda: (marks / "sync-started").exists(), procs)
            server.stop()
            time.sleep(2)  # Redis stays away past the client's own quick retries
            server.start()
            until(lambda: dict(observer.pubsub_numsub(channel)).get(channel.encode()) == 1, procs)
            client.cancel(wf_id, "stop after the outage")
            until(lambda: (marks / "sync-cancelled").exists(), procs)
            assert client.wait(wf_id, timeout=60)["state"] == "cancelled", procs.output()
    finally:
        procs.close()
        observer.close()
        server.stop()


# -- outcomes, without a broker -----------------------------------------------------------------------

pure = Agent("pure")


@pure.command()
async def forever(ctx: Context, started: threading.Event) -> None:
    started.set()
    await asyncio.Event().wait()


@pure.command()
def gives_up(ctx: Context, started: threading.Event) -> None:
    started.set()
    ctx.cancelled.wait(LONG)
    raise Retryable("stopping")


@pure.command()
def finishes(ctx: Context, started: threading.Event) -> str:
    started.set()
    ctx.cancelled.wait(LONG)
    return "done anyway"


def run_and_cancel(command: str) -> Any:
    """Run one handler of `pure`, raising its `ctx.cancelled` from another thread once it has started."""
    ctx = Context(workflow_id="wf", task="T", unit="T", attempt=1, agent="pure", command=command)
    started = threading.Event()

    def cancel() -> None:
        started.wait(LONG)
        ctx.cancelled.set()

    threading.Thread(target=cancel, daemon=True).start()
    return pure.execute(command, ctx, {"started": started}, 1 << 20)


@pytest.mark.parametrize("command", ["forever", "gives_up"])
def test_a_handler_that_raises_once_cancelled_fails_as_cancelled_and_asks_no_retry(command: str) -> None:
    outcome = run_and_cancel(command)
    assert not outcome.ok and not outcome.retry
    assert outcome.error["type"] == "Cancelled"
    raised = "CancelledError" if command == "forever" else "Retryable: stopping"
    assert outcome.error["message"] == f"asked to stop (the handler raised {raised})"


def test_a_handler_that_returns_once_cancelled_succeeds() -> None:
    outcome = run_and_cancel("finishes")
    assert outcome.ok and outcome.error is None


def test_an_error_without_a_cancel_keeps_its_type() -> None:
    ctx = Context(workflow_id="wf", task="T", unit="T", attempt=1, agent="plain", command="breaks")
    agent = Agent("plain")

    @agent.command()
    def breaks(ctx: Context) -> None:
        raise ValueError("bad input")

    outcome = agent.execute("breaks", ctx, {}, 1 << 20)
    assert outcome.error is not None and outcome.error["type"] == "ValueError"


# -- the heartbeat's check: what it reads, and when it stops an attempt ---------------------------------


def test_the_heartbeat_reads_a_stop_reason_and_spares_a_failure_handler(settings: Settings) -> None:
    """A stop reason stops the attempt; a run that is `cancelling` does not by itself (its failure
    handlers run then), only the units it asked to stop."""
    broker, keys = WorkerStore(settings), settings.keys
    broker.redis.hset(keys.wf("w1"), "state", "running")
    broker.redis.hset(keys.wf("w2"), "state", "cancelling")
    for wf_id, stop in (("w1", "stop now"), ("w2", "")):
        broker.redis.hset(
            keys.wf_tasks(wf_id), mapping={"T|state": "running", "T|dispatch": "d1\x1f1\x1f0", "T|stop": stop}
        )
    asked, cancelling = broker.unit_states([("w1", "T"), ("w2", "T")])
    assert asked == UnitState("running", "running", "d1", "stop now")
    assert cancelling == UnitState("cancelling", "running", "d1", None)
    ctx = Context(workflow_id="w1", task="T", unit="T", attempt=1, agent="a", command="c", dispatch_id="d1")
    assert unwanted(asked, ctx, now=0) and not unwanted(cancelling, ctx, now=0)
    assert not unwanted(asked._replace(stop=None), ctx, now=0)
    assert unwanted(asked._replace(stop=None, dispatch="d2"), ctx, now=0)


def test_a_cancel_read_with_the_submit_cancels_the_run(procs: Processes, client: Client, tmp_path: Path) -> None:
    """A run cancelled right after its submit: the coordinator reads both in one round (here it starts
    after both were sent), releases the first task and cancels it in the same transition."""
    path = tmp_path / "flow.yaml"
    path.write_text(
        "name: quick\ntasks:\n  Work: {agent: nobody, command: work}\n"
        "  Then: {agent: nobody, command: work, depends_on: [Work]}\n"
    )
    ids = [client.submit(path) for _ in range(5)]
    for wf_id in ids:
        client.cancel(wf_id)
    procs.coordinator()
    for wf_id in ids:
        status = client.wait(wf_id, timeout=30)
        assert status["state"] == "cancelled", procs.output()
        assert {t["state"] for t in status["tasks"].values()} == {"cancelled"}
