"""The workflow state machine: what each input does to a run. Pure Python, no Redis.

Each input — the submit, a result, a timer, a cancel, an approval decision — is applied to a `Run` (see
`state`) by one function here, which records what changed in `run.tx`. The coordinator commits that
transition with one script call that checks the run's version, so a decision made on a stale view is
thrown away and made again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from phibroker import wire
from phibroker.engine import budgets
from phibroker.engine.records import (
    OUTPUT,
    child_run_id,
    child_traceparent,
    error_text,
    split_unit,
    undo_unit,
    unit_of,
)
from phibroker.engine.state import (
    TASK_TERMINAL,
    UNIT_LIVE,
    WF_TERMINAL,
    WF_WINDING_DOWN,
    Run,
    new_workflow_fields,
    timer_member,
    unit_agent,
)
from phibroker.errors import DecodeError, MessageTooLarge, WorkflowFileError
from phibroker.workflow.children import SpawnError, descendants, plan_children
from phibroker.workflow.loader import SIGNED
from phibroker.workflow.rules import HANDLER_RULES, trigger_verdict, upstream_summary
from phibroker.workflow.spec import DEFAULT_RETRY_ON, TriggerRule, retries_error

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
    """The coordinator will not run this workflow (an unsigned or tampered file): it fails at once.
    One that started (and was changed since) goes no further either: its live units are cancelled now,
    those running told to stop, and no compensation runs, since its spec is not to be trusted."""
    if run.wf_state in WF_TERMINAL:
        return
    launched = run.meta.get("launched")
    run.set_meta(launched=1, error=reason)
    run.event("workflow.refused", now, reason=reason)
    if not launched:
        for task in run.workflow.tasks:
            run.set(task, state="cancelled", error=reason)
    for unit, record in list(run.units.items()) if launched else ():
        if record.get("state") in ("ready", "running") and record.get("token"):  # its worker stops it
            run.tx.stops.append((str(unit_agent(run.workflow, unit)), unit, str(record.get("dispatch"))))
    for task in list(run.workflow.tasks) if launched else ():  # as wind_down, but nothing waited for
        if run.state(task) == "pending":
            _cancel_task(run, task, now, reason)
        elif run.state(task) not in TASK_TERMINAL:
            _stop_task(run, task, now, reason, force=True)
    run.candidates.clear()
    run.tx.dispatches.clear()  # what a task ending just now would start (a loop's next turn): nothing
    _finish(run, "failed", now)


def apply_result(run: Run, result: wire.Result, now: float) -> bool:
    """Apply one worker result; a duplicate or late one is recorded in the history, not applied."""
    unit = result.unit
    record = run.units.get(unit)
    current = (
        record is not None
        and record.get("dispatch") == result.id
        and record.get("state") in ("ready", "running")
        and record.get("answered") is None  # a task waiting for its children has had its result
        and _fenced(run, unit, record.get("token"), result.token)
    )
    if not current:
        # The very result applied already, read again (a coordinator died before acking it).
        duplicate = record is not None and record.get("answered") == result.token
        if record is not None and record.get("dispatch") == result.id and not duplicate:
            reason = "late result of an attempt that was reclaimed or stopped"
            run.record_attempt(
                unit, now, reason, False, worker=result.worker, started=result.started, token=result.token
            )
        if _result_spend(run, result, now):  # what it spent was spent all the same
            advance(run, now)
        return False
    assert record is not None
    run.set(unit, token=result.token, worker=result.worker, started=result.started)  # kept past the unit's end
    _result_spend(run, result, now)
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
    children: dict[str, dict[str, Any]] = {}
    if error is None and result.spawns:
        try:
            if partition is not None or is_undo:
                raise SpawnError("only a plain task's handler may spawn (not a partition or a compensation)")
            children = plan_children(run.workflow, task, result.spawns, run.max_children)
            if run.signed_only:
                _own_agent_only(children, unit_agent(run.workflow, unit))
        except SpawnError as exc:
            error = f"SpawnError: {exc}"
    run.set(unit, answered=result.token)  # so a second copy of this result is known as one
    exhausted = _exhausted_line(run, unit)  # past a `fail` budget: it fails whatever it answered
    if error is None and exhausted is None:
        _unit_succeeded(run, unit, result, now, children)
    else:
        tb = (result.error or {}).get("traceback") if not result.ok else None
        error = error or str(exhausted)
        _unit_failed(run, unit, error, now, retryable=result.retry, worker=result.worker, traceback=tb)
    advance(run, now)
    return True


def _fenced(run: Run, unit: str, known: int | None, token: int) -> bool:
    """Whether `token` is the fencing token the start script gave this attempt. A run read from Redis
    after the result came knows it; a run held since may not (start marks move no version). Either
    way the commit is guarded on the worker's mark: a token never issued, or one a reclaim replaced
    meanwhile, fails the commit, and the run read again refuses it."""
    if known == token or (not run.fresh and not known and token == 1):  # held since: its first start
        run.guard(unit, token)
        return True
    if not run.fresh:  # a reclaim since it was read (or a token never issued): read it again to tell
        run.reread()
    return False


def _own_agent_only(children: dict[str, dict[str, Any]], agent: str | None) -> None:
    """Under `--require-signed`, a spawned task runs on its spawner's agent: another agent's, with a
    payload the handler chose, would run what no signed file says (a signed sub-workflow may)."""
    for name, spec in children.items():
        if spec.get("workflow") is None and spec.get("agent") != agent:
            raise SpawnError(
                f"child {name.rsplit('/', 1)[1]!r} on agent {spec.get('agent')!r}: under --require-signed a"
                f" spawned task runs on its spawner's agent ({agent!r}); spawn a signed workflow for others"
            )


def foreign_children(run: Run) -> str | None:
    """Under `--require-signed`, why the run's spawned tasks are not what its handlers may spawn (a task
    on another agent than its spawner's: written into the run by someone else), or None."""
    if not run.signed_only:
        return None
    by_parent: dict[str, dict[str, dict[str, Any]]] = {}
    for name, spec in (run.meta.get("children") or {}).items():
        if isinstance(spec, dict):
            by_parent.setdefault(str(name).rsplit("/", 1)[0], {})[str(name)] = spec
    try:
        for parent, children in by_parent.items():
            _own_agent_only(children, unit_agent(run.workflow, parent))
    except SpawnError as exc:
        return f"refused: tampered: {exc}"
    return None


def apply_timer(run: Run, member: str, now: float) -> None:
    """A due timer: a retry's backoff ended, a deadline passed, an approval timed out, or more to release."""
    kind, _, rest = member.partition("|")
    parts = rest.split("|")[1:]  # after the workflow id
    if kind == "retry":
        unit, attempt = parts[0], int(parts[1])
        if run.state(unit) == "retrying" and run.units[unit].get("attempt") == attempt:
            _dispatch_unit(run, unit, now)
    elif kind == "deadline":
        unit, dispatch = parts
        record = run.units[unit] if unit in run.units else {}
        if record.get("state") in ("ready", "running") and record.get("dispatch") == dispatch:
            if record.get("answered") is None:  # else it has its result and waits for its children
                _unit_failed(run, unit, "timeout", now)
    elif kind == "continue":  # the next chunk of a big release
        run.tx.bulk = True
    elif kind == "wf_deadline":
        if run.wf_state not in WF_WINDING_DOWN or _failing(run):
            wind_down(run, "timed_out", now, reason="the workflow's deadline passed")
    elif kind == "grace":  # stopped tasks had their time: they count as cancelled, late results ignored
        for task in run.workflow.tasks:
            if run.state(task) not in TASK_TERMINAL and _asked_to_stop(run, task):
                _stop_task(run, task, now, "did not stop within cancel_grace", force=True)
    elif kind == "signal":
        task = parts[0]
        if run.state(task) == "running" and run.workflow.tasks[task].signal is not None:
            _unit_failed(run, task, "timeout", now)
    elif kind == "approval":
        task, request = parts
        if run.state(task) == "running" and run.units[task].get("approval") == request:
            run.tx.approvals_del.append(request)
            run.event("approval.rejected", now, task, approval=request, reason="timeout")
            _unit_failed(run, task, "timeout", now)
    advance(run, now)


def cancel(run: Run, now: float, reason: str = "cancelled") -> bool:
    """Cancel the run: nothing new starts, running tasks are asked to stop. A run that failed and
    is still winding down (its failure handlers running) is stopped outright, and stays failed."""
    if not run.meta.get("launched") or (run.wf_state in WF_WINDING_DOWN and not _failing(run)):
        return False
    if _failing(run):  # it failed already: it stays failed, for the reason it failed
        reason = str(run.meta.get("error") or reason)
    wind_down(run, "failed" if _failing(run) else "cancelled", now, reason=reason, handlers=False)
    advance(run, now)
    return True


def cancel_tasks(run: Run, tasks: list[str], now: float, reason: str) -> list[str]:
    """Cancel some tasks of a running run (a region): pending ones at once, running ones asked to stop.

    A cancelled task counts as skipped for its dependents' rules and does not fail the run. Returns the
    tasks it cancelled or asked to stop (those already ended are left as they are)."""
    if run.wf_state in WF_WINDING_DOWN:
        return []
    touched = [t for t in tasks if t in run.workflow.tasks and run.state(t) not in TASK_TERMINAL]
    for task in touched:
        _cancel_or_stop(run, task, now, reason)
    advance(run, now)
    return touched


def declined(run: Run, unit: str, dispatch: str, now: float) -> None:
    """A worker refused to start a unit that was asked to stop before it started: it is cancelled."""
    record = run.units.get(unit)
    if record is not None and record.get("stop") and record.get("dispatch") == dispatch:
        if record.get("state") in ("ready", "running"):
            _unit_failed(run, unit, "cancelled before it started", now)
            advance(run, now)


def reopen(run: Run, now: float, from_task: str | None = None, request: str = "") -> str | None:
    """`retry`: run an ended run again from `from_task` (or from every task that did not succeed),
    with everything downstream; what succeeded upstream keeps its result. Returns why it cannot.
    `request` names the retry: a copy of one already applied changes nothing."""
    if request and request == run.meta.get("retried_by"):
        return f"run {run.id} was re-opened by this request already"
    if run.wf_state not in ("failed", "cancelled", "timed_out"):
        return f"run {run.id} is {run.wf_state}: only a failed, cancelled or timed-out run can be retried"
    if any(r.get("state") == "compensated" or split_unit(u)[2] for u, r in run.units.items()):
        return f"run {run.id} was compensated: what it did was undone, so it cannot go on from where it stopped"
    tasks = run.workflow.tasks
    if from_task is not None and from_task not in tasks:
        return f"run {run.id} has no task {from_task!r}"
    if from_task is not None and "/" in from_task:
        parent = from_task.rsplit("/", 1)[0]
        return f"{from_task} was spawned by {parent}: retry --from {parent} runs it again"
    starts = [from_task] if from_task else [t for t in tasks if run.state(t) != "succeeded"]
    again = _downstream(run, starts)
    dropped = {c for t in again for c in descendants(run.workflow, t)}  # spawned again if their parent is
    if dropped:
        run.shrink(dropped)
        again -= dropped
        tasks = run.workflow.tasks
    _fresh_allowance(run, again)
    for task in again:
        parts = int(run.units.get(task, {}).get("parts") or 0)
        for unit in [task, *(unit_of(task, i) for i in range(parts))]:
            if unit in run.units:  # a fresh retry budget, as clearing a task does in Airflow
                attempts = int(run.units[unit].get("attempt") or 0)
                run.set(unit, state="pending", error=None, finished=None, stop=None, deliberate=None, approval=None)
                run.set(unit, tries_before=attempts, reclaims=0, spawned=None, iteration=None)
    timeout = run.workflow.spec.timeout
    deadline = now + timeout if timeout else None
    run.set_meta(state="running", outcome=None, error=None, finished_at=None, undo="", deadline=deadline)
    run.set_meta(grace_at=None, retried_by=request or None)
    if deadline is not None:
        run.tx.timers_add[timer_member("wf_deadline", run.id)] = deadline
    run.tx.reopened = True
    ordered = [t for t in tasks if t in again]
    run.event("workflow.retried", now, tasks=ordered, **({"from": from_task} if from_task else {}))
    run.recount()
    advance(run, now)
    return None


def _downstream(run: Run, starts: list[str]) -> set[str]:
    """The tasks and every task that depends on them, however far down."""
    seen = set(starts)
    stack = list(starts)
    while stack:
        for user in run.workflow.dependents[stack.pop()]:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def decide(run: Run, body: Mapping[str, Any], now: float) -> str | None:
    """An approval decision the coordinator already verified; returns why it was refused, or None."""
    task, request = body["task"], body["approval"]
    if request and request == run.meta.get("budget_request"):
        _decide_budget(run, body, now)
        return None
    record = run.units.get(task, {})
    if run.state(task) != "running" or record.get("approval") != request:
        return "already decided"
    approvers = run.workflow.tasks[task].approval.approvers  # type: ignore[union-attr]
    if approvers and body["approver"] not in approvers:
        names = ", ".join(approvers)
        return f"{body['approver']!r} may not decide this (approvers: {names}; set PHIBROKER_APPROVER to one of them)"
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
        reason = f"rejected: {body.get('reason') or 'no reason given'}"
        if run.workflow.tasks[task].approval.on_reject == "skip":  # type: ignore[union-attr]
            run.record_attempt(task, now, reason, True, worker=body["approver"])
            _skip(run, task, now, reason)
        else:
            _unit_failed(run, task, reason, now, worker=body["approver"])
    advance(run, now)
    return None


def lost(run: Run, unit: str, dispatch: str, reason: str, now: float) -> None:
    """A worker dead-lettered this unit's message (undecodable, or delivered too often)."""
    record = run.units.get(unit, {})
    live = record.get("state") in ("ready", "running") and record.get("answered") is None
    if live and record.get("dispatch") == dispatch:
        _unit_failed(run, unit, f"lost: {reason}", now)
        advance(run, now)


def redispatch(run: Run, unit: str, dispatch: str, token: int, reason: str, now: float, limit: int = 10) -> None:
    """Nobody holds this attempt any more (Redis lost the writes that said who did): run it again as a
    new attempt, which counts as a reclaim, not a retry; after `limit` of them the unit fails as lost.
    `token` is the one the reconciler saw (0: not started); the commit is guarded on it, so an attempt
    that started or was reclaimed meanwhile is left alone."""
    record = run.units.get(unit, {})
    live = record.get("state") in ("ready", "running") and record.get("answered") is None
    if not live or record.get("dispatch") != dispatch or run.wf_state in WF_TERMINAL:
        return
    known = int(record.get("token") or 0)
    if known != token:  # started or reclaimed since the reconciler looked, or since this run was read
        if not run.fresh:
            run.reread()
        return
    run.guard(unit, token)
    reclaims = int(record.get("reclaims") or 0) + 1
    if record.get("stop") or reclaims >= limit:  # asked to stop: it ends as stopped (cancelled)
        _unit_failed(run, unit, f"lost: {reason}", now)
        advance(run, now)
        return
    run.record_attempt(unit, now, f"lost: {reason}", False)
    run.tx.timers_del.append(timer_member("deadline", run.id, unit, dispatch))
    run.set(unit, reclaims=reclaims, token=0, started=None, entry=None, worker=None)
    _dispatch_unit(run, unit, now)


# -- the scheduler ---------------------------------------------------------------------------------


def advance(run: Run, now: float) -> None:
    """Release what can run, decide what never will, and end the workflow when nothing is left."""
    if run.wf_state in WF_TERMINAL or run.wf_state == "compensating":
        return
    held = bool(run.meta.get("budget_request"))  # a person decides on a budget: no new task starts meanwhile
    while run.candidates and not held and run._released < run.max_release:
        task = run.candidates.pop()
        if run.state(task) == "pending":
            _consider(run, task, now)
    if run.candidates and not held:  # more than one transition may release: go on in the next one
        run.tx.timers_add[timer_member("continue", run.id)] = now
        run.tx.bulk = True
    if run.open_tasks == 0:
        if run.wf_state == "cancelling":
            _wound_down(run, now)
        else:
            failed = _failures(run)
            if failed:
                wind_down(run, "failed", now, reason="failed: " + ", ".join(failed))
            else:
                _finish(run, "succeeded", now)
    if run.wf_state in ("running", "waiting_approval"):
        gates = held or any(run.state(t) == "running" for t in run.workflow.gates)
        wanted = "waiting_approval" if gates else "running"
        if wanted != run.wf_state:
            run.set_meta(state=wanted)
            if wanted == "waiting_approval":
                run.event("workflow.waiting_approval", now)


def _failures(run: Run) -> list[str]:
    """The tasks that fail the run: any failed one, or with `outcome: leaves` the leaves that did not
    succeed or get skipped (a failure handled downstream is handled)."""
    if run.workflow.spec.outcome == "leaves":
        fine = ("succeeded", "skipped")
        leaves = [
            t for t, users in run.workflow.dependents.items() if not users and "/" not in t
        ]  # a parent speaks for its children
        return [t for t in leaves if run.state(t) not in fine and not _deliberately_cancelled(run, t)]
    return [t for t in run.workflow.tasks if run.state(t) == "failed"]


def _deliberately_cancelled(run: Run, task: str) -> bool:
    """Cancelled by `cancel --task`, `cancel_rest` or `end`: that counts as skipped, not as a failure."""
    return run.state(task) == "cancelled" and bool(run.units.get(task, {}).get("deliberate"))


def _consider(run: Run, task: str, now: float) -> None:
    spec = run.workflow.tasks[task]
    states = [run.state(d) for d in spec.depends_on]
    verdict = trigger_verdict(spec.trigger, states)
    if verdict == "wait":
        return
    if verdict != "upstream_failed" and run.wf_state == "cancelling":
        if not (verdict == "run" and _failing(run) and _handles_failure(spec.trigger)):
            _cancel_task(run, task, now, str(run.meta.get("error") or "the run is ending"))  # never starts now
            return
    if verdict == "skip":
        _skip(run, task, now, "upstream: " + upstream_summary(spec.depends_on, states))
        return
    if verdict == "upstream_failed":
        reason = "upstream failed: " + upstream_summary(spec.depends_on, states)
        run.set(task, state="upstream_failed", finished=now, error=reason)
        run.event("task.upstream_failed", now, task, reason=reason)
        _task_terminal(run, task, now)
        return
    when = run.workflow.when.get(task)
    if when is not None and not when.test(run.scope()):
        _skip(run, task, now, f"when: {when.source} is false")
        return
    if spec.approval is not None:
        _open_gate(run, task, now)
    elif spec.signal is not None:
        _await_signal(run, task, now)
    elif spec.map is not None:
        _scatter(run, task, now)
    else:
        _start(run, task, now)
    if spec.cancel_rest:  # a race: the first (or best K) won, the others are called off
        for upstream in spec.depends_on:
            if run.state(upstream) not in TASK_TERMINAL:
                _cancel_or_stop(run, upstream, now, f"cancel_rest: {task} started")


def _skip(run: Run, task: str, now: float, reason: str) -> None:
    run.set(task, state="skipped", finished=now, error=reason)
    run.event("task.skipped", now, task, reason=reason)
    _task_terminal(run, task, now)


def _cancel_task(run: Run, task: str, now: float, reason: str, deliberate: bool = False) -> None:
    """A task ends cancelled: it never started, or it stopped when asked."""
    run.set(task, state="cancelled", finished=now, error=reason)
    if deliberate:
        run.set(task, deliberate=1)
    run.event("task.cancelled", now, task, reason=reason)
    _task_terminal(run, task, now)


def _cancel_or_stop(run: Run, task: str, now: float, reason: str) -> None:
    """A deliberate cancel of one task: at once if it has not started, else it is asked to stop."""
    if run.state(task) == "pending":
        _cancel_task(run, task, now, reason, deliberate=True)
    else:
        run.set(task, deliberate=1)
        _stop_task(run, task, now, reason)


def _stop_task(run: Run, task: str, now: float, reason: str, force: bool = False) -> None:
    """Ask a started task to stop: an open gate closes, a retry waiting for its time is called off, and
    running units are asked to stop (they end when their worker answers; `force`: now, their late
    results ignored). The task ends cancelled once none of its units is live."""
    record = run.units.get(task, {})
    spec = run.workflow.tasks[task]
    if spec.approval is not None and record.get("approval") and run.state(task) == "running":
        request = record["approval"]
        run.tx.approvals_del.append(request)
        run.tx.timers_del.append(timer_member("approval", run.id, task, request))
        run.set(task, approval=None)
    elif spec.signal is not None and run.state(task) == "running":
        run.tx.timers_del.append(timer_member("signal", run.id, task))
    elif record.get("spawned"):  # its handler is done; it waits for its children: they stop instead
        run.set(task, stop=reason)
        for child in run.workflow.children_of[task]:
            if run.state(child) == "pending" and run.meta.get("outcome") == "succeeded":
                _skip(run, child, now, reason)  # `end: true`: what will not run now is skipped
            elif run.state(child) == "pending":
                _cancel_task(run, child, now, reason)
            elif run.state(child) not in TASK_TERMINAL:
                _stop_task(run, child, now, reason, force)
        return  # it ends when the last child has (`_children_settled`)
    else:
        parts = int(record.get("parts") or 0)
        units = [unit_of(task, i) for i in range(parts)] if parts else [task]
        if parts and not record.get("stop"):  # the partitions' answers end the task: they look here
            run.set(task, stop=reason)
        for unit in units:
            _stop_unit(run, unit, now, reason, force)
        if any(run.state(u) in UNIT_LIVE for u in units):
            return
        if parts and all(run.state(u) == "succeeded" for u in units):
            _gather(run, task, units, now)
            return
    _cancel_task(run, task, now, reason, deliberate=bool(record.get("deliberate")))


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
        inputs=_inputs(run, spec.depends_on),
        partition=None if partition is None or count is None else [partition, count],
        deadline=deadline,
        result=result,
        depth=run.depth,
    )
    iteration = int(run.units.get(unit, {}).get("iteration") or 1)
    if iteration > 1 and not is_undo:
        message.iteration, message.previous = iteration, run.result(task)
    record = run.unit(unit)
    if record.get("error") is not None:
        run.set(unit, error=None)
    if record.get("token") or record.get("entry"):
        # A new attempt starts unstarted, in Redis too: a coordinator that reloads before the start
        # script runs must not hold the old attempt's token against the new attempt's result.
        run.set(unit, token=0, started=None, entry=None, worker=None)
    if record.get("answered") is not None:
        run.set(unit, answered=None)
    if record.get("stop"):
        run.set(unit, stop=None)
    record["token"] = 0
    run.set(unit, state="ready", attempt=attempt, dispatch=dispatch_id, dispatched=now, agent=str(agent))
    policy = run.workflow.retry(task)  # told to the worker, which counts a failed attempt as retrying or not
    message.retries_left = max(0, policy.max_attempts - _tries(record))
    if tuple(policy.retry_on) != DEFAULT_RETRY_ON:
        message.retry_on = list(policy.retry_on)
    if run.meta.get("traceparent"):
        message.traceparent = str(run.meta["traceparent"])
    if not is_undo:  # a budget never stops a compensation: what it spends only counts
        message.budgets = _limits(run, task) or None
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


def _inputs(run: Run, upstreams: list[str]) -> dict[str, Any]:
    """The results a task gets: its succeeded upstreams', and those of the children they spawned."""
    inputs = {d: run.result(d) for d in upstreams if run.state(d) == "succeeded"}
    for upstream in upstreams:
        if upstream in run.workflow.children_of:
            for child in descendants(run.workflow, upstream):
                if run.state(child) == "succeeded":
                    inputs[child] = run.result(child)
    return inputs


def _scatter(run: Run, task: str, now: float) -> None:
    """A mapped task: split its list and dispatch one unit per partition."""
    items = run.workflow.map_over[task].render(run.scope())
    if not isinstance(items, list):
        run.set(task, attempt=1)
        _task_failed(run, task, f"map.over is not a list (got {type(items).__name__})", now)
        return
    spec_map = run.workflow.tasks[task].map
    assert spec_map is not None
    if not items:  # nothing to do is done: the result is the empty list
        run.set(task, attempt=0)
        run.store_result(task, wire.pack([]))
        _task_succeeded(run, task, now)
        return
    count = min(spec_map.partitions, len(items))
    run.set(task, state="ready", parts=count, attempt=1, dispatched=now)
    run.store_result(f"{task}#items", wire.pack(items))
    for index in range(count):
        if run.state(task) != "ready":
            break  # a partition could not be sent (over the size limit): the task has failed already
        _dispatch_unit(run, unit_of(task, index), now)


def _await_signal(run: Run, task: str, now: float) -> None:
    """A signal gate opens: it takes a signal kept for it already, or waits (until its timeout)."""
    signal = run.workflow.tasks[task].signal
    assert signal is not None
    run.set(task, state="running", attempt=1, dispatched=now, started=now)
    kept = _kept_signals(run, signal.name)
    if kept:
        _take_signal(run, task, signal.name, kept, now)
        return
    if signal.timeout:
        run.tx.timers_add[timer_member("signal", run.id, task)] = now + signal.timeout
    run.event("task.waiting", now, task, waiting_for=f"signal {signal.name}")


def signal(run: Run, name: str, data: Any, now: float, sender: str | None = None, signal_id: str = "") -> bool:
    """A named signal for the run: the first gate waiting for it takes it, else it is kept, in order,
    for the next gate of that name. False when the run has ended, or it had this signal (by its id)
    already: an inbox entry read again, an outbox carried out twice."""
    seen = list(run.result(SIGNAL_IDS) or [])
    if run.wf_state in WF_TERMINAL or (signal_id and signal_id in seen):
        return False
    if signal_id:
        run.store_result(SIGNAL_IDS, wire.pack([*seen, signal_id][-KEEP_SIGNAL_IDS:]))
    kept = [*_kept_signals(run, name), {"data": data, "sender": sender, "at": now}]
    waiting = [t for t in run.workflow.signal_gates.get(name, ()) if run.state(t) == "running"]
    if waiting:
        _take_signal(run, waiting[0], name, kept, now)
    else:
        run.store_result(_signal_field(name), wire.pack(kept))
        run.event("signal.kept", now, name=name)
    advance(run, now)
    return True


def _take_signal(run: Run, task: str, name: str, kept: list[dict[str, Any]], now: float) -> None:
    first, rest = kept[0], kept[1:]
    run.store_result(_signal_field(name), wire.pack(rest))
    run.tx.timers_del.append(timer_member("signal", run.id, task))
    run.store_result(task, wire.pack(first["data"]))
    run.record_attempt(task, now, None, True, worker=first.get("sender") or "signal")
    run.event("signal.received", now, task, name=name)
    _task_done(run, task, now)


def _kept_signals(run: Run, name: str) -> list[dict[str, Any]]:
    return list(run.result(_signal_field(name)) or [])


SIGNAL_IDS = "@signal-ids"  # the results-hash field of the ids of the signals a run has had, newest last
KEEP_SIGNAL_IDS = 1000  # a copy of a signal comes soon after it: the last thousand ids tell copies apart


def _signal_field(name: str) -> str:
    """Signals that came before their gate, kept in the results hash beside the tasks' results."""
    return f"@signal:{name}"


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


def _unit_succeeded(
    run: Run, unit: str, result: wire.Result, now: float, children: dict[str, dict[str, Any]] | None = None
) -> None:
    task, partition, is_undo = split_unit(unit)
    if run.workflow.timeout(task):  # else no deadline timer was set
        run.tx.timers_del.append(timer_member("deadline", run.id, unit, result.id))
    run.record_attempt(unit, now, None, True, worker=result.worker, started=result.started, token=result.token)
    agent = unit_agent(run.workflow, unit)
    for emitted in result.events:  # of the coordinators' own types none: they tell what only a commit may
        if wire.publishable(emitted.get("type")):
            run.emitted(str(emitted.get("type")), now, task, emitted.get("data"), agent)
    run.tx.signals.extend(result.signals)  # ctx.signal: sent once this result is applied
    if is_undo:
        run.set(unit, state="succeeded", finished=now)
        run.set(task, state="compensated")
        run.event("task.compensated", now, task)
        _next_compensation(run, now)
        return
    run.store_result(unit, result.value or wire.pack(None))
    if children:
        _adopt(run, task, children, now)
        return
    if partition is None:  # the unit is the task
        _task_done(run, task, now)
        return
    run.set(unit, state="succeeded", finished=now)
    parts = [unit_of(task, i) for i in range(int(run.units[task]["parts"]))]
    if all(run.state(p) == "succeeded" for p in parts):
        _gather(run, task, parts, now)
    elif run.units[task].get("stop") and not any(run.state(p) in UNIT_LIVE for p in parts):
        _cancel_task(run, task, now, str(run.units[task]["stop"]), bool(run.units[task].get("deliberate")))


def _adopt(run: Run, task: str, children: dict[str, dict[str, Any]], now: float) -> None:
    """The handler spawned children: they join the run as tasks, and the task waits for them all."""
    run.grow(children)
    run.set(task, spawned=len(run.workflow.children_of[task]))
    run.event("task.spawned", now, task, children=list(children))
    for child in children:  # those with no sibling to wait for can start now
        if not run.workflow.deps[child]:
            run.candidates.add(child)


def _children_settled(run: Run, task: str, now: float) -> None:
    """Every child of a spawning task has ended: it fails with the first child that failed (the cause,
    even while the run winds down), ends cancelled if it was asked to stop, fails if a child was
    cancelled by the run ending, and else succeeds (a child cancelled on purpose counts as skipped)."""
    children = run.workflow.children_of[task]
    record = run.units[task]
    failed = next((c for c in children if run.state(c) in ("failed", "upstream_failed")), None)
    if failed is not None:
        _task_failed(run, task, _child_error(run, failed, "failed"), now)
        return
    if record.get("exhausted"):  # it passed a `fail` budget (a late report of its own handler's)
        _task_failed(run, task, str(record["exhausted"]), now)
        return
    if record.get("stop"):
        _cancel_task(run, task, now, str(record["stop"]), bool(record.get("deliberate")))
        return
    fine = ("succeeded", "skipped")
    lost = next((c for c in children if run.state(c) not in fine and not _deliberately_cancelled(run, c)), None)
    if lost is None:
        _task_done(run, task, now)
    else:
        _task_failed(run, task, _child_error(run, lost, run.state(lost)), now)


def _child_error(run: Run, child: str, how: str) -> str:
    return f"child {child.rsplit('/', 1)[1]} {how}: {run.units[child].get('error')}"


def _task_done(run: Run, task: str, now: float) -> None:
    """The task's work ended well and its result is stored: a loop checks `until` and goes round
    again (the result becomes the next iteration's `ctx.previous`), anything else succeeds."""
    until = run.workflow.loop_until.get(task)
    if until is not None and not run.units[task].get("stop"):
        record = run.units[task]
        iteration = int(record.get("iteration") or 1)
        scope = {**run.scope(result=run.result(task)), "iteration": iteration}
        if not until.test(scope):
            limit = run.workflow.tasks[task].loop.max_iterations  # type: ignore[union-attr]
            if iteration >= limit:
                _task_failed(run, task, f"loop exhausted after {iteration} iterations", now)
                return
            run.set(task, iteration=iteration + 1, tries_before=int(record.get("attempt") or 0))
            run.event("task.iterated", now, task, iteration=iteration + 1)
            spawned = set(descendants(run.workflow, task))
            if spawned:  # each iteration plans afresh: the last one's children make way
                run.shrink(spawned)
                run.set(task, spawned=None)
            _start(run, task, now)
            return
    _task_succeeded(run, task, now)


def _start(run: Run, task: str, now: float) -> None:
    """Start a task's work: its agent's handler, or a sub-workflow's child run."""
    if _is_subworkflow(run, task):
        _start_child(run, task, now)
    else:
        _dispatch_unit(run, task, now)


def _gather(run: Run, task: str, parts: list[str], now: float) -> None:
    """Every partition of a mapped task succeeded: its result is theirs, in order."""
    run.store_result(task, wire.pack([run.result(p) for p in parts]))
    _task_succeeded(run, task, now)


def _task_succeeded(run: Run, task: str, now: float) -> None:
    seq = int(run.meta.get("seq") or 0) + 1
    run.set_meta(seq=seq)
    run.set(task, state="succeeded", finished=now, seq=seq)
    run.event("task.succeeded", now, task, attempt=run.units[task].get("attempt"))
    ends_the_run = run.workflow.tasks[task].end
    _task_terminal(run, task, now)  # may start a loop's next iteration, which drops this task if it was a child
    if ends_the_run and run.wf_state in ("running", "waiting_approval"):
        wind_down(run, "succeeded", now, reason=f"{task} ended the run")


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
    run.hold_to_start(unit)  # its attempt, worker and start as they are now, or the run is read again
    record = run.unit(unit)
    if record.get("dispatch"):
        run.tx.timers_del.append(timer_member("deadline", run.id, unit, record["dispatch"]))
    exhausted = _exhausted_line(run, unit)
    if exhausted is not None:  # past a `fail` budget: it fails with the budget's line, never retried
        _budget_failed(run, unit, exhausted, now, worker, traceback)
        return
    if record.get("stop"):  # asked to stop, it did: cancelled, not failed, and not retried
        _stopped(run, unit, error, now, worker)
        return
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
            _stop_unit(run, unit_of(task, index), now, "another partition failed", force=True)
        error = f"partition {partition}: {error}"
    _task_failed(run, task, error, now)  # a plain task's unit is the task: it is marked failed there


def _stopped(run: Run, unit: str, error: str, now: float, worker: str | None) -> None:
    """A unit asked to stop ended without a result: cancelled, and its task once no unit is live."""
    task, partition, _ = split_unit(unit)
    run.record_attempt(unit, now, error, True, **({"worker": worker} if worker else {}))
    if partition is not None:
        run.set(unit, state="cancelled", finished=now, error=error)
        if any(run.state(unit_of(task, i)) in UNIT_LIVE for i in range(int(run.units[task]["parts"]))):
            return
    record = run.units[task]
    _cancel_task(run, task, now, str(record.get("stop") or error), bool(record.get("deliberate")))


def _retry_due(run: Run, unit: str, error: str, retryable: bool, now: float) -> float | None:
    """When the next attempt is due, or None: `Retryable` or a `retry_on` match, while attempts remain.

    `retry_on` entries match `Type: message` as case-insensitive substrings; a missed deadline's error
    is `timeout`, so the entry `timeout` matches it.
    """
    task, _, is_undo = split_unit(unit)
    if run.workflow.tasks[task].is_gate:  # a person's or a signal's answer is not retried
        return None
    if error.startswith(("budget_exhausted", "BudgetExhausted")):  # whatever `retry_on` says
        return None
    if run.wf_state == "cancelling" and not _failing(run):
        return None  # cancelled or timed out: nothing starts again
    policy = run.workflow.retry(task)
    tries = _tries(run.unit(unit))
    if tries >= policy.max_attempts or not retries_error(policy.retry_on, error, retryable):
        return None
    return now + policy.delay(tries, run.rand)


def _tries(record: Mapping[str, Any]) -> int:
    """The attempts of a unit that count against its retry budget: reclaims are not retries, and each
    iteration of a loop has the whole budget."""
    return int(record.get("attempt") or 1) - int(record.get("reclaims") or 0) - int(record.get("tries_before") or 0)


def _task_failed(run: Run, task: str, error: str, now: float) -> None:
    if run.state(task) in TASK_TERMINAL:
        return  # another unit of the task failed it already
    _fail_task(run, task, error, now)


def _fail_task(run: Run, task: str, error: str, now: float) -> None:
    run.set(task, state="failed", error=error, finished=now)
    run.event("task.failed", now, task, error=error)
    _task_terminal(run, task, now)
    if run.workflow.spec.failure == "fail_fast" and run.wf_state in ("running", "waiting_approval"):
        wind_down(run, "failed", now, reason=f"task {task} failed: {error}")


def _task_terminal(run: Run, task: str, now: float) -> None:
    """Count the task done and offer its dependents to the scheduler."""
    run.open_tasks -= 1
    for child in run.workflow.dependents[task]:
        run.open_deps[child] -= 1
        if run.open_deps[child] == 0 or run.fires_early(child):
            run.candidates.add(child)
    parent, slash, _ = task.rpartition("/")
    if slash and run.state(parent) not in TASK_TERMINAL:
        if all(run.state(c) in TASK_TERMINAL for c in run.workflow.children_of[parent]):
            _children_settled(run, parent, now)


def _stop_unit(run: Run, unit: str, now: float, reason: str, force: bool = False) -> None:
    """Stop a live unit. One waiting to retry, or not started yet, is cancelled at once; one started is
    asked to stop (its worker sees `ctx.cancelled`) and ends when its worker answers: a result is
    applied, an error makes it cancelled. `force`: cancelled now, whatever it still sends ignored."""
    if _is_subworkflow(run, unit):
        _stop_child(run, unit, now, reason, force)
        return
    record = run.units.get(unit)
    if record is None or record.get("state") not in UNIT_LIVE:
        return
    started = record.get("state") == "running" or record.get("token")
    if record.get("state") == "retrying":
        run.tx.timers_del.append(timer_member("retry", run.id, unit, record.get("attempt")))
    elif started and not force:  # asked to stop: it ends when its worker answers (or the grace ends)
        if not record.get("stop"):
            run.set(unit, stop=reason)
            run.tx.stops.append((str(unit_agent(run.workflow, unit)), unit, str(record.get("dispatch"))))
        _grace_timer(run, now)
        return
    # Not started as far as this run knows (or forced): cancelled now, guarded on its start mark as held,
    # so a start or a reclaim meanwhile fails the commit, the run is read again, and a started unit is
    # asked to stop instead. A unit made ready by this very transition cannot have started.
    run.hold_to_start(unit)
    if record.get("dispatch"):
        run.tx.timers_del.append(timer_member("deadline", run.id, unit, record["dispatch"]))
    run.set(unit, state="cancelled", finished=now)


def _asked_to_stop(run: Run, task: str) -> bool:
    parts = int(run.units.get(task, {}).get("parts") or 0)
    units = [unit_of(task, i) for i in range(parts)] if parts else [task]
    return any(run.units.get(u, {}).get("stop") and run.state(u) in UNIT_LIVE for u in units)


def _grace_timer(run: Run, now: float) -> None:
    """While a run winds down, stopped tasks get `cancel_grace` from the first stop to answer before
    they count as cancelled (later stops do not push it back)."""
    if run.wf_state == "cancelling" and not run.meta.get("grace_at"):
        run.set_meta(grace_at=now + run.cancel_grace)
        run.tx.timers_add[timer_member("grace", run.id)] = now + run.cancel_grace


def wind_down(run: Run, outcome: str, now: float, reason: str, handlers: bool = True) -> None:
    """Fail, time out, cancel, or end early (`succeeded`): nothing new starts, running tasks are asked
    to stop, and once all have stopped the run compensates (not after an early end) and ends.

    A failure (`handlers`) leaves pending tasks to the scheduler, which starts those whose rule fires
    on failure and cancels the rest as their upstreams end; otherwise pending tasks end at once.
    """
    error = {} if outcome == "succeeded" else {"error": reason}
    run.set_meta(outcome=outcome, state="cancelling", **error)
    _close_budget_request(run)  # nothing new starts now anyway; failure handlers must not wait for it
    keep_pending = handlers and outcome == "failed"
    for task in run.workflow.tasks:
        state = run.state(task)
        if state in TASK_TERMINAL or (state == "pending" and keep_pending):
            continue
        if state == "pending":
            if outcome == "succeeded":
                _skip(run, task, now, reason)
            else:
                _cancel_task(run, task, now, reason)
        else:
            _stop_task(run, task, now, reason)
    if not keep_pending:
        run.candidates.clear()
    if not run.open_tasks:
        _wound_down(run, now)


def _wound_down(run: Run, now: float) -> None:
    """Every task has ended: compensate what succeeded (newest first), then end."""
    run.tx.timers_del.append(timer_member("grace", run.id))
    outcome = str(run.meta.get("outcome") or "failed")
    if outcome == "failed" and run.workflow.spec.outcome == "leaves" and not _failures(run):
        outcome = "succeeded"  # every leaf succeeded or was skipped: the failure was handled
        run.set_meta(outcome=outcome, error=None)
    if outcome == "succeeded":
        _finish(run, outcome, now)
        return
    undo = [t for t, spec in run.workflow.tasks.items() if spec.compensate is not None and run.state(t) == "succeeded"]
    undo.sort(key=lambda t: int(run.units[t].get("seq") or 0), reverse=True)
    run.set_meta(undo=",".join(undo), state="compensating")
    if undo:
        run.event("workflow.compensating", now, tasks=undo)
    _next_compensation(run, now)


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
    if state == "succeeded" and run.workflow.output is not None:
        try:
            run.store_result(OUTPUT, wire.pack(run.workflow.output.render(run.scope())))
        except (TypeError, ValueError, MessageTooLarge) as exc:  # an output that does not pack
            run.set_meta(output_error=f"{type(exc).__name__}: {exc}")
    _close_budget_request(run)
    run.set_meta(state=state, finished_at=now)
    run.tx.timers_del.append(timer_member("wf_deadline", run.id))
    run.tx.timers_del.append(timer_member("continue", run.id))
    run.tx.finished = True
    data: dict[str, Any] = {"name": run.workflow.name}
    if state != "succeeded":
        data["error"] = run.meta.get("error")
    run.event(f"workflow.{state}", now, **data)
    _tell_parent(run, state)


def _handles_failure(rule: TriggerRule) -> bool:
    return isinstance(rule, str) and rule in HANDLER_RULES


def _failing(run: Run) -> bool:
    """A run that failed and winds down: its failure handlers may still start."""
    return run.wf_state == "cancelling" and run.meta.get("outcome") == "failed"


# -- budgets ---------------------------------------------------------------------------------------
#
# A task's `budget` bounds what that task spends (all its attempts, partitions and loop iterations
# together); the file's top-level `budget` bounds what the whole run spends, every task included, those
# with a budget of their own too. When one report passes both, the task's own acts. Passing a `fail`
# limit fails the task (asked to stop; it fails when its worker answers). Passing an `ask` limit opens a
# request, one at a time per run: meanwhile no new task starts (those running go on), approve raises
# that limit by its file's size, reject leaves it where it is, acting as `fail` from then on.


def spend(run: Run, body: Mapping[str, Any], now: float) -> bool:
    """A running attempt's spend so far (`ctx.spend`: its totals, never a delta), counted for its unit,
    its task and the run, then held against their budgets. A copy, or a report older than one taken,
    changes nothing (False)."""
    totals = budgets.reported(body.get("tokens"), body.get("cost"))
    attempt, unit = body.get("attempt"), str(body.get("unit"))
    if totals is None or type(attempt) is not int or not _record_spend(run, unit, attempt, totals):
        return False
    _check_budgets(run, unit, now)
    advance(run, now)
    return True


def _result_spend(run: Run, result: wire.Result, now: float) -> bool:
    """The final totals a result carries (the reports on the way may have been lost); True if they added any."""
    given = result.spend or {}
    totals = budgets.reported(given.get("tokens"), given.get("cost"))
    attempt = given.get("attempt")
    if totals is None or type(attempt) is not int or not _record_spend(run, result.unit, attempt, totals):
        return False
    _check_budgets(run, result.unit, now)
    return True


def _record_spend(run: Run, unit: str, attempt: int, totals: budgets.Spend) -> bool:
    """Keep an attempt's totals on its unit and add what they add to its task's and the run's sums.
    An attempt this run never dispatched is ignored; one past those it holds, on a run held since it
    was read (a reclaim started it since), has the run read again."""
    record = run.units.get(unit)
    if record is None or not 0 < attempt <= int(record.get("attempt") or 0):
        if record is not None and attempt > 0 and not run.fresh and record.get("state") in ("ready", "running"):
            run.reread()
        return False
    merged = budgets.merge(record.get("spend"), attempt, totals)
    if merged is None:
        return False
    detail, added = merged
    task = split_unit(unit)[0]
    run.set(unit, spend=detail)
    run.set(task, spent=budgets.text(budgets.add(budgets.parse(run.unit(task).get("spent")), added)))
    run.set_meta(spent=budgets.text(budgets.add(budgets.parse(run.meta.get("spent")), added)))
    return True


def _scopes(run: Run, task: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """(scope, budget, the record its state lives in) for the budgets over a task: its own, then the run's."""
    spec = run.workflow.tasks.get(task)
    found = [("task", spec.budget if spec else None, run.unit(task)), ("run", run.workflow.spec.budget, run.meta)]
    return [(scope, budget, holder) for scope, budget, holder in found if budget is not None]


def _standing(budget: Any, holder: dict[str, Any]) -> tuple[budgets.Spend, tuple[Any, Any], str]:
    """What counts against a budget (spent since the run was last re-opened), its limit in force, and
    what passing it does (`fail` once a person rejected raising it)."""
    counted = budgets.less(budgets.parse(holder.get("spent")), budgets.parse(holder.get("budget_base")))
    limit = budgets.limit_of(budget, int(holder.get("budget_raised") or 0))
    return counted, limit, "fail" if holder.get("budget_refused") else str(budget.on_exceed)


def _limits(run: Run, task: str) -> list[dict[str, Any]]:
    """The budgets over a task as its task message carries them, for the worker's own check."""
    if not run.workflow.budgeted:
        return []
    out = []
    for scope, budget, holder in _scopes(run, task):
        counted, (tokens, cost), how = _standing(budget, holder)
        out.append({"scope": scope, "on_exceed": how, "tokens": tokens, "cost": cost, "spent": list(counted)})
    return out


def _check_budgets(run: Run, unit: str, now: float) -> None:
    """Act on the first budget over the unit's task that is passed now (the task's own first): `fail`
    stops and fails the task; `ask` opens a request unless one is open already, and then the next
    budget passed acts instead (in a failed run winding down, `ask` acts as `fail`). A compensation is
    never stopped by a budget; nor is a task that ended, nor one of a run that is being cancelled."""
    task, _, is_undo = split_unit(unit)
    enforcing = run.wf_state in ("running", "waiting_approval") or _failing(run)
    if is_undo or not enforcing or run.state(task) in TASK_TERMINAL or task not in run.workflow.tasks:
        return
    for scope, budget, holder in _scopes(run, task):
        counted, limit, how = _standing(budget, holder)
        line = budgets.over(counted, limit)
        if line is None:
            continue
        if how == "fail" or run.wf_state == "cancelling":  # a failed run's handlers cannot wait for a person
            _exhaust(run, task, f"budget_exhausted: {line}", now)
            return
        if not run.meta.get("budget_request"):
            _ask_budget(run, scope, task, line, now)
            return


def _exhaust(run: Run, task: str, line: str, now: float) -> None:
    """A `fail` budget is passed: the task's live units are asked to stop (their workers are told at
    once), and it fails with `line` when none is live any more."""
    record = run.unit(task)
    if record.get("exhausted"):
        return
    run.set(task, exhausted=line)
    if record.get("spawned"):  # its handler is done, its children stop; it fails once they have
        _stop_task(run, task, now, line)
        return
    parts = int(record.get("parts") or 0)
    units = [unit_of(task, i) for i in range(parts)] if parts else [task]
    for unit in units:
        _stop_unit(run, unit, now, line)
    if not any(run.state(u) in UNIT_LIVE for u in units):  # none had started, or it waited to retry
        _fail_task(run, task, line, now)  # not `_task_failed`: a plain task's unit was just marked cancelled


def _exhausted_line(run: Run, unit: str) -> str | None:
    """`budget_exhausted: ...` if the unit's task passed a `fail` budget (never for a compensation)."""
    if not run.workflow.budgeted:
        return None
    task, _, is_undo = split_unit(unit)
    line = None if is_undo else run.units.get(task, {}).get("exhausted")
    return str(line) if line else None


def _budget_failed(
    run: Run, unit: str, line: str, now: float, worker: str | None = None, traceback: str | None = None
) -> None:
    """A unit of a task past its `fail` budget answered, or was given up on: it fails with the budget's
    line, and its task too once none of its units is live."""
    task, partition, _ = split_unit(unit)
    extra: dict[str, Any] = {"traceback": traceback} if traceback else {}
    run.record_attempt(unit, now, line, True, **({"worker": worker} if worker else {}), **extra)
    if partition is not None:
        run.set(unit, state="failed", error=line, finished=now)
        if any(run.state(unit_of(task, i)) in UNIT_LIVE for i in range(int(run.units[task]["parts"]))):
            return
    _task_failed(run, task, line, now)


def _ask_budget(run: Run, scope: str, task: str, line: str, now: float) -> None:
    """An `ask` budget is passed: a request, decided like any approval (`phibroker approve ID`), names the
    task whose report passed it; the run waits at it."""
    request = wire.new_id()
    message = f"budget exceeded: {line} ({f'task {task}' if scope == 'task' else 'the run'}'s budget)"
    run.set_meta(budget_request=request, budget_ask=json.dumps({"scope": scope, "task": task, "line": line}))
    run.tx.approvals_set[request] = wire.pack(
        {
            "id": request,
            "workflow": run.id,
            "task": task,
            "message": message,
            "deadline": None,
            "approvers": [],
            "requested_at": now,
            "budget": scope,
        }
    )
    run.event("approval.requested", now, task, approval=request, message=message, approvers=[], budget=scope)


def _decide_budget(run: Run, body: Mapping[str, Any], now: float) -> None:
    """A budget request decided: approve raises the limit passed by its file's size and work goes on
    (asked again at once if what was spent meanwhile passes the new one: the task's, if it still runs,
    the run's in any case); reject keeps the limit, which acts as `fail` from then on, and the task that
    passed it fails."""
    request = str(body["approval"])
    ask = json.loads(str(run.meta.get("budget_ask") or "{}"))
    scope, task = ask.get("scope"), str(ask.get("task"))
    _close_budget_request(run)
    holder = run.unit(task) if scope == "task" else run.meta
    change = (lambda **values: run.set(task, **values)) if scope == "task" else run.set_meta
    signed = str(body.get("signature", ""))[:16]  # lets the deciding client find its own verdict
    who = {"approval": request, "approver": body["approver"], "decision": signed, "budget": scope}
    if body["decision"] == "approve":
        run.event("approval.granted", now, task, **who)
        change(budget_raised=int(holder.get("budget_raised") or 0) + 1)
        if task in run.workflow.tasks and run.state(task) not in TASK_TERMINAL:
            _check_budgets(run, task, now)
        elif scope == "run":  # the run's tasks to come would spend past it: ask again now, not then
            counted, limit, _ = _standing(run.workflow.spec.budget, run.meta)
            line = budgets.over(counted, limit)
            if line is not None:
                _ask_budget(run, "run", task, line, now)
    else:
        run.event("approval.rejected", now, task, reason=body.get("reason"), **who)
        change(budget_refused=1)
        if task in run.workflow.tasks:
            _budget_refused(run, task, f"budget_exhausted: {ask.get('line')}", now)
    advance(run, now)


def _budget_refused(run: Run, task: str, line: str, now: float) -> None:
    """A person would not raise the budget the task passed: it fails as past a `fail` one. Still live,
    it is asked to stop; succeeded meanwhile, it fails now (nothing after it started: the run held)."""
    if run.state(task) not in TASK_TERMINAL:
        _exhaust(run, task, line, now)
    elif run.state(task) == "succeeded":
        run.set(task, state="failed", error=line)
        run.event("task.failed", now, task, error=line)
        if run.workflow.spec.failure == "fail_fast" and run.wf_state in ("running", "waiting_approval"):
            wind_down(run, "failed", now, reason=f"task {task} failed: {line}")


def _close_budget_request(run: Run) -> None:
    request = run.meta.get("budget_request")
    if request:
        run.tx.approvals_del.append(str(request))
        run.set_meta(budget_request=None, budget_ask=None)


def _fresh_allowance(run: Run, tasks: set[str]) -> None:
    """A re-opened run counts spend against its budgets afresh (what was spent stays in the sums):
    its own budget and those of the tasks that run again, with no raise and no refusal left."""
    fresh = {"budget_raised": None, "budget_refused": None}
    if run.workflow.spec.budget is not None:
        run.set_meta(budget_base=budgets.text(budgets.parse(run.meta.get("spent"))), **fresh)
    for task in tasks:
        record = run.units.get(task, {})
        if record.get("spent") or record.get("exhausted"):
            run.set(task, budget_base=budgets.text(budgets.parse(record.get("spent"))), exhausted=None, **fresh)


# -- sub-workflows ---------------------------------------------------------------------------------


def child_ended(run: Run, body: Mapping[str, Any], now: float) -> bool:
    """A child run of a `workflow:` task ended (its `child` notice): the task succeeds with the child's
    `output` (a loop may go round again) or fails with its error. A late or repeated notice, or one
    for a child the task no longer waits for, changes nothing (False)."""
    task, child, state = str(body["task"]), str(body["child"]), str(body["state"])
    record = run.units.get(task)
    if record is None or record.get("child") != child or record.get("state") not in UNIT_LIVE:
        return False
    if state not in WF_TERMINAL:
        return False
    error = None
    output = body.get("output")
    if state == "succeeded" and output is not None:
        try:  # checked now: dependents decode it for their inputs and templates
            if not isinstance(output, bytes):
                raise DecodeError(output, "not packed bytes")
            wire.unpack(output, max(run.limit, len(output)))
        except DecodeError as exc:
            error = f"DecodeError: the output of child {child} does not decode: {exc.reason}"
    if state == "succeeded" and error is None:
        run.record_attempt(task, now, None, True, worker=child)
        run.store_result(task, output if isinstance(output, bytes) else wire.pack(None))
        _task_done(run, task, now)
    else:
        error = error or f"child {child} {state.replace('_', ' ')}: {body.get('error') or state}"
        if record.get("stop"):  # asked to stop, it did: cancelled
            _unit_failed(run, task, error, now, worker=child)
        else:  # not retried: the child's own tasks had their retries
            run.record_attempt(task, now, error, True, worker=child)
            _task_failed(run, task, error, now)
    advance(run, now)
    return True


def _is_subworkflow(run: Run, unit: str) -> bool:
    spec = run.workflow.tasks.get(unit)
    return spec is not None and spec.workflow is not None


def _start_child(run: Run, task: str, now: float) -> None:
    """A `workflow:` task's work: a child run, created through the outbox, that the task waits for
    without holding a worker slot. Its id comes from the parent's (`child_run_id`), so an
    outbox carried out twice creates it once."""
    record = run.unit(task)
    attempt = int(record.get("attempt") or 0) + 1
    child = child_run_id(run.id, task, attempt)
    if record.get("error") is not None:
        run.set(task, error=None)
    if record.get("stop"):
        run.set(task, stop=None)
    run.set(task, state="running", attempt=attempt, dispatch=child, dispatched=now, started=now, child=child)
    nesting = run.nesting + 1
    if nesting > run.max_depth:
        error = f"sub-workflow runs nest {nesting} deep, over max_depth {run.max_depth}"
        run.record_attempt(task, now, error, True)
        _task_failed(run, task, error, now)
        return
    template = run.workflow.sub_params.get(task)
    try:
        sub = run.workflow.subworkflow(task)
        given = template.render(run.scope()) if template is not None else dict(run.workflow.tasks[task].params)
        params = sub.params_with(given)
    except WorkflowFileError as exc:
        run.record_attempt(task, now, str(exc), True)
        _task_failed(run, task, f"sub-workflow: {exc}", now)
        return
    fields = new_workflow_fields(sub, params, now, run.depth, run.chain, parent=(run.id, task), nesting=nesting)
    fields.update(_signed_part(run, task))
    traceparent = child_traceparent(str(run.meta.get("traceparent") or ""), child)
    if traceparent:  # a child run's spans join its parent's trace, its own span under its parent run's
        fields.update(traceparent=traceparent, parent_traceparent=run.meta["traceparent"])
    run.tx.child_runs.append((child, fields))
    run._released += 1
    run.event("task.child_started", now, task, child=child, attempt=attempt)


def _signed_part(run: Run, task: str) -> dict[str, Any]:
    """A signed run's child carries the same signed texts (the outermost file and those it embeds)
    and the path of tasks to its own spec in them, so `coordinator --require-signed` checks it as it
    checked its parent. A spawned workflow carries the signed file it came from, if any: what a
    handler adds is not covered by its parent's signature."""
    spawned = (run.meta.get("children") or {}).get(task)
    if spawned is not None:
        return dict(spawned.get(SIGNED) or {})
    if not run.meta.get("signature"):
        return {}
    fields = {k: run.meta[k] for k in ("source_text", "source_suffix", "signature", "source_parts") if run.meta.get(k)}
    fields["source_path"] = json.dumps([*json.loads(run.meta.get("source_path") or "[]"), task])
    return fields


def _stop_child(run: Run, task: str, now: float, reason: str, force: bool) -> None:
    """Stop a `workflow:` task: its child run is cancelled (a message through the outbox) and the
    task ends when the child has, or at once with `force` (a late notice is then ignored)."""
    record = run.units.get(task)
    if record is None or record.get("state") not in UNIT_LIVE:
        return
    if not record.get("stop"):
        run.set(task, stop=reason)
        body = {"wf": str(record.get("child")), "reason": f"parent {run.id}: {reason}"}
        run.tx.inbox.append(wire.Inbox(kind="cancel", body=body).encode(run.limit))
    if not force:  # it ends when the child has (or the grace ends)
        _grace_timer(run, now)
        return
    run.set(task, state="cancelled", finished=now)


def _tell_parent(run: Run, state: str) -> None:
    """A child run ended: its parent hears of it through the inbox, once the end is committed. The
    notice carries the state, the error and the packed output (too big an output fails it)."""
    parent = run.meta.get("parent")
    if not parent:
        return
    output = run.raw_results.get(OUTPUT) if state == "succeeded" else None
    error = run.meta.get("error")
    if output is not None and len(output) > run.limit:
        state, error = "failed", f"its output is {len(output)} bytes, over the {run.limit}-byte limit"
        output = None
    body = {
        "wf": str(parent),
        "task": str(run.meta.get("parent_task")),
        "child": run.id,
        "state": state,
        "error": None if error is None else str(error),
        "output": output,
    }
    run.tx.inbox.append(wire.Inbox(kind="child", body=body).encode(run.limit * 2))
