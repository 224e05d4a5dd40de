"""What a client reads and asks of the broker: runs, approvals, events, dead letters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from phibroker import wire
from phibroker.errors import DecodeError
from phibroker.grants import Grant
from phibroker.keys import Keys
from phibroker.store import registry, views
from phibroker.store.connection import Connection, parse_meta

AHEAD_MS = 1000  # an output entry dated this far ahead of the clock was not stamped by it (on a cluster, a
# read's clock is a round trip older than its entries)


def inbox(keys: Keys) -> list[Grant]:
    """What a client sends the coordinators (`ask_to_submit`, `send_to_coordinators`): new runs,
    cancels, retries, signals, approval decisions. Append only: the inbox is theirs to read."""
    return [Grant(("xadd",), tuple(f"%W~{lane}" for lane in keys.inbox_lanes))]


def access(keys: Keys) -> list[Grant]:
    """What a client sends Redis (`submit --wait`, `cancel`, `retry`, `signal`, `status`, `list`): the
    views' reads, the inbox (a new run too: `ask_to_submit`, which the coordinators write, so that no
    client's user may write a run, its own or another's), and waiting on a run's end without consuming it."""
    return [
        *views.access(keys),
        Grant(("info",)),
        *inbox(keys),
        Grant(("blmove",), (f"~{keys.wf_done('*')}",)),
    ]


def approver_access(keys: Keys) -> list[Grant]:
    """`approvals`, `approve`, `reject`: the views' reads, and decisions into the inbox (each carries
    its approver's Ed25519 signature: the user only carries it)."""
    return [*views.access(keys), *inbox(keys)]


def dead_letter_edits(keys: Keys) -> list[Grant]:
    """An operator's `dlq remove`, `purge` and `retry`: a dead letter's bytes go back to whichever
    stream they came from."""
    return [Grant(("xdel", "xlen", "del"), (f"~{keys.dlq}",)), Grant(("xadd",), (f"%W~{keys.namespace}:*",))]


def admin_access(keys: Keys) -> list[Grant]:
    """Operators (`keys trust`, `triggers`, `dlq`, and a client's commands on anyone's run): every
    command a client, the registries' edits and the dead letters' send, on every key of the namespace."""
    grants = [*access(keys), *registry.edits(keys), *dead_letter_edits(keys)]
    commands = dict.fromkeys(command for grant in grants for command in grant.commands)
    return [Grant(tuple(commands), (f"~{keys.namespace}:*",))]


class ClientStore(Connection):
    """What a client reads and asks of the broker: runs, approvals, events, dead letters."""

    def dead_letters(self, limit: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """Newest first: (DLQ entry id, record)."""
        rows = self.redis.xrevrange(self.keys.dlq, count=limit)
        return [(i.decode(), wire.unpack(f[wire.FIELD], 1 << 26)) for i, f in rows]

    def read_dead_letter(self, entry_id: str) -> dict[str, Any] | None:
        rows = self.redis.xrange(self.keys.dlq, min=entry_id, max=entry_id)
        return wire.unpack(rows[0][1][wire.FIELD], 1 << 26) if rows else None

    def remove_dead_letters(self, entry_ids: Sequence[str]) -> int:
        return int(self.redis.xdel(self.keys.dlq, *entry_ids)) if entry_ids else 0

    def purge_dead_letters(self) -> int:
        count = int(self.redis.xlen(self.keys.dlq))
        self.redis.delete(self.keys.dlq)
        return count

    def read_workflow(
        self, wf_id: str
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, bytes], list[bytes]]:
        """Everything `status` shows: meta, units, raw results, history records."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.wf(wf_id))
        pipe.hgetall(keys.wf_tasks(wf_id))
        pipe.hgetall(keys.wf_results(wf_id))
        pipe.lrange(keys.wf_history(wf_id), 0, -1)
        meta, raw, results, history = pipe.execute()
        (units,), (lost,) = self.read_units([(wf_id, raw)], with_lost=True)
        history += [record for _, records in lost.values() for record in records]  # not moved there yet
        return (
            parse_meta(meta),
            units,
            {k.decode(): v for k, v in results.items()},
            history,
        )

    def wait_done(self, wf_id: str, timeout: float) -> bool:
        """Block until the workflow's end (or the timeout); never consumes the signal other waiters need."""
        key = self.keys.wf_done(wf_id)
        return self.redis.blmove(key, key, timeout=max(0.01, timeout), src="RIGHT", dest="LEFT") is not None

    def approvals(self) -> dict[str, dict[str, Any]]:
        """Open approval requests: those whose gate still waits on them, or whose run waits on them (a
        passed `ask` budget). The table is cleaned after the transition that decided or timed out a
        request, so a request seen there may already be closed."""
        raw = self.redis.hgetall(self.keys.approvals)
        requests = {k.decode(): wire.unpack(v, self.settings.max_message_bytes) for k, v in raw.items()}
        pipe = self.redis.pipeline(transaction=False)
        for request in requests.values():
            task, wf_id = request.get("task"), str(request.get("workflow"))
            if request.get("budget"):
                pipe.hmget(self.keys.wf(wf_id), "state", "budget_request")
            else:
                pipe.hmget(self.keys.wf_tasks(wf_id), f"{task}|state", f"{task}|approval")
        gates = pipe.execute() if requests else []
        return {
            request_id: request
            for (request_id, request), (state, waits_on) in zip(requests.items(), gates, strict=True)
            if state in (b"running", b"waiting_approval") and waits_on == request_id.encode()
        }

    def last_event_id(self, wf_id: str) -> str:
        """The newest entry of the events log's stream that takes the run's events."""
        newest = self.redis.xrevrange(self.keys.event_log(wf_id), count=1)
        return newest[0][0].decode() if newest else "0-0"

    def read_events(
        self, wf_id: str, after: str, block: float | None, count: int = 500
    ) -> tuple[str, list[dict[str, Any]]]:
        """Events after the entry id `after` in the stream that takes the run's events (others' too),
        waiting up to `block` seconds; returns the new last id."""
        reply = self.redis.xread(
            {self.keys.event_log(wf_id): after}, count=count, block=None if block is None else max(1, int(block * 1000))
        )
        events: list[dict[str, Any]] = []
        for _, items in reply or ():
            for entry_id, fields in items:
                after = entry_id.decode()
                try:
                    events += wire.decode_events(fields[wire.FIELD], self.settings.max_message_bytes * 4)
                except (DecodeError, KeyError):
                    continue
        return after, events

    def run_state(self, wf_id: str) -> str | None:
        """The run's state; None for a run that is not there."""
        state = self.redis.hget(self.keys.wf(wf_id), "state")
        return state.decode() if state is not None else None

    def read_output(
        self, wf_id: str, positions: Mapping[str, str], count: int, until_ms: int | None = None
    ) -> OutputPage:
        """The run's output past `positions` (source -> entry id, "0-0" from the start), up to `count`
        entries a source, merged (`output_order`): the run's events (source "") and what each named
        agent's handlers streamed and logged (source: the agent).

        What it returns is final: no entry can come later before it. Entries of the server's current
        millisecond are held back (another stream may still get one that sorts first), and so are
        those past the last entry of a source that filled its page (the source's next page may hold
        ones that sort first); `more` says whether a read at once could give more. `until_ms` stops
        the read there (what was written after a reader's pass began waits for its next pass)."""
        names = {self._output_key(wf_id, source): source for source in positions}
        streams = {key: positions[source] for key, source in names.items()}
        now, (reply,) = self.clocked(self.keys.wf_output(wf_id), lambda pipe: pipe.xread(streams, count=count))
        now_ms = int(now * 1000)
        cutoff = now_ms if until_ms is None else min(now_ms, until_ms)
        entries: list[OutputEntry] = []
        horizon: tuple[int, bool, str, int] | None = None
        tails: dict[str, str] = {}
        for key, items in reply or ():
            source = names[key.decode()]
            found = [OutputEntry.of(source, entry_id, fields) for entry_id, fields in items]
            tails[source] = found[-1].id
            if len(found) >= count:
                last = output_order(found[-1])
                horizon = last if horizon is None else min(horizon, last)
            entries += found
        final = [e for e in entries if e.ms < cutoff and (horizon is None or output_order(e) <= horizon)]
        final.sort(key=output_order)
        # another read may give more: a page was full before the cutoff, or entries wait for the clock
        waiting = any(now_ms <= e.ms <= now_ms + 1 and (until_ms is None or e.ms < until_ms) for e in entries)
        more = (horizon is not None and horizon[0] < cutoff) or waiting
        fresh = any(e.ms <= now_ms + 1 and until_ms is not None and e.ms >= until_ms for e in entries)
        ahead = {e.source for e in entries if e.ms > now_ms + AHEAD_MS}
        return OutputPage(final, now_ms, more, fresh, tails, ahead)

    def wait_output(self, wf_id: str, positions: Mapping[str, str], seconds: float) -> None:
        """Returns once one of the streams holds an entry past its position, or after `seconds`."""
        streams = {self._output_key(wf_id, source): after for source, after in positions.items()}
        self.redis.xread(streams, count=1, block=max(1, int(seconds * 1000)))

    def run_events(self, wf_id: str, after: str, through: str, count: int) -> list[OutputEntry]:
        """Up to `count` entries of the run's events stream past `after` and up to `through`."""
        rows = self.redis.xrange(self.keys.wf_output(wf_id), f"({after}" if after != "0-0" else "-", through, count)
        return [OutputEntry.of("", entry_id, fields) for entry_id, fields in rows]

    def _output_key(self, wf_id: str, source: str) -> str:
        return self.keys.wf_agent_output(wf_id, source) if source else self.keys.wf_output(wf_id)


class OutputEntry(NamedTuple):
    """One entry of a run's output streams: whose stream (an agent, or "" for the run's events), its id
    there, its kind (chunk, log, event) and its packed record."""

    source: str
    id: str
    kind: str
    blob: bytes

    @classmethod
    def of(cls, source: str, entry_id: bytes, fields: dict[bytes, bytes]) -> OutputEntry:
        """The entry as a stream read returns it: its id, and its fields `k` (kind) and `m` (record)."""
        return cls(source, entry_id.decode(), (fields.get(b"k") or b"").decode(), fields.get(b"m") or b"")

    @property
    def ms(self) -> int:
        return entry_order(self.id)[0]


class OutputPage(NamedTuple):
    """What one read of a run's output gives (`ClientStore.read_output`): its final entries in order,
    the server's clock, whether a read at once could give more, whether entries written after
    `until_ms` wait for the next pass, the last entry id each source returned, final or not, and the
    sources that returned entries dated well ahead of the clock (only an agent that chose its ids, or
    a clock set back, makes them: they are read once the clock reaches them)."""

    entries: list[OutputEntry]
    now_ms: int
    more: bool
    fresh: bool
    tails: dict[str, str]
    ahead: set[str]


def output_order(entry: OutputEntry) -> tuple[int, bool, str, int]:
    """Where an entry sorts among a run's output streams: by its id's millisecond (one server's clock
    stamps all of a run's streams), then the run's events before the agents' (so a task's dispatch
    comes before its output), then by agent and the id's sequence."""
    ms, seq = entry_order(entry.id)
    return ms, bool(entry.source), entry.source, seq


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as the numbers it orders by: its millisecond and its sequence."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
