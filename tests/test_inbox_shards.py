"""How coordinators share the inbox's shards on a cluster (`inbox.plan_shards`), in memory: each plan
is what one coordinator does at one lease renewal, against the owners table as the others left it."""

from __future__ import annotations

import random

from phibroker.runtime.inbox import plan_shards

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
    assert sorted(sorted(owners.values()).count(name) for name in "abc") == [2, 3, 3]
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
