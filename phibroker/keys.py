"""Every Redis name phibroker uses, built from the namespace in one place.

Every key of one workflow carries its `{ID}` hash tag, so a transition script touches one cluster slot;
an agent's two lanes share the tag `{AGENT}`, and the inbox's two lanes `{results}`, so one read covers
both on a Redis Cluster too. On a cluster the events log and the timers are several keys each, spread
over the masters.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from functools import cache, cached_property

WORKERS_GROUP = "workers"
COORDINATORS_GROUP = "coordinators"
# The keys the events log and the timers are each spread over on a Redis Cluster: every task's events
# go to the log (and many tasks' timeouts and retries to the timers), so one key would saturate one
# master; on one server a single key costs least.
CLUSTER_SHARDS = 8
SLOTS = 16384


@dataclass(frozen=True)
class Keys:
    namespace: str = "phi"
    shards: int = 1  # keys of the events log and of the timers (Settings: CLUSTER_SHARDS on a cluster)

    # -- streams and indexes shared by every workflow -------------------------------------------
    @property
    def results(self) -> str:
        """The coordinators' inbox: worker results and control messages (submit, cancel, decide)."""
        return f"{self.namespace}:{{results}}"

    @property
    def results_bulk(self) -> str:
        """The inbox's second lane: results of tasks from the agents' bulk lanes, read a slice at a
        time between looks at `results`, so a big fan-out's results never hold up a small workflow's."""
        return f"{self.namespace}:{{results}}:bulk"

    @property
    def inboxes(self) -> tuple[str, str]:
        return (self.results, self.results_bulk)

    @property
    def workflows(self) -> str:
        return f"{self.namespace}:workflows"

    @property
    def running(self) -> str:
        return f"{self.namespace}:running"

    @cached_property
    def timer_sets(self) -> tuple[str, ...]:
        """Every sorted set of timers (retry backoffs, deadlines, approval timeouts), spread as
        `event_logs` is."""
        return self._spread("timers")

    def timer_set(self, wf_id: str | None) -> str:
        """The sorted set a run's timers go to."""
        return self._shard_of(self.timer_sets, wf_id)

    @property
    def approvals(self) -> str:
        return f"{self.namespace}:approvals"

    @cached_property
    def event_logs(self) -> tuple[str, ...]:
        """Every stream of the events log. Several are each in a slot of their own, spread evenly over
        the slots (`spread_tags`), so each master of a cluster takes a share of every task's events."""
        return self._spread("events")

    def event_log(self, wf_id: str | None) -> str:
        """The stream a run's events go to (the first one for events of no run): one run's events stay
        in one stream, in order."""
        return self._shard_of(self.event_logs, wf_id)

    def _spread(self, name: str) -> tuple[str, ...]:
        if self.shards <= 1:
            return (f"{self.namespace}:{name}",)
        return tuple(f"{self.namespace}:{name}:{{{tag}}}" for tag in spread_tags(self.shards))

    @staticmethod
    def _shard_of(keys: tuple[str, ...], wf_id: str | None) -> str:
        return keys[zlib.crc32(wf_id.encode()) % len(keys)] if wf_id and len(keys) > 1 else keys[0]

    @property
    def subscribers(self) -> str:
        """The agents that registered subscriptions (a set): whose `subs_of` to read."""
        return f"{self.namespace}:subscribers"

    def subs_of(self, agent: str) -> str:
        """An agent's subscriptions (name -> what it wants), a hash only its workers write: one agent
        cannot change or silence another's."""
        return f"{self.namespace}:subs:{agent}"

    @property
    def triggers(self) -> str:
        return f"{self.namespace}:triggers"

    @property
    def dlq(self) -> str:
        return f"{self.namespace}:dlq"

    @property
    def agents(self) -> str:
        """Worker leases."""
        return f"{self.namespace}:agents"

    @property
    def coordinators(self) -> str:
        """Coordinator leases."""
        return f"{self.namespace}:coordinators"

    @property
    def trusted_keys(self) -> str:
        """Public keys trusted to sign approval decisions and workflow files."""
        return f"{self.namespace}:trusted"

    def applied(self, sender: str, message_id: str) -> str:
        """A control message the coordinators applied (its sender's, by id), kept until it expires: the
        inbox entry that carried it, so a copy added again is known."""
        return f"{self.namespace}:applied:{sender}:{message_id}"

    def agent_tasks(self, agent: str) -> str:
        return f"{self.namespace}:agent:{{{agent}}}:tasks"

    def agent_bulk(self, agent: str) -> str:
        """The agent's second lane, for big releases; its workers read it beside `agent_tasks`."""
        return f"{self.namespace}:agent:{{{agent}}}:bulk"

    def agent_stops(self, agent: str) -> str:
        """The pub/sub channel on which the agent's workers hear that a running unit must stop."""
        return f"{self.namespace}:agent:{agent}:stops"

    def sub(self, name: str) -> str:
        return f"{self.namespace}:sub:{name}"

    def sub_seen(self, name: str) -> str:
        """Event ids a subscription already handled, so a re-routed event runs once."""
        return f"{self.namespace}:sub:{name}:seen"

    # -- one workflow: all under the {ID} hash tag ---------------------------------------------
    def wf(self, wf_id: str) -> str:
        """The workflow's meta hash: name, state, version, spec, params, times. Written by coordinators
        and clients only; workers read it."""
        return f"{self.namespace}:wf:{{{wf_id}}}"

    def wf_tasks(self, wf_id: str) -> str:
        """Per-unit state, one field per `unit|attribute`; beside them what workers count for the whole
        run (`reclaims`, `output_bytes`) and its end as their start script reads it (`finished`)."""
        return f"{self.namespace}:wf:{{{wf_id}}}:tasks"

    def wf_results(self, wf_id: str) -> str:
        return f"{self.namespace}:wf:{{{wf_id}}}:results"

    def wf_history(self, wf_id: str) -> str:
        return f"{self.namespace}:wf:{{{wf_id}}}:history"

    def wf_outbox(self, wf_id: str) -> str:
        return f"{self.namespace}:wf:{{{wf_id}}}:outbox"

    def wf_done(self, wf_id: str) -> str:
        """Gets one element when the workflow ends, so waiters block instead of polling."""
        return f"{self.namespace}:wf:{{{wf_id}}}:done"

    def wf_output(self, wf_id: str) -> str:
        """The run's output stream: what its handlers stream and log, and its events, in order. Made by
        the run's first transition and kept as long as the run's other keys."""
        return f"{self.namespace}:wf:{{{wf_id}}}:out"

    def wf_keys(self, wf_id: str) -> list[str]:
        """Every key of one workflow, in the order the scripts take them."""
        return [
            self.wf(wf_id),
            self.wf_tasks(wf_id),
            self.wf_results(wf_id),
            self.wf_history(wf_id),
            self.wf_outbox(wf_id),
            self.wf_done(wf_id),
            self.wf_output(wf_id),
        ]


def key_slot(tag: str) -> int:
    """The Redis Cluster slot of a key whose hash tag is `tag`: CRC16 (XMODEM) of it, mod 16384."""
    crc = 0
    for byte in tag.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc % SLOTS


@cache
def spread_tags(count: int) -> tuple[str, ...]:
    """`count` hash tags, the k-th in the k-th of `count` even parts of the slots: a cluster whose masters
    hold even ranges of slots (as `redis-cli --cluster create` makes them) has each tag's keys on
    another master, as far as there are masters."""
    return tuple(
        next(
            f"e{n}"
            for n in itertools.count()
            if part * SLOTS // count <= key_slot(f"e{n}") < (part + 1) * SLOTS // count
        )
        for part in range(count)
    )
