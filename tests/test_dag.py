"""Tests for phibroker.dag: unit cases, hypothesis properties on random graphs, and a 100k-task smoke run."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phibroker.errors import CycleError
from phibroker.workflow.dag import (
    STATE_COLOURS,
    Deps,
    ancestors,
    critical_path,
    dependents,
    find_cycle,
    levels,
    ready,
    to_dot,
    to_mermaid,
    topological_order,
)

DIAMOND: Deps = {"A": [], "B": ["A"], "C": ["A"], "D": ["B", "C"]}


# --- strategies ------------------------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn, max_size: int = 12) -> dict[str, list[str]]:
    """A random DAG: node i may only depend on nodes < i, then the declaration order is shuffled."""
    n = draw(st.integers(0, max_size))
    names = [f"t{i}" for i in range(n)]
    deps = {
        names[i]: [names[j] for j in draw(st.lists(st.integers(0, i - 1), unique=True, max_size=4))] if i else []
        for i in range(n)
    }
    order = draw(st.permutations(names))
    return {name: deps[name] for name in order}


@st.composite
def cyclic_graphs(draw: st.DrawFn) -> dict[str, list[str]]:
    """A random graph with at least one cycle: random edges plus a forced loop through some nodes."""
    n = draw(st.integers(1, 10))
    names = [f"t{i}" for i in range(n)]
    deps: dict[str, list[str]] = {
        name: draw(st.lists(st.sampled_from(names), unique=True, max_size=3)) for name in names
    }
    loop = draw(st.lists(st.sampled_from(names), min_size=1, max_size=n, unique=True))
    for a, b in pairwise([*loop, loop[0]]):
        if b not in deps[a]:
            deps[a].append(b)
    order = draw(st.permutations(names))
    return {name: deps[name] for name in order}


def all_ancestors(deps: Deps, task: str) -> set[str]:
    """Reference implementation for the properties (small graphs only)."""
    out: set[str] = set()
    todo = list(deps[task])
    while todo:
        dep = todo.pop()
        if dep not in out:
            out.add(dep)
            todo.extend(deps[dep])
    return out


def all_paths_weights(deps: Deps, weight: dict[str, float]) -> list[float]:
    """Weight of every root-to-sink path, by brute force (small graphs only)."""
    users = dependents(deps)
    out: list[float] = []
    todo = [([task], weight[task]) for task, needs in deps.items() if not needs]
    while todo:
        path, total = todo.pop()
        if not users[path[-1]]:
            out.append(total)
        for user in users[path[-1]]:
            todo.append(([*path, user], total + weight[user]))
    return out


# --- unit tests ------------------------------------------------------------------------------------------


def test_diamond() -> None:
    assert topological_order(DIAMOND) == ["A", "B", "C", "D"]
    assert levels(DIAMOND) == [["A"], ["B", "C"], ["D"]]
    assert find_cycle(DIAMOND) is None
    assert critical_path(DIAMOND) == (["A", "B", "D"], 3.0)
    assert critical_path(DIAMOND, {"C": 5.0}) == (["A", "C", "D"], 7.0)


def test_topological_order_prefers_declaration_order_among_ready_tasks() -> None:
    deps = {"deploy": ["build", "test"], "test": ["build"], "docs": [], "build": []}
    assert topological_order(deps) == ["docs", "build", "test", "deploy"]


def test_self_loop() -> None:
    deps = {"A": [], "B": ["B"]}
    assert find_cycle(deps) == ["B", "B"]
    with pytest.raises(CycleError) as info:
        topological_order(deps)
    assert info.value.path == ["B", "B"]


def test_cycle_message_reads_in_dependency_direction() -> None:
    deps = {"A": ["B"], "B": ["C"], "C": ["A"]}
    assert find_cycle(deps) == ["A", "B", "C", "A"]
    with pytest.raises(CycleError, match=r"^dependency cycle: A -> B -> C -> A$"):
        topological_order(deps)
    for analysis in (levels, critical_path):
        with pytest.raises(CycleError, match=r"^dependency cycle: A -> B -> C -> A$"):
            analysis(deps)


def test_find_cycle_reports_the_first_cycle_in_declaration_order() -> None:
    deps = {"X": [], "P": ["Q"], "Q": ["P"], "A": ["B"], "B": ["A"]}
    assert find_cycle(deps) == ["P", "Q", "P"]


def test_empty_graph() -> None:
    assert topological_order({}) == []
    assert levels({}) == []
    assert critical_path({}) == ([], 0.0)
    assert find_cycle({}) is None
    assert dependents({}) == {}


def test_critical_path_ends_at_a_sink_even_with_zero_weights() -> None:
    deps = {"A": [], "B": ["A"]}
    assert critical_path(deps, {"B": 0.0}) == (["A", "B"], 1.0)


def test_critical_path_ties_go_to_declaration_order() -> None:
    deps = {"A": [], "B": [], "C": ["A", "B"], "D": ["B"]}
    assert critical_path(deps) == (["A", "C"], 2.0)


def test_ready_with_partial_progress() -> None:
    assert ready(DIAMOND, finished=[]) == ["A"]
    assert ready(DIAMOND, finished={"A"}) == ["B", "C"]
    assert ready(DIAMOND, finished={"A"}, started={"B"}) == ["C"]
    assert ready(DIAMOND, finished={"A", "B"}) == ["C"]
    assert ready(DIAMOND, finished={"A", "B", "C"}) == ["D"]
    assert ready(DIAMOND, finished={"A", "B", "C", "D"}) == []


def test_dependents() -> None:
    assert dependents(DIAMOND) == {"A": ["B", "C"], "B": ["D"], "C": ["D"], "D": []}


def test_ancestors() -> None:
    assert ancestors(DIAMOND, "D") == {"A", "B", "C"}
    assert ancestors(DIAMOND, "B") == {"A"}
    assert ancestors(DIAMOND, "A") == set()


SMALL: Deps = {"Research": [], "Implement": ["Research"], "Review": ["Implement", "Research"]}
SMALL_LABELS = {"Research": "webc · research", "Implement": "coder · implement"}
SMALL_SIDE = [("Review", "sub:page_oncall", "on failure")]


def test_to_dot() -> None:
    assert to_dot(SMALL, "ship", SMALL_LABELS, SMALL_SIDE) == (
        'digraph "ship" {\n'
        "    rankdir=LR;\n"
        "    node [shape=box, style=rounded];\n"
        '    "Research" [label="Research\\nwebc · research"];\n'
        '    "Implement" [label="Implement\\ncoder · implement"];\n'
        '    "Review";\n'
        '    "sub:page_oncall" [shape=note];\n'
        '    "Research" -> "Implement";\n'
        '    "Implement" -> "Review";\n'
        '    "Research" -> "Review";\n'
        '    "Review" -> "sub:page_oncall" [style=dashed, label="on failure"];\n'
        "}\n"
    )


def test_to_dot_defaults() -> None:
    assert (
        to_dot({"a": []})
        == 'digraph "workflow" {\n    rankdir=LR;\n    node [shape=box, style=rounded];\n    "a";\n}\n'
    )


def test_to_mermaid() -> None:
    assert to_mermaid(SMALL, SMALL_LABELS, SMALL_SIDE) == (
        "flowchart LR\n"
        '    Research["Research<br/>webc · research"]\n'
        '    Implement["Implement<br/>coder · implement"]\n'
        '    Review["Review"]\n'
        '    sub_page_oncall>"sub:page_oncall"]\n'
        "    Research --> Implement\n"
        "    Implement --> Review\n"
        "    Research --> Review\n"
        '    Review -.->|"on failure"| sub_page_oncall\n'
    )


def test_to_mermaid_ids_for_unsafe_names() -> None:
    deps = {"fetch.data": [], "fetch-data": ["fetch.data"], "fetch_data": [], "end": ["fetch_data"]}
    assert to_mermaid(deps) == (
        "flowchart LR\n"
        '    fetch_data_2["fetch.data"]\n'
        '    fetch_data_3["fetch-data"]\n'
        '    fetch_data["fetch_data"]\n'
        '    end_2["end"]\n'
        "    fetch_data_2 --> fetch_data_3\n"
        "    fetch_data --> end_2\n"
    )


SMALL_STATES = {"Research": "succeeded", "Implement": "failed", "Review": "skipped"}


def test_to_dot_of_a_run_fills_each_task_with_its_state() -> None:
    assert to_dot(SMALL, "ship", SMALL_LABELS, states=SMALL_STATES) == (
        'digraph "ship" {\n'
        "    rankdir=LR;\n"
        '    node [shape=box, style="rounded,filled", fillcolor="white"];\n'
        '    "Research" [label="Research\\nwebc · research\\nsucceeded", fillcolor="#b2f2bb"];\n'
        '    "Implement" [label="Implement\\ncoder · implement\\nfailed", fillcolor="#ffa8a8"];\n'
        '    "Review" [label="Review\\nskipped", fillcolor="#dee2e6"];\n'
        '    "Research" -> "Implement";\n'
        '    "Implement" -> "Review";\n'
        '    "Research" -> "Review";\n'
        "}\n"
    )


def test_to_mermaid_of_a_run_puts_each_task_in_its_state_class() -> None:
    states = {**SMALL_STATES, "Review": "succeeded"}
    assert to_mermaid(SMALL, SMALL_LABELS, SMALL_SIDE, states=states) == (
        "flowchart LR\n"
        '    Research["Research<br/>webc · research<br/>succeeded"]\n'
        '    Implement["Implement<br/>coder · implement<br/>failed"]\n'
        '    Review["Review<br/>succeeded"]\n'
        '    sub_page_oncall>"sub:page_oncall"]\n'
        "    Research --> Implement\n"
        "    Implement --> Review\n"
        "    Research --> Review\n"
        '    Review -.->|"on failure"| sub_page_oncall\n'
        "    classDef succeeded fill:#b2f2bb,stroke:#495057\n"
        "    class Research,Review succeeded\n"
        "    classDef failed fill:#ffa8a8,stroke:#495057\n"
        "    class Implement failed\n"
    )


def test_every_task_state_has_its_own_colour() -> None:
    task_states = ["pending", "ready", "running", "retrying", "succeeded", "failed", "skipped", "cancelled"]
    assert set(STATE_COLOURS) == {*task_states, "upstream_failed", "compensated", "cancelling"}
    assert len(set(STATE_COLOURS.values())) == len(STATE_COLOURS)


def test_a_task_missing_from_the_states_is_drawn_as_unknown() -> None:
    assert '"b" [label="b\\nunknown"];' in to_dot({"a": [], "b": ["a"]}, states={"a": "running"})
    assert 'b["b<br/>unknown"]' in to_mermaid({"a": [], "b": ["a"]}, states={"a": "running"})


# --- properties ------------------------------------------------------------------------------------------


@given(dags())
def test_topological_order_respects_every_edge(deps: dict[str, list[str]]) -> None:
    order = topological_order(deps)
    assert sorted(order) == sorted(deps)
    position = {task: i for i, task in enumerate(order)}
    for task, needs in deps.items():
        for dep in needs:
            assert position[dep] < position[task]
    assert find_cycle(deps) is None


@given(dags())
def test_topological_order_takes_the_earliest_declared_ready_task(deps: dict[str, list[str]]) -> None:
    declared = {task: i for i, task in enumerate(deps)}
    placed: set[str] = set()
    for task in topological_order(deps):
        ready_now = [t for t, needs in deps.items() if t not in placed and placed.issuperset(needs)]
        assert task == min(ready_now, key=declared.__getitem__)
        placed.add(task)


@given(dags())
def test_levels_partition_the_tasks_by_longest_chain(deps: dict[str, list[str]]) -> None:
    result = levels(deps)
    flat = [task for level in result for task in level]
    assert sorted(flat) == sorted(deps)
    assert all(result), "no empty level"
    declared = list(deps)
    level_of = {task: i for i, level in enumerate(result) for task in level}
    for i, level in enumerate(result):
        assert level == [task for task in declared if task in level]
        members = set(level)
        for task in level:
            assert not members & all_ancestors(deps, task)
            assert all(level_of[dep] < i for dep in deps[task])
            assert i == (max((level_of[dep] for dep in deps[task]), default=-1) + 1)


@given(cyclic_graphs())
def test_find_cycle_returns_a_real_cycle(deps: dict[str, list[str]]) -> None:
    cycle = find_cycle(deps)
    assert cycle is not None
    assert len(cycle) >= 2 and cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1, "a simple cycle"
    for task, dep in pairwise(cycle):
        assert dep in deps[task], f"{task} -> {dep} means {task} depends on {dep}"
    with pytest.raises(CycleError) as info:
        topological_order(deps)
    assert info.value.path == cycle
    with pytest.raises(CycleError):
        levels(deps)


@given(dags(max_size=9), st.data())
def test_critical_path_is_the_heaviest_root_to_sink_path(deps: dict[str, list[str]], data: st.DataObject) -> None:
    estimates = {
        task: float(data.draw(st.integers(0, 20))) for task in deps if data.draw(st.booleans(), label="estimated")
    }
    weight = {task: estimates.get(task, 1.0) for task in deps}
    path, total = critical_path(deps, estimates)
    if not deps:
        assert (path, total) == ([], 0.0)
        return
    assert not deps[path[0]], "starts at a root"
    assert not any(path[-1] in needs for needs in deps.values()), "ends at a sink"
    for dep, task in pairwise(path):
        assert dep in deps[task]
    assert total == pytest.approx(sum(weight[task] for task in path))
    assert total >= max(weight.values())
    assert total == pytest.approx(max(all_paths_weights(deps, weight)))


@given(dags())
def test_dependents_and_ancestors_agree_with_deps(deps: dict[str, list[str]]) -> None:
    users = dependents(deps)
    assert list(users) == list(deps)
    for task, needs in deps.items():
        for dep in needs:
            assert task in users[dep]
        assert ancestors(deps, task) == all_ancestors(deps, task)
    declared = list(deps)
    for dep, tasks in users.items():
        assert tasks == [task for task in declared if dep in deps[task]]


@given(dags(), st.data())
def test_ready_tasks_have_all_deps_finished(deps: dict[str, list[str]], data: st.DataObject) -> None:
    finished = set(data.draw(st.lists(st.sampled_from(sorted(deps)), unique=True)) if deps else [])
    for task in ready(deps, finished):
        assert task not in finished
        assert set(deps[task]) <= finished


# --- scale -----------------------------------------------------------------------------------------------


def big_dag(n: int, shuffle: bool) -> dict[str, list[str]]:
    """n tasks, each depending on 3 random earlier ones; optionally declared in a random order."""
    rng = random.Random(42)
    names = [f"task_{i}" for i in range(n)]
    deps = {names[i]: [names[j] for j in rng.sample(range(i), min(3, i))] for i in range(n)}
    if shuffle:
        rng.shuffle(names)
        deps = {name: deps[name] for name in names}
    return deps


@pytest.mark.parametrize("shuffle", [False, True])
def test_100k_tasks_do_not_recurse(shuffle: bool) -> None:
    deps = big_dag(100_000, shuffle)
    order = topological_order(deps)
    assert len(order) == len(deps)
    assert sum(map(len, levels(deps))) == len(deps)
    path, total = critical_path(deps)
    assert total == len(path)
    assert find_cycle(deps) is None


@pytest.mark.parametrize("shuffle", [False, True])
def test_100k_deep_chain(shuffle: bool) -> None:
    names = [f"t{i}" for i in range(100_000)]
    deps = {name: ([names[i - 1]] if i else []) for i, name in enumerate(names)}
    if shuffle:
        deps = dict(reversed(deps.items()))
    assert topological_order(deps) == names
    assert len(levels(deps)) == len(names)
    assert critical_path(deps) == (names, 100_000.0)
    assert find_cycle(deps) is None
    assert len(ancestors(deps, names[-1])) == len(names) - 1
    deps[names[0]] = [names[-1]]
    cycle = find_cycle(deps)
    assert cycle is not None and len(cycle) == len(names) + 1
