"""The coordinator (the "DC"): results in, transitions, outbox out, timers.

Stateless by design: everything lives in Redis, and what it keeps in memory is a cache checked by
each workflow's version. Several coordinators share the inbox through one consumer group; the one
that commits a transition first wins, the other re-reads and finds nothing left to do.

The loop, like rq's `work()`: maintain (lease, take over from the dead, sweep) -> one round trip that
acks the last round, claims due timers and reads the inbox -> apply each workflow's inputs in one
transition -> commit (with the dispatches) -> drain. Each inbox shard has a lane of its own (clients'
and coordinators' messages) and two per agent, the only streams its workers append to: what they send
(results, and the events the coordinator publishes for them) is handled first, a big release's results
(its bulk lane) a slice at a time after them.

Beside it live the checks of who may send what (`gate.SecurityGate`), the chores that keep a fleet of
coordinators whole (`maintenance.Maintenance`), the cache of runs and workflow files (`runs.RunCache`)
and the bulk-lane work held over to later rounds (`bulk.HeldWork`).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from phibroker import engine, wire
from phibroker.engine import state
from phibroker.errors import DecodeError, InvalidInput, MessageTooLarge, PhibrokerError
from phibroker.keys import COORDINATORS_GROUP
from phibroker.runtime.bulk import HeldWork
from phibroker.runtime.events import Router, trigger_refusal
from phibroker.runtime.gate import SecurityGate
from phibroker.runtime.inbox import Readers
from phibroker.runtime.maintenance import Maintenance
from phibroker.runtime.runs import RunCache
from phibroker.runtime.submission import submission
from phibroker.runtime.telemetry import Telemetry, agent_lags, workflow_agents
from phibroker.runtime.tracing import run_ended, tracing
from phibroker.settings import Settings
from phibroker.store.connection import CONNECTION_ERRORS, Entry, denied
from phibroker.store.coordinator import CoordinatorStore
from phibroker.store.registry import Registry
from phibroker.store.views import Views
from phibroker.workflow.spec import is_name

log = logging.getLogger("phibroker.coordinator")

TIMER_BATCH = 500  # timers one round claims at most
COMMIT_PATIENCE = 0.25
"""A run's inputs are applied again when its commit lost a race (its version moved on, or a worker
started a unit it guarded); a few tries settle any real race, and after ten each waits a little longer
(up to 50 ms). A commit still refused after this share of `coordinator_takeover` can never pass: its
inputs are dead-lettered, before this coordinator's silence lets another take over its outboxes."""
_SEALED = frozenset({"launched", "params", "children"})  # a launched run's meta its seal covers (and its start)
LAG_REFRESH = 1.0  # seconds between two looks at the agents' stream lag (`--metrics-port`)
BULK_BUDGET = 0.1  # seconds of bulk-lane work a round may do before its chores (lease, timers) come round
RELAY_BATCH = 5000  # events workers sent, published in one write at most

_CRASH_AT, _, _CRASH_COUNT = os.environ.get("PHIBROKER_CRASH_AT", "").partition(":")
_crash_hits: dict[str, int] = defaultdict(int)


def crash_point(name: str) -> None:
    """Die here, as kill -9 would, when PHIBROKER_CRASH_AT is `name` or `name:N` (the Nth time).

    Crash tests set it; unset, this is one string comparison.
    """
    if _CRASH_AT == name:
        _crash_hits[name] += 1
        if _crash_hits[name] >= int(_CRASH_COUNT or 1):
            os._exit(137)


Op = tuple[str, Any]  # ("result", Result) | ("submit", None) | ("timer", member) | ...


class Coordinator:
    """One coordinator: its rounds, with a security gate to check inputs and maintenance to run chores."""

    def __init__(
        self,
        settings: Settings,
        broker: CoordinatorStore | None = None,
        require_signed: bool = False,
        cache_size: int = 2000,
        telemetry: Telemetry | None = None,
    ):
        self.settings = settings
        self.telemetry = telemetry  # the metrics it serves, if any (`--metrics-port`)
        self._agents: set[str] = set()  # whose stream lag it reports
        self.broker = broker or CoordinatorStore(settings)
        self.registry = Registry(settings, client=self.broker.redis)
        self.keys = settings.keys
        self.name = f"{socket.gethostname()}:{os.getpid()}:{wire.short_id()[:6]}"
        self.router = Router(self.registry)
        self.gate = SecurityGate(settings, self.registry, require_signed)
        signer = self.gate.signer()  # kicks, child runs' ends, parents' cancels: signed like a client's
        if signer is not None:  # and good for as long as runs are kept: every coordinator may be down a while
            self.broker.sign_as(*signer, good_for=settings.retention)
        self.maintenance = Maintenance(
            settings,
            self.broker,
            self.name,
            self.router,
            self.process,
            self.holding,
            lambda spec: self.cache.workflow(spec),
            self._forget_all,
            self.gate.agents,
            lambda: self.cache.agents,
        )
        self.cache = RunCache(settings, self.broker, cache_size, require_signed)
        self.held = HeldWork(settings)
        self.readers = Readers(self.broker, COORDINATORS_GROUP, self.name, settings.batch_size)
        self.stopping = threading.Event()
        self._recovering = True  # read our own pending entries first (after a restart or an error)
        self._acks: defaultdict[str, list[str]] = defaultdict(list)  # handled inbox entries, acked next round
        self._clock = (0.0, time.monotonic())  # Redis's clock at the last read, and the monotonic one then
        self._stamped = 0.0  # the latest time a round was stamped with
        # when each set's next timer is due, as far as we know (each claim tells its own set's)
        self._dues: dict[str, float | None] = dict.fromkeys(self.keys.timer_sets)
        self._more_timers: str | None = None  # the set whose last claim hit its limit: more may be due there
        self._turn = 0  # the set claimed last in turn
        self._round = 0
        # inputs refused as forged, by the object: a run read again after a lost commit race decides
        # them again, and they are dead-lettered once, after the round's commits
        self._forged: dict[int, tuple[str, bytes, str, str]] = {}  # why, what, its entry, its run
        # dated control messages read this round, by their op: their ids are claimed before they apply
        self._dated: dict[int, tuple[Op, wire.Inbox, Entry, str]] = {}
        self._relayed: list[dict[str, Any]] = []  # events workers sent, published before the round commits

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, burst: bool = False) -> None:
        """Work until stopped; `burst` returns once there is nothing left to do (tests, benchmarks)."""
        log.info("coordinator %s started on %s", self.name, self.settings.shown_url)
        if self.telemetry is not None:
            self.telemetry.refresh_every(LAG_REFRESH, self._refresh_lag, lambda exc: log.warning("stream lag: %s", exc))
        backoff = 0.1
        try:
            while not self.stopping.is_set():
                try:
                    for lane in self.maintenance.lanes():  # in the loop: a full Redis refuses even an existing group
                        self.broker.ensure_group(lane, COORDINATORS_GROUP)
                    self.maintenance.tick()
                    worked = self.step()
                    backoff = 0.1
                except CONNECTION_ERRORS as exc:
                    log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                    self._forget_all()
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if burst and not worked:
                    return
            self._finish_held()
        finally:
            self._leave()

    def _forget_all(self) -> None:
        """Redis was out of reach or restarted: runs may have moved on (or back) meanwhile, and what we
        read of the inbox is read again."""
        self._recovering = True
        self.cache.clear()
        self.held.drop()
        self.readers.take()
        self._relayed = []  # they come again with their entries

    def step(self) -> int:
        """One round: due timers and one read of the inbox lanes. Returns how many items it handled.

        The round's acks, timer claim and read share one round trip; the read blocks only until the
        next timer is due, as far as this coordinator knows (others' new timers wait one block)."""
        block = self._block()
        timer_set = self._timer_set()
        acks, self._acks = self._acks, defaultdict(list)
        # every lane when reading its own pending entries again (it may have let go of their shards since),
        # else its shards' lanes, with no more bulk while some is held
        lanes = self.maintenance.lanes() if self._recovering else self._lanes(bulk=not self.held.entries)
        began = time.monotonic()
        try:
            clock, next_due, timers, read = self.broker.poll(
                lanes,
                COORDINATORS_GROUP,
                self.name,
                self.settings.batch_size,
                block,
                self._recovering,
                acks,
                timer_set,
                TIMER_BATCH,
            )
        except BaseException:
            for stream, ids in acks.items():  # not sent: they go with the next round
                self._acks[stream][:0] = ids
            raise
        waited = time.monotonic() - began
        read = _merged(read, self.readers.take())  # what a slot's blocking read got after the last wait ended
        spread = len(self.broker.by_slot(lanes)) > 1  # a cluster: the round's read could not block
        if self._recovering and not read and not self.held.entries:
            self._recovering = False
        elif block and not read and not timers and spread:
            began = time.monotonic()
            read = self.readers.wait(lanes, block)
            clock += time.monotonic() - began
        elif block and not read and not spread and waited < block / 2:
            self.stopping.wait(block)  # the embedded broker answers an empty blocking read at once
        now = self._not_before_last(clock)
        self._clock = (now, time.monotonic())
        self._dues[timer_set] = next_due
        self._more_timers = timer_set if len(timers) >= TIMER_BATCH else None
        if not read and not timers and not self.held:
            return 0
        crash_point("after_read")
        # The inbox first, then the `continue` timers (the next chunk of a big release), then the bulk
        # lane a slice at a time: a small workflow's next task goes out before a big one's. The other
        # timers (deadlines above all) of a workflow with bulk results still held wait for them: a
        # result read before its deadline fired is applied first.
        offset = now - time.monotonic()
        carried = len(self.held)
        first, bulk = self._by_lane(read)
        self.process(now, first)
        releases = [t for t in timers if t.startswith("continue|")]
        if releases:
            self.process(offset + time.monotonic(), [], releases)
        self.held.wait(t for t in timers if not t.startswith("continue|"))
        bulk = self.held.entries + bulk
        self.held.keep(self.process_bulk(offset, bulk) if bulk else [])
        due = self.held.due_timers()
        if due:
            self.process(offset + time.monotonic(), [], due)
        return len(read) + len(timers) + carried  # held work counts: a burst run does not stop on it

    def _by_lane(self, read: list[tuple[str, Entry]]) -> tuple[list[tuple[str, Entry]], list[tuple[str, Entry]]]:
        """The entries read from the inbox's first lanes, and those from its bulk lanes."""
        first: list[tuple[str, Entry]] = []
        bulk: list[tuple[str, Entry]] = []
        for pair in read:
            (bulk if self.keys.is_bulk(pair[0]) else first).append(pair)
        return first, bulk

    def _lanes(self, bulk: bool = True) -> list[str]:
        """The inbox lanes this coordinator reads: every lane of each shard it reads (see `inbox`), or
        all but the agents' bulk lanes."""
        agents = self.maintenance.agents
        return [lane for shard in self.maintenance.shards for lane in self.keys.shard_lanes(shard, agents, bulk)]

    def _not_before_last(self, now: float) -> float:
        """A round is never stamped before the previous one was (on a cluster the clock as read here is
        ahead of Redis's by a request's way, more in one round than the next), so what a round starts
        never seems to begin before what the round before it ended (a loop's next child run, say). A
        step back of a second or more is the clock's own, and kept."""
        if self._stamped - 1.0 < now < self._stamped:
            return self._stamped
        return now

    def _block(self) -> float | None:
        """How long the next read may block: until the next known timer, at most `coordinator_block`."""
        if self._recovering or self._more_timers or self.held:
            return None
        block = self.settings.coordinator_block
        known = [due for due in self._dues.values() if due is not None]
        if known:
            block = min(block, min(known) - self._now())
        return block if block >= 0.001 else None

    def _timer_set(self) -> str:
        """The set of timers this round claims (one a round: a claim per set would cost each round as
        many): one whose last claim hit its limit, else, every other round, the one due soonest if it is
        due, and the next in turn otherwise, so that a timer no coordinator knows of (set by one that
        died) is found within two turns of all the sets, however busy the known ones are."""
        if self._more_timers is not None:
            return self._more_timers
        self._round += 1
        now = self._now()
        due = [(when, name) for name, when in self._dues.items() if when is not None and when <= now]
        if due and self._round % 2:
            return min(due)[1]
        sets = self.keys.timer_sets
        self._turn = (self._turn + 1) % len(sets)
        return sets[self._turn]

    def _now(self) -> float:
        """Redis's clock as of the last read, moved on by the time since."""
        clock, at = self._clock
        return clock + time.monotonic() - at

    def _expect_timer(self, timer_set: str, due: float) -> None:
        """A transition set a timer: the next read must not block past it."""
        known = self._dues.get(timer_set)
        self._dues[timer_set] = due if known is None else min(known, due)

    def process(self, now: float, entries: list[tuple[str, Entry]], timers: Sequence[str] = ()) -> None:
        """Apply the entries (each with its inbox lane) and timers; their acks go with the next round's read."""
        ops: dict[str, list[Op]] = defaultdict(list)
        for lane, entry in entries:
            self._collect(entry, ops, lane)
        for member in timers:
            ops[state.timer_workflow(member)].append(("timer", member))
        if ops or timers:
            self.execute(now, ops, fired=timers)
        self._publish_relayed()  # sent with no commit
        if entries:
            crash_point("before_ack")
            for lane, entry in entries:
                self._acks[lane].append(entry.id)

    def process_bulk(
        self, offset: float, entries: list[tuple[str, Entry]], budget: float | None = None
    ) -> list[tuple[str, Entry]]:
        """The bulk lane, `bulk_slice` results at a time, with a look at the inbox between slices: a
        small workflow's result waits behind one slice of a fan-out's, never behind all of them.
        After `budget` seconds (BULK_BUDGET) the rest is returned, to be handled after the next round's
        chores.

        `offset` turns the monotonic clock into Redis's, so slices handled later are stamped later."""
        stop_at = time.monotonic() + (BULK_BUDGET if budget is None else budget)
        ops: dict[str, list[Op]] = defaultdict(list)
        taken: list[tuple[str, Entry]] = []
        size = 0
        for index, (lane, entry) in enumerate(entries):
            size += self._collect(entry, ops, lane)
            taken.append((lane, entry))
            if size < self.settings.bulk_slice and index < len(entries) - 1:
                continue
            self.execute(offset + time.monotonic(), ops)
            crash_point("before_ack")
            for done_lane, done in taken:
                self._acks[done_lane].append(done.id)
            ops, taken, size = defaultdict(list), [], 0
            if index == len(entries) - 1:
                break
            if time.monotonic() > stop_at:
                return entries[index + 1 :]
            lanes = self._lanes(bulk=False)
            cut_in = self.broker.read_groups(lanes, COORDINATORS_GROUP, self.name, self.settings.batch_size, None)
            if cut_in:
                self.process(offset + time.monotonic(), cut_in)
        return []

    def _sent_dead_letter(self, body: dict[str, Any], lane: str) -> dict[str, Any]:
        """A dead letter a worker sent, as the coordinators keep it: its fields of the expected types, the
        agent whose lane it came in (its own user's: the one that may append there) and that lane."""
        kept = {
            name: body[name]
            for name in ("reason", "source", "entry", "subscription")
            if isinstance(body.get(name), str)
        }
        raw = body.get("raw")
        kept["raw"] = raw[: self.settings.max_message_bytes] if isinstance(raw, bytes) else b""
        kept["size"] = body["size"] if type(body.get("size")) is int else len(kept["raw"])
        kept["truncated"] = body.get("truncated") is True
        return {**kept, "agent": self.keys.lane_owner(lane), "lane": lane}

    def _publish_relayed(self) -> None:
        """The events workers sent with the entries read, where no commit took them (see `execute`)."""
        if self._relayed:  # not sent: the entries that carried them are read again
            events, self._relayed = self._relayed, []
            self.broker.relay(events, self.router.routes)

    def holding(self, inbox: str) -> set[str]:
        """The entries of `inbox` this coordinator holds: read for later, or handled and acked with the
        next read. Pending however long, they are not stranded."""
        return self.held.ids(inbox) | set(self._acks[inbox])

    def _finish_held(self) -> None:
        """On a clean stop: what the shards' blocking reads still hand in, the held bulk results, then
        the timers that waited for them."""
        try:
            first, bulk = self._by_lane(self.readers.close())
            self.process(time.time(), first)
            self.held.keep(self.held.entries + bulk)
            if self.held.entries:
                self.process_bulk(time.time() - time.monotonic(), self.held.entries, budget=float("inf"))
                self.held.drop()
            if self.held.timers:
                self.process(time.time(), [], self.held.take_timers())
        except CONNECTION_ERRORS as exc:  # left pending: the next coordinator takes them over
            log.warning("stopping with held work left for another coordinator: %s", exc)

    def _collect(self, entry: Entry, ops: dict[str, list[Op]], stream: str) -> int:
        """Decode one inbox entry into `ops`; returns how many inputs it added."""
        try:
            if entry.raw is None:
                raise DecodeError(b"", "entry was trimmed before it was read")
            message = wire.Inbox.decode(entry.raw, self.settings.max_message_bytes * 4)
        except DecodeError as exc:
            log.warning("dead-lettering inbox entry %s: %s", entry.id, exc.reason)
            self.broker.dead_letter(exc.reason, entry.raw, stream, entry.id)
            return 0
        refusal = self.gate.check_sender(message)
        if refusal:
            log.warning("dead-lettering inbox entry %s: %s", entry.id, refusal)
            self.broker.dead_letter(refusal, entry.raw, stream, entry.id)
            return 0
        if message.kind in ("results", "events"):  # with the starts of tasks, published before any commit
            try:
                sender = self.keys.lane_owner(stream) or message.agent  # its lane says whose worker sent it
                self._relayed += wire.sent_events(message.body.get("events", []), sender)
            except DecodeError as exc:
                log.warning("dead-lettering inbox entry %s: %s", entry.id, exc.reason)
                self.broker.dead_letter(exc.reason, entry.raw, stream, entry.id)
                return 0
            if len(self._relayed) >= RELAY_BATCH:  # one write of them stays short
                self._publish_relayed()
        if message.kind == "results":
            for result in message.results:
                ops[result.wf].append(("result", (result, message.agent)))
            return len(message.results)
        if message.kind == "joined":  # signed by that agent where identities are known
            self._add_to_roster(message.agent or message.body["agent"], entry, stream)
            return 0
        if message.kind == "events":  # a task's start, a reaction's events: its workers may not publish
            return 0
        if message.kind == "dead":  # what its worker could not handle
            self.broker.keep_dead_letter(self._sent_dead_letter(message.body, stream))
            return 0
        wf_id = message.body.get("wf")
        if not isinstance(wf_id, str):
            self.broker.dead_letter("control message without a workflow id", entry.raw, stream, entry.id)
            return 0
        if message.kind == "trigger":
            self._start_triggered(message.body, entry, stream)
            return 0
        if message.kind == "submit" and "fields" in message.body:  # a client's or reaction's run: not theirs to write
            self._start_asked(message, entry, stream)
            return 0
        if message.kind == "decide":
            refusal = self.gate.verify_decision(message.body)
            if refusal:
                ops[wf_id].append(("refused", {**message.body, "refusal": refusal}))
                return 1
        if message.kind in ("spend", "lost", "declined"):  # a worker's: about its own agent's units only
            ops[wf_id].append((message.kind, (message.body, message.agent)))
            return 1
        owned = message.kind in ("cancel", "retry")  # by its run's submitter, a coordinator or an admin
        op = (message.kind, (message.body, message.agent, entry.id, entry.raw) if owned else message.body)
        ops[wf_id].append(op)
        if self.gate.remembers(message):
            self._dated[id(op)] = (op, message, entry, stream)
        return 1

    # -- transitions -------------------------------------------------------------------------------
    def execute(self, now: float, ops: dict[str, list[Op]], fired: Sequence[str] = ()) -> None:
        """Apply each workflow's inputs, commit them all, redo those whose version moved on, drain.

        `fired` timers are removed in the drain, before the timers the transitions set: a transition
        may set the very timer that fired again (`continue`, more units to release)."""
        self._stamped = now
        relayed, self._relayed = self._relayed, []  # sent ahead of the first commit: a task's start before its end
        pending = self._without_copies(ops, now)
        self._forged = {}  # a round cut short left its refusals unsent: their entries are read again
        drains: list[tuple[str, str, dict[str, Any]]] = []
        quiet: list[str] = []
        finished: list[str] = []
        tries, began = 0, time.monotonic()
        while pending:
            tries += 1
            if tries > 10:  # racing another coordinator on a busy run: let it commit first
                if time.monotonic() - began > self.settings.coordinator_takeover * COMMIT_PATIENCE:
                    for wf_id, items in pending.items():  # a commit that can never pass must not hang the loop
                        reason = f"commit refused {tries - 1} times in a row"
                        log.error("%s: %s; dead-lettering its inputs", wf_id, reason)
                        self._dead_letter_inputs(wf_id, items, reason)
                    break
                time.sleep(random.uniform(0, min(0.001 * tries, 0.05)))
            runs = self.cache.load(list(pending))
            commits, idle, reread, refused = [], [], [], set()
            for wf_id, items in pending.items():
                run = runs.get(wf_id)
                try:
                    refusal = self._refusal(run, items) if run is not None and run.fresh else None
                except CONNECTION_ERRORS:
                    raise  # Redis out of reach or saying no: the round is retried
                except Exception as exc:  # noqa: BLE001 - a check that breaks must not stop every coordinator
                    log.exception("cannot check %s; dead-lettering its inputs", wf_id)
                    self._dead_letter_inputs(wf_id, items, f"coordinator error checking {wf_id}: {exc!r}")
                    continue
                if run is None:
                    self._unknown(wf_id, items)
                elif refusal:  # it goes no further, and its inputs with it
                    log.error("%s: %s; the run fails", wf_id, refusal)
                    run.begin(self.name)
                    engine.refuse(run, refusal, now)
                    refused.add(wf_id)
                    if run.tx.changed:
                        commits.append(run)
                    else:  # ended already: the retry asked of it is not carried out
                        self._refuse_retries(wf_id, items, refusal)
                elif self._decide_safely(run, items, now) and not run.tx.reread:
                    commits.append(run)
                elif run.tx.reread:  # held since a worker reclaimed a unit: read again, inputs applied anew
                    reread.append(wf_id)
                else:
                    idle.append(wf_id)
            stale = self.cache.stale(idle, runs) + reread
            for run in commits:
                if run.id not in refused:  # what was refused is not sealed: a retry of it is refused too
                    self._seal(run)
                if run.tx.finished or run.tx.reopened:  # its workers' marks end, or stay, with it
                    run.tx.agents = run.agents()
            versions = []
            if commits:
                versions = self.broker.commit([(r.id, r.version, r.tx) for r in commits], relayed, self.router.routes)
                relayed = []
            crash_point("after_commit")
            if any(run.tx.finished and run.meta.get("parent") for run in commits):
                crash_point("after_child_end")  # a child's end committed, its parent not yet told
            for run, version in zip(commits, versions, strict=True):
                if version < 0:
                    stale.append(run.id)
                    continue
                run.committed(version)
                if run.tx.timers_add:
                    self._expect_timer(self.keys.timer_set(run.id), min(run.tx.timers_add.values()))
                if run.tx.has_outbox:
                    drains.append((run.id, run.tx.id, run.tx.outbox()))
                if run.tx.finished:
                    self.cache.forget(run.id)
                    finished.append(run.id)
                    if self.telemetry is not None:
                        self.telemetry.run_ended(str(run.meta.get("state")))
                    if tracing():
                        run_ended(run.id, run.meta)
            for wf_id in stale:
                self.cache.forget(wf_id)
            quiet += [wf_id for wf_id in idle if wf_id not in stale]
            pending = {wf_id: pending[wf_id] for wf_id in stale}
            for run in runs.values():  # those kept in the cache take later inputs: no longer fresh
                run.fresh = False
        if relayed:
            self.broker.relay(relayed, self.router.routes)
        forged, self._forged = self._forged, {}
        for reason, raw, entry, wf_id in forged.values():
            self.broker.dead_letter(reason, raw, self.keys.inbox(wf_id), entry)
        if drains or fired:
            self.broker.drain(drains, dispatched=True, fired=list(fired), route=self.router.routes)
            crash_point("after_drain")
        if quiet:  # nothing new to do: maybe a dead coordinator left its outbox undrained
            self.maintenance.redrive(quiet, older_than=1.0)
        if finished:  # the sweep walks running workflows only: whatever a dead coordinator left, now
            self.maintenance.redrive(finished)

    def _decide_safely(self, run: state.Run, items: list[Op], now: float) -> bool:
        """`_decide`, but an input the engine cannot take goes to the DLQ instead of stopping every
        coordinator that reads it (the entry would come back to each of them)."""
        try:
            return self._decide(run, items, now)
        except CONNECTION_ERRORS:
            raise  # Redis out of reach or saying no (full, busy): the inputs are fine, the round is retried
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the coordinator
            log.exception("cannot apply inputs of %s; dead-lettering them", run.id)
            self._dead_letter_inputs(run.id, items, f"coordinator error on {run.id}: {type(exc).__name__}: {exc}")
            run.begin(self.name)
            return False

    def _refusal(self, run: state.Run, items: list[Op]) -> str | None:
        """Why a run read afresh from Redis must go no further, or None. Whoever may write runs (the
        admin's user) could rewrite one: under `--require-signed` one that started must still be its
        signed file, with the params and spawned tasks the coordinators sealed (Gate.check_launched),
        its spawned tasks its handlers' own, and so must one that ended, to be retried; one not started
        yet takes its start (submit, kick), which checks it, and any other input only after the same
        checks."""
        if run.wf_state in state.WF_TERMINAL and all(kind != "retry" for kind, _ in items):
            return None  # nothing of it runs any more: its inputs are answered as an ended run's
        if run.meta.get("launched"):
            return self.gate.check_launched(run.id, run.meta) or engine.foreign_children(run)
        if all(kind in ("submit", "kick") for kind, _ in items):
            return None
        return self.gate.check_start(run.id, run.meta)

    def _seal(self, run: state.Run) -> None:
        """A launched run whose params or spawned tasks this transition changes (or that it launches)
        gets the coordinators' seal over them anew (`SecurityGate.seal`), checked when it is read again."""
        if run.meta.get("launched") and _SEALED & run.tx.meta.keys():
            seal = self.gate.seal(run.id, run.meta)
            if seal is not None:
                run.set_meta(seal=seal)

    def _refuse_retries(self, wf_id: str, items: list[Op], reason: str) -> None:
        """An ended run that may not be retried (`_refusal`): each retry asked of it is dead-lettered with
        why, as its inbox entry (where `phibroker retry` looks); its other inputs are an ended run's."""
        for kind, op in items:
            if kind == "retry":
                _, _, entry, raw = op
                self.broker.dead_letter(reason, raw, self.keys.inbox(wf_id), entry)
        self.cache.forget(wf_id)

    def _dead_letter_inputs(self, wf_id: str, items: list[Op], reason: str) -> None:
        for kind, body in items:
            raw = wire.pack(body[0].to_map()) if kind == "result" else wire.pack({"kind": kind, "body": body})
            self.broker.dead_letter(reason, raw, self.keys.inbox(wf_id), wf_id)
        self.cache.forget(wf_id)

    def _decide(self, run: state.Run, items: list[Op], now: float) -> bool:
        """Apply the inputs to the run in memory; True if there is something to commit."""
        run.begin(self.name)
        for kind, body in items:
            self._apply(run, kind, body, now)
        return run.tx.changed

    def _apply(self, run: state.Run, kind: str, body: Any, now: float) -> None:
        if kind == "result":
            result, sender = body
            reason = self.gate.check_answerer(run, result, sender)
            if reason:
                self._forged[id(result)] = (reason, wire.pack(result.to_map()), result.id, run.id)
                return
            engine.apply_result(run, result, now)
        elif kind == "timer":
            engine.apply_timer(run, body, now)
        elif kind == "spend":  # a running attempt's totals so far (ctx.spend)
            report, sender = body
            if self.gate.identities and state.unit_agent(run.workflow, str(report["unit"])) != sender:
                reason = f"forged spend: agent {sender!r} reported for {report['unit']!r} of another agent"
                self._forged[id(report)] = (reason, wire.pack(report), str(report.get("dispatch")), run.id)
                return
            engine.spend(run, report, now)
        elif kind in ("submit", "kick"):
            refusal = self.gate.check_start(run.id, run.meta) or self._orphaned(run)
            if refusal:
                engine.refuse(run, refusal, now)
            else:
                engine.start(run, now)
        elif kind in ("cancel", "retry"):
            self._by_owner(run, kind, body, now)
        elif kind == "decide":
            refusal = engine.decide(run, body, now)
            if refusal:
                self._refuse(run, body, refusal, now)
        elif kind == "refused":
            self._refuse(run, body, body["refusal"], now)
        elif kind in ("lost", "declined"):
            body, sender = body
            reason = self.gate.check_unit(run, str(body["unit"]), sender, kind)
            if reason:
                self._forged[id(body)] = (reason, wire.pack(body), str(body["dispatch"]), run.id)
            elif kind == "lost":
                engine.lost(run, body["unit"], body["dispatch"], str(body.get("reason")), now)
            else:
                engine.declined(run, body["unit"], body["dispatch"], now)
        elif kind == "child":  # a child run of a `workflow:` task ended
            crash_point("child_notice")
            engine.child_ended(run, body, now)
        elif kind == "signal":
            engine.signal(run, str(body["name"]), body.get("data"), now, body.get("sender"), str(body.get("id") or ""))
        elif kind == "redispatch":  # the reconciler found nobody holding this attempt (Maintenance)
            token, limit = int(body.get("token") or 0), self.settings.max_deliveries
            reason = str(body.get("reason") or "nobody holds it")
            engine.redispatch(run, body["unit"], body["dispatch"], token, reason, now, limit)

    def _by_owner(self, run: state.Run, kind: str, op: tuple[Any, ...], now: float) -> None:
        """A cancel or a retry (its body, sender, inbox entry and raw bytes), from whoever may act on the
        run (its submitter, a coordinator, an admin); another's is dead-lettered after the round."""
        body, sender, entry, raw = op
        refusal = self.gate.check_owner(run, kind, sender)
        if refusal:
            self._forged[id(body)] = (refusal, raw, entry, run.id)
        elif kind == "retry":
            refusal = engine.reopen(run, now, body.get("from"), str(body.get("id") or ""))
            if refusal:
                log.warning("retry of %s refused: %s", run.id, refusal)
        elif body.get("tasks"):
            engine.cancel_tasks(run, list(body["tasks"]), now, str(body.get("reason") or "cancelled by request"))
        else:
            engine.cancel(run, now, str(body.get("reason") or "cancelled by request"))

    def _without_copies(self, ops: dict[str, list[Op]], now: float) -> dict[str, list[Op]]:
        """The round's inputs but the copies of control messages applied before, dead-lettered here:
        each dated message's id is claimed in Redis (one round trip for the round, none without any)
        until it expires. The entry that claimed it is the one applied, read again after a crash too."""
        dated, self._dated = self._dated, {}
        present = {id(op) for items in ops.values() for op in items} if dated else set()
        claims = [claim for key, claim in dated.items() if key in present]
        if not claims:
            return dict(ops)
        keys = [self.gate.claim(message, now) for _, message, _, _ in claims]
        holders = self.broker.claim_applied(
            [(key, f"{stream} {entry.id}", ttl) for (key, ttl), (_, _, entry, stream) in zip(keys, claims, strict=True)]
        )
        copies = set()
        for (op, message, entry, stream), holder in zip(claims, holders, strict=True):
            if holder != f"{stream} {entry.id}":
                reason = self.gate.replayed(message, holder.rpartition(" ")[2])
                log.warning("dead-lettering inbox entry %s: %s", entry.id, reason)
                self.broker.dead_letter(reason, entry.raw, stream, entry.id)
                copies.add(id(op))
        return {wf_id: kept for wf_id, items in ops.items() if (kept := [op for op in items if id(op) not in copies])}

    def _orphaned(self, run: state.Run) -> str | None:
        """Why a child run must not start: its parent's task no longer waits for it (the parent was
        cancelled or ended before the child's creation was carried out, after a coordinator died)."""
        parent_id, task = run.meta.get("parent"), run.meta.get("parent_task")
        if not parent_id or run.meta.get("launched"):
            return None

        def waits(parent: state.Run | None) -> bool:
            record = parent.units.get(str(task), {}) if parent is not None else {}
            return record.get("child") == run.id and record.get("state") in state.UNIT_LIVE and not record.get("stop")

        if waits(self.cache.runs.get(str(parent_id))):
            return None
        self.cache.forget(str(parent_id))  # another coordinator may have made the child since we cached it
        if waits(self.cache.peek(str(parent_id))):  # a look only: checked and held when its own inputs come
            return None
        return f"its parent {parent_id}'s task {task} no longer waits for it"

    def _add_to_roster(self, agent: str, entry: Entry, stream: str) -> None:
        """Put an agent on the roster, as its signed message asks; dead-lettered, with why, if the name is
        not an agent's or this coordinator's user may not (users made before coordinators wrote it)."""
        reason = None if is_name(agent) else f"not an agent name: {agent[:64]!r}"
        try:
            if reason is None:
                self.registry.add_to_roster(agent)
        except Exception as exc:
            if not denied(exc):
                raise
            reason = "this coordinator's Redis user may not write the roster: generate and load the users again"
        if reason:
            log.error("cannot put agent %r on the roster: %s", agent[:64], reason)
            self.broker.dead_letter(reason, entry.raw, stream, entry.id)

    def _start_triggered(self, body: dict[str, Any], entry: Entry, stream: str) -> None:
        """An event matched a trigger: start its workflow, with the event's data as params, once."""
        name = str(body.get("trigger"))
        info = self.registry.trigger(name)
        if info is None:
            log.warning("trigger %s was removed; its event is ignored", name)
            return
        refusal = trigger_refusal(name, info, body, self.settings.storm_depth)
        if refusal:
            log.warning("dead-lettering inbox entry %s: %s", entry.id, refusal)
            self.broker.dead_letter(refusal, entry.raw, stream, entry.id)
            return
        event = body["event"]
        workflow = self.cache.workflow(info["spec"])
        data = event.get("data")
        params = {**workflow.spec.params, **(data if isinstance(data, dict) else {"data": data})}
        chain = event.get("chain")
        chain = [*(chain if isinstance(chain, list) else []), f"{event.get('type')}@{event.get('id')}"]
        depth = int(event.get("depth") or 0) + 1
        try:  # the event is an agent's: its data may make no run (bytes in params, say), before any write
            wf_id, fields = submission(workflow, params, str(body["wf"]), depth, chain, signed=info.get("signed") or {})
            started = self.broker.submit_workflow(wf_id, fields)
        except (InvalidInput, TypeError, ValueError) as exc:
            reason = f"trigger {name}: its event makes no run: {exc}"
            log.warning("dead-lettering inbox entry %s: %s", entry.id, reason)
            self.broker.dead_letter(reason, entry.raw, stream, entry.id)
            return
        if started:
            log.info("trigger %s started %s on %s", name, body["wf"], event.get("type"))

    def _start_asked(self, message: wire.Inbox, entry: Entry, stream: str) -> None:
        """Write the run a client or a reaction asked for, as its sender signed it: checked when it starts."""
        refusal = self.gate.check_asked_run(message)
        if refusal is None and self.broker.run_exists(str(message.body["wf"])):
            # the same reaction asked again (its run's id makes that harmless); and a run that exists,
            # whoever's, is never written to
            log.info("submit of run %s, which exists already: nothing to write", message.body["wf"])
            return
        if refusal:
            log.warning("dead-lettering inbox entry %s: %s", entry.id, refusal)
            self.broker.dead_letter(refusal, entry.raw, stream, entry.id)
            return
        try:
            self.broker.submit_workflow(str(message.body["wf"]), dict(message.body["fields"]), sign=False)
        except (TypeError, ValueError, MessageTooLarge) as exc:  # what no check foresaw stops no coordinator
            reason = f"submit of run {message.body['wf']!r}: {type(exc).__name__}: {exc}"
            log.warning("dead-lettering inbox entry %s: %s", entry.id, reason)
            self.broker.dead_letter(reason, entry.raw, stream, entry.id)

    def _refuse(self, run: state.Run, body: dict[str, Any], refusal: str, now: float) -> None:
        log.warning("refused decision on %s/%s: %s", run.id, body.get("task"), refusal)
        run.event(
            "approval.refused",
            now,
            body.get("task"),
            approval=body.get("approval"),
            reason=refusal,
            decision=str(body.get("signature", ""))[:16],
        )

    def _unknown(self, wf_id: str, items: list[Op]) -> None:
        """Results for a workflow that does not exist (expired, or never was): kept in the DLQ."""
        for kind, body in items:  # a timer of an expired workflow simply goes away
            if kind == "result":
                result, _ = body
                raw = wire.pack(result.to_map())
                self.broker.dead_letter(f"unknown workflow {wf_id!r}", raw, self.keys.inbox(wf_id), result.id)

    def _refresh_lag(self) -> None:
        """`phibroker_stream_lag` of each agent it knows of: a live worker's, or one a workflow it
        handled names (an agent with no worker at all is the one whose lag matters most)."""
        _, leases = self.broker.worker_leases()
        self._agents |= {str(info["agent"]) for info in leases.values() if info.get("agent")}
        for workflow in list(self.cache.specs.values()):
            self._agents |= workflow_agents(workflow)
        assert self.telemetry is not None
        self.telemetry.set_lags(agent_lags(Views(self.broker), self.keys, self._agents))

    # -- stopping ---------------------------------------------------------------------------------
    def _leave(self) -> None:
        if self.telemetry is not None:
            self.telemetry.stop()
        self.readers.close()  # already, after a clean stop
        try:
            for stream, ids in self._acks.items():
                self.broker.ack(stream, COORDINATORS_GROUP, ids)
            for lane in self.maintenance.lanes():
                self.broker.drop_consumer_if_idle(lane, COORDINATORS_GROUP, self.name)
            self.maintenance.let_go_of_shards()
            self.broker.drop_lease(self.keys.coordinators, self.name)
        except (PhibrokerError, *CONNECTION_ERRORS):
            pass
        log.info("coordinator %s stopped", self.name)


def _merged(read: list[tuple[str, Entry]], more: list[tuple[str, Entry]]) -> list[tuple[str, Entry]]:
    """`read` and the entries of `more` it lacks: a round reading its own pending entries again may read
    what a shard's blocking read handed in too."""
    if not more:
        return read
    seen = {(lane, entry.id) for lane, entry in read}
    return read + [(lane, entry) for lane, entry in more if (lane, entry.id) not in seen]
