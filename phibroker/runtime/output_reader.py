"""Reading a run's output: its events, in the run's output stream (only the coordinators write it), and
what its handlers streamed and logged, in a stream per agent of the run (the one stream of it the
agent's workers may append to, so none can trim or end another's). A reader merges them in one order
(`store.client.output_order`: one server's clock stamps all of a run's streams) and keeps its place in
each across reads.

It trusts an agent's stream only as far as the run's events back it: it follows the stream of each
agent a `task.dispatched` event names (committed before the task goes out, so before the agent can
write a chunk of it), and shows from it only the records of units dispatched to that agent, dated
from that dispatch on, and of events only its own workers' `task.started`. An event is shown once: a
start the worker wrote beside its output and the coordinators published again counts as one (a
reader resumed between the two copies may show the second), and an event made up with another's id
hides nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from phibroker import wire
from phibroker.engine.records import output_records, split_unit
from phibroker.errors import DecodeError
from phibroker.keys import agent_of
from phibroker.workflow.spec import is_name

if TYPE_CHECKING:
    from phibroker.settings import Settings
    from phibroker.store.client import ClientStore, OutputEntry

PAGE = 1000  # entries one read takes, shared among the streams it reads
MIN_PAGE = 50  # entries a read takes of each stream, however many it reads
MAX_AGENTS = 1000  # agents' streams one reader follows: a run dispatched to more shows the first ones'
LAST_SEQ = 18446744073709551615  # the highest sequence of a stream entry id
_PLAIN = re.compile(r"(\d{1,20})-(\d{1,20})")
_TOKEN = re.compile(r"(\d{1,20})-(\d{1,20}):([A-Za-z0-9_.-]{0,200}):(\d{1,9})")


@dataclass(frozen=True)
class Place:
    """Where a reader starts. An entry id ("ms-seq"): past it in every stream. A record's token
    (`OutputReader.read`, "ms-seq:source:n"): past that record, the n-th of its entry in its source's
    stream, and past every record the merged order puts before it."""

    ms: int = 0
    seq: int = 0
    source: str | None = None  # None: an entry id, or the start
    record: int = -1

    @classmethod
    def parse(cls, after: str) -> Place:
        """The place `after` names; the start for anything that names none (or no stream entry id)."""
        text = (after or "").strip()
        if token := _TOKEN.fullmatch(text):
            place = cls(int(token[1]), int(token[2]), token[3], int(token[4]))
        elif plain := _PLAIN.fullmatch(text):
            place = cls(int(plain[1]), int(plain[2]))
        else:
            return cls()
        return place if max(place.ms, place.seq) <= LAST_SEQ else cls()

    @property
    def is_start(self) -> bool:
        return self.source is None and self.ms == self.seq == 0

    @property
    def entry(self) -> str:
        return f"{self.ms}-{self.seq}"

    def position(self, source: str) -> str:
        """The id to read `source`'s stream past: before this millisecond for a stream the merged
        order puts after the place's own, within it for its own (its entry is read again, and its
        records up to the place skipped), past it for one put before."""
        if self.source is None:
            return self.entry
        if source == self.source:
            return _before(self.ms, self.seq)
        if (bool(source), source) < (bool(self.source), self.source):
            return f"{self.ms}-{LAST_SEQ}"
        return _before(self.ms, 0)


class OutputReader:
    """One reader of one run's output, from `after` (`Place`). `read` returns the next records, each
    with its token; `more` says whether a read at once may give others. `task` keeps that task's
    records only."""

    def __init__(
        self, broker: ClientStore, settings: Settings, wf_id: str, task: str | None = None, after: str = "0-0"
    ):
        self.broker = broker
        self.limit = settings.max_message_bytes * 4
        self.wf_id = wf_id
        self.task = task
        self.place = Place.parse(after)
        self.positions: dict[str, str] = {"": self.place.position("")}  # source -> last id read
        self.owners: dict[str, dict[str, int]] = {}  # unit -> agent it was dispatched to -> from when (ms)
        self.more = True
        self._seen: set[str] = set()  # the events shown (`_shown`)
        self._wake: dict[str, str] = {}  # source -> what `wait` waits past: the last id read, or "$"
        self._until: int | None = None  # the end of the current pass: what was there as it began
        self._fresh = False  # the last pass left entries written after it began
        self._learned = self.place.is_start

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        """The next records and their tokens, or none. Raises what Redis raises (callers reach it
        through `reaching`)."""
        if not self._learned:
            self._learn_dispatches()
        count = max(MIN_PAGE, PAGE // len(self.positions))
        page = self.broker.read_output(self.wf_id, self.positions, count, self._until)
        if self._until is None:
            self._until = page.now_ms + 1
        for source, last in page.tails.items():  # past what it returned; past all for one dated ahead
            self._wake[source] = "$" if source in page.ahead else last
        self._fresh = self._fresh or page.fresh
        self.more = page.more
        shown: list[tuple[str, dict[str, Any]]] = []
        for entry in page.entries:
            self.positions[entry.source] = entry.id
            records = self._decoded(entry)
            followed = self._note_dispatches(records, entry.ms) if not entry.source else False
            skip = self.place.record if (entry.source, entry.id) == (self.place.source, self.place.entry) else -1
            shown += [(t, record) for n, (t, record) in enumerate(records) if n > skip and self._shown(record, entry)]
            if followed:  # read on from here, with the new stream: its entries come after this one
                self.more = True
                break
        if not self.more:
            self._until = None
        return shown

    def wait(self, seconds: float) -> None:
        """Returns once a stream holds an entry this reader has not seen, or after `seconds`; at once
        when the last pass left entries that came while it read."""
        if self._fresh:
            self._fresh = False
            return
        past = {source: self._wake.get(source, at) for source, at in self.positions.items()}
        self.broker.wait_output(self.wf_id, past, seconds)

    def _learn_dispatches(self) -> None:
        """A reader that starts past the run's start: the dispatches before its place, read once."""
        after, through = "0-0", self.positions[""]
        while batch := self.broker.run_events(self.wf_id, after, through, PAGE):
            for entry in batch:
                self._note_dispatches(self._decoded(entry), entry.ms)
            after = batch[-1].id
        self._learned = True

    def _note_dispatches(self, records: list[tuple[str, dict[str, Any]]], ms: int) -> bool:
        """Notes the agents the run's `task.dispatched` events (of millisecond `ms`) send units to;
        whether it follows a new agent's stream now."""
        followed = False
        for _, record in records:
            agent = _dispatched_to(record)
            if agent is None or not is_name(agent) or not isinstance(record["unit"], str):
                continue
            self.owners.setdefault(record["unit"], {}).setdefault(agent, ms)
            if agent not in self.positions and len(self.positions) <= MAX_AGENTS:
                self.positions[agent] = self.place.position(agent)
                followed = True
        return followed

    def _decoded(self, entry: OutputEntry) -> list[tuple[str, dict[str, Any]]]:
        """The entry's records with their tokens (the place just past each); none from a damaged entry."""
        try:
            records = output_records(entry.kind, entry.blob, self.limit)
        except DecodeError:
            return []
        for record in records:
            record["id"] = entry.id  # where it is in its stream
        return [(f"{entry.id}:{entry.source}:{n}", record) for n, record in enumerate(records)]

    def _shown(self, record: dict[str, Any], entry: OutputEntry) -> bool:
        if self.task is not None and record["task"] != self.task:
            return False
        event = record["data"] if record["kind"] == "event" else None
        if event is None:  # a chunk or a log record: in its own agent's stream, of a unit dispatched to it
            return not entry.source or self._backed(record, entry.source, entry.ms)
        if event.get("type") == "task.started":  # either copy, once: the start of an attempt by a worker
            worker = wire.start_worker(event)
            agent = agent_of(worker)
            if not self._backed(record, agent, entry.ms) or entry.source not in ("", agent):
                return False
            event["agent"] = agent  # as the coordinators' copy says, whatever the worker's own copy does
            seen = f"started|{record['unit']}|{record['attempt']}|{worker}"
        elif entry.source:
            return False
        else:  # an event published twice (a relay taken over) is shown once; one made up hides nothing
            seen = "event|" + hashlib.blake2b(msgpack.packb(event), digest_size=16).hexdigest()
        if seen in self._seen:
            return False
        self._seen.add(seen)
        return True

    def _backed(self, record: dict[str, Any], agent: str, ms: int) -> bool:
        """The record is of a unit the run dispatched to `agent` by millisecond `ms`, and names that
        unit's task."""
        unit = record["unit"]
        if not isinstance(unit, str) or record["task"] != split_unit(unit)[0]:
            return False
        return self.owners.get(unit, {}).get(agent, ms + 1) <= ms


def _dispatched_to(record: dict[str, Any]) -> str | None:
    """The agent a `task.dispatched` event sends its unit to."""
    event = record["data"] if record["kind"] == "event" else None
    if not isinstance(event, dict) or event.get("type") != "task.dispatched":
        return None
    details = event.get("data")
    agent = details.get("agent") if isinstance(details, dict) else None
    return agent if isinstance(agent, str) else None


def _before(ms: int, seq: int) -> str:
    """The id just before `ms-seq`: a read past it starts with that entry."""
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{LAST_SEQ}" if ms else "0-0"
