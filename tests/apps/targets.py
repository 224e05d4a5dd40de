"""The agents an attacker aims at (tests/test_attacks.py): each records what it ran, with the payload it
was given, one JSON line in the file TARGETS_LEDGER, so a test sees whether anything ran that the
signed workflow did not say."""

from __future__ import annotations

import json
import os
from typing import Any

from phibroker.runtime.agent import Agent, Context

webc = Agent("webc")
kalic = Agent("kalic")
cmdc = Agent("cmdc")
dormant = Agent("dormant")  # no worker until a test starts one


def _step(agent: Agent) -> None:
    @agent.command("step")
    def step(ctx: Context, sleep: float = 0.0, **payload: Any) -> dict[str, Any]:
        """Streams its payload, waits `sleep` seconds (or until asked to stop), records itself, returns
        its payload."""
        ctx.stream({"by": agent.name, "payload": payload})
        stopped = ctx.cancelled.wait(sleep) if sleep else False
        line = {"agent": agent.name, "wf": ctx.workflow_id, "task": ctx.task, "payload": payload}
        with open(os.environ["TARGETS_LEDGER"], "a") as ledger:
            ledger.write(json.dumps({**line, "attempt": ctx.attempt, "stopped": stopped}) + "\n")
        return {"by": agent.name, **payload}


for _agent in (webc, kalic, cmdc, dormant):
    _step(_agent)


@webc.command("plan")
def plan(ctx: Context, spawn: list[dict[str, Any]]) -> dict[str, Any]:
    """What a handler turned against its run might do: spawn `step` tasks for any agent, with any payload."""
    for child in spawn:
        ctx.spawn(
            child["name"],
            "step",
            agent=child.get("agent"),
            payload=child.get("payload"),
            depends_on=child.get("after", ()),
        )
    return {"spawned": len(spawn)}
