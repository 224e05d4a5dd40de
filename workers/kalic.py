"""kalic: static security checks of Python code, dependency manifests and license headers, and reviews
of written drafts against a rubric.

Everything is read with the standard library (`ast`, `tomllib`); nothing is executed or installed.
Findings are `{"file", "line", "rule", "severity", "message"}` with `file` an absolute path, so another
agent (vssc's fix, this agent's verify) can find the file from any working directory.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from phibroker.runtime.agent import Agent, Context
from workers._common import MAX_ITEMS, SEVERITY_RANK, inputs_with, severity_counts, walk_files
from workers._writing import assess

agent = Agent("kalic")

SECRET_NAME = re.compile(r"password|passwd|secret|token|api_?key|private_?key", re.IGNORECASE)
SHELL_ALWAYS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}
WEAK_HASHES = {"md5", "sha1"}
SPDX = "SPDX-License-Identifier:"
Finding = dict[str, Any]


def finding(file: Path, line: int, rule: str, severity: str, message: str) -> Finding:
    return {"file": str(file), "line": line, "rule": rule, "severity": severity, "message": message}


def resolve_target(target: str) -> Path:
    """The target as an absolute path; a missing one is an error, not a clean scan of nothing."""
    path = Path(target).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"scan target {target!r} does not exist ({path})")
    return path


def worst_first(findings: list[Finding]) -> list[Finding]:
    """Highest severity first, then by file and line: when a list is capped, the worst survive."""
    return sorted(findings, key=lambda f: (-SEVERITY_RANK.get(f["severity"], 0), f["file"], f["line"]))


def counted(check: str, findings: list[Finding]) -> dict[str, Any]:
    """What every check returns about its findings: the list capped worst first, and the exact counts of
    all of them (by severity and by rule), so a report over capped lists still adds up."""
    return {
        "check": check,
        "findings": worst_first(findings)[:MAX_ITEMS],
        "finding_count": len(findings),
        "by_severity": severity_counts(findings),
        "by_rule": dict(Counter(f["rule"] for f in findings).most_common()),
    }


# -- Python source ----------------------------------------------------------------------------------


def dotted(node: ast.expr) -> tuple[str, str] | None:
    """`module.name` of a call like `subprocess.run(...)`, as ("subprocess", "run")."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value == value for k in call.keywords)


def check_call(call: ast.Call) -> tuple[str, str, str] | None:
    """(rule, severity, message) for a dangerous call, else None."""
    func = call.func
    if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
        return func.id, "high", f"{func.id}() runs arbitrary code; parse the data instead (ast.literal_eval, json)"
    name = dotted(func)
    if name in SHELL_ALWAYS:
        return "shell-injection", "high", f"{'.'.join(name)}() runs a shell; use subprocess.run with a list of args"
    if name and name[0] == "subprocess" and keyword_is(call, "shell", True):
        return "shell-injection", "high", f"subprocess.{name[1]}(shell=True) runs a shell; pass a list of args"
    if keyword_is(call, "usedforsecurity", False):
        return None
    if name and name[0] == "hashlib" and name[1] in WEAK_HASHES:
        return "weak-hash", "medium", f"hashlib.{name[1]} is broken for security; use hashlib.sha256 or better"
    if name == ("hashlib", "new") and call.args and isinstance(call.args[0], ast.Constant):
        algorithm = str(call.args[0].value).lower()
        if algorithm in WEAK_HASHES:
            return "weak-hash", "medium", f"hashlib.new({algorithm!r}) is broken for security; use sha256"
    return None


def assigned_names(node: ast.Assign | ast.AnnAssign) -> Iterator[str]:
    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
        if isinstance(target, ast.Name):
            yield target.id
        elif isinstance(target, ast.Attribute):
            yield target.attr


def check_secret(node: ast.Assign | ast.AnnAssign) -> str | None:
    """The name a secret-looking literal is assigned to; URLs and sentences are not credentials."""
    value = node.value
    if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
        return None
    text = value.value
    if len(text) < 8 or "://" in text or any(c.isspace() for c in text):
        return None
    return next((name for name in assigned_names(node) if SECRET_NAME.search(name)), None)


def scan_source(path: Path, source: str) -> list[Finding]:
    """The findings of one file's source; a syntax error is itself a (low) finding."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        return [finding(path, exc.lineno or 1, "syntax-error", "low", f"cannot parse: {exc.msg}")]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (hit := check_call(node)):
            found.append(finding(path, node.lineno, *hit))
        elif isinstance(node, ast.Assign | ast.AnnAssign) and (name := check_secret(node)):
            message = f"hard-coded secret in {name!r}; read it from the environment or a secret manager"
            found.append(finding(path, node.lineno, "hardcoded-secret", "high", message))
    return sorted(found, key=lambda f: (f["line"], f["rule"]))


def scan_file(path: Path) -> list[Finding]:
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [finding(path, 1, "unreadable", "low", f"cannot read: {exc}")]
    return scan_source(path, source)


def scan_python(root: Path) -> tuple[int, list[Finding]]:
    files = walk_files(root, (".py",))
    return len(files), [f for path in files for f in scan_file(path)]


# -- dependencies -----------------------------------------------------------------------------------


def requirement_name(spec: str) -> str | None:
    """The normalised project name of a requirement string, or None for options and blank lines."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not match or spec.lstrip().startswith("-"):
        return None
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def is_pinned(spec: str) -> bool:
    """`==` pins a version; a direct reference (`name @ url`) names one artifact."""
    requirement = spec.split(";", 1)[0]
    return "==" in requirement or " @ " in requirement


def audit_list(path: Path, entries: list[tuple[int, str]], where: str) -> list[Finding]:
    """Unpinned and duplicated requirements of one declared list (a file, or one pyproject table)."""
    found: list[Finding] = []
    seen: dict[str, str] = {}
    for line, spec in entries:
        name = requirement_name(spec)
        if name is None:
            continue
        if name in seen:
            conflict = seen[name].replace(" ", "") != spec.replace(" ", "")
            severity, extra = ("medium", f" with a different spec ({seen[name]!r})") if conflict else ("low", "")
            found.append(finding(path, line, "duplicate-requirement", severity, f"{name} listed twice{extra} {where}"))
            continue
        seen[name] = spec
        if not is_pinned(spec):
            found.append(finding(path, line, "unpinned-requirement", "low", f"{spec.strip()!r} is not pinned with =="))
    return found


def requirements_txt(path: Path) -> list[Finding]:
    entries = []
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        text = raw.split(" #", 1)[0].strip()
        if text and not text.startswith("#"):
            entries.append((number, text))
    return audit_list(path, entries, f"in {path.name}")


def pyproject_lists(data: dict[str, Any]) -> Iterator[tuple[str, list[Any]]]:
    """(where, requirement strings) for `[project]` dependencies, optional groups and dependency groups."""
    project = data.get("project", {})
    yield "in [project] dependencies", project.get("dependencies", [])
    for group, specs in project.get("optional-dependencies", {}).items():
        yield f"in optional dependencies {group!r}", specs
    for group, specs in data.get("dependency-groups", {}).items():
        yield f"in dependency group {group!r}", [s for s in specs if isinstance(s, str)]


def pyproject_toml(path: Path) -> list[Finding]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [finding(path, 1, "syntax-error", "low", f"cannot parse: {exc}")]
    lines = text.splitlines()

    def line_of(spec: str) -> int:
        return next((i for i, line in enumerate(lines, 1) if spec in line), 1)

    found = []
    for where, specs in pyproject_lists(data):
        found += audit_list(path, [(line_of(s), s) for s in specs if isinstance(s, str)], where)
    return found


def manifests(root: Path) -> list[Path]:
    candidates = [root] if root.is_file() else walk_files(root, (".txt", ".toml"))
    return [p for p in candidates if p.name == "pyproject.toml" or re.fullmatch(r"requirements.*\.txt", p.name)]


def audit_dependencies(root: Path) -> tuple[list[Path], list[Finding]]:
    files = manifests(root)
    reader: dict[bool, Callable[[Path], list[Finding]]] = {True: pyproject_toml, False: requirements_txt}
    return files, [f for path in files for f in reader[path.suffix == ".toml"](path)]


# -- licenses ---------------------------------------------------------------------------------------


def missing_license(path: Path) -> bool:
    """No SPDX line in the first 5 lines; empty files (package markers) hold no code to license."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            head = [handle.readline() for _ in range(5)]
    except OSError:
        return True
    return any(head) and not any(SPDX in line for line in head)


def check_licenses(root: Path) -> tuple[int, list[Finding]]:
    files = walk_files(root, (".py",))
    message = f"no {SPDX} line in the first 5 lines"
    return len(files), [finding(p, 1, "missing-license", "low", message) for p in files if missing_license(p)]


# -- inventory --------------------------------------------------------------------------------------

MANIFEST_NAMES = frozenset(
    {"pyproject.toml", "setup.py", "setup.cfg", "Pipfile", "Pipfile.lock", "poetry.lock", "uv.lock",
     "package.json", "package-lock.json", "yarn.lock", "go.mod", "Cargo.toml", "Gemfile", "pom.xml"}
)  # fmt: skip
AUDITED = re.compile(r"pyproject\.toml|requirements.*\.txt")  # the manifests dependency_audit reads
INVENTORY_LIMIT = 20000  # files walked; a bigger tree is reported as truncated


def is_manifest(path: Path) -> bool:
    return path.name in MANIFEST_NAMES or bool(re.fullmatch(r"requirements.*\.txt", path.name))


def line_counts(path: Path) -> tuple[int, int]:
    """(lines, code lines): code lines are neither blank nor only a comment."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0, 0
    lines = text.splitlines()
    return len(lines), sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#"))


def is_test(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts if path != root else (path.name,)
    return path.name.startswith("test_") or path.name.endswith("_test.py") or "tests" in parts[:-1]


def project_metadata(root: Path) -> tuple[str, str | None]:
    """(name, license) as pyproject.toml declares them (`license = "MIT"` or `{text = ...}`); else the
    folder's name and the first line of a LICENSE file."""
    folder = root if root.is_dir() else root.parent
    try:
        project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        project = {}
    name = str(project.get("name") or folder.name)
    declared = project.get("license")
    if isinstance(declared, dict):
        declared = declared.get("text") or declared.get("file")
    if isinstance(declared, str) and declared.strip():
        return name, declared.strip()[:80]
    for filename in ("LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"):
        try:
            with (folder / filename).open(encoding="utf-8", errors="replace") as handle:
                first = next((line.strip() for line in handle if line.strip()), "")
        except OSError:
            continue
        return name, first[:80] or filename
    return name, None


def relative(path: Path, root: Path) -> str:
    """The path as the project's people write it: relative to the target folder."""
    base = root if root.is_dir() else root.parent
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


@agent.command("inventory")
def inventory(ctx: Context, target: str = ".", **_: Any) -> dict[str, Any]:
    """What the target holds, before anything is checked: files by extension, Python files and lines (and
    how many are tests), the dependency manifests, the declared license and the largest Python files."""
    root = resolve_target(target)
    files = walk_files(root, (), INVENTORY_LIMIT)
    python = [p for p in files if p.suffix == ".py"]
    sizes = {p: line_counts(p) for p in python}
    manifest_files = [p for p in files if is_manifest(p)]
    unaudited = [p for p in manifest_files if not AUDITED.fullmatch(p.name)]
    extensions = Counter(p.suffix.lower() or "(none)" for p in files)
    largest = sorted(python, key=lambda p: (-sizes[p][0], str(p)))[:5]
    name, license_ = project_metadata(root)
    return {
        "target": str(root),
        "name": name,
        "files": len(files),
        "truncated": len(files) >= INVENTORY_LIMIT,
        "by_extension": dict(extensions.most_common(10)),
        "python_files": len(python),
        "python_lines": sum(lines for lines, _ in sizes.values()),
        "code_lines": sum(code for _, code in sizes.values()),
        "test_files": sum(1 for p in python if is_test(p, root)),
        "manifests": [relative(p, root) for p in manifest_files[:MAX_ITEMS]],
        "unaudited_manifests": [relative(p, root) for p in unaudited[:MAX_ITEMS]],
        "license": license_,
        "largest": [{"file": relative(p, root), "lines": sizes[p][0]} for p in largest],
    }


# -- commands ---------------------------------------------------------------------------------------


@agent.command("static_scan")
def static_scan(ctx: Context, target: str = ".", **_: Any) -> dict[str, Any]:
    """eval/exec, shell commands, hard-coded secrets and weak hashes in the Python files under target."""
    root = resolve_target(target)
    count, findings = scan_python(root)
    return {"target": str(root), "files_scanned": count, **counted("static_scan", findings)}


@agent.command("dependency_audit")
def dependency_audit(ctx: Context, target: str = ".", **_: Any) -> dict[str, Any]:
    """Unpinned and duplicated requirements in requirements*.txt and pyproject.toml files."""
    root = resolve_target(target)
    files, findings = audit_dependencies(root)
    return {
        "target": str(root),
        "manifests": [str(p) for p in files[:MAX_ITEMS]],
        **counted("dependency_audit", findings),
    }


@agent.command("license_check")
def license_check(ctx: Context, target: str = ".", **_: Any) -> dict[str, Any]:
    """Python files without an SPDX-License-Identifier near the top."""
    root = resolve_target(target)
    count, findings = check_licenses(root)
    return {"target": str(root), "files_checked": count, **counted("license_check", findings)}


def audit_targets(ctx: Context, target: str | None) -> list[str]:
    """The payload's target, else every input's `workspace` (audit what was just built), else `.`."""
    if target:
        return [target]
    return [str(r["workspace"]) for r in inputs_with(ctx, "workspace")] or ["."]


@agent.command("security_audit")
def security_audit(ctx: Context, target: str | None = None, **_: Any) -> dict[str, Any]:
    """The three checks on each target; `vulnerabilities_found` counts medium and high findings only."""
    roots = [resolve_target(t) for t in audit_targets(ctx, target)]
    checks = {"static_scan": 0, "dependency_audit": 0, "license_check": 0}
    findings: list[Finding] = []
    for root in roots:
        for name, found in (
            ("static_scan", scan_python(root)[1]),
            ("dependency_audit", audit_dependencies(root)[1]),
            ("license_check", check_licenses(root)[1]),
        ):
            checks[name] += len(found)
            findings += found
    worst = max((SEVERITY_RANK[f["severity"]] for f in findings), default=0)
    return {
        "targets": [str(r) for r in roots],
        "vulnerabilities_found": sum(1 for f in findings if SEVERITY_RANK[f["severity"]] >= 2),
        "max_severity": next(k for k, v in SEVERITY_RANK.items() if v == worst),
        "findings": worst_first(findings)[:MAX_ITEMS],
        "finding_count": len(findings),
        "by_severity": severity_counts(findings),
        "checks": checks,
    }


def patched_copies(ctx: Context) -> dict[str, str]:
    """original file -> fixed copy, from the inputs of a fix (vssc's `fix_vulnerability` result)."""
    copies: dict[str, str] = {}
    for result in inputs_with(ctx, "patched"):
        copies.update({str(k): str(v) for k, v in dict(result["patched"]).items()})
    return copies


@agent.command("verify_fix")
def verify_fix(ctx: Context, findings: list[Finding] | None = None, **_: Any) -> dict[str, Any]:
    """Re-scan the files named in the findings (their fixed copies when an input made them) and report
    the findings that are still there, matched by rule and line."""
    copies = patched_copies(ctx)
    rescans: dict[str, set[tuple[str, int]]] = {}
    remaining = []
    for item in findings or []:
        original = str(item.get("file", ""))
        checked = copies.get(original, original)
        if checked not in rescans:
            path = Path(checked)
            rescans[checked] = {(f["rule"], f["line"]) for f in scan_file(path)} if path.is_file() else set()
        if (item.get("rule"), item.get("line")) in rescans[checked]:
            remaining.append({**item, "checked": checked})
    return {"fixed": not remaining, "remaining": remaining[:MAX_ITEMS], "checked": sorted(rescans)[:MAX_ITEMS]}


@agent.command("review")
def review(
    ctx: Context, text: str | None = None, topic: str | None = None, target: int = 8, **_: Any
) -> dict[str, Any]:
    """Score a draft 0-10 against the writing rubric (workers/_writing.py), with a note per criterion
    missed; the draft is the payload's `text`, else the first input result with a `text`."""
    drafts = inputs_with(ctx, "text")
    if text is None and not drafts:
        got = ", ".join(ctx.inputs) or "no inputs at all"
        raise ValueError(f"review needs a `text` (in the payload or an input's result, such as dc's draft); got: {got}")
    chosen = text if text is not None else str(drafts[0]["text"])
    about = topic if topic is not None else str(drafts[0].get("topic") or "") if drafts else ""
    verdict = assess(chosen, about)
    return {**verdict, "target": int(target), "passed": verdict["score"] >= int(target)}
