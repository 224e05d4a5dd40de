"""The coordinator's chores, apart from its rounds: what keeps a fleet of coordinators whole.

A coordinator can die at any point, so each live one renews its lease, takes over the inbox entries a
dead one left pending, walks the running workflows for outboxes nobody drained (re-drive) and runs
nobody started, trims the streams, and forgets workers and coordinators long gone. Redis itself can
lose its last writes (a restart from an older AOF, a failover to a lagging replica), so a reconciler
also looks for tasks nobody holds any more (`Reconciler`). Each chore has its own period; the loop
calls `tick()` once a round and the chores that are due run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from phibroker import wire
from phibroker.engine.records import split_unit
from phibroker.engine.state import WF_TERMINAL, timer_member, unit_agent
from phibroker.errors import DecodeError
from phibroker.keys import COORDINATORS_GROUP, WORKERS_GROUP
from phibroker.runtime.events import Router
from phibroker.runtime.inbox import plan_shards
from phibroker.settings import Settings
from phibroker.store.connection import Entry, lease_alive
from phibroker.store.coordinator import CoordinatorStore
from phibroker.workflow import Workflow

log = logging.getLogger("phibroker.coordinator")

AGENTS_EVERY = 0.5  # seconds between reads of the roster: a new agent's results wait in its lanes until then


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
        process: Callable[[float, list[tuple[str, Entry]]], None],
        holding: Callable[[str], set[str]],
        workflow: Callable[[str], Workflow],
        restarted: Callable[[], None],
        named: frozenset[str] = frozenset(),
        run_agents: Callable[[], set[str]] = set,
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
        self.reconciler = Reconciler(settings, broker, workflow, self.lanes)
        self.restarted = restarted  # Redis restarted: what the coordinator holds in memory may be ahead of it
        self._run_id: str | None = None
        # after Redis restarted (a failover, older data), and once at start on a cluster: where the walk
        # of the `workflows` index is
        self._reindex: int | None = 0 if broker.cluster else None
        self.shards: tuple[int, ...] = tuple(range(len(self.keys.inbox_lanes)))  # the inbox shards it reads
        self.agents = named  # the identities file names, on the roster, or the runs it read: whose lanes it reads
        self.run_agents = run_agents  # the agents the runs it read name
        self._lanes = self.keys.lanes(named)  # theirs, made again only when they change

    def tick(self) -> None:
        """Run the chores that are due: lease, take-over, sweep, trim, reconcile."""
        now = time.monotonic()
        takeover = self.settings.coordinator_takeover
        if now >= self._next["lease"]:
            self._next["lease"] = now + takeover / 4
            info = {"host": socket.gethostname(), "pid": os.getpid(), "takeover": takeover}
            self.broker.renew_lease(self.keys.coordinators, self.name, takeover, info)
            self.check_restart()
            self.lease_shards()
        if now >= self._next["agents"]:
            self._next["agents"] = now + AGENTS_EVERY
            self.read_roster()
        if now >= self._next["takeover"]:
            self._next["takeover"] = now + takeover / 2
            self.take_over()
        if now >= self._next["sweep"]:
            self._next["sweep"] = now + max(1.0, takeover)
            self.sweep()
        if self._reindex is not None:
            self.reindex()
        if now >= self._next["trim"]:
            self._next["trim"] = now + self.settings.trim_every
            self.trim()
        if now >= self._next["reconcile"]:
            self._next["reconcile"] = now + self.settings.reconcile_every
            self.reconciler.reconcile()

    def read_roster(self) -> None:
        """The agents whose lanes to read: those named, on the roster, and those the runs it read name (a
        signing agent whose `joined` nobody here could check); once read, for as long as this coordinator
        runs (a Redis that lost the roster keeps their lanes). Each lane's group is made."""
        agents = self.agents | set(self.broker.roster()) | self.run_agents()
        if agents == self.agents:
            return
        for lane in self.keys.lanes(agents - self.agents):
            self.broker.ensure_group(lane, COORDINATORS_GROUP)
        self.agents, self._lanes = agents, self.keys.lanes(agents)

    def lanes(self) -> list[str]:
        """Every lane of every inbox shard, of the agents known."""
        return self._lanes

    def lease_shards(self) -> None:
        """Lease inbox shards up to a fair share, let go of those past it, and read what the plan says
        (`inbox.plan_shards`); one shard (one server) is every coordinator's."""
        count = len(self.keys.inbox_lanes)
        if count <= 1:
            return
        clock, leases = self.broker.leases(self.keys.coordinators)
        live = {name for name, lease in leases.items() if lease_alive(lease, clock)}
        plan = plan_shards(count, self.broker.inbox_owners(), live, self.name)
        self.broker.lease_shards(self.name, plan.take, plan.release)
        if plan.take or plan.release:
            log.info("inbox shards: took %s, let go of %s", list(plan.take), list(plan.release))
        self.shards = plan.read

    def let_go_of_shards(self) -> None:
        """On a clean stop: the shards it leases, free for the others at once."""
        if len(self.keys.inbox_lanes) > 1:
            mine = [shard for shard, owner in self.broker.inbox_owners().items() if owner == self.name]
            self.broker.lease_shards(self.name, (), mine)

    def check_restart(self) -> None:
        """A new run id: Redis restarted, perhaps from older data than the runs this coordinator holds
        (the client's own retries can hide the restart from the loop)."""
        run_id = self.broker.server_run_id()
        if run_id and self._run_id and run_id != self._run_id:
            log.warning("Redis restarted (run id %s); reading every run afresh", run_id[:8])
            self.broker.load_scripts()  # workers and clients may not load them: on a cluster, a promoted
            self.restarted()  # replica has none (SCRIPT LOAD is not replicated)
            self._reindex = 0
        self._run_id = run_id or self._run_id

    def reindex(self, page: int = 1000, pages: int = 1) -> None:
        """After Redis restarted (or once when a coordinator starts on a cluster: no coordinator may have
        been up to see a failover), a page a tick. A run's last commit may be lost while its removal
        from the running index stayed: on a cluster, on another master; on one server, when the client's
        own retry sent the removal again to a Redis that restarted from data older than the commit. Such
        a run, going again, is put back in that index, where the reconciler looks."""
        for _ in range(pages):
            start = self._reindex or 0
            seen, added = self.broker.index_running_again(start, page)
            if added:
                log.warning("%d run(s) going again after a restart were not indexed as running; indexed", added)
            self._reindex = None if seen < page else start + seen
            if self._reindex is None:
                return

    def trim(self) -> None:
        """Keep streams and indexes from growing: drop what every reader has acked, bound the events log
        by age and size, forget expired runs and long-dead workers."""
        clock, leases = self.broker.worker_leases()
        agents = {str(info.get("agent")) for info in leases.values() if info.get("agent")}
        streams = [(lane, COORDINATORS_GROUP) for lane in self.lanes()]
        for agent in sorted(agents):
            streams += [(self.keys.agent_tasks(agent), WORKERS_GROUP), (self.keys.agent_bulk(agent), WORKERS_GROUP)]
        for stream, group in streams:
            self.broker.trim_acked(stream, group, keep=self.settings.stream_maxlen)
        _, coordinators = self.broker.leases(self.keys.coordinators)
        held = [(self.keys.worker_leases(info["agent"]), name, info) for name, info in leases.items()]
        held += [(self.keys.coordinators, name, info) for name, info in coordinators.items()]
        for table, name, info in held:
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
        for inbox in self.lanes():
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
                self.process(clock, [(inbox, entry) for entry in entries])
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


LANE_LIMIT = 1000  # pending or unread entries of a lane the reconciler reads; past it, it waits for a later pass


class Reconciler:
    """Finds the units nobody holds and has them dispatched again.

    A Redis that lost its last writes can leave a unit `ready` or `running` with its message nowhere:
    never added, its delivery or its start forgotten, its result lost after the entry was acked. Such a
    unit, older than `reclaim_after`, has no unread or pending entry in its agent's lanes, and no live
    worker's lease lists its dispatch as held. It is a suspect; seen so again a pass later, once the
    coordinators have handled every inbox entry there was at the first sighting (a result on its way is
    applied first), a `redispatch` message asks for a new attempt, committed like any other input.
    Each pass reads a chunk of the running workflows, and at most LANE_LIMIT entries of a lane."""

    def __init__(
        self,
        settings: Settings,
        broker: CoordinatorStore,
        workflow: Callable[[str], Workflow],
        lanes: Callable[[], list[str]],
    ):
        self.settings = settings
        self.broker = broker
        self.keys = settings.keys
        self.workflow = workflow
        self.lanes = lanes  # the inbox's, whose entries are handled before a suspect is sent again
        self._cursor = 0
        self._cycle = 0  # full walks of the running index: suspects not seen again within one are dropped
        # (wf, unit) -> (dispatch, token, inbox marks when first seen, cycle)
        self._suspects: dict[tuple[str, str], tuple[str, int, dict[str, str], int]] = {}

    def reconcile(self, chunk: int = 50) -> int:
        """One pass over the next chunk of running workflows; returns how many units it sent again."""
        rows = self.broker.running_since(self._cursor, chunk)
        self._cursor = 0 if len(rows) < chunk else self._cursor + chunk
        ids = [wf_id for wf_id, _ in rows]
        found = self.unheld(rows) if rows else {}
        marks = self.broker.inbox_marks(self.lanes()) if found else {}
        handled: dict[tuple[tuple[str, str], ...], bool] = {}
        sent = 0
        for key, (dispatch, token) in found.items():
            seen = self._suspects.get(key)
            if seen is None or seen[:2] != (dispatch, token):
                self._suspects[key] = (dispatch, token, marks, self._cycle)
                continue
            signature = tuple(sorted(seen[2].items()))
            if signature not in handled:
                handled[signature] = self.broker.inbox_handled(seen[2], COORDINATORS_GROUP)
            if not handled[signature]:
                continue
            wf_id, unit = key
            log.warning("%s of %s: nobody holds dispatch %s; dispatching it again", unit, wf_id, dispatch)
            body = {"wf": wf_id, "unit": unit, "dispatch": dispatch, "token": token, "reason": "nobody holds it"}
            self.broker.send_to_coordinators(wire.Inbox(kind="redispatch", body=body))
            del self._suspects[key]
            sent += 1
        chunk_ids = set(ids)
        for key in [
            k for k, v in self._suspects.items() if k not in found and (k[0] in chunk_ids or v[3] < self._cycle - 1)
        ]:
            del self._suspects[key]
        if self._cursor == 0:
            self._cycle += 1
        return sent

    def unheld(self, rows: list[tuple[str, float]]) -> dict[tuple[str, str], tuple[str, int]]:
        """The units of these workflows (id, created) that nobody holds: (wf, unit) -> (dispatch, token).
        A run created less than `reclaim_after` ago has no unit dispatched that long ago: its unit table
        (ten thousand fields for a big fan-out) is not read. A unit waiting to retry long past its time,
        or still going long past its deadline, has that timer set again: Redis may have lost it (a
        failover; on one server, the client's own retry of a drain that removed it, onto a Redis that
        lost the commit that set it)."""
        clock, _ = self.broker.worker_leases(())
        margin = self.settings.reclaim_after
        wf_ids = [wf_id for wf_id, created in rows if not clock - margin < created <= clock]
        if not wf_ids:
            return {}
        by_agent: dict[str, list[tuple[str, str, dict[str, Any]]]] = defaultdict(list)
        overdue = []
        for wf_id, (spec, wf_state, outbox, table) in zip(wf_ids, self.broker.unit_tables(wf_ids), strict=True):
            if not spec or wf_state in WF_TERMINAL or outbox:  # an outbox is re-driven before anything else
                continue
            workflow = self.workflow(spec)
            for unit, record in table.items():
                if _past_deadline(workflow, unit, record, clock - margin):
                    overdue.append(timer_member("deadline", wf_id, unit, str(record["dispatch"])))
                if record.get("state") == "retrying" and clock - float(record.get("retry_at") or clock) > margin:
                    overdue.append(timer_member("retry", wf_id, unit, int(record.get("attempt") or 1)))
                elif _maybe_unheld(record, clock, self.settings.reclaim_after):
                    agent = unit_agent(workflow, unit)
                    if agent:
                        by_agent[agent].append((wf_id, unit, record))
        missing = self.broker.set_timers_again(overdue, clock) if overdue else 0
        if missing:
            log.warning("%d retry or deadline timer(s) were gone, Redis having lost writes; set again", missing)
        found: dict[tuple[str, str], tuple[str, int]] = {}
        if not by_agent:
            return found
        clock, leases = self.broker.worker_leases(by_agent)  # these agents', on the roster or not yet
        for agent, units in by_agent.items():
            for wf_id, unit, record in self._unheld_of(agent, units, clock, leases):
                found[(wf_id, unit)] = (str(record["dispatch"]), int(record.get("token") or 0))
        return found

    def _unheld_of(
        self, agent: str, units: list[tuple[str, str, dict[str, Any]]], clock: float, leases: dict[str, dict[str, Any]]
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """Of one agent's units, those no live worker lists and whose message is neither pending nor unread."""
        held: set[str] = set()
        for lease in leases.values():
            if lease.get("agent") == agent and lease_alive(lease, clock):
                if "dispatches" not in lease or lease.get("dispatches_more"):
                    return []  # a worker that does not say everything it holds: nothing can be told
                held.update(lease["dispatches"])
        units = [u for u in units if u[2]["dispatch"] not in held]
        if not units:
            return []
        lanes = {"": self.keys.agent_tasks(agent), "bulk/": self.keys.agent_bulk(agent)}
        views = {prefix: self.broker.lane(stream, WORKERS_GROUP, LANE_LIMIT) for prefix, stream in lanes.items()}
        if any(view is not None and len(view[0]) >= LANE_LIMIT for view in views.values()):
            return []  # more pending than we read: come back when the workers caught up
        started, waiting = [], []
        for wf_id, unit, record in units:
            ref = str(record.get("entry") or "")
            prefix = "bulk/" if ref.startswith("bulk/") else ""
            view = views[prefix]
            if ref and int(record.get("token") or 0):
                if view is None or ref.removeprefix(prefix) not in view[0]:
                    started.append((wf_id, unit, record))
            else:
                waiting.append((wf_id, unit, record))
        if waiting:
            live = self._live_dispatches(lanes, views)
            if live is None:
                return started
            started += [u for u in waiting if u[2]["dispatch"] not in live]
        return started

    def _live_dispatches(self, lanes: dict[str, str], views: dict[str, tuple[set[str], str] | None]) -> set[str] | None:
        """The dispatch ids of the lanes' pending and unread entries; None when there are too many to read."""
        live: set[str] = set()
        for prefix, stream in lanes.items():
            view = views[prefix]
            if view is None:
                continue
            pending, delivered = view
            unread = self.broker.entries_after(stream, delivered, LANE_LIMIT)
            if len(unread) >= LANE_LIMIT:
                return None
            for entry in [*self.broker.entries(stream, pending), *unread]:
                ids = wire.salvage_ids(entry.raw, self.settings.max_message_bytes)
                dispatch = ids["dispatch"] if ids else None
                if dispatch:
                    live.add(dispatch)
        return live


def _maybe_unheld(record: dict[str, Any], clock: float, margin: float) -> bool:
    """A unit sent to an agent (not a gate, not a child run), live and unanswered for `margin` seconds."""
    if record.get("state") not in ("ready", "running") or not record.get("dispatch") or record.get("child"):
        return False
    if record.get("answered") is not None:  # it had its result and waits for its children
        return False
    since = max(float(record.get("dispatched") or 0), float(record.get("started") or 0))
    return clock - since > margin


def _past_deadline(workflow: Workflow, unit: str, record: dict[str, Any], before: float) -> bool:
    """A unit still dispatched or running, with no result yet, whose deadline (its dispatch time plus
    its task's timeout) was before `before`: its deadline timer should have fired by then."""
    if record.get("state") not in ("ready", "running") or record.get("answered") is not None:
        return False
    task = split_unit(unit)[0]
    timeout = workflow.timeout(task) if task in workflow.tasks and record.get("dispatch") else None
    if not timeout:
        return False
    return float(record.get("dispatched") or before) + timeout < before
