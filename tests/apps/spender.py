"""A test agent that spends as an LLM agent does: one `ctx.spend` report per step, a pause between."""

from __future__ import annotations

import logging
from typing import Any

from phibroker import Agent, BudgetExhausted
from phibroker.runtime.agent import Context

spender = Agent("spender")
log = logging.getLogger("spender.steps")


@spender.command()
def spend(
    ctx: Context, steps: int = 3, tokens: int = 40_000, cost: float = 0.0, pause: float = 0.2, linger: float = 0.0
) -> dict[str, Any]:
    """`steps` reports of `tokens` (half input, half output) and `cost` each, `pause` seconds apart;
    then, with `linger`, it waits that long for a stop. Logs which step raised BudgetExhausted, or
    after which step it was asked to stop (it then returns early)."""
    for step in range(1, steps + 1):
        try:
            ctx.spend(input_tokens=tokens // 2, output_tokens=tokens - tokens // 2, cost=cost)
        except BudgetExhausted as exc:
            log.warning("step %d raised: %s", step, exc)
            raise
        log.info("step %d spent", step)
        if ctx.cancelled.wait(pause):
            log.warning("asked to stop after step %d", step)
            return {"stopped_after": step}
    if linger and ctx.cancelled.wait(linger):
        log.warning("asked to stop after step %d", steps)
        return {"stopped_after": steps}
    return {"steps": steps}
