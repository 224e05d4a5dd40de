"""The coordinators' inbox on a Redis Cluster: which shards each coordinator reads, and how it waits.

On one server the inbox is one shard, and every coordinator reads it through their group. On a cluster
it is `CLUSTER_SHARDS` shards, one per hash tag, spread over the masters, and each shard is leased to
one coordinator (`NS:inbox:owners`), who then finds a run's inputs in its own cache. Leases only
spread the work: any coordinator may apply any input (a commit checks the run's version), so two
reading one shard for a while, as a lease changes hands, is harmless. Therefore a shard whose owner's
lease lapsed, or that nobody owns, is read by every coordinator until one takes it: none is ever left
unread while a coordinator lives.

One blocking read covers one slot, so a coordinator reading several shards of a cluster reads them
without blocking, and when none had anything it waits on a `Doorbell`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from phibroker.store.connection import CONNECTION_ERRORS
from phibroker.store.coordinator import CoordinatorStore

log = logging.getLogger("phibroker.coordinator")


@dataclass(frozen=True)
class ShardPlan:
    take: tuple[int, ...]  # shards to lease now
    release: tuple[int, ...]  # shards leased past a fair share, to let go
    read: tuple[int, ...]  # shards to read until the next plan: own ones, and those nobody live owns


def plan_shards(count: int, owners: Mapping[int, str], live: set[str], me: str) -> ShardPlan:
    """What coordinator `me` does with `count` shards, `owners` naming who leases each and `live` the
    coordinators whose lease holds (`me` among them): it leases free shards up to its fair share (the
    count divided by the live coordinators, rounded up) and lets go of those past it. A newcomer takes
    the free shards from a place of its own in the ring, so two newcomers seldom pick the same."""
    if count <= 1:
        return ShardPlan((), (), (0,))
    fair = math.ceil(count / max(1, len(live | {me})))
    mine = [shard for shard in range(count) if owners.get(shard) == me]
    start = zlib.crc32(me.encode()) % count
    ring = [(start + step) % count for step in range(count)]
    free = [shard for shard in ring if owners.get(shard) not in live and owners.get(shard) != me]
    take = tuple(free[: max(0, fair - len(mine))])
    release = tuple(mine[fair:])
    kept = [shard for shard in mine if shard not in release]
    return ShardPlan(take, release, tuple(sorted({*kept, *take, *free, *release})))


class Doorbell:
    """Wakes a coordinator reading several slots when any of them gets an inbox entry.

    The coordinator marks where each lane ends and reads past the marks in one round trip
    (`CoordinatorStore.marked_read`); when that finds nothing it waits here. A thread per slot blocks
    on its lanes past the marks (XREAD, no group: it moves nothing) and rings: an entry added after the
    marks rings at once, one added before was in that read. A thread still blocked past older marks
    rings for entries read since, at worst: one round more."""

    def __init__(self, broker: CoordinatorStore):
        self.broker = broker
        self.rang = threading.Event()
        self._asked: dict[tuple[str, ...], tuple[dict[str, str], float]] = {}  # lanes -> marks, until when
        self._watchers: set[tuple[str, ...]] = set()
        self._changed = threading.Condition()
        self._closed = False

    def wait(self, marks: Mapping[str, str], timeout: float) -> None:
        """Wait up to `timeout` seconds for an entry past `marks` on any of their lanes."""
        until = time.monotonic() + timeout
        with self._changed:
            self.rang.clear()
            for lanes in self.broker.by_slot(list(marks)):
                self._asked[tuple(lanes)] = ({lane: marks[lane] for lane in lanes}, until)
                if tuple(lanes) not in self._watchers:
                    self._watchers.add(tuple(lanes))
                    threading.Thread(target=self._watch, args=(tuple(lanes),), daemon=True).start()
            self._changed.notify_all()
        self.rang.wait(timeout)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self.rang.set()

    def _watch(self, lanes: tuple[str, ...]) -> None:
        while True:
            with self._changed:
                while lanes not in self._asked and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                marks, until = self._asked.pop(lanes)
            left = until - time.monotonic()
            if left < 0.001:
                continue
            try:
                if self.broker.entries_past(marks, left):
                    self.rang.set()
            except CONNECTION_ERRORS as exc:  # the coordinator's own wait ends in time all the same
                log.debug("doorbell on %s: %s", lanes[0], exc)
                time.sleep(min(left, 0.5))
            except Exception:  # noqa: BLE001 - a dead watcher would leave each wait to run its full time
                log.exception("doorbell on %s", lanes[0])
                time.sleep(min(left, 0.5))
