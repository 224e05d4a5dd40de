"""The longest Lua call: Redis's SLOWLOG with every command logged, drained while a workload runs.

A script blocks every client of Redis while it runs, so the target is on the single longest EVALSHA
(≤ 10 ms, whatever the DAG's shape). A big workload writes more entries than `slowlog-max-len` keeps, so
a thread reads and resets the log atomically (MULTI) every `every` seconds and keeps the maximum.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

import redis

from phibroker.store import scripts

MAX_LEN = 100_000


def script_names() -> dict[str, str]:
    """sha1 → name of every script in `phibroker.scripts`, so the longest call says which script it was."""
    names: dict[str, str] = {}
    for name, value in vars(scripts).items():
        if isinstance(value, str) and "redis.call" in value:
            names[hashlib.sha1(value.encode()).hexdigest()] = name  # noqa: S324 - the name Redis gives a script
    return names


@dataclass
class Longest:
    ms: float = 0.0
    script: str = ""
    calls: int = 0  # EVALSHA calls seen


class SlowlogWatch:
    """`with SlowlogWatch(url) as watch: ...` then `watch.longest`: the longest EVALSHA in between."""

    def __init__(self, url: str, every: float = 0.25):
        self.redis = redis.Redis.from_url(url, protocol=2)
        self.every = every
        self.longest = Longest()
        self.names = script_names()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._saved: dict[Any, Any] = {}

    def __enter__(self) -> SlowlogWatch:
        self._saved = dict(self.redis.config_get("slowlog-*"))  # put back on the way out
        self.redis.config_set("slowlog-max-len", MAX_LEN)
        self.redis.config_set("slowlog-log-slower-than", 0)
        self.redis.slowlog_reset()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        for key, value in self._saved.items():
            self.redis.config_set(key, value)
        self.redis.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._drain()

    def _drain(self) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.slowlog_get(-1)
        pipe.slowlog_reset()
        entries, _ = pipe.execute()
        for entry in entries:
            command = entry["command"].split(b" ", 2)
            if command[0].upper() != b"EVALSHA":
                continue
            self.longest.calls += 1
            ms = entry["duration"] / 1000
            if ms > self.longest.ms:
                sha = command[1].decode() if len(command) > 1 else ""
                self.longest = Longest(ms, self.names.get(sha, sha[:12]), self.longest.calls)
