"""The workflow state machine: what each input does to a run. Pure Python, no Redis.

Each input — the submit, a result, a timer, a cancel, an approval decision — is applied to a `Run` (see
`state`) by one function here, which records what changed in `run.tx`. The coordinator commits that
transition with one script call that checks the run's version, so a decision made on a stale view is
thrown away and made again.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Mapping
from typing import Any

from phibroker import wire
from phibroker.engine.records import split_unit, undo_unit, unit_of
from phibroker.engine.state import (
    TASK_TERMINAL,
    UNIT_LIVE,
    WF_WINDING_DOWN,
    Run,
    timer_member,
)
from phibroker.errors import DecodeError, MessageTooLarge


def retry_delay(attempt: int, base: float, maximum: float, jitter: float, rand: random.Random) -> float:
    """Delay before retry n (n = 1 for the first retry): min(max, base·2^(n-1)) plus 0..jitter×that."""
    delay = min(maximum, base * (2 ** (attempt - 1)))
    return delay + rand.uniform(0.0, jitter * delay)


def error_text(error: Mapping[str, Any] | None) -> str:
    if not error:
        return "error"
    kind, message = error.get("type") or "Error", error.get("message") or ""
    return f"{kind}: {message}" if message else str(kind)


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
    record = run.unit(unit)
    tries = int(record.get("attempt") or 1) - int(record.get("reclaims") or 0)  # reclaims are not retries
    text = error.lower()
    if tries >= policy.max_attempts or not (retryable or any(n.lower() in text for n in policy.retry_on)):
        return None
    return now + retry_delay(tries, policy.base_delay, policy.max_delay, policy.jitter, run.rand)


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
