"""The wire format: msgpack envelopes with a version and an id, decoded defensively, size-limited.

The only module that imports msgpack. Every stream entry holds one field, `m`, with one envelope.
Decoding caps the raw size before unpacking, refuses ext types and timestamps, then checks each field's
type by hand (the hot path runs this for every message; pydantic costs several times more here).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from phibroker.errors import DecodeError, MessageTooLarge
from phibroker.keys import agent_of

VERSION = 1
FIELD = b"m"  # the one field of every stream entry


_PREFIX = os.urandom(5).hex()
_COUNTER = itertools.count()


def _new_prefix() -> None:
    global _PREFIX, _COUNTER  # noqa: PLW0603 - a forked child must not repeat its parent's ids
    _PREFIX, _COUNTER = os.urandom(5).hex(), itertools.count()


os.register_at_fork(after_in_child=_new_prefix)


def short_id() -> str:
    """10 random hex digits: for names people read (workflow ids, consumer names)."""
    return os.urandom(5).hex()


def new_id() -> str:
    """A unique id for a message, a dispatch or an event: a random per-process prefix and a counter.

    Cheaper than asking the kernel for randomness each time, and as unique across processes."""
    return f"{_PREFIX}{next(_COUNTER):06x}"


_packers = threading.local()  # a Packer is not thread-safe; a handler thread keeps its own


def pack(value: Any) -> bytes:
    """msgpack bytes, from this thread's Packer: `msgpack.packb` builds a new one each call, which cost
    three times the packing of a small message, several times a task in each process."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    try:
        return packer.pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"not msgpack-serialisable: {exc}") from None


# msgpack unpacks containers up to 1024 deep but packs only 511: deeper data could be decoded and then
# neither re-packed (a dead letter, a dispatch, a stored result) nor dumped as JSON, so it is refused here.
MAX_DEPTH = 500
# The bytes that open a map or an array (fixmap, fixarray, array 16/32, map 16/32): every level of
# nesting takes at least one, so a message with few of them is shallow without walking it.
_OPENERS = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_NOT_OPENERS = bytes(b for b in range(256) if b not in _OPENERS)


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether maps and lists nest more than `limit` levels (the value itself is level 1); walked level
    by level, never recursively, and never past `limit`."""
    level = [value] if type(value) in (dict, list) else []
    for _ in range(limit):
        nested = []
        for container in level:
            for item in container.values() if type(container) is dict else container:
                if type(item) is dict or type(item) is list:
                    nested.append(item)
        if not nested:
            return False
        level = nested
    return True


# The maps and lists an inbox message may unpack to: one per CONTAINER_BYTES of it, and FEW_CONTAINERS
# for any. An empty map is one byte packed and ~64 in Python, so a message of nothing else took ~80
# times its size in a coordinator's memory; this keeps it to ~40 times, and lets through dense data
# such as lists of pairs of small numbers (3 bytes each). (A result's value travels as bytes inside its
# message, and is not counted here.)
CONTAINER_BYTES = 2
FEW_CONTAINERS = 4096


def inbox_containers(raw: bytes) -> int:
    return max(FEW_CONTAINERS, len(raw) // CONTAINER_BYTES)


class _TooManyContainers(Exception):
    pass


def _counted(budget: int) -> dict[str, Any]:
    """msgpack hooks that count the maps and lists unpacked, and stop past `budget`."""
    seen = 0

    def count(container: Any) -> Any:
        nonlocal seen
        seen += 1
        if seen > budget:
            raise _TooManyContainers
        return container

    return {"object_hook": count, "list_hook": count}


def unpack(raw: bytes, limit: int, containers: int | None = None, items: int | None = None) -> Any:
    """Unpack untrusted bytes: size capped first, no ext types, no timestamps, bounded containers (in
    size, at most `items` each if given, in nesting, and in number: at most `containers` maps and
    lists, if given)."""
    if not raw:
        raise DecodeError(raw, "empty message (no `m` field)")
    if len(raw) > limit:
        raise DecodeError(raw, f"{len(raw)} bytes, over the {limit}-byte limit")
    # Cheap (~1 ns a byte, nothing for a short message): every container takes at least one of these
    # bytes, so with few of them the message is neither deep nor made of many containers, and is not walked.
    openers = len(raw.translate(None, _NOT_OPENERS)) if len(raw) > MAX_DEPTH else 0
    budget = openers if containers is None else containers
    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=items or limit,
            max_map_len=items or limit,
            max_ext_len=0,
            timestamp=0,
            **(_counted(budget) if openers > budget else {}),
        )
    except _TooManyContainers:
        raise DecodeError(raw, f"more than {budget:,} maps and lists in {len(raw):,} bytes") from None
    except msgpack.StackError:
        raise DecodeError(raw, f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException, RecursionError) as exc:
        raise DecodeError(raw, f"not msgpack: {type(exc).__name__}: {exc}") from None
    if openers > MAX_DEPTH and nests_deeper(value, MAX_DEPTH):
        raise DecodeError(raw, f"nested deeper than {MAX_DEPTH} levels")
    return value


def pack_limited(value: Any, limit: int, what: str) -> bytes:
    """Pack and refuse anything over the size limit with a clear error."""
    raw = pack(value)
    if len(raw) > limit:
        raise MessageTooLarge(what, len(raw), limit)
    return raw


# --- schemas: field -> accepted types; a field absent from `required` may be missing or None ---------
# Exact types: msgpack only ever makes these (so `True` is never taken for an int, nor 1 for a bool).

_STR, _INT, _NUM, _BYTES = frozenset({str}), frozenset({int}), frozenset({int, float}), frozenset({bytes})
_MAP, _LIST, _BOOL = frozenset({dict}), frozenset({list}), frozenset({bool})
_ANY: frozenset[type] = frozenset()  # any type at all


def _check(
    envelope: Any, schema: Mapping[str, frozenset[type]], required: frozenset[str], kind: str, versioned: bool = True
) -> dict:
    if type(envelope) is not dict:
        raise DecodeError(envelope, f"{kind}: not a map")
    for key, value in envelope.items():
        types = schema.get(key)
        if types is None:
            raise DecodeError(envelope, f"{kind}: unknown field {key!r}")
        if value is None:
            if key in required:
                raise DecodeError(envelope, f"{kind}: field {key!r} is null")
        elif type(value) not in types and types is not _ANY:
            raise DecodeError(envelope, f"{kind}: field {key!r} has type {type(value).__name__}")
    if not required.issubset(envelope):
        missing = required.difference(envelope)
        raise DecodeError(envelope, f"{kind}: missing field {sorted(missing)[0]!r}")
    if versioned and envelope["v"] != VERSION:
        raise DecodeError(envelope, f"{kind}: unsupported version {envelope['v']!r}")
    return envelope


@dataclass(slots=True)
class TaskMessage:
    """One unit of work for an agent: a task, a partition of a mapped task, or a compensation."""

    id: str  # the dispatch id: unique per dispatch, the same on every redelivery of this message
    wf: str
    unit: str  # `Task`, `Task#2` (a partition), `Task!undo` (its compensation)
    task: str
    agent: str
    command: str
    attempt: int
    payload: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    partition: list[int] | None = None  # [index, count]
    deadline: float | None = None
    result: Any = None  # compensations: the result being undone
    depth: int = 0  # how many events led to this workflow (storm guard)
    iteration: int = 1  # a looping task's iteration, from 1
    previous: Any = None  # a looping task: the previous iteration's result
    # What the task's retry policy does with this attempt's failure, so a worker can count it as
    # `retrying` or `failed`: attempts it may still make after this one, and its `retry_on` (None: the default)
    retries_left: int = 0
    retry_on: list[str] | None = None
    traceparent: str | None = None  # the run's W3C trace context: the attempt's span is a child of the run's
    # The budgets over this attempt (the task's own first, then the run's), so the `ctx.spend` call that
    # passes a `fail` one raises: scope, on_exceed, tokens, cost (the limits in force) and `spent` before
    # this attempt, [tokens, cost]
    budgets: list[dict[str, Any]] | None = None

    def encode(self, limit: int) -> bytes:
        envelope = {
            "v": VERSION,
            "id": self.id,
            "wf": self.wf,
            "unit": self.unit,
            "task": self.task,
            "agent": self.agent,
            "command": self.command,
            "attempt": self.attempt,
            "payload": self.payload,
            "inputs": self.inputs,
            "partition": self.partition,
            "deadline": self.deadline,
            "result": self.result,
            "depth": self.depth,
        }
        if self.iteration != 1:
            envelope.update(iteration=self.iteration, previous=self.previous)
        if self.retries_left:
            envelope["retries_left"] = self.retries_left
        if self.retry_on is not None:
            envelope["retry_on"] = self.retry_on
        if self.traceparent:
            envelope["traceparent"] = self.traceparent
        if self.budgets:
            envelope["budgets"] = self.budgets
        return pack_limited(envelope, limit, f"task message {self.wf}/{self.unit}")

    @classmethod
    def decode(cls, raw: bytes, limit: int) -> TaskMessage:
        e = _check(unpack(raw, limit), _TASK_SCHEMA, _TASK_REQUIRED, "task message")
        del e["v"]
        return cls(**e)


_TASK_SCHEMA = {
    "v": _INT,
    "id": _STR,
    "wf": _STR,
    "unit": _STR,
    "task": _STR,
    "agent": _STR,
    "command": _STR,
    "attempt": _INT,
    "payload": _MAP,
    "inputs": _MAP,
    "partition": _LIST,
    "deadline": _NUM,
    "result": _ANY,
    "depth": _INT,
    "iteration": _INT,
    "previous": _ANY,
    "retries_left": _INT,
    "retry_on": _LIST,
    "traceparent": _STR,
    "budgets": _LIST,
}
_TASK_REQUIRED = frozenset({"v", "id", "wf", "unit", "task", "agent", "command", "attempt", "payload", "inputs"})


def salvage_ids(raw: bytes | None, limit: int) -> dict[str, str] | None:
    """From a task message that may not pass its checks, the ids that say which attempt it is:
    `wf`, `unit` and `dispatch` (what a dead letter reports, what the reconciler looks for)."""
    if not raw:
        return None
    try:
        envelope = unpack(raw, limit)
    except DecodeError:
        return None
    if not isinstance(envelope, dict):
        return None
    ids = {k: envelope.get(k) for k in ("wf", "unit", "id")}
    if not all(isinstance(v, str) for v in ids.values()):
        return None
    return {"wf": ids["wf"], "unit": ids["unit"], "dispatch": ids["id"]}  # type: ignore[dict-item]


@dataclass(slots=True)
class Result:
    """The outcome of one attempt. `value` stays packed bytes: the coordinator stores it as it came."""

    id: str  # the dispatch id it answers
    wf: str
    unit: str
    token: int  # the fencing token the start script gave this attempt
    ok: bool
    worker: str
    started: float
    finished: float
    value: bytes | None = None
    error: dict[str, str] | None = None  # type, message, traceback
    retry: bool = False  # the handler raised Retryable
    events: list[dict[str, Any]] = field(default_factory=list)  # emitted with ctx.emit: type, data
    # sent with ctx.signal: wf, name, data; and tasks added with ctx.spawn / ctx.spawn_workflow
    signals: list[dict[str, Any]] = field(default_factory=list)
    spawns: list[dict[str, Any]] = field(default_factory=list)
    # what the attempt spent (ctx.spend), its final totals: `attempt`, `tokens`, `cost`; sent with
    # `spend` messages as it happened too, and here so nothing is lost if one of those is
    spend: dict[str, Any] | None = None

    def to_map(self) -> dict[str, Any]:
        extra = {k: v for k, v in (("signals", self.signals), ("spawns", self.spawns), ("spend", self.spend)) if v}
        return {
            **extra,
            "id": self.id,
            "wf": self.wf,
            "unit": self.unit,
            "token": self.token,
            "ok": self.ok,
            "worker": self.worker,
            "started": self.started,
            "finished": self.finished,
            "value": self.value,
            "error": self.error,
            "retry": self.retry,
            "events": self.events,
        }


_RESULT_SCHEMA = {
    "id": _STR,
    "wf": _STR,
    "unit": _STR,
    "token": _INT,
    "ok": _BOOL,
    "worker": _STR,
    "started": _NUM,
    "finished": _NUM,
    "value": _BYTES,
    "error": _MAP,
    "retry": _BOOL,
    "events": _LIST,
    "signals": _LIST,
    "spawns": _LIST,
    "spend": _MAP,
}
_RESULT_REQUIRED = frozenset({"id", "wf", "unit", "token", "ok", "worker", "started", "finished"})


# What a client may send: a copy of one would act again (cancel a run since retried, re-open one), so
# each is dated when signed (`expires` in its body, covered by the signature) and a coordinator applies
# it once, until then. Worker results are fenced by their tokens instead; a kick, a re-dispatch and a
# child's end by what they name (a run started once, a dispatch, a child run of one attempt).
DATED_KINDS = frozenset({"submit", "cancel", "retry", "signal"})
CONTROL_TTL = 600.0  # seconds a client's signed control message is good for after it was signed
# seconds a reaction's signed submit (a new run's fields) is good for: its run's id makes a copy harmless,
# and the coordinators may all be down a while; one constant, so no worker's setting can outrun the gate's
ASKED_RUN_TTL = 7 * 24 * 3600.0


@dataclass(slots=True)
class Inbox:
    """One entry of the coordinators' inbox: a batch of results, or a control message.

    kinds: `results` (from a worker), `submit`, `cancel` (the run, or `tasks` of it), `decide` (an
    approval decision), `lost` (a task message dead-lettered by a worker), `declined` (a worker would not
    start a unit asked to stop), `redispatch` (a unit nobody holds: run it again), `kick` (start a
    workflow again), `retry` (re-open an ended run), `signal` (for a signal gate), `child` (a child run
    of a `workflow:` task ended: its state, error and packed output), `trigger` (an event matched a
    workflow trigger), `spend` (a running attempt's totals so far, from `ctx.spend`: `attempt`, `tokens`,
    `cost`). Results travel as one packed blob, so a worker can sign exactly those bytes with its
    agent's secret (`agent`, `sig`) and a coordinator can check them before decoding; every other
    message is signed over its packed body, by whoever sent it: `agent` names the sender's identity
    (an agent, a client, a coordinator), not only agents. A signed `submit`, `cancel`, `retry` or
    `signal` carries `expires` (epoch seconds) in its body: its `id` is applied once, until then.
    """

    kind: str
    id: str = field(default_factory=new_id)
    results: list[Result] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)
    agent: str | None = None
    sig: str | None = None
    blob: bytes = b""  # the packed results, as signed

    def encode(self, limit: int, secret: bytes | None = None, good_for: float = CONTROL_TTL) -> bytes:
        if secret is not None and self.kind in DATED_KINDS and "expires" not in self.body:
            self.body = {**self.body, "expires": round(time.time() + good_for, 3)}
        envelope: dict[str, Any] = {"v": VERSION, "id": self.id, "kind": self.kind, "body": self.body}
        if self.results:
            self.blob = pack([r.to_map() for r in self.results])
            envelope["results"] = self.blob
        if self.agent is not None:
            envelope["agent"] = self.agent
            if secret is not None:
                envelope["sig"] = self.signature(secret)
        return pack_limited(envelope, limit, f"{self.kind} message")

    def signature(self, secret: bytes) -> str:
        """HMAC over the kind, the id, the claimed agent and the results blob (with the body, if any: the
        starts of those results' tasks) or the body, for any other kind: who sent exactly this (a signed
        `spend` cannot be passed off as a `lost`)."""
        body = pack(self.body) if self.body or self.kind != "results" else b""
        signed = self.blob + body if self.kind == "results" else body
        message = f"{self.kind}|{self.id}|{self.agent}|".encode() + signed
        return hmac.new(secret, message, hashlib.sha256).hexdigest()

    def signed_by(self, secret: bytes) -> bool:
        return same_digest(self.sig, self.signature(secret))

    def signed_as(self, sender: tuple[str, bytes] | None, limit: int, good_for: float = CONTROL_TTL) -> bytes:
        """Encoded, and signed by `sender` (name, secret) unless it already names another sender; a
        dated kind is good for `good_for` seconds."""
        if sender is not None and self.agent in (None, sender[0]):
            self.agent = sender[0]
            return self.encode(limit, sender[1], good_for)
        return self.encode(limit)

    @classmethod
    def decode(cls, raw: bytes, limit: int) -> Inbox:
        e = _check(unpack(raw, limit, inbox_containers(raw)), _INBOX_SCHEMA, _INBOX_REQUIRED, "inbox message")
        if e["kind"] not in _INBOX_KINDS:
            raise DecodeError(e, f"inbox message: unknown kind {e['kind']!r}")
        blob = e.get("results") or b""
        items = unpack(blob, limit, inbox_containers(blob)) if blob else []
        if not isinstance(items, list):
            raise DecodeError(e, "inbox message: results is not a list")
        results = [_result(item) for item in items]
        body = e.get("body") or {}
        for name in _BODY_FIELDS.get(e["kind"], ()):
            if not isinstance(body.get(name), str):
                raise DecodeError(e, f"{e['kind']} message: field {name!r} missing or not text")
        if e["kind"] == "trigger" and not isinstance(body.get("event"), dict):
            raise DecodeError(e, "trigger message: the event is not a map")
        return cls(
            kind=e["kind"],
            id=e["id"],
            results=results,
            body=e.get("body") or {},
            agent=e.get("agent"),
            sig=e.get("sig"),
            blob=blob,
        )


def same_digest(given: Any, expected: str) -> bool:
    """Whether `given` (read from Redis or a message: anything) is the digest `expected`, in constant time.
    As bytes: `hmac.compare_digest` raises on a text with a character past ASCII."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(errors="replace"), expected.encode())


def submit_signature(secret: bytes, wf_id: str, sender: str, fields: Mapping[str, Any]) -> str:
    """HMAC of who asked for a run, when, and what it runs: its id, creation time, spec, params and the
    run it reports to. `fields` as written, or as read back (params stored as JSON text, read back as a
    map). The creation time dates the run: a copy of it written again once it expired is too old to start."""
    covered = [wf_id, sender, str(fields.get("spec") or ""), json.dumps(fields.get("params") or {})]
    covered += [str(fields.get("parent") or ""), str(fields.get("parent_task") or "")]
    covered.append(_instant(fields.get("created_at")))
    return hmac.new(secret, b"submit|" + pack(covered), hashlib.sha256).hexdigest()


def run_seal(secret: bytes, wf_id: str, params: Any, children: Any) -> str:
    """HMAC of what a launched run holds that no signed file covers, its params and spawned tasks: the
    coordinators write it with each change, and check it when they read the run again."""
    covered = [wf_id, json.dumps(params or {}, sort_keys=True, default=str)]
    covered.append(json.dumps(children or {}, sort_keys=True, default=str))
    return hmac.new(secret, b"seal|" + pack(covered), hashlib.sha256).hexdigest()


def _instant(value: Any) -> str:
    """A time as one text whether it was written as an int, a float or Redis's text of either."""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def _result(item: Any) -> Result:
    item = _check(item, _RESULT_SCHEMA, _RESULT_REQUIRED, "result", versioned=False)
    events = item.get("events")
    if events is None:
        item["events"] = []
    elif not all(type(e) is dict and type(e.get("type")) is str for e in events):
        raise DecodeError(item, "result: an emitted event is not a map with a type")
    return Result(**item)


_INBOX_SCHEMA = {"v": _INT, "id": _STR, "kind": _STR, "results": _BYTES, "body": _MAP, "agent": _STR, "sig": _STR}
_INBOX_REQUIRED = frozenset({"v", "id", "kind"})
_BODY_FIELDS = {  # what each control message must name
    "submit": ("wf",),
    "kick": ("wf",),
    "cancel": ("wf",),
    "decide": ("wf",),
    "lost": ("wf", "unit", "dispatch"),
    "declined": ("wf", "unit", "dispatch"),
    "redispatch": ("wf", "unit", "dispatch"),
    "retry": ("wf",),
    "signal": ("wf", "name"),
    "child": ("wf", "task", "child", "state"),
    "trigger": ("wf", "trigger"),
    "spend": ("wf", "unit", "dispatch"),
    "joined": ("agent",),  # an agent's worker started: the coordinators put the agent on the roster
    "events": (),  # `events`, a list: what a worker publishes (a task's start, a reaction's events)
    "dead": ("reason",),  # a message a worker could not handle, for the dead letters
}
_INBOX_KINDS = frozenset({"results", *_BODY_FIELDS})


def encode_events(events: list[dict[str, Any]]) -> bytes:
    """A batch of events as one entry of the events log or of `NS:sub:X`: one XADD per transition, not per event."""
    return pack({"v": VERSION, "events": events})


SENT_EVENTS = 1000  # events one message of a worker's may carry: each costs the coordinator a write or two
_ID = re.compile(r"[^{}]{1,1024}")  # an event's id, a run's: parts of keys, whose hash tag they must not change


def sent_events(value: Any, agent: str | None) -> list[dict[str, Any]]:
    """The events `agent`'s worker sent the coordinators to publish, at most SENT_EVENTS, shaped as
    phibroker's own (a `type`, text; an `id` and a `workflow`, text without braces: they make keys and
    run ids; a `task`, text; a whole `depth`; a `chain` of text), of types a handler may name
    (`publishable`: none of the coordinators' own) or its own workers' `task.started`:
    DecodeError for anything else, which would stop a router, make readers skip the log entry it
    shares, or tell readers and subscribers of a state change that never happened. Each event gets
    `agent`, the sender (no agent: none), whatever the worker wrote there: subscribers and readers
    can tell whose worker said it."""
    if not isinstance(value, list) or len(value) > SENT_EVENTS:
        raise DecodeError(value, f"events: not a list of at most {SENT_EVENTS} events")
    for event in value:
        if not (
            isinstance(event, dict)
            and isinstance(event.get("type"), str)
            and _is_id(event.get("id"))
            and (event.get("workflow") is None or _is_id(event.get("workflow")))
            and isinstance(event.get("task"), str | None)
            and type(event.get("depth", 0)) is int
            and isinstance(event.get("chain", []), list)
            and all(isinstance(link, str) for link in event.get("chain", []))
        ):
            raise DecodeError(event, "events: an event not shaped as phibroker's (type, id, workflow, depth, chain)")
        if not publishable(event["type"]) and not _started_by(event, agent):
            raise DecodeError(event, f"events: {agent or 'a worker'} may not publish {event['type']!r:.100}")
        event["agent"] = agent
    return value


COORDINATOR_EVENTS = ("workflow.", "task.", "approval.", "signal.")  # the state changes only a commit tells
EVENT_TYPE_MAX = 200  # characters of an event type a handler names


def publishable(type_: Any) -> bool:
    """Whether a handler may name this event type: printable ASCII of at most EVENT_TYPE_MAX characters
    that does not read as one of the coordinators' own whatever its case or spaces (`Task.failed`,
    ` task.failed`; ASCII leaves no letter that looks like theirs), so no terminal escape rewrites a
    line of `logs`, and no type passes for theirs there."""
    return (
        isinstance(type_, str)
        and 0 < len(type_) <= EVENT_TYPE_MAX
        and type_.isascii()
        and type_.isprintable()
        and not type_.strip().casefold().startswith(COORDINATOR_EVENTS)
    )


def _started_by(event: dict[str, Any], agent: str | None) -> bool:
    """A `task.started` of one of `agent`'s workers (its consumer name says whose it is)."""
    worker = start_worker(event)
    return event["type"] == "task.started" and bool(worker) and agent_of(worker) == agent


def start_worker(event: dict[str, Any]) -> str:
    """The worker a `task.started` event names ("" for none)."""
    data = event.get("data")
    worker = data.get("worker") if isinstance(data, dict) else None
    return worker if isinstance(worker, str) else ""


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def decode_events(raw: bytes, limit: int) -> list[dict[str, Any]]:
    e = _check(unpack(raw, limit), {"v": _INT, "events": _LIST}, frozenset({"v", "events"}), "events")
    for event in e["events"]:
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise DecodeError(event, "event without a type")
    return e["events"]
