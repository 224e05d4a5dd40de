"""A worker's handler capacity: the slots its handlers take and the threads that run them.

The fetch loop waits for a free slot, handler threads give theirs back as they end, and task handlers
and reactions share the same slots and threads: one count, guarded in one place, instead of a counter and
a condition variable spread over the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("phibroker.worker")  # handler threads log as the worker they serve


class Slots:
    """How many handlers run now out of the `size` the worker may run at once."""

    def __init__(self, size: int, stopping: threading.Event):
        self.size = size
        self.busy = 0  # handlers executing now
        self.stopping = stopping  # a stopping worker waits for no slot
        self.changed = threading.Condition()

    @property
    def free(self) -> int:
        return self.size - self.busy

    def take(self) -> None:
        """One handler more: the caller saw a free slot and hands out a job."""
        with self.changed:
            self.busy += 1

    def give(self) -> None:
        """One handler less: wake the loop waiting for a slot."""
        with self.changed:
            self.busy -= 1
            self.changed.notify_all()

    def wait_free(self, timeout: float | None, want: int = 1) -> bool:
        """Wait until `want` slots are free or the worker stops; False when the timeout came first."""
        with self.changed:
            return self.changed.wait_for(lambda: self.free >= want or self.stopping.is_set(), timeout)

    def wake(self) -> None:
        """Wake whoever waits for a slot (the worker is stopping)."""
        with self.changed:
            self.changed.notify_all()


class HandlerThreads:
    """Up to `size` threads, each taking the next job from one queue: no future per task, and a thread
    that finishes a job takes the next one without a wake-up (a thread pool's per-task cost was as big
    as the rest of a no-op task's). The worker hands out no more jobs than it has free slots."""

    def __init__(self, size: int, name: str):
        self.size = size
        self.name = name
        self.jobs: queue.SimpleQueue[tuple[Callable[[Any], None], Any] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def submit(self, job: Callable[[Any], None], arg: Any) -> None:
        if len(self.threads) < self.size:
            thread = threading.Thread(target=self._serve, name=f"{self.name}_{len(self.threads)}", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.jobs.put((job, arg))

    def _serve(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, arg = item
            try:
                job(arg)
            except BaseException:  # noqa: BLE001 - a job reports its own failures; the thread stays for the next
                log.exception("handler thread: %s failed", getattr(job, "__name__", job))

    def shutdown(self) -> None:
        """Let each thread end after the jobs queued before this."""
        for _ in self.threads:
            self.jobs.put(None)
