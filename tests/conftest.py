"""The test harness: a private redis-server for the session, a fresh namespace for every test.

Integration tests skip on a laptop without `redis-server`, and fail in CI (`CI` set), where it must exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from phibroker.settings import Settings
from phibroker.testing import RedisCluster, RedisServer, free_port

__all__ = ["RedisCluster", "RedisServer", "free_port"]


def _have_redis() -> bool:
    if shutil.which("redis-server"):
        return True
    if os.environ.get("CI"):
        pytest.fail("redis-server is required in CI (.ci/run installs it)")
    return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="phibroker-redis-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 masters and 3 replicas on free ports, for the session."""
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="phibroker-cluster-") as directory:
        with RedisCluster(Path(directory)) as cluster:
            yield cluster


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server writing an append-only file, for tests that restart it or cut that file."""
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, appendonly=True)
    server.start()
    yield server
    server.stop(kill=True)


def short_settings(redis_url: str, home: Path, prefix: str = "t") -> Settings:
    """A namespace of its own and short timeouts, so liveness tests take seconds, not minutes."""
    return Settings(
        redis_url=redis_url,
        namespace=f"{prefix}{uuid.uuid4().hex[:10]}",
        home=home,
        reclaim_after=2.0,
        coordinator_takeover=1.0,
        worker_block=0.5,
    )


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    """Settings for one test: the session's Redis, a namespace of its own, short timeouts."""
    return short_settings(redis_server.url, tmp_path / "home")


@contextmanager
def working(worker: Any) -> Iterator[Any]:
    """A `Worker` running in a thread of this process while inside; stopped, and its thread ended, after."""
    thread = threading.Thread(target=worker.work, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=60)
        assert not thread.is_alive()


def until(check: Any, procs: Processes | None = None, timeout: float = 20) -> Any:
    """Wait for `check()` to be truthy and return it; on timeout, fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, procs.output() if procs else "timed out"
        time.sleep(0.05)
    return value


def aof_tail(directory: Path) -> Path:
    """The file Redis appends to: the newest incremental AOF (Redis 7), or the single AOF (older)."""
    parts = sorted((directory / "appendonlydir").glob("*.incr.aof"), key=lambda p: int(p.name.split(".")[-3]))
    return parts[-1] if parts else directory / "appendonly.aof"


REPO = Path(__file__).resolve().parent.parent


class Processes:
    """Real `phibroker` processes for one test, killed at its end; their logs kept beside the test."""

    def __init__(self, settings: Settings, logs: Path):
        self.settings = settings
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        env = {
            **os.environ,
            "PHIBROKER_REDIS_URL": s.redis_url,
            "PHIBROKER_NAMESPACE": s.namespace,
            "PHIBROKER_HOME": str(s.home),
            "PHIBROKER_RECLAIM_AFTER": str(s.reclaim_after),
            "PHIBROKER_COORDINATOR_TAKEOVER": str(s.coordinator_takeover),
            "PHIBROKER_WORKER_BLOCK": str(s.worker_block),
            "PYTHONPATH": str(REPO),
        }
        env.update(extra)
        return env

    def spawn(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}-{len(self.started)}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "phibroker", *args], env=self.env(**env), stdout=log, stderr=subprocess.STDOUT
        )
        self.started.append(process)
        return process

    def coordinator(self, **env: str) -> subprocess.Popen[bytes]:
        return self.spawn("coordinator", "coordinator", **env)

    def worker(
        self, agent: str, app: str = "tests.apps.examples", concurrency: int = 4, **env: str
    ) -> subprocess.Popen[bytes]:
        return self.spawn(
            f"worker-{agent}", "worker", "--agent", agent, "--app", app, "--concurrency", str(concurrency), **env
        )

    def examples(self) -> None:
        """A coordinator and one worker for each agent of the example workflows."""
        self.coordinator()
        for agent in ("webc", "dc", "vssc", "kalic", "cmdc"):
            self.worker(agent)

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
        for process in self.started:
            process.wait(timeout=10)

    def output(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def procs(settings: Settings, tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = Processes(settings, logs)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[Any]:
    from phibroker.runtime.client import Client

    with Client(settings) as c:
        yield c
