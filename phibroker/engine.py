"""The workflow state machine: pure Python, no Redis.

A `Run` is one workflow's state as the coordinator last read it. Each input — the submit, a result, a
timer, a cancel, an approval decision — is applied to the run by one function here, which records what
changed in `run.tx` (a `Transition`). The coordinator commits that transition with one script call that
checks the run's version, so a decision made on a stale view is thrown away and made again.

Units are what a worker runs: `Task`, `Task#3` (a partition of a mapped task), `Task!undo` (its
compensation). Their state lives in one hash, one field per `unit|attribute`.
"""

from __future__ import annotations

import heapq
import random
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from phibroker import wire
from phibroker.errors import DecodeError, MessageTooLarge
from phibroker.workflow import Workflow

TASK_TERMINAL = frozenset({"succeeded", "failed", "skipped", "cancelled", "compensated"})
UNIT_LIVE = frozenset({"ready", "running", "retrying"})
WF_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
WF_WINDING_DOWN = WF_TERMINAL | {"compensating"}


# A unit's attributes that always change together share one hash field (`unit|dispatch`, `unit|run`,
# `unit|end`), values joined by SEP: a task then writes six fields in its life instead of thirteen,
# and HSET on a big hash is most of what Redis spends on a task.
SEP = "\x1f"
PACKED: dict[str, tuple[str, ...]] = {
    "dispatch": ("dispatch", "attempt", "dispatched"),  # written by the coordinator when it dispatches
    "run": ("token", "started", "entry", "worker"),  # written by the start script (scripts.START)
    # written by the coordinator when the unit ends; `answered`: the token of the result that ended it
    "end": ("finished", "seq", "answered"),
}
GROUP_OF = {attribute: group for group, attributes in PACKED.items() for attribute in attributes}
_TYPES: dict[str, type] = {
    "attempt": int,
    "dispatched": float,
    "token": int,
    "started": float,
    "finished": float,
    "seq": int,
    "answered": int,
}


def pack_group(record: Mapping[str, Any], group: str) -> str:
    values = [record.get(a) for a in PACKED[group]]
    return SEP.join(["" if v is None else str(v) for v in values])


def unpack_group(group: str, text: str) -> dict[str, Any]:
    """The attributes of one packed field, typed; a missing or empty part is None."""
    out: dict[str, Any] = {}
    for attribute, part in zip(PACKED[group], text.split(SEP), strict=False):
        kind = _TYPES.get(attribute)
        out[attribute] = None if part == "" else (kind(float(part)) if kind is int else kind(part) if kind else part)
    return out


def unit_of(task: str, partition: int | None = None) -> str:
    return task if partition is None else f"{task}#{partition}"


def undo_unit(task: str) -> str:
    return f"{task}!undo"


def split_unit(unit: str) -> tuple[str, int | None, bool]:
    """`Task#2` -> (Task, 2, False); `Task!undo` -> (Task, None, True)."""
    if unit.endswith("!undo"):
        return unit[:-5], None, True
    task, sep, part = unit.rpartition("#")
    if sep and part.isdigit():
        return task, int(part), False
    return unit, None, False


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


def retry_delay(attempt: int, base: float, maximum: float, jitter: float, rand: random.Random) -> float:
    """Delay before retry n (n = 1 for the first retry): min(max, base·2^(n-1)) plus 0..jitter×that."""
    delay = min(maximum, base * (2 ** (attempt - 1)))
    return delay + rand.uniform(0.0, jitter * delay)


def error_text(error: Mapping[str, Any] | None) -> str:
    if not error:
        return "error"
    kind, message = error.get("type") or "Error", error.get("message") or ""
    return f"{kind}: {message}" if message else str(kind)


def new_workflow_fields(
    workflow: Workflow, params: dict[str, Any], now: float, depth: int = 0, chain: list[str] | None = None
) -> dict[str, Any]:
    """The workflow hash of a new run; the coordinator launches it on the submit message."""
    return {
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


@dataclass
class Transition:
    """Everything one input changes: fields for the workflow's hashes, and an outbox for the rest."""

    id: str = field(default_factory=wire.new_id)  # names its outbox entry
    created: float = field(default_factory=time.time)  # lets a sweep tell a stale outbox from a fresh one
    writes: dict[str, Any] = field(default_factory=dict)  # tasks hash: `unit|attribute` -> value
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
    finished: bool = False  # the workflow reached its end state
    bulk: bool = False  # part of a release chunked over several transitions: dispatched on the bulk lanes

    @property
    def changed(self) -> bool:
        return bool(self.writes or self.packed or self.meta or self.results or self.history or self.has_outbox)

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
            or self.finished
        )

    def outbox(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "dispatches": self.dispatches,
            "events": self.events,
            "timers_add": self.timers_add,
            "timers_del": self.timers_del,
            "approvals_set": self.approvals_set,
            "approvals_del": self.approvals_del,
            "finished": self.finished,
            "bulk": self.bulk,
        }


class Candidates:
    """Tasks that may be ready to run, handed out in file order without sorting them all each time
    (a chunked release of a ten-thousand-task fan-out asks for the next ones again and again)."""

    def __init__(self, order: Mapping[str, int]):
        self._order = order
        self._members: set[str] = set()
        self._heap: list[tuple[int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, task: object) -> bool:
        return task in self._members

    def add(self, task: str) -> None:
        if task not in self._members:
            self._members.add(task)
            heapq.heappush(self._heap, (self._order[task], task))

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
    ):
        self.id = wf_id
        self.workflow = workflow
        self.meta = meta
        self.units = units
        self.raw_results = raw_results
        self.limit = limit  # message size limit
        self.max_release = max_release
        self.tx = Transition()
        self.rand = random.Random()
        self._decoded: dict[str, Any] = {}
        self.depth = int(meta.get("depth") or 0)  # how many events led to this run (storm guard)
        self.chain: list[str] = meta.get("chain") or []
        self._released = 0
        deps = workflow.deps
        self.open_deps = {t: sum(1 for d in ds if self.state(d) not in TASK_TERMINAL) for t, ds in deps.items()}
        self.open_tasks = sum(1 for t in deps if self.state(t) not in TASK_TERMINAL)
        self.candidates = Candidates(workflow.order_index)
        for task, count in self.open_deps.items():
            if self.state(task) == "pending" and (count == 0 or workflow.tasks[task].trigger == "one_success"):
                self.candidates.add(task)

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
    def set(self, unit: str, **values: Any) -> None:
        record = self.unit(unit)
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
            {
                "id": wire.new_id(),
                "type": type_,
                "workflow": self.id,
                "task": task,
                "data": fields if data is None else data,
                "ts": now,
                "depth": self.depth,
                "chain": self.chain,
            }
        )

    def record_attempt(self, unit: str, now: float, error: str | None, applied: bool, **extra: Any) -> None:
        record = self.units.get(unit, {})
        entry = {
            "unit": unit,
            "attempt": record.get("attempt", 0),
            "worker": extra.pop("worker", record.get("worker")),
            "dispatched": record.get("dispatched"),
            "started": extra.pop("started", record.get("started")),
            "finished": now,
            "error": error,
            "applied": applied,
            **extra,
        }
        self.tx.history.append(wire.pack(entry))


class _TaskView(Mapping[str, Any]):
    """`tasks.NAME.result` / `tasks.NAME.state` for expressions, read lazily from the run."""

    def __init__(self, run: Run):
        self._run = run

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self._run.workflow.tasks:
            raise KeyError(name)
        state = self._run.state(name)
        return {"state": state, "result": self._run.result(name) if state == "succeeded" else None}

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.workflow.tasks)

    def __len__(self) -> int:
        return len(self._run.workflow.tasks)


# -- inputs ---------------------------------------------------------------------------------------


def start(run: Run, now: float) -> None:
    """The submit: set the deadline and release the first tasks. A second submit changes nothing."""
    if run.meta.get("launched"):
        return
    timeout = run.workflow.spec.timeout
    deadline = now + timeout if timeout else None
    run.set_meta(launched=1, state="running", deadline=deadline)
    if deadline is not None:
        run.tx.timers_add[timer_member("wf_deadline", run.id)] = deadline
    run.event("workflow.submitted", now, name=run.workflow.name, tasks=len(run.workflow.tasks))
    advance(run, now)


def refuse(run: Run, reason: str, now: float) -> None:
    """The coordinator will not run this workflow (an unsigned or tampered file): it fails at once."""
    if run.meta.get("launched"):
        return
    run.set_meta(launched=1, error=reason)
    run.event("workflow.refused", now, reason=reason)
    for task in run.workflow.tasks:
        run.set(task, state="cancelled", error=reason)
    _finish(run, "failed", now)


def apply_result(run: Run, result: wire.Result, now: float) -> bool:
    """Apply one worker result; a duplicate or late one is recorded in the history, not applied."""
    unit = result.unit
    record = run.units.get(unit)
    current = (
        record is not None
        and record.get("dispatch") == result.id
        and record.get("state") in ("ready", "running")
        and (record.get("token", 0) in (0, result.token))
    )
    if not current:
        # The very result applied already, read again (a coordinator died before acking it).
        duplicate = record is not None and record.get("answered") == result.token
        if record is not None and record.get("dispatch") == result.id and not duplicate:
            reason = "late result of an attempt that was reclaimed or stopped"
            run.record_attempt(
                unit, now, reason, False, worker=result.worker, started=result.started, token=result.token
            )
        return False
    # What the start script wrote; the cache learns it from the result, Redis has it already.
    assert record is not None
    record.update(token=result.token, worker=result.worker, started=result.started)
    task, partition, is_undo = split_unit(unit)
    error = None if result.ok else error_text(result.error)
    value: Any = None
    if result.ok and result.value:
        try:  # checked now: dependents decode it for their inputs and templates
            value = wire.unpack(result.value, max(run.limit, len(result.value)))
        except DecodeError as exc:
            error = f"DecodeError: the result does not decode: {exc.reason}"
    if error is None and not is_undo and task in run.workflow.expect:
        if not run.workflow.expect[task].test(run.scope(result=value)):
            error = f"ExpectationFailed: {run.workflow.expect[task].source}"
    run.set(unit, answered=result.token)  # so a second copy of this result is known as one
    if error is None:
        _unit_succeeded(run, unit, result, now)
    else:
        tb = (result.error or {}).get("traceback") if not result.ok else None
        _unit_failed(run, unit, error, now, retryable=result.retry, worker=result.worker, traceback=tb)
    advance(run, now)
    return True


def apply_timer(run: Run, member: str, now: float) -> None:
    """A due timer: a retry's backoff ended, a deadline passed, an approval timed out, or more to release."""
    kind, _, rest = member.partition("|")
    parts = rest.split("|")[1:]  # after the workflow id
    if kind == "retry":
        unit, attempt = parts[0], int(parts[1])
        is_undo = split_unit(unit)[2]
        if run.state(unit) == "retrying" and run.units[unit].get("attempt") == attempt:
            if is_undo or not _winding(run):
                _dispatch_unit(run, unit, now)
    elif kind == "deadline":
        unit, dispatch = parts
        if run.state(unit) in ("ready", "running") and run.units[unit].get("dispatch") == dispatch:
            _unit_failed(run, unit, "timeout", now)
    elif kind == "continue":  # the next chunk of a big release
        run.tx.bulk = True
    elif kind == "wf_deadline":
        if run.wf_state not in WF_WINDING_DOWN:
            wind_down(run, "timed_out", now, reason="the workflow's deadline passed")
    elif kind == "approval":
        task, request = parts
        if run.state(task) == "running" and run.units[task].get("approval") == request:
            run.tx.approvals_del.append(request)
            run.event("approval.rejected", now, task, approval=request, reason="timeout")
            _unit_failed(run, task, "timeout", now)
    advance(run, now)


def cancel(run: Run, now: float, reason: str = "cancelled") -> bool:
    if run.wf_state in WF_WINDING_DOWN or not run.meta.get("launched"):
        return False
    wind_down(run, "cancelled", now, reason=reason)
    advance(run, now)
    return True


def decide(run: Run, body: Mapping[str, Any], now: float) -> str | None:
    """An approval decision the coordinator already verified; returns why it was refused, or None."""
    task, request = body["task"], body["approval"]
    record = run.units.get(task, {})
    if run.state(task) != "running" or record.get("approval") != request:
        return "already decided"
    approvers = run.workflow.tasks[task].approval.approvers  # type: ignore[union-attr]
    if approvers and body["approver"] not in approvers:
        return f"{body['approver']!r} may not decide this (approvers: {', '.join(approvers)})"
    run.tx.approvals_del.append(request)
    run.tx.timers_del.append(timer_member("approval", run.id, task, request))
    signed = str(body.get("signature", ""))[:16]  # lets the deciding client find its own verdict
    decision = {
        "approved": body["decision"] == "approve",
        "approver": body["approver"],
        "comment": body.get("comment"),
        "reason": body.get("reason"),
        "decided_at": now,
    }
    if decision["approved"]:
        run.event("approval.granted", now, task, approval=request, approver=body["approver"], decision=signed)
        run.store_result(task, wire.pack(decision))
        _task_succeeded(run, task, now)
        run.record_attempt(task, now, None, True, worker=body["approver"])
    else:
        run.event("approval.rejected", now, task, approval=request, approver=body["approver"], decision=signed)
        run.set(task, decision=wire.pack(decision))
        _unit_failed(run, task, f"rejected: {body.get('reason') or 'no reason given'}", now, worker=body["approver"])
    advance(run, now)
    return None


def lost(run: Run, unit: str, dispatch: str, reason: str, now: float) -> None:
    """A worker dead-lettered this unit's message (undecodable, or delivered too often)."""
    if run.state(unit) in ("ready", "running") and run.units[unit].get("dispatch") == dispatch:
        _unit_failed(run, unit, f"lost: {reason}", now)
        advance(run, now)


# -- the scheduler ---------------------------------------------------------------------------------


def advance(run: Run, now: float) -> None:
    """Release what can run, skip what cannot, and end the workflow when nothing is left."""
    if run.wf_state == "compensating":
        return
    if not _winding(run):
        while run.candidates and run._released < run.max_release:
            task = run.candidates.pop()
            if run.state(task) == "pending":
                _consider(run, task, now)
        if run.candidates:  # more than one transition may release: go on in the next one
            run.tx.timers_add[timer_member("continue", run.id)] = now
            run.tx.bulk = True
    if run.open_tasks == 0 and run.wf_state not in WF_WINDING_DOWN:
        failed = [t for t in run.workflow.tasks if run.state(t) == "failed"]
        if failed:
            wind_down(run, "failed", now, reason="failed: " + ", ".join(failed))
        else:
            _finish(run, "succeeded", now)
    if run.wf_state in ("running", "waiting_approval"):
        gates = any(run.state(t) == "running" for t in run.workflow.gates)
        wanted = "waiting_approval" if gates else "running"
        if wanted != run.wf_state:
            run.set_meta(state=wanted)
            if wanted == "waiting_approval":
                run.event("workflow.waiting_approval", now)


def _consider(run: Run, task: str, now: float) -> None:
    spec = run.workflow.tasks[task]
    states = [run.state(d) for d in spec.depends_on]
    verdict = _trigger(spec.trigger, states)
    if verdict == "wait":
        return
    if verdict == "skip":
        _skip(run, task, now, "upstream: " + _upstream_summary(spec.depends_on, states))
        return
    when = run.workflow.when.get(task)
    if when is not None and not when.test(run.scope()):
        _skip(run, task, now, f"when: {when.source} is false")
        return
    if spec.approval is not None:
        _open_gate(run, task, now)
    elif spec.map is not None:
        _scatter(run, task, now)
    else:
        _dispatch_unit(run, task, now)


def _trigger(rule: str, states: list[str]) -> str:
    """run / skip / wait, by the task's trigger rule over its dependencies' states."""
    if rule == "one_success":
        if "succeeded" in states:
            return "run"
        return "skip" if all(s in TASK_TERMINAL for s in states) else "wait"
    if not all(s in TASK_TERMINAL for s in states):
        return "wait"
    if rule == "all_done":
        return "run"
    if rule == "none_failed":
        return "skip" if any(s in ("failed", "cancelled") for s in states) else "run"
    return "run" if all(s == "succeeded" for s in states) else "skip"


def _upstream_summary(deps: list[str], states: list[str]) -> str:
    return ", ".join(f"{d} {s}" for d, s in zip(deps, states, strict=True) if s != "succeeded") or "not satisfied"


def _skip(run: Run, task: str, now: float, reason: str) -> None:
    run.set(task, state="skipped", finished=now, error=reason)
    run.event("task.skipped", now, task, reason=reason)
    _task_terminal(run, task)


def _dispatch_unit(run: Run, unit: str, now: float) -> None:
    """Send one attempt of a unit to its agent's stream (through the outbox)."""
    task, partition, is_undo = split_unit(unit)
    spec = run.workflow.tasks[task]
    template = run.workflow.payload.get(task)
    payload = dict(template.render(run.scope())) if template is not None else dict(spec.payload)
    agent, command = spec.agent, spec.command
    result = None
    if is_undo:
        assert spec.compensate is not None
        agent, command = spec.compensate.agent or spec.agent, spec.compensate.command
        if spec.compensate.payload:
            payload.update(spec.compensate.payload)
        result = run.result(task)
    count = None
    if partition is not None:
        count = int(run.units[task]["parts"])
        payload["items"] = _partition(run, task, partition, count)
    attempt = int(run.units.get(unit, {}).get("attempt", 0)) + 1
    timeout = run.workflow.timeout(task)
    deadline = now + timeout if timeout else None
    dispatch_id = wire.new_id()
    message = wire.TaskMessage(
        id=dispatch_id,
        wf=run.id,
        unit=unit,
        task=task,
        agent=str(agent),
        command=str(command),
        attempt=attempt,
        payload=payload,
        inputs={d: run.result(d) for d in spec.depends_on if run.state(d) == "succeeded"},
        partition=None if partition is None or count is None else [partition, count],
        deadline=deadline,
        result=result,
        depth=run.depth,
    )
    record = run.unit(unit)
    if record.get("error") is not None:
        run.set(unit, error=None)
    if record.get("token") or record.get("entry"):
        # A new attempt starts unstarted, in Redis too: a coordinator that reloads before the start
        # script runs must not hold the old attempt's token against the new attempt's result.
        run.set(unit, token=0, started=None, entry=None, worker=None)
    if record.get("answered") is not None:
        run.set(unit, answered=None)
    record["token"] = 0
    run.set(unit, state="ready", attempt=attempt, dispatch=dispatch_id, dispatched=now)
    try:
        raw = message.encode(run.limit)
    except (MessageTooLarge, TypeError) as exc:
        _unit_failed(run, unit, f"{type(exc).__name__}: {exc}", now)
        return
    run.tx.dispatches.append((str(agent), raw))
    run._released += 1
    if deadline is not None:
        run.tx.timers_add[timer_member("deadline", run.id, unit, dispatch_id)] = deadline
    run.event("task.dispatched", now, task, unit=unit, agent=agent, command=command, attempt=attempt)


def _scatter(run: Run, task: str, now: float) -> None:
    """A mapped task: split its list and dispatch one unit per partition."""
    items = run.workflow.map_over[task].render(run.scope())
    if not isinstance(items, list):
        run.set(task, attempt=1)
        _task_failed(run, task, f"map.over is not a list (got {type(items).__name__})", now)
        return
    spec_map = run.workflow.tasks[task].map
    assert spec_map is not None
    count = max(1, min(spec_map.partitions, len(items)))
    run.set(task, state="ready", parts=count, attempt=1, dispatched=now)
    run.store_result(f"{task}#items", wire.pack(items))
    for index in range(count):
        if run.state(task) != "ready":
            break  # a partition could not be sent (over the size limit): the task has failed already
        _dispatch_unit(run, unit_of(task, index), now)


def _partition(run: Run, task: str, index: int, count: int) -> list[Any]:
    items = run.result(f"{task}#items") or []
    size, extra = divmod(len(items), count)
    start = index * size + min(index, extra)
    return items[start : start + size + (1 if index < extra else 0)]


def _open_gate(run: Run, task: str, now: float) -> None:
    approval = run.workflow.tasks[task].approval
    assert approval is not None
    request = wire.new_id()
    message = str(run.workflow.approval_message[task].render(run.scope()))
    deadline = now + approval.timeout if approval.timeout else None
    run.set(task, state="running", attempt=1, approval=request, dispatched=now, started=now)
    run.tx.approvals_set[request] = wire.pack(
        {
            "id": request,
            "workflow": run.id,
            "task": task,
            "message": message,
            "deadline": deadline,
            "approvers": approval.approvers,
            "requested_at": now,
        }
    )
    if deadline is not None:
        run.tx.timers_add[timer_member("approval", run.id, task, request)] = deadline
    run.event("approval.requested", now, task, approval=request, message=message, approvers=approval.approvers)


# -- outcomes --------------------------------------------------------------------------------------


def _unit_succeeded(run: Run, unit: str, result: wire.Result, now: float) -> None:
    task, partition, is_undo = split_unit(unit)
    if run.workflow.timeout(task):  # else no deadline timer was set
        run.tx.timers_del.append(timer_member("deadline", run.id, unit, result.id))
    run.record_attempt(unit, now, None, True, worker=result.worker, started=result.started, token=result.token)
    for emitted in result.events:
        run.event(str(emitted.get("type")), now, task, data=emitted.get("data"))
    if is_undo:
        run.set(unit, state="succeeded", finished=now)
        run.set(task, state="compensated")
        run.event("task.compensated", now, task)
        _next_compensation(run, now)
        return
    run.store_result(unit, result.value or wire.pack(None))
    if partition is None:  # the unit is the task
        _task_succeeded(run, task, now)
        return
    run.set(unit, state="succeeded", finished=now)
    count = int(run.units[task]["parts"])
    parts = [unit_of(task, i) for i in range(count)]
    if all(run.state(p) == "succeeded" for p in parts):
        run.store_result(task, wire.pack([run.result(p) for p in parts]))
        _task_succeeded(run, task, now)


def _task_succeeded(run: Run, task: str, now: float) -> None:
    seq = int(run.meta.get("seq") or 0) + 1
    run.set_meta(seq=seq)
    run.set(task, state="succeeded", finished=now, seq=seq)
    run.event("task.succeeded", now, task, attempt=run.units[task].get("attempt"))
    _task_terminal(run, task)


def _unit_failed(
    run: Run,
    unit: str,
    error: str,
    now: float,
    retryable: bool = False,
    worker: str | None = None,
    traceback: str | None = None,
) -> None:
    """An attempt failed: retry it while the policy allows, else the unit fails for good."""
    task, partition, is_undo = split_unit(unit)
    record = run.unit(unit)
    if record.get("dispatch"):
        run.tx.timers_del.append(timer_member("deadline", run.id, unit, record["dispatch"]))
    due = _retry_due(run, unit, error, retryable, now)
    extra: dict[str, Any] = {"traceback": traceback} if traceback else {}
    if worker:
        extra["worker"] = worker
    if due is not None:
        extra["retry_at"] = due
    run.record_attempt(unit, now, error, True, **extra)
    if due is not None:
        attempt = int(record.get("attempt") or 1)
        run.set(unit, state="retrying", error=error, finished=now, retry_at=due)
        run.tx.timers_add[timer_member("retry", run.id, unit, attempt)] = due
        run.event("task.retrying", now, task, unit=unit, attempt=attempt, error=error, due=due)
        if partition is None and not is_undo:
            run.set(task, state="retrying")
        return
    if is_undo:
        run.set(unit, state="failed", error=error, finished=now)
        run.set(task, undo_error=error)
        run.event("task.compensation_failed", now, task, error=error)
        _next_compensation(run, now)
        return
    if partition is not None:
        run.set(unit, state="failed", error=error, finished=now)
        for index in range(int(run.units[task]["parts"])):
            _stop_unit(run, unit_of(task, index), now)
        error = f"partition {partition}: {error}"
    _task_failed(run, task, error, now)  # a plain task's unit is the task: it is marked failed there


def _retry_due(run: Run, unit: str, error: str, retryable: bool, now: float) -> float | None:
    """When the next attempt is due, or None: `Retryable` or a `retry_on` match, while attempts remain.

    `retry_on` entries match `Type: message` as case-insensitive substrings; a missed deadline's error
    is `timeout`, so the entry `timeout` matches it.
    """
    task, _, is_undo = split_unit(unit)
    if run.workflow.tasks[task].approval is not None or (_winding(run) and not is_undo):
        return None
    policy = run.workflow.retry(task)
    attempt = int(run.unit(unit).get("attempt") or 1)
    text = error.lower()
    if attempt >= policy.max_attempts or not (retryable or any(n.lower() in text for n in policy.retry_on)):
        return None
    return now + retry_delay(attempt, policy.base_delay, policy.max_delay, policy.jitter, run.rand)


def _task_failed(run: Run, task: str, error: str, now: float) -> None:
    if run.state(task) in TASK_TERMINAL:
        return  # another unit of the task failed it already
    run.set(task, state="failed", error=error, finished=now)
    run.event("task.failed", now, task, error=error)
    _task_terminal(run, task)
    if run.workflow.spec.failure == "fail_fast" and not _winding(run):
        wind_down(run, "failed", now, reason=f"task {task} failed: {error}")


def _task_terminal(run: Run, task: str) -> None:
    """Count the task done and offer its dependents to the scheduler."""
    run.open_tasks -= 1
    succeeded = run.state(task) == "succeeded"
    for child in run.workflow.dependents[task]:
        run.open_deps[child] -= 1
        if run.open_deps[child] == 0 or (succeeded and run.workflow.tasks[child].trigger == "one_success"):
            run.candidates.add(child)


def _stop_unit(run: Run, unit: str, now: float) -> None:
    """Cancel a unit that has not ended: its worker sees `ctx.cancelled`, its late result is ignored."""
    record = run.units.get(unit)
    if record is None or record.get("state") not in UNIT_LIVE:
        return
    if record.get("state") == "retrying":
        run.tx.timers_del.append(timer_member("retry", run.id, unit, record.get("attempt")))
    elif record.get("dispatch"):
        run.tx.timers_del.append(timer_member("deadline", run.id, unit, record["dispatch"]))
    run.set(unit, state="cancelled", finished=now)


def wind_down(run: Run, outcome: str, now: float, reason: str) -> None:
    """Fail, time out or cancel: nothing new starts, live units stop, then compensations run."""
    run.set_meta(outcome=outcome, error=reason, state="compensating")
    for task, spec in run.workflow.tasks.items():
        state = run.state(task)
        if state in TASK_TERMINAL:
            continue
        if spec.approval is not None and run.units.get(task, {}).get("approval") and state == "running":
            request = run.units[task]["approval"]
            run.tx.approvals_del.append(request)
            run.tx.timers_del.append(timer_member("approval", run.id, task, request))
        if spec.map is not None and run.units.get(task, {}).get("parts"):
            for index in range(int(run.units[task]["parts"])):
                _stop_unit(run, unit_of(task, index), now)
        _stop_unit(run, task, now)
        run.set(task, state="cancelled", finished=now)
        run.event("task.cancelled", now, task, reason=reason)
        run.open_tasks -= 1
    run.candidates.clear()
    undo = [t for t, spec in run.workflow.tasks.items() if spec.compensate is not None and run.state(t) == "succeeded"]
    undo.sort(key=lambda t: int(run.units[t].get("seq") or 0), reverse=True)
    run.set_meta(undo=",".join(undo))
    if undo:
        run.event("workflow.compensating", now, tasks=undo)
        _next_compensation(run, now)
    else:
        _finish(run, outcome, now)


def _next_compensation(run: Run, now: float) -> None:
    """Saga: one compensation at a time, newest completion first; the end state once all settled."""
    queue = [t for t in str(run.meta.get("undo") or "").split(",") if t]
    if not queue:
        _finish(run, str(run.meta.get("outcome") or "failed"), now)
        return
    task, rest = queue[0], queue[1:]
    run.set_meta(undo=",".join(rest))
    _dispatch_unit(run, undo_unit(task), now)


def _finish(run: Run, state: str, now: float) -> None:
    run.set_meta(state=state, finished_at=now)
    run.tx.timers_del.append(timer_member("wf_deadline", run.id))
    run.tx.timers_del.append(timer_member("continue", run.id))
    run.tx.finished = True
    data: dict[str, Any] = {"name": run.workflow.name}
    if state != "succeeded":
        data["error"] = run.meta.get("error")
    run.event(f"workflow.{state}", now, **data)


def _winding(run: Run) -> bool:
    return run.wf_state in WF_WINDING_DOWN


def describe_exception(exc: BaseException) -> dict[str, str]:
    """An exception as a result's error: type, message and the traceback, kept in the history."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:],
    }
