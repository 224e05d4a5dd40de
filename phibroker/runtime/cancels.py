"""How a running handler learns that its workflow wants it to stop: `ctx.cancelled`, raised two ways.

Fast: the coordinator that commits a stop publishes a notice on the agent's channel, and `listen` (a
thread of its own) raises the flag of the attempt answering that dispatch as soon as it hears it, so a
handler sees a cancel within a round trip or two instead of at the next lease heartbeat. Pub/sub keeps
nothing for a listener that is away, so the heartbeat's `check`, which reads the units' states, stays:
it runs at every heartbeat, and whenever the listener (re)subscribes, to catch what it missed.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from phibroker.engine.state import WF_TERMINAL
from phibroker.errors import PhibrokerError
from phibroker.runtime.agent import Context
from phibroker.store.connection import CONNECTION_ERRORS
from phibroker.store.worker import UnitState, WorkerStore

if TYPE_CHECKING:
    from phibroker.runtime.worker import Running

log = logging.getLogger("phibroker.worker")  # cancelling logs as the worker it cancels for

LISTEN_POLL = 0.25  # how often the listener looks up from the channel to see whether the worker is done
# A worker stops an attempt past its deadline on its own only this long after it: the coordinators time
# it out first (their timer fires within `coordinator_block`), so a handler that answers as it stops
# cannot beat the timeout with a result; this is for when no coordinator is there to.
DEADLINE_GRACE = 1.0
REMEMBERED = 10_000  # dispatch ids of recent notices, for attempts that start just after theirs


class Cancels:
    """Raises `ctx.cancelled` on the worker's running attempts that their workflows no longer want."""

    def __init__(
        self,
        agent: str,
        broker: WorkerStore,
        running: dict[tuple[str, str], Running],
        done: Callable[[], bool],
        rest: Callable[[float], None],
    ):
        self.agent = agent
        self.broker = broker
        self.running = running  # the worker's table of attempts, until settled
        self.done = done  # the worker stopped and every handler settled: nothing left to cancel
        self.rest = rest  # sleep, but not past the worker's end
        self.noticed: OrderedDict[str, None] = OrderedDict()  # dispatch ids of the notices heard lately

    def listen(self) -> None:
        """The listener thread: subscribe, raise the flags the notices name, subscribe again after an error."""
        backoff = 0.1
        while not self.done():
            feed = None
            try:
                feed = self.broker.stop_notices(self.agent)
                while not self.done():
                    item = feed.get(LISTEN_POLL)
                    if item == "subscribed":
                        backoff = 0.1
                        self.check()  # what was published while we were not subscribed is lost
                    elif item is not None:
                        self.stop(item.dispatch)
            except CONNECTION_ERRORS as exc:
                log.warning("stop notices: Redis unavailable (%s); subscribing again in %.1fs", exc, backoff)
                self.rest(backoff)
                backoff = min(backoff * 2, 5.0)
            except PhibrokerError as exc:
                log.warning("no stop notices: %s; handlers see cancels at the heartbeat only", exc)
                return
            finally:
                if feed is not None:
                    feed.close()

    def stop(self, dispatch: str) -> None:
        """Raise the flag of the attempt answering `dispatch`, and remember it for one not yet in the table."""
        self.noticed[dispatch] = None  # first: `started` looks here after putting its attempt in the table
        while len(self.noticed) > REMEMBERED:
            self.noticed.popitem(last=False)
        for running in list(self.running.values()):
            if running.ctx.dispatch_id == dispatch:
                running.ctx.cancelled.set()

    def started(self, ctx: Context) -> None:
        """An attempt just put in the table: its notice may have come while it was being started."""
        if ctx.dispatch_id in self.noticed:
            ctx.cancelled.set()

    def check(self) -> None:
        """Raise `ctx.cancelled` where the workflow stopped, superseded or timed out the attempt."""
        running = [r for r in list(self.running.values()) if not r.ctx.cancelled]
        if not running:
            return
        states = self.broker.unit_states([(r.ctx.workflow_id, r.ctx.unit) for r in running])
        now = time.time()
        for r, unit in zip(running, states, strict=True):
            if unwanted(unit, r.ctx, now):
                r.ctx.cancelled.set()


def unwanted(unit: UnitState, ctx: Context, now: float) -> bool:
    """Whether the attempt `ctx` should stop, by what the broker holds about its unit."""
    return (
        unit.state not in ("running", "ready")
        or unit.dispatch != ctx.dispatch_id
        or bool(unit.stop)
        or unit.workflow in WF_TERMINAL  # a run that is only `cancelling` may still run its failure handlers
        or (ctx.deadline is not None and now > ctx.deadline + DEADLINE_GRACE)
    )
