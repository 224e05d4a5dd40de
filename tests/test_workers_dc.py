"""dc.synthesize: a cited requirements document from research inputs, and one without any."""

from __future__ import annotations

from typing import Any

from phibroker.runtime.agent import Context
from workers import dc


def ctx(inputs: dict[str, Any]) -> Context:
    return Context(
        workflow_id="wf",
        task="Synthesize",
        unit="Synthesize",
        attempt=1,
        agent="dc",
        command="synthesize",
        inputs=inputs,
    )


def research(topic: str, angle: str | None, *sources: tuple[str, str, int, str]) -> dict[str, Any]:
    items = [{"title": t, "path": p, "score": s, "snippet": n} for t, p, s, n in sources]
    return {"topic": topic, "angle": angle, "sources": items, "source_count": len(items), "summary": "s"}


def test_merges_and_cites_deduplicated_sources() -> None:
    inputs = {
        "A": research(
            "rate limiting",
            "security",
            ("Limits", "/c/limits.md", 9, "Answer 429."),
            ("OWASP", "/c/o.md", 3, "Check authz."),
        ),
        "B": research(
            "rate limiting",
            "performance",
            ("Limits", "/c/limits.md", 12, "Answer 429."),
            ("Cache", "/c/cache.md", 4, "Set a TTL."),
        ),
        "Other": {"exit_code": 0},
    }
    result = dc.synthesize(ctx(inputs), title="Requirements: rate limiting")
    assert [s["path"] for s in result["sources"]] == ["/c/limits.md", "/c/o.md", "/c/cache.md"]
    assert result["sources"][0]["score"] == 12
    document = result["document"]
    assert document.startswith("# Requirements: rate limiting\n")
    assert "- R1: Answer 429. [1]" in document
    assert "- R2: Check authz. [2]" in document
    assert "- R3: Set a TTL. [3]" in document
    assert "1. Limits — `/c/limits.md`" in document and "3. Cache — `/c/cache.md`" in document
    assert result["requirement_count"] == 3
    assert "**A**: rate limiting (security)" in document


def test_mapped_inputs_are_lists_of_results() -> None:
    inputs = {
        "Many": [research("x", None, ("T", "/t.md", 1, "Do x.")), research("x", None, ("U", "/u.md", 1, "Do y."))]
    }
    assert dc.synthesize(ctx(inputs))["requirement_count"] == 2


def test_without_research_it_still_writes_a_document() -> None:
    result = dc.synthesize(ctx({"Build": {"files": []}}))
    assert result["title"] == "Requirements"
    assert result["sources"] == [] and result["requirement_count"] == 0
    assert "No research results with sources" in result["document"]
