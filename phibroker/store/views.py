"""What `watch`, `agents`, `list` and `why` read: bounded, read-only queries over the broker's connection.

Bounded reads only (COUNT, HRANDFIELD, caps chosen by the caller), never SCAN: a watcher must not slow
the broker it watches. Nothing here writes, so the read-only `watch` user of `acl generate` runs all of it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from phibroker import wire
from phibroker.engine.records import spend_of
from phibroker.errors import DecodeError
from phibroker.grants import Grant
from phibroker.keys import WORKERS_GROUP, Keys
from phibroker.store.connection import Connection, parse_leases, parse_meta, parse_value
from phibroker.store.registry import by_name, subscriptions

_ROW_FIELDS = ("name", "state", "created_at", "finished_at")  # a run's line in `list`
_PARENT_FIELDS = ("parent", "parent_task")  # set on a child run of a `workflow:` task

# The read commands the views, a client's reads (store/client.py) and the registry's send: not one
# writes, by Redis's own flags (tests/test_deploy.py asks it).
READS = (
    # READ_OWN and READ_LEASES: what agents wrote (marks, lost attempts, leases), as far as it fits. By
    # their SHA only: EVAL_RO would run any Lua, a loop that never ends too; after a Redis restart, the
    # views wait for a coordinator to load them again.
    "evalsha_ro",
    "hget",
    "hmget",
    "hgetall",
    "hlen",
    "hstrlen",
    "hrandfield",
    "smembers",
    "zrevrange",
    "zcard",
    "zmscore",
    "llen",
    "lrange",
    "memory|usage",
    "xrange",
    "xrevrange",
    "xread",
    "xlen",
    "xpending",
    "xinfo|stream",
    "xinfo|groups",
)


def newest(logs: Sequence[Sequence[tuple[bytes, Any]]], count: int) -> list[tuple[bytes, Any]]:
    """The `count` newest entries of the events log's streams (each read newest first), oldest first:
    by their ids, which each master stamps from its own clock."""

    def stamp(entry: tuple[bytes, Any]) -> tuple[int, ...]:
        return tuple(int(part) for part in entry[0].split(b"-"))

    merged = sorted((entry for entries in logs for entry in entries), key=stamp)
    return merged[-count:] if count > 0 else []


def access(keys: Keys) -> list[Grant]:
    """What the read-only views send Redis (`watch`, `status`, `list`, `agents`, `why`, `approvals`,
    `subs`, `dlq list`): read commands on read-only keys (READ_OWN among them, read-only), and the
    clock their leases are read by."""
    return [Grant(("ping", "time", *READS), (f"%R~{keys.namespace}:*",))]


class Views:
    def __init__(self, broker: Connection):
        self.broker = broker
        self.redis = broker.redis
        self.keys = broker.keys
        self.settings = broker.settings

    def overview(self, events: int, running: int, approvals: int) -> dict[str, Any]:
        """Redis's clock and the worker leases (`Connection.worker_leases`: the roster, then its agents'
        lease hashes, in two round trips); in one more, the coordinator leases,
        the newest `events` entries of the log (oldest event first), the newest running workflows, and
        up to `approvals` open approvals with the counts of both; then the subscriptions (two more)."""
        keys = self.keys
        now, workers = self.broker.worker_leases()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.coordinators)
        for stream in keys.event_logs:
            pipe.xrevrange(stream, count=max(1, events))
        pipe.zrevrange(keys.running, 0, max(1, running) - 1)
        pipe.zcard(keys.running)
        pipe.hrandfield(keys.approvals, max(1, approvals), withvalues=True)
        pipe.hlen(keys.approvals)
        replies = pipe.execute()
        logs = len(keys.event_logs)
        coordinators = replies[0]
        ids, n_running, sample, n_approvals = replies[1 + logs :]
        log: list[dict[str, Any]] = []
        for _, fields in newest(replies[1 : 1 + logs], events):
            try:
                log += wire.decode_events(fields[wire.FIELD], self.settings.max_message_bytes * 4)
            except (DecodeError, KeyError):
                continue
        limit = self.settings.max_message_bytes
        return {
            "now": now,
            "agents": workers,
            "coordinators": parse_leases(coordinators),
            "subs": by_name(subscriptions(self.redis, keys)),
            "events": log,
            "running": [i.decode() for i in ids],
            "running_total": int(n_running),
            "approvals": [wire.unpack(bytes(v), limit) for v in (sample or [])[1::2]],
            "approvals_total": int(n_approvals),
        }

    def recent_workflows(self, limit: int, states: Collection[str] = (), spend: bool = False) -> list[dict[str, Any]]:
        """Up to `limit` runs, newest first: id, name, state, created_at, finished_at, parent (`{"id",
        "task"}` of a child run's parent, else None), and with `spend` what each spent (`{"tokens",
        "cost"}`). With `states`, only runs in one of them: the index is read a page
        at a time until enough are found or it ends."""
        page = limit if not states else max(limit, 500)
        rows: list[dict[str, Any]] = []
        start = 0
        while len(rows) < limit:
            ids = [i.decode() for i in self.redis.zrevrange(self.keys.workflows, start, start + page - 1)]
            pipe = self.redis.pipeline(transaction=False)
            for wf_id in ids:
                pipe.hmget(self.keys.wf(wf_id), *_ROW_FIELDS, *_PARENT_FIELDS, *(("spent",) if spend else ()))
            for wf_id, values in zip(ids, pipe.execute() if ids else [], strict=True):
                if values[0] is None:
                    continue  # expired by retention; maintenance trims the index
                row = {n: None if v is None else parse_value(n, v) for n, v in zip(_ROW_FIELDS, values, strict=False)}
                parent, task = values[len(_ROW_FIELDS) : len(_ROW_FIELDS) + 2]
                row["parent"] = {"id": parent.decode(), "task": task.decode() if task else None} if parent else None
                if spend:
                    row["spend"] = spend_of(values[-1].decode() if values[-1] else None)
                if not states or row["state"] in states:
                    rows.append({"id": wf_id, **row})
            if len(ids) < page:
                break
            start += page
        return rows[:limit]

    def workflow_heads(self, wf_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Per workflow: its meta fields but the spec, how many unit fields it holds and how big its
        spec is, so the caller can bound what it reads next. Empty for an unknown workflow."""
        names = ("name", "state", "created_at", "finished_at", "deadline", "seq", "error", "spent")
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in wf_ids:
            pipe.hmget(self.keys.wf(wf_id), *names)
            pipe.hlen(self.keys.wf_tasks(wf_id))
            pipe.hstrlen(self.keys.wf(wf_id), "spec")
        replies = pipe.execute()
        out: list[dict[str, Any]] = []
        for i in range(0, len(replies), 3):
            values, fields, spec_size = replies[i : i + 3]
            if values[1] is None:
                out.append({})
                continue
            head = {n: parse_value(n, v) for n, v in zip(names, values, strict=True) if v is not None}
            head.update(fields=int(fields), spec_size=int(spec_size))
            out.append(head)
        return out

    def workflow_bodies(
        self, specs: Sequence[str], units: Sequence[str]
    ) -> tuple[list[str | None], list[dict[str, dict[str, Any]]]]:
        """The specs of some workflows and the unit states of others, in one round trip; the caller
        bounds their size (see `workflow_heads`)."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in specs:
            pipe.hget(self.keys.wf(wf_id), "spec")
        for wf_id in units:
            pipe.hgetall(self.keys.wf_tasks(wf_id))
        replies = pipe.execute()
        texts = [None if raw is None else raw.decode() for raw in replies[: len(specs)]]
        tables, _ = self.broker.read_units(list(zip(units, replies[len(specs) :], strict=True)))
        return texts, tables

    def stream_health(self, streams: Sequence[str]) -> list[dict[str, Any] | None]:
        """Per stream of the `workers` group (agent and subscription streams): length, entries added,
        the group's pending and lag (None where Redis cannot tell), and entries trimmed unread.
        None for a stream that does not exist yet."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xinfo_stream(stream)
            pipe.xinfo_groups(stream)
        replies = pipe.execute(raise_on_error=False)
        out: list[dict[str, Any] | None] = []
        for i in range(0, len(replies), 2):
            info, groups = replies[i], replies[i + 1]
            if isinstance(info, Exception) or isinstance(groups, Exception):
                out.append(None)
                continue
            group = next((g for g in groups if g["name"] in (WORKERS_GROUP, WORKERS_GROUP.encode())), None)
            added, length = int(info.get("entries-added") or 0), int(info["length"])
            read = int(group.get("entries-read") or 0) if group else 0
            lag = group.get("lag") if group else None
            out.append(
                {
                    "length": length,
                    "added": added,
                    "pending": int(group["pending"]) if group else 0,
                    "lag": None if lag is None else int(lag),
                    "dropped": max(0, added - length - read),
                }
            )
        return out

    def workers_lag(self, streams: Sequence[str]) -> list[int | None]:
        """Per stream, the entries the `workers` group has still to read (XINFO GROUPS' lag): all of
        them while no worker has made the group, 0 for a stream not made yet, None where Redis cannot
        tell (entries deleted past the group's last read)."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = pipe.execute(raise_on_error=False)
        out: list[int | None] = []
        for length, groups in zip(replies[::2], replies[1::2], strict=True):
            if isinstance(length, Exception):
                raise length
            if isinstance(groups, Exception):
                if length:  # the stream exists: Redis refused the look
                    raise groups
                out.append(0)  # no such stream
                continue
            group = next((g for g in groups if g["name"] in (WORKERS_GROUP, WORKERS_GROUP.encode())), None)
            if group is None:
                out.append(int(length))
            else:
                out.append(None if group.get("lag") is None else int(group["lag"]))
        return out

    def workflow_state(self, wf_id: str) -> tuple[float, dict[str, Any], dict[str, dict[str, Any]]]:
        """Redis's clock, the workflow's meta and its units (no results, no history)."""

        def build(pipe: Any) -> None:
            pipe.hgetall(self.keys.wf(wf_id))
            pipe.hgetall(self.keys.wf_tasks(wf_id))

        now, (meta, raw) = self.broker.clocked(self.keys.wf(wf_id), build)
        (units,), _ = self.broker.read_units([(wf_id, raw)])
        return now, parse_meta(meta), units

    def timer_dues(self, wf_id: str, members: Sequence[str]) -> list[float | None]:
        """When each named timer of the run is due (seconds), None where it is not set: ZMSCORE on exact
        members."""
        if not members:
            return []
        dues = self.redis.zmscore(self.keys.timer_set(wf_id), list(members))
        return [None if s is None else float(s) / 1000 for s in dues]

    def approval_requests(self, request_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        if not request_ids:
            return []
        raw: Any = self.redis.hmget(self.keys.approvals, list(request_ids))
        return [None if v is None else wire.unpack(v, self.settings.max_message_bytes) for v in raw]

    def pending_owners(self, stream: str, entry_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """For each entry id still pending in the `workers` group: its consumer, idle ms, deliveries."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(stream, WORKERS_GROUP, min=entry_id, max=entry_id, count=1)
        out: dict[str, dict[str, Any]] = {}
        for rows in pipe.execute(raise_on_error=False):
            if isinstance(rows, Exception):
                continue
            for r in rows:
                out[r["message_id"].decode()] = {
                    "consumer": r["consumer"].decode(),
                    "idle": r["time_since_delivered"],
                    "deliveries": r["times_delivered"],
                }
        return out

    def find_dispatches(self, stream: str, dispatches: dict[str, float], count: int = 200) -> dict[str, str]:
        """The stream entries of dispatches (id -> when it was dispatched, Redis seconds): read from a
        second before the earliest, at most `count` entries. Dispatch id -> entry id, where found."""
        if not dispatches:
            return {}
        start = max(0, int(min(dispatches.values()) * 1000) - 1000)
        found: dict[str, str] = {}
        rows: Any = self.redis.xrange(stream, min=f"{start}-0", count=count)
        for entry_id, fields in rows:
            try:
                message = wire.TaskMessage.decode(fields[wire.FIELD], self.settings.max_message_bytes)
            except (DecodeError, KeyError):
                continue
            if message.id in dispatches:
                found[message.id] = entry_id.decode()
        return found
