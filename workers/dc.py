"""dc: merge research results into one markdown requirements document that cites its sources."""

from __future__ import annotations

from typing import Any

from phibroker.agent import Agent, Context

agent = Agent("dc")

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
