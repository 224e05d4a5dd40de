"""Seeing what runs: the live view of `phibroker watch`.

A read-only reader plus a pure function over what it read — `snapshot()` -> `render()` — so pictures
are tested on crafted data. A watcher costs
the broker four pipelined, bounded round trips a refresh (COUNT, HRANDFIELD, size caps; never SCAN).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from statistics import fmean
from typing import Any

from rich.console import Console, ConsoleOptions, Group
from rich.live import Live
from rich.measure import Measurement
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from phibroker.engine.records import spend_of, split_unit
from phibroker.engine.state import TASK_TERMINAL, UNIT_LIVE, WF_TERMINAL
from phibroker.errors import UnknownWorkflow
from phibroker.settings import Settings
from phibroker.store.client import ClientStore
from phibroker.store.connection import CONNECTION_ERRORS, reaching
from phibroker.store.views import Views
from phibroker.tools.styles import STATE_STYLES as STYLES
from phibroker.tools.styles import spend_text, task_notes, task_tree
from phibroker.workflow import dag
from phibroker.workflow.spec import Loop, parse_duration

REFRESH = 0.5  # seconds between frames
RATE_SMOOTHING = 3.0  # seconds: messages/s is a moving average over about this long
EVENT_ENTRIES = 50  # newest log entries read a frame, of each stream of it (an entry per transition)
EVENTS_SHOWN = 15
RUNNING_READ = 50  # newest running workflows looked at
APPROVALS_READ = 20
UNIT_FIELDS_BUDGET = 50_000  # unit fields read a frame, over all workflows; past it, progress is approximate
SPEC_CAP = 1 << 20  # a bigger spec is never read by the view (its workflow shows no total or ETA)


# -- what a spec tells the view ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A workflow's graph, who runs each task, and its estimates — read once per workflow id."""

    deps: dict[str, list[str]]
    agents: dict[str, str | None]  # None: an approval gate
    commands: dict[str, str | None]
    undo_agents: dict[str, str]  # tasks with a compensation -> the agent that runs it
    estimates: dict[str, float]
    kinds: dict[str, str] = field(default_factory=dict)  # a task no agent runs -> approval, signal or workflow
    loops: dict[str, int] = field(default_factory=dict)  # a looping task -> its max_iterations
    signals: dict[str, str] = field(default_factory=dict)  # a signal gate -> the signal it waits for

    def agent_of(self, unit: str) -> str | None:
        task, _, is_undo = split_unit(unit)
        return self.undo_agents.get(task) if is_undo else self.agents.get(task)

    @property
    def all_agents(self) -> set[str]:
        return {a for a in self.agents.values() if a} | set(self.undo_agents.values())


def plan_of(spec_text: str, children: Mapping[str, dict[str, Any]] | None = None) -> Plan:
    """The plan of a spec, plus the tasks its run's handlers spawned (`children`, as the run keeps them)."""
    tasks: dict[str, dict[str, Any]] = {**(json.loads(spec_text).get("tasks") or {}), **(children or {})}
    estimates = {}
    for name, task in tasks.items():
        if task.get("estimate") is not None:
            try:
                estimates[name] = parse_duration(task["estimate"])
            except ValueError:
                pass
    return Plan(
        deps={name: list(task.get("depends_on") or []) for name, task in tasks.items()},
        agents={name: task.get("agent") for name, task in tasks.items()},
        commands={name: task.get("command") for name, task in tasks.items()},
        undo_agents={
            name: str(task["compensate"].get("agent") or task.get("agent"))
            for name, task in tasks.items()
            if isinstance(task.get("compensate"), dict)
        },
        estimates=estimates,
        kinds={name: kind for name, task in tasks.items() for kind in GATE_KINDS if task.get(kind) is not None},
        loops={name: _max_iterations(task["loop"]) for name, task in tasks.items() if task.get("loop")},
        signals={name: str(task["signal"].get("name")) for name, task in tasks.items() if task.get("signal")},
    )


GATE_KINDS = ("approval", "signal", "workflow")  # the tasks no agent runs, by the field that says so


def _max_iterations(loop: Mapping[str, Any]) -> int:
    return int(loop.get("max_iterations") or Loop(until="true").max_iterations)


def remaining_time(plan: Plan, units: Mapping[str, Mapping[str, Any]], now: float) -> tuple[float, bool]:
    """Seconds left along the critical path of the tasks not yet ended, and whether a human gate is on it.

    A task weighs its `estimate`, else the mean measured duration of the finished tasks with its command,
    else of all finished tasks, else 1 s; a running task weighs what is left of that, a retrying one
    adds the wait for its retry. A gate without an estimate weighs 0: nobody can guess a human.
    """
    state = {task: units.get(task, {}).get("state", "pending") for task in plan.deps}
    by_command: dict[str | None, list[float]] = {}
    for task, st in state.items():
        unit = units.get(task, {})
        began = unit.get("started") or unit.get("dispatched")
        if st == "succeeded" and began and unit.get("finished") and plan.agents[task]:
            by_command.setdefault(plan.commands[task], []).append(max(0.0, unit["finished"] - began))
    measured = [d for ds in by_command.values() for d in ds]
    typical = fmean(measured) if measured else 1.0
    left = [task for task, st in state.items() if st not in TASK_TERMINAL]
    weights: dict[str, float] = {}
    gated = False
    for task in left:
        unit = units.get(task, {})
        if task in plan.estimates:
            weight = plan.estimates[task]
        elif plan.agents[task] is None and plan.kinds.get(task) != "workflow":
            weight, gated = 0.0, True
        else:
            same = by_command.get(plan.commands[task])
            weight = fmean(same) if same else typical
        if state[task] == "running" and unit.get("started"):
            weight = max(0.0, weight - (now - unit["started"]))
        elif state[task] == "retrying" and unit.get("retry_at"):
            weight += max(0.0, unit["retry_at"] - now)
        weights[task] = weight
    keep = set(left)
    _, length = dag.critical_path({t: [d for d in plan.deps[t] if d in keep] for t in left}, weights)
    return length, gated


# -- the live view: snapshot ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentRow:
    name: str
    length: int | None  # None: the agent has no stream yet
    added: int | None  # entries ever added: the difference over time is messages/s
    pending: int
    lag: int | None  # None: Redis cannot tell (entries were deleted or trimmed)
    workers: int  # live leases
    dead: int  # lapsed leases not yet reclaimed
    busy: int
    slots: int
    rate: float | None = None


@dataclass(frozen=True)
class WorkflowRow:
    id: str
    state: str
    done: int
    total: int | None  # None: the spec was too big to read
    elapsed: float
    eta: float | None  # seconds; None: unknown
    gated: bool = False  # the ETA leaves out a human decision
    spent: str = ""  # what it spent (ctx.spend), `120512 tokens, cost 0.42`; "" for nothing


@dataclass(frozen=True)
class TaskRow:
    """A task of the one workflow watched; a child a handler spawned sits under its parent (`depth`)."""

    name: str
    depth: int
    state: str
    notes: str  # iteration 3/5, waiting for signal NAME, child run ID, spawned N, stopping: why, the error


@dataclass(frozen=True)
class SubRow:
    name: str
    agent: str
    event: str
    length: int
    lag: int | None
    pending: int
    dropped: int


@dataclass(frozen=True)
class Snapshot:
    taken: float  # Redis's clock
    source: str
    coordinators: int
    agents: list[AgentRow]
    workflows: list[WorkflowRow]
    running_total: int
    approvals: list[dict[str, Any]]
    approvals_total: int
    events: list[dict[str, Any]]  # oldest first
    subscriptions: list[SubRow]
    note: str = ""
    plans: dict[str, Plan] = field(default_factory=dict, repr=False)  # reused by the next snapshot
    tasks: list[TaskRow] = field(default_factory=list)  # the tasks of the one workflow watched


def snapshot(
    broker: ClientStore, previous: Snapshot | None = None, workflow: str | None = None, agent: str | None = None
) -> Snapshot:
    """Read what the view shows, in four pipelined round trips; rates come from `previous`."""
    views = Views(broker)
    head = views.overview(EVENT_ENTRIES, RUNNING_READ, APPROVALS_READ)
    now = head["now"]
    ids = [workflow] if workflow else head["running"]
    plans, rows, units = _read_workflows(views, ids, previous.plans if previous else {}, now)
    if workflow and not rows:
        raise UnknownWorkflow(workflow)
    tasks = task_rows(plans[workflow], units[workflow]) if workflow in plans and workflow in units else []
    if agent:
        rows = [r for r in rows if r.id in plans and agent in plans[r.id].all_agents]
    events = [e for e in head["events"] if _shown_event(e, workflow, agent, plans)][-EVENTS_SHOWN:]
    subs = {n: s for n, s in head["subs"].items() if agent is None or s.get("agent") == agent}
    names = _agent_names(head, plans, workflow, agent)
    keys = broker.keys
    lanes = views.stream_health([keys.agent_tasks(n) for n in names] + [keys.agent_bulk(n) for n in names])
    health = [_merged(a, b) for a, b in zip(lanes[: len(names)], lanes[len(names) :], strict=True)]
    health += views.stream_health([keys.sub(n) for n in subs])
    before = {a.name: a for a in previous.agents} if previous else {}
    then = previous.taken if previous else None
    filtered = bool(workflow or agent)
    shown = {r.id for r in rows}
    approvals = [a for a in head["approvals"] if not filtered or a.get("workflow") in shown]
    return Snapshot(
        taken=now,
        source=f"{broker.settings.shown_url} · {broker.settings.namespace}",
        coordinators=sum(1 for c in head["coordinators"].values() if c["expires"] > now),
        agents=[
            _agent_row(name, h, head["agents"], now, before.get(name), then)
            for name, h in zip(names, health[: len(names)], strict=True)
        ],
        workflows=rows,
        running_total=len(rows) if filtered else head["running_total"],
        approvals=sorted(approvals, key=lambda a: a.get("requested_at") or 0),
        approvals_total=len(approvals) if filtered else head["approvals_total"],
        events=events,
        subscriptions=[
            SubRow(n, str(s.get("agent")), str(s.get("event")), **_sub_health(h))
            for (n, s), h in zip(subs.items(), health[len(names) :], strict=True)
        ],
        note=" · ".join(f for f in (workflow and f"workflow {workflow}", agent and f"agent {agent}") if f),
        plans=plans,
        tasks=tasks,
    )


def _merged(tasks: dict[str, Any] | None, bulk: dict[str, Any] | None) -> dict[str, Any] | None:
    """An agent's two lanes as one stream: lengths, pending and drops add up; lag is unknown if either is."""
    if tasks is None or bulk is None:
        return tasks or bulk
    merged: dict[str, Any] = {
        k: tasks[k] + bulk[k] for k in ("length", "added", "pending", "dropped") if k in tasks and k in bulk
    }
    merged["lag"] = None if tasks.get("lag") is None or bulk.get("lag") is None else tasks["lag"] + bulk["lag"]
    return {**tasks, **merged}


def _read_workflows(
    views: Views, ids: list[str], known: Mapping[str, Plan], now: float
) -> tuple[dict[str, Plan], list[WorkflowRow], dict[str, dict[str, dict[str, Any]]]]:
    """Rows for the workflows `ids`: sizes first, then specs not seen before (under SPEC_CAP) and unit
    states (UNIT_FIELDS_BUDGET in all). Returns the plans to keep for the next frame, the rows, and
    the units read."""
    heads = views.workflow_heads(ids)
    cached = {i: known[i] for i in ids if i in known}
    unread = [i for i, h in zip(ids, heads, strict=True) if h and i not in cached and 0 < h["spec_size"] <= SPEC_CAP]
    budget, wanted = UNIT_FIELDS_BUDGET, []
    for wf_id, wf_head in zip(ids, heads, strict=True):
        if wf_head and (wf_id in cached or wf_id in unread) and wf_head["fields"] <= budget:
            wanted.append(wf_id)
            budget -= wf_head["fields"]
    specs, units = views.workflow_bodies(unread, wanted)
    plans = dict(cached)
    plans.update({i: plan_of(text) for i, text in zip(unread, specs, strict=True) if text})
    by_id = dict(zip(wanted, units, strict=True))
    rows = [
        _workflow_row(wf_id, wf_head, plans.get(wf_id), by_id.get(wf_id), now)
        for wf_id, wf_head in zip(ids, heads, strict=True)
        if wf_head
    ]
    return plans, rows, by_id


def task_rows(plan: Plan, units: Mapping[str, Mapping[str, Any]]) -> list[TaskRow]:
    """The watched workflow's tasks, as `status` shows them: the file's in order, each with the
    children its handler spawned (read from the units: their specs are not in the plan) under it."""
    names = [*plan.deps, *spawned_tasks(plan, units)]
    rows = []
    for name, depth, spawned in task_tree(names):
        unit = units.get(name, {})
        state = str(unit.get("state", "pending"))
        parts = [units.get(f"{name}#{i}", {}) for i in range(int(unit.get("parts") or 0))]
        if state == "ready" and any(p.get("state") == "running" for p in parts):
            state = "running"
        view: dict[str, Any] = {"child": unit.get("child"), "spend": spend_of(unit.get("spent"))}
        if name in plan.loops and unit.get("attempt"):
            view["iterations"] = int(unit.get("iteration") or 1)
        if name in plan.signals and state == "running":
            view["waiting_for"] = f"signal {plan.signals[name]}"
        stop = unit.get("stop") or next((p["stop"] for p in parts if p.get("stop")), None)
        if stop and state in UNIT_LIVE:
            view["stopping"] = stop
        notes = task_notes(view, plan.loops.get(name), spawned)
        if unit.get("error") and state in ("failed", "upstream_failed", "retrying"):
            notes.append(str(unit["error"]))
        rows.append(TaskRow(name, depth, state, "  ".join(notes)))
    return rows


def _workflow_row(
    wf_id: str, head: dict[str, Any], plan: Plan | None, units: dict[str, dict[str, Any]] | None, now: float
) -> WorkflowRow:
    state = str(head.get("state") or "?")
    elapsed = max(0.0, (head.get("finished_at") or now) - (head.get("created_at") or now))
    spent = spend_text(spend_of(head.get("spent")))
    if plan is None or units is None:  # too big to read whole: tasks succeeded so far, no ETA
        total = len(plan.deps) if plan else None
        return WorkflowRow(wf_id, state, int(head.get("seq") or 0), total, elapsed, None, spent=spent)
    tasks = [*plan.deps, *spawned_tasks(plan, units)]
    done = sum(1 for t in tasks if units.get(t, {}).get("state") in TASK_TERMINAL)
    if state in WF_TERMINAL:
        return WorkflowRow(wf_id, state, done, len(tasks), elapsed, 0.0, spent=spent)
    eta, gated = remaining_time(plan, units, now)
    return WorkflowRow(wf_id, state, done, len(tasks), elapsed, eta, gated, spent)


def spawned_tasks(plan: Plan, units: Mapping[str, Any]) -> list[str]:
    """The tasks handlers spawned in a run (`T/NAME`), by name: the plan, read once, does not have them."""
    return sorted({task for task, _, _ in map(split_unit, units) if "/" in task and task not in plan.deps})


def _agent_names(head: dict[str, Any], plans: dict[str, Plan], workflow: str | None, agent: str | None) -> list[str]:
    """Agents worth a row, found without SCAN: leases, recent dispatches, running specs, subscriptions."""
    if agent:
        return [agent]
    names = set().union(*(p.all_agents for p in plans.values()))
    if not workflow:
        names |= {str(i.get("agent")) for i in head["agents"].values() if i.get("agent")}
        names |= {str(s.get("agent")) for s in head["subs"].values() if s.get("agent")}
        for event in head["events"]:
            if event.get("type") == "task.dispatched" and isinstance(event.get("data"), dict):
                names.add(str(event["data"].get("agent")))
    return sorted(n for n in names if n and n != "None")


def _agent_row(
    name: str,
    health: dict[str, Any] | None,
    leases: dict[str, dict[str, Any]],
    now: float,
    before: AgentRow | None,
    then: float | None,
) -> AgentRow:
    mine = [info for info in leases.values() if info.get("agent") == name]
    alive = [info for info in mine if info["expires"] > now]
    added = health["added"] if health else None
    rate = None
    if before is not None and before.added is not None and added is not None and then is not None and now > then:
        if added >= before.added:  # smoothed over a few seconds: half a second alone jumps about
            rate = (added - before.added) / (now - then)
            if before.rate is not None:
                weight = 1 - math.exp(-(now - then) / RATE_SMOOTHING)
                rate = before.rate + weight * (rate - before.rate)
    return AgentRow(
        name=name,
        length=health["length"] if health else None,
        added=added,
        pending=health["pending"] if health else 0,
        lag=health["lag"] if health else None,
        workers=len(alive),
        dead=len(mine) - len(alive),
        busy=sum(int(i.get("in_flight") or 0) for i in alive),
        slots=sum(int(i.get("concurrency") or 0) for i in alive),
        rate=rate,
    )


def _sub_health(health: dict[str, Any] | None) -> dict[str, Any]:
    if health is None:
        return {"length": 0, "lag": None, "pending": 0, "dropped": 0}
    return {k: health[k] for k in ("length", "lag", "pending", "dropped")}


def _shown_event(event: dict[str, Any], workflow: str | None, agent: str | None, plans: dict[str, Plan]) -> bool:
    if workflow and event.get("workflow") != workflow:
        return False
    if agent:
        data = event.get("data")
        plan = plans.get(str(event.get("workflow")))
        owner = (data.get("agent") if isinstance(data, dict) else None) or (
            plan.agents.get(str(event.get("task"))) if plan else None
        )
        return bool(owner == agent)
    return True


# -- the live view: render -------------------------------------------------------------------------------


def render(snap: Snapshot, height: int | None = None) -> Group:
    """The whole frame, from the snapshot alone (pure). With `height`, the lists are cut to fit it."""
    header = Text.assemble(("phibroker", "bold"), "  ", clock_text(snap.taken), "  ")
    if snap.coordinators:
        header.append(f"{snap.coordinators} coordinator" + ("s" if snap.coordinators > 1 else ""))
    else:
        header.append("no live coordinator", "bold red")
    if snap.note:
        header.append(f"  {snap.note}", "cyan")
    header.append(f"  {snap.source}", "dim")
    header.no_wrap, header.overflow = True, "ellipsis"
    n_wf, n_tasks, n_ap, n_ev = _fit(snap, height)
    parts: list[Any] = [header, _agents_table(snap), _workflows_table(snap, snap.workflows[:n_wf])]
    if n_tasks:
        parts.append(_tasks_table(snap.tasks, n_tasks))
    if snap.approvals:
        parts.append(_approvals_table(snap, snap.approvals[:n_ap]))
    if snap.subscriptions:
        parts.append(_subs_table(snap))
    parts.append(_events_table(snap.events[len(snap.events) - n_ev :]))
    return Group(*parts)


def _fit(snap: Snapshot, height: int | None) -> tuple[int, int, int, int]:
    """How many workflows, tasks, approvals and events fit in `height` lines; agents and subscriptions
    always show.

    Every row is one line (nothing wraps); each table adds a title and a header line (events: no header),
    and the workflows, tasks and approvals tables an "… N more" line when they hold back rows.
    """
    if height is None:
        return len(snap.workflows), len(snap.tasks), len(snap.approvals), len(snap.events)
    free = height - 1 - (1 + 2 + max(1, len(snap.agents))) - 2 - 1  # the cursor line, header, agents, titles
    free -= (2 + len(snap.subscriptions)) if snap.subscriptions else 0
    approvals = 0
    if snap.approvals:
        approvals = min(len(snap.approvals), 5, max(1, free // 5))
        free -= 2 + approvals + (snap.approvals_total > approvals)
    workflows = min(len(snap.workflows), max(1, free // 2))
    free -= max(1, workflows) + (snap.running_total > workflows)
    tasks = max(0, min(len(snap.tasks), free * 2 // 3 - 3))  # the table is left out when no row fits
    if tasks:
        free -= 2 + tasks + (len(snap.tasks) > tasks)
    return workflows, tasks, approvals, min(len(snap.events), max(2, free))


def _table(title: str, *columns: str, header: bool = True) -> Table:
    table = Table(
        title=title, title_justify="left", title_style="bold", box=None, padding=(0, 1), pad_edge=False,
        show_header=header, header_style="dim", expand=False,
    )  # fmt: skip
    for column in columns:  # "name:nMIN" a number; "name:MIN-MAX" text that gives way when space runs out
        name, _, kind = column.partition(":")
        if kind.startswith("n"):
            table.add_column(name, justify="right", no_wrap=True, min_width=int(kind[1:] or 0) or None)
            continue
        low, _, high = kind.partition("-")
        table.add_column(name, min_width=int(low or 0) or None, max_width=int(high or 0) or None)
    return table


def _row(table: Table, *cells: Any) -> None:
    """A row whose text never wraps: what does not fit ends in an ellipsis (the column may still shrink)."""
    out = []
    for cell in cells:
        if isinstance(cell, str):
            cell = Text(cell)
        if isinstance(cell, Text):
            cell.no_wrap, cell.overflow = True, "ellipsis"
        out.append(cell)
    table.add_row(*out)


def _agents_table(snap: Snapshot) -> Table:
    table = _table("Agents", "agent:6", "stream:n", "workers:n", "busy:n", "pending:n", "lag:n", "msg/s:n")
    for a in snap.agents:
        workers = Text(str(a.workers), "" if a.workers else "bold red")
        if a.dead:
            workers.append(f" +{a.dead} dead", "red")
        rate = "…" if a.rate is None else f"{a.rate:.1f}"
        stream = "none" if a.length is None else str(a.length)
        lag = Text("unknown", "dim") if a.lag is None else str(a.lag)
        _row(table, a.name, stream, workers, f"{a.busy}/{a.slots}", str(a.pending), lag, rate)
    if not snap.agents:
        _row(table, Text("no agents yet", "dim"))
    return table


def _workflows_table(snap: Snapshot, rows: Sequence[WorkflowRow]) -> Table:
    title = f"Workflows ({snap.running_total} running)" if not snap.note else "Workflows"
    spending = any(w.spent for w in rows)  # a column only when some run reports what it spends
    columns = ["workflow:12", "state:7-16", "progress:4-12", "done:n", "elapsed:n", "ETA:n9"]
    table = _table(title, *columns, *(["spent:6-30"] if spending else []))
    for w in rows:
        total = w.total if w.total is not None else 0
        bar = ProgressBar(total=max(1, total), completed=w.done if total else 0, width=None)
        done = f"{w.done}/{w.total}" if w.total is not None else f"{w.done}✓"
        if w.eta is None:
            eta = Text("unknown", "dim")
        elif w.state in WF_TERMINAL:
            eta = Text("ended", "dim")
        else:
            eta = Text(span(w.eta) + ("+gate" if w.gated else ""))
        cells = [_Middle(w.id), Text(w.state, STYLES.get(w.state, "")), bar, done, span(w.elapsed), eta]
        _row(table, *cells, *([w.spent] if spending else []))
    hidden = snap.running_total - len(rows)
    if not rows:
        _row(table, Text("none running", "dim"))
    elif hidden > 0 and not snap.note:
        _row(table, Text(f"… {hidden} more", "dim"))
    return table


def _tasks_table(rows: Sequence[TaskRow], shown: int) -> Table:
    table = _table(f"Tasks ({len(rows)})", "task:8", "state:7-16", "detail:6")
    for t in rows[:shown]:
        _row(table, "  " * t.depth + t.name, Text(t.state, STYLES.get(t.state, "")), t.notes)
    if len(rows) > shown:
        _row(table, Text(f"… {len(rows) - shown} more", "dim"))
    return table


def _approvals_table(snap: Snapshot, rows: Sequence[dict[str, Any]]) -> Table:
    table = _table(f"Approvals ({snap.approvals_total} open)", "id:8-16", "workflow / task:10", "message:10", "due:n")
    for a in rows:
        deadline = a.get("deadline")
        due = f"in {span(deadline - snap.taken)}" if deadline else "no timeout"
        _row(table, a.get("id"), f"{a.get('workflow')} / {a.get('task')}", str(a.get("message") or ""), due)
    if snap.approvals_total > len(rows):
        _row(table, Text(f"… {snap.approvals_total - len(rows)} more", "dim"))
    return table


def _subs_table(snap: Snapshot) -> Table:
    table = _table("Subscriptions", "subscription:8", "on:6", "queued:n", "lag:n", "pending:n", "dropped:n")
    for s in snap.subscriptions:
        lag = Text("unknown", "dim") if s.lag is None else str(s.lag)
        dropped = Text(str(s.dropped), "bold red" if s.dropped else "")
        _row(table, f"{s.name} ({s.agent})", s.event, str(s.length), lag, str(s.pending), dropped)
    return table


def _events_table(events: Sequence[dict[str, Any]]) -> Table:
    table = _table("Recent events", "time:8-8", "event:10-22", "workflow:8", "task:4-16", "detail:4", header=False)
    for e in events:
        kind = str(e.get("type"))
        style = "red" if kind.endswith(("failed", "timed_out", "rejected")) else ""
        _row(
            table,
            clock_text(e.get("ts")),
            Text(kind, style),
            _Middle(e.get("workflow") or ""),
            e.get("task") or "",
            _detail(e),
        )
    if not events:
        _row(table, Text("no events yet", "dim"))
    return table


class _Middle:
    """Text that gives way in the middle, so `name-3f2a9c01bd` keeps the end that tells ids apart."""

    def __init__(self, text: str, keep: int = 10):
        self.text, self.keep = text, keep

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(len(self.text), self.keep + 4), len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        width, text = options.max_width, self.text
        if len(text) > width:
            tail = min(self.keep, width - 2)
            text = text[: width - tail - 1] + "…" + text[len(text) - tail :]
        yield Text(text, no_wrap=True, overflow="ellipsis")


def _detail(event: dict[str, Any]) -> str:
    data = event.get("data")
    if not isinstance(data, dict):
        return ""
    if event.get("type") == "task.dispatched":
        return f"→ {data.get('agent')} (try {data.get('attempt')})"
    for key in ("error", "reason", "message", "approver"):
        if data.get(key):
            return str(data[key])
    return ""


def clock_text(ts: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(float(ts))) if ts else ""


def span(seconds: float) -> str:
    """A duration for humans, compact: 0.4s, 12s, 3m05s, 2h10m."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def watch(
    settings: Settings,
    workflow: str | None = None,
    agent: str | None = None,
    once: bool = False,
    console: Console | None = None,
) -> None:
    """`phibroker watch`: redraw about twice a second until Ctrl-C; `once` prints one frame."""
    console = console or Console()
    broker = ClientStore(settings)
    try:
        with reaching(settings):
            current = snapshot(broker, None, workflow, agent)
            if once:
                time.sleep(REFRESH)  # a second look, so messages/s has something to compare
                console.print(render(snapshot(broker, current, workflow, agent)))
                return
        with Live(render(current, console.height), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(REFRESH)
                try:
                    current = snapshot(broker, current, workflow, agent)
                except CONNECTION_ERRORS as exc:
                    current = replace(current, note=f"cannot reach Redis ({type(exc).__name__}); retrying")
                live.update(render(current, console.height), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        broker.close()
