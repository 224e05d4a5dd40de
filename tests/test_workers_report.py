"""The audit-repository commands on real files: kalic.inventory, dc.report, cmdc.publish_report, and the
three kalic checks chained into a report through msgpack as the broker would carry them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import pytest

from phibroker.runtime.agent import Context, load_agent
from workers import cmdc, dc, kalic

VULNERABLE = """\
import hashlib
import subprocess


def archive(folder):
    subprocess.run("tar czf backup.tgz " + folder, shell=True)


def fingerprint(data):
    return hashlib.md5(data).hexdigest()
"""


def ctx(inputs: dict[str, Any] | None = None, workflow_id: str = "wf-audit") -> Context:
    return Context(workflow_id=workflow_id, task="T", unit="T", attempt=1, agent="x", command="x", inputs=inputs or {})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small project: one vulnerable module, eight modules without a license line, a test, manifests."""
    root = tmp_path / "project"
    write(root / "pyproject.toml", '[project]\nname = "shop"\nlicense = "Apache-2.0"\ndependencies = ["rich"]\n')
    write(root / "requirements.txt", "requests==2.32.3\nflask>=3\n")
    write(root / "package.json", "{}\n")
    write(root / "shop" / "archive.py", "# SPDX-License-Identifier: Apache-2.0\n" + VULNERABLE)
    for n in range(8):
        write(root / "shop" / f"m{n}.py", f"# module {n}\n\nVALUE = {n}\n")
    write(root / "tests" / "test_shop.py", "# SPDX-License-Identifier: Apache-2.0\ndef test_ok():\n    pass\n")
    write(root / "README.md", "# shop\n")
    write(root / ".venv" / "lib" / "junk.py", "eval('1')\n")
    return root


def checks(root: Path) -> dict[str, Any]:
    target = str(root)
    return {
        "Inventory": kalic.inventory(ctx(), target=target),
        "StaticScan": kalic.static_scan(ctx(), target=target),
        "DependencyAudit": kalic.dependency_audit(ctx(), target=target),
        "LicenseCheck": kalic.license_check(ctx(), target=target),
    }


# -- kalic.inventory --------------------------------------------------------------------------------


def test_inventory_counts_files_lines_and_manifests(project: Path) -> None:
    result = kalic.inventory(ctx(), target=str(project))
    assert result["target"] == str(project) and result["name"] == "shop" and result["license"] == "Apache-2.0"
    assert result["files"] == 14 and result["truncated"] is False  # .venv is skipped
    assert result["by_extension"] == {".py": 10, ".txt": 1, ".toml": 1, ".json": 1, ".md": 1}
    assert result["python_files"] == 10 and result["test_files"] == 1
    assert result["python_lines"] == 11 + 8 * 3 + 3 and result["code_lines"] == 6 + 8 + 2
    assert result["manifests"] == ["package.json", "pyproject.toml", "requirements.txt"]
    assert result["unaudited_manifests"] == ["package.json"]
    assert result["largest"][0] == {"file": "shop/archive.py", "lines": 11}


def test_inventory_of_a_single_file_and_a_folder_without_metadata(tmp_path: Path) -> None:
    path = write(tmp_path / "plain" / "tool.py", "print(1)\n")
    write(tmp_path / "plain" / "LICENSE", "\nBSD 3-Clause License\n\nCopyright ...\n")
    result = kalic.inventory(ctx(), target=str(path))
    assert result["files"] == result["python_files"] == 1 and result["largest"] == [{"file": "tool.py", "lines": 1}]
    assert result["name"] == "plain" and result["license"] == "BSD 3-Clause License"
    empty = kalic.inventory(ctx(), target=str(tmp_path / "plain" / "LICENSE"))
    assert empty["python_files"] == 0 and empty["largest"] == [] and empty["manifests"] == []


def test_inventory_of_a_missing_target_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"scan target '.*nowhere' does not exist"):
        kalic.inventory(ctx(), target=str(tmp_path / "nowhere"))


def test_checks_count_every_finding_even_when_the_list_is_capped(tmp_path: Path) -> None:
    for n in range(kalic.MAX_ITEMS + 10):
        write(tmp_path / f"m{n:02}.py", "x = 1\n")
    result = kalic.license_check(ctx(), target=str(tmp_path))
    assert len(result["findings"]) == kalic.MAX_ITEMS and result["finding_count"] == kalic.MAX_ITEMS + 10
    assert result["by_severity"] == {"high": 0, "medium": 0, "low": 60} and result["by_rule"] == {"missing-license": 60}
    assert result["check"] == "license_check"


# -- dc.report --------------------------------------------------------------------------------------


def test_report_merges_the_checks_into_a_readable_document(project: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    result = dc.report(ctx(checks(project)), threshold=5, workspace=str(workspace))
    path = workspace / "wf-audit" / "audit-report.md"
    assert result["path"] == str(path) and path.read_text() == result["markdown"] and not result["truncated"]
    # 2 static (shell high, md5 medium) + 2 dependency (rich, flask unpinned) + 8 missing licenses
    assert result["total_findings"] == 12 and result["max_severity"] == "high"
    assert result["by_severity"] == {"high": 1, "medium": 1, "low": 10}
    assert result["checks"] == {"Static scan": 2, "Dependency audit": 2, "License check": 8}
    text = result["markdown"]
    assert text.startswith(f"# Audit report: shop\n\nTarget `{project}` · workflow `wf-audit` · ")
    assert "**12 findings** (1 high, 1 medium, 10 low); the worst is **high**." in text
    assert "above this run's threshold of 5 findings" in text
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [
        "# Audit report: shop",
        "## Scope",
        "## Summary",
        "## Top findings",
        "### `shop/archive.py` — 1 high, 1 medium",
        "### `pyproject.toml` — 1 low",
        "### `requirements.txt` — 1 low",
        "## Widespread low-severity findings",
        "## Recommendations",
    ]
    assert "- 14 files, 10 of them Python: 38 lines (16 of code), 1 test file" in text
    assert "| Static scan | 10 Python files | 1 | 1 | 0 | 2 |" in text
    assert "| License check | 10 Python files | 0 | 0 | 8 | 8 |" in text
    assert "| **All checks** | | **1** | **1** | **10** | **12** |" in text
    assert "- line 7 · **high** · `shell-injection` — subprocess.run(shell=True) runs a shell" in text
    assert "- line 11 · **medium** · `weak-hash` — hashlib.md5 is broken" in text
    assert "- line 2 · **low** · `unpinned-requirement` — 'flask>=3' is not pinned with ==" in text
    assert "`missing-license` · low · 8 findings in `shop/m0.py`, `shop/m1.py`, `shop/m2.py` and 5 more files" in text
    assert "1. **shell-injection** — 1 high finding in `shop/archive.py` line 7. Call subprocess.run" in text
    assert "Add `# SPDX-License-Identifier: Apache-2.0` (the license the project declares)" in text
    assert "audit `package.json` with its own ecosystem's tool" in text


def test_report_within_the_threshold_and_without_an_inventory(tmp_path: Path) -> None:
    write(tmp_path / "src" / "ok.py", "# SPDX-License-Identifier: MIT\nx = 1\n")
    inputs = {"Scan": kalic.static_scan(ctx(), target=str(tmp_path / "src"))}
    result = dc.report(ctx(inputs), title="Nightly audit", threshold=0, workspace=str(tmp_path / "ws"))
    assert result["total_findings"] == 0 and result["max_severity"] == "none"
    assert result["by_severity"] == {"high": 0, "medium": 0, "low": 0}
    text = result["markdown"]
    assert text.startswith("# Nightly audit\n") and "## Scope" not in text
    assert "**No findings.** That is within this run's threshold of 0 findings." in text
    assert "_None to list one by one._" in text and "1. Nothing to fix." in text


def test_report_caps_the_markdown_it_returns_but_writes_it_all(tmp_path: Path) -> None:
    findings = [
        {"file": str(tmp_path / f"f{n}.py"), "line": n, "rule": f"rule-{n}", "severity": "high", "message": "x" * 600}
        for n in range(40)
    ]
    inputs = {"Scan": {"target": str(tmp_path), "findings": findings, "finding_count": 40}}
    result = dc.report(ctx(inputs), workspace=str(tmp_path / "ws"))
    assert result["truncated"] is True and len(result["markdown"]) <= dc.MAX_MARKDOWN
    assert result["markdown"].endswith(f"_… cut here; the whole report is in `{result['path']}`._\n")
    whole = Path(result["path"]).read_text()
    assert len(whole) > dc.MAX_MARKDOWN and whole.count("· **high** ·") == dc.TOP_FINDINGS
    assert "10 more findings not listed here" in whole


def test_report_without_check_results_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one check result among its inputs .*; got: no inputs at all"):
        dc.report(ctx(), workspace=str(tmp_path))
    inventory = kalic.inventory(ctx(), target=str(write(tmp_path / "a.py", "x = 1\n")))
    with pytest.raises(ValueError, match="got: Inventory, Build"):
        dc.report(ctx({"Inventory": inventory, "Build": {"files": []}}), workspace=str(tmp_path))
    assert not (tmp_path / "wf-audit").exists()


# -- cmdc.publish_report ----------------------------------------------------------------------------


def test_publish_report_copies_it_into_the_reports_folder(tmp_path: Path) -> None:
    source = write(tmp_path / "ws" / "wf-audit" / "audit-report.md", "# Audit report\n")
    result = cmdc.publish_report(ctx(), path=str(source), workspace=str(tmp_path / "ws"))
    published = tmp_path / "ws" / "reports" / "wf-audit-audit-report.md"
    assert result["published"] == str(published) and published.read_text() == "# Audit report\n"
    assert result["bytes"] == 15 and len(result["sha256"]) == 64
    latest = tmp_path / "ws" / "reports" / "latest-audit-report.md"
    assert os.readlink(latest) == published.name and latest.read_text() == "# Audit report\n"
    again = cmdc.publish_report(ctx({"Report": {"path": str(source)}}, "wf-2"), workspace=str(tmp_path / "ws"))
    assert os.readlink(latest) == "wf-2-audit-report.md" and again["source"] == str(source)
    assert sorted(p.name for p in published.parent.iterdir()) == [
        "latest-audit-report.md",
        "wf-2-audit-report.md",
        "wf-audit-audit-report.md",
    ]


def test_publish_report_of_a_missing_report_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist or is not a file"):
        cmdc.publish_report(ctx(), path=str(tmp_path / "gone.md"), workspace=str(tmp_path))
    with pytest.raises(ValueError, match="needs a `path`"):
        cmdc.publish_report(ctx(), workspace=str(tmp_path))
    assert not (tmp_path / "reports").exists()


# -- the chain, through msgpack ---------------------------------------------------------------------


def run(name: str, command: str, payload: dict[str, Any], inputs: dict[str, Any] | None = None) -> Any:
    context = Context(
        workflow_id="wf-chain", task=command, unit=command, attempt=1, agent=name, command=command, inputs=inputs or {}
    )
    outcome = load_agent(name).execute(command, context, payload, limit=1_000_000)
    assert outcome.ok, outcome.error
    assert outcome.value is not None
    return msgpack.unpackb(outcome.value)


def test_audit_chain_as_the_broker_carries_it(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIBROKER_WORKSPACE", str(tmp_path / "ws"))
    inventory = run("kalic", "inventory", {"target": str(project)})
    found = {
        name: run("kalic", command, {"target": inventory["target"]}, {"Inventory": inventory})
        for name, command in (("A", "static_scan"), ("B", "dependency_audit"), ("C", "license_check"))
    }
    report = run("dc", "report", {"threshold": 20}, {"Inventory": inventory, **found})
    assert report["total_findings"] == 12 and "within this run's threshold of 20" in report["markdown"]
    published = run("cmdc", "publish_report", {"path": report["path"]})
    assert Path(published["published"]).read_text() == Path(report["path"]).read_text() == report["markdown"]
