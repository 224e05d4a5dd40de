"""The Redis side of phibroker: streams, groups, scripts, timers, outboxes, leases. The only redis import.

Every method batches: one pipeline or one script call serves many messages, because round trips, not
Redis, bound a Python client (~180 µs a trip here; batching both sides was a 13× step).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from phibroker import wire
from phibroker.engine.state import PACKED, SEP, Transition, unpack_group
from phibroker.errors import BrokerUnavailable, DecodeError
from phibroker.keys import WORKERS_GROUP, Keys
from phibroker.settings import Settings
from phibroker.store import scripts

# What a lost connection looks like; loops back off and carry on, the CLI exits 3.
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, InvalidResponse, ConnectionResetError, BrokenPipeError)

_SHAS = {
    source: hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - the name Redis gives a script
    for source in (scripts.CREATE, scripts.APPLY, scripts.START, scripts.CLAIM_TIMERS, scripts.LEASE, scripts.XADD_MANY)
}
_INT_FIELDS = frozenset({"attempt", "token", "seq", "parts", "version", "launched", "depth", "reclaims"})
_FLOAT_FIELDS = frozenset({"dispatched", "started", "finished", "deadline", "created_at", "finished_at", "retry_at"})
_RAW_FIELDS = frozenset({"decision"})
_META_JSON = frozenset({"params", "chain"})
_BIG_FIELDS = ("spec", "source_text", "signature")  # written without Lua (scripts.CREATE); `spec` stays text


@dataclass(slots=True)
class Entry:
    """One stream entry: its id and its raw envelope (None when the entry was trimmed away)."""

    id: str
    raw: bytes | None


def _raw_of(fields: dict[bytes, bytes] | None) -> bytes | None:
    """An entry's envelope; None when the entry itself is gone (trimmed), b"" when it has no `m` field."""
    return None if fields is None else fields.get(wire.FIELD, b"")


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: str) -> str:
    ms, seq = _id_key(entry_id)
    return f"{ms}-{seq + 1}"


HINT = "start one with `make dev` (or `phibroker dev`), or set PHIBROKER_REDIS_URL"


def connect(settings: Settings) -> redis.Redis:
    """A client whose socket timeout stays above every blocking read, with a short retry for blips."""
    try:
        return redis.Redis.from_url(
            settings.redis_url,
            protocol=2,
            socket_timeout=max(10.0, settings.worker_block * 4),
            socket_connect_timeout=3.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            health_check_interval=30,
            driver_info=None,  # no CLIENT SETINFO: per-agent ACL users need not be granted it
        )
    except ValueError as exc:
        raise BrokerUnavailable(
            f"bad Redis URL {settings.redis_url!r} ({exc}): set PHIBROKER_REDIS_URL (or --redis) to redis://HOST:PORT/DB"
        ) from None


def unusable(settings: Settings, exc: Exception) -> BrokerUnavailable | None:
    """What a failure to reach or select the broker means to a user, or None for any other error.

    A database index the server does not have is refused only when the connection is made (SELECT),
    as a ResponseError: it is as fatal as an address where nothing listens, so it reads the same way.
    """
    url = settings.redis_url
    if isinstance(exc, CONNECTION_ERRORS):
        return BrokerUnavailable(f"cannot reach Redis at {url} ({str(exc).rstrip('.')}): {HINT}")
    if isinstance(exc, ResponseError) and "DB index" in str(exc):
        return BrokerUnavailable(
            f"Redis at {url} refuses that database ({exc}): use one it has (/0 is always there) "
            "in PHIBROKER_REDIS_URL (or --redis)"
        )
    return None


def parse_value(name: str, raw: bytes) -> Any:
    if raw == b"":
        return None
    if name in _RAW_FIELDS:
        return raw
    text = raw.decode()
    if name in _INT_FIELDS:
        return int(float(text))
    if name in _FLOAT_FIELDS:
        return float(text)
    return text


def parse_units(raw: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """`unit|field` fields -> {unit: {attribute: value}}, packed fields unpacked, numbers typed."""
    units: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        unit, _, name = key.decode().rpartition("|")
        record = units.setdefault(unit, {})
        if name in PACKED:
            record.update(unpack_group(name, value.decode()))
        else:
            record[name] = parse_value(name, value)
    return units


def parse_meta(raw: dict[bytes, bytes]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode()
        meta[name] = json.loads(value) if name in _META_JSON and value else parse_value(name, value)
    return meta


def _read(
    target: Any, streams: Sequence[str], group: str, consumer: str, count: int, block: float | None, pending: bool
) -> Any:
    """XREADGROUP on the client or a pipeline: new entries (`>`), or this consumer's own pending ones (`0`)."""
    return target.xreadgroup(
        group,
        consumer,
        {stream: "0" if pending else ">" for stream in streams},
        count=max(1, count),
        block=None if block is None else max(1, int(block * 1000)),
    )


def _entries(reply: Any) -> list[tuple[str, Entry]]:
    """An XREADGROUP reply over several streams as (stream, entry) pairs."""
    return [
        (stream.decode(), Entry(entry_id.decode(), _raw_of(fields)))
        for stream, items in reply or ()
        for entry_id, fields in items
    ]


def _claimed(reply: list[Any]) -> tuple[float, float | None, list[str]]:
    """CLAIM_TIMERS's reply: Redis's clock (s), the next due time (s, None: no timer), the claimed timers."""
    next_due = float(reply[1])
    return int(reply[0]) / 1e6, None if next_due < 0 else next_due / 1000, [m.decode() for m in reply[2:]]


def parse_leases(raw: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """A lease table as `leases` returns it: name -> info plus `expires` (seconds)."""
    leases: dict[str, dict[str, Any]] = {}
    expiries: dict[str, float] = {}
    for key, value in raw.items():
        name = key.decode()
        if name.endswith("|expires"):
            expiries[name[: -len("|expires")]] = int(value) / 1000
        else:
            try:
                leases[name] = wire.unpack(value, 1 << 16)
            except DecodeError:
                leases[name] = {}
    for name, info in leases.items():
        info["expires"] = expiries.get(name, 0.0)
    return leases


@contextmanager
def reaching(settings: Settings) -> Iterator[None]:
    """A lost connection or a missing database becomes BrokerUnavailable (exit 3), naming the URL."""
    try:
        yield
    except (*CONNECTION_ERRORS, ResponseError) as exc:
        error = unusable(settings, exc)
        if error is None:
            raise
        raise error from None


class Broker:
    def __init__(self, settings: Settings, client: redis.Redis | None = None):
        self.settings = settings
        self.keys: Keys = settings.keys
        self.redis: Any = client or connect(settings)  # redis-py types every reply as maybe-awaitable
        self._groups: set[str] = set()
        # Where published events go beyond the log (subscriptions, triggers); set by events.Router.
        self.router: Callable[[list[dict[str, Any]]], list[tuple[str, bytes, int | None]]] | None = None

    # -- scripts and pipelines -------------------------------------------------------------------
    # Scripts run by EVALSHA; a NOSCRIPT (a restarted or new Redis) loads them all and runs again.
    # redis-py's own Script objects would ask SCRIPT EXISTS before every pipeline: a round trip each.
    def _script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self.redis.evalsha(_SHAS[source], len(keys), *keys, *args)
        except NoScriptError:
            self._load_scripts()
            return self.redis.evalsha(_SHAS[source], len(keys), *keys, *args)

    def _pipeline(self, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands `build` queues as one pipeline; errors raise, NOSCRIPT reloads and reruns."""
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            build(pipe)
            replies = pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in replies):
                self._load_scripts()
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return list(replies)
        raise AssertionError("unreachable")

    def _load_scripts(self) -> None:
        for source in _SHAS:
            self.redis.script_load(source)

    def ping(self) -> None:
        """Fail now, in one line, if the broker cannot be used: before a loop, not inside it."""
        with reaching(self.settings):
            self.redis.ping()

    def close(self) -> None:
        self.redis.close()

    # -- streams ---------------------------------------------------------------------------------
    def ensure_group(self, stream: str, group: str, start: str = "0") -> None:
        """Create a consumer group (and its stream); an existing group is fine, any other error is not."""
        if stream in self._groups:
            return
        try:
            self.redis.xgroup_create(stream, group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    def read_group(
        self, stream: str, group: str, consumer: str, count: int, block: float | None, pending: bool = False
    ) -> list[Entry]:
        """Read up to `count` entries: new ones (`>`), or this consumer's own pending ones (`0`)."""
        return [entry for _, entry in self.read_groups([stream], group, consumer, count, block, pending)]

    def read_groups(
        self, streams: Sequence[str], group: str, consumer: str, count: int, block: float | None, pending: bool = False
    ) -> list[tuple[str, Entry]]:
        """`read_group` over several streams in one call: (stream, entry) pairs."""
        return _entries(_read(self.redis, streams, group, consumer, count, block, pending))

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        if ids:
            self.redis.xack(stream, group, *ids)

    def add(self, stream: str, raw: bytes, maxlen: int | None = None) -> str:
        entry_id = self.redis.xadd(stream, {wire.FIELD: raw}, maxlen=maxlen, approximate=True)
        return entry_id.decode()

    def settle(
        self,
        inbox: Mapping[str, Sequence[bytes]],
        group: str,
        acks: dict[str, list[str]],
        events: list[dict[str, Any]],
    ) -> None:
        """Results first (inbox stream -> entries), then the acks (stream -> entry ids) — a crash in
        between re-delivers, never loses — and any events waiting to be published, in one round trip."""

        def build(pipe: Any) -> None:
            if events:
                self._publish(pipe, events)
            for target, entries in inbox.items():
                for raw in entries:
                    pipe.xadd(target, {wire.FIELD: raw})
            for stream, ids in acks.items():
                if ids:
                    pipe.xack(stream, group, *ids)

        self._pipeline(build)

    def requeue(self, stream: str, group: str, entries: Sequence[Entry]) -> None:
        """Give unstarted entries back: copies at the stream's end and the originals acked, atomically."""
        pipe = self.redis.pipeline(transaction=True)
        for entry in entries:
            if entry.raw is not None:
                pipe.xadd(stream, {wire.FIELD: entry.raw})
        pipe.xack(stream, group, *[e.id for e in entries])
        pipe.execute()

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Events that need no transition (a worker's `task.started`): one entry for the batch."""
        pipe = self.redis.pipeline(transaction=False)
        self._publish(pipe, events)
        pipe.execute()

    def _publish(self, pipe: Any, events: list[dict[str, Any]]) -> None:
        maxlen = self.settings.events_maxlen
        pipe.xadd(self.keys.events, {wire.FIELD: wire.encode_events(events)}, maxlen=maxlen, approximate=True)
        if self.router is not None:
            for stream, raw, cap in self.router(events):
                pipe.xadd(stream, {wire.FIELD: raw}, maxlen=cap, approximate=True)

    def unit_states(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str | None, str | None, str | None]]:
        """(workflow state, unit state, unit dispatch id) for each (workflow, unit)."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id, unit in pairs:
            pipe.hget(self.keys.wf(wf_id), "state")
            pipe.hmget(self.keys.wf_tasks(wf_id), f"{unit}|state", f"{unit}|dispatch")
        replies = pipe.execute()
        out = []
        for i in range(0, len(replies), 2):
            wf_state, (state, dispatch) = replies[i], replies[i + 1]
            dispatch_id = dispatch.decode().split(SEP, 1)[0] if dispatch else None
            out.append((wf_state.decode() if wf_state else None, state.decode() if state else None, dispatch_id))
        return out  # type: ignore[return-value]

    def unit_runs(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        """The attempt and the run (token, started, entry, worker) each (workflow, unit) holds now: what a
        worker reclaiming a unit's entry records about the run it replaces."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id, unit in pairs:
            pipe.hmget(self.keys.wf_tasks(wf_id), f"{unit}|dispatch", f"{unit}|run")
        return [
            {**unpack_group("dispatch", (dispatch or b"").decode()), **unpack_group("run", (run or b"").decode())}
            for dispatch, run in pipe.execute()
        ]

    def dead_letter(self, reason: str, raw: bytes | None, source: str, entry_id: str, **extra: Any) -> None:
        """Keep a message that cannot be handled, with why; a huge one keeps its first MiB."""
        raw = raw or b""
        cap = self.settings.max_message_bytes
        record = {
            "reason": reason,
            "raw": raw[:cap],
            "size": len(raw),
            "truncated": len(raw) > cap,
            "source": source,
            "entry": entry_id,
            **extra,
        }
        self.redis.xadd(self.keys.dlq, {wire.FIELD: wire.pack(record)}, maxlen=self.settings.dlq_maxlen)

    def dead_letters(self, limit: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """Newest first: (DLQ entry id, record)."""
        rows = self.redis.xrevrange(self.keys.dlq, count=limit)
        return [(i.decode(), wire.unpack(f[wire.FIELD], 1 << 26)) for i, f in rows]

    def read_dead_letter(self, entry_id: str) -> dict[str, Any] | None:
        rows = self.redis.xrange(self.keys.dlq, min=entry_id, max=entry_id)
        return wire.unpack(rows[0][1][wire.FIELD], 1 << 26) if rows else None

    def remove_dead_letters(self, entry_ids: Sequence[str]) -> int:
        return int(self.redis.xdel(self.keys.dlq, *entry_ids)) if entry_ids else 0

    def purge_dead_letters(self) -> int:
        count = int(self.redis.xlen(self.keys.dlq))
        self.redis.delete(self.keys.dlq)
        return count

    def pending_of(self, stream: str, group: str, count: int = 1000) -> list[dict[str, Any]]:
        """Pending entries: id, consumer, idle ms, deliveries."""
        rows = self.redis.xpending_range(stream, group, min="-", max="+", count=count)
        return [
            {
                "id": r["message_id"].decode(),
                "consumer": r["consumer"].decode(),
                "idle": r["time_since_delivered"],
                "deliveries": r["times_delivered"],
            }
            for r in rows
        ]

    def claim(self, stream: str, group: str, consumer: str, ids: Sequence[str], min_idle_ms: int) -> list[Entry]:
        """Take over entries; `min_idle_ms` makes a second claimer of the same entries get nothing."""
        if not ids:
            return []
        reply = self.redis.xclaim(stream, group, consumer, min_idle_time=min_idle_ms, message_ids=list(ids))
        return [Entry(eid.decode(), _raw_of(fields)) for eid, fields in reply]

    def drop_consumer_if_idle(self, stream: str, group: str, consumer: str) -> None:
        """Leave a group for good, unless entries are still pending on us (they must be reclaimed)."""
        try:
            if not self.redis.xpending_range(stream, group, min="-", max="+", count=1, consumername=consumer):
                self.redis.xgroup_delconsumer(stream, group, consumer)
        except ResponseError:
            pass  # the stream or group went away

    def drop_consumer(self, stream: str, group: str, consumer: str) -> None:
        try:
            self.redis.xgroup_delconsumer(stream, group, consumer)
        except ResponseError:
            pass  # the group or stream went away: nothing to drop

    def trim_acked(self, stream: str, group: str, keep: int) -> int:
        """Once a stream holds more than `keep` entries, drop those its group has acked.

        Never an entry still pending or unread (trimming deletes pending entries too, and they are lost):
        the cut is the oldest pending entry, or the one after the last delivered."""
        try:
            if int(self.redis.xlen(stream)) <= keep:
                return 0
            info = next((g for g in self.redis.xinfo_groups(stream) if g["name"] in (group, group.encode())), None)
            if info is None:
                return 0
            last = info["last-delivered-id"]
            cut = _next_id(last.decode() if isinstance(last, bytes) else str(last))
            if int(info.get("pending") or 0):
                oldest = self.redis.xpending(stream, group)["min"]
                cut = min(cut, oldest.decode() if isinstance(oldest, bytes) else str(oldest), key=_id_key)
            return int(self.redis.xtrim(stream, minid=cut, approximate=True))
        except ResponseError:
            return 0  # the stream or group went away meanwhile

    # -- leases ----------------------------------------------------------------------------------
    def renew_lease(self, table: str, name: str, ttl: float, info: dict[str, Any]) -> float:
        """Returns Redis's clock (seconds); the lease expires `ttl` after it."""
        ms = self._script(scripts.LEASE, [table], [name, int(ttl * 1000), wire.pack(info)])
        return int(ms) / 1000

    def drop_lease(self, table: str, name: str) -> None:
        self.redis.hdel(table, name, f"{name}|expires")

    def leases(self, table: str) -> tuple[float, dict[str, dict[str, Any]]]:
        """Redis's clock, and every lease: name -> info plus `expires` (seconds)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(table)
        (secs, micros), raw = pipe.execute()
        return secs + micros / 1e6, parse_leases(raw)

    # -- workflows -------------------------------------------------------------------------------
    def submit_workflow(self, wf_id: str, fields: dict[str, Any]) -> bool:
        """Write a new workflow, index it and tell the coordinators, in one round trip.

        False if the id exists (the coordinators are told again: starting is idempotent)."""
        keys = self.keys
        created_at = float(fields["created_at"])
        args: list[Any] = []
        big = {name: fields[name] for name in _BIG_FIELDS if name in fields}
        for name, value in fields.items():
            if name not in big:
                args += [name, json.dumps(value) if name in _META_JSON else value]
        kick = wire.Inbox(kind="submit", body={"wf": wf_id}).encode(self.settings.max_message_bytes)

        def build(pipe: Any) -> None:
            pipe.zadd(keys.workflows, {wf_id: created_at}, nx=True)
            pipe.zadd(keys.running, {wf_id: created_at}, nx=True)
            for name, value in big.items():  # first: the coordinator reads them on the kick
                pipe.hsetnx(keys.wf(wf_id), name, value)
            pipe.evalsha(_SHAS[scripts.CREATE], 1, keys.wf(wf_id), *args)
            pipe.xadd(keys.results, {wire.FIELD: kick})

        return bool(self._pipeline(build)[2 + len(big)])

    def load_runs(self, wf_ids: Sequence[str]) -> list[tuple[dict[str, Any], dict[bytes, bytes], dict[bytes, bytes]]]:
        """Meta (parsed), raw unit fields and raw results of several workflows, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in wf_ids:
            pipe.hgetall(self.keys.wf(wf_id))
            pipe.hgetall(self.keys.wf_tasks(wf_id))
            pipe.hgetall(self.keys.wf_results(wf_id))
        replies = pipe.execute()
        return [(parse_meta(replies[i]), replies[i + 1], replies[i + 2]) for i in range(0, len(replies), 3)]

    def commit(self, transitions: Sequence[tuple[str, int, Transition]]) -> list[int]:
        """Commit transitions, one script call each, pipelined: the new version, or -1 where the
        workflow's version moved on since it was read (nothing was written then).

        The dispatches ride in the same round trip, right behind the scripts: a worker can only see
        them after the commit, and those of a transition that lost the version race name a dispatch
        id the workflow never recorded, so the start script refuses them. They stay in the outbox
        too, so a crash before the drain re-sends them (workers drop the copies by dispatch id)."""
        ttl = int(self.settings.retention)
        calls = []
        for wf_id, version, tx in transitions:
            args: list[Any] = [version]
            for pairs in (tx.fields(), tx.meta):
                args.append(len(pairs))
                for name, value in pairs.items():
                    args += [name, json.dumps(value) if name in _META_JSON else value]
            args.append(len(tx.results))
            for unit, raw in tx.results.items():
                args += [unit, raw]
            args.append(len(tx.history))
            args += tx.history
            args += [tx.id, wire.pack(tx.outbox()) if tx.has_outbox else b"", "1" if tx.finished else "0", ttl]
            calls.append((self.keys.wf_keys(wf_id), args))

        dispatches = self._by_stream([(tx.dispatches, tx.bulk) for _, _, tx in transitions])

        def build(pipe: Any) -> None:
            for keys, args in calls:
                pipe.evalsha(_SHAS[scripts.APPLY], len(keys), *keys, *args)
            self._dispatch(pipe, dispatches)

        return [int(v) for v in self._pipeline(build)[: len(calls)]]

    def _by_stream(self, batches: Iterable[tuple[Iterable[tuple[str, bytes]], bool]]) -> dict[str, list[bytes]]:
        """Dispatches grouped by agent stream, each stream's group created before its first entry.

        A transition's dispatches go to the agents' bulk lanes when it releases more than
        `bulk_after` units for one agent, or is part of a release chunked over several transitions
        (`bulk`): workers read both lanes at once, so a small workflow's next task never waits behind
        a ten-thousand-task fan-out (one FIFO per agent made a chain 30× slower)."""
        streams: dict[str, list[bytes]] = {}
        for batch, bulk in batches:
            per_agent: dict[str, list[bytes]] = {}
            for agent, raw in batch:
                per_agent.setdefault(agent, []).append(raw)
            for agent, raws in per_agent.items():
                big = bulk or len(raws) > self.settings.bulk_after
                lane = self.keys.agent_bulk(agent) if big else self.keys.agent_tasks(agent)
                streams.setdefault(lane, []).extend(raws)
        for stream in streams:
            if stream not in self._groups:
                self.ensure_group(stream, WORKERS_GROUP)
        return streams

    def _dispatch(self, pipe: Any, streams: dict[str, list[bytes]]) -> None:
        for stream, raws in streams.items():
            for start in range(0, len(raws), 1000):
                pipe.evalsha(_SHAS[scripts.XADD_MANY], 1, stream, wire.FIELD, *raws[start : start + 1000])

    def versions(self, wf_ids: Sequence[str]) -> list[int | None]:
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in wf_ids:
            pipe.hget(self.keys.wf(wf_id), "version")
        return [None if v is None else int(v) for v in pipe.execute()]

    def start_many(self, consumer: str, batches: dict[str, list[tuple[str, str, str, bytes]]]) -> dict[str, list[int]]:
        """Mark attempts started (see scripts.START for the tokens) for several workflows, one round trip."""
        order = list(batches)

        def build(pipe: Any) -> None:
            for wf_id in order:
                args: list[Any] = [consumer]
                for unit, dispatch, entry, lost in batches[wf_id]:
                    args += [unit, dispatch, entry, lost]
                keys = [self.keys.wf(wf_id), self.keys.wf_tasks(wf_id), self.keys.wf_history(wf_id)]
                pipe.evalsha(_SHAS[scripts.START], len(keys), *keys, *args)

        replies = self._pipeline(build)
        return {wf_id: [int(t) for t in tokens] for wf_id, tokens in zip(order, replies, strict=False)}

    def outboxes(self, wf_ids: Iterable[str]) -> dict[str, dict[str, bytes]]:
        ids = list(wf_ids)
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in ids:
            pipe.hgetall(self.keys.wf_outbox(wf_id))
        return {
            wf_id: {k.decode(): v for k, v in raw.items()}
            for wf_id, raw in zip(ids, pipe.execute(), strict=True)
            if raw
        }

    def drain(
        self, items: Sequence[tuple[str, str, dict[str, Any]]], dispatched: bool = False, fired: Sequence[str] = ()
    ) -> None:
        """Carry out outbox entries (wf id, entry id, decoded outbox), then remove them.

        `dispatched`: the commit already sent the dispatches. Dispatches carry their id, so a redrive
        after a crash only makes duplicates that consumers drop. `fired`: timers handled by these
        transitions, removed before the timers they set (which may be the same ones, set again).
        """
        streams = (
            {}
            if dispatched
            else self._by_stream([(box.get("dispatches") or (), bool(box.get("bulk"))) for _, _, box in items])
        )

        def build(pipe: Any) -> None:
            if fired:
                pipe.zrem(self.keys.timers, *fired)
            self._dispatch(pipe, streams)
            for wf_id, entry_id, box in items:
                self._carry_out(pipe, wf_id, box)
                pipe.hdel(self.keys.wf_outbox(wf_id), entry_id)

        self._pipeline(build)

    def _carry_out(self, pipe: Any, wf_id: str, box: dict[str, Any]) -> None:
        """An outbox's effects other than dispatches: events, timers, approvals, the running index."""
        keys = self.keys
        if box.get("events"):
            self._publish(pipe, box["events"])
        if box.get("timers_add"):
            pipe.zadd(keys.timers, {m: int(due * 1000) for m, due in box["timers_add"].items()})
        if box.get("timers_del"):
            pipe.zrem(keys.timers, *box["timers_del"])
        if box.get("approvals_set"):
            pipe.hset(keys.approvals, mapping=box["approvals_set"])
        if box.get("approvals_del"):
            pipe.hdel(keys.approvals, *box["approvals_del"])
        if box.get("finished"):
            pipe.zrem(keys.running, wf_id)

    def running_chunk(self, start: int, count: int) -> list[str]:
        return [i.decode() for i in self.redis.zrange(self.keys.running, start, start + count - 1)]

    def sweep_states(self, wf_ids: Sequence[str]) -> list[tuple[bool, bool, float, int]]:
        """Per workflow: exists, started, created_at, outbox entries."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in wf_ids:
            pipe.hmget(self.keys.wf(wf_id), "launched", "created_at")
            pipe.hlen(self.keys.wf_outbox(wf_id))
        replies = pipe.execute()
        out = []
        for i in range(0, len(replies), 2):
            started, created = replies[i]
            out.append((created is not None, bool(started and started != b"0"), float(created or 0), replies[i + 1]))
        return out

    def forget_running(self, wf_id: str) -> None:
        self.redis.zrem(self.keys.running, wf_id)

    # -- timers ----------------------------------------------------------------------------------
    def poll(
        self,
        streams: Sequence[str],
        group: str,
        consumer: str,
        count: int,
        block: float | None,
        pending: bool,
        acks: Mapping[str, Sequence[str]],
        timer_limit: int = 500,
    ) -> tuple[float, float | None, list[str], list[tuple[str, Entry]]]:
        """A coordinator's round in one round trip: ack what the last round handled, claim the due
        timers for `timer_claim` seconds, then read the streams (as `read_groups`, blocking up to
        `block`). Returns Redis's clock, when the next timer is due, the claimed timers and the entries."""
        claim_ms = int(self.settings.timer_claim * 1000)

        def build(pipe: Any) -> None:
            for stream, ids in acks.items():
                if ids:
                    pipe.xack(stream, group, *ids)
            pipe.evalsha(_SHAS[scripts.CLAIM_TIMERS], 1, self.keys.timers, claim_ms, timer_limit)
            _read(pipe, streams, group, consumer, count, block, pending)

        # Not through `_pipeline`: running it all again after a NOSCRIPT would read a second batch and
        # strand the first (delivered to this consumer, never handled). Only the claim is redone.
        pipe = self.redis.pipeline(transaction=False)
        build(pipe)
        *acked, claimed, read = pipe.execute(raise_on_error=False)
        if isinstance(claimed, NoScriptError):
            self._load_scripts()
            claimed = self._script(scripts.CLAIM_TIMERS, [self.keys.timers], [claim_ms, timer_limit])
        for reply in (*acked, claimed, read):
            if isinstance(reply, Exception):
                raise reply  # what the read delivered is re-read by the coordinator's own recovery
        return (*_claimed(claimed), _entries(read))

    # -- reading state ---------------------------------------------------------------------------
    def read_workflow(
        self, wf_id: str
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, bytes], list[bytes]]:
        """Everything `status` shows: meta, units, raw results, history records."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.wf(wf_id))
        pipe.hgetall(keys.wf_tasks(wf_id))
        pipe.hgetall(keys.wf_results(wf_id))
        pipe.lrange(keys.wf_history(wf_id), 0, -1)
        meta, units, results, history = pipe.execute()
        return (
            parse_meta(meta),
            parse_units(units),
            {k.decode(): v for k, v in results.items()},
            history,
        )

    def workflow_exists(self, wf_id: str) -> bool:
        return bool(self.redis.exists(self.keys.wf(wf_id)))

    def wait_done(self, wf_id: str, timeout: float) -> bool:
        """Block until the workflow's end (or the timeout); never consumes the signal other waiters need."""
        key = self.keys.wf_done(wf_id)
        return self.redis.blmove(key, key, timeout=max(0.01, timeout), src="RIGHT", dest="LEFT") is not None

    def recent_workflows(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        ids = [i.decode() for i in self.redis.zrevrange(self.keys.workflows, 0, limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in ids:
            pipe.hmget(self.keys.wf(wf_id), "name", "state", "created_at", "finished_at")
        rows = []
        for wf_id, values in zip(ids, pipe.execute(), strict=True):
            if values[0] is None:
                continue  # expired by retention; the index is trimmed in maintenance
            name, state, created, finished = (v.decode() if v else None for v in values)
            rows.append(
                (
                    wf_id,
                    {
                        "name": name,
                        "state": state,
                        "created_at": float(created) if created else None,
                        "finished_at": float(finished) if finished else None,
                    },
                )
            )
        return rows

    def approvals(self) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(self.keys.approvals)
        return {k.decode(): wire.unpack(v, self.settings.max_message_bytes) for k, v in raw.items()}

    # -- choreography ----------------------------------------------------------------------------
    def choreography(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Subscriptions and triggers: name -> info."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.subs)
        pipe.hgetall(self.keys.triggers)
        subs, triggers = pipe.execute()
        return (
            {k.decode(): json.loads(v) for k, v in subs.items()},
            {k.decode(): json.loads(v) for k, v in triggers.items()},
        )

    def register_subscription(self, name: str, info: dict[str, Any]) -> None:
        self.redis.hset(self.keys.subs, name, json.dumps(info))

    def register_trigger(self, name: str, info: dict[str, Any]) -> None:
        self.redis.hset(self.keys.triggers, name, json.dumps(info))

    def remove_trigger(self, name: str) -> bool:
        return bool(self.redis.hdel(self.keys.triggers, name))

    def trigger(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.keys.triggers, name)
        return json.loads(raw) if raw else None

    def seen(self, subscription: str, event_ids: Sequence[str]) -> list[bool]:
        """For each event id: has this subscription already handled it (a copy routed twice)?"""
        if not event_ids:
            return []
        scores = self.redis.zmscore(self.keys.sub_seen(subscription), list(event_ids))
        return [score is not None for score in scores]

    def mark_seen(self, subscription: str, event_ids: Sequence[str], keep: float) -> None:
        key = self.keys.sub_seen(subscription)
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(key, dict.fromkeys(event_ids, now))
        pipe.zremrangebyscore(key, "-inf", now - keep)
        pipe.execute()

    def subscription_health(self, name: str) -> dict[str, Any]:
        """Length, lag and events dropped unread by retention (oldest go first, so it is exact)."""
        stream = self.keys.sub(name)
        try:
            info = self.redis.xinfo_stream(stream)
            groups = self.redis.xinfo_groups(stream)
        except ResponseError:
            return {"length": 0, "dropped": 0, "lag": None, "pending": 0}
        group = next((g for g in groups if g["name"] in (WORKERS_GROUP, WORKERS_GROUP.encode())), None)
        added = int(info.get("entries-added") or 0)
        read = int(group.get("entries-read") or 0) if group else 0
        trimmed = added - int(info["length"])
        return {
            "length": int(info["length"]),
            "dropped": max(0, trimmed - read),
            "lag": group.get("lag") if group else None,
            "pending": int(group["pending"]) if group else 0,
        }

    def trusted_keys(self) -> dict[str, str]:
        """The configured trust list: approver name -> public key (hex). Empty: none configured."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.keys.trusted_keys).items()}

    def trust_key(self, name: str, public_hex: str) -> None:
        self.redis.hset(self.keys.trusted_keys, name, public_hex)

    def distrust_key(self, name: str) -> bool:
        return bool(self.redis.hdel(self.keys.trusted_keys, name))

    def last_event_id(self) -> str:
        newest = self.redis.xrevrange(self.keys.events, count=1)
        return newest[0][0].decode() if newest else "0-0"

    def read_events(self, after: str, block: float | None, count: int = 500) -> tuple[str, list[dict[str, Any]]]:
        """Events after the entry id `after` (waiting up to `block` seconds); returns the new last id."""
        reply = self.redis.xread(
            {self.keys.events: after}, count=count, block=None if block is None else max(1, int(block * 1000))
        )
        events: list[dict[str, Any]] = []
        for _, items in reply or ():
            for entry_id, fields in items:
                after = entry_id.decode()
                try:
                    events += wire.decode_events(fields[wire.FIELD], self.settings.max_message_bytes * 4)
                except (DecodeError, KeyError):
                    continue
        return after, events

    def send_to_coordinators(self, message: wire.Inbox) -> None:
        """Into the coordinators' inbox; their group reads it from the start, whenever they come."""
        self.add(self.keys.results, message.encode(self.settings.max_message_bytes))

    def registered_subscriptions(self, timeout: float) -> dict[str, dict[str, Any]]:
        """Subscriptions over a one-off connection that gives up after `timeout` seconds and never
        retries, so `graph` draws at once when no broker answers."""
        try:
            quick = redis.Redis.from_url(
                self.settings.redis_url,
                protocol=2,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(ExponentialBackoff(), 0),
            )
        except ValueError as exc:
            raise BrokerUnavailable(f"bad Redis URL {self.settings.redis_url!r}: {exc}") from None
        try:
            raw: Any = quick.hgetall(self.keys.subs)
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {self.settings.redis_url}: {exc}") from None
        finally:
            quick.close()
        return {k.decode(): json.loads(v) for k, v in raw.items()}
