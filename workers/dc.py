"""dc: documents a person reads — a requirements document that cites its research sources, an audit
report that merges kalic's checks, a draft revised until its review passes — and plans whose steps it
spawns at run time."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phibroker.runtime.agent import Agent, Context
from workers._common import SEVERITY_RANK, severity_counts, workflow_dir, worst_severity
from workers._planning import components_of, plan_steps, render_report
from workers._writing import assess, compose, next_parts

agent = Agent("dc")
log = logging.getLogger("workers.dc")

MAX_REQUIREMENTS = 30


def research_inputs(ctx: Context) -> list[tuple[str, dict[str, Any]]]:
    """(task name, result) for every input result that carries `sources`, in dependency order."""
    found = []
    for task, value in ctx.inputs.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and isinstance(item.get("sources"), list):
                found.append((task, item))
    return found


def merge_sources(results: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """All sources once each (by path), keeping the highest score and the first snippet seen."""
    merged: dict[str, dict[str, Any]] = {}
    for _, result in results:
        for source in result["sources"]:
            key = str(source.get("path") or source.get("title"))
            known = merged.get(key)
            if known is None:
                merged[key] = dict(source)
            elif source.get("score", 0) > known.get("score", 0):
                known["score"] = source["score"]
    return list(merged.values())


def requirement_lines(results: list[tuple[str, dict[str, Any]]], sources: list[dict[str, Any]]) -> list[str]:
    """One requirement per distinct source snippet, citing the source's reference number."""
    numbers = {str(s.get("path") or s.get("title")): i for i, s in enumerate(sources, 1)}
    lines: list[str] = []
    seen: set[str] = set()
    for _, result in results:
        for source in result["sources"]:
            text = str(source.get("snippet") or "").strip()
            if not text or text in seen:
                continue
            seen.add(text)
            lines.append(f"{text} [{numbers[str(source.get('path') or source.get('title'))]}]")
    return lines[:MAX_REQUIREMENTS]


def scope_line(task: str, result: dict[str, Any]) -> str:
    angle = f" ({result['angle']})" if result.get("angle") else ""
    return f"- **{task}**: {result.get('topic', 'research')}{angle} — {result.get('summary', '')}".rstrip(" —")


def render(title: str, results: list[tuple[str, dict[str, Any]]], sources: list[dict[str, Any]]) -> str:
    """The markdown document: scope, numbered requirements, numbered references."""
    requirements = requirement_lines(results, sources)
    parts = [f"# {title}", ""]
    if not results:
        parts += ["No research results with sources were available, so this document has no requirements.", ""]
        parts += ["## Requirements", "", "_None yet: run a research task before this one._", ""]
    else:
        parts += ["## Scope", "", *(scope_line(task, result) for task, result in results), ""]
        parts += ["## Requirements", ""]
        parts += [f"- R{i}: {line}" for i, line in enumerate(requirements, 1)] or ["_None found._"]
        parts.append("")
    parts += ["## References", ""]
    parts += [f"{i}. {s.get('title', 'untitled')} — `{s.get('path', '')}`" for i, s in enumerate(sources, 1)]
    if not sources:
        parts.append("_No sources._")
    return "\n".join(parts) + "\n"


@agent.command("synthesize")
def synthesize(ctx: Context, title: str = "Requirements", **_: Any) -> dict[str, Any]:
    """A requirements document from every research input; without any it says so rather than failing."""
    results = research_inputs(ctx)
    sources = merge_sources(results)
    document = render(title, results, sources)
    count = sum(1 for line in document.splitlines() if line.startswith("- R"))
    return {"title": title, "document": document, "sources": sources, "requirement_count": count}


# -- report: an audit report from kalic's checks ----------------------------------------------------

REPORT_FILE = "audit-report.md"
MAX_MARKDOWN = 16_000  # the result carries the report up to this many characters; the file has it all
TOP_FINDINGS = 30
WIDESPREAD = 5  # a low-severity rule found more often than this is summarised, not listed line by line
CHECK_TITLES = {
    "static_scan": "Static scan",
    "dependency_audit": "Dependency audit",
    "license_check": "License check",
    "security_audit": "Security audit",
}
ADVICE = {
    "eval": "Replace eval() with a parser for the data it reads (ast.literal_eval, json.loads) or a lookup "
    "table of allowed operations; never evaluate text that a user or a file can influence.",
    "exec": "Remove exec(): call the code directly, or dispatch through a dict of allowed functions.",
    "shell-injection": "Call subprocess.run with a list of arguments and no shell=True, so that no argument is "
    "ever parsed by a shell; use shlex.quote only where a shell is truly needed.",
    "hardcoded-secret": "Move the secret to an environment variable or a secret manager, and rotate it: it is "
    "in the version history already.",
    "weak-hash": "Use hashlib.sha256 (or stronger) where the hash protects anything; where it is only a "
    "fingerprint or cache key, say so with usedforsecurity=False.",
    "unpinned-requirement": "Pin exact versions where the project is deployed (a lock or constraints file: "
    "pip-compile, uv lock, pip freeze). For a library's [project] dependencies, ranges are the norm: keep "
    "them, and pin in CI and deployments instead.",
    "duplicate-requirement": "List each requirement once per file or table; with two specs the installed "
    "version depends on the resolver.",
    "syntax-error": "Fix or exclude the files that do not parse: the other checks could not look inside them.",
    "unreadable": "Fix the encoding or permissions of these files, or exclude them: they were not checked.",
}


@dataclass
class CheckResult:
    """One check among the report's inputs, with the exact counts even where its findings list was capped."""

    label: str
    result: dict[str, Any]
    by_severity: dict[str, int]
    total: int
    findings: list[dict[str, Any]] = field(default_factory=list)
    by_rule: dict[str, int] = field(default_factory=dict)

    @property
    def scope(self) -> str:
        r = self.result
        if "files_scanned" in r:
            return plural(int(r["files_scanned"]), "Python file")
        if "manifests" in r:
            return plural(len(r["manifests"]), "manifest")
        if "files_checked" in r:
            return plural(int(r["files_checked"]), "Python file")
        return ", ".join(f"`{t}`" for t in r.get("targets", []))


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def check_result(task: str, result: dict[str, Any]) -> CheckResult:
    findings = [f for f in result["findings"] if isinstance(f, dict)]
    counts = result.get("by_severity") or severity_counts(findings)
    by_severity = {str(k): int(v) for k, v in dict(counts).items()}
    total = max(int(result.get("finding_count", len(findings))), sum(by_severity.values()))
    by_rule = dict(result.get("by_rule") or Counter(str(f.get("rule")) for f in findings))
    label = CHECK_TITLES.get(str(result.get("check")), task)
    return CheckResult(label, result, by_severity, total, findings, {str(k): int(v) for k, v in by_rule.items()})


def audit_inputs(ctx: Context) -> tuple[list[CheckResult], dict[str, Any] | None]:
    """The check results among the inputs (any result with a `findings` list; a mapped task's partitions
    each count) and the inventory, if one is there."""
    checks: list[CheckResult] = []
    inventory: dict[str, Any] | None = None
    for task, value in ctx.inputs.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and isinstance(item.get("findings"), list):
                checks.append(check_result(task, item))
            elif isinstance(item, dict) and "python_files" in item and inventory is None:
                inventory = item
    order = list(CHECK_TITLES)
    checks.sort(key=lambda c: order.index(c.result["check"]) if c.result.get("check") in order else len(order))
    labels = Counter(c.label for c in checks)
    for number, check in enumerate(checks, 1):
        if labels[check.label] > 1:
            check.label = f"{check.label} #{number}"
    return checks, inventory


def levels(checks: list[CheckResult]) -> list[str]:
    """The severity columns: high, medium, low always, then any other severity a check reported."""
    seen = {level for c in checks for level in c.by_severity} | {"high", "medium", "low"}
    return sorted(seen - {"none"}, key=lambda level: (-SEVERITY_RANK.get(level, 0), level))


def shown(file: str, root: Path | None) -> str:
    """A finding's file relative to the audited folder, as the project's people know it."""
    path = Path(file)
    if root is not None:
        base = root if not root.suffix else root.parent
        if path.is_relative_to(base) and path != base:
            return str(path.relative_to(base))
    return str(path)


def rank(finding: dict[str, Any]) -> tuple[int, str, int]:
    return -SEVERITY_RANK.get(str(finding.get("severity")), 0), str(finding.get("file")), int(finding.get("line", 0))


def itemised(checks: list[CheckResult]) -> list[dict[str, Any]]:
    """Every listed finding once (two checks may report the same one), worst first."""
    unique = {(f.get("file"), f.get("line"), f.get("rule"), f.get("message")): f for c in checks for f in c.findings}
    return sorted(unique.values(), key=rank)


def rule_totals(checks: list[CheckResult]) -> dict[str, tuple[int, str]]:
    """rule -> (how many findings, its worst severity), from the exact per-rule counts."""
    worst: dict[str, str] = {}
    for check in checks:
        for f in check.findings:
            rule, severity = str(f.get("rule")), str(f.get("severity"))
            if SEVERITY_RANK.get(severity, 0) >= SEVERITY_RANK.get(worst.get(rule, "none"), 0):
                worst[rule] = severity
    counts: Counter[str] = Counter()
    for check in checks:
        counts.update(check.by_rule)
    return {rule: (count, worst.get(rule, "low")) for rule, count in counts.items() if count}


def line_ranges(lines: list[int], limit: int = 8) -> str:
    """[13, 14, 15, 16, 26] -> `13–16, 26`."""
    spans: list[list[int]] = []
    for n in sorted(set(lines)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = [str(a) if a == b else f"{a}–{b}" for a, b in spans]
    return ", ".join(text[:limit]) + (", …" if len(text) > limit else "")


def where(findings: list[dict[str, Any]], root: Path | None, unlisted: int = 0, limit: int = 3) -> str:
    """`a.py`, `b.py` and 3 more files — or, all in one file, `a.py` lines 3–5, 9. `unlisted`: findings the
    check counted but did not list (its list is capped), so perhaps in more files."""
    files = list(dict.fromkeys(shown(str(f["file"]), root) for f in findings))
    if len(files) == 1 and not unlisted:
        lines = [int(f.get("line", 0)) for f in findings]
        return f"`{files[0]}` {'line' if len(set(lines)) == 1 else 'lines'} {line_ranges(lines)}"
    named = ", ".join(f"`{name}`" for name in files[:limit])
    more = len(files) - min(limit, len(files))
    if unlisted:
        return f"{named} and at least {more} more files" if more else f"{named} and perhaps other files"
    return f"{named} and {more} more files" if more else named


def scope_section(inventory: dict[str, Any] | None) -> list[str]:
    if not inventory:
        return []
    python = int(inventory.get("python_files", 0))
    parts = ["## Scope", ""]
    line = f"- {plural(int(inventory.get('files', 0)), 'file')}, {python:,} of them Python"
    if python:
        line += (
            f": {int(inventory.get('python_lines', 0)):,} lines ({int(inventory.get('code_lines', 0)):,} of code)"
            f", {plural(int(inventory.get('test_files', 0)), 'test file')}"
        )
    parts.append(line + (" (the walk stopped early: the tree is very large)" if inventory.get("truncated") else ""))
    manifests = inventory.get("manifests") or []
    parts.append("- Manifests: " + (", ".join(f"`{m}`" for m in manifests) or "none found"))
    parts.append(f"- Declared license: {inventory.get('license') or 'none found'}")
    largest = inventory.get("largest") or []
    if largest:
        sizes = ", ".join(f"`{item['file']}` ({int(item['lines']):,})" for item in largest)
        parts.append(f"- Largest Python files (lines): {sizes}")
    return [*parts, ""]


def summary_section(checks: list[CheckResult], columns: list[str], by_severity: dict[str, int]) -> list[str]:
    header = ["Check", "Scope", *(level.capitalize() for level in columns), "Total"]
    rows = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(columns) + 1)]
    for c in checks:
        cells = [c.label, c.scope, *(str(c.by_severity.get(level, 0)) for level in columns), str(c.total)]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    totals = [f"**{by_severity.get(level, 0)}**" for level in columns]
    rows.append("| **All checks** | | " + " | ".join(totals) + f" | **{sum(c.total for c in checks)}** |")
    return ["## Summary", "", *rows, ""]


def findings_section(top: list[dict[str, Any]], root: Path | None, hidden: int) -> list[str]:
    parts = ["## Top findings", ""]
    if not top:
        return [*parts, "_None to list one by one._", ""]
    by_file: dict[str, list[dict[str, Any]]] = {}
    for f in top:
        by_file.setdefault(shown(str(f["file"]), root), []).append(f)
    for name, found in by_file.items():
        counts = severity_counts(found)
        tally = ", ".join(f"{n} {level}" for level, n in counts.items() if n)
        parts += [f"### `{name}` — {tally}", ""]
        for f in sorted(found, key=lambda f: int(f.get("line", 0))):
            parts.append(f"- line {f.get('line')} · **{f.get('severity')}** · `{f.get('rule')}` — {f.get('message')}")
        parts.append("")
    if hidden:
        parts += [f"_{plural(hidden, 'more finding')} not listed here (only the worst are kept per check)._", ""]
    return parts


def widespread_section(
    rules: dict[str, tuple[int, str]], wide: list[str], listed: list[dict[str, Any]], root: Path | None
) -> list[str]:
    if not wide:
        return []
    parts = ["## Widespread low-severity findings", ""]
    for rule in wide:
        count, severity = rules[rule]
        found = [f for f in listed if f.get("rule") == rule]
        messages = list(dict.fromkeys(str(f.get("message")) for f in found))
        what = messages[0] if len(messages) == 1 else f"e.g. {messages[0]}"
        located = where(found, root, count - len(found))
        parts.append(f"- `{rule}` · {severity} · {plural(count, 'finding')} in {located} — {what}")
    return [*parts, ""]


def recommendations(
    rules: dict[str, tuple[int, str]], listed: list[dict[str, Any]], root: Path | None, inventory: dict[str, Any] | None
) -> list[str]:
    parts = ["## Recommendations", ""]
    ordered = sorted(rules, key=lambda r: (-SEVERITY_RANK.get(rules[r][1], 0), -rules[r][0], r))
    for number, rule in enumerate(ordered, 1):
        count, severity = rules[rule]
        found = [f for f in listed if f.get("rule") == rule]
        located = f" in {where(found, root, count - len(found))}" if found else ""
        parts.append(
            f"{number}. **{rule}** — {plural(count, severity + ' finding')}{located}. {advice(rule, inventory)}"
        )
    if not ordered:
        parts.append("1. Nothing to fix. Keep these checks in CI so that it stays this way.")
    unaudited = (inventory or {}).get("unaudited_manifests") or []
    if unaudited:
        names = ", ".join(f"`{m}`" for m in unaudited[:5])
        parts.append(
            f"{len(ordered) + 1}. The dependency audit reads pyproject.toml and requirements*.txt only: "
            f"audit {names} with its own ecosystem's tool."
        )
    return [*parts, ""]


def advice(rule: str, inventory: dict[str, Any] | None) -> str:
    if rule == "missing-license":
        declared = (inventory or {}).get("license")
        header = f"# SPDX-License-Identifier: {declared or '<license>'}"
        source = "the license the project declares" if declared else "the project's license"
        return f"Add `{header}` ({source}) near the top of each source file, so each file says its terms."
    return ADVICE.get(rule, f"Review each `{rule}` finding and fix or document it.")


def verdict(total: int, by_severity: dict[str, int], worst: str, threshold: Any) -> str:
    if not total:
        line = "**No findings.**"
    else:
        counts = ", ".join(f"{n} {level}" for level, n in by_severity.items() if n)
        line = f"**{plural(total, 'finding')}** ({counts}); the worst is **{worst}**."
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        relation = "above" if total > threshold else "within"
        line += f" That is {relation} this run's threshold of {threshold:g} findings."
    return line


def cap(markdown: str, path: Path) -> tuple[str, bool]:
    """The report as the result carries it: whole lines up to MAX_MARKDOWN characters, then a pointer."""
    if len(markdown) <= MAX_MARKDOWN:
        return markdown, False
    cut = markdown.rfind("\n", 0, MAX_MARKDOWN - 200) + 1
    return markdown[:cut] + f"\n_… cut here; the whole report is in `{path}`._\n", True


def write_atomically(path: Path, text: str) -> None:
    """Readers (and a retried attempt) see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@agent.command("report")
def report(
    ctx: Context, title: str | None = None, threshold: Any = None, workspace: str | None = None, **_: Any
) -> dict[str, Any]:
    """A markdown audit report from the check results among the inputs (kalic's static_scan,
    dependency_audit, license_check, security_audit) and an inventory if there is one: summary table,
    top findings by file, widespread findings, recommendations. Written to <workspace>/<wf>/audit-report.md."""
    checks, inventory = audit_inputs(ctx)
    if not checks:
        got = ", ".join(ctx.inputs) or "no inputs at all"
        raise ValueError(
            "report needs at least one check result among its inputs (a result with `findings`, such as "
            f"kalic's static_scan, dependency_audit or license_check); got: {got}"
        )
    target = (inventory or {}).get("target") or checks[0].result.get("target")
    root = Path(str(target)) if target else None
    columns = levels(checks)
    by_severity = {level: sum(c.by_severity.get(level, 0) for c in checks) for level in columns}
    total = sum(c.total for c in checks)
    worst = worst_severity(by_severity)
    rules = rule_totals(checks)
    wide = [r for r, (count, severity) in rules.items() if count > WIDESPREAD and SEVERITY_RANK.get(severity, 0) <= 1]
    listed = itemised(checks)
    top = [f for f in listed if f.get("rule") not in wide][:TOP_FINDINGS]
    hidden = total - len(top) - sum(rules[r][0] for r in wide)
    name = (inventory or {}).get("name") or (root.name if root else "")
    heading = title or (f"Audit report: {name}" if name else "Audit report")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    origin = [f"Target `{target}`"] if target else []
    sections = [
        [f"# {heading}", "", " · ".join([*origin, f"workflow `{ctx.workflow_id}`", stamp]), ""],
        [verdict(total, by_severity, worst, threshold), ""],
        scope_section(inventory),
        summary_section(checks, columns, by_severity),
        findings_section(top, root, hidden),
        widespread_section(rules, wide, listed, root),
        recommendations(rules, listed, root, inventory),
        [
            "_Static checks by kalic: patterns in the source, nothing was run. A finding is a lead to review in "
            "its context (a deliberate test fixture, say), not a proof of exploitability._"
        ],
    ]
    written = ["\n".join(section) for section in sections if "".join(section).strip()]
    for text in written:  # section by section, as a model writes: `phibroker logs ID --follow` shows them
        ctx.stream(text + "\n")
        ctx.spend(output_tokens=len(text.split()))  # its words stand for a model's output tokens
    log.info("report written: %d findings, %d sections", total, len(written))
    markdown = "\n".join(line for section in sections for line in section) + "\n"
    path = workflow_dir(ctx, workspace) / REPORT_FILE
    write_atomically(path, markdown)
    shown_markdown, truncated = cap(markdown, path)
    return {
        "title": heading,
        "path": str(path),
        "markdown": shown_markdown,
        "truncated": truncated,
        "total_findings": total,
        "by_severity": by_severity,
        "max_severity": worst,
        "checks": {c.label: c.total for c in checks},
    }


# -- draft: an article revised round by round (a `loop:` task) -------------------------------------


@agent.command("draft")
def draft(
    ctx: Context, topic: str, notes: list[str] | None = None, workspace: str | None = None, **_: Any
) -> dict[str, Any]:
    """A short article on the topic from the research inputs, scored against the review rubric. In a
    loop each iteration revises `ctx.previous`, fixing the first of its notes (or of the payload's
    `notes`, a reviewer's), so the score climbs two points a round; written to <workspace>/<wf>/draft.md."""
    sources = merge_sources(research_inputs(ctx))
    previous = ctx.previous if isinstance(ctx.previous, dict) else {}
    asked = notes if notes is not None else previous.get("notes")
    parts, addressed = next_parts(asked, sources)
    text = compose(topic, sources, parts)
    path = workflow_dir(ctx, workspace) / "draft.md"
    write_atomically(path, text)
    review = assess(text, topic)
    return {"topic": topic, "version": ctx.iteration, "text": text, "path": str(path), "addressed": addressed, **review}


# -- plan: steps spawned at run time, and the report over them --------------------------------------


@agent.command("plan")
def plan(ctx: Context, goal: str, components: list[str] | None = None, audit: bool = True, **_: Any) -> dict[str, Any]:
    """Spawn the steps that reach the goal as children of this task (research, requirements, one
    implement per component, an audit of what was built); the task ends once they all have."""
    steps = plan_steps(goal, components or components_of(goal), audit)
    for step in steps:
        ctx.spawn(
            step["name"],
            step["command"],
            agent=step["agent"],
            payload=step.get("payload"),
            depends_on=step.get("depends_on", ()),
        )
    listed = [{k: step.get(k, []) for k in ("name", "agent", "command", "depends_on")} for step in steps]
    return {"goal": goal, "steps": listed, "step_count": len(steps)}


@agent.command("plan_report")
def plan_report(ctx: Context, workspace: str | None = None, **_: Any) -> dict[str, Any]:
    """A markdown table of what each planned step returned, from the plan among the inputs and its
    children's results (`ctx.inputs["Plan/NAME"]`); written to <workspace>/<wf>/plan-report.md."""
    plans = [(t, r) for t, r in ctx.inputs.items() if isinstance(r, dict) and isinstance(r.get("steps"), list)]
    if not plans:
        got = ", ".join(ctx.inputs) or "no inputs at all"
        raise ValueError(f"plan_report needs a plan among its inputs (dc's plan result); got: {got}")
    markdown, steps, missing = render_report(plans, ctx.inputs)
    path = workflow_dir(ctx, workspace) / "plan-report.md"
    write_atomically(path, markdown)
    return {"path": str(path), "markdown": markdown, "steps": steps, "missing": missing}
