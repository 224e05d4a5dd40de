"""One agent in two versions, as in a rolling deploy: `old` lacks the command `new` added."""

from __future__ import annotations

from typing import Any

from phibroker import Agent

old = Agent("fleet")
new = Agent("fleet")


@old.command("one")
@new.command("one")
def one(ctx: Any) -> str:
    return "one"


@new.command("two")
def two(ctx: Any) -> str:
    return "two"
