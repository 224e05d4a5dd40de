"""Expected failures on real Redis: retries and their timers, timeouts, cancel, sagas."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes, until
from tests.test_core import events_of


def flow(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    return path


def run(procs: Processes, client: Client, path: Path, timeout: float = 60, **params: Any) -> dict[str, Any]:
    wf_id = client.submit(path, params=params)
    status = client.wait(wf_id, timeout=timeout)
    assert status["state"] not in ("running", "cancelling", "compensating", "waiting_approval"), procs.output()
    return status


def start(procs: Processes, coordinators: int = 1) -> None:
    for _ in range(coordinators):
        procs.coordinator()
    procs.worker("probe", app="tests.apps.probe", concurrency=8)


def test_backoff_follows_the_formula_and_timers_fire_on_time(procs: Processes, client: Client, tmp_path: Path) -> None:
    start(procs)
    path = flow(
        tmp_path,
        "name: backoff\ntasks:\n  A:\n    agent: probe\n    command: flaky\n    payload: {failures: 3}\n"
        "    retry: {max_attempts: 4, base_delay: 200ms, max_delay: 500ms, jitter: 0.1}\n",
    )
    status = run(procs, client, path)
    task = status["tasks"]["A"]
    assert task["state"] == "succeeded" and task["attempts"] == 4
    history = client.broker.read_workflow(status["id"])[3]
    from phibroker import wire

    records = [wire.unpack(r, 1 << 20) for r in history]
    assert [r["attempt"] for r in records] == [1, 2, 3, 4]
    for n, (failed, following) in enumerate(zip(records, records[1:], strict=False), start=1):
        base = min(0.5, 0.2 * 2 ** (n - 1))
        delay = failed["retry_at"] - failed["finished"]
        assert base - 1e-6 <= delay <= base * 1.1 + 1e-6, (n, delay)
        late = following["dispatched"] - failed["retry_at"]
        # never early, and not left for a later sweep; how soon after its time is not asserted (a
        # loaded machine delays a round), the timer resolution being `coordinator_block`
        assert -0.005 <= late <= 1.0, (n, late)


@pytest.mark.parametrize(
    ("payload", "retry", "attempts", "state"),
    [
        (
            "{kind: ConnectionError, message: 'service UNAVAILABLE'}",
            "{max_attempts: 3, base_delay: 10ms, retry_on: [unavailable]}",
            3,
            "failed",
        ),
        (
            "{kind: ValueError, message: 'bad input'}",
            "{max_attempts: 3, base_delay: 10ms, retry_on: [unavailable]}",
            1,
            "failed",
        ),
        ("{kind: Retryable, message: 'later'}", "{max_attempts: 2, base_delay: 10ms}", 2, "failed"),
        (
            "{kind: TimeoutError, message: 'slow'}",
            "{max_attempts: 2, base_delay: 10ms, retry_on: ['timeouterror: slow']}",
            2,
            "failed",
        ),
    ],
    ids=["retry_on-case-insensitive", "not-retryable", "Retryable", "type-and-message"],
)
def test_retry_on_and_retryable(
    procs: Processes, client: Client, tmp_path: Path, payload: str, retry: str, attempts: int, state: str
) -> None:
    start(procs)
    path = flow(
        tmp_path, f"name: r\ntasks:\n  A: {{agent: probe, command: fail, payload: {payload}, retry: {retry}}}\n"
    )
    task = run(procs, client, path)["tasks"]["A"]
    assert (task["state"], task["attempts"], len(task["history"])) == (state, attempts, attempts)


def test_flaky_task_stops_at_max_attempts(procs: Processes, client: Client, tmp_path: Path) -> None:
    start(procs)
    path = flow(
        tmp_path,
        (
            "name: m\ntasks:\n  A: {agent: probe, command: flaky, payload:"
            " {failures: 9}, retry: {max_attempts: 3, base_delay: 10ms}}\n"
        ),
    )
    status = run(procs, client, path)
    assert status["state"] == "failed" and status["tasks"]["A"]["attempts"] == 3


def test_a_retry_timer_survives_a_coordinator_restart(procs: Processes, client: Client, tmp_path: Path) -> None:
    procs.worker("probe", app="tests.apps.probe")
    coordinator = procs.coordinator()
    path = flow(
        tmp_path,
        (
            "name: t\ntasks:\n  A: {agent: probe, command: flaky, payload:"
            " {failures: 1}, retry: {base_delay: 1500ms, jitter: 0}}\n"
        ),
    )
    wf_id = client.submit(path)
    deadline = time.monotonic() + 20
    while client.status(wf_id)["tasks"]["A"]["state"] != "retrying":
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.02)
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait()
    procs.coordinator()
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded", procs.output()
    first, second = status["tasks"]["A"]["history"]
    assert second["started_at"] - first["finished_at"] >= 1.5


def test_two_coordinators_never_fire_one_timer_twice(
    procs: Processes, client: Client, tmp_path: Path, settings: Settings
) -> None:
    start(procs, coordinators=2)
    path = flow(
        tmp_path,
        "name: two\ntasks:\n  A: {agent: probe, command: flaky, payload: {failures: 2}, retry: {base_delay: 50ms}}\n"
        "  B: {agent: probe, command: flaky, payload: {failures: 2}, retry: {base_delay: 50ms}}\n",
    )
    ids = [client.submit(path) for _ in range(10)]
    for wf_id in ids:
        status = client.wait(wf_id, timeout=60)
        assert status["state"] == "succeeded", procs.output()
        dispatched = [
            (e["data"]["unit"], e["data"]["attempt"])
            for e in events_of(settings, wf_id)
            if e["type"] == "task.dispatched"
        ]
        assert sorted(dispatched) == [("A", 1), ("A", 2), ("A", 3), ("B", 1), ("B", 2), ("B", 3)]


def test_task_timeout_fails_or_retries_and_the_handler_sees_cancelled(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    start(procs)
    # 2 s: each attempt starts before it times out, even on a loaded machine (else no handler answers late)
    once = flow(
        tmp_path,
        (
            "name: to\ntasks:\n  A: {agent: probe, command: work, timeout:"
            " 2s, payload: {sleep: 10}, retry: {max_attempts: 1}}\n"
        ),
    )
    status = run(procs, client, once)
    task = status["tasks"]["A"]
    assert (task["state"], task["error"], task["attempts"]) == ("failed", "timeout", 1)
    twice = flow(
        tmp_path,
        (
            "name: to2\ntasks:\n  A: {agent: probe, command: work, timeout: 2s, payload: {sleep:"
            " 10}, retry: {max_attempts: 2, base_delay: 10ms, retry_on: [timeout]}}\n"
        ),
    )
    task = run(procs, client, twice)["tasks"]["A"]
    assert (task["state"], task["attempts"]) == ("failed", 2)

    def late() -> list[dict[str, Any]]:  # the stopped handler answers late: recorded, not applied
        return [h for h in client.status(status["id"])["tasks"]["A"]["history"] if not h["applied"]]

    until(late, procs, timeout=60)  # its worker sees the stop at a heartbeat at the latest; a loaded machine is slow
    assert "late result" in late()[0]["error"]


SAGA = """
name: saga
timeout: {timeout}
tasks:
  A: {{agent: probe, command: work, compensate: {{command: undo}}}}
  B: {{agent: probe, command: work, depends_on: [A], compensate: {{command: {b_undo}}}}}
  C: {{agent: probe, command: work, depends_on: [B], compensate: {{command: undo}}}}
  D: {{agent: probe, command: {d_command}, depends_on: [C], payload: {{sleep: 5}}}}
"""


def test_saga_compensates_newest_first_one_at_a_time_past_a_failing_one(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    start(procs)
    path = flow(tmp_path, SAGA.format(timeout="1h", b_undo="undo_fail", d_command="fail"))
    status = run(procs, client, path)
    assert status["state"] == "failed"
    tasks = status["tasks"]
    assert tasks["D"]["state"] == "failed"
    assert tasks["A"]["state"] == tasks["C"]["state"] == "compensated"
    assert tasks["B"]["state"] == "succeeded"
    assert tasks["B"]["compensation"]["error"] == "RuntimeError: cannot undo B"
    undo_c = [h for h in tasks["C"]["history"] if h.get("compensation")][0]
    undo_b = [h for h in tasks["B"]["history"] if h.get("compensation")][-1]
    undo_a = [h for h in tasks["A"]["history"] if h.get("compensation")][0]
    assert undo_c["finished_at"] <= undo_b["started_at"] and undo_b["finished_at"] <= undo_a["started_at"]
    assert tasks["A"]["history"][-1]["applied"]


def test_workflow_timeout_stops_tasks_and_compensates(procs: Processes, client: Client, tmp_path: Path) -> None:
    start(procs)
    path = flow(tmp_path, SAGA.format(timeout="1500ms", b_undo="undo", d_command="hold"))
    status = run(procs, client, path)
    assert status["state"] == "timed_out"
    assert status["tasks"]["D"]["state"] == "cancelled"
    assert "stopped when asked" in status["tasks"]["D"]["history"][-1]["error"]
    assert [status["tasks"][t]["state"] for t in "ABC"] == ["compensated"] * 3


def test_cancel_mid_run(procs: Processes, client: Client, tmp_path: Path, settings: Settings) -> None:
    """The run stays `cancelling` until D's handler stopped; only then are A, B and C undone."""
    start(procs)
    path = flow(tmp_path, SAGA.format(timeout="1h", b_undo="undo", d_command="hold"))
    wf_id = client.submit(path)
    deadline = time.monotonic() + 20
    while client.status(wf_id)["tasks"]["D"]["state"] != "running":
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.02)
    client.cancel(wf_id, "changed my mind")
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "cancelled" and status["error"] == "changed my mind"
    assert status["tasks"]["D"]["state"] == "cancelled"
    assert [status["tasks"][t]["state"] for t in "ABC"] == ["compensated"] * 3
    stopped = status["tasks"]["D"]["history"][-1]
    undo_c = [h for h in status["tasks"]["C"]["history"] if h.get("compensation")][0]
    assert stopped["applied"] and stopped["finished_at"] <= undo_c["started_at"]

    def ended() -> list[str] | None:  # the run's end is signalled by its commit, its events by the drain after
        types = [e["type"] for e in events_of(settings, wf_id)]
        return types if "workflow.cancelled" in types else None

    types = until(ended, procs)
    assert types.index("task.cancelled") < types.index("workflow.compensating")
    # (a worker publishes `task.started` itself, beside the coordinator's events: not ordered with them)
    assert [t for t in types if t != "task.started"][-1] == "workflow.cancelled"


def test_a_stopped_handler_that_returns_anyway_succeeded(procs: Processes, client: Client, tmp_path: Path) -> None:
    """Asked to stop, a handler may still finish its work: its result counts, and is compensated."""
    start(procs)
    text = SAGA.format(timeout="1h", b_undo="undo", d_command="work").replace(
        "payload: {sleep: 5}}", "payload: {sleep: 5}, compensate: {command: undo}}"
    )
    wf_id = client.submit(flow(tmp_path, text))
    deadline = time.monotonic() + 20
    while client.status(wf_id)["tasks"]["D"]["state"] != "running":
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.02)
    client.cancel(wf_id, "changed my mind")
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "cancelled"
    assert [status["tasks"][t]["state"] for t in "ABCD"] == ["compensated"] * 4


def test_a_queued_task_asked_to_stop_is_declined_not_left_to_the_grace_period(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    """B waits in the stream behind A on a one-slot worker; when the run is cancelled, the worker
    declines B instead of starting it, so the run ends without waiting out `cancel_grace` (30 s)."""
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe", concurrency=1)
    path = flow(
        tmp_path,
        "name: queued\ntasks:\n  A: {agent: probe, command: hold, payload: {sleep: 60}}\n"
        "  B: {agent: probe, command: hold, payload: {sleep: 60}}\n",
    )
    wf_id = client.submit(path)
    deadline = time.monotonic() + 20
    while "running" not in {t["state"] for t in client.status(wf_id)["tasks"].values()}:
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.02)
    client.cancel(wf_id)
    status = client.wait(wf_id, timeout=20)
    assert status["state"] == "cancelled", procs.output()
    assert sorted(t["state"] for t in status["tasks"].values()) == ["cancelled", "cancelled"]
    errors = {t["error"] for t in status["tasks"].values()}
    assert errors == {"cancelled by request"}


def test_fail_fast_lets_the_clean_up_run_to_its_end_on_real_workers(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    """Build fails while Lint runs: Lint is asked to stop, Deploy never runs, and the all_done clean-up
    runs to its end although the run is already winding down."""
    start(procs)
    path = flow(
        tmp_path,
        "name: cleanup\ntasks:\n"
        "  Build: {agent: probe, command: fail, retry: {max_attempts: 1}}\n"
        "  Lint: {agent: probe, command: hold, payload: {sleep: 60}}\n"
        "  Deploy: {agent: probe, command: work, depends_on: [Build, Lint]}\n"
        "  Cleanup: {agent: probe, command: work, depends_on: [Build], trigger: all_done, payload: {sleep: 1}}\n",
    )
    status = run(procs, client, path)
    states = {name: t["state"] for name, t in status["tasks"].items()}
    assert states == {"Build": "failed", "Lint": "cancelled", "Deploy": "upstream_failed", "Cleanup": "succeeded"}
    assert status["state"] == "failed" and status["error"].startswith("task Build failed")
    assert status["tasks"]["Cleanup"]["history"][-1]["applied"]
