"""What a worker does with the broker: mark attempts started, settle results, give work back, hear stops."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

from redis.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from phibroker import wire
from phibroker.engine.state import SEP, mark_text, overlay_marks, unpack_group
from phibroker.errors import BrokerUnavailable, DecodeError
from phibroker.grants import BASICS, CONSUMER, Grant
from phibroker.keys import WORKERS_GROUP, Keys
from phibroker.store import registry, scripts
from phibroker.store.connection import SHAS, Connection, Entry, Refused, refusals

_NOTICE_LIMIT = 4096  # a stop notice is three ids; anything bigger on the channel is not one


class StopNotice(NamedTuple):
    """A running unit must stop: published by the coordinator that committed the stop, after the commit."""

    wf: str
    unit: str
    dispatch: str

    def encode(self) -> bytes:
        return wire.pack(list(self))

    @classmethod
    def decode(cls, raw: bytes) -> StopNotice | None:
        """The notice, or None for anything else found on the channel."""
        try:
            value = wire.unpack(raw, _NOTICE_LIMIT)
        except DecodeError:
            return None
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
            return None
        return cls(*value)


class StopFeed:
    """One subscription to an agent's stop notices. Pub/sub keeps nothing for a subscriber that is away,
    so `get` says "subscribed" after each (re)subscription (redis-py reconnects and subscribes again by
    itself): whatever was published before then must be looked up in the units' states."""

    def __init__(self, client: Any, channel: str):
        self.channel = channel
        self._pubsub = client.pubsub()
        try:
            with refusals():
                self._pubsub.subscribe(channel)
        except Exception:
            self._pubsub.close()
            raise

    def get(self, timeout: float) -> StopNotice | Literal["subscribed"] | None:
        """The next notice, "subscribed", or None when nothing came within `timeout` seconds.

        Raises BrokerUnavailable when the Redis user may not subscribe (ACL users made before stop notices),
        Refused when Redis says "not now" (a busy script: pub/sub is not served by the client's commands)."""
        try:
            with refusals():
                message = self._pubsub.get_message(timeout=timeout)
        except NoPermissionError as exc:
            raise BrokerUnavailable(
                f"may not subscribe to {self.channel} ({exc}): run `phibroker acl generate` again for these users"
            ) from None
        if message is None:
            return None
        if message["type"] == "subscribe":
            return "subscribed"
        if message["type"] == "message":
            return StopNotice.decode(message["data"])
        return None

    def close(self) -> None:
        self._pubsub.close()


class UnitState(NamedTuple):
    """What a worker's heartbeat reads to tell whether a running attempt is still wanted."""

    workflow: str | None  # the workflow's state
    state: str | None  # the unit's
    dispatch: str | None  # the dispatch id the unit runs under now
    stop: str | None  # why the unit was asked to stop, if it was


@contextmanager
def groups_made_again(connection: Connection, streams: Sequence[str], group: str) -> Iterator[None]:
    """A consumer group Redis no longer has (a restart from data older than the group) is made again,
    reading its stream from the start, and the call fails as Refused: loops back off and try again."""
    try:
        yield
    except ResponseError as exc:
        if not str(exc).startswith("NOGROUP"):
            raise
        connection._groups.difference_update(streams)
        for stream in streams:
            connection.ensure_group(stream, group)
        raise Refused("NOGROUP", f"{exc}; made again") from exc


def server_run_id(client: Any) -> str | None:
    """The Redis server's run id, new at each start: a change says it restarted and may have lost its
    last writes (an older AOF, a lagging replica). On a cluster, the run ids of all its masters: a
    master restarted or failed over (a replica promoted may lack the last writes) changes it too.
    None where the user may not ask (ACL without INFO) or the server cannot say (the embedded broker
    has no INFO)."""
    try:
        if isinstance(client, RedisCluster):
            infos = client.info("server", target_nodes=RedisCluster.PRIMARIES)
            infos = {"": infos} if "run_id" in infos else infos  # one master: its reply as it is
            return ",".join(sorted(str(info.get("run_id") or "") for info in infos.values())) or None
        return str(client.info("server").get("run_id") or "") or None
    except ResponseError:  # NOPERM, or an unknown command; a refusal (Refused) is a ConnectionError
        return None


def access(keys: Keys, agent: str, subscriptions: Iterable[str] = ()) -> list[Grant]:
    """What the workers of `agent` send Redis: they consume its task lanes and its subscriptions'
    streams (own keys: `AGENT.fn`, the default names, or those named), keep their seen-sets and hear
    its stop notices; mark the attempts they start in their agent's own marks hash of a run (START),
    and its lost attempts; read a run's meta and tasks hash, never writing them; append to the agent's
    own output stream of a run and count its bytes (OUTPUT); append, to the agent's own inbox lanes
    only, its results, events, dead letters and requests (the coordinators publish, route and keep
    them); hold their leases; and register their subscriptions. Scripts are called, never loaded."""
    own = [f"~{keys.agent_tasks(agent)}", f"~{keys.agent_bulk(agent)}", f"~{keys.sub(agent + '.')}*"]
    for name in subscriptions:
        own += [f"~{keys.sub(name)}", f"~{keys.sub_seen(name)}"]
    marks, lost = f"~{keys.wf_marks('*', agent)}", f"~{keys.wf_lost('*', agent)}"
    run_output = keys.wf_output("*")
    output, used = f"~{keys.wf_agent_output('*', agent)}", f"~{keys.wf_agent_output_bytes('*', agent)}"
    lanes = [lane for shard in range(len(keys.inbox_lanes)) for lane in keys.agent_lanes(agent, shard)]
    return [
        # `seen` and `mark_seen` keep the seen-sets; `stop_notices` subscribes to its own channel only
        Grant(
            (*BASICS, *CONSUMER, "zmscore", "zadd", "zremrangebyscore", "subscribe"),
            tuple(own),
            (keys.agent_stops(agent),),
        ),
        # START (`start_many`) on its own marks and lost attempts, each written by one command only, so
        # neither can be made a key of another type; `unit_runs` reads the marks
        Grant(("evalsha",), (marks, lost)),
        Grant(("hget", "hset", "hmget", "hstrlen"), (marks,)),
        Grant(("rpush",), (lost,)),
        # OUTPUT (`append_output`): the agent's own output stream of a run and the bytes it holds, kept
        # as long as the run's output stream, which it reads only (EVALSHA asks read and write on the
        # keys it declares; the script's commands are checked against the grants here)
        Grant(("evalsha",), (f"~{run_output}", output, used)),
        Grant(("exists", "pttl"), (f"%R~{run_output}",)),
        Grant(("xadd", "pexpire"), (output,)),
        Grant(("get", "set", "pexpire"), (used,)),
        # START reads the tasks hash; `unit_states` and `unit_runs` read it and the run's state
        Grant(("hget", "hmget"), (f"%R~{keys.wf('*')}", f"%R~{keys.wf_tasks('*')}")),
        # `settle`, `relay`, `dead_letter`, `ask_to_submit`, `send_to_coordinators`: its own lanes only
        Grant(("xadd",), tuple(f"%W~{lane}" for lane in lanes)),
        # leases: LEASE and a stop's drop, in the agent's own hash only; reclaim's look at the holders of
        # pending entries (a subscription's stream may be another agent's too) and hand_over's
        Grant(("evalsha", "hexists", "hlen", "hset", "hdel"), (f"~{keys.worker_leases(agent)}",)),
        Grant(("evalsha_ro", "time", "hlen", "hgetall", "memory|usage"), (f"%R~{keys.worker_leases('*')}",)),
        *registry.access(keys, agent),
    ]


class WorkerStore(Connection):
    """What a worker does with the broker: mark attempts started, settle results, give work back."""

    agent = ""  # whose workers these are: what they send the coordinators goes to its lanes (`serve`)

    def serve(self, agent: str) -> None:
        self.agent = agent

    def server_run_id(self) -> str | None:
        return server_run_id(self.redis)

    def read_groups(
        self, streams: Sequence[str], group: str, consumer: str, count: int, block: float | None, pending: bool = False
    ) -> list[tuple[str, Entry]]:
        with groups_made_again(self, streams, group):
            return super().read_groups(streams, group, consumer, count, block, pending)

    def pending_of(self, stream: str, group: str, count: int = 1000) -> list[dict[str, Any]]:
        with groups_made_again(self, [stream], group):
            return super().pending_of(stream, group, count)

    def owned(self, pairs: Sequence[tuple[str, str]], group: str, consumer: str) -> list[bool]:
        """For each (stream, entry id): is it still pending on `consumer`? Another worker may have
        claimed it, or a restarted Redis forgotten its delivery."""
        if not pairs:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_id in pairs:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1, consumername=consumer)
        owned = []
        for rows in pipe.execute(raise_on_error=False):
            if isinstance(rows, Exception) and "NOGROUP" not in str(rows):
                raise rows  # out of reach or saying "not now": asked again, never taken for "not ours"
            owned.append(bool(rows) and not isinstance(rows, Exception))
        return owned

    def settle(
        self,
        results: Mapping[str, Sequence[bytes]],
        events: list[dict[str, Any]],
        acks: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Results (the agent's lane -> entries), any events waiting to be published, and the acks of
        the settled tasks (stream -> entry ids), in one round trip. The events go first, to the lanes of
        their runs (a task's start is published before its result can end the run).

        One transaction (MULTI/EXEC): a full Redis refuses a write as it is queued and EXEC then does
        nothing, so a task is never acked with its result nowhere (a plain pipeline would take the XACK
        and refuse the XADD). On a cluster, step by step (`in_order`): the entries, then the acks once
        they are stored. A group Redis lost is made again and the call raises Refused: the results are
        sent again with the acks, and the coordinator drops the copies."""
        acked = [stream for stream, ids in (acks or {}).items() if ids]
        entries: dict[str, list[bytes]] = {}
        for lane, raw in self._event_entries(events):
            entries.setdefault(lane, []).append(raw)
        for lane, raws in results.items():
            entries.setdefault(lane, []).extend(raws)

        def sent(pipe: Any) -> None:
            for lane, raws in entries.items():
                for raw in raws:
                    pipe.xadd(lane, {wire.FIELD: raw})

        def acknowledged(pipe: Any) -> None:
            for stream in acked:
                pipe.xack(stream, WORKERS_GROUP, *(acks or {})[stream])

        with groups_made_again(self, acked, WORKERS_GROUP):
            self.in_order([(sent, False), (acknowledged, False)])

    def relay(self, events: list[dict[str, Any]]) -> None:
        """Events for the coordinators to publish (into the log, the runs' output, subscriptions and
        triggers): an agent's user appends only to its own lanes."""
        if events:
            self.settle({}, events)

    def _event_entries(self, events: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
        """`events` messages, one per run's lane and under the size limit, signed as the agent's."""
        per_lane: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            per_lane.setdefault(self.inbox_lane(event.get("workflow")), []).append(event)
        limit = self.settings.max_message_bytes
        out = []
        for lane, batch in per_lane.items():
            chunk: list[dict[str, Any]] = []
            size = 0
            for event in batch:
                weight = len(wire.pack(event))
                if chunk and (size + weight > limit or len(chunk) == wire.SENT_EVENTS):
                    out.append((lane, self._events_message(chunk)))
                    chunk, size = [], 0
                chunk.append(event)
                size += weight
            out.append((lane, self._events_message(chunk)))
        return out

    def _events_message(self, events: list[dict[str, Any]]) -> bytes:
        message = wire.Inbox(kind="events", body={"events": events}, agent=self.agent)
        return message.signed_as(self.sender, self.settings.max_message_bytes * 4, self.good_for)

    def dead_letter(self, reason: str, raw: bytes | None, source: str, entry_id: str, **extra: Any) -> None:
        """A message this worker cannot handle, for the coordinators to keep in the dead letters: its
        first MiB, as `Connection.dead_letter` keeps it."""
        message = wire.Inbox(
            kind="dead", body=self.dead_record(reason, raw, source, entry_id, **extra), agent=self.agent
        )
        self.add(
            self.inbox_lane(None), message.signed_as(self.sender, self.settings.max_message_bytes * 4, self.good_for)
        )

    def inbox_lane(self, wf_id: str | None, bulk: bool = False) -> str:
        """The agent's lane (or bulk lane) of the run's inbox shard: the one place its workers append."""
        return self.keys.agent_inbox(self.agent, wf_id, bulk)

    def append_output(self, wf_id: str, entries: Sequence[tuple[str, bytes]], limit: int) -> tuple[int, int]:
        """Append (kind, blob) entries to the agent's output stream of the run at once; chunks and log
        records count against `limit` bytes (the agent's in the run). Returns (1 added | 0 over the limit
        | -1 no such run, bytes used)."""
        args: list[Any] = [limit]
        for kind, blob in entries:
            args += [kind, blob]
        keys = [
            self.keys.wf_output(wf_id),
            self.keys.wf_agent_output(wf_id, self.agent),
            self.keys.wf_agent_output_bytes(wf_id, self.agent),
        ]
        added, used = self._script(scripts.OUTPUT, keys, args)
        return int(added), int(used)

    def requeue(self, stream: str, group: str, entries: Sequence[Entry]) -> None:
        """Give unstarted entries back: copies at the stream's end and the originals acked, atomically."""
        pipe = self.redis.pipeline(transaction=True)
        for entry in entries:
            if entry.raw is not None:
                pipe.xadd(stream, {wire.FIELD: entry.raw})
        pipe.xack(stream, group, *[e.id for e in entries])
        pipe.execute()

    def unit_states(self, pairs: Sequence[tuple[str, str]]) -> list[UnitState]:
        """The workflow's state and the unit's state, dispatch id and stop reason, for each (workflow, unit)."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id, unit in pairs:
            pipe.hget(self.keys.wf(wf_id), "state")
            pipe.hmget(self.keys.wf_tasks(wf_id), f"{unit}|state", f"{unit}|dispatch", f"{unit}|stop")
        replies = pipe.execute()
        out = []
        for i in range(0, len(replies), 2):
            wf_state, (state, dispatch, stop) = replies[i], replies[i + 1]
            out.append(
                UnitState(
                    wf_state.decode() if wf_state else None,
                    state.decode() if state else None,
                    dispatch.decode().split(SEP, 1)[0] if dispatch else None,
                    stop.decode() if stop else None,
                )
            )
        return out

    def stop_notices(self, agent: str) -> StopFeed:
        """Subscribe to the agent's stop notices (a connection of its own); raises if Redis is away."""
        return StopFeed(self.redis, self.keys.agent_stops(agent))

    def unit_runs(self, agent: str, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        """The attempt and the run (token, started, entry, worker) each (workflow, unit) of `agent` holds
        now: what a worker reclaiming a unit's entry records about the run it replaces."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id, unit in pairs:
            pipe.hget(self.keys.wf_tasks(wf_id), f"{unit}|dispatch")
            pipe.hget(self.keys.wf_marks(wf_id, agent), unit)
        replies = pipe.execute()
        out = []
        for (_, unit), dispatch, mark in zip(pairs, replies[::2], replies[1::2], strict=True):
            record = {"state": "running", **unpack_group("dispatch", (dispatch or b"").decode(errors="replace"))}
            overlay_marks({unit: record}, {agent: {unit: mark_text(mark)}})
            out.append(record)
        return out

    def start_many(
        self, agent: str, consumer: str, batches: dict[str, list[tuple[str, str, str, bytes]]]
    ) -> dict[str, list[int]]:
        """Mark attempts started (see scripts.START for the tokens) for several workflows, one round trip."""
        order = list(batches)

        calls = [(wf_id, batches[wf_id][n : n + 1000]) for wf_id in order for n in range(0, len(batches[wf_id]), 1000)]

        def build(pipe: Any) -> None:
            for wf_id, batch in calls:  # START takes up to 1,000 messages a call
                args: list[Any] = [self.keys.wf_tasks(wf_id), agent, consumer]
                for unit, dispatch, entry, lost in batch:
                    args += [unit, dispatch, entry, lost]
                keys = [self.keys.wf_marks(wf_id, agent), self.keys.wf_lost(wf_id, agent)]
                pipe.evalsha(SHAS[scripts.START], len(keys), *keys, *args)

        tokens: dict[str, list[int]] = {wf_id: [] for wf_id in order}
        for (wf_id, _), reply in zip(calls, self._pipeline(build), strict=True):
            tokens[wf_id] += [int(t) for t in reply]
        return tokens

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
