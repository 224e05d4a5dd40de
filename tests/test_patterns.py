"""The seed's patterns on real Redis: branches, trigger rules, expect, failure modes, map, approvals, signed files."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from phibroker import wire
from phibroker.errors import ApprovalError
from phibroker.runtime.client import Client
from phibroker.security import signing
from phibroker.settings import Settings
from tests.conftest import Processes
from tests.test_core import events_of
from tests.test_failures import flow, run, start


def test_if_else_converges_and_skips_propagate(procs: Processes, client: Client, tmp_path: Path) -> None:
    start(procs)
    path = flow(
        tmp_path,
        """
name: branch
params: {choice: "yes"}
tasks:
  Decide: {agent: probe, command: work, payload: {value: "${params.choice}"}}
  IfYes: {agent: probe, command: work, depends_on: [Decide], when: "tasks.Decide.result.value == 'yes'"}
  IfNo: {agent: probe, command: work, depends_on: [Decide], when: "tasks.Decide.result.value != 'yes'"}
  Join: {agent: probe, command: work, depends_on: [IfYes, IfNo], trigger: none_failed}
  AfterNo: {agent: probe, command: work, depends_on: [IfNo]}
  AnyDone: {agent: probe, command: work, depends_on: [IfYes, IfNo], trigger: one_success}
""",
    )
    for choice, taken, skipped in (("yes", "IfYes", "IfNo"), ("no", "IfNo", "IfYes")):
        status = run(procs, client, path, choice=choice)
        tasks = status["tasks"]
        assert status["state"] == "succeeded"
        assert tasks[taken]["state"] == "succeeded" and tasks[skipped]["state"] == "skipped"
        assert tasks["Join"]["state"] == "succeeded"
        assert tasks["Join"]["result"]["inputs"] == [taken]  # a skipped dependency gives no input
        assert tasks["AnyDone"]["state"] == "succeeded"
        assert tasks["AfterNo"]["state"] == ("succeeded" if choice == "no" else "skipped")


def test_expect_fails_the_attempt(procs: Processes, client: Client, tmp_path: Path) -> None:
    start(procs)
    path = flow(
        tmp_path,
        "name: ex\ntasks:\n  A: {agent: probe, command: work, payload: {value: 3}, expect: 'result.value > 5',"
        " retry: {max_attempts: 2, base_delay: 10ms, retry_on: [ExpectationFailed]}}\n"
        "  B: {agent: probe, command: work, depends_on: [A]}\n",
    )
    status = run(procs, client, path)
    a = status["tasks"]["A"]
    assert (a["state"], a["attempts"], a["error"]) == ("failed", 2, "ExpectationFailed: result.value > 5")
    assert status["tasks"]["B"]["state"] == "upstream_failed" and status["state"] == "failed"


def test_best_effort_runs_what_can_and_lists_failures(procs: Processes, client: Client, tmp_path: Path) -> None:
    start(procs)
    path = flow(
        tmp_path,
        "name: be\nfailure: best_effort\ntasks:\n  A: {agent: probe, command: fail}\n"
        "  B: {agent: probe, command: work, payload: {sleep: 0.3}}\n"
        "  C: {agent: probe, command: work, depends_on: [A]}\n  D: {agent: probe, command: work, depends_on: [B]}\n",
    )
    status = run(procs, client, path)
    states = {name: task["state"] for name, task in status["tasks"].items()}
    assert states == {"A": "failed", "B": "succeeded", "C": "upstream_failed", "D": "succeeded"}
    assert status["state"] == "failed" and status["error"] == "failed: A"


def test_map_over_1000_items_retries_one_partition_alone(procs: Processes, client: Client, tmp_path: Path) -> None:
    start(procs)
    path = flow(
        tmp_path,
        "name: scatter\nparams: {numbers: [], bad: 2}\ntasks:\n"
        "  Sum: {agent: probe, command: part, map: {over: '${params.numbers}', partitions: 4},"
        " payload: {fail_partition: '${params.bad}'}}\n"
        "  Gather: {agent: probe, command: work, depends_on: [Sum]}\n",
    )
    numbers = list(range(1000))
    status = run(procs, client, path, numbers=numbers)
    task = status["tasks"]["Sum"]
    assert status["state"] == "succeeded"
    assert [p["index"] for p in task["result"]] == [0, 1, 2, 3]
    assert [p["size"] for p in task["result"]] == [250] * 4
    assert sum(p["sum"] for p in task["result"]) == sum(numbers)
    assert [p["first"] for p in task["result"]] == [0, 250, 500, 750]
    assert [p["attempts"] for p in task["partitions"]] == [1, 1, 2, 1]
    assert status["tasks"]["Gather"]["result"]["inputs"] == ["Sum"]


GATE = """
name: gate
tasks:
  Build: {{agent: probe, command: work}}
  Approve:
    depends_on: [Build]
    approval: {{message: "Ship build ${{tasks.Build.result.task}}?", timeout: {timeout}, approvers: [stryk]}}
  Deploy: {{agent: probe, command: work, depends_on: [Approve]}}
"""


def open_request(client: Client, wf_id: str, procs: Processes) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        requests = [r for r in client.approvals() if r["workflow"] == wf_id]
        if requests:
            assert client.status(wf_id)["state"] == "waiting_approval"
            return requests[0]
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)


@pytest.fixture
def gate(procs: Processes, client: Client, tmp_path: Path, settings: Settings) -> Any:
    start(procs)
    stryk = signing.generate(settings.home, "stryk")
    bob = signing.generate(settings.home, "bob")

    def submit(timeout: str = "1h") -> tuple[str, dict[str, Any]]:
        wf_id = client.submit(flow(tmp_path, GATE.format(timeout=timeout)))
        return wf_id, open_request(client, wf_id, procs)

    return submit, stryk, bob


def test_approve_records_who_and_why(gate: Any, client: Client) -> None:
    submit, stryk, _ = gate
    wf_id, request = submit()
    assert request["message"] == "Ship build Build?" and request["task"] == "Approve"
    event = client.decide(request["id"], "approve", comment="looks good", key=stryk)
    assert event["type"] == "approval.granted"
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded"
    decision = status["tasks"]["Approve"]["approval"]["decision"]
    assert decision["approver"] == "stryk" and decision["comment"] == "looks good" and decision["decided_at"]
    with pytest.raises(ApprovalError, match="unknown, or already decided"):
        client.decide(request["id"], "approve", key=stryk)


def test_reject_fails_the_gate_and_the_workflow(gate: Any, client: Client) -> None:
    submit, stryk, _ = gate
    wf_id, request = submit()
    assert client.decide(request["id"], "reject", reason="too risky", key=stryk)["type"] == "approval.rejected"
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "failed"
    assert status["tasks"]["Approve"]["error"] == "rejected: too risky"
    assert status["tasks"]["Deploy"]["state"] == "upstream_failed"


def test_approval_timeout_fails_the_gate(gate: Any, client: Client) -> None:
    submit, _, _ = gate
    wf_id, _ = submit(timeout="2s")  # long enough to be seen open, even on a busy machine
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "failed" and status["tasks"]["Approve"]["error"] == "timeout"
    assert not [r for r in client.approvals() if r["workflow"] == wf_id]


def test_forged_untrusted_wrong_approver_and_replayed_decisions_are_refused(
    gate: Any, client: Client, settings: Settings, tmp_path: Path
) -> None:
    submit, stryk, bob = gate
    wf_id, request = submit()
    forged = signing.generate(tmp_path / "elsewhere", "stryk")  # a key that only claims to be stryk's
    with pytest.raises(ApprovalError, match="untrusted key"):
        client.decide(request["id"], "approve", key=forged)
    mallory = signing.generate(tmp_path / "elsewhere", "mallory")
    with pytest.raises(ApprovalError, match="untrusted key"):
        client.decide(request["id"], "approve", key=mallory)
    with pytest.raises(ApprovalError, match="may not decide"):
        client.decide(request["id"], "approve", key=bob)
    body = signing.sign_decision(
        stryk, approval=request["id"], workflow=wf_id, task="Approve", decision="approve", expires=time.time() + 60
    )
    tampered = {**body, "decision": "reject"}
    client.broker.send_to_coordinators(wire.Inbox(kind="decide", body=tampered))
    assert client.decide(request["id"], "approve", key=stryk)["type"] == "approval.granted"
    client.broker.send_to_coordinators(wire.Inbox(kind="decide", body=body))  # the same decision again
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded"
    time.sleep(0.5)
    refusals = [e["data"]["reason"] for e in events_of(settings, wf_id) if e["type"] == "approval.refused"]
    assert any("bad signature" in r for r in refusals)
    assert refusals[-1] == "already decided"
    assert len([e for e in events_of(settings, wf_id) if e["type"] == "approval.granted"]) == 1


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {
        **os.environ,
        "PHIBROKER_REDIS_URL": settings.redis_url,
        "PHIBROKER_NAMESPACE": settings.namespace,
        "PHIBROKER_HOME": str(settings.home),
        "PHIBROKER_APPROVER": "stryk",
    }
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_approvals_approve_and_exit_codes(gate: Any, settings: Settings, client: Client) -> None:
    submit, _, _ = gate
    wf_id, request = submit()
    listed = cli(settings, "approvals", "--json")
    import json

    rows = json.loads(listed.stdout)
    assert {"id", "workflow", "task", "message", "deadline"} == set(rows[0])
    shown = cli(settings, "approvals").stdout  # who may decide, and the time left as a person reads it
    assert f"{request['id']}  {wf_id} / Approve:" in shown and "(approvers: stryk; times out in " in shown
    approved = cli(settings, "approve", request["id"], "--comment", "ok")
    assert approved.returncode == 0, approved.stderr
    assert client.wait(wf_id, timeout=30)["state"] == "succeeded"
    again = cli(settings, "approve", request["id"])
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert cli(settings, "reject", "nope", "--reason", "x").returncode == 2


def test_require_signed_refuses_unsigned_and_tampered_files(
    procs: Processes, client: Client, tmp_path: Path, settings: Settings
) -> None:
    procs.spawn("signed-coordinator", "coordinator", "--require-signed")
    procs.worker("probe", app="tests.apps.probe")
    key = signing.generate(settings.home, "stryk")
    path = flow(tmp_path, "name: s\ntasks:\n  A: {agent: probe, command: work}\n")
    unsigned = client.wait(client.submit(path), timeout=30)
    assert unsigned["state"] == "failed" and "not signed" in unsigned["error"]
    signing.sign_file(key, path)
    assert client.wait(client.submit(path), timeout=30)["state"] == "succeeded"
    path.write_text(path.read_text().replace("work", "noop"))
    tampered = client.wait(client.submit(path), timeout=30)
    assert tampered["state"] == "failed" and "tampered" in tampered["error"]
