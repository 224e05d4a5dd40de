"""How runs are shown on a terminal: status tables, progress while waiting, colours."""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import click

from phibroker.engine.state import TASK_TERMINAL
from phibroker.errors import PhibrokerError, UnknownWorkflow
from phibroker.tools.styles import ago, aligned, duration_text, spend_text, task_notes, task_tree
from phibroker.workflow.render import SUBFLOW_SEP
from phibroker.workflow.spec import is_name

if TYPE_CHECKING:
    from phibroker.runtime.client import Client
    from phibroker.workflow import Workflow


def progress_printer(
    live_agents: Callable[[set[str]], set[str]], told: set[str] | None = None
) -> Callable[[dict[str, Any]], None]:
    """`submit --wait`'s progress on stderr, plus what the user can act on while it waits: an agent
    with work and no live worker, an approval to decide (each said once; `told`: said already)."""
    last = [""]
    said: set[str] = set(told or ())

    def show(status: dict[str, Any]) -> None:
        tasks = status["tasks"].values()
        done = sum(1 for t in tasks if t["state"] in TASK_TERMINAL)
        running = sum(1 for t in tasks if t["state"] in ("running", "ready", "retrying"))
        line = f"{status['state']}: {done}/{len(status['tasks'])} tasks done, {running} in flight"
        if line != last[0]:
            click.echo(f"  {line}", err=True)
            last[0] = line
        for note in waiting_notes(status, live_agents, said):
            click.echo(note, err=True)

    return show


def waiting_notes(status: dict[str, Any], live_agents: Callable[[set[str]], set[str]], said: set[str]) -> list[str]:
    """What a run waits on that only the user can give: a worker for an agent, a decision, a signal. `said`
    keeps what was already told, so each is told once; leases are read only while something may lack one."""
    notes = []
    busy = {t["agent"] for t in status["tasks"].values() if t["agent"] and t["state"] in ("ready", "running")}
    unsaid = {agent for agent in busy if f"agent {agent}" not in said}
    if unsaid:
        for agent in sorted(unsaid - live_agents(unsaid)):
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
        waiting = str(task.get("waiting_for") or "")
        if waiting.startswith("signal ") and task["state"] == "running" and f"{name} {waiting}" not in said:
            said.add(f"{name} {waiting}")
            signal = waiting.removeprefix("signal ")
            notes.append(f"{name} waits for signal {signal}: phibroker signal {status['id']} {signal} --data '...'")
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


def print_status(doc: dict[str, Any], workflow: Workflow | None = None) -> None:
    """A run and its tasks, for a terminal: spawned children indented under their parent, how far a
    loop went, what a gate or a `workflow:` task waits for, a task asked to stop, and the run's
    `output`. `workflow` (the run's) gives each loop its `max_iterations`."""
    paint = painter()
    age = run_time(doc["created_at"], doc["finished_at"])
    click.echo(f"{doc['id']} ({doc['name']}): {paint(str(doc['state']), doc['state'])}" + (f" ({age})" if age else ""))
    if doc.get("error"):
        click.echo(f"  {doc['error']}")
    if spend_text(doc.get("spend")):
        click.echo(f"  spent {spend_text(doc.get('spend'))}")
    if doc.get("parent"):
        click.echo(f"  child run of {doc['parent']['id']} (task {doc['parent']['task']})")
    limits = {n: t.loop.max_iterations for n, t in workflow.tasks.items() if t.loop} if workflow else {}
    rows = task_tree(doc["tasks"])
    width = max((len(name) + 2 * depth for name, depth, _ in rows), default=4)
    state_width = max([11, *(len(str(t["state"])) for t in doc["tasks"].values())])
    for name, depth, spawned in rows:
        task = doc["tasks"][name]
        state = paint(f"{task['state']:<{state_width}}", task["state"])
        shown = "  " * depth + name
        line = f"  {shown:<{width}}  {state} {runner(task):<8} attempts {task['attempts']}"
        if task["started_at"] and task["finished_at"]:
            line += f"  {duration_text(task['finished_at'] - task['started_at'], digits=2)}"
        notes = task_notes(task, limits.get(name), spawned)
        if task["error"] and task["state"] not in ("succeeded",):
            notes.append(str(task["error"]))
        click.echo("  ".join([line, *notes]))
    if doc.get("output") is not None:
        click.echo(f"output: {clipped(json.dumps(doc['output'], default=str), OUTPUT_SHOWN)}")


OUTPUT_SHOWN = 300  # characters of a run's output `status` prints; `status --json` has it whole


def runner(task: Mapping[str, Any]) -> str:
    """Who runs a task: its agent, or what kind of task it is when no agent does."""
    if task.get("agent"):
        return str(task["agent"])
    return "approval" if "approval" in task else "workflow" if "child" in task else "signal"


def clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def looped_workflow(client: Client, doc: dict[str, Any]) -> Workflow | None:
    """The run's workflow when its status shows a loop, for `print_status` to tell each loop's
    `max_iterations` (else None: one read fewer); None too when it cannot be read."""
    if not any("iterations" in task for task in doc["tasks"].values()):
        return None
    try:
        return client.workflow(str(doc["id"]))
    except PhibrokerError:
        return None


def drawn_states(client: Client, doc: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The state each task of a run's drawing shows: its own, `cancelling` while it is asked to stop,
    and for a `workflow:` task, its child run's tasks too, as `TASK::CHILD_TASK` (see `render.Figure`)."""
    states = {}
    for name, task in doc["tasks"].items():
        states[prefix + name] = "cancelling" if task.get("stopping") else str(task["state"])
        if task.get("child"):
            try:
                child = client.status(str(task["child"]))
            except UnknownWorkflow:  # not created yet, or expired
                continue
            states.update(drawn_states(client, child, prefix + name + SUBFLOW_SEP))
    return states


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
    submitted, how long it took, and what it spent if anything (rows with `spend`). A child run of a
    `workflow:` task comes right under its parent."""
    paint = painter()
    now = time.time()
    rows, depths = nested(rows)
    cells = [
        [
            "  " * (depth - 1) + "└ " + row["id"] if depth else row["id"],
            row["name"] or "?",
            row["state"] or "?",
            ago(now - row["created_at"]) if row["created_at"] else "",
            run_time(row["created_at"], row["finished_at"]),
            spend_text(row.get("spend")),
        ]
        for row, depth in zip(rows, depths, strict=True)
    ]
    lines = []
    for row, padded in zip(rows, aligned(cells), strict=True):
        padded[2] = paint(padded[2], row["state"])
        lines.append("  ".join(padded).rstrip())
    return lines


def nested(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows with each child run right under its parent (when the parent is listed too), oldest
    child first, and how deep each one sits."""
    listed = {row["id"] for row in rows}
    children: dict[str, list[dict[str, Any]]] = {}
    for row in reversed(rows):
        parent = (row.get("parent") or {}).get("id")
        if parent in listed:
            children.setdefault(str(parent), []).append(row)
    out: list[dict[str, Any]] = []
    depths: list[int] = []

    def place(row: dict[str, Any], depth: int) -> None:
        out.append(row)
        depths.append(depth)
        for child in children.get(row["id"], ()):
            place(child, depth + 1)

    for row in rows:
        if (row.get("parent") or {}).get("id") not in listed:
            place(row, 0)
    return out, depths


def seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f}h"
    if value >= 60:
        return f"{value / 60:.1f}m"
    return f"{value:g}s"


LOG_STATES = {"WARNING": "retrying", "ERROR": "failed", "CRITICAL": "failed"}  # a level's colour
_EVENT_SHOWN = 200  # characters of an event's data a `logs` line shows; `logs --json` has it whole


def output_line(record: Mapping[str, Any], paint: Callable[[str, str | None], str]) -> str:
    """`logs`: one record of a run's output on a line: the time, the unit with its attempt, then the
    chunk, the log record, or the event with its data."""
    ts = float(record.get("ts") or 0)
    when = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"
    who = str(record.get("unit") or record.get("task") or "run")
    if record.get("attempt") is not None:
        who += f" [{record['attempt']}]"
    data: Any = record.get("data")
    if record["kind"] == "chunk" or not isinstance(data, dict):  # a record of another shape: its data as it is
        text = data.rstrip("\n") if isinstance(data, str) else json.dumps(data, default=str)
    elif record["kind"] == "log":
        level = str(data.get("level"))
        text = f"{paint(level, LOG_STATES.get(level))} {data.get('logger')}: {data.get('message')}"
    else:
        kind = str(data.get("type"))
        details = data.get("data")
        if isinstance(details, dict):
            details = {k: v for k, v in details.items() if k not in ("unit", "attempt")}
        shown = f" {clipped(json.dumps(details, default=str), _EVENT_SHOWN)}" if details else ""
        agent = data.get("agent")
        by = f" from {agent}" if isinstance(agent, str) and is_name(agent) else ""  # whose worker sent it
        text = paint(f"● {kind}", kind.rpartition(".")[2]) + by + shown
    return f"{when}  {who}  {text}"
