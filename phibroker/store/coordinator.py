"""What a coordinator does with the broker: poll its inbox and timers, commit transitions, drain outboxes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from phibroker import wire
from phibroker.engine.state import WF_TERMINAL, Transition
from phibroker.grants import BASICS, CONSUMER, Grant
from phibroker.keys import WORKERS_GROUP, Keys
from phibroker.store import registry, scripts
from phibroker.store.connection import (
    META_JSON,
    SHAS,
    Connection,
    Entry,
    Route,
    Step,
    entries_of,
    id_order,
    next_id,
    parse_meta,
    xreadgroup,
)
from phibroker.store.worker import StopNotice, groups_made_again, server_run_id


def _claimed(reply: list[Any]) -> tuple[float, float | None, list[str]]:
    """CLAIM_TIMERS's reply: Redis's clock (s), the next due time (s, None: no timer), the claimed timers."""
    next_due = float(reply[1])
    return int(reply[0]) / 1e6, None if next_due < 0 else next_due / 1000, [m.decode() for m in reply[2:]]


def access(keys: Keys) -> list[Grant]:
    """What coordinators send Redis: every workflow's keys and their own tables (the inbox and who
    leases its shards, timers, indexes, approvals, their leases); append only into agent lanes,
    subscription streams, the events log and the dead letters; the lanes' groups, looked at and
    trimmed; reads of the registries; stop notices to every agent. They load phibroker's scripts
    (`load_scripts`): after a Redis restart the other users wait for them. No worker lease but to
    forget a long-dead one."""
    own = (
        f"~{keys.namespace}:wf:*",
        f"~{keys.inbox_owners}",
        *(f"~{lane}" for lane in keys.inbox_lanes),
        *(f"~{lane}" for shard in range(len(keys.inbox_lanes)) for lane in keys.agent_lanes("*", shard)),
        *(f"~{timers}" for timers in keys.timer_sets),
        f"~{keys.running}",
        f"~{keys.workflows}",
        f"~{keys.approvals}",
        f"~{keys.coordinators}",
        f"%W~{keys.dlq}",
    )
    lanes = (f"~{keys.agent_tasks('*')}", f"~{keys.agent_bulk('*')}")
    return [
        Grant(
            (
                *BASICS,
                "script|exists",
                "script|load",
                *CONSUMER,
                "evalsha",
                "evalsha_ro",  # READ_OWN and READ_LEASES
                "exists",
                "expire",
                "persist",  # a retried run keeps its keys again (APPLY), and waiters wait for its next end
                "del",
                "hget",
                "hmget",
                "hgetall",
                "hset",
                "hsetnx",
                "hexists",
                "hdel",
                "hlen",
                "hstrlen",  # APPLY reads a worker's mark only if it is short enough to be one
                "hincrby",
                "rpush",
                "llen",  # workers' lost attempts, read with a run (`load_runs`, as far as they fit) and
                "memory|usage",  # trimmed by APPLY
                "lrange",
                "ltrim",
                "zadd",
                "zrem",
                "zrange",
                "zrevrange",
                "zrangebyscore",
                "xlen",
                "xinfo|groups",
                "xrevrange",
                "xtrim",
                "publish",
            ),
            own,
            (keys.agent_stops("*"),),  # stop notices to every agent's workers
        ),
        # Dispatches (XADD_MANY's XADDs), events and their routed copies: append only.
        Grant(
            ("xadd",),
            (
                f"%W~{keys.agent_tasks('*')}",
                f"%W~{keys.agent_bulk('*')}",
                f"%W~{keys.sub('*')}",
                *(f"%W~{log}" for log in keys.event_logs),
            ),
        ),
        # XADD_MANY, a dispatch batch in one call (EVALSHA asks read and write on the keys it declares,
        # but the script's own XADDs are checked against the grant above: no reads); each lane's group
        # made before its first dispatch; trimming what workers acked (`trim_acked`), and finding the
        # tasks nobody holds (`lane`, `entries`: which dispatches are pending or unread).
        Grant(("evalsha", "xgroup|create", "xlen", "xinfo|groups", "xpending", "xtrim", "xrange"), lanes),
        # the workers' leases read (READ_LEASES), and long-dead workers' forgotten
        Grant(
            ("evalsha_ro", "time", "hlen", "hgetall", "memory|usage", "hdel"),
            (f"~{keys.worker_leases('*')}",),
        ),
        Grant(("set", "get"), (f"~{keys.applied('*', '*')}",)),  # the control messages applied, until they expire
        # the log's age and size bounds
        Grant(("xtrim", "memory|usage", "xlen"), tuple(f"%W~{log}" for log in keys.event_logs)),
        *registry.access(keys),
    ]


class CoordinatorStore(Connection):
    """What a coordinator does with the broker: poll its inbox and timers, commit transitions, drain outboxes."""

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
            cut = next_id(last.decode() if isinstance(last, bytes) else str(last))
            if int(info.get("pending") or 0):
                oldest = self.redis.xpending(stream, group)["min"]  # None if all were acked meanwhile
                if oldest is not None:
                    cut = min(cut, oldest.decode() if isinstance(oldest, bytes) else str(oldest), key=id_order)
            return int(self.redis.xtrim(stream, minid=cut, approximate=True))
        except ResponseError:
            return 0  # the stream or group went away meanwhile

    def trim_events(self, oldest_ms: int, max_bytes: int) -> None:
        """Bound the events log by age (entries before `oldest_ms`, Redis's clock) and by size: past
        `max_bytes` (sampled, MEMORY USAGE; each of its streams an even share), its oldest entries go in
        proportion. Nobody holds entries of it pending (it has no groups), so trimming loses nothing a
        reader owes an ack for."""
        share = max_bytes // len(self.keys.event_logs)
        for events in self.keys.event_logs:
            self.redis.xtrim(events, minid=f"{oldest_ms}-0", approximate=True)
            try:
                used = int(self.redis.memory_usage(events, samples=16) or 0)
            except ResponseError:
                continue  # a broker without MEMORY (the embedded one): the count cap on XADD still holds
            if used > share:
                length = int(self.redis.xlen(events))
                self.redis.xtrim(events, maxlen=int(length * share / used), approximate=True)

    def forget_expired_runs(self, created_before: float, start: int, count: int) -> tuple[int, int]:
        """Drop from the `workflows` index (what `list` reads) the runs whose keys expired: of those
        created before `created_before`, `count` from the `start`-th. Returns (looked at, dropped).
        Runs that old but still there (a long run, or one kept by a retry) stay."""
        ids = self.redis.zrangebyscore(self.keys.workflows, "-inf", f"({created_before}", start=start, num=count)
        if not ids:
            return 0, 0
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in ids:
            pipe.hexists(self.keys.wf(wf_id.decode()), "state")
        gone = [wf_id for wf_id, there in zip(ids, pipe.execute(), strict=True) if not there]
        if gone:
            self.redis.zrem(self.keys.workflows, *gone)
        return len(ids), len(gone)

    def load_runs(
        self, wf_ids: Sequence[str]
    ) -> list[tuple[dict[str, Any], dict[str, dict[str, Any]], dict[bytes, bytes], dict[str, tuple[int, list[bytes]]]]]:
        """Meta (parsed), units (with their workers' start marks on), raw results and the lost attempts
        of live units' agents (`Connection.read_units`) of several workflows: one round trip, and one
        more for the marks of live units."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in wf_ids:
            pipe.hgetall(self.keys.wf(wf_id))
            pipe.hgetall(self.keys.wf_tasks(wf_id))
            pipe.hgetall(self.keys.wf_results(wf_id))
        replies = pipe.execute()
        tables = [(wf_id, replies[3 * n + 1]) for n, wf_id in enumerate(wf_ids)]
        units, lost = self.read_units(tables, with_lost=True)
        return [(parse_meta(replies[3 * n]), units[n], replies[3 * n + 2], lost[n]) for n in range(len(wf_ids))]

    def commit(
        self,
        transitions: Sequence[tuple[str, int, Transition]],
        relayed: list[dict[str, Any]] | None = None,
        route: Route | None = None,
    ) -> list[int]:
        """Commit transitions, one script call each, pipelined: the new version, or -1 where the
        workflow's version moved on since it was read (nothing was written then). `relayed`: events
        workers sent (see `relay`), published ahead of the commits in the same round trip: a run's
        output stream is in its slot, whose commands a cluster's pipeline keeps in order too, and the
        commits' own events go to the log later, with the drain.

        The dispatches ride in the same round trip, right behind the scripts: a worker can only see
        them after the commit, and those of a transition that lost the version race name a dispatch
        id the workflow never recorded, so the start script refuses them. They stay in the outbox
        too, so a crash before the drain re-sends them (workers drop the copies by dispatch id).

        On a cluster a pipeline keeps no order between nodes (a worker could start a task before the
        commit that made it is stored): the dispatches of the transitions that passed go once the
        commits have returned, a second round trip."""
        ttl = int(self.settings.retention)
        calls = []
        for wf_id, version, tx in transitions:
            args: list[Any] = [version, len(tx.guards)]
            for unit, (agent, dispatch, token) in tx.guards.items():
                args += [self.keys.wf_marks(wf_id, agent), unit, dispatch, token]
            for pairs in (tx.fields(), tx.meta):
                args.append(len(pairs))
                for name, value in pairs.items():
                    args += [name, json.dumps(value) if name in META_JSON else value]
            args.append(len(tx.results))
            for unit, raw in tx.results.items():
                args += [unit, raw]
            args.append(len(tx.history))
            args += tx.history
            args.append(len(tx.lost_moved))
            for agent, moved in tx.lost_moved.items():
                args += [self.keys.wf_lost(wf_id, agent), moved]
            agents = tx.marked_agents()
            outbox = wire.pack(tx.outbox()) if tx.has_outbox else b""
            args += [tx.id, outbox, "1" if tx.finished else "0", ttl, "1" if tx.reopened else "0"]
            args.append(wire.encode_events(tx.events) if tx.events else b"")  # into the run's output stream
            calls.append((self.keys.wf_keys(wf_id, agents), args))

        ahead = 0  # replies of the relayed events' commands, before the commits'

        def build(pipe: Any) -> None:
            nonlocal ahead
            ahead = self._relay(pipe, relayed, route) if relayed else 0
            for keys, args in calls:
                pipe.evalsha(SHAS[scripts.APPLY], len(keys), *keys, *args)
            if not self.cluster:
                self._dispatch(pipe, self._by_stream([(tx.dispatches, tx.bulk) for _, _, tx in transitions]))

        versions = [int(v) for v in self._pipeline(build)[ahead : ahead + len(calls)]]
        if self.cluster:
            passed = [(tx.dispatches, tx.bulk) for (_, _, tx), v in zip(transitions, versions, strict=True) if v >= 0]
            self._pipeline(lambda pipe: self._dispatch(pipe, self._by_stream(passed)))
        return versions

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
                pipe.evalsha(SHAS[scripts.XADD_MANY], 1, stream, wire.FIELD, *raws[start : start + 1000])

    def versions(self, wf_ids: Sequence[str]) -> list[int | None]:
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in wf_ids:
            pipe.hget(self.keys.wf(wf_id), "version")
        return [None if v is None else int(v) for v in pipe.execute()]

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
        self,
        items: Sequence[tuple[str, str, dict[str, Any]]],
        dispatched: bool = False,
        fired: Sequence[str] = (),
        route: Route | None = None,
    ) -> None:
        """Carry out outbox entries (wf id, entry id, decoded outbox) and remove them, atomically.

        `dispatched`: the commit already sent the dispatches. Dispatches carry their id, so a redrive
        after a crash only makes duplicates that consumers drop. `fired`: timers handled by these
        transitions, removed before the timers they set (which may be the same ones, set again).
        `route`: where the outboxes' events go beyond the log.
        """
        streams = (
            {}
            if dispatched
            else self._by_stream([(box.get("dispatches") or (), bool(box.get("bulk"))) for _, _, box in items])
        )

        children = [  # a `workflow:` task's child runs: created once (indexed, created, then kicked)
            self._submit_steps(child_id, fields)
            for _, _, box in items
            for child_id, fields in box.get("child_runs") or ()
        ]
        stops = [
            (self.keys.agent_stops(agent), StopNotice(wf_id, unit, dispatch).encode())
            for wf_id, _, box in items
            for agent, unit, dispatch in box.get("stops") or ()
        ]

        def carried_out(pipe: Any) -> None:
            for timers, members in self._by_timer_set(fired).items():
                pipe.zrem(timers, *members)
            self._dispatch(pipe, streams)
            for wf_id, _, box in items:
                self._carry_out(pipe, wf_id, box, route)
            for _, _, kick in children:
                kick(pipe)

        def removed(pipe: Any) -> None:
            for wf_id, entry_id, _ in items:
                pipe.hdel(self.keys.wf_outbox(wf_id), entry_id)

        if not self.cluster:
            # One transaction: the effects and the removal of their outbox entries happen together or
            # not at all. A Redis that refuses a write (out of memory) refuses it as it is queued and
            # EXEC then does nothing, so no entry goes with its effects refused; and a coordinator
            # killed midway leaves no entry carried out but still there, for the next one to carry out again.
            def everything(pipe: Any) -> None:
                for index, create, _ in children:
                    index(pipe)
                    create(pipe)
                carried_out(pipe)
                for channel, notice in stops:
                    pipe.publish(channel, notice)
                removed(pipe)

            self._pipeline(everything, transaction=True)
            return

        # A cluster: the same order, a step at a time (a pipeline keeps none between nodes, a
        # transaction holds one slot). Killed or refused midway, the entries stay, for a redrive.
        def indexed(pipe: Any) -> None:
            for index, _, _ in children:
                index(pipe)

        created: list[Step] = [(create, True) for _, create, _ in children]  # each run in its own slot
        self.in_order([(indexed, False), *created, (carried_out, False)])
        for channel, notice in stops:  # pub/sub does not go in a cluster's pipelines
            self.redis.publish(channel, notice)
        self.in_order([(removed, False)])

    def _carry_out(self, pipe: Any, wf_id: str, box: dict[str, Any], route: Route | None) -> None:
        """An outbox's effects other than dispatches, child runs and stop notices: events, messages to
        other runs, timers, approvals, the running index.

        Stop notices go out on the agents' channels after the commit, so a worker that hears one and
        reads the unit's state finds the stop already written. A redrive publishes them again: a worker
        hearing a stop twice, or for an attempt it no longer runs, does nothing more."""
        keys = self.keys
        if box.get("events"):
            self._publish(pipe, box["events"], route)
        for sent in box.get("signals") or ():  # a handler's ctx.signal, to whichever run it names
            body = {k: sent.get(k) for k in ("wf", "name", "data", "sender", "id")}
            inbox = wire.Inbox(kind="signal", body=body)
            raw = inbox.signed_as(self.sender, self.settings.max_message_bytes, self.good_for)
            pipe.xadd(keys.inbox(body["wf"]), {wire.FIELD: raw})
        for raw in box.get("inbox") or ():  # to other runs: a child's end, a parent's cancel
            pipe.xadd(*self.to_inbox(raw))
        if box.get("timers_add"):
            pipe.zadd(keys.timer_set(wf_id), {m: int(due * 1000) for m, due in box["timers_add"].items()})
        if box.get("timers_del"):
            pipe.zrem(keys.timer_set(wf_id), *box["timers_del"])
        if box.get("approvals_set"):
            pipe.hset(keys.approvals, mapping=box["approvals_set"])
        if box.get("approvals_del"):
            pipe.hdel(keys.approvals, *box["approvals_del"])
        if box.get("finished"):
            pipe.zrem(keys.running, wf_id)
        elif box.get("reopened"):
            pipe.zadd(keys.running, {wf_id: box.get("created") or 0})

    def relay(self, events: list[dict[str, Any]], route: Route | None) -> None:
        """Events workers sent (their agents' users append only to their own lanes): into their runs'
        output streams (an entry per run), the log, and where `route` sends copies."""

        def build(pipe: Any) -> None:
            self._relay(pipe, events, route)

        self._pipeline(build)

    def _relay(self, pipe: Any, events: list[dict[str, Any]], route: Route | None) -> int:
        return self._record_events(pipe, events) + self._publish(pipe, events, route)

    def _record_events(self, pipe: Any, events: list[dict[str, Any]]) -> int:
        """The events into their runs' output streams (an entry per run, none for a run already gone, so
        no stream outlives its run); how many calls."""
        per_run: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            if event.get("workflow"):
                per_run.setdefault(str(event["workflow"]), []).append(event)
        for wf_id, batch in per_run.items():
            fields = {"k": "event", "m": wire.encode_events(batch)}
            pipe.xadd(self.keys.wf_output(wf_id), fields, nomkstream=True)
        return len(per_run)

    def _publish(self, pipe: Any, events: list[dict[str, Any]], route: Route | None) -> int:
        """Into the events log (an entry per stream of it: each run's into its own), and where `route`
        sends copies (subscription streams, trigger starts); how many commands."""
        logs = self.keys.event_logs
        maxlen = max(1, self.settings.events_maxlen // len(logs))
        per_log: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            per_log.setdefault(self.keys.event_log(event.get("workflow")), []).append(event)
        for log, batch in per_log.items():
            pipe.xadd(log, {wire.FIELD: wire.encode_events(batch)}, maxlen=maxlen, approximate=True)
        routed = route(events) if route is not None else []
        for stream, raw, cap in routed:
            raw = self.signed(raw) if stream in self.keys.inbox_lanes else raw  # a trigger start
            pipe.xadd(stream, {wire.FIELD: raw}, maxlen=cap, approximate=True)
        return len(per_log) + len(routed)

    def run_exists(self, wf_id: str) -> bool:
        return bool(self.redis.exists(self.keys.wf(wf_id)))

    def running_chunk(self, start: int, count: int) -> list[str]:
        return [wf_id for wf_id, _ in self.running_since(start, count)]

    def running_since(self, start: int, count: int) -> list[tuple[str, float]]:
        """A chunk of the running index, oldest first: each run's id and when it was created."""
        rows = self.redis.zrange(self.keys.running, start, start + count - 1, withscores=True)
        return [(wf_id.decode(), float(created)) for wf_id, created in rows]

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

    def server_run_id(self) -> str | None:
        return server_run_id(self.redis)

    def pending_of(self, stream: str, group: str, count: int = 1000) -> list[dict[str, Any]]:
        with groups_made_again(self, [stream], group):
            return super().pending_of(stream, group, count)

    def unit_tables(self, wf_ids: Sequence[str]) -> list[tuple[str | None, str | None, int, dict[str, dict[str, Any]]]]:
        """Per workflow: its spec text, its state, how many outbox entries wait, and its units with their
        start marks (what the reconciler reads; results and history stay where they are)."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id in wf_ids:
            pipe.hmget(self.keys.wf(wf_id), "spec", "state")
            pipe.hlen(self.keys.wf_outbox(wf_id))
            pipe.hgetall(self.keys.wf_tasks(wf_id))
        replies = pipe.execute()
        units, _ = self.read_units([(wf_id, replies[3 * n + 2]) for n, wf_id in enumerate(wf_ids)])
        out = []
        for n, table in enumerate(units):
            spec, wf_state = replies[3 * n]
            out.append(
                (spec.decode() if spec else None, wf_state.decode() if wf_state else None, replies[3 * n + 1], table)
            )
        return out

    def lane(self, stream: str, group: str, limit: int) -> tuple[set[str], str] | None:
        """A task lane as its group sees it: the ids of up to `limit` pending entries, and the last
        entry delivered (those after it are unread). None when the lane or its group is not there."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xinfo_groups(stream)
            pipe.xpending_range(stream, group, min="-", max="+", count=limit)
            groups, rows = pipe.execute()
        except ResponseError:
            return None
        info = next((g for g in groups if g["name"] in (group, group.encode())), None)
        if info is None:
            return None
        last = info["last-delivered-id"]
        return {r["message_id"].decode() for r in rows}, last.decode() if isinstance(last, bytes) else str(last)

    def entries(self, stream: str, ids: Iterable[str]) -> list[Entry]:
        """The entries of `stream` with these ids (one read each, in one round trip); gone ones left out."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        return [Entry(eid.decode(), fields.get(wire.FIELD)) for reply in pipe.execute() for eid, fields in reply]

    def entries_after(self, stream: str, after: str, limit: int) -> list[Entry]:
        """Up to `limit` entries of `stream` past the id `after`."""
        reply = self.redis.xrange(stream, f"({after}", "+", count=limit)
        return [Entry(eid.decode(), fields.get(wire.FIELD)) for eid, fields in reply]

    def inbox_marks(self, lanes: Sequence[str]) -> dict[str, str]:
        """The newest entry of each inbox lane ("0-0" for an empty one): what `inbox_handled` waits for."""
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.xrevrange(lane, "+", "-", count=1)
        return {
            lane: reply[0][0].decode() if reply else "0-0" for lane, reply in zip(lanes, pipe.execute(), strict=True)
        }

    def inbox_handled(self, marks: dict[str, str], group: str) -> bool:
        """Whether the coordinators have read and acked every inbox entry up to `marks`: whatever a
        worker had sent by then was applied (a coordinator acks an entry after its commit)."""
        for inbox, mark in marks.items():
            if mark == "0-0":
                continue
            view = self.lane(inbox, group, 1)
            if view is None:
                continue
            pending, delivered = view
            if id_order(delivered) < id_order(mark):
                return False
            if pending and id_order(min(pending, key=id_order)) <= id_order(mark):
                return False
        return True

    def forget_running(self, wf_id: str) -> None:
        self.redis.zrem(self.keys.running, wf_id)

    def index_running_again(self, start: int, count: int) -> tuple[int, int]:
        """A page of the `workflows` index, newest first (new runs shift it: a page read twice, none
        skipped): its runs still going that the running index lacks are added there. Returns how many
        runs the page held and how many were added. One that ended meanwhile is taken out again (its
        own removal went before our add: its end is read now)."""
        rows = self.redis.zrevrange(self.keys.workflows, start, start + count - 1, withscores=True)
        going = [(wf_id, created) for (wf_id, created), state in zip(rows, self._states(rows), strict=True) if state]
        if not going:
            return len(rows), 0
        pipe = self.redis.pipeline(transaction=False)
        for wf_id, created in going:
            pipe.zadd(self.keys.running, {wf_id: created}, nx=True)
        added = [(wf_id, created) for (wf_id, created), new in zip(going, pipe.execute(), strict=True) if new]
        ended = [wf_id for (wf_id, _), state in zip(added, self._states(added), strict=True) if not state]
        if ended:
            self.redis.zrem(self.keys.running, *ended)
        return len(rows), len(added) - len(ended)

    def _states(self, rows: Sequence[tuple[bytes, float]]) -> list[bool]:
        """For each (run id, ...): whether the run is there and still going."""
        pipe = self.redis.pipeline(transaction=False)
        for wf_id, _ in rows:
            pipe.hget(self.keys.wf(wf_id.decode()), "state")
        return [state is not None and state.decode() not in WF_TERMINAL for state in pipe.execute()]

    def set_timers_again(self, members: Sequence[str], clock: float) -> int:
        """Timers due by `clock` (Redis's, seconds) that may have been lost, added where missing (one a
        coordinator claimed keeps its claim): how many were missing. Firing one twice does nothing more."""
        pipe = self.redis.pipeline(transaction=False)
        for timers, own in self._by_timer_set(members).items():
            pipe.zadd(timers, dict.fromkeys(own, int(clock * 1000)), nx=True)
        return sum(int(added) for added in pipe.execute())

    def _by_timer_set(self, members: Iterable[str]) -> dict[str, list[str]]:
        """Timers by the sorted set of their run (named in each member, see `state.timer_member`)."""
        sets: dict[str, list[str]] = {}
        for member in members:
            wf_id = member.split("|")[1] if "|" in member else None
            sets.setdefault(self.keys.timer_set(wf_id), []).append(member)
        return sets

    def claim_applied(self, claims: Sequence[tuple[str, str, int]]) -> list[str]:
        """For each (key, holder, ttl ms): set the key to `holder` for that long unless it is set, in one
        round trip; returns who holds each key now (the holder given, where it was free)."""

        def build(pipe: Any) -> None:
            for key, holder, ttl in claims:
                pipe.set(key, holder, nx=True, px=ttl)
                pipe.get(key)

        replies = self._pipeline(build)[1::2]
        return [held.decode() if held else holder for (_, holder, _), held in zip(claims, replies, strict=True)]

    def poll(
        self,
        streams: Sequence[str],
        group: str,
        consumer: str,
        count: int,
        block: float | None,
        pending: bool,
        acks: Mapping[str, Sequence[str]],
        timers: str,
        timer_limit: int = 500,
    ) -> tuple[float, float | None, list[str], list[tuple[str, Entry]]]:
        """A coordinator's round in one round trip: ack what the last round handled, claim the due
        timers of the sorted set `timers` for `timer_claim` seconds, then read the streams (as
        `read_groups`, blocking up to `block`). Returns Redis's clock when the read returned, when the
        set's next timer is due, the claimed timers and the entries.

        On one server the clock is a TIME right behind the read, which Redis runs as the read returns; on
        a cluster it is the claim's, taken before the read blocked, carried past it by the time the call
        took (a little ahead of Redis's: by the request's way there). There, streams of several slots are
        read a slot at a time and without blocking (see `inbox.Readers`)."""
        claim_ms = int(self.settings.timer_claim * 1000)
        slots = self.by_slot(streams)
        if len(slots) > 1:
            block = None

        def build(pipe: Any) -> None:
            for stream, ids in acks.items():
                if ids:
                    pipe.xack(stream, group, *ids)
            pipe.evalsha(SHAS[scripts.CLAIM_TIMERS], 1, timers, claim_ms, timer_limit)
            for together in slots:
                xreadgroup(pipe, together, group, consumer, count, block, pending)
            if not self.cluster:
                pipe.time()

        # Not through `_pipeline`: running it all again after a NOSCRIPT would read a second batch and
        # strand the first (delivered to this consumer, never handled). Only the claim is redone.
        began = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        build(pipe)
        replies = pipe.execute(raise_on_error=False)
        after = None if self.cluster else replies.pop()
        reads = [replies.pop() for _ in slots][::-1]
        *acked, claimed = replies
        if isinstance(claimed, NoScriptError):
            self.load_scripts()
            claimed = self._script(scripts.CLAIM_TIMERS, [timers], [claim_ms, timer_limit])
            began = time.monotonic()  # this claim's clock was read after the read returned
        for reply in (*acked, claimed, *reads, after):
            if isinstance(reply, Exception):
                with groups_made_again(self, streams, group):
                    raise reply  # what the read delivered is re-read by the coordinator's own recovery
        clock, next_due, due = _claimed(claimed)
        if after is None:
            clock += time.monotonic() - began
        else:
            clock = int(after[0]) + int(after[1]) / 1e6
        return clock, next_due, due, [pair for read in reads for pair in entries_of(read)]

    def inbox_owners(self) -> dict[int, str]:
        """Which coordinator leases each inbox shard (on a cluster)."""
        owners = {}
        for shard, owner in self.redis.hgetall(self.keys.inbox_owners).items():
            if shard.isdigit():
                owners[int(shard)] = owner.decode(errors="replace")
        return owners

    def lease_shards(self, name: str, take: Sequence[int], release: Sequence[int]) -> None:
        """Name the coordinator `name` the owner of the shards `take`, and no one of those it lets go."""
        if not take and not release:
            return
        pipe = self.redis.pipeline(transaction=False)
        if take:
            pipe.hset(self.keys.inbox_owners, mapping=dict.fromkeys(map(str, take), name))
        if release:
            pipe.hdel(self.keys.inbox_owners, *map(str, release))
        pipe.execute()
