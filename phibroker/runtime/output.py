"""A task's live output: `ctx.stream` chunks and its handler's log records, appended to the run's output
stream as they come (not with the result), each tagged with its unit, attempt and place in the attempt.

The worker gives each attempt an `AttemptOutput`; `Agent.execute` makes it the current one while the
handler runs (a context variable: the handler's thread, and the asyncio tasks of an async handler). One
logging handler per process sends records at INFO and up to whichever attempt is current where they
are emitted, so records of other threads (the worker's own) never land in a task's output.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from phibroker import wire
from phibroker.engine import records
from phibroker.errors import OutputRefused
from phibroker.runtime.agent import STREAM_CHUNK_LIMIT, Context, current_output
from phibroker.store.connection import reaching

if TYPE_CHECKING:
    from phibroker.settings import Settings
    from phibroker.store.worker import WorkerStore

LOG_MESSAGE_LIMIT = 60_000  # bytes of a log record's message kept: the record stays under a chunk's limit


class AttemptOutput:
    """Where one attempt's chunks and log records go. `seq` counts what it added, from 1; the attempt's
    `task.started` event goes first, with its first entry, so a reader sees the start before the output."""

    def __init__(self, broker: WorkerStore, settings: Settings, ctx: Context, started: dict[str, Any] | None = None):
        self.broker = broker
        self.settings = settings
        self.wf_id = ctx.workflow_id
        self.unit = ctx.unit
        self.partition = ctx.partition[0] if ctx.partition else None
        self.attempt = ctx.attempt
        self.seq = 0
        self._opening = started  # not yet in the stream
        self._lock = threading.Lock()  # one entry at a time: `seq` follows the stream's order

    def chunk(self, value: Any) -> None:
        """Append a chunk now; raises MessageTooLarge over 64 KiB, OutputRefused once the run's output
        is full (what it holds stays), BrokerUnavailable when Redis cannot take it."""
        check_chunk(value, self.unit)
        self._append("chunk", value)

    def log(self, record: logging.LogRecord) -> None:
        """Append a log record; never raises: a handler's logging must not fail its task."""
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        raw = message.encode("utf-8", "replace")
        if len(raw) > LOG_MESSAGE_LIMIT:
            message = raw[:LOG_MESSAGE_LIMIT].decode("utf-8", "ignore") + "…"
        data = {"level": record.levelname, "logger": record.name, "message": message}
        try:
            self._append("log", data)
        except Exception:  # noqa: BLE001 - full, gone or unreachable: the record is dropped, the task goes on
            return

    def _append(self, kind: str, data: Any) -> None:
        with self._lock:
            blob = records.output_record(self.unit, self.partition, self.attempt, self.seq + 1, data, time.time())
            limit = self.settings.output_max_bytes
            entries = [("event", wire.encode_events([self._opening]))] if self._opening else []
            with reaching(self.settings):
                added, used = self.broker.append_output(self.wf_id, [*entries, (kind, blob)], limit)
            if added == 1:
                self.seq += 1
                self._opening = None
                return
        if added == 0:
            raise OutputRefused(
                f"run {self.wf_id}'s output is full: it holds {used} bytes, and {len(blob)} more would pass"
                f" output_max_bytes ({limit}); what it holds stays"
            )
        raise OutputRefused(f"run {self.wf_id} has no output stream (it has ended and expired)")


def check_chunk(value: Any, unit: str) -> bytes:
    """The chunk packed; a chunk over 64 KiB (packed) is refused, and so is one msgpack cannot pack."""
    return wire.pack_limited(value, STREAM_CHUNK_LIMIT, f"a chunk streamed by {unit}")


class _Capture(logging.Handler):
    """Records emitted where an attempt is current go to its output; others pass by."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._inside = threading.local()  # a record logged while appending one (by redis-py) is not sent

    def emit(self, record: logging.LogRecord) -> None:
        output = current_output.get()
        if output is None or getattr(self._inside, "busy", False):
            return
        self._inside.busy = True
        try:
            output.log(record)
        except Exception:  # noqa: BLE001 - a record that does not format: logging's own report
            self.handleError(record)
        finally:
            self._inside.busy = False


_capture: _Capture | None = None
_install = threading.Lock()


def capture_logs() -> None:
    """Install the handler on the root logger, once per process. A process that logs above INFO would
    never make the INFO records a task's output wants: its root logger is set to INFO, and its handlers
    to the level it had, so what it prints stays the same (with no handler, Python's last resort one
    prints warnings: it is added, for the same reason)."""
    global _capture
    with _install:
        if _capture is not None:
            return
        root = logging.getLogger()
        shown = root.getEffectiveLevel()
        if shown > logging.INFO:
            if not root.handlers and logging.lastResort is not None:
                root.addHandler(logging.lastResort)
            for handler in root.handlers:
                handler.setLevel(max(handler.level, shown))
            root.setLevel(logging.INFO)
        _capture = _Capture()
        root.addHandler(_capture)
