"""`phibroker retry ID [--from TASK]`: an ended run goes on from the failed step, on real processes.

What a user of Airflow's "clear" or Step Functions' redrive expects: the tasks that did not succeed
(and everything below them) run again, the ones that succeeded keep their results, and the history
keeps every attempt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from phibroker.runtime.client import Client
from phibroker.security import signing
from phibroker.settings import Settings
from tests.conftest import Processes, until
from tests.test_core import events_of


def phibroker(procs: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=90, env=procs.env()
    )


def flow(tmp_path: Path, text: str) -> str:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    return str(path)


def start(procs: Processes, client: Client) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    until(lambda: "probe" in client.live_agents(), procs)


def test_retry_runs_the_failed_step_and_below_and_keeps_what_succeeded(
    procs: Processes, client: Client, tmp_path: Path, settings: Settings
) -> None:
    start(procs, client)
    path = flow(
        tmp_path,
        "name: redrive\ntasks:\n"
        "  A: {agent: probe, command: work}\n"
        "  B: {agent: probe, command: flaky, depends_on: [A], payload: {failures: 1}, retry: {max_attempts: 1}}\n"
        "  C: {agent: probe, command: work, depends_on: [B]}\n",
    )
    wf_id = client.submit(path)
    first = client.wait(wf_id, timeout=30)
    assert first["state"] == "failed", procs.output()
    assert [first["tasks"][t]["state"] for t in "ABC"] == ["succeeded", "failed", "upstream_failed"]

    done = phibroker(procs, "retry", wf_id, "--wait", "--json")
    assert done.returncode == 0, done.stderr + procs.output()
    status = json.loads(done.stdout)
    assert status["state"] == "succeeded"
    a, b = status["tasks"]["A"], status["tasks"]["B"]
    assert a["result"] == first["tasks"]["A"]["result"] and len(a["history"]) == 1  # not run again
    assert b["attempts"] == 2 and [h["error"] is None for h in b["history"]] == [False, True]
    types = [e["type"] for e in events_of(settings, wf_id)]
    assert types.count("workflow.failed") == 1 and "workflow.retried" in types and types[-1] == "workflow.succeeded"

    again = phibroker(procs, "retry", wf_id)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert "only a failed, cancelled or timed-out run" in again.stderr


def test_retry_from_a_step_of_a_cancelled_run(
    procs: Processes, client: Client, tmp_path: Path, settings: Settings
) -> None:
    start(procs, client)
    path = flow(
        tmp_path,
        "name: resume\ntasks:\n  A: {agent: probe, command: work}\n"
        "  Gate: {approval: {message: ship?}, depends_on: [A]}\n"
        "  Ship: {agent: probe, command: work, depends_on: [Gate]}\n",
    )
    wf_id = client.submit(path)
    until(lambda: client.status(wf_id)["state"] == "waiting_approval", procs)
    client.cancel(wf_id, "not today")
    assert client.wait(wf_id, timeout=30)["state"] == "cancelled"

    unknown = phibroker(procs, "retry", wf_id, "--from", "Gat")
    assert unknown.returncode == 2 and "did you mean 'Gate'" in unknown.stderr

    reopened = client.retry(wf_id, "Gate")
    assert reopened["state"] in ("running", "waiting_approval")
    request = until(lambda: next((r for r in client.approvals() if r["workflow"] == wf_id), None), procs)
    client.decide(request["id"], "approve", key=signing.generate(settings.home, "stryk"))
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded" and status["tasks"]["A"]["attempts"] == 1


def test_a_compensated_run_cannot_be_retried(procs: Processes, client: Client, tmp_path: Path) -> None:
    start(procs, client)
    path = flow(
        tmp_path,
        "name: undone\ntasks:\n  A: {agent: probe, command: work, compensate: {command: undo}}\n"
        "  B: {agent: probe, command: fail, depends_on: [A], retry: {max_attempts: 1}}\n",
    )
    wf_id = client.submit(path)
    assert client.wait(wf_id, timeout=30)["tasks"]["A"]["state"] == "compensated"
    refused = phibroker(procs, "retry", wf_id)
    assert refused.returncode == 2 and "was compensated" in refused.stderr
