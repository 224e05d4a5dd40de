"""Agents for the choreography tests: emitters, listeners that count what they see, a ping-pong loop."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from phibroker.errors import Retryable
from phibroker.runtime.agent import Agent, Context, Event

emitter = Agent("emitter")
listener = Agent("listener")
other = Agent("other")
ping = Agent("ping")
pong = Agent("pong")


def ledger() -> redis.Redis:
    return redis.Redis.from_url(os.environ["PROBE_LEDGER_URL"])


def count(subscription: str, event: Event) -> None:
    key = os.environ["PROBE_LEDGER_KEY"]
    ledger().hincrby(f"{key}:{subscription}", event.id, 1)
    ledger().rpush(f"{key}:{subscription}:types", f"{event.type}|{(event.data or {}).get('n', '')}")
    ledger().rpush(f"{key}:{subscription}:agents", str(event.agent))


@emitter.command()
def announce(ctx: Context, count: int = 1, severity: str = "low", kind: str = "scan.finished", **_: Any) -> int:
    for n in range(count):
        ctx.emit(kind, {"n": n, "severity": severity, "target": "repo"})
    return count


@emitter.command()
def flaky_emit(ctx: Context, **_: Any) -> int:
    ctx.emit(f"x.attempt{ctx.attempt}", {"n": ctx.attempt})
    if ctx.attempt == 1:
        raise Retryable("the first attempt's events must never be published")
    return ctx.attempt


@listener.on("scan.finished")
def on_scan(event: Event) -> None:
    time.sleep(0.01)
    count("listener.on_scan", event)


@listener.on("scan.finished", name="listener.high", where="event.data.severity == 'high'")
def on_high(event: Event) -> None:
    count("listener.high", event)


@listener.on("scan.finished", name="listener.emitted", where="agent == 'emitter'")
def on_emitted(event: Event) -> None:
    count("listener.emitted", event)


@listener.on("x.*", name="listener.x")
def on_x(event: Event) -> None:
    count("listener.x", event)


@other.on("scan.finished")
def other_scan(event: Event) -> None:
    count("other.other_scan", event)


@ping.on("ping")
def on_ping(event: Event) -> None:
    count("ping.on_ping", event)
    event.emit("pong", {"n": event.depth})


@pong.on("pong")
def on_pong(event: Event) -> None:
    count("pong.on_pong", event)
    event.emit("ping", {"n": event.depth})


starter = Agent("starter")


@starter.on("scan.finished", name="starter.launch")
def launch(event: Event) -> None:
    """Starts the workflow file named in STARTER_FILE, caused by the event."""
    event.submit(os.environ["STARTER_FILE"], id=f"launched-{event.id}")
