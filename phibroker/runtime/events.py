"""Choreography: subscriptions and triggers, and routing each published event to them.

Every event goes to the events log (`NS:events`; on a cluster the run's stream of it). Beside that, the
`Router` copies each event into the stream of every subscription whose type and `where` filter match
(`NS:sub:NAME`, one group each, so no slow subscriber pins the global log), and turns each event that
matches a workflow trigger into an inbox message that starts the workflow once. Events past the storm
depth go to the DLQ with their chain instead. The coordinators publish every event (a drain's, or those
a worker sent them) and hand `Router.routes` to what publishes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from phibroker import wire
from phibroker.errors import BrokerUnavailable, ExpressionError, InvalidInput, WorkflowFileError
from phibroker.keys import WORKERS_GROUP
from phibroker.runtime.submission import signature_fields
from phibroker.settings import Settings
from phibroker.store.registry import Registry
from phibroker.workflow import Workflow, dag
from phibroker.workflow.expr import WHERE_MAX, Expression, compile_expression

log = logging.getLogger("phibroker.events")

Route = tuple[str, bytes, int | None]  # stream, entry, maxlen


def matches(pattern: str, event_type: str) -> bool:
    """An exact type, `prefix.*`, or `*`."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


def event_scope(event: Mapping[str, Any]) -> dict[str, Any]:
    """What a `where` filter sees: `event.data.x`, or the event's fields directly (`data.x`, `type`)."""
    return {**event, "event": event}


@dataclass(frozen=True)
class Filter:
    """A subscription or a trigger: which events it wants."""

    name: str
    event: str
    where: Expression | None

    def wants(self, event: Mapping[str, Any]) -> bool:
        return matches(self.event, str(event.get("type"))) and (
            self.where is None or self.where.test(event_scope(event))
        )


def compile_where(source: str | None, what: str) -> Expression | None:
    """A subscription's or trigger's `where`: at most WHERE_MAX characters, as it runs on every event."""
    if not source:
        return None
    if isinstance(source, str) and len(source) > WHERE_MAX:
        raise InvalidInput(f"{what}: where: longer than {WHERE_MAX:,} characters")
    try:
        return compile_expression(source)
    except ExpressionError as exc:
        raise InvalidInput(f"{what}: where: {exc}") from None


class Router:
    """Decides where events go beyond the log; re-reads subscriptions and triggers every `refresh` s."""

    def __init__(self, registry: Registry, refresh: float = 1.0):
        self.registry = registry
        self.settings = registry.settings
        self.keys = registry.keys
        self.refresh = refresh
        self.subscriptions: list[Filter] = []
        self.triggers: list[Filter] = []
        self._loaded = 0.0

    def load(self) -> None:
        subs, triggers = self.registry.routing()
        self.subscriptions = [_filter(name, info) for name, info in subs]
        self.triggers = [_filter(name, info) for name, info in triggers.items()]
        self._loaded = time.monotonic()

    def routes(self, events: list[dict[str, Any]]) -> list[Route]:
        """Subscription entries, trigger starts and storm dead letters for a batch of events."""
        if time.monotonic() - self._loaded > self.refresh:
            try:
                self.load()
            except Exception as exc:  # noqa: BLE001 - keep routing with what we had
                log.warning("cannot refresh subscriptions: %s", exc)
        if not self.subscriptions and not self.triggers:
            return []
        out: list[Route] = []
        routed: dict[str, list[dict[str, Any]]] = {}
        limit = self.settings.storm_depth
        for event in events:
            wanted = [s for s in self.subscriptions if s.wants(event)]
            starts = [t for t in self.triggers if t.wants(event)]
            if not wanted and not starts:
                continue
            if int(event.get("depth") or 0) >= limit:
                out.append(self._storm(event, [s.name for s in wanted] + [t.name for t in starts]))
                continue
            for name in dict.fromkeys(sub.name for sub in wanted):  # a name two agents registered: once
                routed.setdefault(name, []).append(event)
            for trigger in starts:
                wf_id = trigger_workflow_id(trigger.name, event)
                body = {"wf": wf_id, "trigger": trigger.name, "event": event}
                out.append((self.keys.inbox(wf_id), wire.Inbox(kind="trigger", body=body).encode(1 << 26), None))
        for name, batch in routed.items():  # one event per entry: retention and redelivery count events
            stream = self.keys.sub(name)
            out += [(stream, wire.encode_events([event]), self.settings.sub_maxlen) for event in batch]
        return out

    def _storm(self, event: dict[str, Any], targets: list[str]) -> Route:
        chain = [*event.get("chain", []), f"{event.get('type')}@{event.get('id')}"]
        reason = f"storm guard: event depth {event.get('depth')} reached the limit {self.settings.storm_depth}"
        log.warning("%s: %s", reason, " -> ".join(chain[-6:]))
        record = {
            "reason": reason,
            "raw": wire.pack(event),
            "size": 0,
            "source": self.keys.event_log(event.get("workflow")),
            "entry": str(event.get("id")),
            "chain": chain,
            "subscription": ", ".join(targets),
        }
        return (self.keys.dlq, wire.pack(record), self.settings.dlq_maxlen)


def own_filter(name: str, event: str, where: str | None) -> Filter:
    """A handler's own subscription, as a filter its worker checks each event against again."""
    return _filter(name, {"event": event, "where": where})


def _filter(name: str, info: Mapping[str, Any]) -> Filter:
    try:
        where = compile_where(info.get("where"), name)
    except InvalidInput as exc:
        log.warning("ignoring %s", exc)
        where = compile_expression("false")
    return Filter(name, str(info.get("event")), where)


def trigger_refusal(name: str, info: Mapping[str, Any], body: Mapping[str, Any], storm_depth: int) -> str | None:
    """Why a `trigger` message must not start its workflow, or None: whoever routed it (a worker
    settling results may send them), the event it carries must pass the trigger's own filter and the
    storm guard, and the run id must be the one that event gives."""
    event = body.get("event")
    if not isinstance(event, Mapping) or not _filter(name, info).wants(event):
        wanted = f"{info.get('event')}" + (f" where {info['where']}" if info.get("where") else "")
        return f"forged trigger: the event is not one trigger {name!r} wants ({wanted})"
    depth = event.get("depth") or 0
    if type(depth) is not int or depth >= storm_depth:
        return f"forged trigger: event depth {depth!r} is past the storm guard ({storm_depth}) or not a number"
    if body.get("wf") != trigger_workflow_id(name, event):
        return f"forged trigger: run id {body.get('wf')!r} is not the one event {event.get('id')!r} gives"
    return None


def trigger_workflow_id(trigger: str, event: Mapping[str, Any]) -> str:
    """One workflow per (trigger, event): a re-routed event finds its workflow already there."""
    return f"{trigger}-{event.get('id')}"


# -- registration ----------------------------------------------------------------------------------


def register_subscriptions(registry: Registry, agent: str, subscriptions: Mapping[str, Any]) -> list[str]:
    """Record an agent's subscriptions and create their streams' groups at `$` (events from now on)."""
    streams = []
    for sub in subscriptions.values():
        compile_where(sub.where, sub.name)
        info = {"agent": agent, "event": sub.event, "where": sub.where, "registered": time.time()}
        registry.register_subscription(agent, sub.name, info)
        stream = registry.keys.sub(sub.name)
        registry.ensure_group(stream, WORKERS_GROUP, start="$")
        streams.append(stream)
    return streams


def add_trigger(registry: Registry, workflow: Workflow) -> str:
    """Register a workflow file with `on:` so matching events start it."""
    on = workflow.spec.on
    if on is None:
        raise WorkflowFileError(f"{workflow.name}: no `on:` section, so no event can start it")
    refuse_self_trigger(workflow)
    info = {
        "event": on.event,
        "where": on.where,
        "spec": workflow.spec_json,
        "signed": signature_fields(workflow),  # a signed file's starts pass `coordinator --require-signed`
        "added": time.time(),
    }
    registry.register_trigger(workflow.name, info)
    return workflow.name


def own_event_types(workflow: Workflow) -> list[str]:
    """The event types a run of WORKFLOW publishes itself (types its handlers emit are known only at run time)."""
    tasks = workflow.tasks.values()
    types = {f"workflow.{s}" for s in ("submitted", "refused", "succeeded", "failed", "cancelled", "timed_out")}
    if any(spec.approval for spec in tasks):
        types |= {"workflow.waiting_approval", "approval.refused", *_GATE_EVENTS}
    if any(not spec.approval for spec in tasks):
        types |= {f"task.{s}" for s in _TASK_EVENTS}
    if any(spec.compensate for spec in tasks):
        types |= {"workflow.compensating", "task.compensated", "task.compensation_failed"}
    return sorted(types)


def refuse_self_trigger(workflow: Workflow) -> None:
    """An `on:` without `where` that matches the workflow's own events would start a run per run, without end."""
    on = workflow.spec.on
    if on is None or on.where:
        return
    own = [t for t in own_event_types(workflow) if matches(on.event, t)]
    if own:
        shown = ", ".join(own[:3]) + (f" and {len(own) - 3} more" if len(own) > 3 else "")
        example = f" (e.g. where: \"data.name != '{workflow.name}'\")" if on.event.startswith("workflow.") else ""
        raise WorkflowFileError(
            f"{workflow.name}: `on: {on.event}` matches events its own runs publish ({shown}), so each run "
            f"would start another: add a `where` that leaves them out{example}"
        )


# -- graph: subscriptions beside the DAG ---------------------------------------------------------------

_TASK_EVENTS = ("dispatched", "started", "succeeded", "failed", "retrying", "skipped", "cancelled")
_GATE_EVENTS = ("approval.requested", "approval.granted", "approval.rejected") + tuple(
    f"task.{s}" for s in ("succeeded", "failed", "skipped", "cancelled")
)
_WORKFLOW_EVENTS = tuple(
    f"workflow.{s}"
    for s in ("submitted", "waiting_approval", "compensating", "succeeded", "failed", "cancelled", "timed_out")
)


def subscription_edges(workflow: Workflow, subscriptions: Mapping[str, Mapping[str, Any]]) -> list[dag.SideEdge]:
    """Dashed edges from what emits an event to each registered subscription that reacts to it.

    A task's state changes (`task.*`, `approval.*` for a gate) draw an edge from each task they come from,
    labelled with the subscription's pattern; a `where` that names tasks narrows them (tried on an event
    of each task; one that depends on `data` keeps them all). When every task matches, one edge from a
    node named after the workflow stands for them all ("PATTERN (any task)"), and `workflow.*` events come
    from that node too. Types only handlers emit (`ctx.emit`) are not drawn: which handler emits what is
    known only at run time. Subscription nodes are named `sub:NAME`.
    """
    tasks = workflow.tasks
    source = workflow.name if workflow.name not in tasks else f"workflow:{workflow.name}"
    edges: list[dag.SideEdge] = []
    for name, info in sorted(subscriptions.items()):
        pattern = str(info.get("event"))
        try:
            wanted = Filter(name, pattern, compile_where(info.get("where"), name))
        except InvalidInput:
            continue
        typed = Filter(name, pattern, None)
        target = f"sub:{name}"

        matched = [t for t in tasks if _emits(workflow, t, wanted)] or [t for t in tasks if _emits(workflow, t, typed)]
        whole = any(typed.wants({"type": k, "data": {}}) for k in _WORKFLOW_EVENTS)
        if whole or (len(tasks) > 1 and len(matched) == len(tasks)):
            label = pattern if whole else f"{pattern} (any task)"
            edges.append((source, target, label))
        else:
            edges += [(task, target, pattern) for task in matched]
    return edges


def _emits(workflow: Workflow, task: str, rule: Filter) -> bool:
    """Whether one of the task's own state changes is an event the rule wants."""
    spec = workflow.tasks[task]
    kinds = _GATE_EVENTS if spec.approval else tuple(f"task.{s}" for s in _TASK_EVENTS)
    if spec.compensate:
        kinds += ("task.compensated",)
    return any(rule.wants({"type": k, "task": task, "workflow": workflow.name, "data": {}}) for k in kinds)


def graph_edges(settings: Settings, workflow: Workflow, timeout: float = 0.5) -> list[dag.SideEdge]:
    """The side edges `graph` draws, or none when no broker answers within `timeout` seconds."""
    try:
        subscriptions = Registry(settings).registered_subscriptions(timeout)
    except BrokerUnavailable:
        return []
    return subscription_edges(workflow, subscriptions)
