"""Plain functions run as RQ jobs through `phibroker rq-bridge` (the tests and examples/rq-bridge.yaml).

They know nothing of phibroker's handler API: the payload arrives as keyword arguments; the phibroker ids,
where a job wants them, are in `rq.get_current_job().meta["phibroker"]`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from typing import Any

from rq import get_current_job

from phibroker.errors import Retryable


class CommandFailed(Exception):  # noqa: N818 - the error a workflow shows
    """The command exited non-zero."""


def ids() -> dict[str, Any]:
    """The running job's id and the phibroker ids the bridge put in its meta."""
    job = get_current_job()
    if job is None:
        return {}
    meta = job.meta.get("phibroker") or {}
    return {"job": job.id, **{k: meta.get(k) for k in ("workflow", "unit", "dispatch", "attempt", "token")}}


def run_tests(
    command: list[str] | str | None = None, suite: str = "", timeout: float = 60, cwd: str | None = None, **_: Any
) -> dict[str, Any]:
    """Run a command (no shell) with a timeout; a non-zero exit fails the job. Same payload as cmdc's run_tests."""
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command or ["true"]]
    started = time.monotonic()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=float(timeout), check=False)
    text = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
    if done.returncode != 0:
        raise CommandFailed(f"{shlex.join(args)} exited with code {done.returncode}\n{text}")
    duration = round(time.monotonic() - started, 3)
    return {"exit_code": 0, "duration": duration, "output_tail": text, "passed": True, "suite": suite, "rq": ids()}


def add(a: int, b: int) -> dict[str, Any]:
    return {"sum": a + b, "rq": ids()}


def total(items: list[int]) -> dict[str, Any]:
    """A map partition: its slice arrives as `items`."""
    return {"sum": sum(items), "rq": ids()}


def flaky(failures: int = 1) -> dict[str, Any]:
    """Fails its first `failures` attempts with `Retryable` (no `retry_on` needed)."""
    attempt = int(ids().get("attempt") or 1)
    if attempt <= failures:
        raise Retryable(f"attempt {attempt} fails on purpose")
    return {"attempt": attempt, "rq": ids()}


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def slow(seconds: float, ledger: str, marker: str) -> dict[str, Any]:
    """Marks its start, sleeps, then writes its one effect: a ledger line."""
    info = ids()
    with open(marker, "a") as fh:
        fh.write(f"{info.get('job')} {os.getpid()}\n")
    time.sleep(seconds)
    with open(ledger, "a") as fh:
        fh.write(f"{info.get('workflow')}:{info.get('unit')} {info.get('job')}\n")
    return {"slept": seconds, "rq": info}
