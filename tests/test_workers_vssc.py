"""vssc: implement and fix_vulnerability write only new files; revert removes exactly those."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from phibroker.runtime.agent import Context
from workers import kalic, vssc


def ctx(inputs: dict[str, Any] | None = None, result: Any = None, command: str = "implement") -> Context:
    return Context(
        workflow_id="wf-1",
        task="Implement",
        unit="Implement",
        attempt=1,
        agent="vssc",
        command=command,
        inputs=inputs or {},
        result=result,
    )


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_implement_writes_stub_readme_and_a_passing_test(tmp_path: Path) -> None:
    result = vssc.implement(
        ctx(),
        component="User Profiles",
        requirements="- Users edit their profile\n- Export data",
        workspace=str(tmp_path),
    )
    folder = tmp_path / "wf-1" / "user-profiles"
    assert result["workspace"] == str(folder)
    assert result["files"] == ["README.md", "user_profiles.py", "test_user_profiles.py"]
    assert result["release"].startswith("user-profiles-") and len(result["release"]) == len("user-profiles-") + 8
    assert result["requirement_count"] == 2
    assert "1. Users edit their profile" in (folder / "README.md").read_text()
    module = (folder / "user_profiles.py").read_text()
    assert "def requirement_01_users_edit_their_profile()" in module and "def requirement_02_export_data()" in module
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)], capture_output=True
    )
    assert run.returncode == 0, run.stdout.decode()


def test_generated_code_passes_the_security_audit(tmp_path: Path) -> None:
    result = vssc.implement(
        ctx(), component="api", requirements=["Use password = 'x' never", "eval nothing"], workspace=str(tmp_path)
    )
    audit = kalic.security_audit(ctx({"Implement": result}, command="security_audit"))
    assert audit["targets"] == [result["workspace"]]
    assert audit["vulnerabilities_found"] == 0 and audit["checks"]["license_check"] == 0


def test_requirements_come_from_an_input_document(tmp_path: Path) -> None:
    document = (
        "# R\n\n## Scope\n\n- not this\n\n"
        "## Requirements\n\n- R1: Use PKCE. [1]\n- R2: Rotate tokens. [2]\n\n## References\n\n1. x\n"
    )
    result = vssc.implement(ctx({"Synthesize": {"document": document}}), component="auth", workspace=str(tmp_path))
    readme = (Path(result["workspace"]) / "README.md").read_text()
    assert "1. Use PKCE.\n2. Rotate tokens.\n" in readme


def test_requirements_default_to_the_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIBROKER_WORKSPACE", str(tmp_path))
    result = vssc.implement(ctx(), component="ui")
    assert result["workspace"] == str(tmp_path / "wf-1" / "ui")
    assert "Provide the ui component." in (tmp_path / "wf-1" / "ui" / "README.md").read_text()


def test_same_content_same_release(tmp_path: Path) -> None:
    first = vssc.implement(ctx(), component="api", workspace=str(tmp_path / "a"))
    second = vssc.implement(ctx(), component="api", workspace=str(tmp_path / "b"))
    other = vssc.implement(ctx(), component="api", requirements="x", workspace=str(tmp_path / "c"))
    assert first["release"] == second["release"] != other["release"]


def test_revert_removes_exactly_what_implement_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "wf-1" / "api"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("mine\n")
    (folder / "notes.txt").write_text("mine too\n")
    result = vssc.implement(ctx(), component="api", workspace=str(tmp_path))
    assert result["files"] == ["api.py", "test_api.py"] and result["kept"] == ["README.md"]
    assert result["created_dirs"] == []
    assert (folder / "README.md").read_text() == "mine\n"
    undo = vssc.revert(ctx(result=result, command="revert"), component="api")
    assert sorted(undo["removed"]) == sorted(str(folder / f) for f in ("api.py", "test_api.py"))
    assert tree(tmp_path) == {"wf-1", "wf-1/api", "wf-1/api/README.md", "wf-1/api/notes.txt"}
    assert vssc.revert(ctx(result=result, command="revert")) == {"removed": []}


def test_revert_removes_the_folders_it_created_once_empty(tmp_path: Path) -> None:
    result = vssc.implement(ctx(), component="api", workspace=str(tmp_path))
    assert result["created_dirs"] == [str(tmp_path / "wf-1"), str(tmp_path / "wf-1" / "api")]
    (tmp_path / "wf-1" / "other.txt").write_text("someone else's\n")
    undo = vssc.revert(ctx(result=result, command="revert"))
    assert str(tmp_path / "wf-1" / "api") in undo["removed"]
    assert tree(tmp_path) == {"wf-1", "wf-1/other.txt"}


def test_revert_without_a_result_does_nothing() -> None:
    assert vssc.revert(ctx(result=None, command="revert")) == {"removed": []}


VULNERABLE = """import hashlib
import subprocess


def run(cmd, data):
    if data:
        value = eval(
            data
        )
    subprocess.run(cmd, shell=True)
    return hashlib.md5(b"x").hexdigest(), value


if eval("1"):
    pass
"""


def scan(path: Path) -> list[dict[str, Any]]:
    return kalic.static_scan(ctx(command="static_scan"), target=str(path))["findings"]


def test_fix_disables_flagged_statements_in_a_copy(tmp_path: Path) -> None:
    source = tmp_path / "src" / "app.py"
    source.parent.mkdir()
    source.write_text(VULNERABLE)
    findings = scan(source)
    assert {f["rule"] for f in findings} == {"eval", "shell-injection", "weak-hash"}
    missing = {"file": str(tmp_path / "gone.py"), "line": 1, "rule": "eval", "message": "m"}
    result = vssc.fix_vulnerability(
        ctx(command="fix_vulnerability"), findings=[*findings, missing], workspace=str(tmp_path / "ws")
    )
    assert source.read_text() == VULNERABLE
    copy = Path(result["patched"][str(source)])
    assert copy == tmp_path / "ws" / "wf-1" / "fixes" / "app.py"
    assert result["files"] == ["app.py", "FIXES.md"] and result["release"].startswith("fix-")
    fixed_lines = copy.read_text().splitlines()
    assert len(fixed_lines) == len(VULNERABLE.splitlines())
    assert fixed_lines[6] == "        pass  # phibroker-fix [eval] disabled: value = eval("
    assert fixed_lines[9].startswith("    pass  # phibroker-fix [shell-injection]")
    assert {f["line"] for f in result["fixed"]} == {7, 10, 11}
    assert {(f["line"], f["reason"]) for f in result["skipped"]} == {
        (14, "not inside a simple statement; fix it by hand"),
        (1, "file not found"),
    }
    assert [f["rule"] for f in scan(copy)] == ["eval"]
    report = (Path(result["workspace"]) / "FIXES.md").read_text()
    assert "## Not fixed" in report and "gone.py" in report
    undo = vssc.revert(ctx(result=result, command="revert"))
    assert len(undo["removed"]) == 5  # two files, fixes/, wf-1/, ws/
    assert not (tmp_path / "ws").exists() and source.exists()


def test_fix_with_no_findings_writes_only_the_report(tmp_path: Path) -> None:
    result = vssc.fix_vulnerability(ctx(command="fix_vulnerability"), findings=None, workspace=str(tmp_path))
    assert result["files"] == ["FIXES.md"] and result["fixed"] == [] and result["patched"] == {}
