"""The reference agents chained as the example workflows chain them, without Redis: each result is
packed and unpacked like the broker would, and becomes the next task's input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import pytest

from phibroker.runtime.agent import Agent, Context, load_agent

NAMES = ["webc", "dc", "vssc", "kalic", "cmdc"]


@pytest.mark.parametrize("name", NAMES)
def test_worker_loads_each_agent_by_name(name: str) -> None:
    assert load_agent(name).name == name


def run(
    name: str, command: str, payload: dict[str, Any], inputs: dict[str, Any] | None = None, result: Any = None
) -> Any:
    agent: Agent = load_agent(name)
    ctx = Context(
        workflow_id="wf-flow",
        task=command,
        unit=command,
        attempt=1,
        agent=name,
        command=command,
        inputs=inputs or {},
        result=result,
    )
    outcome = agent.execute(command, ctx, payload, limit=100_000)
    assert outcome.ok, outcome.error
    assert outcome.value is not None
    return msgpack.unpackb(outcome.value)


def test_complete_dag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIBROKER_WORKSPACE", str(tmp_path))
    research = run("webc", "research", {"topic": "user profiles"})
    doc = run("dc", "synthesize", {"title": "Requirements: user profiles"}, {"Research": research})
    api = run("vssc", "implement", {"component": "api"}, {"Synthesize": doc})
    ui = run("vssc", "implement", {"component": "ui"}, {"Synthesize": doc})
    assert api["requirement_count"] == doc["requirement_count"] > 0
    audit = run("kalic", "security_audit", {}, {"ImplementAPI": api, "ImplementUI": ui})
    assert audit["vulnerabilities_found"] == 0 and audit["targets"] == [api["workspace"], ui["workspace"]]
    deployed = run("cmdc", "deploy", {"release": api["release"], "environment": "staging"}, {"SecurityAudit": audit})
    current = tmp_path / "deploy" / "staging" / "current"
    assert os.readlink(current) == f"releases/{api['release']}"
    run("cmdc", "rollback", {}, result=deployed)
    run("vssc", "revert", {}, result=ui)
    run("vssc", "revert", {}, result=api)
    assert not current.is_symlink() and not (tmp_path / "wf-flow").exists()


def test_vulnerability_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIBROKER_WORKSPACE", str(tmp_path / "ws"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "app.py").write_text("import os\n\n\ndef go(cmd):\n    os.system(cmd)\n    return eval(cmd)\n")
    scan = run("kalic", "static_scan", {"target": str(src)})
    assert scan["finding_count"] == 2
    fix = run("vssc", "fix_vulnerability", {"findings": scan["findings"]}, {"Scan": scan})
    tests = run("cmdc", "run_tests", {"suite": "regression"}, {"Fix": fix})
    verify = run("kalic", "verify_fix", {"findings": scan["findings"]}, {"Fix": fix})
    assert tests["passed"] and verify == {
        "fixed": True,
        "remaining": [],
        "checked": [fix["patched"][str(src / "app.py")]],
    }
    ship = run(
        "cmdc",
        "deploy",
        {"release": fix["release"], "environment": "production"},
        {"RegressionTest": tests, "Verify": verify},
    )
    assert ship["previous"] is None and ship["release"].startswith("fix-")
