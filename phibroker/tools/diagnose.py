"""Who serves, and what a workflow waits on: `phibroker agents` and `phibroker why`.

Each is a read-only reader plus a pure function over what it read — `agents()` -> `agent_lines()`,
`read_facts()` -> `explain()` — so explanations are tested on crafted data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from phibroker.engine.records import split_unit
from phibroker.engine.state import TASK_TERMINAL, UNIT_LIVE, WF_TERMINAL, timer_member
from phibroker.errors import UnknownWorkflow
from phibroker.settings import Settings
from phibroker.store.client import ClientStore
from phibroker.store.connection import reaching
from phibroker.store.views import Views
from phibroker.tools.styles import aligned
from phibroker.tools.watch import Plan, clock_text, plan_of, span

# -- agents -------------------------------------------------------------------------------------------


def worker_rows(now: float, leases: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every worker lease, alive or dead by Redis's clock; the last heartbeat is expiry − reclaim_after."""
    rows = []
    for consumer, info in leases.items():
        expires = float(info.get("expires") or 0)
        heartbeat = expires - float(info.get("reclaim_after") or 0) if expires else None
        rows.append(
            {
                "agent": info.get("agent"),
                "consumer": consumer,
                "host": info.get("host"),
                "pid": info.get("pid"),
                "concurrency": info.get("concurrency"),
                "in_flight": info.get("in_flight"),
                "handled": info.get("handled"),
                "stopping": bool(info.get("stopping")),
                "last_heartbeat": heartbeat,
                "since_heartbeat": None if heartbeat is None else max(0.0, now - heartbeat),
                "expires": expires,
                "alive": expires > now,
            }
        )
    return sorted(rows, key=lambda r: (str(r["agent"]), r["consumer"]))


def agents(settings: Settings) -> list[dict[str, Any]]:
    """`phibroker agents`: the worker leases, read once."""
    broker = ClientStore(settings)
    try:
        with reaching(settings):
            now, leases = broker.worker_leases()
    finally:
        broker.close()
    return worker_rows(now, leases)


def agent_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["no workers"]
    cells = []
    for r in rows:
        state = ("alive" + (", stopping" if r["stopping"] else "")) if r["alive"] else "DEAD"
        beat = "never" if r["since_heartbeat"] is None else f"{span(r['since_heartbeat'])} ago"
        busy = f"{r['in_flight']}/{r['concurrency']} busy"
        cells.append([str(r["agent"]), r["consumer"], f"pid {r['pid']}", busy, f"heartbeat {beat}", state])
    return ["  ".join(line) for line in aligned(cells)]


# -- why ----------------------------------------------------------------------------------------------


@dataclass
class Facts:
    """What `explain` needs about one workflow, read in a few round trips."""

    id: str
    now: float
    meta: dict[str, Any]
    plan: Plan
    units: dict[str, dict[str, Any]]
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # agent leases: consumer -> info
    coordinators: int = 1  # live coordinator leases
    timers: dict[str, float | None] = field(default_factory=dict)  # member -> due (Redis seconds)
    approvals: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # request id -> request
    entries: dict[str, str] = field(default_factory=dict)  # unit -> its attempt's stream entry
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)  # entry -> consumer, idle, deliveries
    streams: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # agent -> stream health
    children: dict[str, dict[str, Any]] = field(default_factory=dict)  # child run id -> its head ({} unknown)


def live_units(facts: Facts) -> list[str]:
    """Units that are ready, running or retrying, in declaration order; a mapped task's partitions stand
    for it (the task itself has no dispatch)."""
    order = {t: i for i, t in enumerate(facts.plan.deps)}
    out = [
        u
        for u, rec in facts.units.items()
        if rec.get("state") in UNIT_LIVE and not rec.get("parts") and split_unit(u)[0] in order
    ]
    return sorted(out, key=lambda u: (order[split_unit(u)[0]], u))


def read_facts(broker: ClientStore, wf_id: str) -> Facts:
    """Everything `explain` looks at, read-only: units, leases, timers, approvals, pending entries."""
    views = Views(broker)
    now, meta, units = views.workflow_state(wf_id)
    if not meta.get("spec"):
        raise UnknownWorkflow(wf_id)
    facts = Facts(wf_id, now, meta, plan_of(meta["spec"], meta.get("children")), units)
    if meta.get("state") in WF_TERMINAL:
        return facts
    _, facts.workers = broker.worker_leases()
    _, coordinators = broker.leases(broker.keys.coordinators)
    facts.coordinators = sum(1 for c in coordinators.values() if c["expires"] > now)
    live = live_units(facts)
    members = []
    for unit in live:
        rec = units[unit]
        if rec.get("state") == "retrying":
            members.append(timer_member("retry", wf_id, unit, rec.get("attempt")))
        elif unit in facts.plan.signals:
            members.append(timer_member("signal", wf_id, unit))
        elif rec.get("dispatch"):
            members.append(timer_member("deadline", wf_id, unit, rec["dispatch"]))
    if meta.get("state") == "cancelling":
        members.append(timer_member("grace", wf_id))
    facts.timers = dict(zip(members, views.timer_dues(wf_id, members), strict=True))
    children = [str(units[u]["child"]) for u in live if units[u].get("child")]
    facts.children = dict(zip(children, views.workflow_heads(children), strict=True))
    requests = [str(units[u]["approval"]) for u in live if units[u].get("approval")]
    facts.approvals = dict(zip(requests, views.approval_requests(requests), strict=True))
    by_agent: dict[str, list[str]] = {}
    for unit in live:
        agent = facts.plan.agent_of(unit)
        if agent and units[unit].get("state") in ("ready", "running"):
            by_agent.setdefault(agent, []).append(unit)
    for agent, group in by_agent.items():
        # An entry is recorded as its id in the task stream, or `bulk/ID` in the agent's bulk lane.
        lanes = {"": broker.keys.agent_tasks(agent), "bulk/": broker.keys.agent_bulk(agent)}
        facts.entries.update({u: units[u]["entry"] for u in group if units[u].get("entry")})
        for prefix, stream in lanes.items():
            unseen = {units[u]["dispatch"]: units[u].get("dispatched") or now for u in group if u not in facts.entries}
            found = views.find_dispatches(stream, unseen)
            facts.entries.update(
                {u: prefix + found[units[u]["dispatch"]] for u in group if units[u].get("dispatch") in found}
            )
        for prefix, stream in lanes.items():
            refs = [facts.entries[u] for u in group if u in facts.entries]
            ids = [r[len(prefix) :] for r in refs if r.startswith(prefix) and (prefix or "/" not in r)]
            facts.pending.update({prefix + k: v for k, v in views.pending_owners(stream, ids).items()})
    agents = sorted(by_agent)
    keys = [broker.keys.agent_tasks(a) for a in agents]
    facts.streams = dict(zip(agents, views.stream_health(keys), strict=True))
    return facts


def explain(facts: Facts) -> list[str]:
    """Why the workflow is not moving: a status line, then one line per blocker. Pure."""
    meta, now = facts.meta, facts.now
    state = str(meta.get("state"))
    plan = facts.plan
    done = sum(1 for t in plan.deps if facts.units.get(t, {}).get("state") in TASK_TERMINAL)
    if state in WF_TERMINAL:
        error = f": {meta['error']}" if meta.get("error") else ""
        return [f"{facts.id} {state}{error} — it has ended; nothing blocks it", *_upstream_failures(facts)]
    lines = [f"{facts.id} ({meta.get('name')}) is {state}: {done}/{len(plan.deps)} tasks done"]
    if not facts.coordinators:
        lines.append("no live coordinator: nothing advances until one runs (phibroker coordinator)")
    if not meta.get("launched"):
        lines.append("not started yet: no coordinator has taken its submit")
    if state == "cancelling":
        lines.append(_cancelling(facts))
    if meta.get("budget_request"):
        lines.append(_budget_request(meta))
    for unit in live_units(facts):
        stop = facts.units[unit].get("stop")
        lines.append(_unit_blocker(facts, unit) + (f"; asked to stop: {stop}" if stop else ""))
    lines += _waiting(facts)
    lines += _upstream_failures(facts)
    deadline = meta.get("deadline")
    if deadline and deadline > now:
        lines.append(f"workflow deadline: it times out at {clock_text(deadline)} (in {span(deadline - now)})")
    elif deadline:
        lines.append(f"workflow deadline passed {span(now - deadline)} ago: it times out when a coordinator runs")
    if len(lines) == 1:
        lines.append("nothing is live or waiting: the coordinator has yet to apply its last change")
    return lines


def _budget_request(meta: dict[str, Any]) -> str:
    """A passed `ask` budget: no new task starts until someone decides."""
    try:
        ask = json.loads(str(meta.get("budget_ask") or "{}"))
    except ValueError:
        ask = {}
    whose = f"task {ask.get('task')}'s budget" if ask.get("scope") == "task" else "the run's budget"
    request = meta["budget_request"]
    return f"{whose} is passed ({ask.get('line')}): no new task starts until phibroker approve {request} (or reject)"


def _cancelling(facts: Facts) -> str:
    """A run winding down: the tasks it waits to stop, and when `cancel_grace` gives up on them."""
    why = facts.meta.get("error") or "it ends early: a task with end: true succeeded"
    stopping = [u for u in live_units(facts) if facts.units[u].get("stop")]
    if not stopping:
        return f"cancelling ({why}): no task is left to stop; it ends when a coordinator applies that"
    due = facts.timers.get(timer_member("grace", facts.id))
    if due is None:
        grace = ""
    elif due > facts.now:
        grace = f"; cancel_grace ends at {clock_text(due)} (in {span(due - facts.now)}), then they count as cancelled"
    else:
        grace = f"; cancel_grace ended {span(facts.now - due)} ago: they count as cancelled when a coordinator runs"
    return f"cancelling ({why}): waits for {', '.join(stopping)} to stop{grace}"


def _unit_blocker(facts: Facts, unit: str) -> str:
    """One line for a live unit: its gate, its child run or children, its retry, a dead worker holding
    it, or where it waits."""
    rec, now = facts.units[unit], facts.now
    if unit in facts.plan.signals and rec.get("state") == "running":
        return _signal_gate(facts, unit)
    if rec.get("child") and facts.plan.kinds.get(unit) == "workflow":
        child = str(rec["child"])
        head = facts.children.get(child)
        if not head:
            return f"{unit} waits for its child run {child}, which a coordinator has yet to create"
        return f"{unit} waits for its child run {child} ({head.get('state')}): phibroker why {child}"
    if rec.get("spawned"):
        return _spawner(facts, unit)
    if rec.get("approval"):
        request = facts.approvals.get(str(rec["approval"])) or {}
        deadline = request.get("deadline")
        until = f"times out at {clock_text(deadline)} (in {span(deadline - now)})" if deadline else "no timeout"
        return f"{unit} waits for a human decision: phibroker approve {rec['approval']} (or reject); {until}"
    if rec.get("state") == "retrying":
        due = facts.timers.get(timer_member("retry", facts.id, unit, rec.get("attempt")))
        error = f" ({rec['error']})" if rec.get("error") else ""
        attempt = int(rec.get("attempt") or 1)
        if due is None:
            return f"{unit} is retrying after attempt {attempt} failed{error}, but its retry timer is missing"
        when = f"{clock_text(due)} (in {span(due - now)})"
        return f"{unit} is retrying: attempt {attempt} failed{error}; attempt {attempt + 1} fires at {when}"
    return _delivery(facts, unit)


def _signal_gate(facts: Facts, unit: str) -> str:
    """A signal gate that waits: the command that sends its signal, and when it times out."""
    name = facts.plan.signals[unit]
    due = facts.timers.get(timer_member("signal", facts.id, unit))
    until = f"times out at {clock_text(due)} (in {span(max(0.0, due - facts.now))})" if due else "no timeout"
    return f"{unit} waits for signal {name}: phibroker signal {facts.id} {name} --data '...'; {until}"


def _spawner(facts: Facts, unit: str) -> str:
    """A task whose handler spawned children: it waits for every one of them to end."""
    children = [t for t in facts.plan.deps if t.rpartition("/")[0] == unit]
    state = {c: facts.units.get(c, {}).get("state", "pending") for c in children}
    open_ = [f"{c} ({state[c]})" for c in children if state[c] not in TASK_TERMINAL]
    shown = ", ".join(open_[:5]) + (f", … (+{len(open_) - 5})" if len(open_) > 5 else "")
    return f"{unit} waits for {len(open_)} of the {len(children)} children it spawned: {shown}"


def _upstream_failures(facts: Facts, limit: int = 10) -> list[str]:
    """Each task that never ran because an upstream failed, with the failed tasks behind it."""
    state = {t: facts.units.get(t, {}).get("state", "pending") for t in facts.plan.deps}
    broken = [t for t in facts.plan.deps if state[t] == "upstream_failed"]
    lines = [f"{t} is upstream_failed (never ran): {_failed_behind(facts, state, t)}" for t in broken[:limit]]
    if len(broken) > limit:
        lines.append(f"… and {len(broken) - limit} more upstream_failed tasks")
    return lines


def _failed_behind(facts: Facts, state: Mapping[str, str], task: str) -> str:
    """The failed tasks upstream of `task`, reached through the upstream_failed ones between."""
    failed, seen, stack = [], {task}, list(facts.plan.deps[task])
    while stack:
        dep = stack.pop()
        if dep in seen:
            continue
        seen.add(dep)
        if state[dep] == "failed":
            failed.append(dep)
        elif state[dep] == "upstream_failed":
            stack.extend(facts.plan.deps[dep])
    order = {t: i for i, t in enumerate(facts.plan.deps)}
    return "; ".join(_failure(facts, t) for t in sorted(failed, key=order.__getitem__)) or "an upstream failed"


def _failure(facts: Facts, task: str) -> str:
    error = facts.units.get(task, {}).get("error")
    return f"{task} failed" + (f": {error}" if error else "")


def _delivery(facts: Facts, unit: str) -> str:
    """A ready or running unit: who holds its stream entry, and whether they are alive."""
    rec, now = facts.units[unit], facts.now
    state, agent = rec.get("state"), facts.plan.agent_of(unit)
    alive = {c: i for c, i in facts.workers.items() if i.get("agent") == agent and i["expires"] > now}
    owner = facts.pending.get(facts.entries.get(unit) or str(rec.get("entry") or ""))
    timeout = facts.timers.get(timer_member("deadline", facts.id, unit, rec.get("dispatch")))
    limit = f"; its timeout fires at {clock_text(timeout)} (in {span(timeout - now)})" if timeout else ""
    if state == "running":
        return _running(facts, unit, str(agent), alive, owner) + limit
    if owner and owner["consumer"] not in alive:
        lease = facts.workers.get(owner["consumer"], {})
        lapsed = f"lease lapsed {span(now - lease['expires'])} ago" if lease.get("expires") else "no lease"
        every = _reclaim_every(alive)
        when = f"once a {agent} worker runs (none is alive)"
        if every:
            when = f"within {span(every)} by a live {agent} worker"
        return f"{unit} ({state}) is pending on dead worker {owner['consumer']} ({lapsed}); reclaimed {when}"
    if state == "ready" and not alive:
        start = f"start one: phibroker worker --agent {agent}"
        return f"{unit} is ready, but agent {agent} has no live worker ({start}){limit}"
    if state == "ready" and owner:
        info = alive[owner["consumer"]]
        busy = f"{info.get('in_flight')}/{info.get('concurrency')} busy"
        return f"{unit} is ready, delivered to {owner['consumer']}, waiting for a free slot ({busy}){limit}"
    health = facts.streams.get(str(agent)) or {}
    lag = "unknown" if health.get("lag") is None else health["lag"]
    return f"{unit} is ready, queued on {agent}'s stream (lag {lag}) for {len(alive)} live worker(s){limit}"


def _running(
    facts: Facts, unit: str, agent: str, alive: dict[str, dict[str, Any]], owner: dict[str, Any] | None
) -> str:
    """A running unit: on whom, for how long, and — when that worker has gone silent (stopped, frozen,
    cut off) — when its lease lapses and that the task then runs again on another worker."""
    rec, now = facts.units[unit], facts.now
    worker = str(owner["consumer"] if owner else rec.get("worker"))
    ran = f" for {span(now - rec['started'])}" if rec.get("started") else ""
    lease = facts.workers.get(worker)
    silence = None if lease is None else _silence(lease, now)
    if lease is not None and silence is None:
        return f"{unit} is running on {worker}{ran}"
    every = _reclaim_every({c: i for c, i in alive.items() if c != worker})
    again = f"the task runs again once another worker of {agent} reclaims it"
    if every:
        again += f" (within {span(every)})"
    else:
        again += f" (none is alive: start one with phibroker worker --agent {agent})"
    head = f"{unit}: running on {worker}{ran}"
    if lease is None or silence is None:
        return f"{head}; its worker holds no lease — {again}"
    expires = float(lease["expires"])
    silent = f"{head}; its worker has been silent for {span(silence)}"
    if expires > now:
        return f"{silent} — its lease lapses in {span(expires - now)}, then {again}"
    return f"{silent} — its lease lapsed {span(now - expires)} ago, {again}"


def _silence(lease: Mapping[str, Any], now: float) -> float | None:
    """How long a worker has not renewed its lease, once it has missed two renewals (a live worker
    renews every max(0.05, min(reclaim_after / 4, 2)) s) or the lease has lapsed; None while it renews."""
    reclaim_after = float(lease.get("reclaim_after") or 30.0)
    expires = float(lease["expires"])
    silence = now - (expires - reclaim_after)
    renew = max(0.05, min(reclaim_after / 4, 2.0))
    return silence if silence > 2 * renew or expires <= now else None


def _reclaim_every(workers: Mapping[str, Mapping[str, Any]]) -> float | None:
    """How often the soonest of these live workers looks for dead ones' entries (None: no live worker):
    each does every max(0.25, min(reclaim_after / 2, 5)) s."""
    if not workers:
        return None
    return min(max(0.25, min(float(i.get("reclaim_after") or 30.0) / 2, 5.0)) for i in workers.values())


def _waiting(facts: Facts, limit: int = 10) -> list[str]:
    """Pending tasks held by a dependency that is live now, with the state of each unfinished one."""
    state = {t: facts.units.get(t, {}).get("state", "pending") for t in facts.plan.deps}
    lines = []
    for task, deps in facts.plan.deps.items():
        open_deps = [d for d in deps if state[d] not in TASK_TERMINAL]
        if state[task] == "pending" and any(state[d] in UNIT_LIVE for d in open_deps):
            lines.append(f"{task} (pending) waits on " + ", ".join(f"{d} ({state[d]})" for d in open_deps))
    if len(lines) > limit:
        lines = lines[:limit] + [f"… and {len(lines) - limit} more pending tasks"]
    return lines


def why_report(settings: Settings, wf_id: str) -> dict[str, Any]:
    """`phibroker why ID [--json]`: the run's state and the lines of `explain`, over facts read once."""
    broker = ClientStore(settings)
    try:
        with reaching(settings):
            facts = read_facts(broker, wf_id)
    finally:
        broker.close()
    return {"id": wf_id, "state": facts.meta.get("state"), "lines": explain(facts)}


def why(settings: Settings, wf_id: str) -> list[str]:
    """The lines of `why_report`."""
    return list(why_report(settings, wf_id)["lines"])
