"""Edge cases a careful reader found: each once made a task hang, a result vanish or a coordinator stop."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import redis

from phibroker import engine, state, workflow
from phibroker.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes
from tests.test_failures import flow


def make_run(text: str, limit: int = 1 << 20) -> state.Run:
    wf = workflow.check(workflow.decode(text, ".yaml"))
    return state.Run("wf", wf, {"version": 1, "params": wf.spec.params}, {}, {}, limit=limit)


def test_a_new_attempt_clears_the_previous_attempts_run_in_redis_too() -> None:
    run = make_run("name: w\ntasks:\n  A: {agent: a, command: c, retry: {base_delay: 1s}}\n")
    engine.start(run, 1.0)
    run.units["A"].update(state="running", token=2, entry="1-0", worker="w")  # reclaimed once
    engine._unit_failed(run, "A", "boom", 2.0, retryable=True)
    run.tx = state.Transition()
    engine.apply_timer(run, state.timer_member("retry", "wf", "A", 1), 5.0)
    assert run.tx.fields()["A|run"] == state.pack_group({"token": 0}, "run")


def test_a_partition_over_the_size_limit_fails_its_task_once() -> None:
    text = (
        "name: w\nfailure: best_effort\nparams: {items: []}\ntasks:\n"
        "  M: {agent: a, command: c, map: {over: '${params.items}', partitions: 3}}\n"
        "  Other: {agent: a, command: c}\n"
    )
    run = make_run(text, limit=600)
    run.meta["params"] = {"items": ["x" * 1000] * 3}  # every partition over the limit, Other under it
    engine.start(run, 1.0)
    assert run.state("M") == "failed" and run.open_tasks == 1
    assert [e["type"] for e in run.tx.events].count("task.failed") == 1


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
        r.xadd(settings.keys.results, {"m": raw})
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
