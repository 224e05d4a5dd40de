"""The agent worker: fetch, start, handle, settle — and keep a lease so the dead can be told from the slow.

The main loop reads like rq's `work()`: maintain (reclaim from dead workers) -> stop requested? ->
fetch (own pending entries first, then new ones from the task lane and the bulk lane, COUNT = free
slots + a small prefetch) -> start (one script call marks a batch running and hands out fencing
tokens) -> hand each to a handler thread. Handlers know no Redis; their outcomes are settled in
batches (one inbox entry per lane, then the acks), by the handler's own thread when it can, else by
a settler thread. A heartbeat thread renews the lease, also while handlers run, and raises
`ctx.cancelled` when the workflow no longer wants a task.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from phibroker import wire
from phibroker import workflow as workflows
from phibroker.engine.state import WF_TERMINAL, new_workflow_fields
from phibroker.errors import DecodeError, PhibrokerError
from phibroker.keys import WORKERS_GROUP
from phibroker.runtime.agent import Agent, Context, Event, Outcome, failure
from phibroker.runtime.events import Router, register_subscriptions
from phibroker.settings import Settings
from phibroker.store.connection import CONNECTION_ERRORS, Entry
from phibroker.store.registry import Registry
from phibroker.store.worker import WorkerStore

log = logging.getLogger("phibroker.worker")

# Under a big release, how long a worker waits to gather freed slots into one start, and outcomes
# into one settle: a round trip per task costs more CPU than the task itself (no-op tasks).
SETTLE_GATHER = 0.001


@dataclass(slots=True)
class Fetched:
    stream: str  # the agent's task stream or its bulk lane
    entry: Entry
    message: wire.TaskMessage
    lost: bytes = b""  # a history record for the attempt this reclaim replaces

    @property
    def ref(self) -> str:
        """The entry as the start script records it: entry ids repeat across the two lanes."""
        return self.entry.id if self.stream.endswith(":tasks") else f"bulk/{self.entry.id}"


@dataclass(slots=True)
class Reaction:
    """An entry of one of the agent's subscription streams: a batch of events for one handler."""

    entry: Entry
    stream: str
    subscription: str
    events: list[dict[str, Any]]


@dataclass(slots=True)
class Running:
    item: Fetched
    ctx: Context


class HandlerThreads:
    """Up to `size` threads, each taking the next job from one queue: no future per task, and a thread
    that finishes a job takes the next one without a wake-up (a thread pool's per-task cost was as big
    as the rest of a no-op task's). The worker hands out no more jobs than it has free slots."""

    def __init__(self, size: int, name: str):
        self.size = size
        self.name = name
        self.jobs: queue.SimpleQueue[tuple[Callable[[Any], None], Any] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def submit(self, job: Callable[[Any], None], arg: Any) -> None:
        if len(self.threads) < self.size:
            thread = threading.Thread(target=self._serve, name=f"{self.name}_{len(self.threads)}", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.jobs.put((job, arg))

    def _serve(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, arg = item
            try:
                job(arg)
            except BaseException:  # noqa: BLE001 - a job reports its own failures; the thread stays for the next
                log.exception("handler thread: %s failed", getattr(job, "__name__", job))

    def shutdown(self) -> None:
        """Let each thread end after the jobs queued before this."""
        for _ in self.threads:
            self.jobs.put(None)


class Worker:
    def __init__(self, agent: Agent, settings: Settings, concurrency: int = 4, broker: WorkerStore | None = None):
        self.agent = agent
        self.settings = settings
        self.broker = broker or WorkerStore(settings)
        self.registry = Registry(settings, client=self.broker.redis)
        self.keys = settings.keys
        self.stream = self.keys.agent_tasks(agent.name)
        self.bulk = self.keys.agent_bulk(agent.name)  # big releases: read beside the stream, so never ahead of it
        self.lanes = (self.stream, self.bulk)
        self.consumer = f"{agent.name}@{socket.gethostname()}:{os.getpid()}:{wire.short_id()[:6]}"
        self.concurrency = max(1, concurrency)
        self.pool = HandlerThreads(self.concurrency, f"phi-{agent.name}")
        self.backlog: deque[Fetched] = deque()
        self.reactions: deque[Reaction] = deque()
        self.reacting: set[tuple[str, str]] = set()  # (subscription stream, entry id) of reactions running
        self.sub_streams: dict[str, str] = {}  # subscription stream -> subscription name
        self.router = Router(self.registry)
        self.running: dict[tuple[str, str], Running] = {}  # (lane, entry id) -> attempt, until settled
        self.active = 0  # handlers executing now
        self.slots = threading.Condition()
        self.outcomes: queue.SimpleQueue[tuple[Running, Outcome]] = queue.SimpleQueue()
        self.unpublished: list[dict[str, Any]] = []  # `task.started` events, sent with the next settle
        self.unpublished_lock = threading.Lock()
        self.settling = threading.Lock()  # one settle at a time: results stay in order per worker
        self.settled: OrderedDict[str, None] = OrderedDict()  # dispatch ids already answered
        self.stopping = threading.Event()
        self.abandoned = threading.Event()
        self.handled = 0
        self._recovering = True
        self._next_reclaim = 0.0
        self._threads: list[threading.Thread] = []

    # -- the loop ----------------------------------------------------------------------------------
    def work(self, burst: bool = False) -> bool:
        """Run until `stop()`; `burst` returns once the stream is empty and every handler settled.

        Returns False when handlers were still running at the end of the grace period: their tasks
        are left unacked for other workers, and the caller should exit without waiting for them.
        """
        for lane in self.lanes:
            self.broker.ensure_group(lane, WORKERS_GROUP)
        self.renew_lease()
        streams = register_subscriptions(self.registry, self.agent.name, self.agent.subscriptions)
        self.sub_streams = dict(zip(streams, self.agent.subscriptions, strict=True))
        log.info("worker %s serving %s (%s)", self.consumer, self.agent.name, ", ".join(self.agent.commands))
        self._spawn(self._settle_loop, "settler")
        self._spawn(self._heartbeat_loop, "heartbeat")
        backoff = 0.1
        try:
            while not self.stopping.is_set():
                try:
                    self.maintain()
                    recovering = self._recovering  # such a read sees only our own pending entries
                    fetched = self.fetch()
                    self.launch()
                    backoff = 0.1
                except CONNECTION_ERRORS as exc:
                    log.warning("Redis unreachable (%s); retrying in %.1fs", exc, backoff)
                    self._recovering = True
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if burst and not (fetched or recovering) and not self.backlog and not self.reactions and self._idle():
                    break
        finally:
            clean = self.shutdown()
        return clean

    def stop(self) -> None:
        """Stop reading; running handlers get `stop_grace` seconds to finish."""
        self.stopping.set()
        with self.slots:
            self.slots.notify_all()

    def free_slots(self) -> int:
        return self.concurrency - self.active

    def fetch(self) -> int:
        """Read what free slots can take, plus a prefetch; wait for a slot when all are busy."""
        if self.free_slots() <= 0:
            with self.slots:
                self.slots.wait_for(lambda: self.free_slots() > 0 or self.stopping.is_set(), self.settings.worker_block)
                if self.backlog and self.backlog[0].stream == self.bulk:
                    # Busy with a big release: wait a moment for more slots, so one start script (and
                    # one read) serves a batch instead of each slot as it frees.
                    want = max(1, self.concurrency // 2)
                    self.slots.wait_for(lambda: self.free_slots() >= want or self.stopping.is_set(), SETTLE_GATHER)
            return 0
        if self.backlog or self.reactions:
            return 0
        count = self.free_slots() + self.settings.prefetch
        if self._recovering:
            count += len(self.running)  # our own pending entries include the ones we run: read past them
        block = None if self._recovering else self.settings.worker_block
        began = time.monotonic()
        streams = [*self.lanes, *self.sub_streams]
        read = self.broker.read_groups(streams, WORKERS_GROUP, self.consumer, count, block, pending=self._recovering)
        if self._recovering and all(pair in self.running or pair in self.reacting for pair in _pairs(read)):
            # Nothing of ours we do not run already. Stop now: each such read counts a delivery of
            # every entry it returns, and a reclaimed task must not look delivered too often.
            self._recovering = False
        if not read and block and time.monotonic() - began < block / 2:
            # The embedded broker answers an empty blocking read at once; don't spin on it.
            self.stopping.wait(0.05)
        for lane in self.lanes:
            self.accept(lane, [entry for stream, entry in read if stream == lane])
        for stream, entry in read:
            if stream not in self.lanes:
                self.accept_reaction(stream, entry)
        return len(read)

    def accept_reaction(self, stream: str, entry: Entry) -> None:
        key = (stream, entry.id)  # entry ids repeat across streams: a reaction is its stream and its id
        if key in self.reacting or any((r.stream, r.entry.id) == key for r in self.reactions):
            return  # queued or running already: a recovery read returns it again
        name = self.sub_streams[stream]
        try:
            events = wire.decode_events(entry.raw or b"", self.settings.max_message_bytes * 4)
        except DecodeError as exc:
            self.broker.dead_letter(exc.reason, entry.raw, stream, entry.id, subscription=name)
            self.broker.ack(stream, WORKERS_GROUP, [entry.id])
            return
        self.reactions.append(Reaction(entry, stream, name, events))

    def accept(self, stream: str, entries: list[Entry], lost_from: str | None = None) -> None:
        """Decode a lane's entries into the backlog; undecodable ones go to the DLQ, answered ones are acked.

        The task stream's entries go to the front: a big release waits in the bulk lane, so a small
        workflow's next task never queues behind it."""
        if not entries:
            return
        acks = []
        fresh: list[Fetched] = []
        held = set(self.running) | {(item.stream, item.entry.id) for item in self.backlog}
        for entry in entries:
            if (stream, entry.id) in held:  # our own pending entry, read again after a reclaim or an error
                continue
            try:
                if entry.raw is None:
                    raise DecodeError(b"", "the entry was trimmed from the stream")
                message = wire.TaskMessage.decode(entry.raw, self.settings.max_message_bytes)
            except DecodeError as exc:
                self._dead_letter(entry, exc.reason, stream)
                acks.append(entry.id)
                continue
            if message.id in self.settled:
                acks.append(entry.id)
                continue
            fresh.append(Fetched(stream, entry, message))
        if lost_from and fresh:
            self._record_lost(fresh, lost_from)
        if stream == self.stream:
            self.backlog.extendleft(reversed(fresh))
        else:
            self.backlog.extend(fresh)
        self.broker.ack(stream, WORKERS_GROUP, acks)

    def _record_lost(self, items: list[Fetched], consumer: str) -> None:
        """A history record for each run a reclaim replaces, with its attempt and start as the start
        script stored them: the lost run keeps its place and its started_at in the task's history."""
        runs = self.broker.unit_runs([(item.message.wf, item.message.unit) for item in items])
        now = time.time()
        for item, run in zip(items, runs, strict=True):
            item.lost = wire.pack(
                {
                    "unit": item.message.unit,
                    "attempt": run.get("attempt") or item.message.attempt,
                    "worker": consumer,
                    "dispatched": run.get("dispatched"),
                    "started": run.get("started") if run.get("entry") == item.ref else None,
                    "finished": now,
                    "error": f"lost: worker {consumer} stopped renewing its lease",
                    "applied": False,
                }
            )

    def launch(self) -> None:
        """Mark a batch started (fencing tokens from one script call per workflow), then run it."""
        while self.reactions and self.free_slots() > 0:
            reaction = self.reactions.popleft()
            self.reacting.add((reaction.stream, reaction.entry.id))
            with self.slots:
                self.active += 1
            self.pool.submit(self._react, reaction)
        take = min(self.free_slots(), len(self.backlog))
        if take <= 0:
            return
        batch = [self.backlog.popleft() for _ in range(take)]
        by_wf: dict[str, list[Fetched]] = defaultdict(list)
        for item in batch:
            by_wf[item.message.wf].append(item)
        tokens = self.broker.start_many(
            self.consumer,
            {wf: [(i.message.unit, i.message.id, i.ref, i.lost) for i in items] for wf, items in by_wf.items()},
        )
        stale: dict[str, list[str]] = defaultdict(list)
        started = []
        runnable: list[Running] = []
        for wf, items in by_wf.items():
            for item, token in zip(items, tokens[wf], strict=True):
                if token <= 0:  # cancelled, superseded, finished, or a duplicate entry
                    stale[item.stream].append(item.entry.id)
                    continue
                message = item.message
                ctx = Context.for_message(message, token)
                ctx.attempt += token - 1  # each reclaim of this dispatch started a run of its own
                runnable.append(Running(item, ctx))
                started.append(self._started_event(message, token, ctx.attempt))
        for stream, ids in stale.items():
            self.broker.ack(stream, WORKERS_GROUP, ids)
        if started:  # before the handlers run: a task's start is published no later than its end
            with self.unpublished_lock:
                self.unpublished += started
        for running in runnable:
            self.running[(running.item.stream, running.item.entry.id)] = running
            with self.slots:
                self.active += 1
            self.pool.submit(self._handle, running)
        if runnable:
            time.sleep(0)  # hand the interpreter to the handlers now, not when this thread next blocks

    def _handle(self, running: Running) -> None:
        """Runs on a pool thread: the handler, then its outcome queued for the settler."""
        message = running.item.message
        try:
            outcome = self.agent.execute(message.command, running.ctx, message.payload, self.settings.max_message_bytes)
        except BaseException as exc:  # noqa: BLE001 - whatever happens, the attempt gets an outcome
            outcome = failure(exc, time.time())
        finally:
            with self.slots:
                self.active -= 1
                self.slots.notify_all()
        self.outcomes.put((running, outcome))
        if running.item.stream != self.bulk or not self.active:
            self._settle_queued()
        # else the settler sends it, with those of the handlers still running (see _settle_loop)

    def _settle_queued(self) -> None:
        """Settle what is queued from this thread, unless another is settling already: one thread hop
        less than handing every outcome to the settler."""
        while not self.outcomes.empty() and self.settling.acquire(blocking=False):
            try:
                batch = self._take_outcomes()
                if batch:
                    self.settle(batch)
            finally:
                self.settling.release()

    def _take_outcomes(self, first: tuple[Running, Outcome] | None = None) -> list[tuple[Running, Outcome]]:
        batch = [first] if first is not None else []
        while len(batch) < 1000:
            try:
                batch.append(self.outcomes.get_nowait())
            except queue.Empty:
                break
        return batch

    def _react(self, reaction: Reaction) -> None:
        """Runs on a pool thread: each event the subscription has not seen yet, then the ack.

        An event is marked seen only after its handler ran, so a crash re-runs it (at least once),
        while a copy routed twice (an outbox re-driven after a coordinator died) runs once.
        """
        try:
            ids = [str(e.get("id")) for e in reaction.events]
            seen = self.broker.seen(reaction.subscription, ids)
            emitted: list[dict[str, Any]] = []
            for event, already in zip(reaction.events, seen, strict=True):
                if not already:
                    emitted += self._react_to(reaction, event)
            if emitted:
                self.broker.publish(emitted, self.router.routes)
            self.broker.mark_seen(reaction.subscription, ids, keep=self.settings.retention)
            self.broker.ack(reaction.stream, WORKERS_GROUP, [reaction.entry.id])
        except CONNECTION_ERRORS as exc:
            log.warning("reaction left for redelivery: %s", exc)
        finally:
            self.reacting.discard((reaction.stream, reaction.entry.id))
            with self.slots:
                self.active -= 1
                self.slots.notify_all()

    def _react_to(self, reaction: Reaction, raw_event: dict[str, Any]) -> list[dict[str, Any]]:
        """One event through one handler; a failure goes to the DLQ tagged with the subscription."""
        event = Event.from_map(raw_event, submitter=self._submit)
        try:
            self.agent.subscriptions[reaction.subscription].react(event)
            caused = event.caused()
            wire.pack_limited(caused, self.settings.max_message_bytes, "events emitted by a reaction")
            return caused
        except BaseException as exc:  # noqa: BLE001 - a failing reaction (SystemExit too) is kept, not retried forever
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("subscription %s failed on %s: %s", reaction.subscription, event.type, reason)
            self.broker.dead_letter(
                reason, wire.pack(raw_event), reaction.stream, reaction.entry.id, subscription=reaction.subscription
            )
            return []

    def _submit(self, source: Any, params: dict[str, Any], wf_id: str | None, depth: int, chain: list[str]) -> str:
        """`event.submit(...)` from a reaction: a workflow caused by that event."""
        workflow = source if isinstance(source, workflows.Workflow) else workflows.load(source)
        values = workflow.params_with(params)
        wf_id = wf_id or f"{workflow.name}-{wire.short_id()}"
        self.broker.submit_workflow(wf_id, new_workflow_fields(workflow, values, time.time(), depth, chain))
        return wf_id

    # -- settling ----------------------------------------------------------------------------------
    def _settle_loop(self) -> None:
        """Settle what handler threads left (they settle their own when they can), and publish
        `task.started` events within 0.2 s when no outcome carries them (a long task's start)."""
        while True:
            try:
                first = self.outcomes.get(timeout=0.2)
            except queue.Empty:
                if self.unpublished:
                    with self.settling:
                        self.settle([])
                if self.stopping.is_set() and self.active == 0 and not self.running:
                    return
                continue
            if self.active and first[0].item.stream == self.bulk:
                # A bulk lane's outcome, others about to follow: gather them for a moment, so a big
                # release settles in a few large entries rather than one small entry per handler.
                time.sleep(SETTLE_GATHER)
            with self.settling:
                self.settle(self._take_outcomes(first))

    def settle(self, batch: list[tuple[Running, Outcome]]) -> None:
        """One results entry for the batch, then the acks; retried until Redis takes it."""
        if self.abandoned.is_set():
            return
        inbox: dict[str, list[wire.Result]] = defaultdict(list)
        for r, o in batch:
            # a bulk lane's results go to the inbox's bulk lane: a small workflow's never wait behind them
            inbox[self.keys.results_bulk if r.item.stream == self.bulk else self.keys.results].append(
                o.result(r.ctx, self.consumer)
            )
        envelopes = {target: self._envelopes(results) for target, results in inbox.items()}
        acks: dict[str, list[str]] = defaultdict(list)
        for running, _ in batch:
            acks[running.item.stream].append(running.item.entry.id)
        with self.unpublished_lock:
            events, self.unpublished = self.unpublished, []
        delay = 0.1
        while True:
            try:
                self.broker.settle(envelopes, WORKERS_GROUP, acks, events, self.router.routes)
                break
            except CONNECTION_ERRORS as exc:
                log.warning("cannot settle %d results yet (%s)", len(batch), exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        for running, _ in batch:
            self.running.pop((running.item.stream, running.item.entry.id), None)
            self.settled[running.item.message.id] = None
        while len(self.settled) > 50_000:
            self.settled.popitem(last=False)
        self.handled += len(batch)

    def _envelopes(self, results: list[wire.Result]) -> list[bytes]:
        """Split results into inbox entries under the size limit (each result already is)."""
        limit = self.settings.max_message_bytes
        out: list[bytes] = []
        chunk: list[wire.Result] = []
        size = 0
        for result in results:
            weight = len(result.value or b"") + len(wire.pack(result.events)) + len(str(result.error or "")) + 512
            if chunk and size + weight > limit:
                out.append(self._envelope(chunk))
                chunk, size = [], 0
            chunk.append(result)
            size += weight
        if chunk:
            out.append(self._envelope(chunk))
        return out

    def _envelope(self, results: list[wire.Result]) -> bytes:
        """An inbox entry naming this agent, signed when it has a secret (coordinators may require it)."""
        secret = self.settings.agent_secret.encode() if self.settings.agent_secret else None
        inbox = wire.Inbox(kind="results", results=results, agent=self.agent.name)
        return inbox.encode(self.settings.max_message_bytes * 4, secret)

    # -- liveness ----------------------------------------------------------------------------------
    def renew_lease(self) -> None:
        info = {
            "agent": self.agent.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": self.concurrency,
            "in_flight": len(self.running),
            "reclaim_after": self.settings.reclaim_after,
            "stopping": self.stopping.is_set(),
            "handled": self.handled,
            "commands": sorted(self.agent.commands),
            "subscriptions": sorted(self.agent.subscriptions),
        }
        self.broker.renew_lease(self.keys.agents, self.consumer, self.settings.reclaim_after, info)

    def _heartbeat_loop(self) -> None:
        while not (self.stopping.is_set() and self.active == 0 and not self.running):
            try:
                self.renew_lease()
                self.check_cancellations()
            except CONNECTION_ERRORS as exc:
                log.warning("heartbeat failed: %s", exc)
            except PhibrokerError as exc:
                log.warning("heartbeat: %s", exc)
            time.sleep(self.settings.lease_renew)

    def check_cancellations(self) -> None:
        """Raise `ctx.cancelled` where the workflow stopped, superseded or timed out the attempt."""
        running = [r for r in list(self.running.values()) if not r.ctx.cancelled]
        if not running:
            return
        states = self.broker.unit_states([(r.ctx.workflow_id, r.ctx.unit) for r in running])
        now = time.time()
        for r, (wf_state, unit_state, dispatch) in zip(running, states, strict=True):
            wants_stop = (
                unit_state not in ("running", "ready")
                or dispatch != r.item.message.id
                or wf_state in WF_TERMINAL
                or (r.ctx.deadline is not None and now > r.ctx.deadline)
            )
            if wants_stop:
                r.ctx.cancelled.set()

    def maintain(self) -> None:
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + max(0.25, min(self.settings.reclaim_after / 2, 5.0))
            self.reclaim()

    def reclaim(self) -> int:
        """Take over the entries of workers whose lease lapsed: tasks run again as a new attempt."""
        clock, leases = self.broker.leases(self.keys.agents)
        claimed = 0
        for stream in [*self.lanes, *self.sub_streams]:
            pending = self.broker.pending_of(stream, WORKERS_GROUP)
            dead = {
                p["consumer"]
                for p in pending
                if p["consumer"] != self.consumer and leases.get(p["consumer"], {}).get("expires", 0) < clock
            }
            for consumer in sorted(dead):
                rows = [p for p in pending if p["consumer"] == consumer]
                claimed += self._take_over(stream, consumer, rows)
                if len(pending) < 1000:  # we saw all of its pending entries: forgetting it loses none
                    self.broker.drop_consumer(stream, WORKERS_GROUP, consumer)
                    if stream == self.stream:
                        self.broker.drop_lease(self.keys.agents, consumer)
        return claimed

    def _take_over(self, stream: str, consumer: str, rows: list[dict[str, Any]]) -> int:
        worn = [p["id"] for p in rows if p["deliveries"] >= self.settings.max_deliveries]
        fresh = [p["id"] for p in rows if p["deliveries"] < self.settings.max_deliveries]
        for entry in self.broker.claim(stream, WORKERS_GROUP, self.consumer, worn, 200):
            self._dead_letter(entry, f"delivered {self.settings.max_deliveries} times without a result", stream)
            self.broker.ack(stream, WORKERS_GROUP, [entry.id])
        entries = self.broker.claim(stream, WORKERS_GROUP, self.consumer, fresh, 200)
        if stream in self.lanes:
            self.accept(stream, entries, lost_from=consumer)
        else:
            for entry in entries:
                self.accept_reaction(stream, entry)
        if entries:
            log.info("reclaimed %d entries of %s from %s", len(entries), stream, consumer)
        return len(entries)

    def _dead_letter(self, entry: Entry, reason: str, stream: str | None = None) -> None:
        """Keep the raw bytes and the reason; if the message names its task, fail that task."""
        stream = stream or self.stream
        log.warning("dead-lettering %s: %s", entry.id, reason)
        extra = {"subscription": self.sub_streams[stream]} if stream in self.sub_streams else {}
        self.broker.dead_letter(reason, entry.raw, stream, entry.id, agent=self.agent.name, **extra)
        if stream not in self.lanes:
            return
        ids = _salvage_ids(entry.raw, self.settings.max_message_bytes)
        if ids:
            self.broker.send_to_coordinators(wire.Inbox(kind="lost", body={**ids, "reason": reason}))

    # -- stopping ----------------------------------------------------------------------------------
    def _idle(self) -> bool:
        return self.active == 0 and not self.running and self.outcomes.empty() and not self.reactions

    def shutdown(self) -> bool:
        """Give unstarted entries back at once, let running handlers finish within the grace period."""
        self.stopping.set()
        try:
            for lane in self.lanes:
                # Reclaimed entries stay pending on us (a copy would be refused: the unit is running
                # under the original entry); others reclaim them once our lease is gone.
                unstarted = [item.entry for item in self.backlog if item.stream == lane and not item.lost]
                if unstarted:
                    self.broker.requeue(lane, WORKERS_GROUP, unstarted)
            self.backlog.clear()
            self.renew_lease()
        except CONNECTION_ERRORS:
            pass
        deadline = time.monotonic() + self.settings.stop_grace
        while not self._idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        clean = self._idle()
        if clean:
            for thread in self._threads:
                thread.join(timeout=5)
        else:
            self.abandoned.set()  # a handler that ends now must not be settled: its task goes elsewhere
            log.warning(
                "%d handlers still running after the grace period; their tasks go to other workers", self.active
            )
        self.pool.shutdown()
        try:
            if clean:  # nothing of ours is pending: leave no consumer behind in the groups
                for stream in [*self.lanes, *self.sub_streams]:
                    self.broker.drop_consumer_if_idle(stream, WORKERS_GROUP, self.consumer)
            self.broker.drop_lease(self.keys.agents, self.consumer)
        except CONNECTION_ERRORS:
            pass
        if clean:
            log.info("worker %s stopped after %d tasks", self.consumer, self.handled)
        return clean

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=f"phi-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _started_event(self, message: wire.TaskMessage, token: int, attempt: int) -> dict[str, Any]:
        return {
            "id": wire.new_id(),
            "type": "task.started",
            "workflow": message.wf,
            "task": message.task,
            "data": {
                "unit": message.unit,
                "attempt": attempt,
                "token": token,
                "worker": self.consumer,
            },
            "ts": time.time(),
            "depth": message.depth,
        }


def _salvage_ids(raw: bytes | None, limit: int) -> dict[str, str] | None:
    """From a message that failed its checks, the ids that say which task it was, if they are there."""
    if not raw:
        return None
    try:
        envelope = wire.unpack(raw, limit)
    except DecodeError:
        return None
    if not isinstance(envelope, dict):
        return None
    ids = {k: envelope.get(k) for k in ("wf", "unit", "id")}
    if not all(isinstance(v, str) for v in ids.values()):
        return None
    return {"wf": ids["wf"], "unit": ids["unit"], "dispatch": ids["id"]}  # type: ignore[dict-item]


def _pairs(read: list[tuple[str, Entry]]) -> list[tuple[str, str]]:
    """A read's entries as (stream, entry id): how running work is keyed."""
    return [(stream, entry.id) for stream, entry in read]
