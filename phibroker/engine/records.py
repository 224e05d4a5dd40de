"""The one home of a run's record shapes: events, attempts in the history, and the status document.

Every event and history entry is built here, whoever publishes or writes it (a transition, a worker's
start mark, a reaction, a reclaim), and `status --json` is read from them here, so a field is added or
renamed in one place.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections.abc import Mapping
from typing import Any

from phibroker import wire
from phibroker.engine import budgets
from phibroker.errors import DecodeError


def unit_of(task: str, partition: int | None = None) -> str:
    return task if partition is None else f"{task}#{partition}"


def undo_unit(task: str) -> str:
    return f"{task}!undo"


def child_run_id(parent: str, task: str, start: int = 1) -> str:
    """A `workflow:` task's child run: `PARENT~TASK`, then `PARENT~TASK@N` for its Nth start (a loop's
    next iteration, a retry). Neither `~` nor `@` may appear in a task name, so no two tasks, at any
    depth, share an id (a dot would: task `a.b` of R and task `b` of R's child for `a`)."""
    child = f"{parent}~{task}"
    return child if start == 1 else f"{child}@{start}"


def split_unit(unit: str) -> tuple[str, int | None, bool]:
    """`Task#2` -> (Task, 2, False); `Task!undo` -> (Task, None, True)."""
    if unit.endswith("!undo"):
        return unit[:-5], None, True
    task, sep, part = unit.rpartition("#")
    if sep and part.isdigit():
        return task, int(part), False
    return unit, None, False


def event(
    type_: str,
    workflow: str | None,
    task: str | None,
    data: Any,
    depth: int = 0,
    chain: list[str] | None = None,
    ts: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An event: `type`, `workflow`, `task`, `data`, `ts`, a unique `id`, and what caused it."""
    record = {
        "id": wire.new_id(),
        "type": type_,
        "workflow": workflow,
        "task": task,
        "data": data,
        "ts": time.time() if ts is None else ts,
        "depth": depth,
        "chain": chain or [],
    }
    record.update(extra)
    return record


def attempt(
    unit: str,
    number: Any,
    worker: Any,
    dispatched: Any,
    started: Any,
    finished: float,
    error: str | None,
    applied: bool,
    **extra: Any,
) -> bytes:
    """One attempt of a unit in the run's history, packed as it is stored."""
    record = {
        "unit": unit,
        "attempt": number,
        "worker": worker,
        "dispatched": dispatched,
        "started": started,
        "finished": finished,
        "error": error,
        "applied": applied,
        **extra,
    }
    return wire.pack(record)


OUTPUT = "@output"  # the results-hash field that holds the run's `output`


def status_document(
    wf_id: str,
    meta: dict[str, Any],
    units: dict[str, dict[str, Any]],
    results: dict[str, bytes],
    history: list[bytes],
    limit: int,
) -> dict[str, Any]:
    """Build `status --json` from what Redis holds; pure, so it is tested without a broker."""
    spec_tasks: dict[str, Any] = {**json.loads(meta["spec"]).get("tasks", {}), **(meta.get("children") or {})}
    attempts_of: dict[str, list[dict[str, Any]]] = {name: [] for name in spec_tasks}
    for raw in history:
        record = wire.unpack(raw, limit)
        task, partition, is_undo = split_unit(str(record.get("unit", "")))
        if task not in attempts_of:
            continue
        entry = {
            "attempt": record.get("attempt"),
            "worker": record.get("worker"),
            "started_at": record.get("started"),
            "finished_at": record.get("finished"),
            "error": record.get("error"),
            "applied": record.get("applied", True),
        }
        if partition is not None:
            entry["partition"] = partition
        if is_undo:
            entry["compensation"] = True
        if record.get("traceback"):
            entry["traceback"] = record["traceback"]
        attempts_of[task].append(entry)
    tasks: dict[str, dict[str, Any]] = {}
    for name, spec in spec_tasks.items():
        unit = units.get(name, {})
        row: dict[str, Any] = {
            "state": unit.get("state", "pending"),
            "agent": spec.get("agent"),
            "attempts": int(unit.get("attempt") or 0),
            "started_at": unit.get("started"),
            "finished_at": unit.get("finished"),
            "result": _decode(results.get(name), limit),
            "error": unit.get("error"),
            "history": attempts_of[name],
            "spend": spend_of(unit.get("spent")),
        }
        parts = int(unit.get("parts") or 0)
        if parts:
            partitions = [units.get(f"{name}#{i}", {}) for i in range(parts)]
            row["partitions"] = [
                {
                    "index": i,
                    "state": p.get("state", "pending"),
                    "attempts": int(p.get("attempt") or 0),
                    "worker": p.get("worker"),
                    "error": p.get("error"),
                }
                for i, p in enumerate(partitions)
            ]
            started = [p["started"] for p in partitions if p.get("started")]
            row["started_at"] = min(started) if started else None
            row["attempts"] = max((int(p.get("attempt") or 0) for p in partitions), default=0)
            if row["state"] == "ready" and any(p.get("state") == "running" for p in partitions):
                row["state"] = "running"
        if spec.get("approval") is not None:
            decision = unit.get("decision")
            row["approval"] = {
                "request": unit.get("approval"),
                "decision": _decode(decision, limit) if decision else _decode(results.get(name), limit),
            }
        if spec.get("loop") is not None:
            row["iterations"] = int(unit.get("iteration") or 1) if row["attempts"] else 0
        if spec.get("signal") is not None and row["state"] == "running":
            row["waiting_for"] = f"signal {spec['signal']['name']}"
        if spec.get("workflow") is not None:
            row["child"] = unit.get("child")  # the latest child run's id
        stops = [unit.get("stop"), *(units.get(f"{name}#{i}", {}).get("stop") for i in range(parts))]
        if row["state"] in ("ready", "running", "retrying") and any(stops):
            row["stopping"] = next(s for s in stops if s)  # asked to stop (a cancel, an end, a failure)
        undo = units.get(f"{name}!undo")
        if undo:
            row["compensation"] = {
                "state": undo.get("state"),
                "attempts": int(undo.get("attempt") or 0),
                "error": unit.get("undo_error") or undo.get("error"),
            }
        tasks[name] = row
    return {
        "id": wf_id,
        "name": meta.get("name"),
        "state": meta.get("state"),
        "created_at": meta.get("created_at"),
        "finished_at": meta.get("finished_at"),
        "params": meta.get("params"),
        "error": meta.get("error"),
        "output": _decode(results.get(OUTPUT), limit),
        "parent": parent_of(meta),
        "spend": spend_of(meta.get("spent")),
        "tasks": tasks,
    }


def spend_of(kept: Any) -> dict[str, Any]:
    """`{"tokens", "cost"}`: what a task or a run spent (`ctx.spend`; tokens are tokens + input + output),
    from the sum the engine keeps as `"TOKENS COST"`."""
    tokens, cost = budgets.parse(kept)
    return {"tokens": tokens, "cost": cost}


def approval_document(request: Mapping[str, Any]) -> dict[str, Any]:
    """An open approval request as `approvals --json` shows it (and the page's and MCP's lists): the
    documented fields, nothing more."""
    return {k: request.get(k) for k in ("id", "workflow", "task", "message", "deadline")}


def parent_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    """`{"id", "task"}` of the run whose `workflow:` task started this one, or None."""
    parent = meta.get("parent")
    return {"id": parent, "task": meta.get("parent_task")} if parent else None


def _decode(raw: bytes | None, limit: int) -> Any:
    return None if raw is None else wire.unpack(raw, max(limit, len(raw)))


def child_traceparent(parent: str, child_id: str) -> str | None:
    """A child run's W3C trace context: its parent run's trace, and a span id of its own derived from
    its id (a transition is pure: deciding the child's start again gives it the same one)."""
    parts = parent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32:
        return None
    return f"00-{parts[1]}-{hashlib.blake2b(child_id.encode(), digest_size=8).hexdigest()}-{parts[3]}"


def error_text(error: Mapping[str, Any] | None) -> str:
    """A result's error as the one line a task's `error` shows: `Type: message`."""
    if not error:
        return "error"
    kind, message = error.get("type") or "Error", error.get("message") or ""
    return f"{kind}: {message}" if message else str(kind)


def describe_exception(exc: BaseException) -> dict[str, str]:
    """An exception as a result's error: type, message and the traceback, kept in the history."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:],
    }


# -- a run's output stream: what handlers stream and log, and the run's events -------------------------
OUTPUT_KINDS = ("chunk", "log", "event")


def output_record(unit: str, partition: int | None, attempt: int, seq: int, data: Any, ts: float) -> bytes:
    """A chunk or a log record, packed as the output stream stores it (its kind is the entry's `k`)."""
    task = split_unit(unit)[0]
    record = {"task": task, "unit": unit, "partition": partition, "attempt": attempt, "seq": seq, "ts": ts}
    return wire.pack({**record, "data": data})


def output_records(kind: str, raw: bytes, limit: int) -> list[dict[str, Any]]:
    """What one output-stream entry holds, as `Client.stream` yields it: a chunk or a log record, or a
    transition's events, one record each (`data` is the event). Raises DecodeError for a damaged entry."""
    if kind == "event":
        return [_event_record(event) for event in wire.decode_events(raw, limit)]
    record = wire.unpack(raw, limit)
    if kind not in OUTPUT_KINDS or not isinstance(record, dict):
        raise DecodeError(raw, f"not an output record ({kind})")
    return [
        {
            "kind": kind,
            **{k: record.get(k) for k in ("task", "unit", "partition", "attempt", "seq", "ts")},
            "data": record.get("data"),
        }
    ]


def _event_record(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    details = data if isinstance(data, dict) else {}
    unit = details.get("unit") if isinstance(details.get("unit"), str) else event.get("task")
    return {
        "kind": "event",
        "task": event.get("task"),
        "unit": unit,
        "partition": split_unit(unit)[1] if unit else None,
        "attempt": details.get("attempt") if isinstance(details.get("attempt"), int) else None,
        "seq": None,
        "ts": event.get("ts"),
        "data": event,
    }
