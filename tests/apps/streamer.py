"""A test agent whose handlers stream chunks and log while they run: a task's live output."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from phibroker.errors import OutputRefused, Retryable
from phibroker.runtime.agent import Agent, Context

streamer = Agent("streamer")
log = logging.getLogger("streamer.speak")


@streamer.command()
def speak(ctx: Context, words: list[str], fail_first: bool = True, gate: str | None = None) -> dict[str, Any]:
    """Logs, streams `words`; the first attempt then fails (retryable). With `gate` (a file), the last
    word waits until that file exists, so a reader can see the first words while the run goes on."""
    log.info("attempt %d begins", ctx.attempt)
    log.debug("below INFO: never in the output")
    for word in words[:-1]:
        ctx.stream(word)
    if ctx.attempt == 1 and fail_first:
        log.warning("attempt %d gives up", ctx.attempt)
        raise Retryable("the first attempt fails on purpose")
    if gate:
        while not Path(gate).exists() and not ctx.cancelled:
            time.sleep(0.02)
    ctx.stream(words[-1])
    ctx.stream({"done": True, "attempt": ctx.attempt})
    return {"attempt": ctx.attempt}


@streamer.command()
async def speak_async(ctx: Context, words: list[str]) -> int:
    """An async handler: its log records and chunks reach the output from its asyncio tasks too; it
    emits `spoke` with its result."""

    async def part(word: str) -> None:
        log.info("part %s", word)
        ctx.stream(word)

    for word in words:
        await asyncio.create_task(part(word))
    ctx.emit("spoke", {"words": len(words)})
    return len(words)


@streamer.command()
def big(ctx: Context, size: int = 70_000) -> None:
    ctx.stream("small first")
    ctx.stream("x" * size)


@streamer.command()
def flood(ctx: Context, size: int = 1000, count: int = 100) -> dict[str, Any]:
    """Streams `count` chunks of `size` bytes until the run's output is full; returns how many went."""
    for i in range(count):
        try:
            ctx.stream(f"{i:05d}" + "y" * (size - 5))
        except OutputRefused as exc:
            return {"stored": i, "refused": str(exc)}
    return {"stored": count, "refused": None}
