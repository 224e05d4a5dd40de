"""Three coordinators share one Redis under 300 runs of 10 tasks: each run ends, no event is published
twice and no unit is dispatched (or run) twice. Real processes on a real redis-server; nothing is
killed, so any duplicate comes from the coordinators racing each other, not from a recovery.

No clock is compared: each wait is generous, and what is counted is what Redis holds at the end."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from phibroker import wire
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.workflow import Workflow, check
from tests.conftest import Processes, RedisServer, short_settings, until

RUNS = 300
COORDINATORS = 3
WORKERS = 3


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    """The default leases, not the tests' short ones: a process merely slowed by a loaded machine keeps
    its lease, so a duplicate can only come from live coordinators racing, never from a take-over."""
    short = short_settings(redis_server.url, tmp_path / "home", prefix="many")
    return short.model_copy(update={"reclaim_after": 30.0, "coordinator_takeover": 5.0})


def chain() -> Workflow:
    """t0 -> t1 -> ... -> t9: ten hops, each waiting for a commit and a drain."""
    tasks: dict[str, Any] = {"t0": {"agent": "probe", "command": "effect"}}
    for i in range(1, 10):
        tasks[f"t{i}"] = {"agent": "probe", "command": "effect", "depends_on": [f"t{i - 1}"]}
    return check({"name": "chain", "tasks": tasks})


def fan_out() -> Workflow:
    """t0, then t1..t8 at once, then t9 joining them: one release of eight, one join."""
    tasks: dict[str, Any] = {"t0": {"agent": "probe", "command": "effect"}}
    for i in range(1, 9):
        tasks[f"t{i}"] = {"agent": "probe", "command": "effect", "depends_on": ["t0"]}
    tasks["t9"] = {"agent": "probe", "command": "effect", "depends_on": [f"t{i}" for i in range(1, 9)]}
    return check({"name": "fan-out", "tasks": tasks})


def test_three_coordinators_publish_and_dispatch_each_thing_once(
    settings: Settings, procs: Processes, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    ledger = f"{settings.namespace}:ledger"
    env = {"PROBE_LEDGER_URL": settings.redis_url, "PROBE_LEDGER_KEY": ledger}
    for _ in range(COORDINATORS):
        procs.coordinator()
    for _ in range(WORKERS):
        procs.worker("probe", app="tests.apps.probe", concurrency=8, **env)
    until(
        lambda: (
            r.hlen(settings.keys.coordinators) >= COORDINATORS
            and r.hlen(settings.keys.worker_leases("probe")) >= WORKERS
        ),
        procs,
    )
    shapes = [chain(), fan_out()]
    with Client(settings) as client:
        began = time.monotonic()
        ids = [client.submit(shapes[i % 2]) for i in range(RUNS)]

        def ended() -> bool:
            pipe = r.pipeline(transaction=False)
            for wf_id in ids:
                pipe.hget(settings.keys.wf(wf_id), "state")
            return all(s in (b"succeeded", b"failed", b"cancelled", b"timed_out") for s in pipe.execute())

        until(ended, procs, timeout=600)
        elapsed = time.monotonic() - began
        statuses = [client.status(wf_id) for wf_id in ids]

    event_ids: Counter[str] = Counter()
    said: Counter[tuple[Any, ...]] = Counter()  # the same thing said twice under two ids
    for fields in (f for log in settings.keys.event_logs for _, f in r.xrange(log)):
        for event in wire.decode_events(fields[wire.FIELD], 1 << 26):
            event_ids[event["id"]] += 1
            said[(event["type"], event["workflow"], event["task"], *_unit_attempt(event))] += 1
    entries: Counter[str] = Counter()  # task stream entries per dispatch id
    dispatches: dict[tuple[str, str], set[str]] = {}  # dispatch ids per unit
    for lane in (settings.keys.agent_tasks("probe"), settings.keys.agent_bulk("probe")):
        for _, fields in r.xrange(lane):
            ids_of = wire.salvage_ids(fields[wire.FIELD], 1 << 26)
            assert ids_of is not None
            entries[ids_of["dispatch"]] += 1
            dispatches.setdefault((ids_of["wf"], ids_of["unit"]), set()).add(ids_of["dispatch"])
    handler_runs = {k.decode(): int(v) for k, v in r.hgetall(f"{ledger}:runs").items()}

    tasks = sum(len(s["tasks"]) for s in statuses)
    twice_published = {i: n for i, n in event_ids.items() if n > 1}
    twice_said = {k: n for k, n in said.items() if n > 1}
    twice_added = {i: n for i, n in entries.items() if n > 1}
    twice_dispatched = {k: v for k, v in dispatches.items() if len(v) > 1}
    twice_run = {k: n for k, n in handler_runs.items() if n > 1}
    print(
        f"\n{COORDINATORS} coordinators: {RUNS} runs, {tasks} tasks, {sum(event_ids.values())} events, "
        f"{len(twice_published)} event ids published twice, {len(twice_said)} events said twice, "
        f"{sum(entries.values())} dispatches, {len(twice_added)} added twice, "
        f"{len(twice_dispatched)} units dispatched twice, {len(twice_run)} handlers run twice, {elapsed:.1f}s"
    )
    failed = {s["id"]: s["error"] for s in statuses if s["state"] != "succeeded"}
    assert not failed, failed
    assert tasks == RUNS * 10 and len(dispatches) == tasks and len(handler_runs) == tasks
    assert not twice_published, list(twice_published.items())[:5]
    assert not twice_said, list(twice_said.items())[:5]
    assert not twice_added, list(twice_added.items())[:5]
    assert not twice_dispatched, list(twice_dispatched.items())[:5]
    assert not twice_run, list(twice_run.items())[:5]
    for status in statuses:
        for name, task in status["tasks"].items():
            assert [h["applied"] for h in task["history"]] == [True], (status["id"], name, task["history"])


def _unit_attempt(event: dict[str, Any]) -> tuple[Any, Any]:
    """Which unit and attempt an event speaks of, where it says (`task.dispatched`, `task.started`)."""
    data = event.get("data")
    return (data.get("unit"), data.get("attempt")) if isinstance(data, dict) else (None, None)
