"""Run-time control flow under kill -9 and races: spawned children run once whatever dies, a signal
racing its gate's timeout has one outcome, a cancel racing a result and a retry racing a late result
leave one consistent story."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from phibroker.errors import InvalidInput
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes, until
from tests.test_core import events_of
from tests.test_crash import ledger_lines
from tests.test_failures import flow

PLAN = """
name: plan
tasks:
  Plan: {agent: probe, command: spawner, payload: {children: 4, chain: true}}
  Report: {agent: probe, command: work, depends_on: [Plan]}
"""


@pytest.mark.parametrize("point", ["after_commit:2", "after_drain:2", "before_ack:2", "after_commit:3"])
def test_a_coordinator_killed_around_a_spawn_runs_each_child_once(
    point: str, procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """The transition that applies Plan's result also adds its children and dispatches the first: a
    coordinator killed between that commit and the dispatch, the drain or the ack loses no child and
    runs none twice."""
    ledger = tmp_path / "ledger"
    procs.worker("probe", app="tests.apps.probe", PROBE_LEDGER=str(ledger))
    doomed = procs.coordinator(PHIBROKER_CRASH_AT=point)
    wf_id = client.submit(flow(tmp_path, PLAN))
    assert doomed.wait(timeout=30) == 137, procs.output()
    procs.coordinator()
    status = client.wait(wf_id, timeout=60)
    ends = {name: (task["state"], task["error"]) for name, task in status["tasks"].items()}
    assert status["state"] == "succeeded", f"{ends}\n{procs.output()}"
    names = ["Plan", "Report", "Plan/c0", "Plan/c1", "Plan/c2", "Plan/c3"]
    assert list(status["tasks"]) == names
    for name in names:
        assert [h["applied"] for h in status["tasks"][name]["history"]] == [True], name
    assert sorted(line.split()[0] for line in ledger_lines(ledger)) == sorted(f"{wf_id}:{n}" for n in names)
    assert status["tasks"]["Report"]["result"]["inputs"] == sorted(names[:1] + names[2:])


def test_a_signal_racing_its_gates_timeout_has_one_outcome(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    path = flow(
        tmp_path,
        "name: race\ntasks:\n  CI: {signal: {name: done, timeout: 1s}}\n"
        "  Ship: {agent: probe, command: work, depends_on: [CI]}\n",
    )
    outcomes = set()
    for _ in range(4):
        wf_id = client.submit(path)
        until(lambda wf_id=wf_id: client.status(wf_id)["tasks"]["CI"]["state"] == "running", procs)
        time.sleep(0.95)
        try:
            client.signal(wf_id, "done", {"ok": True})
        except Exception:  # noqa: BLE001 - the timeout won and the run ended first: also one outcome
            pass
        status = client.wait(wf_id, timeout=30)
        ci = status["tasks"]["CI"]
        types = [e["type"] for e in events_of(settings, wf_id) if e.get("task") == "CI"]
        if ci["state"] == "succeeded":
            assert ci["result"] == {"ok": True} and status["state"] == "succeeded"
            assert "task.failed" not in types
        else:
            assert (ci["state"], ci["error"], status["state"]) == ("failed", "timeout", "failed")
            assert "signal.received" not in types
        outcomes.add(ci["state"])
    assert outcomes <= {"succeeded", "failed"}


def test_a_cancel_racing_a_result_leaves_one_story(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """A's result and the cancel arrive together: A is either succeeded (and then compensated) or
    cancelled, never both; B runs only if A's result won."""
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    path = flow(
        tmp_path,
        "name: race\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 0.3}, compensate: {command: undo}}\n"
        "  B: {agent: probe, command: work, depends_on: [A]}\n",
    )
    for delay in (0.25, 0.3, 0.35):
        wf_id = client.submit(path)
        until(lambda wf_id=wf_id: client.status(wf_id)["tasks"]["A"]["state"] == "running", procs)
        time.sleep(delay)
        try:
            client.cancel(wf_id)
        except InvalidInput:  # A and B were quicker: the run had ended, and it stays as it ended
            assert client.status(wf_id)["state"] == "succeeded"
            continue
        status = client.wait(wf_id, timeout=30)
        if status["state"] == "succeeded":  # the run ended between the check and the cancel's arrival
            assert [t["state"] for t in status["tasks"].values()] == ["succeeded", "succeeded"]
            continue
        assert status["state"] == "cancelled", procs.output()
        a = status["tasks"]["A"]
        assert a["state"] in ("compensated", "cancelled")
        assert [h["applied"] for h in a["history"] if not h.get("compensation")] == [True]
        b = status["tasks"]["B"]
        assert b["state"] == "cancelled" or (a["state"] == "compensated" and b["history"][-1]["applied"])


def test_a_retry_racing_a_late_result_keeps_the_late_one_out(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """A timed out while its handler kept going; the run is retried at once. The first attempt's late
    result is recorded, never applied to the second attempt."""
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    marker = tmp_path / "answered-late"
    path = flow(
        tmp_path,
        # 2 s: its worker starts it before it times out, even on a loaded machine (else it never runs)
        "name: late\ntasks:\n  A: {agent: probe, command: stubborn, timeout: 2s, retry: {max_attempts: 1},"
        f" payload: {{sleep: 3.5, marker: '{marker}'}}}}\n",
    )
    wf_id = client.submit(path)
    assert client.wait(wf_id, timeout=30)["state"] == "failed"
    client.retry(wf_id)
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded" and status["tasks"]["A"]["result"] == {"attempt": 2}, procs.output()
    until(marker.exists, procs)
    # The worker answers in order and one coordinator reads in order: once a later run has ended, the
    # late answer has been read too.
    later = client.submit(flow(tmp_path, "name: after\ntasks:\n  B: {agent: probe, command: work}\n"))
    assert client.wait(later, timeout=30)["state"] == "succeeded"
    status = client.status(wf_id)
    assert status["tasks"]["A"]["result"] == {"attempt": 2}
    assert [(h["attempt"], h["error"], h["applied"]) for h in status["tasks"]["A"]["history"]] == [
        (1, "timeout", True),
        (2, None, True),
    ]
