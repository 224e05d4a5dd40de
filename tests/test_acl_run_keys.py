"""What a worker writes of a run is its own: the start marks of its agent's units and the attempts it
reclaimed, in hashes and lists named by run and agent (its ACL user may only read the run's other keys),
and the output's byte count beside the output stream. The coordinator reads a unit's mark only from
its own agent's hash and for the dispatch it runs under now; its commit loses to a reclaim that raced
it; the output limit holds; a run that ended starts nothing. Driven step by step against a real
redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.exceptions import ResponseError

from phibroker import wire
from phibroker.engine import records
from phibroker.engine.state import Transition, overlay_marks
from phibroker.keys import WORKERS_GROUP
from phibroker.runtime.client import Client
from phibroker.runtime.coordinator import Coordinator
from phibroker.settings import Settings
from phibroker.store import scripts
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
    for inbox in settings.keys.inbox_lanes:
        coordinator.broker.ensure_group(inbox, "coordinators")
    lane = settings.keys.agent_tasks("probe")
    until(lambda: coordinator.step() >= 0 and client.broker.redis.xlen(lane) == 1)
    worker = WorkerStore(settings)
    worker.serve("probe")
    ((_, entry),) = worker.read_groups([lane], WORKERS_GROUP, "w1", 1, None)
    message = wire.TaskMessage.decode(entry.raw or b"", 1 << 20)
    return coordinator, worker, wf_id, (message.unit, message.id, entry.id, b"")


def guarded(token: int, dispatch: str) -> Transition:
    """A transition that needs unit A's mark to hold `token` for `dispatch`, as a result's does."""
    return Transition(guards={"A": ("probe", dispatch, token)})


def test_a_start_and_a_reclaim_mark_the_agents_own_hash_and_a_commit_on_the_old_token_loses(
    settings: Settings, dispatched: Dispatched
) -> None:
    coordinator, worker, wf_id, start = dispatched
    store, redis, keys = coordinator.broker, worker.redis, settings.keys
    unit, dispatch, entry, _ = start
    run_keys = [keys.wf(wf_id), keys.wf_tasks(wf_id), keys.wf_history(wf_id)]
    before = [redis.dump(key) for key in run_keys]
    assert worker.start_many("probe", "w1", {wf_id: [start]}) == {wf_id: [1]}
    ((meta, units, _, _),) = store.load_runs([wf_id])
    assert units["A"] | {"started": None} == units["A"] | {
        "state": "running",
        "token": 1,
        "attempt": 1,
        "reclaims": 0,
        "worker": "w1",
        "entry": entry,
        "started": None,
    }
    read = meta["version"]
    lost = records.attempt(unit, 1, "w1", None, None, 0.0, "lost: worker w1 stopped renewing its lease", False)
    assert worker.start_many("probe", "w2", {wf_id: [(unit, dispatch, entry, lost)]}) == {wf_id: [2]}
    assert [redis.dump(key) for key in run_keys] == before  # the run's own keys: untouched by workers
    assert store.versions([wf_id]) == [read]  # a reclaim moves no version: the commit's guard catches it
    assert store.commit([(wf_id, read, guarded(1, dispatch))]) == [-1]  # decided before the reclaim
    ((_, _, _, found),) = store.load_runs([wf_id])
    assert found == {"probe": (1, [lost])}  # read with the run, moved by its next commit
    moved = guarded(2, dispatch)
    moved.history, moved.lost_moved = found["probe"][1], {"probe": 1}
    assert store.commit([(wf_id, read, moved)]) == [read + 1]
    assert redis.lrange(keys.wf_history(wf_id), 0, -1) == [lost]
    assert redis.llen(keys.wf_lost(wf_id, "probe")) == 0
    ((_, units, _, _),) = store.load_runs([wf_id])
    assert (units["A"]["token"], units["A"]["attempt"], units["A"]["reclaims"], units["A"]["worker"]) == (2, 2, 1, "w2")


def test_marks_count_only_in_their_own_agents_hash_and_for_the_current_dispatch() -> None:
    units = {
        "A": {"state": "ready", "agent": "probe", "dispatch": "d2", "attempt": 1},
        "B": {"state": "ready", "agent": "kalic", "dispatch": "d3", "attempt": 1},
        "C": {"state": "succeeded", "agent": "probe", "dispatch": "d4", "attempt": 1},
        # answered, waiting for the tasks it spawned: its token kept in the tasks hash, its mark overwritten
        "D": {"state": "running", "agent": "probe", "dispatch": "d5", "attempt": 1, "token": 1, "answered": 1},
    }
    mark = "\x1f".join
    overlay_marks(
        units,
        {
            "probe": {
                "A": mark(["d1", "1", "5.0", "1-0", "old"]),  # an earlier dispatch's
                "B": mark(["d3", "1", "5.0", "1-0", "forger"]),  # kalic's unit
                "C": mark(["d4", "9", "5.0", "1-0", "late"]),  # it ended already
                "D": "junk",
            },
            "kalic": {"B": mark(["d3", "1e3", "nan", "2-0", "k1"]), "A": "d2"},  # its own, but junk; not its unit
        },
    )
    assert units["A"]["state"] == units["B"]["state"] == "ready" and units["C"]["attempt"] == 1
    assert "worker" not in units["A"] and "worker" not in units["B"] and "worker" not in units["C"]
    assert units["D"]["token"] == 0  # as the commit's guard reads a mark that is none: the two agree


def test_output_goes_to_the_agents_own_stream_of_the_run_its_bytes_beside_it_and_the_limit_holds(
    settings: Settings, dispatched: Dispatched
) -> None:
    _, worker, wf_id, _ = dispatched
    keys = settings.keys
    assert worker.append_output(wf_id, [("chunk", b"x" * 60)], limit=100) == (1, 60)
    assert worker.append_output(wf_id, [("chunk", b"y" * 60)], limit=100) == (0, 60)  # would pass the limit
    assert worker.redis.get(keys.wf_agent_output_bytes(wf_id, "probe")) == b"60"
    assert worker.redis.xlen(keys.wf_agent_output(wf_id, "probe")) == 1
    assert [fields[b"k"] for _, fields in worker.redis.xrange(keys.wf_output(wf_id))] == [b"event"]  # the run's
    assert worker.redis.hlen(settings.keys.wf_tasks(wf_id)) and not worker.redis.hexists(
        settings.keys.wf_tasks(wf_id), "output_bytes"
    )


def test_a_run_that_ended_starts_nothing_and_its_marks_end_with_it(
    settings: Settings, client: Client, dispatched: Dispatched
) -> None:
    coordinator, worker, wf_id, start = dispatched
    keys, redis = settings.keys, worker.redis
    (version,) = coordinator.broker.versions([wf_id])
    assert version is not None
    assert worker.start_many("probe", "w1", {wf_id: [start]}) == {wf_id: [1]}
    ended = Transition(finished=True, agents=("probe",))
    assert coordinator.broker.commit([(wf_id, version, ended)]) == [version + 1]
    assert 0 < redis.ttl(keys.wf_marks(wf_id, "probe")) <= settings.retention
    assert worker.start_many("probe", "w2", {wf_id: [start]}) == {wf_id: [0]}
    reopened = Transition(reopened=True, agents=("probe",))
    assert coordinator.broker.commit([(wf_id, version + 1, reopened)]) == [version + 2]
    assert redis.ttl(keys.wf_marks(wf_id, "probe")) == -1
    assert worker.start_many("probe", "w1", {wf_id: [start]}) == {wf_id: [1]}  # running again: w1 asks again
    worker.append_output(wf_id, [("chunk", b"z")], limit=100)
    assert set(client.status(wf_id)["tasks"]) == {"A"}


@pytest.mark.parametrize("garbage", ["x", "9007199254740993", "-1", "5.0", "0x10", "1e300", "\udcff"])
def test_garbage_in_an_agents_own_marks_is_read_alike_by_lua_and_python(
    settings: Settings, dispatched: Dispatched, garbage: str
) -> None:
    """An agent's workers may write their own marks and lost attempts: whatever they hold, the
    coordinator's reading is the one the commit script checks (no run stalls), nothing raises, a
    lost attempt that is not a record about the agent's own unit goes nowhere, and the output limit
    fails closed."""
    coordinator, worker, wf_id, start = dispatched
    store, redis, keys = coordinator.broker, worker.redis, settings.keys
    unit, dispatch, entry, _ = start
    junk = garbage.encode(errors="surrogateescape")
    marks, lost = keys.wf_marks(wf_id, "probe"), keys.wf_lost(wf_id, "probe")
    redis.hset(marks, unit, b"\x1f".join([dispatch.encode(), junk, junk, entry.encode(), b"w1"]))
    about_b = records.attempt("B", 1, "w1", None, None, 0.0, "lost: forged", False)
    redis.rpush(lost, b"Z\x1f" + junk, junk, b"A" + junk, b"A\x1f" + junk, b"A\x1f" + about_b)
    ((meta, units, _, found),) = store.load_runs([wf_id])
    assert found == {"probe": (5, [])}  # none is a record about the agent's own unit A
    token = int(units["A"].get("token") or 0)
    moved = guarded(token, dispatch)
    moved.lost_moved = {"probe": 5}
    assert store.commit([(wf_id, meta["version"], moved)]) == [meta["version"] + 1]
    assert redis.lrange(keys.wf_history(wf_id), 0, -1) == [] and redis.llen(lost) == 0
    assert worker.start_many("probe", "w2", {wf_id: [start]})[wf_id][0] in (-1, 0, 2)  # refused or counted on
    redis.set(keys.wf_agent_output_bytes(wf_id, "probe"), junk)
    assert worker.append_output(wf_id, [("chunk", b"x")], limit=100)[0] == 0  # no more room
    assert worker.append_output(wf_id, [("event", b"e")], limit=0)[0] == 1  # events always go


def test_marks_and_lost_attempts_too_big_to_be_ones_are_not_fetched_and_a_commit_clears_them(
    settings: Settings, client: Client, dispatched: Dispatched
) -> None:
    """An agent's workers may fill their own keys of a run: a mark of megabytes, or lost attempts that
    take megabytes. A coordinator's or a view's read of the run fetches none of it (a mark too long is
    none, a list too big holds no attempt), and the next commit trims the whole list. Of more lost
    attempts than a commit moves, it moves the first 1,000, and the next commit the rest."""
    coordinator, worker, wf_id, start = dispatched
    store, redis, keys = coordinator.broker, worker.redis, settings.keys
    unit, dispatch, entry, _ = start
    marks, lost = keys.wf_marks(wf_id, "probe"), keys.wf_lost(wf_id, "probe")
    redis.hset(marks, unit, b"\x1f".join([dispatch.encode(), b"1", b"1.0", entry.encode(), b"w" * 4_000_000]))
    about_a = b"A\x1f" + records.attempt("A", 1, "w1", None, None, 0.0, "lost: worker w1 stopped", False)
    for many, read, left in (([about_a, b"A\x1f" + b"x" * 5_000_000], 0, 0), ([about_a] * 1001, 1000, 1)):
        redis.delete(lost)
        redis.rpush(lost, *many)
        ((meta, units, _, found),) = store.load_runs([wf_id])
        count, records_ = found["probe"]
        assert count == (read or len(many)) and len(records_) == read, (count, len(records_))  # all trimmed
        assert not units["A"].get("token"), units["A"]
        assert len(client.status(wf_id)["tasks"]["A"]["history"]) == read
        moved = guarded(0, dispatch)
        moved.lost_moved = {"probe": count}
        assert store.commit([(wf_id, meta["version"], moved)]) == [meta["version"] + 1]
        assert redis.llen(lost) == left


def test_a_mark_of_the_dispatch_id_alone_or_of_a_reclaim_is_read_whole() -> None:
    """A mark cut short (the dispatch id alone, which any agent may read) is no start (token 0, as the
    commit's guard reads it), and a reclaim's token tells the attempt and the reclaims, whatever else
    the worker wrote."""
    units = {
        "A": {"state": "ready", "agent": "probe", "dispatch": "d1", "attempt": 3, "reclaims": 1},
        "B": {"state": "ready", "agent": "probe", "dispatch": "d2", "attempt": 1},
    }
    overlay_marks(units, {"probe": {"A": "d1\x1f3\x1f5.0\x1f1-0\x1fw2\x1f999", "B": "d2"}})
    assert (units["A"]["state"], units["A"]["attempt"], units["A"]["reclaims"], units["A"]["token"]) == (
        "running",
        5,
        3,
        3,
    )
    assert units["B"] == {"state": "ready", "agent": "probe", "dispatch": "d2", "attempt": 1, "token": 0}


def test_start_is_bounded_whatever_an_agents_user_calls_it_with(settings: Settings, dispatched: Dispatched) -> None:
    """An agent's user may call START with any arguments and write any mark of its own: a mark too long
    to be one reads as none (in START, in the commit's guard and when a run is read), an entry id or
    consumer name too long to be one is refused, and a call takes at most 1,000 messages."""
    coordinator, worker, wf_id, start = dispatched
    store, redis, keys = coordinator.broker, worker.redis, settings.keys
    unit, dispatch, entry, _ = start
    long_mark = "\x1f".join([dispatch, "1", "5.0", entry, "w9"]) + "\x1f" * 600
    redis.hset(keys.wf_marks(wf_id, "probe"), unit, long_mark)
    ((meta, units, _, _),) = store.load_runs([wf_id])
    assert units["A"]["state"] == "ready"
    assert store.commit([(wf_id, meta["version"], guarded(0, dispatch))]) == [meta["version"] + 1]
    assert worker.start_many("probe", "w1", {wf_id: [(unit, dispatch, "1" * 65, b"")]}) == {wf_id: [-1]}
    assert worker.start_many("probe", "w" * 257, {wf_id: [start]}) == {wf_id: [-1]}
    assert worker.start_many("probe", "w1", {wf_id: [start] * 1001}) == {wf_id: [1] * 1001}  # two calls
    with pytest.raises(ResponseError, match="at most 1000"):
        worker._script(
            scripts.START,
            [keys.wf_marks(wf_id, "probe"), keys.wf_lost(wf_id, "probe")],
            [keys.wf_tasks(wf_id), "probe", "w1", *[part for _ in range(1001) for part in start]],
        )
