"""The agent the cancel-latency workload stops: its handler waits for `ctx.cancelled` and notes when it saw it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from phibroker import Agent
from phibroker.runtime.agent import Context

holder = Agent("holder")


@holder.command()
def noop(ctx: Context, **extra: Any) -> None:
    """The deployment's warm-up task."""
    return None


@holder.command()
def hold(ctx: Context, marks: str, limit: float = 60.0, **extra: Any) -> None:
    """Note the start (`ID.started`), wait to be cancelled, note when the flag was seen (`ID.seen`: time.time()
    on this host, the clock the benchmark reads too). Written then renamed, so a reader never sees half."""
    folder = Path(marks)
    (folder / f"{ctx.workflow_id}.started").write_text("")
    if ctx.cancelled.wait(limit):
        seen = time.time()
        partial = folder / f"{ctx.workflow_id}.partial"
        partial.write_text(repr(seen))
        os.replace(partial, folder / f"{ctx.workflow_id}.seen")
