"""A worker's dealings with the other workers of its agent: taking over what dead ones left, handing on.

A worker whose lease lapsed leaves its entries pending in the groups; a live one claims them and runs its
tasks again as a new attempt, after a history record for the attempt that was lost. A task for a command
this worker does not have goes to a live worker that has it. Both read the leases and claim entries, and
neither is part of the worker's loop of fetching, starting and settling, so they live here, with the
check that what this worker holds is still its own after its lease lapsed (`Ownership`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from phibroker.engine import records
from phibroker.keys import WORKERS_GROUP, agent_of
from phibroker.runtime.agent import Agent
from phibroker.runtime.reactor import Reactor
from phibroker.settings import Settings
from phibroker.store.connection import Entry, lease_alive
from phibroker.store.worker import WorkerStore

if TYPE_CHECKING:
    from phibroker.runtime.worker import Fetched, Running

log = logging.getLogger("phibroker.worker")  # reclaiming logs as the worker it reclaims for


class Reclaimer:
    """Takes over the entries of dead workers and hands tasks to the workers that have their command."""

    def __init__(
        self,
        agent: Agent,
        consumer: str,
        settings: Settings,
        broker: WorkerStore,
        lanes: tuple[str, str],
        reactor: Reactor,
        running: dict[tuple[str, str], Running],
        backlog: deque[Fetched],
        accept: Callable[[str, list[Entry], str | None], None],
        dead_letter: Callable[[Entry, str, str], None],
        recover: Callable[[], None],
    ):
        self.agent = agent
        self.consumer = consumer
        self.settings = settings
        self.keys = settings.keys
        self.broker = broker
        self.lanes = lanes
        self.stream = lanes[0]  # the task stream: a dead worker's lease goes with its consumer there
        self.reactor = reactor
        self.running = running  # the worker's table and backlog, read to tell which of our entries we hold
        self.backlog = backlog
        self.accept = accept  # the worker decodes what we claim into its backlog
        self.dead_letter = dead_letter
        self.recover = recover  # the worker reads its own pending entries again on its next fetch
        self._next_reclaim = 0.0

    def maintain(self) -> None:
        """Reclaim when due: often enough to take over soon after a lease lapses, seldom enough to cost little."""
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + max(0.25, min(self.settings.reclaim_after / 2, 5.0))
            self.reclaim()

    def reclaim(self) -> int:
        """Take over the entries of workers whose lease lapsed: tasks run again as a new attempt. Entries
        another worker handed to this one (or any of ours we do not hold) are read again too."""
        # What this worker holds, taken before the pending entries are read (the settler thread removes
        # settled work from `running` meanwhile; set() copies the dict in one step).
        held = set(self.running) | {(item.stream, item.entry.id) for item in self.backlog}
        pendings = {
            stream: self.broker.pending_of(stream, WORKERS_GROUP) for stream in [*self.lanes, *self.reactor.streams]
        }
        # the leases of the workers that hold this agent's entries, not the whole fleet's: the look grows
        # with them, not with every worker of every agent
        others = sorted({p["consumer"] for rows in pendings.values() for p in rows} - {self.consumer})
        clock, leases = self.broker.worker_leases({agent_of(worker) for worker in others}) if others else (0.0, {})
        claimed = 0
        for stream, pending in pendings.items():
            if stream in self.lanes and any(
                p["consumer"] == self.consumer and (stream, p["id"]) not in held for p in pending
            ):
                self.recover()
            dead = {
                p["consumer"]
                for p in pending
                if p["consumer"] != self.consumer and not lease_alive(leases.get(p["consumer"], {}), clock)
            }
            for consumer in sorted(dead):
                rows = [p for p in pending if p["consumer"] == consumer]
                claimed += self._take_over(stream, consumer, rows)
                if len(pending) < 1000:  # we saw all of its pending entries: forgetting it loses none
                    self.broker.drop_consumer(stream, WORKERS_GROUP, consumer)
                    if stream == self.stream:
                        self.broker.drop_lease(self.keys.worker_leases(self.agent.name), consumer)
        return claimed

    def _take_over(self, stream: str, consumer: str, rows: list[dict[str, Any]]) -> int:
        worn = [p["id"] for p in rows if p["deliveries"] >= self.settings.max_deliveries]
        fresh = [p["id"] for p in rows if p["deliveries"] < self.settings.max_deliveries]
        for entry in self.broker.claim(stream, WORKERS_GROUP, self.consumer, worn, 200):
            self.dead_letter(entry, f"delivered {self.settings.max_deliveries} times without a result", stream)
            self.broker.ack(stream, WORKERS_GROUP, [entry.id])
        entries = self.broker.claim(stream, WORKERS_GROUP, self.consumer, fresh, 200)
        if stream in self.lanes:
            self.accept(stream, entries, consumer)  # the lost attempts are recorded (`record_lost`)
        else:
            for entry in entries:
                self.reactor.accept_reaction(stream, entry)
        if entries:
            log.info("reclaimed %d entries of %s from %s", len(entries), stream, consumer)
        return len(entries)

    def record_lost(self, items: list[Fetched], consumer: str) -> None:
        """A history record for each run a reclaim replaces, with its attempt and start as the start
        script stored them: the lost run keeps its place and its started_at in the task's history."""
        runs = self.broker.unit_runs(self.agent.name, [(item.message.wf, item.message.unit) for item in items])
        now = time.time()
        for item, run in zip(items, runs, strict=True):
            item.lost = records.attempt(
                item.message.unit,
                run.get("attempt") or item.message.attempt,
                consumer,
                run.get("dispatched"),
                run.get("started") if run.get("entry") == item.ref else None,
                now,
                f"lost: worker {consumer} stopped renewing its lease",
                applied=False,
            )

    def hand_over(self, batch: list[Fetched]) -> list[Fetched]:
        """Tasks for a command this worker lacks go to a live worker of the agent that has it (a fleet in
        the middle of a rolling deploy, or a developer's worker beside the reference one); the rest run
        here. With no such worker, a task runs here and fails as an unknown command. A reclaimed task
        runs here too: its lost attempt is recorded by this worker's start mark. The receiver reads a
        handed task at its next reclaim tick."""
        foreign = [item for item in batch if item.message.command not in self.agent.commands and not item.lost]
        if not foreign:
            return batch
        clock, leases = self.broker.worker_leases([self.agent.name])
        handed = set()
        for item in foreign:
            able = [name for name in leases if self._serves(leases[name], name, item, clock)]
            target = min(able, key=lambda name: (leases[name].get("in_flight") or 0, name), default=None)
            if target and self.broker.claim(item.stream, WORKERS_GROUP, target, [item.entry.id], 0):
                log.info(
                    "handed %s (%s) to %s, which has that command", item.message.unit, item.message.command, target
                )
                handed.add((item.stream, item.entry.id))
        return [item for item in batch if (item.stream, item.entry.id) not in handed]

    def _serves(self, lease: dict[str, Any], name: str, item: Fetched, clock: float) -> bool:
        """Whether the worker holding `lease` is another live one of this agent with the item's command."""
        return (
            name != self.consumer
            and lease.get("agent") == self.agent.name
            and lease_alive(lease, clock)
            and not lease.get("stopping")
            and item.message.command in (lease.get("commands") or ())
        )


class Ownership:
    """Whether the entries this worker holds are still its own.

    A worker paused past its lease (SIGSTOP, a long pause, a partition) may find that another worker
    claimed its entries meanwhile, and a restarted Redis may have forgotten their delivery. Starting such
    an entry again fences out the worker that claimed it, and acking it leaves that worker's attempt
    with nothing pending: if that worker dies, nobody reclaims the task. So after a lapse (our lease ran
    out before we renewed it) or a restart, whatever we held before is checked against the group's
    pending list before we start or ack it, and what is no longer ours is dropped, neither started nor
    acked. Each item carries the `epoch` it was read in; a lapse or a restart starts a new one."""

    def __init__(self, broker: WorkerStore, consumer: str, ttl: float):
        self.broker = broker
        self.consumer = consumer
        self.ttl = ttl * 0.8  # a renewal can take a while to land: suspect a lapse a little early
        self.epoch = 0
        self._valid_until = math.inf  # monotonic: when our lease, as last renewed, may have run out
        self._lock = threading.Lock()

    def renewed(self, began: float) -> None:
        """Our lease was renewed by a call that began at `began` (monotonic)."""
        with self._lock:
            if began > self._valid_until:
                self.epoch += 1
                log.warning("our lease lapsed for %.1fs: checking what we hold", began - self._valid_until)
            self._valid_until = began + self.ttl

    def lost_track(self) -> None:
        """Redis restarted: what it remembers of our entries may be older than what we hold."""
        with self._lock:
            self.epoch += 1

    def keep(self, items: list[Fetched]) -> list[Fetched]:
        """The items still pending on us; the others are dropped, left to whoever holds them now."""
        overdue = time.monotonic() > self._valid_until
        doubtful = [item for item in items if overdue or item.epoch != self.epoch]
        if not doubtful:
            return items
        epoch = self.epoch  # taken before the check: a lapse during it leaves the items in doubt
        owned = self.broker.owned([(item.stream, item.entry.id) for item in doubtful], WORKERS_GROUP, self.consumer)
        gone = set()
        for item, ours in zip(doubtful, owned, strict=True):
            if ours:
                item.epoch = epoch
            else:
                gone.add(id(item))
                log.warning(
                    "%s (%s) is no longer ours: dropped, neither started nor acked", item.message.unit, item.ref
                )
        return [item for item in items if id(item) not in gone]
