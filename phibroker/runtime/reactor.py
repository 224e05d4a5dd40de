"""An agent's subscriptions, as its worker serves them: the reactions beside the tasks.

Reactions and tasks share the worker's read, slots and threads, but nothing else: a reaction has no
start mark, no fencing token and no result. It runs each event of a subscription stream's entry through
its handler once, publishes the events the handler emits, starts the workflows it submits, and acks
the entry. The worker hands the reactor the entries its read (or a reclaim) returns from subscription
streams; the reactor keeps them apart from the task backlog.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from phibroker import wire
from phibroker import workflow as workflows
from phibroker.errors import DecodeError
from phibroker.keys import WORKERS_GROUP
from phibroker.runtime.agent import Agent, Event
from phibroker.runtime.events import own_filter, register_subscriptions
from phibroker.runtime.slots import HandlerThreads, Slots
from phibroker.runtime.submission import submission
from phibroker.settings import Settings
from phibroker.store.connection import CONNECTION_ERRORS, Entry
from phibroker.store.registry import Registry
from phibroker.store.worker import WorkerStore

log = logging.getLogger("phibroker.worker")  # reactions log as the worker they run in


class BrokerAway(Exception):  # noqa: N818 - not the handler's failure: Redis was out of reach or said no
    """A reaction's submit met a broker it cannot use now: the reaction is left for redelivery, not dead-lettered."""


@dataclass(slots=True)
class Reaction:
    """An entry of one of the agent's subscription streams: a batch of events for one handler."""

    entry: Entry
    stream: str
    subscription: str
    events: list[dict[str, Any]]


class Reactor:
    """The agent's subscriptions: their streams, the reactions queued and running, and running them."""

    def __init__(
        self,
        agent: Agent,
        settings: Settings,
        broker: WorkerStore,
        registry: Registry,
        slots: Slots,
        pool: HandlerThreads,
        recover: Callable[[], None],
    ):
        self.agent = agent
        self.settings = settings
        self.broker = broker
        self.registry = registry
        self.slots = slots
        self.pool = pool
        self.recover = recover  # the worker reads its own pending entries again: a reaction left for redelivery
        self.streams: dict[str, str] = {}  # subscription stream -> subscription name
        self.reactions: deque[Reaction] = deque()
        self.reacting: set[tuple[str, str]] = set()  # (subscription stream, entry id) of reactions running
        # what each handler asked for, checked again here: any agent may route events into the stream
        self.wanted = {name: own_filter(name, sub.event, sub.where) for name, sub in agent.subscriptions.items()}

    def register(self) -> None:
        """Record the agent's subscriptions and create their streams' groups: the worker reads them from now on."""
        streams = register_subscriptions(self.registry, self.agent.name, self.agent.subscriptions)
        self.streams = dict(zip(streams, self.agent.subscriptions, strict=True))

    def accept_reaction(self, stream: str, entry: Entry) -> None:
        key = (stream, entry.id)  # entry ids repeat across streams: a reaction is its stream and its id
        if key in self.reacting or any((r.stream, r.entry.id) == key for r in self.reactions):
            return  # queued or running already: a recovery read returns it again
        name = self.streams[stream]
        try:
            events = wire.decode_events(entry.raw or b"", self.settings.max_message_bytes * 4)
        except DecodeError as exc:
            self.broker.dead_letter(exc.reason, entry.raw, stream, entry.id, subscription=name)
            self.broker.ack(stream, WORKERS_GROUP, [entry.id])
            return
        self.reactions.append(Reaction(entry, stream, name, events))

    def launch(self) -> None:
        """Hand queued reactions to the handler threads while slots are free (before any task)."""
        while self.reactions and self.slots.free > 0:
            reaction = self.reactions.popleft()
            self.reacting.add((reaction.stream, reaction.entry.id))
            self.slots.take()
            self.pool.submit(self._react, reaction)

    def _react(self, reaction: Reaction) -> None:
        """Runs on a pool thread: each event the subscription has not seen yet, then the ack.

        An event is marked seen only after its handler ran, so a crash re-runs it (at least once),
        while a copy routed twice (an outbox re-driven after a coordinator died) runs once.
        """
        left = False
        try:
            ids = [str(e.get("id")) for e in reaction.events]
            seen = self.broker.seen(reaction.subscription, ids)
            emitted: list[dict[str, Any]] = []
            wanted = self.wanted[reaction.subscription]
            for event, already in zip(reaction.events, seen, strict=True):
                if not already and wanted.wants(event):
                    emitted += self._react_to(reaction, event)
            if emitted:
                self.broker.relay(emitted)
            self.broker.mark_seen(reaction.subscription, ids, keep=self.settings.retention)
            self.broker.ack(reaction.stream, WORKERS_GROUP, [reaction.entry.id])
        except (*CONNECTION_ERRORS, BrokerAway) as exc:
            log.warning("reaction left for redelivery: %s", exc)
            left = True
        finally:
            self.reacting.discard((reaction.stream, reaction.entry.id))
            self.slots.give()
        if left:  # after the discard: the worker's next read returns the entry, and it must not look running
            self.recover()

    def _react_to(self, reaction: Reaction, raw_event: dict[str, Any]) -> list[dict[str, Any]]:
        """One event through one handler; a failure goes to the DLQ tagged with the subscription."""
        event = Event.from_map(raw_event, submitter=self._submit)
        try:
            self.agent.subscriptions[reaction.subscription].react(event)
            caused = event.caused()
            wire.pack_limited(caused, self.settings.max_message_bytes, "events emitted by a reaction")
            return caused
        except BrokerAway:
            raise
        except BaseException as exc:  # noqa: BLE001 - a failing reaction (SystemExit too) is kept, not retried forever
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("subscription %s failed on %s: %s", reaction.subscription, event.type, reason)
            self.broker.dead_letter(
                reason, wire.pack(raw_event), reaction.stream, reaction.entry.id, subscription=reaction.subscription
            )
            return []

    def _submit(self, source: Any, params: dict[str, Any], wf_id: str | None, depth: int, chain: list[str]) -> str:
        """`event.submit(...)` from a reaction: a workflow caused by that event, which the coordinators write."""
        workflow = source if isinstance(source, workflows.Workflow) else workflows.load(source)
        wf_id, fields = submission(workflow, workflow.params_with(params), wf_id, depth, chain)
        try:
            self.broker.ask_to_submit(wf_id, fields)
        except CONNECTION_ERRORS as exc:
            raise BrokerAway(str(exc)) from exc
        return wf_id
