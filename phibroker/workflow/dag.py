"""Workflow graph algorithms (order, levels, cycles, critical path, drawings), kept pure so they are fast and
testable without Redis. Iterative and O(V+E): workflows can have 100k tasks in chains as deep."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from heapq import heappop, heappush
from itertools import chain, filterfalse

from phibroker.errors import CycleError

Deps = Mapping[str, Sequence[str]]
"""Task name -> names of the tasks it depends on; iteration order is the file's declaration order."""

SideEdge = tuple[str, str, str]
"""(source, target, label): an extra dashed edge; its ends may be non-task nodes such as "sub:page_oncall"."""


def _declared_in_order(deps: Deps) -> bool:
    """Whether every task is declared after all its dependencies: the common case, checked cheaply."""
    seen: set[str] = set()
    for task, needs in deps.items():
        if not seen.issuperset(needs):
            return False
        seen.add(task)
    return True


def _depth_first(deps: Deps) -> tuple[list[str], list[str] | None]:
    """Tasks in depth-first post-order (so dependencies first), or as far as it got and the first cycle met.

    Roots are taken in declaration order and each task's deps in listed order, so the result is
    deterministic. Iterative (an explicit stack of iterators): chains can be 100k tasks deep.
    """
    on_path: dict[str, bool] = {}  # True while the task is on the current path, False once finished
    postorder: list[str] = []
    for root in deps:
        if root in on_path:
            continue
        on_path[root] = True
        path = [root]
        stack = [iter(deps[root])]
        while stack:
            for dep in stack[-1]:
                state = on_path.get(dep)
                if state is None:
                    on_path[dep] = True
                    path.append(dep)
                    stack.append(iter(deps[dep]))
                    break
                if state:
                    return postorder, path[path.index(dep) :] + [dep]
            else:
                task = path.pop()
                on_path[task] = False
                postorder.append(task)
                stack.pop()
    return postorder, None


def _dependencies_first(deps: Deps) -> list[str]:
    """Some topological order, the cheapest to get when declaration order is not one. Raises CycleError."""
    order, cycle = _depth_first(deps)
    if cycle:
        raise CycleError(cycle)
    return order


def find_cycle(deps: Deps) -> list[str] | None:
    """A dependency cycle as a closed path, or None, so an error can show the user exactly what loops.

    `[A, B, C, A]` reads "A depends on B, B depends on C, C depends on A" (the same direction as
    `deps`). The cycle reported is the first one a depth-first search meets when it starts from tasks
    in declaration order and follows each task's dependencies in the order they are listed.
    A self-dependency gives `[A, A]`.
    """
    if _declared_in_order(deps):
        return None
    return _depth_first(deps)[1]


def topological_order(deps: Deps) -> list[str]:
    """Every task after its dependencies, in a deterministic order a user can predict.

    Next is always the earliest-declared task whose dependencies are all placed (Kahn's algorithm with a
    heap), so a file that already declares dependencies first comes back in exactly its own order.
    Raises CycleError with `find_cycle`'s path on a cycle.
    """
    if _declared_in_order(deps):
        return list(deps)
    names = list(deps)
    position = {name: i for i, name in enumerate(names)}
    unmet = [len(needs) for needs in deps.values()]
    users: list[list[int]] = [[] for _ in names]
    for i, needs in enumerate(deps.values()):
        for dep in needs:
            users[position[dep]].append(i)
    heap = [i for i, count in enumerate(unmet) if not count]  # ascending, so already a heap
    order: list[str] = []
    while heap:
        i = heappop(heap)
        order.append(names[i])
        for user in users[i]:
            unmet[user] -= 1
            if not unmet[user]:
                heappush(heap, user)
    if len(order) < len(names):
        cycle = find_cycle(deps)
        assert cycle is not None, "some task never became ready, so there is a cycle"
        raise CycleError(cycle)
    return order


def levels(deps: Deps) -> list[list[str]]:
    """What can run in parallel: level 0 has no deps, a task's level is 1 + the highest level of its deps.

    Tasks within a level are in declaration order. Raises CycleError on a cycle.
    """
    level: dict[str, int] = {}
    level_of = level.__getitem__
    try:  # files usually declare dependencies first; a KeyError means this one does not
        for task, needs in deps.items():
            level[task] = max(map(level_of, needs)) + 1 if needs else 0
    except KeyError:
        for task in _dependencies_first(deps):
            needs = deps[task]
            level[task] = max(map(level_of, needs)) + 1 if needs else 0
    out: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for task in deps:
        out[level[task]].append(task)
    return out


def critical_path(deps: Deps, estimates: Mapping[str, float] | None = None) -> tuple[list[str], float]:
    """The chain of tasks that bounds the workflow's duration: the heaviest root-to-sink path, root first.

    A task's weight is `estimates[task]`, or 1.0 when missing. Ties go to the earliest-declared sink and,
    walking back, to the dependency listed first. Returns ([], 0.0) for an empty graph; raises CycleError.
    """
    weight_of = (estimates or {}).get
    total: dict[str, float] = {}  # weight of the heaviest path from a root to the task, the task included
    total_of = total.__getitem__
    try:  # as in `levels`: declaration order first, a real topological order if that fails
        for task, needs in deps.items():
            total[task] = (max(map(total_of, needs)) if needs else 0.0) + weight_of(task, 1.0)
    except KeyError:
        for task in _dependencies_first(deps):
            needs = deps[task]
            total[task] = (max(map(total_of, needs)) if needs else 0.0) + weight_of(task, 1.0)
    has_dependents = set(chain.from_iterable(deps.values()))
    end = max(filterfalse(has_dependents.__contains__, deps), key=total_of, default=None)
    if end is None:
        return [], 0.0
    path = [end]
    while needs := deps[path[-1]]:  # walk back through the heaviest dependency, the first listed on ties
        path.append(max(needs, key=total_of))
    path.reverse()
    return path, total[end]


def dependents(deps: Deps) -> dict[str, list[str]]:
    """Reverse edges, for walking downstream (what to skip or cancel): task -> tasks that depend on it.

    Every task is a key; each list is in declaration order, without repeats.
    """
    out: dict[str, list[str]] = {task: [] for task in deps}
    for task, needs in deps.items():
        for dep in needs:
            users = out[dep]
            if not users or users[-1] != task:
                users.append(task)
    return out


def ancestors(deps: Deps, task: str) -> set[str]:
    """Every task `task` transitively depends on, not itself: what must finish before it can start."""
    seen: set[str] = set()
    stack = list(deps[task])
    while stack:
        dep = stack.pop()
        if dep not in seen:
            seen.add(dep)
            stack.extend(deps[dep])
    seen.discard(task)
    return seen


def ready(deps: Deps, finished: Collection[str], started: Collection[str] = ()) -> list[str]:
    """Tasks the scheduler may start now: not finished, not started, every dependency finished.

    In declaration order.
    """
    done = set(finished)
    busy = set(started)
    return [task for task, needs in deps.items() if task not in done and task not in busy and done.issuperset(needs)]


def _side_nodes(deps: Deps, side_edges: Sequence[SideEdge]) -> list[str]:
    """Ends of side edges that are not tasks, once each, in order of first appearance."""
    extra: dict[str, None] = {}
    for source, target, _ in side_edges:
        for node in (source, target):
            if node not in deps:
                extra[node] = None
    return list(extra)


def _node_lines(task: str, labels: Mapping[str, str], states: Mapping[str, str] | None) -> list[str]:
    """What a task's box says, one entry per line: its name, its label, its state in a run."""
    lines = [task]
    if task in labels:
        lines.append(labels[task])
    if states is not None:
        lines.append(states.get(task, "unknown"))
    return lines


def _dot_text(text: str) -> str:
    """Text safe inside a DOT double-quoted string."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


STATE_COLOURS: dict[str, str] = {
    "pending": "#f1f3f5",
    "ready": "#fff3bf",
    "running": "#a5d8ff",
    "retrying": "#ffd8a8",
    "succeeded": "#b2f2bb",
    "failed": "#ffa8a8",
    "skipped": "#dee2e6",
    "cancelled": "#ced4da",
    "compensated": "#d0bfff",
}
"""The fill of a task in the drawing of a run, by its state: so a glance tells done, busy and broken apart."""

_OTHER_STATE_COLOUR = "#ffffff"


def _state_colour(state: str) -> str:
    return STATE_COLOURS.get(state, _OTHER_STATE_COLOUR)


def to_dot(
    deps: Deps,
    name: str = "workflow",
    labels: Mapping[str, str] | None = None,
    side_edges: Sequence[SideEdge] = (),
    states: Mapping[str, str] | None = None,
) -> str:
    """The workflow as Graphviz DOT, for `dot -Tsvg`: edges go from dependency to dependent.

    `labels` adds a second line to a task's box; `states` (the tasks of a run) adds the state as the last
    line and fills the box with its `STATE_COLOURS` colour. `side_edges` are drawn dashed, and their
    non-task ends as notes. Deterministic (declaration order); ends with a newline.
    """
    labels = labels or {}
    style = 'style="rounded,filled", fillcolor="white"' if states is not None else "style=rounded"
    lines = [f'digraph "{_dot_text(name)}" {{', "    rankdir=LR;", f"    node [shape=box, {style}];"]
    lines += [_dot_node(task, labels, states) for task in deps]
    for node in _side_nodes(deps, side_edges):
        lines.append(f'    "{_dot_text(node)}" [shape=note];')
    for task, needs in deps.items():
        for dep in needs:
            lines.append(f'    "{_dot_text(dep)}" -> "{_dot_text(task)}";')
    for source, target, label in side_edges:
        attrs = f'style=dashed, label="{_dot_text(label)}"' if label else "style=dashed"
        lines.append(f'    "{_dot_text(source)}" -> "{_dot_text(target)}" [{attrs}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_node(task: str, labels: Mapping[str, str], states: Mapping[str, str] | None) -> str:
    """A task's box: a bare name, or a label of several lines and, in a run, the fill of its state."""
    if task not in labels and states is None:
        return f'    "{_dot_text(task)}";'
    text = "\\n".join(_dot_text(line) for line in _node_lines(task, labels, states))
    attrs = f'label="{text}"'
    if states is not None and task in states:
        attrs += f', fillcolor="{_state_colour(states[task])}"'
    return f'    "{_dot_text(task)}" [{attrs}];'


_MERMAID_SAFE = re.compile(r"[A-Za-z0-9_]+")
_MERMAID_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_]")
_MERMAID_KEYWORDS = frozenset(
    {"end", "graph", "flowchart", "subgraph", "style", "class", "classdef", "click", "linkstyle", "direction"}
)


def _mermaid_ids(names: Sequence[str]) -> dict[str, str]:
    """A Mermaid node id per name: the name itself when it is `[A-Za-z0-9_]+` and not a keyword, otherwise
    the name with each other character replaced by `_`, suffixed `_2`, `_3`... until unique."""

    def plain(n: str) -> bool:
        return bool(_MERMAID_SAFE.fullmatch(n)) and n.lower() not in _MERMAID_KEYWORDS

    ids = {n: n for n in names if plain(n)}
    used = set(ids.values())
    for n in names:
        if n in ids:
            continue
        base = _MERMAID_UNSAFE_CHAR.sub("_", n) or "_"
        candidate, k = base, 1
        while candidate in used or candidate.lower() in _MERMAID_KEYWORDS:
            k += 1
            candidate = f"{base}_{k}"
        ids[n] = candidate
        used.add(candidate)
    return ids


def _mermaid_text(text: str) -> str:
    """Text safe inside a quoted Mermaid label (entity codes for the characters that end one)."""
    return text.replace('"', "#quot;").replace("|", "#124;")


def to_mermaid(
    deps: Deps,
    labels: Mapping[str, str] | None = None,
    side_edges: Sequence[SideEdge] = (),
    states: Mapping[str, str] | None = None,
) -> str:
    """The workflow as a Mermaid flowchart, for Markdown renderers: edges go from dependency to dependent.

    Node ids are the task names when they match `[A-Za-z0-9_]+` (and are not Mermaid keywords such as
    `end`); other names get an id with each other character replaced by `_`, made unique with `_2`, `_3`...
    Every node shows its real name as its label, `id["name"]`, plus `<br/>` and `labels[name]` if given.
    `states` (the tasks of a run) adds `<br/>` and the state, and puts each task in the class of its
    state, one `classDef` per state shown, filled with its `STATE_COLOURS` colour.
    `side_edges` are dotted `-.->` edges; their non-task ends are drawn as flags, `id>"name"]`.
    Deterministic (declaration order); ends with a newline.
    """
    labels = labels or {}
    extra = _side_nodes(deps, side_edges)
    ids = _mermaid_ids([*deps, *extra])
    lines = ["flowchart LR"]
    for task in deps:
        text = "<br/>".join(_mermaid_text(line) for line in _node_lines(task, labels, states))
        lines.append(f'    {ids[task]}["{text}"]')
    for node in extra:
        lines.append(f'    {ids[node]}>"{_mermaid_text(node)}"]')
    for task, needs in deps.items():
        for dep in needs:
            lines.append(f"    {ids[dep]} --> {ids[task]}")
    for source, target, label in side_edges:
        arrow = f'-.->|"{_mermaid_text(label)}"|' if label else "-.->"
        lines.append(f"    {ids[source]} {arrow} {ids[target]}")
    if states is not None:
        lines += _mermaid_state_classes([task for task in deps if task in states], states, ids)
    return "\n".join(lines) + "\n"


def _mermaid_state_classes(tasks: Sequence[str], states: Mapping[str, str], ids: Mapping[str, str]) -> list[str]:
    """A `classDef` per state shown (in `STATE_COLOURS` order, others after) and the tasks in each."""
    members: dict[str, list[str]] = {}
    for task in tasks:
        members.setdefault(states[task], []).append(ids[task])
    order = [s for s in STATE_COLOURS if s in members] + [s for s in members if s not in STATE_COLOURS]
    lines = []
    for state in order:
        name = _MERMAID_UNSAFE_CHAR.sub("_", state) or "_"
        lines.append(f"    classDef {name} fill:{_state_colour(state)},stroke:#495057")
        lines.append(f"    class {','.join(members[state])} {name}")
    return lines
