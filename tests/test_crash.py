"""Nothing lost, nothing twice: coordinator crash points, worker kills, stops, dead letters, hostile bytes."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes, until
from tests.test_core import events_of
from tests.test_failures import flow

DIAMOND = """
name: diamond
tasks:
  A: {agent: probe, command: work}
  B: {agent: probe, command: work, depends_on: [A]}
  C: {agent: probe, command: work, depends_on: [A]}
  D: {agent: probe, command: work, depends_on: [B, C]}
  E: {agent: probe, command: work, depends_on: [D]}
  F: {agent: probe, command: work, depends_on: [D]}
  G: {agent: probe, command: work, depends_on: [E, F]}
"""


def ledger_lines(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def assert_once(status: dict[str, Any], settings: Settings, ledger: Path) -> None:
    """Every task succeeded by one applied attempt, dispatched once, its effect written once."""
    assert status["state"] == "succeeded"
    for name, task in status["tasks"].items():
        assert [h["applied"] for h in task["history"]] == [True], (name, task["history"])
    # A dead coordinator's undrained outbox is re-driven by the one that takes over (within the
    # takeover time, 1 s here), so its events may follow the workflow's end by a moment.
    deadline = time.monotonic() + 5
    while True:
        dispatched = [e["task"] for e in events_of(settings, status["id"]) if e["type"] == "task.dispatched"]
        if sorted(dispatched) == sorted(status["tasks"]) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(dispatched) == sorted(status["tasks"])
    keys = [line.split()[0] for line in ledger_lines(ledger)]
    assert sorted(keys) == sorted(f"{status['id']}:{t}" for t in status["tasks"])


@pytest.mark.parametrize("point", ["after_read", "after_commit", "after_drain", "before_ack"])
def test_a_coordinator_killed_at_any_point_loses_nothing(
    point: str, procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    procs.worker("probe", app="tests.apps.probe", PROBE_LEDGER=str(ledger))
    doomed = procs.coordinator(PHIBROKER_CRASH_AT=f"{point}:3")
    wf_id = client.submit(flow(tmp_path, DIAMOND))
    assert doomed.wait(timeout=30) == 137, procs.output()
    procs.coordinator()
    status = client.wait(wf_id, timeout=60)
    assert_once(status, settings, ledger)


FAN_OUT = "name: wide\ntasks:\n  A: {agent: probe, command: work}\n" + "".join(
    f"  T{i:03d}: {{agent: probe, command: work, depends_on: [A]}}\n" for i in range(150)
)


@pytest.mark.parametrize("point", ["after_commit:5", "after_drain:5", "before_ack:4"])
def test_a_coordinator_killed_in_a_big_release_loses_nothing(
    point: str, procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """150 units go out in chunks on the bulk lanes and come back on the inbox's bulk lane, handled a
    slice at a time: a kill between any two steps of that still runs each task once."""
    ledger = tmp_path / "ledger"
    procs.worker("probe", app="tests.apps.probe", PROBE_LEDGER=str(ledger))
    doomed = procs.coordinator(PHIBROKER_CRASH_AT=point)
    wf_id = client.submit(flow(tmp_path, FAN_OUT))
    assert doomed.wait(timeout=30) == 137, procs.output()
    procs.coordinator()
    status = client.wait(wf_id, timeout=60)
    assert_once(status, settings, ledger)


def running_on(client: Client, wf_id: str, task: str, procs: Processes) -> str:
    deadline = time.monotonic() + 20
    while True:
        units = client.broker.read_workflow(wf_id)[1]
        if units.get(task, {}).get("state") == "running":
            return str(units[task]["worker"])
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.02)


def pid_of(consumer: str) -> int:
    return int(consumer.split("@", 1)[1].split(":")[1])


def test_a_killed_worker_task_runs_again_without_using_a_retry(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    procs.coordinator()
    workers = [procs.worker("probe", app="tests.apps.probe", PROBE_LEDGER=str(ledger)) for _ in range(2)]
    wf_id = client.submit(
        flow(
            tmp_path,
            "name: k\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 3}, retry: {max_attempts: 1}}\n",
        )
    )
    victim = pid_of(running_on(client, wf_id, "A", procs))
    next(p for p in workers if p.pid == victim).send_signal(signal.SIGKILL)
    status = client.wait(wf_id, timeout=30)
    task = status["tasks"]["A"]
    assert status["state"] == "succeeded", procs.output()
    assert task["attempts"] == 2  # the reclaimed run counts, though max_attempts is 1: it used no retry
    lost, ran = task["history"]
    assert lost["applied"] is False and lost["error"].startswith("lost: worker probe@")
    assert ran["applied"] and pid_of(ran["worker"]) != victim
    assert len(ledger_lines(ledger)) == 1  # the killed run never reached its effect


def test_a_task_reclaimed_by_a_starting_worker_survives_that_worker_dying_too(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """A worker takes over a dead one's task as it starts (while it reads its own pending entries
    back): each delivery counts once, so a second death still leaves the task to a third worker."""
    ledger = tmp_path / "ledger"
    procs.coordinator()
    env = {"PROBE_LEDGER": str(ledger), "PHIBROKER_MAX_DELIVERIES": "4"}
    first = procs.worker("probe", app="tests.apps.probe", **env)
    wf_id = client.submit(flow(tmp_path, "name: k\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 3}}\n"))
    victim = running_on(client, wf_id, "A", procs)
    first.send_signal(signal.SIGKILL)
    first.wait()

    def lapsed() -> bool:
        clock, leases = client.broker.worker_leases()
        return bool(leases[victim]["expires"] < clock)

    until(lapsed, procs)  # so the next worker claims the task as it starts
    second = procs.worker("probe", app="tests.apps.probe", **env)
    until(lambda: pid_of(running_on(client, wf_id, "A", procs)) == second.pid, procs)
    time.sleep(0.5)  # the new worker runs the task: this is when a delivery could be counted again
    r = redis.Redis.from_url(settings.redis_url)
    (pending,) = r.xpending_range(settings.keys.agent_tasks("probe"), "workers", "-", "+", 10)
    assert pending["times_delivered"] <= 3, pending  # read, claimed, read back once as its own
    second.send_signal(signal.SIGKILL)
    second.wait()
    procs.worker("probe", app="tests.apps.probe", **env)
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded", (status["tasks"]["A"]["error"], procs.output())
    assert [h["applied"] for h in status["tasks"]["A"]["history"]] == [False, False, True]
    assert len(ledger_lines(ledger)) == 1


def test_a_slow_but_alive_handler_is_never_run_twice(procs: Processes, client: Client, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    procs.coordinator()
    for _ in range(2):
        procs.worker("probe", app="tests.apps.probe", PROBE_LEDGER=str(ledger))
    path = flow(tmp_path, "name: slow\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 5}}\n")
    status = client.wait(client.submit(path), timeout=30)  # 5 s is well past the 2 s reclaim-after
    assert status["state"] == "succeeded"
    assert len(status["tasks"]["A"]["history"]) == 1 and len(ledger_lines(ledger)) == 1


def test_sigterm_gives_unstarted_work_back_at_once_and_finishes_the_rest(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    procs.coordinator()
    first = procs.worker("probe", app="tests.apps.probe", concurrency=1, PHIBROKER_RECLAIM_AFTER="30")
    tasks = "".join(f"  T{i}: {{agent: probe, command: work, payload: {{sleep: 1}}}}\n" for i in range(6))
    wf_id = client.submit(flow(tmp_path, "name: stop\ntasks:\n" + tasks))
    running_on(client, wf_id, "T0", procs)
    first.send_signal(signal.SIGTERM)
    procs.worker("probe", app="tests.apps.probe", concurrency=4, PHIBROKER_RECLAIM_AFTER="30")
    assert first.wait(timeout=10) == 0
    status = client.wait(wf_id, timeout=20)  # within the 30 s before any reclaim could happen
    assert status["state"] == "succeeded", procs.output()
    for task in status["tasks"].values():  # one attempt each: nothing waited for a reclaim
        assert [h["applied"] for h in task["history"]] == [True]


def test_sigterm_past_the_grace_period_leaves_the_task_to_another_worker(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    procs.coordinator()
    first = procs.worker("probe", app="tests.apps.probe", PHIBROKER_STOP_GRACE="0.5", PROBE_LEDGER=str(ledger))
    wf_id = client.submit(flow(tmp_path, "name: g\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 2}}\n"))
    running_on(client, wf_id, "A", procs)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0
    procs.worker("probe", app="tests.apps.probe", PROBE_LEDGER=str(ledger))
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded"
    history = status["tasks"]["A"]["history"]
    assert [h["applied"] for h in history] == [False, True]
    assert len(ledger_lines(ledger)) == 1


def test_a_message_that_keeps_killing_workers_is_dead_lettered_and_its_task_fails(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    procs.coordinator()
    wf_id = client.submit(flow(tmp_path, "name: poison\ntasks:\n  A: {agent: probe, command: die}\n"))
    deadline = time.monotonic() + 60
    worker = procs.worker("probe", app="tests.apps.probe", PHIBROKER_MAX_DELIVERIES="3")
    while client.status(wf_id)["state"] == "running":
        assert time.monotonic() < deadline, procs.output()
        if worker.poll() is not None:
            worker = procs.worker("probe", app="tests.apps.probe", PHIBROKER_MAX_DELIVERIES="3")
        time.sleep(0.1)
    status = client.status(wf_id)
    assert status["state"] == "failed"
    assert status["tasks"]["A"]["error"] == "lost: delivered 3 times without a result"
    (letter,) = client.dead_letters()
    assert letter["reason"] == "delivered 3 times without a result"
    assert letter["source"].endswith(":agent:{probe}:tasks")


def hostile_messages() -> dict[str, bytes]:
    deep = b"\x91" * 5000 + b"\xc0"
    return {
        "truncated": msgpack.packb({"v": 1, "id": "x", "wf": "w"})[:-3],
        "0xc1": b"\xc1",
        "deep": deep,
        "ext": msgpack.packb(msgpack.ExtType(5, b"hi")),
        "huge": b"\x00" * (10 * 1024 * 1024),
        "wrong fields": msgpack.packb({"v": 1, "id": 3, "hello": "there"}),
        "not a map": msgpack.packb([1, 2, 3]),
    }


def test_hostile_task_messages_go_to_the_dlq_and_the_stream_keeps_flowing(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    stream = settings.keys.agent_tasks("probe")
    r.xgroup_create(stream, "workers", id="0", mkstream=True)
    for raw in hostile_messages().values():
        r.xadd(stream, {"m": raw})
    r.xadd(stream, {"other": b"no m field"})
    procs.coordinator()
    worker = procs.worker("probe", app="tests.apps.probe")
    status = client.wait(client.submit(flow(tmp_path, DIAMOND)), timeout=30)
    assert status["state"] == "succeeded", procs.output()
    assert worker.poll() is None
    letters = client.dead_letters()
    assert len(letters) == len(hostile_messages()) + 1
    reasons = " | ".join(row["reason"] for row in letters)
    for expected in ("not msgpack", "over the", "field 'id' has type int", "not a map", "no `m` field"):
        assert expected in reasons
    huge = next(row for row in letters if row["size"] == 10 * 1024 * 1024)
    assert huge["truncated"]
    assert r.xpending(stream, "workers")["pending"] == 0


def test_hostile_inbox_entries_go_to_the_dlq(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    r.xgroup_create(settings.keys.inbox(None), "coordinators", id="0", mkstream=True)
    for raw in hostile_messages().values():
        r.xadd(settings.keys.inbox(None), {"m": raw})
    coordinator = procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    status = client.wait(client.submit(flow(tmp_path, DIAMOND)), timeout=30)
    assert status["state"] == "succeeded", procs.output()
    assert coordinator.poll() is None
    assert len(client.dead_letters()) == len(hostile_messages())


def test_dlq_cli_lists_shows_retries_and_purges(procs: Processes, settings: Settings, client: Client) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    stream = settings.keys.agent_tasks("probe")
    r.xgroup_create(stream, "workers", id="0", mkstream=True)
    r.xadd(stream, {"m": b"\xc1"})
    coordinator = procs.coordinator()  # keeps what the worker could not handle, as its agent's user may not
    worker = procs.worker("probe", app="tests.apps.probe")
    deadline = time.monotonic() + 20
    while not client.dead_letters():
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    for process in (worker, coordinator):  # what is put back stays where it was put
        process.terminate()
        process.wait(timeout=20)
    from tests.test_core import cli

    listed = cli(settings, "dlq", "list", "--json")
    (row,) = __import__("json").loads(listed.stdout)
    shown = cli(settings, "dlq", "show", row["id"])
    assert shown.returncode == 0 and "decode_error" in shown.stdout
    # a task lane's dead letter is not put back from its bytes (anyone may write a dead letter)
    refused = cli(settings, "dlq", "retry", row["id"])
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "phibroker retry" in refused.stderr and r.xlen(stream) == 1 and len(client.dead_letters()) == 1
    inbox = settings.keys.inbox(None)
    letter = {"reason": "x", "raw": b"\xc1", "source": inbox, "entry": "1-0"}
    kept = r.xadd(settings.keys.dlq, {"m": msgpack.packb(letter)}).decode()
    before = r.xlen(inbox)
    retried = cli(settings, "dlq", "retry", kept)
    assert retried.returncode == 0 and r.xlen(inbox) == before + 1 and len(client.dead_letters()) == 1
    # one from an agent's lane goes back to its shard's own lane, where the admin may append
    letter["source"] = settings.keys.agent_inbox("probe", None)
    kept = r.xadd(settings.keys.dlq, {"m": msgpack.packb(letter)}).decode()
    retried = cli(settings, "dlq", "retry", kept)
    assert retried.returncode == 0 and r.xlen(inbox) == before + 2 and len(client.dead_letters()) == 1
    r.xadd(settings.keys.dlq, {"m": msgpack.packb({"reason": "x", "raw": b"", "source": "s", "entry": "1-0"})})
    assert cli(settings, "dlq", "purge").returncode == 2
    assert cli(settings, "dlq", "purge", "--all").returncode == 0 and not client.dead_letters()
    assert cli(settings, "dlq", "show", "1-0").returncode == 2


def test_an_unknown_workflow_result_is_dead_lettered(procs: Processes, client: Client, settings: Settings) -> None:
    from phibroker import wire

    result = wire.Result(id="d", wf="ghost", unit="A", token=1, ok=True, worker="w", started=1.0, finished=2.0)
    client.broker.send_to_coordinators(wire.Inbox(kind="results", results=[result]))
    procs.coordinator()
    deadline = time.monotonic() + 20
    while not client.dead_letters():
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    assert client.dead_letters()[0]["reason"] == "unknown workflow 'ghost'"


def test_streams_are_trimmed_below_what_readers_still_need(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    env = {"PHIBROKER_STREAM_MAXLEN": "50", "PHIBROKER_TRIM_EVERY": "0.2"}
    procs.coordinator(**env)
    procs.worker("probe", app="tests.apps.probe", **env)
    tasks = "".join(f"  T{i}: {{agent: probe, command: noop}}\n" for i in range(300))
    many = client.submit(flow(tmp_path, "name: many\ntasks:\n" + tasks))
    assert client.wait(many, timeout=60)["state"] == "succeeded", procs.output()
    r = redis.Redis.from_url(settings.redis_url)
    stream = settings.keys.agent_tasks("probe")
    deadline = time.monotonic() + 20
    while r.xlen(stream) > 150:
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.1)
    # nothing pending or unread was trimmed: a workflow submitted with no worker keeps its entry
    procs.close()
    procs.coordinator(**env)
    wf_id = client.submit(flow(tmp_path, "name: waiting\ntasks:\n  A: {agent: probe, command: noop}\n"))
    until(lambda: client.status(wf_id)["tasks"]["A"]["state"] == "ready", procs)  # dispatched, nobody to run it
    time.sleep(1.0)  # trims run meanwhile (every 0.2 s): the unread entry must survive them
    procs.worker("probe", app="tests.apps.probe", **env)
    assert client.wait(wf_id, timeout=30)["state"] == "succeeded"


def test_a_trim_racing_the_last_acks_does_not_stop_the_coordinator(redis_server: Any, tmp_path: Path) -> None:
    """XINFO still counts entries pending that are acked before the trim asks XPENDING for the oldest
    (which then answers none): the trim goes on with what it knows, and nothing escapes the round."""
    from phibroker.store.coordinator import CoordinatorStore

    store = CoordinatorStore(Settings(redis_url=redis_server.url, namespace="t", home=tmp_path))
    r = store.redis
    r.xgroup_create("s", "g", id="0", mkstream=True)
    for i in range(10):
        r.xadd("s", {"f": i})
    r.xreadgroup("g", "c", {"s": ">"}, count=10)
    summary = r.xpending

    def acked_meanwhile(stream: str, group: str) -> Any:
        pending = r.xpending_range(stream, group, min="-", max="+", count=100)
        r.xack(stream, group, *[entry["message_id"] for entry in pending])
        return summary(stream, group)

    r.xpending = acked_meanwhile
    assert store.trim_acked("s", "g", keep=1) == 10 and r.xlen("s") == 0
