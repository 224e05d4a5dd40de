"""How coordinators share the inbox's shards on a cluster (`inbox.plan_shards`), in memory: each plan
is what one coordinator does at one lease renewal, against the owners table as the others left it.
And the bulk work a coordinator holds when a shard's read hands in more of it."""

from __future__ import annotations

import random

from phibroker import wire
from phibroker.engine.state import timer_member
from phibroker.keys import Keys
from phibroker.runtime.bulk import HeldWork
from phibroker.runtime.inbox import plan_shards
from phibroker.settings import Settings
from phibroker.store.connection import Entry

SHARDS = 8


def renew(owners: dict[int, str], live: set[str], me: str) -> tuple[int, ...]:
    """One coordinator's renewal: its plan applied to the table; returns what it reads until the next."""
    plan = plan_shards(SHARDS, owners, live, me)
    owners.update(dict.fromkeys(plan.take, me))
    for shard in plan.release:
        owners.pop(shard, None)
    return plan.read


def rounds(owners: dict[int, str], live: set[str], count: int, seed: int = 0) -> dict[str, tuple[int, ...]]:
    """`count` rounds in which each live coordinator renews once, in a random order; after each
    renewal, every shard is read by some live coordinator. Returns what each reads at the end."""
    order = random.Random(seed)
    reads: dict[str, tuple[int, ...]] = {}
    for _ in range(count):
        for me in order.sample(sorted(live), len(live)):
            reads[me] = renew(owners, live, me)
            unread = set(range(SHARDS)) - {shard for name in live if name in reads for shard in reads[name]}
            assert not unread or len(reads) < len(live), (unread, owners, reads)
    return reads


def test_one_coordinator_leases_every_shard() -> None:
    owners: dict[int, str] = {}
    assert renew(owners, {"a"}, "a") == tuple(range(SHARDS))
    assert owners == dict.fromkeys(range(SHARDS), "a")


def test_a_newcomer_gets_half_and_nothing_goes_unread_meanwhile() -> None:
    owners = dict.fromkeys(range(SHARDS), "a")
    reads = rounds(owners, {"a", "b"}, 3)
    assert sorted(owners.values()).count("a") == 4 and sorted(owners.values()).count("b") == 4
    assert set(reads["a"]) | set(reads["b"]) == set(range(SHARDS)) and not set(reads["a"]) & set(reads["b"])


def test_shards_of_a_dead_coordinator_are_read_at_once_and_taken() -> None:
    owners: dict[int, str] = {}
    rounds(owners, {"a", "b", "c"}, 3, seed=1)
    assert [sorted(owners.values()).count(name) for name in "abc"] == [3, 3, 2]
    dead = {shard for shard, name in owners.items() if name == "c"}
    first = plan_shards(SHARDS, owners, {"a", "b"}, "a")
    assert dead <= set(first.read)  # read before any renewal took them
    rounds(owners, {"a", "b"}, 2, seed=2)
    assert sorted(owners.values()).count("a") == 4 and sorted(owners.values()).count("b") == 4


def test_a_table_naming_strangers_or_too_many_for_one_is_set_right() -> None:
    owners = {0: "gone", 1: "a", 2: "a", 3: "a", 4: "a", 5: "a", 6: "a", 7: "a"}
    rounds(owners, {"a", "b", "c", "d"}, 3, seed=3)
    assert sorted(owners.values()) == sorted("aabbccdd")


def test_one_shard_is_everyones() -> None:
    plan = plan_shards(1, {}, {"a", "b"}, "b")
    assert plan.read == (0,) and not plan.take and not plan.release


def test_five_coordinators_each_lease_some() -> None:
    owners: dict[int, str] = {}
    rounds(owners, set("abcde"), 3, seed=4)
    assert sorted(sorted(owners.values()).count(name) for name in "abcde") == [1, 1, 2, 2, 2]


def result_entry(wf_id: str, entry_id: str) -> Entry:
    result = wire.Result(id="d", wf=wf_id, unit="u", token=1, ok=True, worker="w", started=0.0, finished=0.0)
    return Entry(entry_id, wire.Inbox(kind="results", results=[result]).encode(1 << 20))


def test_held_bulk_results_joined_by_a_late_read_keep_their_run_s_deadline_waiting() -> None:
    """A shard's blocking read may hand in bulk results while some are held: the deadline of the new
    results' run waits for them too (a result read before its deadline fired is applied first)."""
    held = HeldWork(Settings())
    held.keep([("bulk", result_entry("w1", "1-0"))])
    held.wait([timer_member("deadline", "w1", "u"), timer_member("deadline", "w2", "u")])
    assert held.due_timers() == [timer_member("deadline", "w2", "u")]
    held.wait([timer_member("deadline", "w2", "u")])
    held.keep([*held.entries, ("bulk", result_entry("w2", "2-0"))])
    assert held.due_timers() == []
    held.keep([])
    assert sorted(held.due_timers()) == [timer_member("deadline", "w1", "u"), timer_member("deadline", "w2", "u")]


def test_each_lane_names_the_agent_whose_workers_write_it() -> None:
    for keys in (Keys("phi"), Keys("phi", shards=8)):
        for shard in range(len(keys.inbox_lanes)):
            tasks, bulk = keys.agent_lanes("kalic.v2", shard)
            assert keys.lane_owner(tasks) == keys.lane_owner(bulk) == "kalic.v2"
            assert keys.lane_owner(keys.inbox_lanes[shard]) is None
        assert keys.lane_owner(keys.dlq) is None
