"""Every Redis name phibroker uses, built from the namespace in one place.

Every key of one workflow carries its `{ID}` hash tag, so a transition script touches one cluster slot;
an agent's two task lanes share the tag `{AGENT}`, and every lane of an inbox shard its shard's tag, so
one read covers them on a Redis Cluster too. On a cluster the inbox, the events log and the timers are several keys
each, spread over the masters; a run's go to the same shard of each.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable
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
    @cached_property
    def inbox_lanes(self) -> tuple[str, ...]:
        """The coordinators' inbox, a lane per shard: what clients, approvers and coordinators send (submit,
        cancel, decide, a child's end). What an agent's workers send goes to the agent's own lanes beside it
        (`agent_lanes`). One server has one shard, read by every coordinator; a cluster has `shards`,
        spread as `event_logs` is, each read by the coordinator that leases it."""
        if self.shards <= 1:
            return (f"{self.namespace}:{{results}}",)
        return tuple(f"{self.namespace}:results:{{{tag}}}" for tag in spread_tags(self.shards))

    def inbox(self, wf_id: str | None) -> str:
        """The inbox lane a run's messages go to (the first shard's for messages of no run)."""
        return self.inbox_lanes[self._shard_index(len(self.inbox_lanes), wf_id)]

    def agent_lanes(self, agent: str, shard: int) -> tuple[str, str]:
        """An agent's two lanes in an inbox shard, written by its workers only: one appending elsewhere
        (with an id or a MAXLEN of its choosing) could trim or end another's stream. Results, events,
        dead letters and requests go to the first; the results of tasks from the agent's bulk lane to
        the second, read a slice at a time between looks at the first, so a big fan-out's results never
        hold up a small workflow's. Both share their shard's hash tag: one read covers a shard."""
        return f"{self.inbox_lanes[shard]}:agent:{agent}", f"{self.inbox_lanes[shard]}:bulk:{agent}"

    def agent_inbox(self, agent: str, wf_id: str | None, bulk: bool = False) -> str:
        """The agent's lane (or bulk lane) in the run's inbox shard."""
        return self.agent_lanes(agent, self._shard_index(len(self.inbox_lanes), wf_id))[bulk]

    def shard_lanes(self, shard: int, agents: Iterable[str], bulk: bool = True) -> list[str]:
        """Every lane of an inbox shard: its own, then the agents' (with their bulk lanes, if `bulk`)."""
        pairs = [self.agent_lanes(agent, shard) for agent in sorted(agents)]
        return [self.inbox_lanes[shard], *(first for first, _ in pairs), *(bulk_ for _, bulk_ in pairs if bulk)]

    def lanes(self, agents: Iterable[str]) -> list[str]:
        """Every lane of every inbox shard, for `agents`."""
        agents = sorted(agents)
        return [lane for shard in range(len(self.inbox_lanes)) for lane in self.shard_lanes(shard, agents)]

    def is_bulk(self, lane: str) -> bool:
        return lane.startswith(self._bulk_prefixes)

    @cached_property
    def _bulk_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{shared}:bulk:" for shared in self.inbox_lanes)

    def lane_owner(self, lane: str) -> str | None:
        """The agent whose lane of the inbox this is (None for a shard's own lane, or any other stream)."""
        shared = self.shard_of(lane)
        return None if shared is None or lane == shared else lane[len(shared) + 1 :].partition(":")[2]

    def shard_of(self, lane: str) -> str | None:
        """The shard's own lane of any lane of an inbox shard (None for any other stream)."""
        for shared in self.inbox_lanes:
            if lane == shared or lane.startswith((f"{shared}:agent:", f"{shared}:bulk:")):
                return shared
        return None

    @property
    def inbox_owners(self) -> str:
        """Which coordinator leases each inbox shard (a hash: shard number -> coordinator), on a cluster."""
        return f"{self.namespace}:inbox:owners"

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

    @classmethod
    def _shard_of(cls, keys: tuple[str, ...], wf_id: str | None) -> str:
        return keys[cls._shard_index(len(keys), wf_id)]

    @staticmethod
    def _shard_index(count: int, wf_id: str | None) -> int:
        """Which of `count` shards a run's keys go to: the same for its events, timers and inbox."""
        return zlib.crc32(wf_id.encode()) % count if wf_id and count > 1 else 0

    @property
    def roster(self) -> str:
        """The agents whose workers have started (a set): whose leases and subscriptions to read. The
        coordinators write it, as a signing agent's message asks: junk names would hide the others."""
        return f"{self.namespace}:roster"

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

    def worker_leases(self, agent: str) -> str:
        """The leases of an agent's workers (a hash only they write: no agent can forge another's expiry).
        Every agent's share a hash tag, so one node's clock stamps and reads them all on a cluster too."""
        return f"{self.namespace}:{{agents}}:{agent}"

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
        """Per-unit state, one field per `unit|attribute`, and the run's end as the start script reads it
        (`finished`). Written by coordinators only; workers read it."""
        return f"{self.namespace}:wf:{{{wf_id}}}:tasks"

    def wf_marks(self, wf_id: str, agent: str) -> str:
        """The start marks of the agent's units in the run (unit -> dispatch, token, started, entry,
        worker): the one run hash an agent's workers write, and only their own."""
        return f"{self.namespace}:wf:{{{wf_id}}}:marks:{agent}"

    def wf_lost(self, wf_id: str, agent: str) -> str:
        """Attempts of the agent's units that its workers reclaimed (history records), until a coordinator
        moves them into the run's history."""
        return f"{self.namespace}:wf:{{{wf_id}}}:lost:{agent}"

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
        """The run's output stream as the coordinators write it: its events, in order. Made by the run's
        first transition and kept as long as the run's other keys. What its handlers stream and log is
        in each agent's own stream of the run (`wf_agent_output`); readers merge them (`OutputReader`)."""
        return f"{self.namespace}:wf:{{{wf_id}}}:out"

    def wf_agent_output(self, wf_id: str, agent: str) -> str:
        """What the agent's handlers streamed and logged in the run (and their tasks' starts): the one
        output stream its workers append to, so no agent can trim or end another's, or the run's."""
        return f"{self.namespace}:wf:{{{wf_id}}}:output:{agent}"

    def wf_agent_output_bytes(self, wf_id: str, agent: str) -> str:
        """Bytes the agent's handlers streamed and logged in the run, counted against the output limit."""
        return f"{self.namespace}:wf:{{{wf_id}}}:output-bytes:{agent}"

    def wf_agent_keys(self, wf_id: str, agent: str) -> tuple[str, ...]:
        """The keys of a run that one agent's workers write: they expire, or stay, with the run's."""
        return (
            self.wf_marks(wf_id, agent),
            self.wf_lost(wf_id, agent),
            self.wf_agent_output(wf_id, agent),
            self.wf_agent_output_bytes(wf_id, agent),
        )

    def wf_keys(self, wf_id: str, agents: Iterable[str] = ()) -> list[str]:
        """Every key of one workflow, in the order the scripts take them: with each of `agents`' start
        marks, lost attempts and output last."""
        return [
            self.wf(wf_id),
            self.wf_tasks(wf_id),
            self.wf_results(wf_id),
            self.wf_history(wf_id),
            self.wf_outbox(wf_id),
            self.wf_done(wf_id),
            self.wf_output(wf_id),
            *(key for agent in agents for key in self.wf_agent_keys(wf_id, agent)),
        ]


def consumer_name(agent: str, host: str, pid: int, tag: str) -> str:
    """A worker's name in its agent's consumer groups and leases: its agent comes first (`agent_of`)."""
    return f"{agent}@{host[:64]}:{pid}:{tag}"


def agent_of(consumer: str) -> str:
    """The agent a worker's consumer name says it serves: the hash whose lease counts for it."""
    return consumer.partition("@")[0]


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
