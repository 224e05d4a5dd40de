"""The coordinators' inbox on a Redis Cluster: which shards each coordinator reads, and how it waits.

On one server the inbox is one shard, and every coordinator reads it through their group. On a cluster
it is `CLUSTER_SHARDS` shards, one per hash tag, spread over the masters, and each shard is leased to
one coordinator (`NS:inbox:owners`), who then finds a run's inputs in its own cache. Leases only
spread the work: any coordinator may apply any input (a commit checks the run's version), so two
reading one shard for a while, as a lease changes hands, is harmless. Therefore a shard whose owner's
lease lapsed, or that nobody owns, is read by every coordinator until one takes it: none is ever left
unread while a coordinator lives.

One blocking read covers one slot, so a coordinator reading several shards of a cluster reads them
without blocking, and when none had anything it waits for `Readers`, a blocking read per slot.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from phibroker.store.connection import Entry
from phibroker.store.coordinator import CoordinatorStore

log = logging.getLogger("phibroker.coordinator")

_JOIN = 5.0  # seconds a stopping coordinator waits for a shard's blocking read to return (it blocks < 1 s)


@dataclass(frozen=True)
class ShardPlan:
    take: tuple[int, ...]  # shards to lease now
    release: tuple[int, ...]  # shards leased past a fair share, to let go
    read: tuple[int, ...]  # shards to read until the next plan: own ones, and those nobody live owns


def plan_shards(count: int, owners: Mapping[int, str], live: set[str], me: str) -> ShardPlan:
    """What coordinator `me` does with `count` shards, `owners` naming who leases each and `live` the
    coordinators whose lease holds: it leases free shards up to its share and lets go of those past it.
    The shares add up to the count: each live coordinator's is the count divided by how many there
    are, and the first (by name) take one more each for what is left over. A newcomer takes the free
    shards from a place of its own in the ring, so two newcomers seldom pick the same."""
    if count <= 1:
        return ShardPlan((), (), (0,))
    fleet = sorted(live | {me})
    fair = count // len(fleet) + (1 if fleet.index(me) < count % len(fleet) else 0)
    mine = [shard for shard in range(count) if owners.get(shard) == me]
    start = zlib.crc32(me.encode()) % count
    ring = [(start + step) % count for step in range(count)]
    free = [shard for shard in ring if owners.get(shard) not in live and owners.get(shard) != me]
    take = tuple(free[: max(0, fair - len(mine))])
    release = tuple(mine[fair:])
    kept = [shard for shard in mine if shard not in release]
    return ShardPlan(take, release, tuple(sorted({*kept, *take, *free, *release})))


class Readers:
    """A blocking read of the inbox per slot, for a coordinator reading several slots of a cluster.

    One blocking read covers one slot, so the coordinator's round reads its shards without blocking;
    when that found nothing, it waits here: a thread per slot blocks in the group's read of that slot's
    lanes, as the coordinator (the same consumer), and hands over what it read. A thread still blocked
    when the wait ended hands its entries to the next round."""

    def __init__(self, broker: CoordinatorStore, group: str, consumer: str, count: int):
        self.broker = broker
        self.group, self.consumer, self.count = group, consumer, count
        self._read = threading.Event()
        self._found: list[tuple[str, Entry]] = []
        self._asked: dict[tuple[str, ...], float] = {}  # lanes of one slot -> until when to block
        self._readers: dict[tuple[str, ...], threading.Thread] = {}
        self._changed = threading.Condition()
        self._closed = False

    def wait(self, lanes: Sequence[str], timeout: float) -> list[tuple[str, Entry]]:
        """What the lanes get within `timeout` seconds (at once, what a reader read since the last take)."""
        with self._changed:
            if self._found:
                return self._take()
            self._read.clear()
            until = time.monotonic() + timeout
            for together in self.broker.by_slot(lanes):
                self._asked[tuple(together)] = until
                if tuple(together) not in self._readers and not self._closed:
                    reader = threading.Thread(target=self._reader, args=(tuple(together),), daemon=True)
                    self._readers[tuple(together)] = reader
                    reader.start()
            self._changed.notify_all()
        self._read.wait(timeout)
        return self.take()

    def take(self) -> list[tuple[str, Entry]]:
        """What the readers read and nobody took yet."""
        with self._changed:
            return self._take()

    def _take(self) -> list[tuple[str, Entry]]:
        found, self._found = self._found, []
        return found

    def close(self) -> list[tuple[str, Entry]]:
        """Stop the readers, once their reads returned (each blocks a round's wait at most), and return
        what they read and nobody took: entries read and never handled would wait for a take-over."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            readers = list(self._readers.values())
        for reader in readers:
            reader.join(timeout=_JOIN)
        return self.take()

    def _reader(self, lanes: tuple[str, ...]) -> None:
        while True:
            with self._changed:
                while lanes not in self._asked and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                left = self._asked.pop(lanes) - time.monotonic()
            if left < 0.001:
                continue
            try:
                found = self.broker.read_groups(list(lanes), self.group, self.consumer, self.count, left)
            except Exception as exc:  # noqa: BLE001 - a dead reader would leave each wait to run its full time
                # (a failover, a group lost with a master: the coordinator's round says so and makes it again)
                log.debug("reading %s: %s", lanes[0], exc)
                time.sleep(min(left, 0.5))
                continue
            if found:
                with self._changed:
                    self._found += found
                    self._read.set()
