"""How states, durations and tables look on a terminal, shared by every view.

Rich style strings and plain text helpers, so a command that only prints text imports nothing heavy for it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from phibroker.workflow.spec import plain

STATE_STYLES: dict[str, str] = {
    "succeeded": "green",
    "failed": "bold red",
    "timed_out": "red",
    "cancelled": "red",
    "upstream_failed": "dim red",
    "cancelling": "bold magenta",
    "running": "yellow",
    "retrying": "magenta",
    "compensating": "magenta",
    "waiting_approval": "cyan",
    "ready": "cyan",
    "compensated": "blue",
    "skipped": "dim",
    "pending": "dim",
}


def task_notes(task: Mapping[str, Any], max_iterations: int | None = None, spawned: int = 0) -> list[str]:
    """What a task's state alone does not tell (a `status --json` row): its loop's iteration, the
    signal it waits for, its child run, the children it spawned, what it spent, and a stop it was asked for."""
    notes = []
    if task.get("iterations"):
        notes.append(f"iteration {task['iterations']}" + (f"/{max_iterations}" if max_iterations else ""))
    if task.get("waiting_for"):
        notes.append(f"waiting for {task['waiting_for']}")
    if task.get("child"):
        notes.append(f"child run {task['child']}")
    if spawned:
        notes.append(f"spawned {spawned}")
    if spend_text(task.get("spend")):
        notes.append(f"spent {spend_text(task.get('spend'))}")
    if task.get("stopping"):
        notes.append(f"stopping: {task['stopping']}")
    return notes


def spend_text(spend: Mapping[str, Any] | None) -> str:
    """`120512 tokens, cost 0.42` (a `status --json` "spend"), the part that is not zero; "" for nothing."""
    spend = spend or {}
    parts = [f"{spend['tokens']} tokens" if spend.get("tokens") else ""]
    parts.append(f"cost {plain(spend['cost'])}" if spend.get("cost") else "")
    return ", ".join(p for p in parts if p)


def task_tree(names: Iterable[str]) -> list[tuple[str, int, int]]:
    """(name, depth, how many children) per task, each child a handler spawned (`T/NAME`) right
    under its parent, in the order given."""
    ordered = list(names)
    known = set(ordered)
    children: dict[str, list[str]] = {}
    roots = []
    for name in ordered:
        parent, slash, _ = name.rpartition("/")
        if slash and parent in known:
            children.setdefault(parent, []).append(name)
        else:
            roots.append(name)
    out: list[tuple[str, int, int]] = []
    stack = [(name, 0) for name in reversed(roots)]
    while stack:
        name, depth = stack.pop()
        out.append((name, depth, len(children.get(name, ()))))
        stack.extend((child, depth + 1) for child in reversed(children.get(name, ())))
    return out


def duration_text(seconds: float, digits: int = 1) -> str:
    """A duration for humans: `12ms` below 50 ms (where `0.0s` would say nothing), `1.5s`, `3m05s`, `2h10m`."""
    seconds = max(0.0, seconds)
    if seconds < 0.05:
        return f"{seconds * 1000:.0f}ms" if seconds >= 0.0005 else "<1ms"
    if seconds < 60:
        return f"{seconds:.{digits}f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def ago(seconds: float) -> str:
    """How long ago, to the minute (`just now`, `3m ago`, `5h ago`, `2d ago`): a listing printed twice
    in a row reads the same."""
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h ago"
    return f"{int(seconds // 86400)}d ago"


def aligned(rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """The cells padded to their column's width, but the last column's (no trailing blanks): joined with
    two spaces they line up, and a caller may colour a cell once it is padded."""
    columns = max((len(row) for row in rows), default=0)
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(columns)]
    return [[cell if i == len(row) - 1 else cell.ljust(widths[i]) for i, cell in enumerate(row)] for row in rows]
