"""Tasks a handler adds at run time (`ctx.spawn`, `ctx.spawn_workflow`): checked here, before a run takes them.

A spawning task `T`'s children are named `T/NAME` (theirs `T/NAME/SUB`), may depend on their siblings
only, and are tasks like any other once checked: a run keeps their specs beside its file's and builds
its `Workflow` from both (`Workflow.with_children`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from phibroker.errors import InvalidInput
from phibroker.workflow import dag
from phibroker.workflow.loader import SIGNED, Workflow, task_fields
from phibroker.workflow.spec import NAME_PATTERN, Task

MAX_CHILDREN = 1000  # per spawning task: a run's size stays bounded whatever a planner asks for
_NAME = re.compile(NAME_PATTERN)
_TASK = TypeAdapter(Task)
_SIGNED_FIELDS = {"source_text", "source_suffix", "signature", "source_parts"}
_FIELDS = ("agent", "command", "payload", "depends_on", "retry", "timeout", "workflow", "params")


class SpawnError(InvalidInput):
    """A handler asked for children the run cannot take: its attempt fails with this one line."""


def plan_children(
    workflow: Workflow, parent: str, spawns: Sequence[Mapping[str, Any]], limit: int = MAX_CHILDREN
) -> dict[str, dict[str, Any]]:
    """The children `spawns` asks `parent` to get, as task specs under their full names; raises SpawnError."""
    known = {name.rsplit("/", 1)[1] for name in workflow.children_of.get(parent, ())}
    if len(known) + len(spawns) > limit:
        raise SpawnError(f"{parent} may have at most {limit} children (max_children)")
    planned: dict[str, dict[str, Any]] = {}
    for spawn in spawns:
        name = str(spawn.get("name", ""))
        if not _NAME.fullmatch(name):
            raise SpawnError(f"child name {name!r}: use letters, digits, '_', '.', '-'")
        if name in known or f"{parent}/{name}" in planned:
            raise SpawnError(f"{parent} has a child {name!r} already")
        fields = {k: spawn[k] for k in _FIELDS if spawn.get(k) is not None}
        siblings = {*known, *(n.rsplit("/", 1)[1] for n in planned), *(str(s.get("name")) for s in spawns)}
        for dep in fields.get("depends_on", ()):
            if dep not in siblings:
                raise SpawnError(f"child {name!r} depends on {dep!r}, which is no child of {parent}")
        fields["depends_on"] = [f"{parent}/{dep}" for dep in fields.get("depends_on", ())]
        try:
            task = _TASK.validate_python(task_fields(fields))
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in error["loc"])
            raise SpawnError(f"child {name!r}: {where + ': ' if where else ''}{error['msg']}") from None
        if task.workflow is None and not (task.agent and task.command):
            raise SpawnError(f"child {name!r} needs agent and command, or a workflow")
        signed = _signed(spawn.get("signed"), name) if task.workflow is not None else {}
        planned[f"{parent}/{name}"] = {**fields, SIGNED: signed} if signed else fields
    deps = {name: spec["depends_on"] for name, spec in planned.items()}
    cycle = dag.find_cycle({**deps, **{d: [] for ds in deps.values() for d in ds if d not in deps}})
    if cycle:
        raise SpawnError("children depend on each other in a cycle: " + " -> ".join(cycle))
    return planned


def _signed(value: Any, name: str) -> dict[str, str]:
    """The signed file a spawned workflow came from (its text, detached signature, embedded parts):
    checked by a coordinator run with `--require-signed` as any signed run; here only its shape."""
    if not value:
        return {}
    if (
        not isinstance(value, dict)
        or not set(value) <= _SIGNED_FIELDS
        or not all(isinstance(v, str) for v in value.values())
    ):
        raise SpawnError(f"child {name!r}: malformed signature fields")
    return dict(value)


def descendants(workflow: Workflow, task: str) -> list[str]:
    """Every task spawned under `task`, however deep, parents before their children."""
    out: list[str] = []
    stack = list(reversed(workflow.children_of.get(task, ())))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(reversed(workflow.children_of.get(child, ())))
    return out
