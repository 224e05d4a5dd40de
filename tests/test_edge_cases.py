"""Edge cases a careful reader found: each once made a task hang, a result vanish or a coordinator stop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from phibroker import engine, wire, workflow
from phibroker.engine import state
from phibroker.keys import WORKERS_GROUP
from phibroker.runtime.client import Client
from phibroker.runtime.coordinator import Coordinator
from phibroker.settings import Settings
from phibroker.store.coordinator import CoordinatorStore
from phibroker.store.worker import WorkerStore
from tests.conftest import Processes, until
from tests.test_failures import flow


def make_run(text: str, limit: int = 1 << 20) -> state.Run:
    wf = workflow.check(workflow.decode(text, ".yaml"))
    return state.Run("wf", wf, {"version": 1, "params": wf.spec.params}, {}, {}, limit=limit)


def test_a_new_attempt_clears_the_previous_attempts_run_in_redis_too() -> None:
    run = make_run("name: w\ntasks:\n  A: {agent: a, command: c, retry: {base_delay: 1s}}\n")
    engine.start(run, 1.0)
    run.units["A"].update(state="running", token=2, entry="1-0", worker="w")  # reclaimed once
    dispatch = run.units["A"]["dispatch"]
    failed = wire.Result(dispatch, "wf", "A", token=2, ok=False, worker="w", started=1.5, finished=2.0, retry=True)
    assert engine.apply_result(run, failed, 2.0) and run.state("A") == "retrying"
    run.begin()
    engine.apply_timer(run, state.timer_member("retry", "wf", "A", 1), 5.0)
    assert run.tx.fields()["A|run"] == state.pack_group({"token": 0}, "run")


def test_more_units_than_one_release_are_all_released_without_any_result(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    procs.coordinator(PHIBROKER_MAX_RELEASE="2")
    tasks = "".join(f"  T{i}: {{agent: nobody, command: c}}\n" for i in range(10))
    wf_id = client.submit(flow(tmp_path, "name: many\ntasks:\n" + tasks))
    deadline = time.monotonic() + 10
    while any(t["state"] != "ready" for t in client.status(wf_id)["tasks"].values()):
        assert time.monotonic() < deadline, client.status(wf_id)
        time.sleep(0.05)


def test_malformed_inbox_messages_go_to_the_dlq_and_the_coordinator_goes_on(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    lost = msgpack.packb({"v": 1, "id": "x", "kind": "lost", "body": {"wf": "w"}})
    result = {
        "id": "d",
        "wf": "w",
        "unit": "A",
        "token": 1,
        "ok": True,
        "worker": "x",
        "started": 1.0,
        "finished": 2.0,
        "events": ["not a map"],
    }
    bad_events = msgpack.packb({"v": 1, "id": "y", "kind": "results", "results": msgpack.packb([result])})
    for raw in (lost, bad_events):
        r.xadd(settings.keys.inbox(None), {"m": raw})
    coordinator = procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    assert (
        client.wait(
            client.submit(flow(tmp_path, "name: ok\ntasks:\n  A: {agent: probe, command: noop}\n")), timeout=30
        )["state"]
        == "succeeded"
    )
    assert coordinator.poll() is None
    reasons = sorted(row["reason"] for row in client.dead_letters())
    assert reasons == [
        "lost message: field 'unit' missing or not text",
        "result: an emitted event is not a map with a type",
    ]


def test_a_handler_that_exits_or_emits_garbage_fails_its_attempt_and_the_worker_goes_on(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    procs.coordinator()
    worker = procs.worker("probe", app="tests.apps.probe")
    path = flow(
        tmp_path,
        "name: odd\nfailure: best_effort\ntasks:\n  Exit: {agent: probe, command: exits}\n"
        "  Emit: {agent: probe, command: emits_garbage}\n  Fine: {agent: probe, command: noop}\n",
    )
    status = client.wait(client.submit(path), timeout=30)
    tasks = status["tasks"]
    assert tasks["Exit"]["state"] == "failed" and tasks["Exit"]["error"] == "SystemExit: 3"
    assert tasks["Emit"]["state"] == "failed" and tasks["Emit"]["error"].startswith("TypeError")
    assert tasks["Fine"]["state"] == "succeeded" and worker.poll() is None


def _coordinator(settings: Settings) -> Coordinator:
    """A coordinator driven round by round from the test (`step()`), reading the lanes of the agent
    `probe` (on the roster, as its workers would put it), its inbox groups created."""
    coordinator = Coordinator(settings)
    coordinator.broker.redis.sadd(settings.keys.roster, "probe")
    coordinator.maintenance.read_roster()
    for lane in coordinator.maintenance.lanes():
        coordinator.broker.ensure_group(lane, "coordinators")
    return coordinator


def _answer_bulk_lane(settings: Settings, client: Client, agent: str, count: int, per_entry: int) -> list[str]:
    """Act as a worker on an agent's bulk lane: read, start and answer `count` tasks, `per_entry` results
    to an entry of the agent's bulk lane of the inbox."""
    broker, keys = WorkerStore(settings, client=client.broker.redis), settings.keys
    read = broker.read_groups([keys.agent_bulk(agent)], WORKERS_GROUP, "stand-in", count, None)
    messages = [(entry, wire.TaskMessage.decode(entry.raw or b"", 1 << 20)) for _, entry in read]
    by_wf: dict[str, list[tuple[str, str, str, bytes]]] = {}
    for entry, message in messages:
        by_wf.setdefault(message.wf, []).append((message.unit, message.id, f"bulk/{entry.id}", b""))
    tokens = broker.start_many(agent, "stand-in", by_wf)
    now = time.time()
    results = [
        wire.Result(id=m.id, wf=m.wf, unit=m.unit, token=token, ok=True, worker="stand-in", started=now, finished=now)
        for (_, m), token in zip(messages, [t for wf in by_wf for t in tokens[wf]], strict=True)
    ]
    for start in range(0, len(results), per_entry):
        inbox = wire.Inbox(kind="results", results=results[start : start + per_entry], agent=agent)
        broker.add(keys.agent_inbox(agent, None, bulk=True), inbox.encode(1 << 26))
    return [m.unit for _, m in messages]


@pytest.mark.parametrize(("per_entry", "budget"), [(80, 0.1), (1, 0.0)], ids=["one-round", "held-over-rounds"])
def test_a_result_read_before_its_deadline_fired_wins(
    per_entry: int, budget: float, settings: Settings, client: Client, tmp_path: Path, monkeypatch: Any
) -> None:
    """Bulk-lane results are handled a slice at a time after the inbox, and past the round's budget
    over the next rounds: the deadline timers claimed meanwhile wait for them, or on-time results
    would count as late."""
    monkeypatch.setattr("phibroker.runtime.coordinator.BULK_BUDGET", budget)
    tasks = "".join(f"  T{i:03d}: {{agent: probe, command: noop, timeout: 1s}}\n" for i in range(80))
    wf_id = client.submit(flow(tmp_path, f"name: wide\ntasks:\n{tasks}"))
    coordinator = _coordinator(settings)
    stream = settings.keys.agent_bulk("probe")
    until(lambda: coordinator.step() >= 0 and client.broker.redis.xlen(stream) == 80)
    assert len(_answer_bulk_lane(settings, client, "probe", 80, per_entry)) == 80
    time.sleep(1.3)  # every deadline is due: the next round claims them and reads the results together
    coordinator.step()
    if budget == 0.0:  # one slice handled, the rest and every deadline of the workflow held for later rounds
        assert len(coordinator.held.entries) == 80 - settings.bulk_slice and len(coordinator.held.timers) == 80
    coordinator.run(burst=True)  # returns once nothing is left, held work included
    status = client.status(wf_id)
    assert status["state"] == "succeeded", [t.get("error") for t in status["tasks"].values() if t.get("error")]
    assert all(len(t["history"]) == 1 for t in status["tasks"].values())


def test_a_dead_coordinators_bulk_lane_entries_are_taken_over(
    procs: Processes, settings: Settings, client: Client, tmp_path: Path
) -> None:
    tasks = "".join(f"  T{i:03d}: {{agent: probe, command: noop}}\n" for i in range(80))
    wf_id = client.submit(flow(tmp_path, f"name: wide\ntasks:\n{tasks}"))
    doomed = _coordinator(settings)
    stream = settings.keys.agent_bulk("probe")
    until(lambda: doomed.step() >= 0 and client.broker.redis.xlen(stream) == 80)
    _answer_bulk_lane(settings, client, "probe", 80, 80)
    lane = settings.keys.agent_inbox("probe", None, bulk=True)
    read = client.broker.read_groups([lane], "coordinators", doomed.name, 10, None)
    assert len(read) == 1  # delivered to the doomed coordinator, which dies before handling it (it holds no lease)
    procs.coordinator()
    assert client.wait(wf_id, timeout=30)["state"] == "succeeded", procs.output()


def test_a_round_that_meets_a_flushed_script_cache_keeps_what_it_read(settings: Settings, client: Client) -> None:
    """After a Redis restart or SCRIPT FLUSH the timer claim answers NOSCRIPT: only the claim runs
    again, and the entry the same round trip read is handed over, not left pending on nobody's list."""
    broker, inbox = CoordinatorStore(settings, client=client.broker.redis), settings.keys.inbox(None)
    broker.ensure_group(inbox, "coordinators")
    broker.add(inbox, wire.Inbox(kind="kick", body={"wf": "nothing"}).encode(1 << 20))
    broker.redis.script_flush()
    (timer_set,) = settings.keys.timer_sets
    _, _, timers, read = broker.poll([inbox], "coordinators", "c1", 10, None, False, {}, timer_set, 10)
    assert timers == [] and [stream for stream, _ in read] == [inbox]
    assert broker.redis.xpending(inbox, "coordinators")["pending"] == 1  # that very entry, delivered once


def test_an_entry_stranded_on_a_live_coordinator_is_read_again(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    """A read whose reply was lost (the client retried it) leaves an entry delivered to a coordinator
    that never saw it; its lease stays alive, so no one else takes it: the coordinator itself must."""
    coordinator = _coordinator(settings)
    coordinator.step()  # the start-up recovery read: nothing pending yet
    wf_id = client.submit(flow(tmp_path, "name: s\ntasks:\n  A: {agent: probe, command: noop}\n"))
    lost = client.broker.read_groups([settings.keys.inbox(None)], "coordinators", coordinator.name, 10, None)
    assert len(lost) == 1  # the submit, delivered behind the coordinator's back
    coordinator.step()
    assert "A" not in client.broker.read_workflow(wf_id)[1]  # never handled
    time.sleep(3 * settings.coordinator_takeover + 0.5)
    assert coordinator.maintenance.take_over() == 1
    assert client.broker.read_workflow(wf_id)[1]["A"]["state"] == "ready"
