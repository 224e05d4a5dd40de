"""A worker's outcomes on their way to the coordinators: gathered, batched into inbox entries, acked.

Handler threads settle their own outcomes when no other thread is settling, a settler thread takes
what they leave (and a long task's `task.started` event), and one lock keeps the results of a worker in
order. Settling is what a worker does after a handler ran; it knows nothing of fetching or starting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from phibroker import wire
from phibroker.runtime.agent import Agent, Outcome
from phibroker.runtime.slots import Slots
from phibroker.runtime.telemetry import Telemetry, attempt_outcome
from phibroker.runtime.tracing import attempt_settled
from phibroker.settings import Settings
from phibroker.store.connection import CONNECTION_ERRORS
from phibroker.store.worker import WorkerStore

if TYPE_CHECKING:
    from phibroker.runtime.worker import Fetched, Running

log = logging.getLogger("phibroker.worker")  # settling logs as the worker it settles for

T = TypeVar("T")

# Under a big release, how long a worker waits to gather freed slots into one start, and outcomes
# into one settle: a round trip per task costs more CPU than the task itself (no-op tasks).
SETTLE_GATHER = 0.001
START_WAIT = 0.2  # seconds a task's start waits to go with its result before it goes alone


class Settler:
    """The outcomes handlers left, the `task.started` events not yet sent, and the dispatches answered."""

    def __init__(
        self,
        agent: Agent,
        consumer: str,
        settings: Settings,
        broker: WorkerStore,
        bulk: str,
        running: dict[tuple[str, str], Running],
        slots: Slots,
        stopping: threading.Event,
        telemetry: Telemetry | None = None,
    ):
        self.agent = agent
        self.consumer = consumer
        self.settings = settings
        self.keys = settings.keys
        self.broker = broker
        self.bulk = bulk
        self.running = running  # the worker's table: settled attempts leave it here
        self.slots = slots
        self.stopping = stopping
        self.telemetry = telemetry
        self.outcomes: queue.SimpleQueue[tuple[Running, Outcome]] = queue.SimpleQueue()
        # `task.started` events (with when they were queued), each sent with its task's result, or alone
        # once it waited START_WAIT for one
        self.unpublished: list[tuple[float, dict[str, Any]]] = []
        self.unpublished_lock = threading.Lock()
        self.settling = threading.Lock()  # one settle at a time: results stay in order per worker
        self.settled: OrderedDict[str, None] = OrderedDict()  # dispatch ids already answered
        self.abandoned = threading.Event()
        self.handled = 0
        # the items still ours, of those about to be acked (the worker's Ownership check)
        self.ours: Callable[[list[Fetched]], list[Fetched]] = lambda items: items

    def started(self, events: list[dict[str, Any]]) -> None:
        """`task.started` events to send with the next settle."""
        now = time.monotonic()
        with self.unpublished_lock:
            self.unpublished += [(now, event) for event in events]

    def settle_queued(self) -> None:
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

    def settle_loop(self) -> None:
        """Settle what handler threads left (they settle their own when they can), and publish
        `task.started` events within 0.2 s when no outcome carries them (a long task's start)."""
        while True:
            try:
                first = self.outcomes.get(timeout=0.2)
            except queue.Empty:
                if self.unpublished:
                    with self.settling:
                        self.settle([])
                if self.stopping.is_set() and self.slots.busy == 0 and not self.running:
                    return
                continue
            if self.slots.busy and first[0].item.stream == self.bulk:
                # A bulk lane's outcome, others about to follow: gather them for a moment, so a big
                # release settles in a few large entries rather than one small entry per handler.
                time.sleep(SETTLE_GATHER)
            with self.settling:
                self.settle(self._take_outcomes(first))

    def settle(self, batch: list[tuple[Running, Outcome]]) -> None:
        """One results entry per lane for the batch, then the acks; each retried until Redis takes it."""
        if self.abandoned.is_set():
            return
        inbox: dict[str, list[wire.Result]] = defaultdict(list)
        for r, o in batch:
            # a bulk lane's results go to the agent's bulk lane of the inbox: a small workflow's never wait behind them
            wf_id = r.ctx.workflow_id
            lane = self.broker.inbox_lane(wf_id, bulk=r.item.stream == self.bulk)
            inbox[lane].append(o.result(r.ctx, self.consumer))
        with self.unpublished_lock:
            queued, self.unpublished = self.unpublished, []
        # a task's start goes in the entry that carries its result: a coordinator publishes it before
        # that result can end the run; the start of a task still running waits for it a moment, then
        # goes alone (at once with no result to settle: the settler's look every 0.2 s, a stop)
        starts: defaultdict[tuple[Any, Any], list[tuple[float, dict[str, Any]]]] = defaultdict(list)
        for since, event in queued:
            starts[(event.get("workflow"), (event.get("data") or {}).get("unit"))].append((since, event))
        envelopes = {target: self._envelopes(results, starts) for target, results in inbox.items()}
        due = time.monotonic() - START_WAIT if batch else float("inf")
        left = [pair for pairs in starts.values() for pair in pairs]
        alone = [event for since, event in left if since <= due]
        with self.unpublished_lock:
            self.unpublished[:0] = [(since, event) for since, event in left if since > due]
        # Only what is still pending on this worker is acked (a late result is stored all the same), and
        # with the results, in one transaction: a refused XADD must not leave its task acked.
        acks: dict[str, list[str]] = defaultdict(list)
        for item in _until_done("check ownership", len(batch), lambda: self.ours([r.item for r, _ in batch])):
            acks[item.stream].append(item.entry.id)
        _until_done("store results", len(batch), lambda: self.broker.settle(envelopes, alone, acks))
        for running, outcome in batch:
            self.running.pop((running.item.stream, running.item.entry.id), None)
            self.settled[running.item.message.id] = None
            if self.telemetry is not None:
                message = running.item.message
                self.telemetry.finished(self.agent.name, message.command, attempt_outcome(message, outcome))
            if running.span is not None:
                attempt_settled(running.span, running.ctx, outcome)
        while len(self.settled) > 50_000:
            self.settled.popitem(last=False)
        self.handled += len(batch)

    def _envelopes(
        self, results: list[wire.Result], starts: dict[tuple[Any, Any], list[tuple[float, dict[str, Any]]]]
    ) -> list[bytes]:
        """Split results, with their tasks' starts (taken from `starts`), into inbox entries under the
        size limit (each result already is)."""
        limit = self.settings.max_message_bytes
        out: list[bytes] = []
        chunk: list[wire.Result] = []
        started: list[dict[str, Any]] = []
        size = 0
        for result in results:
            mine = [event for _, event in starts.pop((result.wf, result.unit), [])]
            weight = len(result.value or b"") + len(wire.pack([result.events, mine])) + len(str(result.error or ""))
            if chunk and (size + weight + 512 > limit or len(started) + len(mine) > wire.SENT_EVENTS):
                out.append(self._envelope(chunk, started))
                chunk, started, size = [], [], 0
            chunk.append(result)
            started += mine
            size += weight + 512
        if chunk:
            out.append(self._envelope(chunk, started))
        return out

    def _envelope(self, results: list[wire.Result], started: list[dict[str, Any]]) -> bytes:
        """An inbox entry naming this agent, signed when it has a secret (coordinators may require it)."""
        secret = self.settings.agent_secret.encode() if self.settings.agent_secret else None
        body = {"events": started} if started else {}
        inbox = wire.Inbox(kind="results", results=results, body=body, agent=self.agent.name)
        return inbox.encode(self.settings.max_message_bytes * 4, secret)


def _until_done(what: str, count: int, call: Callable[[], T]) -> T:
    """Call until Redis takes it, backing off while it is out of reach or refuses (full, busy)."""
    delay = 0.1
    while True:
        try:
            return call()
        except CONNECTION_ERRORS as exc:
            log.warning("cannot %s (%d) yet (%s); retrying in %.1fs", what, count, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
