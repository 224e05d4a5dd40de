"""The bulk lane's work a coordinator has read but not handled yet, and the timers waiting for it.

A round spends a bounded time on the bulk lane, so a big fan-out's results can be held over the next
rounds. Meanwhile the timers claimed for those workflows (deadlines above all) wait: a result read
before its deadline fired is applied first. The held entries stay pending on this coordinator, so its
maintenance must know them as held, not stranded.
"""

from __future__ import annotations

from collections.abc import Iterable

from phibroker import wire
from phibroker.engine import state
from phibroker.errors import DecodeError
from phibroker.settings import Settings
from phibroker.store.connection import Entry


class HeldWork:
    """Bulk-lane entries read but not handled yet, and the claimed timers that wait for them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # bulk-lane entries read but not handled yet (the budget ran out), each with its lane
        self.entries: list[tuple[str, Entry]] = []
        self.timers: dict[str, None] = {}  # claimed timers waiting for held results of their workflow
        self._workflows: set[str] | None = None  # the workflows of the held entries, once read
        self._counted: set[tuple[str, str]] = set()  # the entries (lane, id) `_workflows` was read from

    def __len__(self) -> int:
        """Held entries and timers: work a burst run must not stop on."""
        return len(self.entries) + len(self.timers)

    def keep(self, entries: list[tuple[str, Entry]]) -> None:
        """Hold what a round's bulk slices left over (nothing: the held batch is done). On a cluster a
        shard's blocking read may hand in bulk entries while some are held: the workflows are read again."""
        self.entries = entries
        if any((lane, entry.id) not in self._counted for lane, entry in entries):
            self._workflows = None

    def drop(self) -> None:
        """Forget the held entries: still pending on this coordinator, its recovery read brings them back."""
        self.entries, self._workflows = [], None

    def wait(self, timers: Iterable[str]) -> None:
        """Hold claimed timers until their workflow has no held results left."""
        self.timers.update(dict.fromkeys(timers))

    def due_timers(self) -> list[str]:
        """Take the held timers whose workflow has no held results any more."""
        waiting = self.workflows() if self.entries else set()
        due = [t for t in self.timers if state.timer_workflow(t) not in waiting]
        for member in due:
            del self.timers[member]
        return due

    def take_timers(self) -> list[str]:
        """Take every held timer (on a clean stop, once the held results are handled)."""
        fired, self.timers = list(self.timers), {}
        return fired

    def ids(self, lane: str) -> set[str]:
        """The ids of the entries held from `lane`."""
        return {entry.id for held_lane, entry in self.entries if held_lane == lane}

    def workflows(self) -> set[str]:
        """The workflows with results in the held bulk entries, read once per held batch (read again
        when entries join it; as entries are handled, the set only ever over-counts)."""
        if self._workflows is None:
            self._workflows = set()
            self._counted = {(lane, entry.id) for lane, entry in self.entries}
            for _, entry in self.entries:
                try:
                    message = wire.Inbox.decode(entry.raw or b"", self.settings.max_message_bytes * 4)
                except DecodeError:
                    continue
                self._workflows.update(result.wf for result in message.results)
        return self._workflows
