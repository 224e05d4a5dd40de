"""The agent the live-output workload reads: its handler streams chunks, as a model streams tokens."""

from __future__ import annotations

import time
from typing import Any

from phibroker import Agent
from phibroker.runtime.agent import Context

talker = Agent("talker")


@talker.command()
def noop(ctx: Context, **extra: Any) -> None:
    """The deployment's warm-up task."""
    return None


@talker.command()
def talk(ctx: Context, chunks: int, pause: float = 0.0, **extra: Any) -> int:
    """Stream `chunks` small chunks, each carrying time.time() when it was sent (this host's clock, the one
    the benchmark's reader reads), `pause` seconds apart."""
    for i in range(chunks):
        ctx.stream({"i": i, "sent": time.time()})
        if pause:
            time.sleep(pause)
    return chunks
