"""kalic: each static rule on crafted files, the dependency and license checks, the audit, verify_fix, review."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from phibroker.runtime.agent import Context
from workers import kalic


def ctx(inputs: dict[str, Any] | None = None) -> Context:
    return Context(
        workflow_id="wf", task="Scan", unit="Scan", attempt=1, agent="kalic", command="static_scan", inputs=inputs or {}
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rules(result: dict[str, Any]) -> list[tuple[int, str, str]]:
    return sorted((f["line"], f["rule"], f["severity"]) for f in result["findings"])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("eval(x)\n", [(1, "eval", "high")]),
        ("y = 1\nexec('print(1)')\n", [(2, "exec", "high")]),
        ("import subprocess\nsubprocess.run('ls', shell=True)\n", [(2, "shell-injection", "high")]),
        ("import subprocess\nsubprocess.Popen(['ls'], shell=False)\n", []),
        ("import os\nos.system('ls')\n", [(2, "shell-injection", "high")]),
        ("password = 'hunter2hunter2'\n", [(1, "hardcoded-secret", "high")]),
        ("self.api_key: str = 'abcd1234efgh'\n", [(1, "hardcoded-secret", "high")]),
        ("DB_TOKEN = 'short'\nTOKEN_URL = 'https://example.com/token'\nsecret = os.environ['S']\n", []),
        (
            "import hashlib\nhashlib.md5(b'x')\nhashlib.sha1(b'x')\n",
            [(2, "weak-hash", "medium"), (3, "weak-hash", "medium")],
        ),
        ("import hashlib\nhashlib.new('MD5')\nhashlib.new('sha256')\n", [(2, "weak-hash", "medium")]),
        ("import hashlib\nhashlib.md5(b'x', usedforsecurity=False)\n", []),
        ("def broken(:\n", [(1, "syntax-error", "low")]),
    ],
)
def test_static_scan_rules(tmp_path: Path, source: str, expected: list[tuple[int, str, str]]) -> None:
    path = write(tmp_path / "mod.py", source)
    result = kalic.static_scan(ctx(), target=str(tmp_path))
    assert result["files_scanned"] == 1 and result["finding_count"] == len(expected)
    assert rules(result) == expected
    assert all(f["file"] == str(path) and f["message"] for f in result["findings"])


def test_static_scan_walks_but_skips_virtualenvs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "pkg" / "a.py", "eval('1')\n")
    write(tmp_path / "pkg" / "b.txt", "eval('1')\n")
    write(tmp_path / ".venv" / "lib.py", "eval('1')\n")
    monkeypatch.chdir(tmp_path)
    result = kalic.static_scan(ctx(), target="pkg")
    assert result["target"] == str(tmp_path / "pkg") and result["files_scanned"] == 1
    assert kalic.static_scan(ctx())["files_scanned"] == 1


def test_static_scan_caps_findings_worst_first(tmp_path: Path) -> None:
    write(tmp_path / "many.py", "import hashlib\n" + "hashlib.md5(b'')\n" * 60 + "eval('1')\n")
    result = kalic.static_scan(ctx(), target=str(tmp_path))
    assert result["finding_count"] == 61 and len(result["findings"]) == kalic.MAX_ITEMS
    assert result["findings"][0]["rule"] == "eval"


def test_missing_target_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kalic.static_scan(ctx(), target=str(tmp_path / "nope"))


def test_dependency_audit(tmp_path: Path) -> None:
    write(tmp_path / "requirements.txt", "# pinned\nrequests==2.32.3\nflask>=3  # web\n-r other.txt\nFlask==3.0.0\n\n")
    write(tmp_path / "requirements-dev.txt", "pytest==8.0.0\npytest==8.0.0\n")
    write(
        tmp_path / "pyproject.toml",
        '[project]\nname = "x"\ndependencies = ["click==8.1.7", "rich"]\n'
        '[project.optional-dependencies]\ndev = ["ruff==0.5.0", "mylib @ https://example.com/mylib.whl"]\n',
    )
    result = kalic.dependency_audit(ctx(), target=str(tmp_path))
    found = {(Path(f["file"]).name, f["line"], f["rule"], f["severity"]) for f in result["findings"]}
    assert found == {
        ("requirements.txt", 3, "unpinned-requirement", "low"),
        ("requirements.txt", 5, "duplicate-requirement", "medium"),
        ("requirements-dev.txt", 2, "duplicate-requirement", "low"),
        ("pyproject.toml", 3, "unpinned-requirement", "low"),
    }
    assert len(result["manifests"]) == 3


def test_license_check(tmp_path: Path) -> None:
    write(tmp_path / "ok.py", "#!/usr/bin/env python\n# SPDX-License-Identifier: MIT\n")
    write(tmp_path / "late.py", "\n" * 5 + "# SPDX-License-Identifier: MIT\n")
    write(tmp_path / "none.py", "x = 1\n")
    write(tmp_path / "__init__.py", "")
    result = kalic.license_check(ctx(), target=str(tmp_path))
    assert result["files_checked"] == 4
    assert sorted(Path(f["file"]).name for f in result["findings"]) == ["late.py", "none.py"]


def test_security_audit_aggregates(tmp_path: Path) -> None:
    write(tmp_path / "app.py", "# SPDX-License-Identifier: MIT\nimport hashlib\nhashlib.sha1(b'')\n")
    write(tmp_path / "util.py", "x = 1\n")
    write(tmp_path / "requirements.txt", "rich\n")
    result = kalic.security_audit(ctx(), target=str(tmp_path))
    assert result["checks"] == {"static_scan": 1, "dependency_audit": 1, "license_check": 1}
    assert result["vulnerabilities_found"] == 1 and result["max_severity"] == "medium"
    assert result["findings"][0]["rule"] == "weak-hash"


def test_security_audit_scans_input_workspaces(tmp_path: Path) -> None:
    write(tmp_path / "api" / "a.py", "# SPDX-License-Identifier: MIT\neval('1')\n")
    write(tmp_path / "ui" / "b.py", "# SPDX-License-Identifier: MIT\n")
    inputs = {"ImplementAPI": {"workspace": str(tmp_path / "api")}, "ImplementUI": {"workspace": str(tmp_path / "ui")}}
    result = kalic.security_audit(ctx(inputs))
    assert result["targets"] == [str(tmp_path / "api"), str(tmp_path / "ui")]
    assert result["vulnerabilities_found"] == 1 and result["max_severity"] == "high"


def test_security_audit_of_a_clean_tree(tmp_path: Path) -> None:
    write(tmp_path / "a.py", "# SPDX-License-Identifier: MIT\n")
    result = kalic.security_audit(ctx(), target=str(tmp_path))
    assert result["max_severity"] == "none" and result["vulnerabilities_found"] == 0 and result["findings"] == []


def test_verify_fix_on_the_original_files(tmp_path: Path) -> None:
    path = write(tmp_path / "a.py", "eval('1')\n")
    findings = kalic.static_scan(ctx(), target=str(path))["findings"]
    assert kalic.verify_fix(ctx(), findings=findings)["fixed"] is False
    path.write_text("import ast\nast.literal_eval('1')\n")
    result = kalic.verify_fix(ctx(), findings=findings)
    assert result == {"fixed": True, "remaining": [], "checked": [str(path)]}


def test_verify_fix_prefers_the_fixed_copies_of_an_input(tmp_path: Path) -> None:
    path = write(tmp_path / "a.py", "eval('1')\npassword = 'hunter2hunter2'\n")
    copy = write(tmp_path / "fixed" / "a.py", "pass  # fixed\npassword = 'hunter2hunter2'\n")
    findings = kalic.static_scan(ctx(), target=str(path))["findings"]
    result = kalic.verify_fix(ctx({"Fix": {"patched": {str(path): str(copy)}}}), findings=findings)
    assert result["fixed"] is False
    assert [(f["rule"], f["checked"]) for f in result["remaining"]] == [("hardcoded-secret", str(copy))]


def test_verify_fix_without_findings_is_fixed() -> None:
    assert kalic.verify_fix(ctx(), findings=None)["fixed"] is True


def test_review_scores_a_draft_against_the_rubric() -> None:
    bare = kalic.review(ctx(), text="Some words about limits.")
    assert bare["score"] == 0 and bare["passed"] is False and len(bare["notes"]) == 5
    text = (
        "# Rate limiting\n\nThis note explains rate limiting for the team that builds the public API gateway.\n\n"
        "## Buckets\n\nRefill at a steady rate [1].\n\n## Answers\n\nSay 429 and when to retry [2].\n\n"
        "## References\n\n1. Buckets\n2. Answers\n"
    )
    review = kalic.review(ctx(), text=text, topic="rate limiting", target=8)
    assert review["score"] == 8 and review["passed"] is True
    assert review["notes"] == ["end with a `## Conclusion` that says what to do"]
    assert kalic.review(ctx(), text=text, topic="caching")["criteria"]["title"] is False  # another topic's title


def test_review_takes_the_draft_from_its_inputs() -> None:
    draft = {"topic": "rate limiting", "text": "# Rate limiting\n\nShort.\n"}
    review = kalic.review(ctx({"Draft": draft}), target=2)
    assert review["criteria"]["title"] is True and review["score"] == 2 and review["passed"] is True
    with pytest.raises(ValueError, match="review needs a `text`.*got: Other"):
        kalic.review(ctx({"Other": {"score": 1}}))
