"""A short article and the rubric that reviews it: dc's `draft` writes, kalic's `review` scores.

Both sides are plain text rules, so a run can be explained by reading this file: the rubric has five
criteria worth two points each, and the writer fixes one criterion per revision, in the rubric's
order, the way a careful writer works through a reviewer's notes from the top.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIN_SECTIONS = 2
MIN_CITATIONS = 2
MAX_SECTIONS = 4


@dataclass(frozen=True)
class Criterion:
    name: str
    note: str  # what the reviewer asks for when the draft misses it
    met: Callable[[str, str], bool]  # (text, topic) -> whether the draft meets it


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _has_title(text: str, topic: str) -> bool:
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    return first.startswith("# ") and _words(topic) <= _words(first)


def _has_introduction(text: str, topic: str) -> bool:
    body = [p for p in _paragraphs(text) if not p.startswith("#")]
    return bool(body) and len(body[0].split()) >= 12 and (not _words(topic) or bool(_words(topic) & _words(body[0])))


def _sections(text: str) -> list[str]:
    """The `## ` headings with at least one line of text under them (References and Conclusion aside)."""
    found = re.findall(r"^## (.+)\n+(?!#)\S", text, re.M)
    return [h for h in found if h.strip() not in ("References", "Conclusion")]


def _cited(text: str) -> bool:
    numbers = set(re.findall(r"\[(\d+)\]", text))
    references = text.split("\n## References\n", 1)
    listed = set(re.findall(r"^(\d+)\. ", references[1], re.M)) if len(references) == 2 else set()
    return len(numbers & listed) >= MIN_CITATIONS


def _concluded(text: str) -> bool:
    return bool(re.search(r"^## Conclusion\n+(?!#)\S", text, re.M))


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 1}


RUBRIC = (
    Criterion("title", "give the draft a `# ` title that names the topic", _has_title),
    Criterion("introduction", "open with a paragraph of a dozen words or more that names the topic", _has_introduction),
    Criterion(
        "sections",
        f"organise the body in at least {MIN_SECTIONS} `## ` sections",
        lambda t, _: len(_sections(t)) >= MIN_SECTIONS,
    ),
    Criterion(
        "citations",
        f"cite at least {MIN_CITATIONS} sources as [n] and list them under `## References`",
        lambda t, _: _cited(t),
    ),
    Criterion("conclusion", "end with a `## Conclusion` that says what to do", lambda t, _: _concluded(t)),
)
POINTS = 10 // len(RUBRIC)


def assess(text: str, topic: str = "") -> dict[str, Any]:
    """The review: a score out of 10 (two points a criterion met), a note for each criterion missed."""
    met = {c.name: c.met(text, topic) for c in RUBRIC}
    return {
        "score": POINTS * sum(met.values()),
        "criteria": met,
        "notes": [c.note for c in RUBRIC if not met[c.name]],
        "words": len(text.split()),
    }


def can_cite(sources: list[dict[str, Any]]) -> bool:
    return len(sources[:MAX_SECTIONS]) >= MIN_CITATIONS


def next_parts(previous_notes: list[str] | None, sources: list[dict[str, Any]]) -> tuple[set[str], str | None]:
    """What the next version holds, and the note it addresses: everything the reviewer did not ask for,
    plus the first thing it asked that the writer can do (citing needs sources). With no review yet, a
    first draft: a title and an introduction."""
    if previous_notes is None:
        return {"title", "introduction"}, None
    asked = [c.name for c in RUBRIC if c.note in previous_notes]
    doable = [name for name in asked if name != "citations" or can_cite(sources)]
    kept = {c.name for c in RUBRIC} - set(asked)
    if not doable:
        return kept, None
    note = next(c.note for c in RUBRIC if c.name == doable[0])
    return kept | {doable[0]}, note


def unsourced_sections(topic: str) -> list[dict[str, Any]]:
    """The body when no research came in: what to settle first, and how to check it."""
    return [
        {"title": f"What {topic} needs", "snippet": f"List the requirements of {topic} with the people who use it."},
        {"title": "How to check it", "snippet": "Write one test per requirement before writing the code."},
    ]


def compose(topic: str, sources: list[dict[str, Any]], parts: set[str]) -> str:
    """The article with the parts asked for, built from the research sources (title and snippet each)."""
    used = sources[:MAX_SECTIONS]
    lines: list[str] = []
    if "title" in parts:
        lines += [f"# {topic[:1].upper()}{topic[1:]}", ""]
    if "introduction" in parts:
        titles = ", ".join(str(s.get("title")) for s in used[:3]) or "what the team already knows"
        lines += [f"This note explains {topic} for the team that builds it, drawing on {titles}.", ""]
    else:
        lines += [f"Notes on {topic}.", ""]
    cite = "citations" in parts and can_cite(sources)
    if "sections" in parts:
        padding = unsourced_sections(topic)[: max(0, MIN_SECTIONS - len(used))]
        for number, source in enumerate(used + padding, 1):
            snippet = str(source.get("snippet") or "")
            lines += [f"## {source.get('title')}", "", snippet + (f" [{number}]" if cite else ""), ""]
    elif used:
        lines += [" ".join(str(s.get("snippet") or "") for s in used[:2]).strip(), ""]
    if "conclusion" in parts:
        lines += [
            "## Conclusion",
            "",
            f"Apply these points to {topic} in this order, and review them again after each release.",
            "",
        ]
    if cite:
        lines += ["## References", ""]
        lines += [f"{n}. {s.get('title')} — `{s.get('path', '')}`" for n, s in enumerate(used, 1)] + [""]
    return "\n".join(lines).rstrip() + "\n"
