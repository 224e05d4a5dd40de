"""webc: research a topic in a local corpus of markdown notes; nothing reaches the internet.

Scoring is plain term frequency over lowercase word tokens (stop words dropped, a trailing plural `s`
stripped), with title matches weighing more, so a ranking can be explained by reading the notes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phibroker.runtime.agent import Agent, Context

agent = Agent("webc")

CORPUS_ENV = "PHIBROKER_CORPUS"
SHIPPED_CORPUS = Path(__file__).parent / "corpus"
TITLE_WEIGHT = 3
SNIPPET_CHARS = 240
STOP_WORDS = frozenset(
    """a about above after again all also an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers how i if in into is it its just me more most my no nor not now of off on once only or other our
    out over own same she should so some such than that the their them then there these they this those
    through to too under until up very was we were what when where which while who whom why will with would
    you your""".split()
)


@dataclass
class Note:
    title: str
    path: Path
    lines: list[str]
    title_terms: Counter[str]
    body_terms: Counter[str]


def terms(text: str) -> list[str]:
    """Lowercase word tokens without stop words; `practices` and `practice` count as one term."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [_stem(word) for word in words if word not in STOP_WORDS]


def _stem(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def corpus_dir(corpus: str | None = None) -> Path:
    """The payload's `corpus`, else $PHIBROKER_CORPUS, else the notes shipped with this package."""
    chosen = corpus or os.environ.get(CORPUS_ENV)
    return Path(chosen).expanduser() if chosen else SHIPPED_CORPUS


def load_notes(folder: Path) -> list[Note]:
    """Every `*.md` under folder; the first `# ` heading is the title, else the file name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {str(folder)!r} does not exist")
    notes = []
    for path in sorted(folder.rglob("*.md")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        title = next((line[2:].strip() for line in lines if line.startswith("# ")), path.stem)
        body = [line for line in lines if not line.startswith("# ")]
        notes.append(Note(title, path, lines, Counter(terms(title)), Counter(terms("\n".join(body)))))
    return notes


def score(note: Note, query: list[str]) -> int:
    """Occurrences of the query terms in the body, plus TITLE_WEIGHT times those in the title."""
    return sum(note.body_terms[t] + TITLE_WEIGHT * note.title_terms[t] for t in set(query))


@dataclass
class Block:
    """A bullet item or a paragraph (wrapped lines joined) and the `##` heading it sits under."""

    text: str
    bullet: bool
    heading: str


def blocks(lines: list[str]) -> list[Block]:
    found: list[Block] = []
    current: list[str] = []
    bullet, heading = False, ""
    for line in [*lines, ""]:
        item = re.match(r"^\s*(?:[-*]|\d+\.)\s+(.*)", line)
        if item or not line.strip() or line.startswith("#"):
            if current:
                found.append(Block(" ".join(current), bullet, heading))
            current, bullet = ([item.group(1).strip()], True) if item else ([], False)
            if line.startswith("## "):
                heading = line.lstrip("#").strip()
        else:
            current.append(line.strip())
    return found


def snippet(note: Note, query: list[str]) -> str:
    """The block whose text and heading mention the most distinct query terms (bullets win ties, being
    advice); the note's first paragraph when the terms only occur in its title."""
    wanted = set(query)
    found = blocks(note.lines)
    best, best_rank = (found[0].text if found else ""), (0, False)
    for block in found:
        rank = (len(wanted & set(terms(f"{block.heading} {block.text}"))), block.bullet)
        if rank[0] and rank > best_rank:
            best, best_rank = block.text, rank
    return shorten(best)


def shorten(text: str, limit: int = SNIPPET_CHARS) -> str:
    """At most limit characters, cut after a whole sentence when one fits."""
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > 0 else text[: limit - 1].rstrip() + "…"


def summarise(topic: str, angle: str | None, sources: list[dict[str, Any]], total: int) -> str:
    subject = f"{topic!r} ({angle})" if angle else repr(topic)
    titles = "; ".join(s["title"] for s in sources[:3])
    return f"{len(sources)} of {total} notes cover {subject}. Most relevant: {titles}. {sources[0]['snippet']}"


@agent.command("research")
def research(
    ctx: Context,
    topic: str,
    depth: str = "standard",
    angle: str | None = None,
    corpus: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Rank the corpus notes for the topic (and angle); fails when no note mentions the topic at all."""
    folder = corpus_dir(corpus)
    notes = load_notes(folder)
    topic_terms = terms(topic)
    if not topic_terms:
        raise ValueError(f"topic {topic!r} has no searchable words")
    if not any(score(note, topic_terms) for note in notes):
        raise ValueError(f"no source in {folder} mentions {topic!r}")
    query = topic_terms + terms(angle or "")
    ranked = sorted(((score(n, query), n) for n in notes), key=lambda pair: (-pair[0], str(pair[1].path)))
    limit = 8 if depth == "comprehensive" else 5
    sources = [
        {"title": note.title, "path": str(note.path), "score": points, "snippet": snippet(note, query)}
        for points, note in ranked[:limit]
        if points > 0 and score(note, topic_terms) > 0
    ]
    return {
        "topic": topic,
        "angle": angle,
        "sources": sources,
        "source_count": len(sources),
        "summary": summarise(topic, angle, sources, len(notes)),
    }
