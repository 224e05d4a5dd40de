"""A run's DAG as SVG, laid out from the graph's levels: left to right, one column per level.

Pure text from a `Workflow` and the run's `status --json`, so it is tested without a browser. Each task
of the status is one `<g data-task=NAME data-state=STATE>`; the page's script changes `data-state` as
the run goes on, and the stylesheet colours a node by it. Loops get a self-edge, signal and approval
gates shapes of their own, a `workflow:` task a double border, and the tasks handlers spawned sit in
the column after their parent, reached by a dashed edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from phibroker.workflow import dag, drawing
from phibroker.workflow.loader import Workflow

WIDTH, HEIGHT = 180, 58  # a node
GAP_X, GAP_Y = 56, 22  # between columns, between nodes of a column
PAD = 24
NAME_CHARS = 22  # longer names are cut in the box; the whole name is in its tooltip


def layout(deps: Mapping[str, list[str]]) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Each node's top-left corner, and the drawing's width and height. Columns are the levels, each
    centred on the tallest one, its nodes in declaration order."""
    levels = dag.levels(deps)
    tallest = max((len(level) for level in levels), default=0)
    full = tallest * (HEIGHT + GAP_Y) - GAP_Y
    places: dict[str, tuple[float, float]] = {}
    for column, level in enumerate(levels):
        top = PAD + (full - (len(level) * (HEIGHT + GAP_Y) - GAP_Y)) / 2
        for row, task in enumerate(level):
            places[task] = (PAD + column * (WIDTH + GAP_X), top + row * (HEIGHT + GAP_Y))
    width = PAD * 2 + max(len(levels) * (WIDTH + GAP_X) - GAP_X, 0)
    return places, float(width), float(PAD * 2 + max(full, 0))


def kind_of(workflow: Workflow, name: str, row: Mapping[str, Any]) -> str:
    """What a node is drawn as: task, map, approval, signal or workflow."""
    task = workflow.tasks.get(name)
    if task is None:  # spawned at run time: its status row says what it is
        return "workflow" if "child" in row else "task" if row.get("agent") else "approval"
    if task.approval is not None:
        return "approval"
    if task.signal is not None:
        return "signal"
    if task.workflow is not None:
        return "workflow"
    return "map" if task.map is not None else "task"


def note(row: Mapping[str, Any]) -> str:
    """The node's last line: its state and what is worth a glance (a retry, a loop's iteration)."""
    bits = [str(row.get("state"))]
    if row.get("iterations", 0) > 1:
        bits.append(f"iteration {row['iterations']}")
    elif row.get("attempts", 0) > 1:
        bits.append(f"try {row['attempts']}")
    if row.get("partitions"):
        done = sum(1 for p in row["partitions"] if p["state"] == "succeeded")
        bits.append(f"{done}/{len(row['partitions'])} parts")
    return " · ".join(bits)


def svg(workflow: Workflow, doc: Mapping[str, Any]) -> str:
    """The run's drawing: exactly one node per key of `doc["tasks"]`."""
    figure = drawing.figure(workflow, doc)
    tasks: Mapping[str, Any] = doc["tasks"]
    deps = {name: list(figure.deps.get(name, ())) for name in tasks}
    spawned = drawing.spawn_edges(doc)
    for parent, child, _ in spawned:  # a spawned task is drawn in the column after its parent
        if parent in deps and not deps[child]:
            deps[child] = [parent]
    deps = {name: [d for d in needs if d in deps] for name, needs in deps.items()}
    places, width, height = layout(deps)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="dag" width="{width:.0f}" height="{height:.0f}"'
        f' viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="the tasks of run {escape(str(doc["id"]))}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7"'
        ' orient="auto-start-reverse"><path d="M0 0L10 5L0 10z"/></marker></defs>',
    ]
    spawn_pairs = {(parent, child) for parent, child, _ in spawned}
    for name, needs in deps.items():
        for dep in needs:
            dashed = " spawned" if (dep, name) in spawn_pairs else ""
            parts.append(f'<path class="edge{dashed}" d="{_curve(places[dep], places[name])}"/>')
    labels = figure.labels
    for name, row in tasks.items():
        parts.append(_node(name, row, places[name], kind_of(workflow, name, row), labels.get(name, ""), figure.loops))
    parts.append("</svg>")
    return "\n".join(parts)


def _curve(source: tuple[float, float], target: tuple[float, float]) -> str:
    x1, y1 = source[0] + WIDTH, source[1] + HEIGHT / 2
    x2, y2 = target[0], target[1] + HEIGHT / 2
    bend = max(24.0, (x2 - x1) / 2)
    return f"M{x1:.0f} {y1:.0f}C{x1 + bend:.0f} {y1:.0f} {x2 - bend:.0f} {y2:.0f} {x2 - 2:.0f} {y2:.0f}"


def _shape(kind: str, x: float, y: float) -> str:
    """The node's outline: a box, a flag for a signal gate, a hexagon for an approval, a double box
    for a sub-workflow, a stack for a map."""
    w, h = WIDTH, HEIGHT
    if kind == "signal":
        points = f"{x},{y} {x + w - 14},{y} {x + w},{y + h / 2} {x + w - 14},{y + h} {x},{y + h}"
        return f'<polygon class="box" points="{points}"/>'
    if kind == "approval":
        points = (
            f"{x + 12},{y} {x + w - 12},{y} {x + w},{y + h / 2} {x + w - 12},{y + h} {x + 12},{y + h} {x},{y + h / 2}"
        )
        return f'<polygon class="box" points="{points}"/>'
    box = f'<rect class="box" x="{x}" y="{y}" width="{w}" height="{h}" rx="6"/>'
    if kind == "workflow":
        return box + f'<rect class="inner" x="{x + 4}" y="{y + 4}" width="{w - 8}" height="{h - 8}" rx="4"/>'
    if kind == "map":
        return f'<rect class="box behind" x="{x + 5}" y="{y - 5}" width="{w}" height="{h}" rx="6"/>' + box
    return box


def _node(
    name: str, row: Mapping[str, Any], place: tuple[float, float], kind: str, label: str, loops: Mapping[str, str]
) -> str:
    x, y = place
    shown = name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"
    title = f"{name}\n{label}" + (f"\nloop: {loops[name]}" if name in loops else "")
    lines = [
        f'<g class="node {kind}" data-task="{escape(name)}" data-state="{escape(str(row.get("state")))}"'
        f' tabindex="0" role="button">',
        f"<title>{escape(title)}</title>",
        _shape(kind, x, y),
        f'<text class="name" x="{x + 14}" y="{y + 18}">{escape(shown)}</text>',
        f'<text class="label" x="{x + 14}" y="{y + 34}">{escape(label[:34])}</text>',
        f'<text class="st" x="{x + 14}" y="{y + 49}">{escape(note(row))}</text>',
    ]
    if name in loops:  # a self-edge over the node's top
        lines.append(
            f'<path class="loop" d="M{x + WIDTH - 44} {y}C{x + WIDTH - 44} {y - 18} {x + WIDTH - 16} {y - 18}'
            f' {x + WIDTH - 16} {y - 2}"/>'
        )
    lines.append("</g>")
    return "".join(lines)
