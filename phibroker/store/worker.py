"""What a worker does with the broker: mark attempts started, settle results, give work back."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from phibroker import wire
from phibroker.engine.state import SEP, unpack_group
from phibroker.store import scripts
from phibroker.store.connection import SHAS, Connection, Entry, Route


class WorkerStore(Connection):
    """What a worker does with the broker: mark attempts started, settle results, give work back."""

    def settle(
        self,
        inbox: Mapping[str, Sequence[bytes]],
        group: str,
        acks: dict[str, list[str]],
        events: list[dict[str, Any]],
        route: Route | None = None,
    ) -> None:
        """Results first (inbox stream -> entries), then the acks (stream -> entry ids) — a crash in
        between re-delivers, never loses — and any events waiting to be published, in one round trip."""

        def build(pipe: Any) -> None:
            if events:
                self._publish(pipe, events, route)
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

    def start_many(self, consumer: str, batches: dict[str, list[tuple[str, str, str, bytes]]]) -> dict[str, list[int]]:
        """Mark attempts started (see scripts.START for the tokens) for several workflows, one round trip."""
        order = list(batches)

        def build(pipe: Any) -> None:
            for wf_id in order:
                args: list[Any] = [consumer]
                for unit, dispatch, entry, lost in batches[wf_id]:
                    args += [unit, dispatch, entry, lost]
                keys = [self.keys.wf(wf_id), self.keys.wf_tasks(wf_id), self.keys.wf_history(wf_id)]
                pipe.evalsha(SHAS[scripts.START], len(keys), *keys, *args)

        replies = self._pipeline(build)
        return {wf_id: [int(t) for t in tokens] for wf_id, tokens in zip(order, replies, strict=False)}

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
