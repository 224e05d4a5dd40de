"""Reading a run's output: its events, in the run's output stream (the coordinators write it), and what
its handlers streamed and logged, in a stream per agent of the run (the one stream of it the agent's
workers may append to, so none can trim or end another's). A reader merges them in entry id order
(the streams of a run share a server and its clock) and keeps its place in each across reads.

Which agents' streams: those the run's meta names (`agents`, every agent a unit was dispatched to),
and, while it reads, each agent a `task.dispatched` event names. That event is committed before its
task goes out, so the reader starts on an agent's stream before the agent can write in it: the read
stops at the event and goes on with the new stream, and no record comes out of order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phibroker.engine.records import output_records
from phibroker.errors import DecodeError
from phibroker.keys import agent_of
from phibroker.workflow.spec import is_name

if TYPE_CHECKING:
    from phibroker.settings import Settings
    from phibroker.store.client import ClientStore, OutputEntry

PAGE = 1000  # entries read at once from each stream
MAX_AGENTS = 1000  # streams one reader follows: a run dispatched to more agents shows the first ones'


class OutputReader:
    """One reader of one run's output, from `after` (an entry id, "0-0": the start). `read` returns the
    next records and sets `more` when a read at once may find others. `task` keeps that task's records
    only; `seen`, the ids of the events a reader had, yields each event once (a worker writes its
    task's start beside its output, and the coordinators publish it too)."""

    def __init__(
        self,
        broker: ClientStore,
        settings: Settings,
        wf_id: str,
        task: str | None = None,
        after: str = "0-0",
        seen: set[str] | None = None,
    ):
        self.broker = broker
        self.limit = settings.max_message_bytes * 4
        self.wf_id = wf_id
        self.task = task
        self.start = after
        self.seen = set() if seen is None else seen
        self.positions: dict[str, str] = {"": after}  # source ("" the run's events, or an agent) -> last id read
        self.more = True
        self._named = False

    def read(self) -> list[dict[str, Any]]:
        """The next records, or none. Raises what Redis raises (callers reach it through `reaching`)."""
        if not self._named:
            for agent in self.broker.run_agents(self.wf_id):
                self._follow(agent)
            self._named = True
        entries, self.more = self.broker.read_output(self.wf_id, self.positions, PAGE)
        records: list[dict[str, Any]] = []
        for entry in entries:
            self.positions[entry.source] = entry.id
            found = self._decoded(entry)
            new = [agent for agent in map(_dispatched_to, found) if agent and agent not in self.positions]
            records += [record for record in found if self._shown(record)]
            if new and len(self.positions) <= MAX_AGENTS:
                for agent in new:
                    self._follow(agent)
                self.more = True  # read on from here, with the new stream: its entries come after this one
                break
        return records

    def wait(self, seconds: float) -> None:
        """Returns once any of the streams holds an entry past the reader's place, or after `seconds`."""
        self.broker.read_output(self.wf_id, self.positions, 1, seconds)
        self.more = True

    def _follow(self, agent: str) -> None:
        if is_name(agent) and len(self.positions) <= MAX_AGENTS:
            self.positions.setdefault(agent, self.start)

    def _decoded(self, entry: OutputEntry) -> list[dict[str, Any]]:
        """The entry's records, each with its entry id; none from a damaged entry, and from an agent's
        stream only chunks, log records and its own workers' task starts."""
        try:
            records = output_records(entry.kind, entry.blob, self.limit)
        except DecodeError:
            return []
        kept = []
        for record in records:
            record["id"] = entry.id  # where it is in its stream: a reader resumes after it
            if entry.source and record["kind"] == "event" and not _started_by(record["data"], entry.source):
                continue
            kept.append(record)
        return kept

    def _shown(self, record: dict[str, Any]) -> bool:
        if self.task is not None and record["task"] != self.task:
            return False
        if record["kind"] == "event":
            event_id = str(record["data"].get("id"))
            if event_id in self.seen:
                return False
            self.seen.add(event_id)
        return True


def _dispatched_to(record: dict[str, Any]) -> str | None:
    """The agent a `task.dispatched` event sends its unit to."""
    event = record["data"] if record["kind"] == "event" else None
    if not isinstance(event, dict) or event.get("type") != "task.dispatched":
        return None
    details = event.get("data")
    agent = details.get("agent") if isinstance(details, dict) else None
    return agent if isinstance(agent, str) else None


def _started_by(event: Any, agent: str) -> bool:
    """A `task.started` event one of `agent`'s workers wrote: all an agent's stream may hold of events."""
    if not isinstance(event, dict) or event.get("type") != "task.started":
        return False
    details = event.get("data")
    worker = details.get("worker") if isinstance(details, dict) else None
    return isinstance(worker, str) and agent_of(worker) == agent
