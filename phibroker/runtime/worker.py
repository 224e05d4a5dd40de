"""The agent worker: fetch, start, handle, settle — and keep a lease so the dead can be told from the slow.

The main loop reads like rq's `work()`: maintain (take over dead workers' entries: `reclaim`) -> stop requested? ->
fetch (own pending entries first, then new ones from the task lane and the bulk lane, COUNT = free slots + a small
prefetch) -> start (one script call marks a batch running and hands out fencing tokens) -> hand each to a handler
thread. Handlers know no Redis; their outcomes are settled in batches (one inbox entry per lane, then the acks), by
the handler's own thread when it can, else by a settler thread (`settler`). A heartbeat thread renews the lease,
also while handlers run; a listener thread raises `ctx.cancelled` when the workflow no longer wants a task, and the
heartbeat checks for what it missed (`cancels`). The same read returns the agent's subscription entries, which its
`Reactor` runs in the same slots (`slots`) beside the tasks.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from phibroker import wire
from phibroker.engine import records
from phibroker.errors import DecodeError, InvalidInput, PhibrokerError
from phibroker.keys import WORKERS_GROUP, consumer_name
from phibroker.runtime.agent import Agent, Context, failure
from phibroker.runtime.cancels import Cancels
from phibroker.runtime.output import AttemptOutput, capture_logs
from phibroker.runtime.reactor import Reactor
from phibroker.runtime.reclaim import Ownership, Reclaimer
from phibroker.runtime.settler import SETTLE_GATHER, Settler
from phibroker.runtime.slots import HandlerThreads, Slots
from phibroker.runtime.telemetry import Telemetry
from phibroker.runtime.tracing import Span, attempt_span, current, tracing
from phibroker.settings import Settings
from phibroker.store.connection import CONNECTION_ERRORS, LEASE_INFO_BYTES, LEASE_INFO_ITEMS, Entry
from phibroker.store.registry import Registry
from phibroker.store.worker import WorkerStore
from phibroker.workflow.spec import is_name

log = logging.getLogger("phibroker.worker")

LEASE_DISPATCHES = 1000  # dispatch ids a lease lists as held; past that it says there are more
MAX_AGENT_NAME = 128  # bytes: its workers' consumer names (`AGENT@HOST:PID:ID`) stay within START's 256


@dataclass(slots=True)
class Fetched:
    stream: str  # the agent's task stream or its bulk lane
    entry: Entry
    message: wire.TaskMessage
    lost: bytes = b""  # a history record for the attempt this reclaim replaces
    epoch: int = 0  # the Ownership epoch it was read (or last found ours) in

    @property
    def ref(self) -> str:
        """The entry as the start script records it: entry ids repeat across the two lanes."""
        return self.entry.id if self.stream.endswith(":tasks") else f"bulk/{self.entry.id}"


@dataclass(slots=True)
class Running:
    item: Fetched
    ctx: Context
    span: Span | None = None  # the attempt's trace span, ended when it is settled (`tracing`)


class Worker:
    def __init__(
        self,
        agent: Agent,
        settings: Settings,
        concurrency: int = 4,
        broker: WorkerStore | None = None,
        telemetry: Telemetry | None = None,
    ):
        self.agent = agent
        self.telemetry = telemetry  # the metrics it serves, if any (`--metrics-port`)
        if telemetry is not None:
            telemetry.serving(agent.name)
        self.tracing = tracing()  # a tracer provider is set: attempts make spans (checked again by the heartbeat)
        self.settings = settings
        self.broker = broker or WorkerStore(settings)
        self.broker.serve(agent.name)
        if settings.agent_secret:  # `lost`, `declined`, a reaction's runs: signed like its results
            self.broker.sign_as(agent.name, settings.agent_secret.encode())
        self.registry = Registry(settings, client=self.broker.redis)
        self.keys = settings.keys
        self.stream = self.keys.agent_tasks(agent.name)
        self.bulk = self.keys.agent_bulk(agent.name)  # big releases: read beside the stream, so never ahead of it
        self.lanes = (self.stream, self.bulk)
        if len(agent.name.encode()) > MAX_AGENT_NAME:  # its consumer name must fit what START takes (256 bytes)
            raise InvalidInput(f"agent name {agent.name[:40]!r}... is longer than {MAX_AGENT_NAME} bytes")
        if not is_name(agent.name):  # its workers' names say whose leases they are (`keys.agent_of`)
            raise InvalidInput(f"agent name {agent.name!r}: letters, digits, '_', '.' and '-' only")
        self.consumer = consumer_name(agent.name, socket.gethostname(), os.getpid(), wire.short_id()[:6])
        self.concurrency = max(1, concurrency)
        self.stopping = threading.Event()
        self.slots = Slots(self.concurrency, self.stopping)
        self.pool = HandlerThreads(self.concurrency, f"phi-{agent.name}")
        self.backlog: deque[Fetched] = deque()
        self.reactor = Reactor(agent, settings, self.broker, self.registry, self.slots, self.pool, self._recover)
        self.running: dict[tuple[str, str], Running] = {}  # (lane, entry id) -> attempt, until settled
        self.settler = Settler(
            agent,
            self.consumer,
            settings,
            self.broker,
            self.bulk,
            self.running,
            self.slots,
            self.stopping,
            telemetry,
        )
        self.reclaimer = Reclaimer(
            agent,
            self.consumer,
            settings,
            self.broker,
            self.lanes,
            self.reactor,
            self.running,
            self.backlog,
            self.accept,
            self._dead_letter,
            self._recover,
        )
        self.cancels = Cancels(agent.name, self.broker, self.running, self._finished, self._rest)
        self.ownership = Ownership(self.broker, self.consumer, settings.reclaim_after)
        self.settler.ours = self._ours
        self._run_id: str | None = None  # the Redis server's, to notice a restart
        self._recovering = True  # read our own pending entries first (at start, after an error, when unheld)
        self._threads: list[threading.Thread] = []

    # -- the loop ----------------------------------------------------------------------------------
    def work(self, burst: bool = False) -> bool:
        """Run until `stop()`; `burst` returns once the stream is empty and every handler settled.

        Returns False when handlers were still running at the end of the grace period: their tasks
        are left unacked for other workers, and the caller should exit without waiting for them.
        """
        self._until_registered()
        capture_logs()  # handlers' log records into their tasks' output
        log.info("worker %s serving %s (%s)", self.consumer, self.agent.name, ", ".join(self.agent.commands))
        self._spawn(self.settler.settle_loop, "settler")
        self._spawn(self._heartbeat_loop, "heartbeat")
        self._spawn(self.cancels.listen, "stops")
        backoff = 0.1
        try:
            while not self.stopping.is_set():
                try:
                    self.reclaimer.maintain()
                    recovering = self._recovering  # such a read sees only our own pending entries
                    fetched = self.fetch()
                    self.launch()
                    backoff = 0.1
                except CONNECTION_ERRORS as exc:
                    log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                    self._recovering = True
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if (
                    burst
                    and not (fetched or recovering)
                    and not self.backlog
                    and not self.reactor.reactions
                    and self._idle()
                ):
                    break
        finally:
            clean = self.shutdown()
        return clean

    def _until_registered(self) -> None:
        """Groups, lease and subscriptions, retried while Redis is out of reach or says no (a full one
        refuses even the XGROUP CREATE of a group that exists), until it takes them or we are stopped."""
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                for lane in self.lanes:
                    self.broker.ensure_group(lane, WORKERS_GROUP)
                self.renew_lease()
                self.reactor.register()
                self._join()
                return
            except CONNECTION_ERRORS as exc:
                log.warning("cannot register yet (%s); retrying in %.1fs", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _join(self) -> None:
        """Put the agent on the roster, where the coordinators find its lanes and the views its leases
        and subscriptions. A signing agent (whose generated user may not write the roster) asks the
        coordinators, in its own lane, which they read as the identities file names it; an agent that
        signs nothing writes it itself."""
        if self.settings.agent_secret:
            self.broker.send_to_coordinators(wire.Inbox(kind="joined", body={"agent": self.agent.name}))
        else:
            self.registry.add_to_roster(self.agent.name)

    def stop(self) -> None:
        """Stop reading; running handlers get `stop_grace` seconds to finish."""
        self.stopping.set()
        self.slots.wake()

    def _recover(self) -> None:
        self._recovering = True

    def fetch(self) -> int:
        """Read what free slots can take, plus a prefetch; wait for a slot when all are busy."""
        if self.slots.free <= 0:
            self.slots.wait_free(self.settings.worker_block)
            if self.backlog and self.backlog[0].stream == self.bulk:
                # Busy with a big release: wait a moment for more slots, so one start script (and
                # one read) serves a batch instead of each slot as it frees.
                self.slots.wait_free(SETTLE_GATHER, want=max(1, self.concurrency // 2))
            return 0
        if self.backlog or self.reactor.reactions:
            return 0
        count = self.slots.free + self.settings.prefetch
        if self._recovering:
            count += len(self.running)  # our own pending entries include the ones we run: read past them
        block = None if self._recovering else self.settings.worker_block
        began = time.monotonic()
        streams = [*self.lanes, *self.reactor.streams]
        read = self.broker.read_groups(streams, WORKERS_GROUP, self.consumer, count, block, pending=self._recovering)
        if self._recovering and all(pair in self.running or pair in self.reactor.reacting for pair in _pairs(read)):
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
                self.reactor.accept_reaction(stream, entry)
        return len(read)

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
            if message.id in self.settler.settled:
                acks.append(entry.id)
                continue
            fresh.append(Fetched(stream, entry, message, epoch=self.ownership.epoch))
        if lost_from and fresh:
            self.reclaimer.record_lost(fresh, lost_from)
        if stream == self.stream:
            self.backlog.extendleft(reversed(fresh))
        else:
            self.backlog.extend(fresh)
        self.broker.ack(stream, WORKERS_GROUP, acks)

    def launch(self) -> None:
        """Mark a batch started (fencing tokens from one script call per workflow), then run it."""
        self.reactor.launch()
        take = min(self.slots.free, len(self.backlog))
        if take <= 0:
            return
        batch = self.reclaimer.hand_over([self.backlog.popleft() for _ in range(take)])
        by_wf: dict[str, list[Fetched]] = defaultdict(list)
        try:
            batch = self.ownership.keep(batch)  # after a lapse: never start what another worker claimed
            for item in batch:
                by_wf[item.message.wf].append(item)
            tokens = self.broker.start_many(
                self.agent.name,
                self.consumer,
                {wf: [(i.message.unit, i.message.id, i.ref, i.lost) for i in items] for wf, items in by_wf.items()},
            )
        except CONNECTION_ERRORS:
            # Kept for the next try rather than read again: each read of our own pending entries counts
            # a delivery, and a Redis that stays full for a minute must not make them look lost.
            self.backlog.extendleft(reversed(batch))
            raise
        stale: dict[str, list[str]] = defaultdict(list)
        started = []
        runnable: list[Running] = []
        for wf, items in by_wf.items():
            for item, token in zip(items, tokens[wf], strict=True):
                if token <= 0:  # cancelled, superseded, finished, a duplicate entry, or asked to stop
                    stale[item.stream].append(item.entry.id)
                    if token == -2:
                        body = {"wf": wf, "unit": item.message.unit, "dispatch": item.message.id}
                        self.broker.send_to_coordinators(wire.Inbox(kind="declined", body=body))
                    continue
                message = item.message
                if item.lost and token > 1 and self.telemetry is not None:  # its start recorded the lost attempt
                    self.telemetry.finished(self.agent.name, message.command, "lost")
                ctx = Context.for_message(message, token)
                ctx.attempt += token - 1  # each reclaim of this dispatch started a run of its own
                event = self._started_event(message, token, ctx.attempt)
                ctx.output = AttemptOutput(self.broker, self.settings, ctx, event)  # ctx.stream, its log records
                ctx.reporter = self._report_spend
                runnable.append(Running(item, ctx))
                started.append(event)
        for stream, ids in stale.items():
            self.broker.ack(stream, WORKERS_GROUP, ids)
        if started:  # before the handlers run: a task's start is published no later than its end
            self.settler.started(started)
        for running in runnable:
            self.running[(running.item.stream, running.item.entry.id)] = running
            self.cancels.started(running.ctx)
            self.slots.take()
            self.pool.submit(self._handle, running)
        if runnable:
            time.sleep(0)  # hand the interpreter to the handlers now, not when this thread next blocks

    def _handle(self, running: Running) -> None:
        """Runs on a pool thread: the handler, then its outcome queued for the settler."""
        message = running.item.message
        try:  # the telemetry too: a user's span processor that raises must not leave the slot taken
            if self.telemetry is not None:
                self.telemetry.handler_started(self.agent.name)
            if self.tracing:
                running.span = attempt_span(running.ctx, message.traceparent)
            with current(running.span):  # the handler's own spans nest under the attempt's
                outcome = self.agent.execute(
                    message.command, running.ctx, message.payload, self.settings.max_message_bytes
                )
        except BaseException as exc:  # noqa: BLE001 - whatever happens, the attempt gets an outcome
            outcome = failure(exc, time.time(), cancelled=running.ctx.cancelled.is_set())
        finally:
            self.slots.give()
        if self.telemetry is not None:
            self.telemetry.handler_ended(self.agent.name, message.command, outcome.finished - outcome.started)
        self.settler.outcomes.put((running, outcome))
        if running.item.stream != self.bulk or not self.slots.busy:
            self.settler.settle_queued()
        # else the settler sends it, with those of the handlers still running (see Settler.settle_loop)

    def _report_spend(self, ctx: Context, tokens: int, cost: float) -> None:
        """A `ctx.spend` call, on its handler's thread: counted in the metrics, and the attempt's totals
        sent to the coordinators at once, signed like results. One Redis does not take now is dropped
        with a warning: the attempt's result carries its final totals."""
        if self.telemetry is not None:
            self.telemetry.spent(self.agent.name, tokens, cost)
        total_tokens, total_cost = ctx.spent()
        body = {"wf": ctx.workflow_id, "unit": ctx.unit, "dispatch": ctx.dispatch_id, "attempt": ctx.attempt}
        body.update(tokens=total_tokens, cost=total_cost)
        try:
            self.broker.send_to_coordinators(wire.Inbox(kind="spend", body=body, agent=self.agent.name))
        except CONNECTION_ERRORS as exc:
            log.warning("spend of %s/%s not sent now (%s); its result carries it", ctx.workflow_id, ctx.unit, exc)

    def _ours(self, items: list[Fetched]) -> list[Fetched]:
        """What the settler may ack: the items still pending on us (see Ownership)."""
        return self.ownership.keep(items)

    # -- liveness ----------------------------------------------------------------------------------
    def renew_lease(self) -> None:
        held = [running.item.message.id for running in list(self.running.values())]
        held += [item.message.id for item in list(self.backlog)]
        info = {
            "agent": self.agent.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": self.concurrency,
            "in_flight": len(self.running),
            "reclaim_after": self.settings.reclaim_after,
            "stopping": self.stopping.is_set(),
            "handled": self.settler.handled,
            "commands": sorted(self.agent.commands),
            "subscriptions": sorted(self.agent.subscriptions),
            # what the reconciler must not dispatch again, even with no entry pending (a Redis that
            # restarted from older data forgot the delivery, not the handler running it)
            "dispatches": held[:LEASE_DISPATCHES],
            "dispatches_more": len(held) > LEASE_DISPATCHES,
        }
        began = time.monotonic()
        self.broker.renew_lease(
            self.keys.worker_leases(self.agent.name), self.consumer, self.settings.reclaim_after, fitted(info)
        )
        self.ownership.renewed(began)

    def _check_restart(self) -> None:
        """A new server run id: Redis restarted, perhaps from older data. Our own pending entries are read
        again, and what we hold is checked before it is started or acked (the client's own retries can
        hide the restart from the loop)."""
        run_id = self.broker.server_run_id()
        if run_id and self._run_id and run_id != self._run_id:
            log.warning("Redis restarted (run id %s); reading our pending entries again", run_id[:8])
            self.ownership.lost_track()
            self._recovering = True
            self._join()  # the roster may have lost the agent with the writes Redis lost
        self._run_id = run_id or self._run_id

    def _heartbeat_loop(self) -> None:
        while not self._finished():
            try:
                self.tracing = tracing()
                self.renew_lease()
                self._check_restart()
                self.cancels.check()
            except CONNECTION_ERRORS as exc:
                log.warning("heartbeat failed: %s", exc)
            except PhibrokerError as exc:
                log.warning("heartbeat: %s", exc)
            except Exception:  # noqa: BLE001 - without its heartbeat, a live worker's tasks are taken from it
                log.exception("heartbeat failed")
            self._rest(self.settings.lease_renew)

    def _finished(self) -> bool:
        """Stopped, and every handler settled: the lease and the listener have nothing left to serve."""
        return self.stopping.is_set() and self.slots.busy == 0 and not self.running

    def _rest(self, seconds: float) -> None:
        """Sleep up to `seconds`; a stop wakes it at once, and it returns as soon as the worker is finished."""
        until = time.monotonic() + seconds
        self.stopping.wait(seconds)
        while not self._finished() and time.monotonic() < until:
            time.sleep(0.05)

    def _dead_letter(self, entry: Entry, reason: str, stream: str | None = None) -> None:
        """Keep the raw bytes and the reason; if the message names its task, fail that task."""
        stream = stream or self.stream
        log.warning("dead-lettering %s: %s", entry.id, reason)
        extra = {"subscription": self.reactor.streams[stream]} if stream in self.reactor.streams else {}
        self.broker.dead_letter(reason, entry.raw, stream, entry.id, agent=self.agent.name, **extra)
        if stream not in self.lanes:
            return
        ids = wire.salvage_ids(entry.raw, self.settings.max_message_bytes)
        if ids:
            self.broker.send_to_coordinators(wire.Inbox(kind="lost", body={**ids, "reason": reason}))

    # -- stopping ----------------------------------------------------------------------------------
    def _idle(self) -> bool:
        return (
            self.slots.busy == 0 and not self.running and self.settler.outcomes.empty() and not self.reactor.reactions
        )

    def shutdown(self) -> bool:
        """Give unstarted entries back at once, let running handlers finish within the grace period."""
        self.stopping.set()
        try:
            ours = self._ours(list(self.backlog))  # after a lapse, what another worker claimed is not ours to give
            for lane in self.lanes:
                # Reclaimed entries stay pending on us (a copy would be refused: the unit is running
                # under the original entry); others reclaim them once our lease is gone.
                unstarted = [item.entry for item in ours if item.stream == lane and not item.lost]
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
            self.settler.abandoned.set()  # a handler that ends now must not be settled: its task goes elsewhere
            log.warning(
                "%d handlers still running after the grace period; their tasks go to other workers", self.slots.busy
            )
        self.pool.shutdown()
        try:
            if clean:  # nothing of ours is pending: leave no consumer behind in the groups
                for stream in [*self.lanes, *self.reactor.streams]:
                    self.broker.drop_consumer_if_idle(stream, WORKERS_GROUP, self.consumer)
            self.broker.drop_lease(self.keys.worker_leases(self.agent.name), self.consumer)
        except CONNECTION_ERRORS:
            pass
        if clean:
            log.info("worker %s stopped after %d tasks", self.consumer, self.settler.handled)
        return clean

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=f"phi-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _started_event(self, message: wire.TaskMessage, token: int, attempt: int) -> dict[str, Any]:
        data = {"unit": message.unit, "attempt": attempt, "token": token, "worker": self.consumer}
        return records.event("task.started", message.wf, message.task, data, message.depth)


def _pairs(read: list[tuple[str, Entry]]) -> list[tuple[str, str]]:
    """A read's entries as (stream, entry id): how running work is keyed."""
    return [(stream, entry.id) for stream, entry in read]


def fitted(info: dict[str, Any]) -> dict[str, Any]:
    """A lease's info within what LEASE stores and a reader unpacks: it says less rather than fail. Its
    dispatches go first (halved until it fits: the reconciler then holds off this agent's), then its
    commands and subscriptions (a lease without them may serve anything)."""
    while info["dispatches"] and len(wire.pack(info)) > LEASE_INFO_BYTES:
        info = {**info, "dispatches": info["dispatches"][: len(info["dispatches"]) // 2], "dispatches_more": True}
    lists = max(len(info.get("commands") or ()), len(info.get("subscriptions") or ()))
    if lists > LEASE_INFO_ITEMS or len(wire.pack(info)) > LEASE_INFO_BYTES:
        info = {k: v for k, v in info.items() if k not in ("commands", "subscriptions")}
    return info
