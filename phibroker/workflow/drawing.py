"""What a workflow is beyond its edges, for `graph` and `validate`: its loops, signal gates and
sub-workflows, and in a run the tasks its handlers spawned."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from phibroker.errors import WorkflowFileError
from phibroker.workflow import render
from phibroker.workflow.loader import Workflow
from phibroker.workflow.spec import Loop

MAX_NOTED = 6  # tasks named per kind in `validate`'s summary


def loop_label(loop: Loop) -> str:
    """A loop's self-edge: `until result.score >= 8 · max 5`."""
    return f"until {loop.until} · max {loop.max_iterations}"


def figure(workflow: Workflow, run: Mapping[str, Any] | None = None) -> render.Figure:
    """The drawing of a workflow; a sub-workflow it embeds is drawn inside its task's cluster. With
    `run` (its `status --json`), the tasks its handlers spawned join it, each drawn apart from its
    siblings (the status does not say which of them wait for which) and reached from its parent by
    a `spawn_edges` edge."""
    deps: dict[str, list[str]] = dict(workflow.deps)
    labels = workflow.labels()
    for name, row in (run or {}).get("tasks", {}).items():
        if name not in deps:
            deps[name] = []
            labels[name] = row.get("agent") or ("workflow" if "child" in row else "gate")
    subflows = {}
    for name, task in workflow.tasks.items():
        if isinstance(task.workflow, dict):
            try:
                subflows[name] = figure(workflow.subworkflow(name))
            except WorkflowFileError:  # a spawned one that does not check: drawn as its task's box
                continue
    return render.Figure(
        deps,
        labels,
        loops={name: loop_label(task.loop) for name, task in workflow.tasks.items() if task.loop},
        signals=frozenset(name for name, task in workflow.tasks.items() if task.signal),
        subflows=subflows,
        title=f"workflow {workflow.name}",
    )


def spawn_edges(run: Mapping[str, Any]) -> list[render.SideEdge]:
    """A dashed `spawned` edge from each spawning task to each of its children, in a run's status."""
    edges = []
    for name in run.get("tasks", {}):
        parent, slash, _ = name.rpartition("/")
        if slash:
            edges.append((parent, name, "spawned"))
    return edges


def to_dot(
    drawing: render.Figure,
    name: str,
    side_edges: list[render.SideEdge],
    states: Mapping[str, str] | None = None,
) -> str:
    """`render.to_dot` of a figure."""
    return render.to_dot(
        drawing.deps,
        name,
        drawing.labels,
        side_edges,
        states,
        loops=drawing.loops,
        signals=drawing.signals,
        subflows=drawing.subflows,
    )


def to_mermaid(
    drawing: render.Figure, side_edges: list[render.SideEdge], states: Mapping[str, str] | None = None
) -> str:
    """`render.to_mermaid` of a figure."""
    return render.to_mermaid(
        drawing.deps,
        drawing.labels,
        side_edges,
        states,
        loops=drawing.loops,
        signals=drawing.signals,
        subflows=drawing.subflows,
    )


def summary(workflow: Workflow) -> list[str]:
    """`validate`'s lines on what unfolds at run time: loops, signal gates, sub-workflows (none: no line)."""
    loops, signals, subs = [], [], []
    for name, task in workflow.tasks.items():
        if task.loop is not None:
            loops.append(f"{name} (until {task.loop.until}, at most {task.loop.max_iterations} iterations)")
        if task.signal is not None:
            signals.append(f"{name} ({task.signal.name})")
        if task.workflow is not None:
            child = workflow.subworkflows.get(name)
            what = f"{child.name}, {len(child.tasks)} tasks" if child else str(task.workflow)
            subs.append(f"{name} ({what})")
    lines = []
    for kind, named in (("loops", loops), ("signal gates", signals), ("sub-workflows", subs)):
        if named:
            more = f", … (+{len(named) - MAX_NOTED})" if len(named) > MAX_NOTED else ""
            lines.append(f"{kind}: {', '.join(named[:MAX_NOTED])}{more}")
    return lines
