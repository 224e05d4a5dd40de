"""One connection to the broker, and what every role does with it: scripts, pipelines, stream reads
and acks, leases, dead letters, publishing events. The role modules beside it build on this class.

Every method batches: one pipeline or one script call serves many messages, because round trips, not
Redis, bound a Python client (~180 µs a trip here; batching both sides was a 13× step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    DataError,
    InvalidResponse,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
    RedisClusterUnreachableError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

try:
    import hiredis
except ImportError:  # redis-py without its C parser: its own packer then
    hiredis = None  # type: ignore[assignment]

from phibroker import wire
from phibroker.engine import state
from phibroker.engine.state import PACKED, number, unpack_group
from phibroker.errors import BrokerUnavailable, DecodeError
from phibroker.keys import Keys, agent_of
from phibroker.settings import CLUSTER_SCHEMES, Settings, is_cluster_url
from phibroker.store import scripts

log = logging.getLogger("phibroker.store")
# The agents a look reads from the roster: the coordinators write it, so a real one is far smaller.
MAX_AGENTS = 1000
LEASE_INFO_BYTES = 24 << 10  # of a lease's info: what LEASE stores and a reader unpacks
# Fields (two a worker) and bytes of one agent's lease hash past which a look skips it. LEASE stops at
# 1,000 workers of `LEASE_INFO_BYTES` each, within both: only that agent's own user, writing the hash by
# hand, can fill it so (its workers then take each other for dead).
MAX_LEASE_FIELDS = 2048
MAX_LEASE_BYTES = 32 << 20
# Items of a list or map in a lease's info: its dispatches, its commands and subscriptions.
LEASE_INFO_ITEMS = 4096


class Refused(RedisConnectionError):
    """Redis answered, but will not serve commands for now: out of memory, a script running too long,
    loading its data, a replica, a cluster slot moving. It is `ConnectionError` on purpose: every loop
    treats it as a broker it cannot reach (back off, retry), and the CLI exits 3."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code} {message}")
        self.code = code


# The error codes that say "not now" rather than "never": what the command asked is fine, the server
# is not able to do it at the moment (see REFUSAL_HINTS for what each one means to an operator).
REFUSAL_HINTS = {
    "OOM": "it is out of memory (maxmemory, noeviction): free some or raise the limit",
    "BUSY": "a script has run too long: `SCRIPT KILL` it (the admin user may)",
    "LOADING": "it is loading its data set: try again in a moment",
    "READONLY": "it is a read-only replica: point PHIBROKER_REDIS_URL at the master",
    "MASTERDOWN": "its link to the master is down",
    "TRYAGAIN": "a cluster slot is moving",
    "CLUSTERDOWN": "the cluster is down",
    "NOREPLICAS": "too few replicas answer for it to take writes",
    "MISCONF": "it cannot save to disk, so it refuses writes",
    # "ERR The stream has exhausted the last possible ID": someone appended with an explicit id
    "STREAMEND": "a stream was given the last possible entry id by hand: it takes no more entries until an"
    " admin deletes the stream (DEL; its consumer group and pending entries go with it)",
    # not a Redis reply: phibroker's scripts are gone (a restart) and this user may not load them
    "UNLOADED": "phibroker's scripts are not loaded: a coordinator loads them (this user may only call them)",
}

# What a broker out of reach looks like; loops back off and carry on, the CLI exits 3.
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, InvalidResponse, ConnectionResetError, BrokenPipeError)


def refusal(exc: BaseException) -> Refused | None:
    """`exc` as a Refused when Redis said "not now" (OOM, BUSY, ...), else None."""
    if isinstance(exc, Refused):
        return exc
    if isinstance(exc, BusyLoadingError):  # LOADING: redis-py reads it as a lost connection, and retries
        return Refused("LOADING", str(exc))
    # what a cluster says while a master fails over or a slot moves, once its client gave up retrying
    if isinstance(exc, MasterDownError):
        return Refused("MASTERDOWN", str(exc))
    if isinstance(exc, (ClusterDownError, SlotNotCoveredError, RedisClusterUnreachableError, ClusterError)):
        return Refused("CLUSTERDOWN", str(exc))
    if isinstance(exc, TryAgainError):
        return Refused("TRYAGAIN", str(exc))
    if not isinstance(exc, ResponseError):
        return None
    text = str(exc).rpartition(" of pipeline caused error: ")[2]  # redis-py names the command before it
    if "exhausted the last possible ID" in text:
        return Refused("STREAMEND", text)
    code = exc.status_code or text.partition(" ")[0]
    if code not in REFUSAL_HINTS:
        return None
    return Refused(code, text.removeprefix(f"{code} "))


@contextmanager
def refusals() -> Iterator[None]:
    """Inside, a "not now" reply raises Refused; any other error passes as it is (for what does not go
    through the client's commands: pub/sub)."""
    try:
        yield
    except (ResponseError, RedisClusterException, ClusterError) as exc:
        refused = refusal(exc)
        if refused is None:
            raise
        raise refused from exc


class _Packer:
    """Packs a command in one C call (hiredis), with the same bytes on the wire as redis-py's own
    packer, which first encodes every argument in Python: that was a tenth of a coordinator's CPU on a
    fan-out, whose commits carry tens of arguments a task."""

    def pack(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # `XINFO STREAM`: a command's name may be two words
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # a bool, None or an object: redis-py's error for it
            raise DataError(f"Invalid input: {exc}") from None


class _Pipeline(Pipeline):
    """A pipeline whose replies and errors say Refused where Redis said "not now"."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            replies = super().execute(raise_on_error)
        except ResponseError as exc:
            refused = refusal(exc)
            if refused is None:
                raise
            raise refused from exc
        return [refusal(reply) or reply if isinstance(reply, ResponseError) else reply for reply in replies]


class _Client(redis.Redis):
    """redis-py's client, but a "not now" reply (OOM, BUSY, ...) raises Refused, whichever command or
    pipeline met it: one place, so no loop anywhere dies of a full or busy Redis."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute_command(*args, **options)
        except ResponseError as exc:
            refused = refusal(exc)
            if refused is None:
                raise
            raise refused from exc

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def stream_read_keys(args: Sequence[Any]) -> list[Any] | None:
    """The streams an XREAD or XREADGROUP names (the first half of what follows STREAMS), or None for
    another command. redis-py's cluster client asks a node for the keys of such a command (`COMMAND
    GETKEYS`, their place moves with the options) each time it routes one: a round trip per read."""
    name = args[0].decode(errors="replace") if isinstance(args[0], bytes) else str(args[0])
    first = {"XREAD": 1, "XREADGROUP": 4}.get(name.upper())
    if first is None:
        return None
    words = [arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg) for arg in args]
    for index in range(first, len(words)):
        if words[index].upper() == "STREAMS":
            rest = args[index + 1 :]
            return list(rest[: len(rest) // 2])
    return None


class _StreamKeys:
    """Finds the keys of stream reads here, not by asking a node (see `stream_read_keys`)."""

    def _get_command_keys(self, *args: Any) -> Any:
        keys = stream_read_keys(args)
        return keys if keys is not None else super()._get_command_keys(*args)  # type: ignore[misc]


class _ClusterPipeline(_StreamKeys, ClusterPipeline):
    """A cluster pipeline whose replies and errors say Refused where Redis said "not now"."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        with refusals():
            replies = super().execute(raise_on_error)
        return [refusal(reply) or reply if isinstance(reply, ResponseError) else reply for reply in replies]


class _ClusterClient(_StreamKeys, RedisCluster):
    """redis-py's cluster client, with the same refusals as `_Client`: a cluster that says "not now"
    (a master failing over, slots not served) once the client's own retries are spent is a broker out
    of reach for a while, not a crash."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        with refusals():
            return super().execute_command(*args, **options)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = _ClusterPipeline  # adds nothing but `execute`; redis-py builds it with its own state
        return pipe


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """`redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/[?OPTIONS]` (or `rediss+cluster://`)
    as the plain URL of its first node (what redis-py reads credentials and options from) and every
    node it names. Raises ValueError saying what is wrong."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = []
    for address in hosts.split(","):
        host, _, port = address.strip().rpartition(":")
        host = unquote(host.strip("[]"))
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address.strip() or 'an empty address'} is not HOST:PORT")
        seeds.append((host, int(port)))
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a cluster has database 0 only")
    first = f"{CLUSTER_SCHEMES[parts.scheme]}://{credentials + '@' if credentials else ''}{hosts.split(',')[0]}/0"
    return first + (f"?{parts.query}" if parts.query else ""), seeds


SHAS = {
    source: hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - the name Redis gives a script
    for source in (
        scripts.CREATE,
        scripts.APPLY,
        scripts.START,
        scripts.CLAIM_TIMERS,
        scripts.LEASE,
        scripts.READ_OWN,
        scripts.READ_LEASES,
        scripts.XADD_MANY,
        scripts.OUTPUT,
    )
}
_INT_FIELDS = frozenset({"attempt", "token", "seq", "parts", "version", "launched", "depth", "reclaims"})
_FLOAT_FIELDS = frozenset({"dispatched", "started", "finished", "deadline", "created_at", "finished_at", "retry_at"})
_RAW_FIELDS = frozenset({"decision"})
META_JSON = frozenset({"params", "chain", "children"})
# written without Lua (scripts.CREATE); `spec` stays text
_BIG_FIELDS = ("spec", "source_text", "signature", "source_parts")
HINT = "start one with `make dev` (or `phibroker dev`), or set PHIBROKER_REDIS_URL"

# Where published events go beyond the log (subscription streams, trigger starts): stream, entry, cap.
Route = Callable[[list[dict[str, Any]]], list[tuple[str, bytes, int | None]]]

# The commands one step of `Connection.in_order` queues on a pipeline, and whether they must be one
# transaction (on a cluster: keys of one slot only).
Step = tuple[Callable[[Any], None], bool]

# How long a worker's read of streams in several cluster slots waits on its task lanes alone before it
# looks at the others again (a cluster refuses one blocking read over several slots).
SPREAD_BLOCK = 0.25


@dataclass(slots=True)
class Entry:
    """One stream entry: its id and its raw envelope (None when the entry was trimmed away)."""

    id: str
    raw: bytes | None


def _raw_of(fields: dict[bytes, bytes] | None) -> bytes | None:
    """An entry's envelope; None when the entry itself is gone (trimmed), b"" when it has no `m` field."""
    return None if fields is None else fields.get(wire.FIELD, b"")


def id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    ms, seq = id_order(entry_id)
    return f"{ms}-{seq + 1}"


def connect(settings: Settings, timeout: float | None = None, retries: int = 3) -> Any:
    """A client whose socket timeout stays above every blocking read, with a short retry for blips:
    redis-py's cluster client for a `redis+cluster://` URL (it asks the seeds for the cluster's nodes
    at once, so an unreachable cluster fails here), else its plain client (which connects on first use).
    `timeout` instead bounds every call (a one-off look that must not wait on a broker away)."""
    url = settings.redis_url
    options: dict[str, Any] = {
        "protocol": 2,
        "socket_timeout": timeout or max(10.0, settings.worker_block * 4),
        "socket_connect_timeout": timeout or 3.0,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        "driver_info": None,  # no CLIENT SETINFO: per-agent ACL users need not be granted it
    }
    try:
        if not is_cluster_url(url):
            packer = {"command_packer": _Packer()} if hiredis is not None else {}
            return _Client.from_url(url, health_check_interval=30, **options, **packer)
        first, seeds = cluster_seeds(url)
        nodes = [ClusterNode(host, port) for host, port in seeds[1:]]
        try:
            return _ClusterClient(url=first, startup_nodes=nodes, **options)
        except (RedisClusterException, NoPermissionError) as exc:
            denied = _denied(exc)
            if denied is not None:
                hosts = urlsplit(url).netloc.rpartition("@")[2]
                raise BrokerUnavailable(
                    f"the Redis user may not ask the cluster at {hosts} what a cluster client must ({denied}): "
                    "generate the users with `phibroker acl generate --cluster HOST:PORT,...`"
                ) from None
            if "db" in str(exc) or "Unix" in str(exc):
                raise ValueError(str(exc)) from None
            raise BrokerUnavailable(
                f"cannot reach the Redis Cluster at {settings.shown_url} ({str(exc).rstrip('.')}): {HINT}"
            ) from None
    except ValueError as exc:
        raise BrokerUnavailable(
            f"bad Redis URL {settings.shown_url!r} ({exc}): set PHIBROKER_REDIS_URL (or --redis) to "
            "redis://HOST:PORT/DB or redis+cluster://HOST:PORT[,HOST:PORT...]/"
        ) from None


def _denied(exc: BaseException) -> NoPermissionError | None:
    """The NOPERM under an error, however deep redis-py wrapped it (a cluster client's start)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, NoPermissionError):
        cause = cause.__cause__ or cause.__context__
    return cause


def denied(exc: BaseException) -> bool:
    """Whether Redis refused this user the command (NOPERM): its ACL user may not."""
    return _denied(exc) is not None


def unusable(settings: Settings, exc: Exception) -> BrokerUnavailable | None:
    """What a failure to reach, select or use the broker means to a user, or None for any other error.

    Redis saying "not now" (OOM, BUSY, ...) reads as such, with what an operator can do about it.
    A database index the server does not have is refused only when the connection is made (SELECT),
    as a ResponseError: it is as fatal as an address where nothing listens, so it reads the same way.
    """
    url = settings.shown_url
    refused = refusal(exc)
    if refused is not None:
        detail = str(refused).removeprefix(f"{refused.code} ").split(". script:")[0].rstrip(".")
        return BrokerUnavailable(
            f"Redis at {url} refuses commands for now ({refused.code}: {detail}): {REFUSAL_HINTS[refused.code]}",
            for_now=True,
        )
    if isinstance(exc, CONNECTION_ERRORS):
        return BrokerUnavailable(f"cannot reach Redis at {url} ({str(exc).rstrip('.')}): {HINT}")
    if isinstance(exc, ResponseError) and "DB index" in str(exc):
        return BrokerUnavailable(
            f"Redis at {url} refuses that database ({exc}): use one it has (/0 is always there) "
            "in PHIBROKER_REDIS_URL (or --redis)"
        )
    if isinstance(exc, AskError):  # MOVED too: a plain client sent to a node of a cluster
        return BrokerUnavailable(CLUSTER_NODE.format(url=url))
    denial = _denied(exc)
    if denial is not None:
        return BrokerUnavailable(
            f"Redis at {url} refuses this user a command ({str(denial).rstrip('.')}): run it with the env file"
            " `phibroker acl generate` wrote for this kind of process"
        )
    return None


CLUSTER_NODE = (
    "Redis at {url} is a node of a Redis Cluster: set PHIBROKER_REDIS_URL (or --redis) to "
    "redis+cluster://HOST:PORT[,HOST:PORT...]/"
)


def parse_value(name: str, raw: bytes) -> Any:
    if raw == b"":
        return None
    if name in _RAW_FIELDS:
        return raw
    text = raw.decode(errors="replace")
    if name in _INT_FIELDS:
        return number(int, text)
    if name in _FLOAT_FIELDS:
        return number(float, text)
    return text


def parse_units(raw: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """`unit|field` fields -> {unit: {attribute: value}}, packed fields unpacked, numbers typed. The
    run's own fields beside them (`finished`: no `|`) are left out. What workers marked is not in
    there: `Connection.read_units` puts it on."""
    units: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        unit, bar, name = key.decode(errors="replace").rpartition("|")
        if not bar:
            continue
        record = units.setdefault(unit, {})
        if name in PACKED:
            record.update(unpack_group(name, value.decode(errors="replace")))
        else:
            record[name] = parse_value(name, value)
    return units


def parse_meta(raw: dict[bytes, bytes]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode()
        meta[name] = json.loads(value) if name in META_JSON and value else parse_value(name, value)
    return meta


def xreadgroup(
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


def entries_of(reply: Any) -> list[tuple[str, Entry]]:
    """An XREADGROUP reply over several streams as (stream, entry) pairs."""
    return [
        (stream.decode(), Entry(entry_id.decode(), _raw_of(fields)))
        for stream, items in reply or ()
        for entry_id, fields in items
    ]


# What a worker's lease says beside its expiry, and of what type. Its agent writes it: a reader takes
# these fields only, each of its type, so no value there can stop a coordinator or a view.
WORKER_LEASE: dict[str, type] = {
    "host": str,
    "pid": int,
    "concurrency": int,
    "in_flight": int,
    "handled": int,
    "reclaim_after": float,
    "stopping": bool,
    "commands": list,
    "subscriptions": list,
    "dispatches": list,
    "dispatches_more": bool,
}


def worker_lease(agent: str, info: dict[str, Any]) -> dict[str, Any]:
    """A worker's lease as its agent's hash holds it, with the fields of `WORKER_LEASE` that have their
    type (lists of text only), its `expires`, and `agent`: the hash's, whatever the info says."""
    lease: dict[str, Any] = {"agent": agent, "expires": info["expires"]}
    for field, kind in WORKER_LEASE.items():
        value = info.get(field)
        if kind is list and isinstance(value, list):
            lease[field] = [item for item in value if isinstance(item, str)]
        elif kind is float and isinstance(value, int | float) and math.isfinite(value):
            lease[field] = float(value)
        elif kind is not list and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            lease[field] = value
    return lease


def roster(client: Any, keys: Keys) -> list[str]:
    """The agents whose workers have started, by name: the first `MAX_AGENTS`, so a look stays bounded."""
    agents = sorted(a.decode(errors="replace") for a in client.smembers(keys.roster))
    if len(agents) > MAX_AGENTS:
        log.warning("%d agents on the roster; reading the first %d", len(agents), MAX_AGENTS)
    return agents[:MAX_AGENTS]


def parse_leases(raw: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """A lease table as `leases` returns it: name -> info plus `expires` (seconds). An agent writes its
    workers' leases itself: whatever they hold reads as some lease, never as an error."""
    leases: dict[str, dict[str, Any]] = {}
    expiries: dict[str, float] = {}
    for key, value in raw.items():
        name = key.decode(errors="replace")
        if name.endswith("|expires"):
            try:
                expires = float(value) / 1000
            except ValueError:
                continue
            if math.isfinite(expires):
                expiries[name[: -len("|expires")]] = expires
        else:
            try:
                info = wire.unpack(value, LEASE_INFO_BYTES, items=LEASE_INFO_ITEMS)
            except DecodeError:
                info = {}
            leases[name] = info if isinstance(info, dict) else {}
    for name, info in leases.items():
        info["expires"] = expiries.get(name, 0.0)
    return leases


def lease_alive(lease: dict[str, Any], clock: float) -> bool:
    """Whether a lease (as `parse_leases` returns it) was renewed within its time, by Redis's `clock`."""
    return float(lease.get("expires") or 0) > clock


@contextmanager
def reaching(settings: Settings) -> Iterator[None]:
    """A lost connection, a missing database or a refusal (full, busy) becomes BrokerUnavailable (exit 3),
    naming the URL."""
    try:
        yield
    except (*CONNECTION_ERRORS, ResponseError) as exc:
        error = unusable(settings, exc)
        if error is None:
            raise
        raise error from None


class Connection:
    """The broker as every role sees it; a role's class adds what only that role does."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None):
        self.settings = settings
        self.keys: Keys = settings.keys
        self.redis: Any = client or connect(settings)  # redis-py types every reply as maybe-awaitable
        # Redis Cluster: a pipeline keeps no order between nodes and a transaction holds one slot, so
        # what must happen in order goes a step at a time (`in_order`); one server keeps one round trip
        self.cluster = isinstance(self.redis, RedisCluster)
        self._groups: set[str] = set()
        self._scripts_known = False  # Redis was seen to hold phibroker's scripts (forgotten on NOSCRIPT)
        # who signs what this process sends the coordinators and the runs it writes: (name, secret)
        self.sender: tuple[str, bytes] | None = None
        self.good_for = wire.CONTROL_TTL  # how long what it signs stays good (a copy later is refused)

    def sign_as(self, name: str, secret: bytes, good_for: float = wire.CONTROL_TTL) -> None:
        """Sign inbox messages and new runs as this identity (an agent, a client, a coordinator): with
        an identities file, coordinators refuse what nobody allowed to send it signed. A dated message
        (a cancel, a retry, ...) is good for `good_for` seconds after it was signed."""
        self.sender = (name, secret)
        self.good_for = good_for

    def signed(self, raw: bytes) -> bytes:
        """An encoded inbox message (one built where no secret is known: a transition's message to
        another run, a trigger start) signed by this process's identity; unchanged without one."""
        if self.sender is None:
            return raw
        limit = self.settings.max_message_bytes * 4
        return wire.Inbox.decode(raw, limit).signed_as(self.sender, limit, self.good_for)

    def to_inbox(self, raw: bytes) -> tuple[str, dict[bytes, bytes]]:
        """An encoded message to another run (a child's end, a parent's cancel): the inbox lane of that
        run, and the entry's fields, signed as `signed` signs it."""
        limit = self.settings.max_message_bytes * 4
        message = wire.Inbox.decode(raw, limit)
        if self.sender is not None:
            raw = message.signed_as(self.sender, limit, self.good_for)
        return self.keys.inbox(message.body.get("wf")), {wire.FIELD: raw}

    def read_units(
        self, tables: Sequence[tuple[str, dict[bytes, bytes]]], with_lost: bool = False
    ) -> tuple[list[dict[str, dict[str, Any]]], list[dict[str, tuple[int, list[bytes]]]]]:
        """The units of each run (wf id, its tasks hash as read), with the start marks of its live units
        on them (`state.overlay_marks`): one round trip for the marks of all, none when no unit is live.
        `with_lost`, also the lost attempts of the agents of those units: per run, agent -> (how many the
        next commit trims, and the records about its own units). An agent's workers write both: READ_OWN
        reads what fits and no more."""
        units = [parse_units(raw) for _, raw in tables]
        lost: list[dict[str, tuple[int, list[bytes]]]] = [{} for _ in tables]
        reads = [(n, agent, names) for n, table in enumerate(units) for agent, names in state.marked(table).items()]
        if not reads:
            return units, lost

        lost_bytes = state.LOST_RECORDS * state.LOST_RECORD_BYTES if with_lost else 0

        def build(pipe: Any) -> None:
            for n, agent, names in reads:
                own = [self.keys.wf_marks(tables[n][0], agent), self.keys.wf_lost(tables[n][0], agent)]
                self._read(pipe, scripts.READ_OWN, own, state.MARK_BYTES, state.LOST_RECORDS, lost_bytes, *names)

        replies = iter(self._pipeline(build))
        marks: list[dict[str, dict[str, str]]] = [{} for _ in tables]
        for n, agent, names in reads:
            found, items, count = next(replies)
            marks[n][agent] = {unit: state.mark_text(mark) for unit, mark in zip(names, found, strict=True)}
            if count:
                lost[n][agent] = (int(count), state.own_lost(units[n], agent, items))
        for table, by_agent in zip(units, marks, strict=True):
            state.overlay_marks(table, by_agent)
        return units, lost

    # Scripts run by EVALSHA; a NOSCRIPT (a restarted or new Redis) loads them all and runs again.
    # redis-py's own Script objects would ask SCRIPT EXISTS before every pipeline: a round trip each.
    def _script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self.redis.evalsha(SHAS[source], len(keys), *keys, *args)
        except NoScriptError:
            self.load_scripts()
            return self.redis.evalsha(SHAS[source], len(keys), *keys, *args)

    @staticmethod
    def _read(pipe: Any, source: str, keys: Sequence[str], *args: Any) -> None:
        """Queue a read-only script (READ_OWN, READ_LEASES), by its SHA: no user but the coordinators' and
        the admin's may run Lua of its own (EVAL_RO would run a loop that never ends as well)."""
        pipe.evalsha_ro(SHAS[source], len(keys), *keys, *args)

    def _pipeline(self, build: Callable[[Any], None], transaction: bool = False) -> list[Any]:
        """Run the commands `build` queues as one pipeline; errors raise, NOSCRIPT reloads and reruns.
        Where this user may not load phibroker's scripts, it waits, as for a busy Redis, until a
        coordinator has.

        Without `transaction`, each command stands alone: one refused (OOM) does not stop the next.
        With it (MULTI/EXEC), a refused command discards them all."""
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=transaction)
            build(pipe)
            replies = pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in replies):
                self._scripts_known = False
                self.load_scripts()
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return list(replies)
        raise AssertionError("unreachable")

    def in_order(self, steps: Sequence[Step]) -> list[Any]:
        """Run the commands of `steps`, each step stored before the next is sent; the replies of all.

        On one server that is one MULTI/EXEC of them all: in order, all or nothing (a refused write
        discards them all), one round trip. On a cluster, a pipeline per step, a transaction where the
        step asks for one: a refused write stops the steps after it, never those before."""
        if not self.cluster:

            def together(pipe: Any) -> None:
                for build, _ in steps:
                    build(pipe)

            return self._pipeline(together, transaction=True)
        replies: list[Any] = []
        for build, transaction in steps:
            replies += self._pipeline(build, transaction=transaction)
        return replies

    def clocked(self, key: str, build: Callable[[Any], None]) -> tuple[float, list[Any]]:
        """Redis's clock (seconds) and the replies of the commands `build` queues, in one round trip.
        On a cluster, TIME may not join a pipeline: it is asked first, of the node that holds `key`
        (whose clock stamped what is read there), a second round trip."""
        pipe = self.redis.pipeline(transaction=False)
        if self.cluster:
            secs, micros = self.redis.time(target_nodes=self.redis.get_node_from_key(key))
        else:
            pipe.time()
        build(pipe)
        replies = pipe.execute()
        if not self.cluster:
            (secs, micros), *replies = replies
        return secs + micros / 1e6, replies

    def load_scripts(self) -> None:
        """After NOSCRIPT. A user without SCRIPT LOAD (a worker, a client) waits as for a busy Redis
        until a coordinator, which may load them, has."""
        try:
            for source in SHAS:
                self.redis.script_load(source)
        except NoPermissionError as exc:
            raise Refused("UNLOADED", "phibroker's scripts are not loaded") from exc

    def ping(self) -> None:
        """Fail now, in one line, if the broker cannot be used: before a loop, not inside it. A node
        of a Redis Cluster behind a plain `redis://` URL would answer a ping, then redirect each
        command elsewhere: it is asked whether it is one (a user that may not ask is not told)."""
        with reaching(self.settings):
            self.redis.ping()
            if self.cluster:
                return
            try:
                clustered = self.redis.info("cluster").get("cluster_enabled")
            except ResponseError:
                return  # NOPERM, or a broker without INFO (the embedded one)
            if clustered:
                raise BrokerUnavailable(CLUSTER_NODE.format(url=self.settings.shown_url))

    def close(self) -> None:
        self.redis.close()

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
        """`read_group` over several streams in one call: (stream, entry) pairs.

        On a cluster, one read covers streams of one slot only (an agent's two lanes share one). Over
        several, each slot's streams are read in one pipeline without blocking; when none had anything,
        the first slot's streams (the task lanes) are read blocking, for at most SPREAD_BLOCK."""
        slots = self.by_slot(streams)
        if not slots:
            return []
        if len(slots) == 1:
            return entries_of(xreadgroup(self.redis, streams, group, consumer, count, block, pending))
        pipe = self.redis.pipeline(transaction=False)
        for together in slots:
            xreadgroup(pipe, together, group, consumer, count, None, pending)
        found = [pair for reply in pipe.execute() for pair in entries_of(reply)]
        if found or block is None:
            return found
        return entries_of(xreadgroup(self.redis, slots[0], group, consumer, count, min(block, SPREAD_BLOCK), pending))

    def by_slot(self, streams: Sequence[str]) -> list[list[str]]:
        """The streams in groups one read may cover: all of them on one server, those of one slot on a
        cluster (in the order of their first stream)."""
        if not self.cluster:
            return [list(streams)] if streams else []
        slots: dict[int, list[str]] = {}
        for stream in streams:
            slots.setdefault(self.redis.keyslot(stream), []).append(stream)
        return list(slots.values())

    def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        if ids:
            self.redis.xack(stream, group, *ids)

    def add(self, stream: str, raw: bytes, maxlen: int | None = None) -> str:
        entry_id = self.redis.xadd(stream, {wire.FIELD: raw}, maxlen=maxlen, approximate=True)
        return entry_id.decode()

    def dead_letter(self, reason: str, raw: bytes | None, source: str, entry_id: str, **extra: Any) -> None:
        """Keep a message that cannot be handled, with why."""
        self.keep_dead_letter(self.dead_record(reason, raw, source, entry_id, **extra))

    def keep_dead_letter(self, record: dict[str, Any]) -> None:
        self.redis.xadd(self.keys.dlq, {wire.FIELD: wire.pack(record)}, maxlen=self.settings.dlq_maxlen)

    def dead_record(self, reason: str, raw: bytes | None, source: str, entry_id: str, **extra: Any) -> dict[str, Any]:
        """A dead letter: the message (a huge one's first MiB), why, and where it was found."""
        raw = raw or b""
        cap = self.settings.max_message_bytes
        return {
            "reason": reason,
            "raw": raw[:cap],
            "size": len(raw),
            "truncated": len(raw) > cap,
            "source": source,
            "entry": entry_id,
            **extra,
        }

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

    def renew_lease(self, table: str, name: str, ttl: float, info: dict[str, Any]) -> float:
        """Returns Redis's clock (seconds); the lease expires `ttl` after it."""
        ms = self._script(scripts.LEASE, [table], [name, int(ttl * 1000), wire.pack(info)])
        return int(ms) / 1000

    def drop_lease(self, table: str, name: str) -> None:
        self.redis.hdel(table, name, f"{name}|expires")

    def leases(self, table: str) -> tuple[float, dict[str, dict[str, Any]]]:
        """Redis's clock, and every lease of the table: name -> info plus `expires` (seconds)."""
        clock, (raw,) = self.clocked(table, lambda pipe: pipe.hgetall(table))
        return clock, parse_leases(raw)

    def worker_leases(
        self, agents: Iterable[str] | None = None, with_roster: bool = False
    ) -> tuple[float, dict[str, dict[str, Any]]]:
        """Redis's clock and the leases of `agents`' workers (of every agent on the roster if None, or
        besides them `with_roster`): worker -> info plus `expires`. A lease counts only in the hash of the
        agent its name says it serves, and that is its `agent`, whatever its info says. One call of
        READ_LEASES, which skips a hash filled past any fleet's size: a look stays bounded."""
        names = sorted({*(self.roster() if agents is None or with_roster else ()), *(agents or ())})
        tables = [self.keys.worker_leases(""), *(self.keys.worker_leases(agent) for agent in names)]

        def build(pipe: Any) -> None:
            self._read(pipe, scripts.READ_LEASES, tables, MAX_LEASE_FIELDS, MAX_LEASE_BYTES)

        ((secs, micros, *hashes),) = self._pipeline(build)
        leases: dict[str, dict[str, Any]] = {}
        for agent, flat in zip(names, hashes, strict=True):
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            leases.update(
                {k: worker_lease(agent, info) for k, info in parse_leases(raw).items() if agent_of(k) == agent}
            )
        return int(secs) + int(micros) / 1e6, leases

    def roster(self) -> list[str]:
        """The agents whose workers have started, by name (the first `MAX_AGENTS`)."""
        return roster(self.redis, self.keys)

    def submit_workflow(self, wf_id: str, fields: dict[str, Any], sign: bool = True) -> bool:
        """Write a new workflow, index it and tell the coordinators, in one round trip, all or nothing
        (MULTI/EXEC): a full Redis refuses the whole run, never leaves half of one that `list` shows
        and `status` does not know. On a cluster, in three steps (`in_order`): the index (where a
        run not there yet reads as nothing), the run (one slot, all or nothing), then the kick.

        False if the id exists (the coordinators are told again: starting is idempotent).
        Only after Redis lost its scripts (NOSCRIPT) does the create script fail alone; the
        transaction then runs again, and until it has, the run reads as unknown everywhere.
        `sign` False: the fields carry their submitter's signature already (a reaction's run)."""
        index, create, kick = self._submit_steps(wf_id, fields, sign)
        self._ensure_scripts()
        return bool(self.in_order([(index, False), (create, True), (kick, False)])[-2])

    def _ensure_scripts(self) -> None:
        """Before a transaction whose script must not fail alone: in a MULTI, a NOSCRIPT leaves the other
        commands done, and a user that may not load scripts would leave half a run. Asked
        once per connection, and again after a NOSCRIPT; a cluster answers per node, so it is not asked."""
        if self._scripts_known or self.cluster:
            return
        if not all(self.redis.script_exists(*SHAS.values())):
            self.load_scripts()  # a user that may not: Refused, "unavailable" until a coordinator has
        self._scripts_known = True

    def signed_fields(self, wf_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """A new run's fields with who asks for it and their signature over what it runs (checked before
        it starts), when this connection signs as someone."""
        if self.sender is None:
            return fields
        name, secret = self.sender
        return {**fields, "submitter": name, "submit_sig": wire.submit_signature(secret, wf_id, name, fields)}

    def _submit_steps(
        self, wf_id: str, fields: dict[str, Any], sign: bool = True
    ) -> tuple[Callable[[Any], None], Callable[[Any], None], Callable[[Any], None]]:
        """What `submit_workflow` queues, as three steps: index it, create it, kick the coordinators;
        the create script's reply comes last of the second (a coordinator draining an outbox creates
        child runs this way)."""
        keys = self.keys
        created_at = float(fields["created_at"])
        if sign:
            fields = self.signed_fields(wf_id, fields)
        args: list[Any] = []
        big = {name: fields[name] for name in _BIG_FIELDS if name in fields}
        for name, value in fields.items():
            if name not in big:
                args += [name, json.dumps(value) if name in META_JSON else value]
        kick = wire.Inbox(kind="submit", body={"wf": wf_id}).signed_as(
            self.sender, self.settings.max_message_bytes, self.good_for
        )

        def index(pipe: Any) -> None:
            pipe.zadd(keys.workflows, {wf_id: created_at}, nx=True)
            pipe.zadd(keys.running, {wf_id: created_at}, nx=True)

        def create(pipe: Any) -> None:
            for name, value in big.items():  # first: the coordinator reads them on the kick
                pipe.hsetnx(keys.wf(wf_id), name, value)
            pipe.evalsha(SHAS[scripts.CREATE], 1, keys.wf(wf_id), *args)

        return index, create, lambda pipe: pipe.xadd(keys.inbox(wf_id), {wire.FIELD: kick})

    def ask_to_submit(self, wf_id: str, fields: dict[str, Any]) -> str:
        """A new run, asked of the coordinators where this user may not write runs (a client's, a
        worker's whose reaction starts one): a `submit` carrying the run's fields, signed as its
        submitter's (checked when the run starts), which they write unless the id exists. Bounded as
        the coordinators read their inbox: 4 × max_message_bytes. Returns the inbox entry id."""
        body = {"wf": wf_id, "fields": self.signed_fields(wf_id, fields)}
        message = wire.Inbox(kind="submit", body=body)
        raw = message.signed_as(self.sender, self.settings.max_message_bytes * 4, wire.ASKED_RUN_TTL)
        return self.add(self.inbox_lane(wf_id), raw)

    def send_to_coordinators(self, message: wire.Inbox) -> None:
        """Into the coordinators' inbox; their group reads it from the start, whenever they come."""
        raw = message.signed_as(self.sender, self.settings.max_message_bytes, self.good_for)
        self.add(self.inbox_lane(message.body.get("wf")), raw)

    def inbox_lane(self, wf_id: str | None) -> str:
        """The inbox lane this process's messages about the run go to."""
        return self.keys.inbox(wf_id)
