"""A workflow run's state as a coordinator holds it, and what one transition writes: pure, no Redis.

A `Run` is one workflow's state as the coordinator last read it; `engine` applies each input to it and
records what changed in `run.tx` (a `Transition`), which the coordinator commits with one script call.

Units are what a worker runs: `Task`, `Task#3` (a partition of a mapped task), `Task!undo` (its
compensation). Their state lives in one hash, one field per `unit|attribute` (or per packed group).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from phibroker import wire
from phibroker.engine import records
from phibroker.engine.records import split_unit
from phibroker.errors import DecodeError
from phibroker.workflow import Workflow

TASK_TERMINAL = frozenset({"succeeded", "failed", "skipped", "cancelled", "compensated", "upstream_failed"})
UNIT_LIVE = frozenset({"ready", "running", "retrying"})
WF_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
# `cancelling`: running tasks were asked to stop and the run waits for them (or for `cancel_grace`);
# `compensating`: the saga's compensations run. Nothing new starts in either, except, while a run that
# failed is cancelling, the tasks whose trigger rule fires on failure (clean-up and handlers).
WF_WINDING_DOWN = WF_TERMINAL | {"cancelling", "compensating"}
# Rules that may fire before every upstream is done; the others wait for all of them.
EARLY_RULES = frozenset({"one_success", "one_failed"})


# A unit's attributes that always change together share one hash field (`unit|dispatch`, `unit|run`,
# `unit|end`), values joined by SEP: a task then writes six fields in its life instead of thirteen,
# and HSET on a big hash is most of what Redis spends on a task.
SEP = "\x1f"
PACKED: dict[str, tuple[str, ...]] = {
    # written by the coordinator when it dispatches; `agent`: whose workers run it (whose marks count)
    "dispatch": ("dispatch", "attempt", "dispatched", "agent"),
    # how the attempt ran, as its start mark and its result said (written when the unit ends)
    "run": ("token", "started", "entry", "worker"),
    # written by the coordinator when the unit ends; `answered`: the token of the result that ended it
    "end": ("finished", "seq", "answered"),
}
GROUP_OF = {attribute: group for group, attributes in PACKED.items() for attribute in attributes}
# A start mark, in the agent's own marks hash (`Keys.wf_marks`, written by scripts.START): the dispatch
# it started, the token of its latest start (1, then one more per reclaim), when, from which entry and
# by whom. The attempt and the reclaims follow from the token, and the dispatch's in the tasks hash.
MARK = ("dispatch", "token", "started", "entry", "worker")
MARK_BYTES = 512  # a longer mark is none (its agent's workers may write anything there), as the scripts read it
# The lost attempts a commit moves at most, and the bytes each may take: a list past these reads as none.
LOST_RECORDS = 1000
LOST_RECORD_BYTES = 4096


def mark_text(raw: bytes | None) -> str:
    """A mark as stored, as text; "" (none) for a missing one or one too long to be one."""
    return raw.decode(errors="replace") if raw and len(raw) <= MARK_BYTES else ""


_TYPES: dict[str, type] = {
    "attempt": int,
    "dispatched": float,
    "token": int,
    "started": float,
    "finished": float,
    "seq": int,
    "answered": int,
    "reclaims": int,
}


def pack_group(record: Mapping[str, Any], group: str) -> str:
    values = [record.get(a) for a in PACKED[group]]
    return SEP.join(["" if v is None else str(v) for v in values])


def unpack_group(group: str, text: str) -> dict[str, Any]:
    """The attributes of one packed field, typed; a missing, empty or unreadable part is None."""
    out: dict[str, Any] = {}
    for attribute, part in zip(PACKED[group], text.split(SEP), strict=False):
        kind = _TYPES.get(attribute)
        out[attribute] = None if part == "" else number(kind, part) if kind else part
    return out


def unpack_mark(text: str) -> dict[str, Any]:
    """A start mark's parts (None where missing), typed as the scripts read them: its token is up to 15
    ASCII digits, anything else None (an agent's workers write their marks; Lua and Python must read
    them alike)."""
    out: dict[str, Any] = dict.fromkeys(MARK)
    for attribute, part in zip(MARK, text.split(SEP), strict=False):
        if attribute == "token":
            out[attribute] = digits(part)
        elif attribute == "started":
            out[attribute] = number(float, part)
        else:
            out[attribute] = part or None
    return out


def digits(text: str) -> int | None:
    """A count as the scripts read one: up to 15 ASCII digits, else None."""
    return int(text) if text.isdigit() and text.isascii() and len(text) <= 15 else None


def marked(units: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Agent -> its units whose start marks tell more than the tasks hash: dispatched to a worker, not
    ended yet."""
    out: dict[str, list[str]] = {}
    for unit, record in units.items():
        agent = record.get("agent")
        if agent and record.get("dispatch") and record.get("state") in ("ready", "running"):
            out.setdefault(agent, []).append(unit)
    return out


def own_lost(units: Mapping[str, Mapping[str, Any]], agent: str, items: list[bytes]) -> list[bytes]:
    """History records of the lost attempts an agent's workers wrote (`unit \x1f record`, see
    scripts.START): those about the agent's own units, each written again from what it says of that
    unit, so a record a worker made up can neither name another unit nor hold what `status` cannot show."""
    own = []
    for item in items:
        unit_bytes, sep, raw = item.partition(SEP.encode())
        unit = unit_bytes.decode(errors="replace")
        if not sep or units.get(unit, {}).get("agent") != agent:
            continue
        try:
            record = wire.unpack(raw, LOST_RECORD_BYTES)
        except DecodeError:
            continue
        if not isinstance(record, dict) or record.get("unit") != unit:
            continue
        dispatched, started, finished = (_real(record.get(name)) for name in ("dispatched", "started", "finished"))
        attempt = record.get("attempt") if isinstance(record.get("attempt"), int) else None
        worker, error = (str(record.get(name))[:200] for name in ("worker", "error"))
        own.append(records.attempt(unit, attempt, worker, dispatched, started, finished or 0.0, error, False))
    return own


def _real(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def overlay_marks(units: dict[str, dict[str, Any]], marks: Mapping[str, Mapping[str, str]]) -> None:
    """Put what each unit's worker marked (agent -> unit -> mark) onto its record, as the tasks hash
    holds it: a ready unit it started is running, with that attempt's token, start and worker, and the
    attempts and reclaims its token tells of. A mark counts only in its own
    agent's hash and for the dispatch the unit runs under now: an agent's workers may write marks about
    any unit, and only their own units' marks are read."""
    for agent, by_unit in marks.items():
        for unit, text in by_unit.items():
            record = units.get(unit)
            if record is None or record.get("agent") != agent or record.get("state") not in ("ready", "running"):
                continue
            mark = unpack_mark(text)
            if mark["dispatch"] != record.get("dispatch") or not mark["token"]:
                record["token"] = 0  # not started, as the commit's guard reads it
                continue
            reclaimed = mark["token"] - 1  # since the dispatch: each reclaim is the next attempt
            record.update(token=mark["token"], started=mark["started"], entry=mark["entry"], worker=mark["worker"])
            record.update(state="running", attempt=int(record.get("attempt") or 1) + reclaimed)
            record["reclaims"] = int(record.get("reclaims") or 0) + reclaimed


def number(kind: type, text: str) -> int | float | None:
    """`text` as an int or a float, None when it is not a finite number: the tasks hash is written by
    workers too, and what one wrote there must not stop the coordinator that reads it."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value) if kind is int else value


def unit_agent(workflow: Workflow, unit: str) -> str | None:
    """The agent that runs a unit: the task's, or its compensation's when that names another."""
    task, _, is_undo = split_unit(unit)
    spec = workflow.tasks.get(task)
    if spec is None:
        return None
    if is_undo and spec.compensate is not None and spec.compensate.agent:
        return spec.compensate.agent
    return spec.agent


def timer_member(kind: str, wf_id: str, *parts: Any) -> str:
    """Timers are named by what they are for, so re-adding one replaces it and removing needs no lookup."""
    return "|".join([kind, wf_id, *map(str, parts)])


def timer_workflow(member: str) -> str:
    """The workflow a timer belongs to (see `timer_member`)."""
    return member.split("|")[1]


def new_workflow_fields(
    workflow: Workflow,
    params: dict[str, Any],
    now: float,
    depth: int = 0,
    chain: list[str] | None = None,
    parent: tuple[str, str] | None = None,
    nesting: int = 0,
) -> dict[str, Any]:
    """The workflow hash of a new run; the coordinator launches it on the submit message.

    `parent`: (run id, task) of the run whose `workflow:` task started this one as its child;
    `nesting`: how many runs it sits in (bounded by the `max_depth` setting)."""
    fields: dict[str, Any] = {
        "name": workflow.name,
        "state": "running",
        "version": 0,
        "launched": 0,
        "created_at": now,
        "depth": depth,
        "chain": chain or [],
        "spec": workflow.spec_json,
        "params": params,
    }
    if parent is not None:
        fields.update(parent=parent[0], parent_task=parent[1], nesting=nesting)
    return fields


@dataclass
class Transition:
    """Everything one input changes: fields for the workflow's hashes, and an outbox for the rest."""

    id: str = field(default_factory=wire.new_id)  # names its outbox entry
    created: float = field(default_factory=time.time)  # lets a sweep tell a stale outbox from a fresh one
    owner: str = ""  # the coordinator that commits it, and drains it unless its lease lapses first
    writes: dict[str, Any] = field(default_factory=dict)  # tasks hash: `unit|attribute` -> value
    # unit -> (agent, dispatch id, token): the start mark the unit must still have (token 0: none for
    # that dispatch), or the commit is refused and the run read again. Workers' start scripts mark
    # units in hashes of their own, which move no version.
    guards: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    # agent -> how many of its lost attempts (`Keys.wf_lost`), read with the run, this commit moves
    # (those about its own units are in `history`)
    lost_moved: dict[str, int] = field(default_factory=dict)
    # agents whose marks and lost attempts end with the run (its end, or its reopening): every agent of it
    agents: tuple[str, ...] = ()
    # the run as held is too old for an input (a worker reclaimed a unit since): read it again and apply
    # the inputs to that, committing nothing of this
    reread: bool = False
    # packed fields to write (`unit|group` -> the unit's record): packed once, when the transition is
    # committed, however many times the transition changed them
    packed: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # workflow hash
    results: dict[str, bytes] = field(default_factory=dict)
    history: list[bytes] = field(default_factory=list)
    # the outbox: effects outside the workflow's slot, drained after the commit
    dispatches: list[tuple[str, bytes]] = field(default_factory=list)  # (agent, encoded TaskMessage)
    events: list[dict[str, Any]] = field(default_factory=list)
    timers_add: dict[str, float] = field(default_factory=dict)
    timers_del: list[str] = field(default_factory=list)
    approvals_set: dict[str, bytes] = field(default_factory=dict)
    approvals_del: list[str] = field(default_factory=list)
    # running units asked to stop, (agent, unit, dispatch id): their workers are told at once, besides
    # reading the unit's `stop` field at their next heartbeat
    stops: list[tuple[str, str, str]] = field(default_factory=list)
    signals: list[dict[str, Any]] = field(default_factory=list)  # sent by handlers (ctx.signal): wf, name, data
    child_runs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (id, workflow hash) to create
    inbox: list[bytes] = field(default_factory=list)  # encoded wire.Inbox messages for other runs
    finished: bool = False  # the workflow reached its end state
    reopened: bool = False  # an ended workflow runs again (`retry`): its keys stop expiring
    bulk: bool = False  # part of a release chunked over several transitions: dispatched on the bulk lanes

    @property
    def changed(self) -> bool:
        written = self.writes or self.packed or self.meta or self.results or self.history or self.lost_moved
        return bool(written or self.has_outbox)

    def marked_agents(self) -> list[str]:
        """The agents whose marks and lost attempts the commit reads (its guards), trims, or ends with the run."""
        return sorted({*(agent for agent, _, _ in self.guards.values()), *self.lost_moved, *self.agents})

    def fields(self) -> dict[str, Any]:
        """Every field of the tasks hash this transition writes."""
        return {**self.writes, **{name: pack_group(record, group) for name, (record, group) in self.packed.items()}}

    @property
    def has_outbox(self) -> bool:
        return bool(
            self.dispatches
            or self.events
            or self.timers_add
            or self.timers_del
            or self.approvals_set
            or self.approvals_del
            or self.stops
            or self.signals
            or self.child_runs
            or self.inbox
            or self.finished
            or self.reopened
        )

    def outbox(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "owner": self.owner,
            "dispatches": self.dispatches,
            "events": self.events,
            "timers_add": self.timers_add,
            "timers_del": self.timers_del,
            "approvals_set": self.approvals_set,
            "approvals_del": self.approvals_del,
            "stops": self.stops,
            "signals": self.signals,
            "child_runs": self.child_runs,
            "inbox": self.inbox,
            "finished": self.finished,
            "reopened": self.reopened,
            "bulk": self.bulk,
        }


class Candidates:
    """Tasks that may be ready to run, handed out in file order without sorting them all each time
    (a chunked release of a ten-thousand-task fan-out asks for the next ones again and again)."""

    def __init__(self, order: Mapping[str, int]):
        self.order = order
        self._members: set[str] = set()
        self._heap: list[tuple[int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._members)

    def add(self, task: str) -> None:
        if task not in self._members:
            self._members.add(task)
            heapq.heappush(self._heap, (self.order[task], task))

    def pop(self) -> str:
        """The first in file order; raises IndexError when there is none."""
        while True:
            _, task = heapq.heappop(self._heap)
            if task in self._members:  # else discarded, or a stale copy of one added again
                self._members.remove(task)
                return task

    def clear(self) -> None:
        self._members.clear()
        self._heap.clear()


class Run:
    """One workflow's state, as read from Redis, plus counters derived from it."""

    def __init__(
        self,
        wf_id: str,
        workflow: Workflow,
        meta: dict[str, Any],
        units: dict[str, dict[str, Any]],
        raw_results: dict[str, bytes],
        limit: int = 1024 * 1024,
        max_release: int = 1000,
        cancel_grace: float = 30.0,
        max_children: int = 1000,
        max_depth: int = 10,
        signed_only: bool = False,
    ):
        self.id = wf_id
        self.base = workflow  # the file's tasks; `workflow` adds those spawned at run time
        self.workflow = workflow.with_children(meta.get("children") or {})
        self.meta = meta
        self.units = units
        self.raw_results = raw_results
        self.limit = limit  # message size limit
        self.max_release = max_release
        self.cancel_grace = cancel_grace  # how long stopped tasks may take before they count as cancelled
        self.max_children = max_children  # tasks one handler may spawn
        # `--require-signed`: a handler spawns tasks for its own agent only (another's, with a payload of
        # its choosing, would run what no signed file says); a spawned workflow needs a signed file
        self.signed_only = signed_only
        self.max_depth = max_depth  # how deep child runs may nest
        self.nesting = int(meta.get("nesting") or 0)  # how many runs this one sits in
        self.tx = Transition()
        # read from Redis after the inputs now applied to it: what it says of a unit's start is the
        # truth (the coordinator clears this once the run is held over to later inputs)
        self.fresh = True
        # agent -> how many records of attempts its workers reclaimed the next commit takes from their
        # list, and those about its own units (`Connection.read_units`), which it moves into the history
        self.lost: dict[str, tuple[int, list[bytes]]] = {}
        self.rand = random.Random()
        self._decoded: dict[str, Any] = {}
        self.depth = int(meta.get("depth") or 0)  # how many events led to this run (storm guard)
        self.chain: list[str] = meta.get("chain") or []
        self._released = 0
        self.candidates = Candidates(self.workflow.order_index)
        self.recount()

    def recount(self) -> None:
        """Derive the scheduler's counters from the units' states (on load, and when a run re-opens)."""
        deps = self.workflow.deps
        self.open_deps = {t: sum(1 for d in ds if self.state(d) not in TASK_TERMINAL) for t, ds in deps.items()}
        self.open_tasks = sum(1 for t in deps if self.state(t) not in TASK_TERMINAL)
        self.candidates.clear()
        for task, count in self.open_deps.items():
            if self.state(task) == "pending" and (count == 0 or self.fires_early(task)):
                self.candidates.add(task)

    def grow(self, children: dict[str, dict[str, Any]]) -> None:
        """Tasks spawned at run time join the run (their specs are kept in the workflow hash)."""
        kept = {**(self.meta.get("children") or {}), **children}
        self.set_meta(children=kept)
        self.workflow = self.workflow.with_children(children)
        self.candidates.order = self.workflow.order_index  # spawned tasks come last: the heap stays valid
        for child, needs in self.workflow.deps.items():
            if child in children:
                self.open_deps[child] = sum(1 for d in needs if self.state(d) not in TASK_TERMINAL)
                self.open_tasks += 1

    def shrink(self, dropped: set[str]) -> None:
        """Spawned tasks leave the run (their parent runs again, and spawns anew); call `recount` after."""
        kept = {k: v for k, v in (self.meta.get("children") or {}).items() if k not in dropped}
        self.set_meta(children=kept)
        self.workflow = self.base.with_children(kept)
        self.candidates.order = self.workflow.order_index
        for name in dropped:  # reset in Redis too: a child spawned again under this name starts afresh
            if name in self.units:
                fresh = {"error": None, "finished": None, "stop": None, "spawned": None, "iteration": None}
                fresh["exhausted"] = None
                self.set(name, state="pending", deliberate=None, tries_before=None, **fresh)

    def fires_early(self, task: str) -> bool:
        """Whether the task's rule may decide before all its upstreams are done (worth a look at each end)."""
        rule = self.workflow.tasks[task].trigger
        return not isinstance(rule, str) or rule in EARLY_RULES

    # -- reading -----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.meta.get("version", 0))

    @property
    def wf_state(self) -> str:
        return str(self.meta.get("state", "running"))

    @property
    def params(self) -> dict[str, Any]:
        return self.meta.get("params") or {}

    def unit(self, unit: str) -> dict[str, Any]:
        return self.units.setdefault(unit, {})

    def state(self, unit: str) -> str:
        return self.units.get(unit, {}).get("state", "pending")

    def result(self, unit: str) -> Any:
        if unit not in self._decoded:
            raw = self.raw_results.get(unit)
            self._decoded[unit] = None if raw is None else wire.unpack(raw, max(len(raw), 1))
        return self._decoded[unit]

    def scope(self, result: Any = None) -> dict[str, Any]:
        """What `${...}`, `when` and `expect` see."""
        return {"params": self.params, "tasks": _TaskView(self), "result": result}

    # -- writing -----------------------------------------------------------------------------------
    def begin(self, owner: str = "") -> Transition:
        """A fresh transition for the next batch of inputs (and a fresh release budget)."""
        self.tx = Transition(owner=owner)
        self._released = 0
        for agent, (read, own) in self.lost.items():  # dropped once a commit moved them (`committed`)
            self.tx.history += own
            self.tx.lost_moved[agent] = read
        return self.tx

    def committed(self, version: int) -> None:
        """The transition is stored: the run is at `version`, and the lost attempts it moved are history."""
        self.meta["version"] = version
        self.lost = {}

    def agents(self) -> tuple[str, ...]:
        """Every agent that runs a unit of this run (its tasks', spawned ones', and compensations'), or
        ran one (a spawned task dropped since)."""
        tasks = self.workflow.tasks
        found = {unit_agent(self.workflow, task) for task in tasks}
        found |= {unit_agent(self.workflow, records.undo_unit(task)) for task in tasks if tasks[task].compensate}
        found |= {record.get("agent") for record in self.units.values()}
        return tuple(sorted(str(agent) for agent in found if agent))

    def guard(self, unit: str, token: int) -> None:
        """The commit needs the unit's start mark as this transition saw it: `token` for its dispatch.
        Nothing for a unit no worker's mark can change (not dispatched to an agent)."""
        record = self.units.get(unit, {})
        agent, dispatch = record.get("agent"), record.get("dispatch")
        if agent and dispatch:
            self.tx.guards[unit] = (str(agent), str(dispatch), token)

    def hold_to_start(self, unit: str) -> None:
        """A live unit this transition ends or acts on: the commit needs its mark as this run holds it (a
        start or a reclaim since, and the run is read again, with the lost attempt and its count)."""
        record = self.units.get(unit, {})
        if unit not in self.tx.guards and record.get("state") in ("ready", "running"):
            if not self.written(unit, "dispatch"):  # dispatched by this very transition: nobody started it
                self.guard(unit, int(record.get("token") or 0))

    def reread(self) -> None:
        """Read the run again before applying this input: it was held since a worker reclaimed a unit."""
        self.tx.reread = True

    def written(self, unit: str, name: str) -> bool:
        """Whether this transition has set the unit's field: Redis does not hold it yet, so nothing
        outside the coordinator (a worker's start script) can have changed it since."""
        group = GROUP_OF.get(name)
        return f"{unit}|{group}" in self.tx.packed if group else f"{unit}|{name}" in self.tx.writes

    def set(self, unit: str, **values: Any) -> None:
        record = self.unit(unit)
        if values.get("state", "running") not in ("ready", "running") and record.get("token"):
            # what its worker's mark said of the attempt (marks are read for live units only), kept
            self.tx.packed[f"{unit}|run"] = (record, "run")
            if int(record.get("token") or 0) > 1:  # reclaimed: its attempt and reclaims moved on
                self.tx.packed[f"{unit}|dispatch"] = (record, "dispatch")
                self.tx.writes[f"{unit}|reclaims"] = record.get("reclaims") or 0
        record.update(values)
        for name, value in values.items():
            group = GROUP_OF.get(name)
            if group is None:
                self.tx.writes[f"{unit}|{name}"] = "" if value is None else value
            else:
                self.tx.packed[f"{unit}|{group}"] = (record, group)

    def set_meta(self, **values: Any) -> None:
        self.meta.update(values)
        self.tx.meta.update({k: ("" if v is None else v) for k, v in values.items()})

    def store_result(self, unit: str, raw: bytes) -> None:
        self.raw_results[unit] = raw
        self._decoded.pop(unit, None)
        self.tx.results[unit] = raw

    def event(self, type_: str, now: float, task: str | None = None, data: Any = None, **fields: Any) -> None:
        """Every state change is an event; `data` is a handler's own payload, `fields` ours."""
        self.tx.events.append(
            records.event(type_, self.id, task, fields if data is None else data, self.depth, self.chain, ts=now)
        )

    def emitted(self, type_: str, now: float, task: str, data: Any, agent: str | None) -> None:
        """An event a handler emitted with its result, which `agent`'s worker sent (as relayed events say)."""
        self.tx.events.append(records.event(type_, self.id, task, data, self.depth, self.chain, ts=now, agent=agent))

    def record_attempt(self, unit: str, now: float, error: str | None, applied: bool, **extra: Any) -> None:
        record = self.units.get(unit, {})
        self.tx.history.append(
            records.attempt(
                unit,
                record.get("attempt", 0),
                extra.pop("worker", record.get("worker")),
                record.get("dispatched"),
                extra.pop("started", record.get("started")),
                now,
                error,
                applied,
                **extra,
            )
        )


class _TaskView(Mapping[str, Any]):
    """`tasks.NAME.result` / `tasks.NAME.state` for expressions, read lazily from the run."""

    def __init__(self, run: Run):
        self._run = run

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self._run.workflow.tasks:
            raise KeyError(name)
        run = self._run
        state = run.state(name)
        error = run.units.get(name, {}).get("error") if state in ("failed", "upstream_failed") else None
        iterations = int(run.units.get(name, {}).get("iteration") or (1 if state == "succeeded" else 0))
        looping = run.workflow.tasks[name].loop is not None and iterations > 1
        result = run.result(name) if state == "succeeded" or looping else None  # a loop: the last iteration's
        view = {"state": state, "result": result, "error": error, "iterations": iterations}
        spawned = run.workflow.children_of.get(name)
        if spawned:  # `tasks.T.children.NAME.result`
            view["children"] = {child.rsplit("/", 1)[1]: self[child] for child in spawned}
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.workflow.tasks)

    def __len__(self) -> int:
        return len(self._run.workflow.tasks)
