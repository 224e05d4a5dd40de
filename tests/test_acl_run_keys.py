"""What a worker writes of a run stays out of its meta hash (which its ACL user may only read): a
reclaim's count and the output's byte count live in the tasks hash, and the run's end is read there.
The coordinator's commit still loses to a reclaim that raced it, the output limit still holds, and a
run that ended starts nothing. Driven step by step against a real redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from phibroker import wire
from phibroker.engine.state import Transition
from phibroker.keys import WORKERS_GROUP
from phibroker.runtime.client import Client
from phibroker.runtime.coordinator import Coordinator
from phibroker.settings import Settings
from phibroker.store.connection import parse_units
from phibroker.store.worker import WorkerStore
from tests.conftest import until

ONE = "name: one\ntasks:\n  A: {agent: probe, command: noop}\n"
Dispatched = tuple[Coordinator, WorkerStore, str, tuple[str, str, str, bytes]]


@pytest.fixture
def dispatched(settings: Settings, client: Client, tmp_path: Path) -> Dispatched:
    """A run whose one task was dispatched and not started: the coordinator that did it, a worker's
    store, the run's id and (unit, dispatch id, entry id, no lost record) as START takes it."""
    path = tmp_path / "one.yaml"
    path.write_text(ONE)
    wf_id = client.submit(path)
    coordinator = Coordinator(settings)
    for inbox in settings.keys.inboxes:
        coordinator.broker.ensure_group(inbox, "coordinators")
    lane = settings.keys.agent_tasks("probe")
    until(lambda: coordinator.step() >= 0 and client.broker.redis.xlen(lane) == 1)
    worker = WorkerStore(settings)
    ((_, entry),) = worker.read_groups([lane], WORKERS_GROUP, "w1", 1, None)
    message = wire.TaskMessage.decode(entry.raw or b"", 1 << 20)
    return coordinator, worker, wf_id, (message.unit, message.id, entry.id, b"")


def test_a_reclaim_moves_the_run_version_without_touching_the_meta_hash(
    settings: Settings, dispatched: Dispatched
) -> None:
    coordinator, worker, wf_id, start = dispatched
    store, redis = coordinator.broker, worker.redis
    meta_before = redis.hgetall(settings.keys.wf(wf_id))
    assert worker.start_many("w1", {wf_id: [start]}) == {wf_id: [1]}
    (read,) = store.versions([wf_id])  # what a coordinator holding the run knows
    assert worker.start_many("w2", {wf_id: [start]}) == {wf_id: [2]}  # w1 presumed dead: w2 reclaims
    assert redis.hgetall(settings.keys.wf(wf_id)) == meta_before
    assert redis.hget(settings.keys.wf_tasks(wf_id), "reclaims") == b"1"
    assert store.versions([wf_id]) == [read + 1]
    assert store.commit([(wf_id, read, Transition())]) == [-1]  # decided before the reclaim: refused
    assert store.commit([(wf_id, read + 1, Transition())]) == [read + 2]
    ((meta, _, _),) = store.load_runs([wf_id])
    assert meta["version"] == read + 2


def test_output_bytes_count_in_the_tasks_hash_and_the_limit_holds(settings: Settings, dispatched: Dispatched) -> None:
    _, worker, wf_id, _ = dispatched
    assert worker.append_output(wf_id, [("chunk", b"x" * 60)], limit=100) == (1, 60)
    assert worker.append_output(wf_id, [("chunk", b"y" * 60)], limit=100) == (0, 60)  # would pass the limit
    assert worker.redis.hget(settings.keys.wf_tasks(wf_id), "output_bytes") == b"60"
    assert worker.redis.hget(settings.keys.wf(wf_id), "output_bytes") is None


def test_a_run_that_ended_starts_nothing_and_its_counters_are_no_units(
    settings: Settings, client: Client, dispatched: Dispatched
) -> None:
    coordinator, worker, wf_id, start = dispatched
    (version,) = coordinator.broker.versions([wf_id])
    assert version is not None
    assert coordinator.broker.commit([(wf_id, version, Transition(finished=True))]) == [version + 1]
    assert worker.start_many("w1", {wf_id: [start]}) == {wf_id: [0]}
    reopened = Transition(reopened=True)
    assert coordinator.broker.commit([(wf_id, version + 1, reopened)]) == [version + 2]
    assert worker.start_many("w1", {wf_id: [start]}) == {wf_id: [1]}  # running again: it starts
    worker.append_output(wf_id, [("chunk", b"z")], limit=100)
    assert set(client.status(wf_id)["tasks"]) == {"A"}  # `reclaims`, `output_bytes`: not units


@pytest.mark.parametrize("garbage", [b"x", b"9007199254740993", b"-1", b"5.0", b"0x10", b"1e300"])
def test_a_count_overwritten_with_garbage_is_read_as_zero_alike_by_lua_and_python(
    settings: Settings, dispatched: Dispatched, garbage: bytes
) -> None:
    """A worker's user may write the tasks hash: whatever it writes in `reclaims` or `output_bytes`,
    the version the coordinator computes is the one the commit script checks (no run stalls), a
    reclaim counts on from it, nothing raises, and the output limit fails closed."""
    coordinator, worker, wf_id, start = dispatched
    store, redis, tasks = coordinator.broker, worker.redis, settings.keys.wf_tasks(wf_id)
    redis.hset(tasks, mapping={"reclaims": garbage, "output_bytes": garbage, "A|reclaims": garbage})
    (read,) = store.versions([wf_id])
    assert read is not None and store.commit([(wf_id, read, Transition())]) == [read + 1]
    assert worker.start_many("w1", {wf_id: [start]}) == {wf_id: [1]}
    assert worker.start_many("w2", {wf_id: [start]}) == {wf_id: [2]}  # a reclaim: counts start again
    assert redis.hget(tasks, "reclaims") == b"1" and redis.hget(tasks, "A|reclaims") == b"1"
    (read,) = store.versions([wf_id])
    assert store.commit([(wf_id, read, Transition())]) == [read + 1]
    redis.hset(tasks, mapping={"A|run": b"\xff" + garbage, "A|end": b"nan\x1fzz\x1f1e999"})
    ((meta, units, _),) = store.load_runs([wf_id])
    assert meta["version"] == read + 1 and parse_units(units)["A"]["finished"] is None  # no raise either
    redis.hset(tasks, "output_bytes", garbage)
    assert worker.append_output(wf_id, [("chunk", b"x")], limit=100)[0] == 0  # no more room
    assert worker.append_output(wf_id, [("event", b"e")], limit=0)[0] == 1  # events always go
