"""A test agent whose handlers record when they ran, sleep, fail or write a ledger on request."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from phibroker.errors import Retryable
from phibroker.runtime.agent import Agent, Context

probe = Agent("probe")


@probe.command()
def work(ctx: Context, sleep: float = 0.0, value: Any = None, fail_on: int = 0, **extra: Any) -> dict[str, Any]:
    """Records its run; `ledger` (a file) gets one line per effect, keyed by the idempotency key;
    attempt `fail_on` fails at once (retryable)."""
    if ctx.attempt == fail_on:
        raise Retryable(f"attempt {ctx.attempt} fails on purpose")
    started = time.time()
    if sleep:
        ctx.cancelled.wait(sleep)
    ledger = extra.get("ledger") or os.environ.get("PROBE_LEDGER")
    if ledger:
        with open(ledger, "a") as fh:
            fh.write(f"{ctx.idempotency_key} {ctx.attempt} {ctx.token}\n")
    return {
        "task": ctx.task,
        "started": started,
        "finished": time.time(),
        "inputs": sorted(ctx.inputs),
        "value": value,
        "cancelled": bool(ctx.cancelled),
    }


@probe.command()
def spawner(ctx: Context, children: int = 3, chain: bool = False, **extra: Any) -> dict[str, Any]:
    """Plans `children` `work` steps (one after another with `chain`), recorded in the ledger like work."""
    for i in range(children):
        ctx.spawn(f"c{i}", command="work", depends_on=[f"c{i - 1}"] if chain and i else [])
    return work(ctx, **extra)


@probe.command()
def delegate(ctx: Context, file: str = "", inline: bool = False, value: Any = None, **extra: Any) -> dict[str, Any]:
    """Hands the work to a sub-workflow: `file` (read now), or with `inline` one given as a dict."""
    if inline:
        ctx.spawn_workflow("sub", {"name": "inline", "tasks": {"Step": {"agent": "probe", "command": "work"}}})
    else:
        ctx.spawn_workflow("sub", file, params={"value": value})
    return {"delegated": True}


@probe.command()
def stubborn(ctx: Context, sleep: float = 1.0, **extra: Any) -> dict[str, Any]:
    """Its first attempt ignores a stop and answers `sleep` seconds late; later attempts answer at once."""
    if ctx.attempt == 1:
        time.sleep(sleep)
        if extra.get("marker"):
            Path(extra["marker"]).touch()
    return {"attempt": ctx.attempt}


@probe.command()
def hold(ctx: Context, sleep: float = 5.0, **extra: Any) -> dict[str, Any]:
    """Waits up to `sleep` seconds; stops with an error when the run asks it to."""
    if ctx.cancelled.wait(sleep):
        raise RuntimeError("stopped when asked")
    return {"task": ctx.task}


@probe.command()
def noop(ctx: Context, **extra: Any) -> None:
    return None


@probe.command()
def fail(ctx: Context, message: str = "boom", kind: str = "ValueError", **extra: Any) -> None:
    if kind == "Retryable":
        raise Retryable(message)
    raise {"ValueError": ValueError, "ConnectionError": ConnectionError, "TimeoutError": TimeoutError}[kind](message)


@probe.command()
def flaky(ctx: Context, failures: int = 1, **extra: Any) -> dict[str, Any]:
    """Fails its first `failures` attempts with a retryable error."""
    if ctx.attempt <= failures:
        raise Retryable(f"attempt {ctx.attempt} fails on purpose")
    return {"attempt": ctx.attempt}


@probe.command()
def undo(ctx: Context, sleep: float = 0.05, **extra: Any) -> dict[str, Any]:
    """A compensation that takes a moment, so a test can see compensations never overlap."""
    started = time.time()
    time.sleep(sleep)
    return {"undid": ctx.task, "started": started, "finished": time.time(), "result": ctx.result}


@probe.command()
def undo_fail(ctx: Context, **extra: Any) -> None:
    raise RuntimeError(f"cannot undo {ctx.task}")


@probe.command()
def part(ctx: Context, items: list[Any], fail_partition: int = -1, **extra: Any) -> dict[str, Any]:
    """A map partition: sums its slice; `fail_partition` fails once (retryable) on that partition."""
    assert ctx.partition is not None
    index, count = ctx.partition
    if index == fail_partition and ctx.attempt == 1:
        raise Retryable(f"partition {index} fails once")
    return {"index": index, "count": count, "size": len(items), "sum": sum(items), "first": items[0] if items else None}


@probe.command()
def die(ctx: Context, **extra: Any) -> None:
    """Kills its own worker, as a crash in a native library would."""
    os._exit(1)


@probe.command()
def effect(ctx: Context, sleep: float = 0.0, failures: int = 0, **extra: Any) -> dict[str, Any]:
    """An idempotent side effect keyed by ctx.idempotency_key, in a Redis ledger (chaos tests); its
    first `failures` attempts fail (retryable) before the effect."""
    import redis

    if ctx.attempt <= failures:
        raise Retryable(f"attempt {ctx.attempt} fails on purpose")
    started = time.time()
    if sleep:
        ctx.cancelled.wait(sleep)
    r = redis.Redis.from_url(os.environ["PROBE_LEDGER_URL"])
    ledger = os.environ["PROBE_LEDGER_KEY"]
    r.hincrby(f"{ledger}:runs", ctx.idempotency_key, 1)
    applied = r.hsetnx(ledger, ctx.idempotency_key, f"{ctx.attempt}/{ctx.token}")
    return {"started": started, "finished": time.time(), "applied": bool(applied), "inputs": sorted(ctx.inputs)}


@probe.command()
def exits(ctx: Context, **extra: Any) -> None:
    raise SystemExit(3)


@probe.command()
def emits_garbage(ctx: Context, **extra: Any) -> int:
    ctx.emit("odd", {"a set": {1, 2}})
    return 1
