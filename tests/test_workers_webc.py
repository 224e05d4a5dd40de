"""webc.research: ranking over the shipped corpus and a crafted one, and its failure on no match."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from phibroker.runtime.agent import Context
from workers import webc


def ctx() -> Context:
    return Context(workflow_id="wf", task="Research", unit="Research", attempt=1, agent="webc", command="research")


@pytest.mark.parametrize(
    ("topic", "angle"),
    [
        ("OAuth2 best practices", None),
        ("API rate limiting", "design patterns"),
        ("API rate limiting", "security"),
        ("API rate limiting", "performance"),
        ("user profiles", None),
        ("GraphQL", None),
    ],
)
def test_example_topics_find_at_least_two_sources(topic: str, angle: str | None) -> None:
    result = webc.research(ctx(), topic=topic, angle=angle, depth="comprehensive")
    assert result["source_count"] >= 2
    assert result["source_count"] == len(result["sources"])
    scores = [s["score"] for s in result["sources"]]
    assert scores == sorted(scores, reverse=True)
    assert all(s["snippet"] and Path(s["path"]).is_file() for s in result["sources"])
    assert result["topic"] == topic and result["angle"] == angle and result["summary"]


def test_shipped_corpus_is_sized_as_promised() -> None:
    notes = sorted(webc.SHIPPED_CORPUS.glob("*.md"))
    assert 8 <= len(notes) <= 12
    assert all(15 <= len(n.read_text().splitlines()) <= 40 for n in notes)


def test_depth_caps_the_sources() -> None:
    standard = webc.research(ctx(), topic="API rate limiting")
    deep = webc.research(ctx(), topic="API rate limiting", depth="comprehensive")
    assert standard["source_count"] == 5
    assert 5 < deep["source_count"] <= 8


def test_title_matches_weigh_more_and_stop_words_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Caching\n\nThe the the of of of. Caching helps.\n")
    (tmp_path / "b.md").write_text("# Notes\n\nCaching here. Caching there.\n")
    (tmp_path / "c.md").write_text("# Other\n\nNothing relevant, of the and.\n")
    result = webc.research(ctx(), topic="the caching", corpus=str(tmp_path))
    assert [s["title"] for s in result["sources"]] == ["Caching", "Notes"]
    assert [s["score"] for s in result["sources"]] == [webc.TITLE_WEIGHT + 1, 2]


def test_corpus_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "only.md").write_text("# Zebra crossings\n\n- Zebras cross here.\n")
    monkeypatch.setenv(webc.CORPUS_ENV, str(tmp_path))
    result = webc.research(ctx(), topic="zebra")
    assert result["sources"][0]["snippet"] == "Zebras cross here."


def test_no_match_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no source in .* mentions 'quantum basket weaving'"):
        webc.research(ctx(), topic="quantum basket weaving")


def test_missing_corpus_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        webc.research(ctx(), topic="x", corpus=str(tmp_path / "nope"))


def test_execute_packs_a_small_result() -> None:
    outcome = webc.agent.execute("research", ctx(), {"topic": "GraphQL"}, limit=1 << 20)
    assert outcome.ok and outcome.value is not None and len(outcome.value) < 100_000
    assert msgpack.unpackb(outcome.value)["source_count"] >= 2
    failed = webc.agent.execute("research", ctx(), {"topic": "xyzzy"}, limit=1 << 20)
    assert not failed.ok and failed.error is not None and failed.error["type"] == "ValueError"
