"""dc: synthesize (a cited requirements document), draft (revised round by round), plan and plan_report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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


# -- draft: revised round by round ------------------------------------------------------------------


def sources() -> dict[str, Any]:
    return {
        "Research": research(
            "rate limiting",
            None,
            ("Limits", "/c/limits.md", 9, "Answer 429 with Retry-After."),
            ("Buckets", "/c/buckets.md", 5, "Refill a token bucket at a steady rate."),
        )
    }


def draft_round(inputs: dict[str, Any], previous: Any, tmp_path: Path, **payload: Any) -> dict[str, Any]:
    iteration = previous["version"] + 1 if previous else 1
    context = ctx(inputs)
    context.iteration, context.previous = iteration, previous
    return dc.draft(context, topic="rate limiting", workspace=str(tmp_path), **payload)


def test_draft_starts_small_and_each_revision_fixes_the_first_note(tmp_path: Path) -> None:
    versions = [draft_round(sources(), None, tmp_path)]
    while versions[-1]["notes"]:
        versions.append(draft_round(sources(), versions[-1], tmp_path))
    assert [v["score"] for v in versions] == [4, 6, 8, 10]
    assert [v["version"] for v in versions] == [1, 2, 3, 4]
    assert versions[0]["addressed"] is None and versions[0]["text"].startswith("# Rate limiting\n\nThis note explains")
    assert versions[1]["addressed"] == versions[0]["notes"][0] and "## Limits" in versions[1]["text"]
    assert "[2]" in versions[2]["text"] and "2. Buckets — `/c/buckets.md`" in versions[2]["text"]
    assert versions[3]["criteria"] == dict.fromkeys(
        ("title", "introduction", "sections", "citations", "conclusion"), True
    )
    assert Path(versions[3]["path"]).read_text(encoding="utf-8") == versions[3]["text"]


def test_draft_without_sources_cannot_cite_and_says_so(tmp_path: Path) -> None:
    versions = [draft_round({}, None, tmp_path)]
    for _ in range(5):
        versions.append(draft_round({}, versions[-1], tmp_path))
    assert [v["score"] for v in versions] == [4, 6, 8, 8, 8, 8]  # no sources: no citations, the rest is done
    assert [n.split()[0] for n in versions[-1]["notes"]] == ["cite"]


def test_draft_follows_a_reviewers_notes_from_the_payload(tmp_path: Path) -> None:
    first = draft_round(sources(), None, tmp_path)
    only_conclusion = [n for n in first["notes"] if "Conclusion" in n]
    revised = draft_round(sources(), first, tmp_path, notes=only_conclusion)
    assert revised["addressed"] == only_conclusion[0] and "## Conclusion" in revised["text"]
    assert revised["criteria"]["conclusion"] and revised["criteria"]["sections"]  # not asked for: kept


# -- plan and plan_report ---------------------------------------------------------------------------


def test_plan_spawns_research_requirements_one_build_per_component_and_an_audit() -> None:
    context = ctx({})
    result = dc.plan(context, goal="an orders API and an admin UI")
    names = [s["name"] for s in context.spawns]
    assert names == ["research", "requirements", "implement_orders_api", "implement_admin_ui", "audit"]
    by_name = {s["name"]: s for s in context.spawns}
    assert by_name["research"] == {
        "name": "research",
        "agent": "webc",
        "command": "research",
        "payload": {"topic": "an orders API and an admin UI"},
    }
    assert by_name["implement_admin_ui"]["depends_on"] == ["requirements"]
    assert by_name["implement_admin_ui"]["payload"] == {"component": "admin UI"}
    assert by_name["audit"]["depends_on"] == ["implement_orders_api", "implement_admin_ui"]
    assert result["step_count"] == 5 and result["steps"][4]["agent"] == "kalic"


def test_plan_takes_components_from_its_payload_and_may_skip_the_audit() -> None:
    context = ctx({})
    dc.plan(context, goal="billing", components=["api", "API", "worker"], audit=False)
    assert [s["name"] for s in context.spawns] == ["research", "requirements", "implement_api", "implement_worker"]


def test_plan_report_reads_each_childs_result_and_names_the_missing(tmp_path: Path) -> None:
    planned = dc.plan(ctx({}), goal="orders API")
    inputs = {
        "Plan": planned,
        "Plan/research": {"topic": "orders API", "source_count": 5, "summary": "x" * 200},
        "Plan/requirements": {"requirement_count": 3},
        "Plan/implement_orders_api": {"release": "orders-api-1a2b", "files": ["a.py"]},
    }
    result = dc.plan_report(ctx(inputs), workspace=str(tmp_path))
    assert result["steps"]["Plan/research"] == "topic: orders API · source_count: 5"  # long text left out
    assert result["steps"]["Plan/implement_orders_api"] == "release: orders-api-1a2b"
    assert result["missing"] == ["Plan/audit"]
    markdown = Path(result["path"]).read_text(encoding="utf-8")
    assert markdown == result["markdown"] and markdown.startswith("# Plan report: orders API\n")
    assert "| `Plan/audit` | kalic security_audit | _no result_ |" in markdown


def test_plan_report_without_a_plan_fails() -> None:
    with pytest.raises(ValueError, match="needs a plan among its inputs.*got: Research"):
        dc.plan_report(ctx(sources()))


def test_draft_with_one_source_pads_the_body_and_cannot_cite(tmp_path: Path) -> None:
    one = {"Research": research("rate limiting", None, ("Limits", "/c/limits.md", 9, "Answer 429."))}
    versions = [draft_round(one, None, tmp_path)]
    for _ in range(4):
        versions.append(draft_round(one, versions[-1], tmp_path))
    assert versions[-1]["score"] == 8 and versions[-1]["criteria"]["citations"] is False
    assert "## Limits" in versions[-1]["text"] and "## What rate limiting needs" in versions[-1]["text"]
