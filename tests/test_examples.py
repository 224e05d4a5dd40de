"""Every workflow in examples/ runs to its expected end state on the reference agents (workers/*), with a
real redis-server, a real coordinator and one real worker process per agent the example uses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from phibroker import workflow as workflows
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import REPO, Processes
from tests.test_core import events_of

EXAMPLES = REPO / "examples"
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
VULNERABLE = """\
# SPDX-License-Identifier: MIT
import subprocess


def total(expression):
    return eval(expression)


def archive(folder):
    subprocess.run("tar czf backup.tgz " + folder, shell=True)
"""


@dataclass
class Run:
    """One example's processes, client and scratch space."""

    procs: Processes
    client: Client
    settings: Settings
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    example: str

    @property
    def path(self) -> Path:
        return EXAMPLES / f"{self.example}.yaml"

    def start(self) -> None:
        """A coordinator and a reference worker for each agent the example names (tasks, compensations and
        its sub-workflows' tasks)."""
        self.procs.coordinator()
        agents = set()
        loaded = [workflows.load(self.path)]
        while loaded:
            workflow = loaded.pop()
            loaded += workflow.subworkflows.values()
            for task in workflow.spec.tasks.values():
                agents.update(a for a in (task.agent, task.compensate and task.compensate.agent) if a)
        workspace = str(self.tmp_path / "workspace")
        for agent in sorted(agents):
            self.procs.worker(agent, app=f"workers.{agent}", PHIBROKER_WORKSPACE=workspace)

    def submit(self, **params: Any) -> str:
        return self.client.submit(self.path, params=params)

    def wait(self, wf_id: str, approve: bool = True, timeout: float = 60) -> dict[str, Any]:
        """Wait for the end; any approval request of this workflow is approved as stryk on the way."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.client.wait(wf_id, timeout=0.5)
            if status["state"] in TERMINAL:
                return status
            assert time.monotonic() < deadline, f"{wf_id} still {status['state']}\n{self.procs.output()}"
            if approve:
                for request in self.client.approvals():
                    if request["workflow"] == wf_id:
                        self.as_stryk()
                        self.client.approve(request["id"], comment="approved by the example test")

    def as_stryk(self) -> None:
        self.monkeypatch.setenv("PHIBROKER_APPROVER", "stryk")  # client.approve makes stryk's key in home

    def vulnerable_source(self) -> Path:
        folder = self.tmp_path / "legacy-src"
        folder.mkdir(exist_ok=True)
        (folder / "reports.py").write_text(VULNERABLE, encoding="utf-8")
        return folder

    def fail(self, status: dict[str, Any]) -> str:
        tasks = {name: (task["state"], task["error"]) for name, task in status["tasks"].items()}
        return f"{status['state']}: {status.get('error')}\n{tasks}\n{self.procs.output()}"


def succeeded(run: Run, status: dict[str, Any], *skipped: str) -> dict[str, Any]:
    assert status["state"] == "succeeded", run.fail(status)
    states = {name: task["state"] for name, task in status["tasks"].items()}
    assert states == {name: "skipped" if name in skipped else "succeeded" for name in states}, states
    return status["tasks"]


# -- one expectation per example ----------------------------------------------------------------------


def happened_before(run: Run, wf_id: str, first: tuple[str, str, str], then: tuple[str, str, str]) -> bool:
    """Whether the event (type, task, unit) `first` precedes `then` in the events log: one order, written
    by the transitions themselves, where the times of a worker's and a coordinator's clock could disagree."""
    seen = []
    for event in events_of(run.settings, wf_id):
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        seen.append((event["type"], event["task"], data.get("unit", event["task"])))
    return seen.index(first) < seen.index(then)


def check_sequential_pipeline(run: Run) -> None:
    wf_id = run.submit()
    tasks = succeeded(run, run.wait(wf_id))
    order = ["Research", "Requirements", "Implement", "UnitTests"]
    for before, after in zip(order, order[1:], strict=False):
        done, sent = ("task.succeeded", before, before), ("task.dispatched", after, after)
        assert happened_before(run, wf_id, done, sent), (before, after)
    assert tasks["Research"]["result"]["source_count"] >= 2
    assert tasks["Requirements"]["result"]["requirement_count"] >= 1
    assert tasks["UnitTests"]["result"]["output_tail"].count("PASS") == 1
    workspace = Path(tasks["Implement"]["result"]["workspace"])
    assert workspace.is_relative_to(run.tmp_path / "workspace") and not (workspace / "__pycache__").exists()


def check_fan_out_fan_in(run: Run) -> None:
    wf_id = run.submit()
    tasks = succeeded(run, run.wait(wf_id))
    builds = ["BuildAPI", "BuildWorker", "BuildWebUI"]
    audit = tasks["AuditAll"]
    assert sorted(audit["result"]["targets"]) == sorted(tasks[b]["result"]["workspace"] for b in builds)
    sent = ("task.dispatched", "AuditAll", "AuditAll")
    assert all(happened_before(run, wf_id, ("task.succeeded", b, b), sent) for b in builds)


def check_scatter_gather(run: Run) -> None:
    tasks = succeeded(run, run.wait(run.submit()))
    lines = tasks["ReadLogs"]["result"]["lines"]
    assert len(lines) == tasks["ReadLogs"]["result"]["count"] == 10_000
    partitions = tasks["AnalyzeLogs"]["result"]
    assert [p["lines"] for p in partitions] == [2500] * 4
    levels = Counter(line.split()[2] for line in lines)  # `<time> <service> <LEVEL> <message>`
    errors = Counter(re.sub(r"\d+", "N", line.split(None, 3)[3]) for line in lines if line.split()[2] == "ERROR")
    merged = tasks["Merge"]["result"]
    assert merged == {
        "lines": 10_000,
        "errors": levels["ERROR"],
        "warnings": levels["WARN"],
        "unique_errors": dict(errors),
    }
    assert levels["ERROR"] > 0 and levels["WARN"] > 0


def check_conditional_branching(run: Run) -> None:
    clean = run.submit()
    vulnerable = run.submit(audit_target=str(run.vulnerable_source()))
    fast = succeeded(run, run.wait(clean), "Fix", "VerifyFix")
    assert fast["Audit"]["result"]["vulnerabilities_found"] == 0
    assert fast["Deploy"]["result"]["release"] == fast["Build"]["result"]["release"]
    fixed = succeeded(run, run.wait(vulnerable), "UnitTests")
    assert fixed["Audit"]["result"]["vulnerabilities_found"] == 2
    assert fixed["VerifyFix"]["result"]["fixed"] is True
    assert fixed["Deploy"]["result"]["release"] == fixed["Fix"]["result"]["release"]


def check_retry_backoff(run: Run) -> None:
    state_file = run.tmp_path / "retry.count"
    tasks = succeeded(run, run.wait(run.submit(state_file=str(state_file), failures=2)))
    task = tasks["WaitForInventory"]
    assert task["attempts"] == 3 and [h["attempt"] for h in task["history"]] == [1, 2, 3]
    assert all("exited with code 75" in h["error"] for h in task["history"][:2]) and not task["history"][2]["error"]
    assert "attempt 3: inventory service healthy" in task["result"]["output_tail"]
    first, second, third = task["history"]
    assert second["started_at"] - first["finished_at"] >= 0.5 and third["started_at"] - second["finished_at"] >= 1.0
    assert not state_file.exists()  # so the next run retries again


def check_saga(run: Run) -> None:
    wf_id = run.submit()
    status = run.wait(wf_id)
    assert status["state"] == "failed", run.fail(status)
    tasks = status["tasks"]
    assert tasks["SmokeTest"]["state"] == "failed" and "HTTP 503" in tasks["SmokeTest"]["error"]
    assert tasks["Audit"]["state"] == "succeeded"  # nothing to undo
    assert tasks["Deploy"]["state"] == tasks["Build"]["state"] == "compensated"
    undo_deploy = [h for h in tasks["Deploy"]["history"] if h.get("compensation")]
    undo_build = [h for h in tasks["Build"]["history"] if h.get("compensation")]
    assert len(undo_deploy) == len(undo_build) == 1 and not undo_deploy[0]["error"] and not undo_build[0]["error"]
    # newest first, one at a time, and only once the smoke test failed
    undone, undo_build_sent = ("task.compensated", "Deploy", "Deploy"), ("task.dispatched", "Build", "Build!undo")
    assert happened_before(run, wf_id, undone, undo_build_sent)
    failed, undo_deploy_sent = ("task.failed", "SmokeTest", "SmokeTest"), ("task.dispatched", "Deploy", "Deploy!undo")
    assert happened_before(run, wf_id, failed, undo_deploy_sent)
    assert not Path(tasks["Deploy"]["result"]["current"]).is_symlink()  # no release was live before: none now
    build = tasks["Build"]["result"]
    assert not any((Path(build["workspace"]) / name).exists() for name in build["files"])


def check_human_approval(run: Run) -> None:
    wf_id = run.submit()
    deadline = time.monotonic() + 30
    while not (requests := [r for r in run.client.approvals() if r["workflow"] == wf_id]):
        assert time.monotonic() < deadline, run.procs.output()
        time.sleep(0.05)
    status = run.client.status(wf_id)
    assert status["state"] == "waiting_approval" and status["tasks"]["Deploy"]["state"] == "pending"
    release = status["tasks"]["Build"]["result"]["release"]
    message = requests[0]["message"]
    assert message.startswith(f"Deploy {release} to production? The audit found 0 vulnerabilities"), message
    run.as_stryk()
    assert run.client.approve(requests[0]["id"], comment="audit is clean")["type"] == "approval.granted"
    tasks = succeeded(run, run.wait(wf_id, approve=False))
    assert tasks["Approve"]["approval"]["decision"]["approver"] == "stryk"
    assert tasks["Deploy"]["result"]["environment"] == "production"
    assert tasks["Deploy"]["result"]["release"] == release


def check_feature_deploy(run: Run) -> None:
    tasks = succeeded(run, run.wait(run.submit()), "Approve")  # a clean audit needs no approval
    assert tasks["Audit"]["result"]["vulnerabilities_found"] == 0
    assert tasks["Deploy"]["result"]["release"] == tasks["Implement"]["result"]["release"]


def check_parallel_research(run: Run) -> None:
    tasks = succeeded(run, run.wait(run.submit()))
    assert tasks["Synthesize"]["result"]["requirement_count"] >= 1


def check_vulnerability_fix(run: Run) -> None:
    tasks = succeeded(run, run.wait(run.submit(target=str(run.vulnerable_source()))))
    assert tasks["Scan"]["result"]["finding_count"] == 2 and tasks["Verify"]["result"]["fixed"] is True
    assert tasks["Ship"]["result"]["release"] == tasks["Fix"]["result"]["release"]
    # Its default target, examples/sample-app, as a user submits it from the repository: fixed in copies only
    sample = EXAMPLES / "sample-app" / "app.py"
    before = sample.read_bytes()
    shipped = succeeded(run, run.wait(run.submit()))
    scan = shipped["Scan"]["result"]
    assert scan["target"] == str(sample.parent) and scan["by_rule"] == {"shell-injection": 1, "weak-hash": 1, "eval": 1}
    assert shipped["Verify"]["result"]["fixed"] is True and sample.read_bytes() == before


def check_complete_dag(run: Run) -> None:
    tasks = succeeded(run, run.wait(run.submit()))
    assert sorted(tasks["SecurityAudit"]["result"]["targets"]) == sorted(
        tasks[t]["result"]["workspace"] for t in ("ImplementAPI", "ImplementUI")
    )


def check_audit_repository(run: Run) -> None:
    source = run.vulnerable_source()  # eval and shell=True: 2 high
    (source / "requirements.txt").write_text("requests>=2\n", encoding="utf-8")  # unpinned: low
    (source / "util.py").write_text("x = 1\n", encoding="utf-8")  # no license line: low
    wf_id = run.submit(target=str(source), threshold=0)
    deadline = time.monotonic() + 30
    while not (requests := [r for r in run.client.approvals() if r["workflow"] == wf_id]):
        assert time.monotonic() < deadline, run.procs.output()
        time.sleep(0.05)
    message = requests[0]["message"]
    assert message.startswith(f"Publish the audit of legacy-src ({source})? It found 4 findings, more than the ")
    assert "threshold of 0: 2 high, 0 medium, 2 low. Read " in message, message
    run.as_stryk()
    run.client.approve(requests[0]["id"], comment="read it")
    tasks = succeeded(run, run.wait(wf_id, approve=False))
    report = tasks["Report"]["result"]
    assert report["total_findings"] == 4 and report["by_severity"] == {"high": 2, "medium": 0, "low": 2}
    text = Path(report["path"]).read_text(encoding="utf-8")
    assert Path(report["path"]) == run.tmp_path / "workspace" / wf_id / "audit-report.md" and text == report["markdown"]
    assert text.startswith("# Audit report: legacy-src\n") and "## Summary" in text and "## Recommendations" in text
    assert "### `reports.py` — 2 high" in text and "- line 6 · **high** · `eval` — eval() runs arbitrary code" in text
    published = Path(tasks["Publish"]["result"]["published"])
    assert published.parent == run.tmp_path / "workspace" / "reports" and published.read_text(encoding="utf-8") == text
    # phibroker's own source, under a threshold it cannot reach: the gate is skipped, the report published
    own = succeeded(run, run.wait(run.submit(target=str(REPO), threshold=10**6), approve=False), "Approve")
    assert own["Inventory"]["result"]["name"] == "phibroker" and own["Inventory"]["result"]["python_files"] > 10
    checks = ("StaticScan", "DependencyAudit", "LicenseCheck")
    assert own["Report"]["result"]["total_findings"] == sum(own[t]["result"]["finding_count"] for t in checks)
    assert Path(own["Publish"]["result"]["published"]).is_file()


def check_rq_bridge(run: Run) -> None:
    """Run on the reference cmdc worker here; tests/test_rqbridge.py runs it through a real RQ worker."""
    tasks = succeeded(run, run.wait(run.submit()))
    assert tasks["SmokeTest"]["result"]["output_tail"] == "smoke test of inventory-service passed"


def check_sub_team(run: Run) -> None:
    wf_id = run.submit()
    status = run.wait(wf_id)
    tasks = succeeded(run, status)
    child = run.client.status(tasks["Review"]["child"])
    assert child["parent"] == {"id": wf_id, "task": "Review"} and child["state"] == "succeeded"
    assert child["params"]["workspace"] == tasks["Implement"]["result"]["workspace"]
    verdict = tasks["Review"]["result"]
    assert verdict == child["output"] == {"component": "rate limiter", "vulnerabilities": 0, "tests_passed": True}
    assert status["output"] == {"release": tasks["Implement"]["result"]["release"], "review": verdict}
    assert child["tasks"]["UnitTests"]["result"]["output_tail"].count("PASS") == 1


def check_critique_revise(run: Run) -> None:
    tasks = succeeded(run, run.wait(wf_id := run.submit()))
    draft = tasks["Draft"]
    assert draft["iterations"] == 3 and draft["result"]["version"] == 3  # scores 4, 6, then 8: the target
    assert [h["attempt"] for h in draft["history"]] == [1, 2, 3]
    assert draft["result"]["score"] == 8 and draft["result"]["addressed"].startswith("cite at least 2 sources")
    assert tasks["Review"]["result"]["score"] == 8 and tasks["Review"]["result"]["passed"] is True
    status = run.client.status(wf_id)
    assert status["output"] == draft["result"]["text"] and status["output"].startswith("# API rate limiting\n")
    assert Path(draft["result"]["path"]).read_text(encoding="utf-8") == status["output"]
    iterated = [e["data"]["iteration"] for e in events_of(run.settings, wf_id) if e["type"] == "task.iterated"]
    assert iterated == [2, 3]
    # A target no draft reaches (the rubric gives 10 at most): the loop runs out and fails the task
    exhausted = run.wait(run.submit(target=11))
    assert exhausted["state"] == "failed", run.fail(exhausted)
    assert exhausted["tasks"]["Draft"]["error"] == "loop exhausted after 5 iterations"


def serve(run: Run, *agents: str) -> None:
    """Workers for agents the file does not name: those of the tasks a planner spawns."""
    for agent in agents:
        run.procs.worker(agent, app=f"workers.{agent}", PHIBROKER_WORKSPACE=str(run.tmp_path / "workspace"))


def check_plan_and_execute(run: Run) -> None:
    serve(run, "webc", "vssc", "kalic")
    wf_id = run.submit()
    tasks = succeeded(run, run.wait(wf_id))
    steps = ["research", "requirements", "implement_orders_api", "implement_admin_ui_for_oauth2_login", "audit"]
    assert [s["name"] for s in tasks["Plan"]["result"]["steps"]] == steps
    assert sorted(tasks) == sorted(["Plan", "Report", *(f"Plan/{s}" for s in steps)])
    audit = tasks["Plan/audit"]["result"]
    builds = [tasks[f"Plan/{s}"]["result"]["workspace"] for s in steps[2:4]]
    assert audit["targets"] == builds and audit["vulnerabilities_found"] == 0
    for child, after in (("research", "requirements"), ("requirements", "implement_admin_ui_for_oauth2_login")):
        done, sent = (
            ("task.succeeded", f"Plan/{child}", f"Plan/{child}"),
            ("task.dispatched", f"Plan/{after}", f"Plan/{after}"),
        )
        assert happened_before(run, wf_id, done, sent), (child, after)
    plan_done = ("task.succeeded", "Plan", "Plan")
    assert happened_before(run, wf_id, ("task.succeeded", "Plan/audit", "Plan/audit"), plan_done)
    assert happened_before(run, wf_id, plan_done, ("task.dispatched", "Report", "Report"))
    report = tasks["Report"]["result"]
    assert report["missing"] == [] and sorted(report["steps"]) == sorted(f"Plan/{s}" for s in steps)
    assert report["steps"]["Plan/audit"].startswith("vulnerabilities_found: 0")
    assert run.client.status(wf_id)["output"] == {"report": report["path"], "vulnerabilities": 0}


def signal(run: Run, wf_id: str, data: dict[str, Any]) -> None:
    """What CI does when the build ends: `phibroker signal ID ci-done --data JSON`."""
    args = [sys.executable, "-m", "phibroker", "signal", wf_id, "ci-done", "--data", json.dumps(data)]
    sent = subprocess.run(args, env=run.procs.env(), capture_output=True, text=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr


def waiting_for_ci(run: Run, wf_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (status := run.client.status(wf_id))["tasks"]["CI"].get("waiting_for") != "signal ci-done":
        assert status["state"] == "running" and time.monotonic() < deadline, run.fail(status)
        time.sleep(0.05)
    return status


def check_wait_for_ci(run: Run) -> None:
    green, red = run.submit(), run.submit()
    status = waiting_for_ci(run, green)
    assert status["tasks"]["Deploy"]["state"] == "pending"
    started = status["tasks"]["StartCI"]["result"]
    assert started["status"] == "queued" and Path(started["request"]).is_file()
    assert started["notify"].startswith(f"phibroker signal {green} ci-done --data ")
    signal(run, green, {"build": started["build"], "passed": True})
    tasks = succeeded(run, run.wait(green))
    assert tasks["CI"]["result"] == {"build": started["build"], "passed": True}
    release = tasks["Build"]["result"]["release"]
    assert tasks["Deploy"]["result"]["release"] == release and run.client.status(green)["output"] == release
    # A red build: the gate passes its verdict on and the deploy is skipped
    waiting_for_ci(run, red)
    signal(run, red, {"build": "ci-red", "passed": False})
    tasks = succeeded(run, run.wait(red), "Deploy")
    assert tasks["CI"]["result"]["passed"] is False and run.client.status(red)["output"] is None


def check_live_report(run: Run) -> None:
    wf_id = run.submit(target=str(run.vulnerable_source()))
    status = run.wait(wf_id, approve=False)
    tasks = succeeded(run, status)
    report = tasks["Report"]["result"]
    assert status["output"] == report["path"]
    records = list(run.client.stream(wf_id, task="Report"))
    chunks = [r["data"] for r in records if r["kind"] == "chunk"]
    assert len(chunks) > 3 and "".join(chunks).replace("\n", "") == report["markdown"].replace("\n", "")
    assert chunks[0].startswith("# Audit report: legacy-src")
    logged = [r["data"]["message"] for r in records if r["kind"] == "log"]
    assert logged == [f"report written: {report['total_findings']} findings, {len(chunks)} sections"]
    events = [r["data"]["type"] for r in records if r["kind"] == "event"]
    assert events.index("task.started") < events.index("task.succeeded")
    words = len(report["markdown"].split())
    assert (
        0 < tasks["Report"]["spend"]["tokens"] <= words
        and status["spend"]["tokens"] == tasks["Report"]["spend"]["tokens"]
    )


EXPECTATIONS: dict[str, Callable[[Run], None]] = {
    "sequential-pipeline": check_sequential_pipeline,
    "fan-out-fan-in": check_fan_out_fan_in,
    "scatter-gather": check_scatter_gather,
    "conditional-branching": check_conditional_branching,
    "retry-backoff": check_retry_backoff,
    "saga": check_saga,
    "human-approval": check_human_approval,
    "feature-deploy": check_feature_deploy,
    "parallel-research": check_parallel_research,
    "vulnerability-fix": check_vulnerability_fix,
    "complete-dag": check_complete_dag,
    "audit-repository": check_audit_repository,
    "live-report": check_live_report,
    "rq-bridge": check_rq_bridge,
    "critique-revise": check_critique_revise,
    "plan-and-execute": check_plan_and_execute,
    "wait-for-ci": check_wait_for_ci,
    "sub-team": check_sub_team,
}


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_example_reaches_its_end_state(
    example: str,
    procs: Processes,
    client: Client,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert example in EXPECTATIONS, f"examples/{example}.yaml has no expectation in tests/test_examples.py"
    monkeypatch.chdir(REPO)  # the workers' folder: relative paths in examples (examples/sample-app) are the repo's
    run = Run(procs, client, settings, tmp_path, monkeypatch, example)
    run.start()
    EXPECTATIONS[example](run)


def test_every_expectation_has_its_example() -> None:
    assert sorted(EXPECTATIONS) == sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
