"""The coordinator's chores, apart from its rounds: what keeps a fleet of coordinators whole.

A coordinator can die at any point, so each live one renews its lease, takes over the inbox entries a
dead one left pending, walks the running workflows for outboxes nobody drained (re-drive) and runs
nobody started, trims the streams, and forgets workers and coordinators long gone. Each chore has its
own period; the loop calls `tick()` once a round and the chores that are due run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

from phibroker import wire
from phibroker.errors import DecodeError
from phibroker.keys import COORDINATORS_GROUP, WORKERS_GROUP
from phibroker.runtime.events import Router
from phibroker.settings import Settings
from phibroker.store.connection import Entry, lease_alive
from phibroker.store.coordinator import CoordinatorStore

log = logging.getLogger("phibroker.coordinator")


class Maintenance:
    """The chores of the coordinator called `name`.

    `process` hands entries taken over to the coordinator's rounds; `holding(inbox)` names the entries
    of `inbox` it holds already (read for later, or handled and acked with its next read), which are
    not stranded however long they stay pending."""

    def __init__(
        self,
        settings: Settings,
        broker: CoordinatorStore,
        name: str,
        router: Router,
        process: Callable[[float, str, list[Entry]], None],
        holding: Callable[[str], set[str]],
    ):
        self.settings = settings
        self.broker = broker
        self.keys = settings.keys
        self.name = name
        self.router = router
        self.process = process
        self.holding = holding
        self._next: dict[str, float] = defaultdict(float)  # when each chore is next due
        self._sweep_cursor = 0
        self._index_cursor = 0  # old runs still there, which the walk of the `workflows` index steps over

    def tick(self) -> None:
        """Run the chores that are due: lease, take-over, sweep, trim."""
        now = time.monotonic()
        takeover = self.settings.coordinator_takeover
        if now >= self._next["lease"]:
            self._next["lease"] = now + takeover / 4
            info = {"host": socket.gethostname(), "pid": os.getpid(), "takeover": takeover}
            self.broker.renew_lease(self.keys.coordinators, self.name, takeover, info)
        if now >= self._next["takeover"]:
            self._next["takeover"] = now + takeover / 2
            self.take_over()
        if now >= self._next["sweep"]:
            self._next["sweep"] = now + max(1.0, takeover)
            self.sweep()
        if now >= self._next["trim"]:
            self._next["trim"] = now + self.settings.trim_every
            self.trim()

    def trim(self) -> None:
        """Keep streams and indexes from growing: drop what every reader has acked, bound the events log
        by age and size, forget expired runs and long-dead workers."""
        clock, leases = self.broker.leases(self.keys.agents)
        agents = {str(info.get("agent")) for info in leases.values() if info.get("agent")}
        streams = [(inbox, COORDINATORS_GROUP) for inbox in self.keys.inboxes]
        for agent in sorted(agents):
            streams += [(self.keys.agent_tasks(agent), WORKERS_GROUP), (self.keys.agent_bulk(agent), WORKERS_GROUP)]
        for stream, group in streams:
            self.broker.trim_acked(stream, group, keep=self.settings.stream_maxlen)
        _, coordinators = self.broker.leases(self.keys.coordinators)
        for table, held in ((self.keys.agents, leases), (self.keys.coordinators, coordinators)):
            for name, info in held.items():
                if clock - float(info.get("expires", 0)) > self.settings.dead_worker_memory:
                    self.broker.drop_lease(table, name)
        oldest_ms = int((clock - self.settings.events_max_age) * 1000)
        self.broker.trim_events(max(0, oldest_ms), self.settings.events_max_bytes)
        self.forget_expired_runs()

    def forget_expired_runs(self, page: int = 1000, pages: int = 10) -> None:
        """Drop from the `workflows` index the runs whose keys expired (retention), oldest first, up to
        `pages` pages a trim: else `list` reads past ever more dead ids. Runs that old but still there
        are stepped over (the cursor counts them) until the walk reaches the end and starts again."""
        created_before = time.time() - self.settings.retention
        for _ in range(pages):
            seen, dropped = self.broker.forget_expired_runs(created_before, self._index_cursor, page)
            if seen < page:
                self._index_cursor = 0
                return
            self._index_cursor += seen - dropped

    def take_over(self) -> int:
        """Claim the inbox entries of coordinators whose lease lapsed; they are processed as ours.

        Our own entries left pending far longer than a round takes are read again too: a reply lost
        on the way (the client retried the read) leaves them delivered to us but never handled."""
        clock, leases = self.broker.leases(self.keys.coordinators)
        dead: set[str] = set()
        taken = 0
        stranded_ms = 3 * self.settings.coordinator_takeover * 1000
        for inbox in self.keys.inboxes:
            pending = self.broker.pending_of(inbox, COORDINATORS_GROUP)
            gone = {p["consumer"] for p in pending if leases.get(p["consumer"], {}).get("expires", 0) < clock}
            gone.discard(self.name)
            ours = self.holding(inbox)
            stranded = [p["id"] for p in pending if p["consumer"] == self.name and p["idle"] > stranded_ms]
            ids = [p["id"] for p in pending if p["consumer"] in gone] + [i for i in stranded if i not in ours]
            if not ids:
                continue
            entries = self.broker.claim(inbox, COORDINATORS_GROUP, self.name, ids, min_idle_ms=500)
            whose = ", ".join(sorted(gone)) or "this coordinator (stranded)"
            log.info("took over %d entries of %s from %s", len(entries), inbox, whose)
            if entries:
                self.process(clock, inbox, entries)
            dead |= gone
            taken += len(entries)
        for consumer in dead:
            self.broker.drop_lease(self.keys.coordinators, consumer)
        return taken

    def sweep(self, chunk: int = 500) -> None:
        """Walk the running index a chunk at a time: re-drive stale outboxes, re-kick unstarted runs."""
        ids = self.broker.running_chunk(self._sweep_cursor, chunk)
        self._sweep_cursor = 0 if len(ids) < chunk else self._sweep_cursor + chunk
        if not ids:
            return
        states = self.broker.sweep_states(ids)
        now = time.time()
        kicks = []
        stale_outboxes = []
        for wf_id, (exists, started, created, outbox_len) in zip(ids, states, strict=True):
            if not exists:
                self.broker.forget_running(wf_id)
            elif not started and now - created > self.settings.coordinator_takeover:
                kicks.append(wf_id)
            elif outbox_len:
                stale_outboxes.append(wf_id)
        if stale_outboxes:
            self.redrive(stale_outboxes, older_than=self.settings.coordinator_takeover)
        for wf_id in kicks:
            self.broker.send_to_coordinators(wire.Inbox(kind="kick", body={"wf": wf_id}))

    def redrive(self, wf_ids: Iterable[str], older_than: float = 0.0) -> int:
        """Carry out outbox entries left behind by a coordinator that died between commit and drain.

        Another coordinator's entry waits while that one's lease holds: it drains its own outboxes
        right after its commits, and carrying one out twice would send its events and dispatches twice."""
        now = time.time()
        items = []
        for wf_id, entries in self.broker.outboxes(wf_ids).items():
            for entry_id, raw in entries.items():
                try:
                    box = wire.unpack(raw, 1 << 30)
                except DecodeError:
                    continue
                if older_than and now - float(box.get("created") or 0) < older_than:
                    continue
                items.append((wf_id, entry_id, box))
        owners = {str(box.get("owner") or "") for _, _, box in items} - {"", self.name}
        if owners:
            clock, leases = self.broker.leases(self.keys.coordinators)
            alive = {name for name in owners if lease_alive(leases.get(name, {}), clock)}
            items = [item for item in items if str(item[2].get("owner") or "") not in alive]
        if items:
            log.info("re-driving %d outbox entries", len(items))
            self.broker.drain(items, route=self.router.routes)
        return len(items)
