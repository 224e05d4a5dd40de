"""Drawings of a workflow, pure text: Graphviz DOT and Mermaid, with a run's states as fills.

What a drawing shows besides tasks and edges (loops, signal gates, sub-workflows) is a `Figure`;
`drawing.figure` makes one from a `Workflow`."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phibroker.workflow.dag import Deps

SideEdge = tuple[str, str, str]
"""(source, target, label): an extra dashed edge; its ends may be non-task nodes such as "sub:page_oncall"."""

SUBFLOW_SEP = "::"
"""Joins a `workflow:` task and a task of its child in a drawing's node names (`Review::Lint`): no task
name can hold it, so the two never clash, and a run's states name a child run's tasks the same way."""


@dataclass(frozen=True)
class Figure:
    """A workflow as a drawing shows it: its graph, a second line per task, and what is more than a box.

    `loops`: a looping task -> the label of its self-edge; `signals`: the signal gates, drawn in a
    shape of their own; `subflows`: a `workflow:` task -> its child workflow, drawn in a cluster around
    the task; `title`: that cluster's caption.
    """

    deps: Deps
    labels: Mapping[str, str] = field(default_factory=dict)
    loops: Mapping[str, str] = field(default_factory=dict)
    signals: Collection[str] = frozenset()
    subflows: Mapping[str, Figure] = field(default_factory=dict)
    title: str = ""

    def nodes(self, prefix: str = "") -> list[str]:
        """Every node's name, the tasks of sub-workflows (`TASK::CHILD`) right after their task."""
        out: list[str] = []
        for task in self.deps:
            out.append(prefix + task)
            sub = self.subflows.get(task)
            if sub is not None:
                out += sub.nodes(prefix + task + SUBFLOW_SEP)
        return out


def _side_nodes(deps: Deps, side_edges: Sequence[SideEdge]) -> list[str]:
    """Ends of side edges that are not tasks, once each, in order of first appearance."""
    extra: dict[str, None] = {}
    for source, target, _ in side_edges:
        for node in (source, target):
            if node not in deps:
                extra[node] = None
    return list(extra)


def _node_lines(task: str, node: str, labels: Mapping[str, str], states: Mapping[str, str] | None) -> list[str]:
    """What a task's box says, one entry per line: its name, its label, its state in a run (the state of
    `node`, the task's name in the whole drawing)."""
    lines = [task]
    if task in labels:
        lines.append(labels[task])
    if states is not None:
        lines.append(states.get(node, "unknown"))
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
    "upstream_failed": "#ffe3e3",
    "skipped": "#dee2e6",
    "cancelling": "#eebefa",
    "cancelled": "#ced4da",
    "compensated": "#d0bfff",
}
"""The fill of a task in the drawing of a run, by its state: so a glance tells done, busy and broken apart.
`upstream_failed` is a paler `failed` (it never ran); `cancelling` is a task asked to stop, not yet stopped."""

_OTHER_STATE_COLOUR = "#ffffff"


def _state_colour(state: str) -> str:
    return STATE_COLOURS.get(state, _OTHER_STATE_COLOUR)


def to_dot(
    deps: Deps,
    name: str = "workflow",
    labels: Mapping[str, str] | None = None,
    side_edges: Sequence[SideEdge] = (),
    states: Mapping[str, str] | None = None,
    *,
    loops: Mapping[str, str] | None = None,
    signals: Collection[str] = (),
    subflows: Mapping[str, Figure] | None = None,
) -> str:
    """The workflow as Graphviz DOT, for `dot -Tsvg`: edges go from dependency to dependent.

    `labels` adds a second line to a task's box; `states` (the tasks of a run) adds the state as the last
    line and fills the box with its `STATE_COLOURS` colour. `side_edges` are drawn dashed, and their
    non-task ends as notes. A loop is a bold self-edge, a signal gate a `cds` (a flag), and a sub-workflow
    a dashed cluster holding its task and the child's tasks (reached by dotted edges).
    Deterministic (declaration order); ends with a newline.
    """
    figure = Figure(deps, labels or {}, loops or {}, signals, subflows or {})
    style = 'style="rounded,filled", fillcolor="white"' if states is not None else "style=rounded"
    lines = [f'digraph "{_dot_text(name)}" {{', "    rankdir=LR;", f"    node [shape=box, {style}];"]
    lines += _dot_nodes(figure, "", states, "    ")
    for node in _side_nodes(deps, side_edges):
        lines.append(f'    "{_dot_text(node)}" [shape=note];')
    lines += _dot_edges(figure, "")
    for source, target, label in side_edges:
        attrs = f'style=dashed, label="{_dot_text(label)}"' if label else "style=dashed"
        lines.append(f'    "{_dot_text(source)}" -> "{_dot_text(target)}" [{attrs}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_nodes(figure: Figure, prefix: str, states: Mapping[str, str] | None, indent: str) -> list[str]:
    lines = []
    for task in figure.deps:
        node = prefix + task
        line = indent + _dot_node(task, node, figure, states)
        sub = figure.subflows.get(task)
        if sub is None:
            lines.append(line)
            continue
        lines.append(f'{indent}subgraph "cluster_{_dot_text(node)}" {{')
        lines.append(f'{indent}    label="{_dot_text(sub.title)}";')
        lines.append(f"{indent}    style=dashed;")
        lines.append(f"    {line}")
        lines += _dot_nodes(sub, node + SUBFLOW_SEP, states, indent + "    ")
        lines.append(f"{indent}}}")
    return lines


def _dot_node(task: str, node: str, figure: Figure, states: Mapping[str, str] | None) -> str:
    """A task's box: a bare name, or a label of several lines and, in a run, the fill of its state."""
    attrs = []
    if task in figure.labels or states is not None or node != task:
        text = "\\n".join(_dot_text(line) for line in _node_lines(task, node, figure.labels, states))
        attrs.append(f'label="{text}"')
    if states is not None and node in states:
        attrs.append(f'fillcolor="{_state_colour(states[node])}"')
    if task in figure.signals:
        attrs.append("shape=cds")
    return f'"{_dot_text(node)}"' + (f" [{', '.join(attrs)}];" if attrs else ";")


def _dot_edges(figure: Figure, prefix: str) -> list[str]:
    """Dependencies, then loops, then each sub-workflow's own edges: all at the top, so a cluster
    holds only its nodes."""
    lines = []
    for task, needs in figure.deps.items():
        for dep in needs:
            lines.append(f'    "{_dot_text(prefix + dep)}" -> "{_dot_text(prefix + task)}";')
    for task, label in figure.loops.items():
        node = _dot_text(prefix + task)
        lines.append(f'    "{node}" -> "{node}" [label="{_dot_text(label)}", style=bold];')
    for task, sub in figure.subflows.items():
        inner = prefix + task + SUBFLOW_SEP
        for root in (t for t, needs in sub.deps.items() if not needs):
            lines.append(f'    "{_dot_text(prefix + task)}" -> "{_dot_text(inner + root)}" [style=dotted];')
        lines += _dot_edges(sub, inner)
    return lines


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
    """Text safe inside a quoted Mermaid label (entity codes for the characters that end one or open a tag)."""
    return text.replace('"', "#quot;").replace("|", "#124;").replace("<", "#lt;").replace(">", "#gt;")


def to_mermaid(
    deps: Deps,
    labels: Mapping[str, str] | None = None,
    side_edges: Sequence[SideEdge] = (),
    states: Mapping[str, str] | None = None,
    *,
    loops: Mapping[str, str] | None = None,
    signals: Collection[str] = (),
    subflows: Mapping[str, Figure] | None = None,
) -> str:
    """The workflow as a Mermaid flowchart, for Markdown renderers: edges go from dependency to dependent.

    Node ids are the task names when they match `[A-Za-z0-9_]+` (and are not Mermaid keywords such as
    `end`); other names get an id with each other character replaced by `_`, made unique with `_2`, `_3`...
    Every node shows its real name as its label, `id["name"]`, plus `<br/>` and `labels[name]` if given.
    `states` (the tasks of a run) adds `<br/>` and the state, and puts each task in the class of its
    state, one `classDef` per state shown, filled with its `STATE_COLOURS` colour.
    `side_edges` are dotted `-.->` edges; their non-task ends are drawn as flags, `id>"name"]`.
    A signal gate is a hexagon, `id{{"name"}}`; a loop a self-edge labelled with its `until`; a
    sub-workflow a `subgraph` holding its task and the child's tasks (linked by `-.-`).
    Deterministic (declaration order); ends with a newline.
    """
    figure = Figure(deps, labels or {}, loops or {}, signals, subflows or {})
    extra = _side_nodes(deps, side_edges)
    nodes = figure.nodes()
    inner = [node for node in nodes if node not in deps]
    ids = _mermaid_ids([*deps, *extra, *inner, *_cluster_names(figure, "")])
    lines = ["flowchart LR"]
    lines += _mermaid_nodes(figure, "", states, ids, "    ")
    for node in extra:
        lines.append(f'    {ids[node]}>"{_mermaid_text(node)}"]')
    lines += _mermaid_edges(figure, "", ids)
    for source, target, label in side_edges:
        arrow = f'-.->|"{_mermaid_text(label)}"|' if label else "-.->"
        lines.append(f"    {ids[source]} {arrow} {ids[target]}")
    if states is not None:
        lines += _mermaid_state_classes([node for node in nodes if node in states], states, ids)
    return "\n".join(lines) + "\n"


def _cluster_names(figure: Figure, prefix: str) -> list[str]:
    """A name per sub-workflow cluster (`TASK::`), for its Mermaid subgraph id."""
    out = []
    for task, sub in figure.subflows.items():
        out.append(prefix + task + SUBFLOW_SEP)
        out += _cluster_names(sub, prefix + task + SUBFLOW_SEP)
    return out


def _mermaid_nodes(
    figure: Figure, prefix: str, states: Mapping[str, str] | None, ids: Mapping[str, str], indent: str
) -> list[str]:
    lines = []
    for task in figure.deps:
        node = prefix + task
        text = "<br/>".join(_mermaid_text(line) for line in _node_lines(task, node, figure.labels, states))
        line = f'{indent}{ids[node]}{{{{"{text}"}}}}' if task in figure.signals else f'{indent}{ids[node]}["{text}"]'
        sub = figure.subflows.get(task)
        if sub is None:
            lines.append(line)
            continue
        cluster = node + SUBFLOW_SEP
        lines.append(f'{indent}subgraph {ids[cluster]} ["{_mermaid_text(sub.title)}"]')
        lines.append(f"    {line}")
        lines += _mermaid_nodes(sub, cluster, states, ids, indent + "    ")
        lines.append(f"{indent}end")
    return lines


def _mermaid_edges(figure: Figure, prefix: str, ids: Mapping[str, str]) -> list[str]:
    lines = []
    for task, needs in figure.deps.items():
        for dep in needs:
            lines.append(f"    {ids[prefix + dep]} --> {ids[prefix + task]}")
    for task, label in figure.loops.items():
        node = ids[prefix + task]
        lines.append(f'    {node} -->|"{_mermaid_text(label)}"| {node}')
    for task, sub in figure.subflows.items():
        inner = prefix + task + SUBFLOW_SEP
        for root in (t for t, needs in sub.deps.items() if not needs):
            lines.append(f"    {ids[prefix + task]} -.- {ids[inner + root]}")
        lines += _mermaid_edges(sub, inner, ids)
    return lines


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
