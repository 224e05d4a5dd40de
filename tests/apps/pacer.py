"""A test agent whose handler sleeps as long as its worker is told (PACER_SLEEP) and logs its runs.

Each start and end is a line in the file PACER_LOG: `start|end TASK ATTEMPT PID`, so a test can tell
which worker ran which attempt, and when, without reading the broker's internals."""

from __future__ import annotations

import os
import time
from typing import Any

from phibroker.runtime.agent import Agent, Context

pacer = Agent("pacer")


def _log(what: str, ctx: Context) -> None:
    with open(os.environ["PACER_LOG"], "a") as fh:
        fh.write(f"{what} {ctx.task} {ctx.attempt} {os.getpid()}\n")


@pacer.command()
def paced(ctx: Context, **extra: Any) -> dict[str, Any]:
    _log("start", ctx)
    time.sleep(float(os.environ.get("PACER_SLEEP", "1")))
    _log("end", ctx)
    return {"task": ctx.task, "pid": os.getpid()}
