"""How runs are shown on a terminal: status tables, progress while waiting, colours."""

from __future__ import annotations

import difflib
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from phibroker.errors import PhibrokerError
from phibroker.tools.styles import ago, aligned, duration_text

if TYPE_CHECKING:
    from phibroker.runtime.client import Client
    from phibroker.workflow import Workflow


def progress_printer(
    live_agents: Callable[[], set[str]], told: set[str] | None = None
) -> Callable[[dict[str, Any]], None]:
    """`submit --wait`'s progress on stderr, plus what the user can act on while it waits: an agent
    with work and no live worker, an approval to decide (each said once; `told`: said already)."""
    last = [""]
    said: set[str] = set(told or ())

    def show(status: dict[str, Any]) -> None:
        tasks = status["tasks"].values()
        done = sum(1 for t in tasks if t["state"] in ("succeeded", "failed", "skipped", "cancelled", "compensated"))
        running = sum(1 for t in tasks if t["state"] in ("running", "ready", "retrying"))
        line = f"{status['state']}: {done}/{len(status['tasks'])} tasks done, {running} in flight"
        if line != last[0]:
            click.echo(f"  {line}", err=True)
            last[0] = line
        for note in waiting_notes(status, live_agents, said):
            click.echo(note, err=True)

    return show


def waiting_notes(status: dict[str, Any], live_agents: Callable[[], set[str]], said: set[str]) -> list[str]:
    """What a run waits on that only the user can give: a worker for an agent, or a decision. `said`
    keeps what was already told, so each is told once; leases are read only while something may lack one."""
    notes = []
    busy = {t["agent"] for t in status["tasks"].values() if t["agent"] and t["state"] in ("ready", "running")}
    unsaid = {agent for agent in busy if f"agent {agent}" not in said}
    if unsaid:
        for agent in sorted(unsaid - live_agents()):
            said.add(f"agent {agent}")
            notes.append(f"no live worker for agent {agent}: start one with phibroker worker --agent {agent}")
    for name, task in status["tasks"].items():
        request = (task.get("approval") or {}).get("request")
        if request and task["state"] == "running" and f"approval {request}" not in said:
            said.add(f"approval {request}")
            notes.append(
                f"approval {request} ({name}) waits: phibroker approve {request}"
                f" / phibroker reject {request} --reason ..."
            )
    return notes


def warn_unserved(client: Client, workflow: Workflow) -> set[str]:
    """After a submit, a warning on stderr for each agent command of the run that no live worker
    advertises; the run waits for one, so it is only a warning. Returns what `progress_printer` need
    not say again. Silent when the warning cannot be read: the submit itself went through."""
    try:
        gaps = client.unserved(workflow)
    except PhibrokerError:
        return set()
    told = set()
    for gap in gaps:
        agent, command = gap["agent"], gap["command"]
        names = gap["tasks"]
        tasks = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        tasks += " waits" if len(names) == 1 else " wait"
        if not gap["workers"]:
            told.add(f"agent {agent}")
            reason = f"agent {agent} has no live worker"
            hint = f"start one: phibroker worker --agent {agent}"
        else:
            reason = f"no live worker of agent {agent} has command {command}"
            close = difflib.get_close_matches(command, gap["commands"], n=1)
            hint = f"did you mean {close[0]}?" if close else "theirs: " + ", ".join(gap["commands"][:8])
        click.echo(f"warning: {reason} ({tasks} until one does); {hint}", err=True)
    return told


def print_status(doc: dict[str, Any]) -> None:
    paint = painter()
    age = run_time(doc["created_at"], doc["finished_at"])
    click.echo(f"{doc['id']} ({doc['name']}): {paint(str(doc['state']), doc['state'])}" + (f" ({age})" if age else ""))
    if doc.get("error"):
        click.echo(f"  {doc['error']}")
    width = max((len(n) for n in doc["tasks"]), default=4)
    for name, task in doc["tasks"].items():
        state = paint(f"{task['state']:<11}", task["state"])
        line = f"  {name:<{width}}  {state} {task['agent'] or 'approval':<8} attempts {task['attempts']}"
        if task["started_at"] and task["finished_at"]:
            line += f"  {duration_text(task['finished_at'] - task['started_at'], digits=2)}"
        if task["error"] and task["state"] not in ("succeeded",):
            line += f"  {task['error']}"
        click.echo(line)


def painter() -> Callable[[str, str | None], str]:
    """Colours a state's text on a terminal; through a pipe, or with NO_COLOR set, text stays plain."""
    if os.environ.get("NO_COLOR") or not sys.stdout.isatty():
        return lambda text, state: text
    from phibroker.tools.styles import STATE_STYLES

    def paint(text: str, state: str | None) -> str:
        words = STATE_STYLES.get(state or "", "").split()  # a colour, perhaps with `bold` or `dim`
        colour = next((w for w in words if w not in ("bold", "dim")), None)
        return click.style(text, fg=colour, bold="bold" in words or None, dim="dim" in words or None) if words else text

    return paint


def run_time(created: float | None, finished: float | None) -> str:
    """`took 12ms` for a run that has ended, `for 3m05s` for one still going; empty before it is known."""
    if not created:
        return ""
    if finished:
        return f"took {duration_text(finished - created)}"
    return f"for {duration_text(time.time() - created)}"


def run_lines(rows: list[dict[str, Any]]) -> list[str]:
    """`list`: a line per run, in columns: id, name, state (coloured on a terminal), when it was
    submitted, how long it took."""
    paint = painter()
    now = time.time()
    cells = [
        [
            row["id"],
            row["name"] or "?",
            row["state"] or "?",
            ago(now - row["created_at"]) if row["created_at"] else "",
            run_time(row["created_at"], row["finished_at"]),
        ]
        for row in rows
    ]
    lines = []
    for row, padded in zip(rows, aligned(cells), strict=True):
        padded[2] = paint(padded[2], row["state"])
        lines.append("  ".join(padded).rstrip())
    return lines


def seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f}h"
    if value >= 60:
        return f"{value / 60:.1f}m"
    return f"{value:g}s"
