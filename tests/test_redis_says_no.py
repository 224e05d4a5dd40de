"""Redis says no: a full Redis (maxmemory, noeviction) and a runaway script (BUSY) stop no process, lose
no result and leave no task running; `submit` at the limit exits 3 and writes nothing; maintenance keeps
the runs index and the events log bounded.

Each test runs on a Redis of its own module (limits and runaway scripts must not reach other tests), and
none compares clocks: the limit is held for about two seconds, then everything must simply finish.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes, RedisServer, _have_redis, short_settings, until

HOLD = 2.0  # seconds the limit (or the runaway script) holds


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="phibroker-redis-") as directory:
        own = RedisServer(Path(directory))
        own.start()
        try:
            yield own
        finally:
            own.stop()


@pytest.fixture
def settings(server: RedisServer, tmp_path: Path) -> Settings:
    return short_settings(server.url, tmp_path / "home", prefix="no")


@pytest.fixture
def root(server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on the test's Redis; whatever limit a test set is lifted after it."""
    client = redis.Redis.from_url(server.url, protocol=2)
    yield client
    client.config_set("maxmemory", 0)
    client.config_set("busy-reply-threshold", 5000)
    client.close()


def fan_out(tmp_path: Path, width: int, sleep: float, name: str = "fan") -> Path:
    tasks: dict[str, Any] = {
        f"t{i}": {"agent": "probe", "command": "work", "payload": {"sleep": sleep}} for i in range(width)
    }
    tasks["join"] = {"agent": "probe", "command": "work", "depends_on": sorted(tasks)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "tasks": tasks}))
    return path


def limit_below_use(root: redis.Redis) -> None:
    """maxmemory under what Redis holds now: every command that would grow it is refused with OOM."""
    used = int(root.info("memory")["used_memory"])
    root.config_set("maxmemory-policy", "noeviction")
    root.config_set("maxmemory", max(1, used // 2))


def cli(procs: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], env=procs.env(), capture_output=True, text=True, timeout=60
    )


def succeeded(client: Client, runs: list[str]) -> int:
    return sum(t["state"] == "succeeded" for run in runs for t in client.status(run)["tasks"].values())


def ended(client: Client, runs: list[str]) -> bool:
    return all(client.status(run)["state"] in ("succeeded", "failed", "cancelled", "timed_out") for run in runs)


def assert_all_done(client: Client, procs: Processes, runs: list[str]) -> None:
    """Every run succeeded, no task is left running, and no process died."""
    for run in runs:
        status = client.status(run)
        assert status["state"] == "succeeded", procs.output()
        assert {name: t["state"] for name, t in status["tasks"].items() if t["state"] != "succeeded"} == {}
    assert [p.args for p in procs.started if p.poll() is not None] == [], procs.output()


def logs_mention(procs: Processes, text: str) -> bool:
    return any(text in path.read_text(errors="replace") for path in procs.logs.glob("*.log"))


def test_a_full_redis_loses_no_result_and_stops_no_process(
    procs: Processes, client: Client, root: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator()
    workers = 4
    for _ in range(workers):
        procs.worker("probe", app="tests.apps.probe", concurrency=4)
    path = fan_out(tmp_path, width=200, sleep=0.1)
    runs = [client.submit(path) for _ in range(2)]
    until(lambda: succeeded(client, runs) >= 16, procs, timeout=60)

    limit_below_use(root)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        root.set(f"{settings.namespace}:room", "x")
    assert not ended(client, runs)  # the limit meets the runs in the middle
    time.sleep(HOLD)
    lifted_ms = int(root.time()[0]) * 1000
    root.config_set("maxmemory", 0)

    until(lambda: ended(client, runs), procs, timeout=120)
    assert_all_done(client, procs, runs)
    assert logs_mention(procs, "OOM"), procs.output()  # the processes did meet the limit

    def renewed_after_the_limit() -> int:  # every worker's heartbeat thread lives on
        leases = root.hgetall(settings.keys.worker_leases("probe"))
        reclaim_ms = settings.reclaim_after * 1000
        return sum(k.endswith(b"|expires") and int(v) > lifted_ms + reclaim_ms for k, v in leases.items())

    until(lambda: renewed_after_the_limit() == workers, procs)
    pending = root.xpending(settings.keys.agent_tasks("probe"), "workers")["pending"]
    pending += root.xpending(settings.keys.agent_bulk("probe"), "workers")["pending"]
    assert pending == 0  # every task acked, and only after its result was stored (all runs ended)


def test_submit_at_the_limit_exits_3_and_leaves_nothing_half_written(
    procs: Processes, root: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    keys = settings.keys
    small = fan_out(tmp_path, width=3, sleep=0.0, name="small")
    limit_below_use(root)
    refused = cli(procs, "submit", str(small), "--id", "full")
    root.config_set("maxmemory", 0)
    assert refused.returncode == 3, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "OOM" in lines[0], refused.stderr
    assert not root.exists(keys.wf("full"))
    assert root.zscore(keys.workflows, "full") is None and root.zscore(keys.running, "full") is None

    # At the edge: room for a few small writes but not for a big spec. Whatever Redis takes, `list` and
    # `status` tell the same story: the run is whole, or it is not there at all.
    big = tmp_path / "big.yaml"
    big.write_text(
        yaml.safe_dump(
            {"name": "big", "tasks": {"a": {"agent": "probe", "command": "work", "payload": {"value": "x" * 600_000}}}}
        )
    )
    root.config_set("maxmemory-policy", "noeviction")
    root.config_set("maxmemory", int(root.info("memory")["used_memory"]) + 100_000)
    edge = cli(procs, "submit", str(big), "--id", "edge")
    root.config_set("maxmemory", 0)
    assert edge.returncode in (0, 3), edge.stderr
    listed = cli(procs, "list", "--json")
    shown = cli(procs, "status", "edge", "--json")
    in_list = "edge" in [row["id"] for row in json.loads(listed.stdout)]
    if edge.returncode == 0:
        assert in_list and shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["state"] == "running"
    else:
        assert len(edge.stderr.strip().splitlines()) == 1, edge.stderr
        assert not in_list and shown.returncode == 2, shown.stderr
        assert not root.exists(keys.wf("edge")) and root.zscore(keys.workflows, "edge") is None

    # Refused before, taken now: the id was not poisoned by the half that never was.
    again = cli(procs, "submit", str(small), "--id", "full")
    assert again.returncode == 0, again.stderr
    assert "full" in [row["id"] for row in json.loads(cli(procs, "list", "--json").stdout)]
    assert cli(procs, "status", "full").returncode == 0


def test_a_runaway_script_stops_nobody(
    procs: Processes, client: Client, root: redis.Redis, server: RedisServer, tmp_path: Path
) -> None:
    root.config_set("busy-reply-threshold", 100)  # after 0.1 s of script, everyone else hears BUSY
    procs.coordinator()
    for _ in range(2):
        procs.worker("probe", app="tests.apps.probe", concurrency=4)
    # both running before the script: a process that starts while Redis is busy exits, saying so
    until(lambda: root.hlen(client.settings.keys.worker_leases("probe")) >= 4, procs)
    runs = [client.submit(fan_out(tmp_path, width=100, sleep=0.2))]
    until(lambda: succeeded(client, runs) >= 8, procs, timeout=60)
    assert not ended(client, runs)  # the script meets the run in the middle

    ended_with: list[str] = []

    def runaway() -> None:
        own = redis.Redis.from_url(server.url, protocol=2, socket_timeout=None)
        try:
            own.eval("while true do end", 0)
        except redis.exceptions.ResponseError as exc:
            ended_with.append(str(exc))
        finally:
            own.close()

    thread = threading.Thread(target=runaway, daemon=True)
    thread.start()

    def busy() -> bool:
        try:
            root.ping()
        except redis.exceptions.ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    until(busy)
    time.sleep(HOLD)
    root.script_kill()
    thread.join(timeout=30)
    assert ended_with and "killed" in ended_with[0].lower()

    until(lambda: ended(client, runs), procs, timeout=120)
    assert_all_done(client, procs, runs)
    assert logs_mention(procs, "BUSY"), procs.output()  # the processes did hear it


def test_expired_runs_leave_the_runs_index(procs: Processes, client: Client, root: redis.Redis, tmp_path: Path) -> None:
    env = {"PHIBROKER_RETENTION": "1", "PHIBROKER_TRIM_EVERY": "0.2"}
    procs.coordinator(**env)
    procs.worker("probe", app="tests.apps.probe", **env)
    waiting = tmp_path / "waiting.yaml"
    waiting.write_text(yaml.safe_dump({"name": "waiting", "tasks": {"a": {"agent": "nobody", "command": "x"}}}))
    kept = client.submit(waiting)  # no worker serves it: it runs on, long past the retention
    small = fan_out(tmp_path, width=2, sleep=0.0, name="small")
    done = [client.submit(small) for _ in range(5)]
    index = client.broker.keys.workflows
    assert {m.decode() for m in root.zrange(index, 0, -1)} == {kept, *done}

    until(lambda: {m.decode() for m in root.zrange(index, 0, -1)} == {kept}, procs, timeout=60)
    assert client.status(kept)["state"] == "running"
    assert [row["id"] for row in json.loads(cli(procs, "list", "--json").stdout)] == [kept]


def test_old_events_leave_the_log(procs: Processes, root: redis.Redis, settings: Settings) -> None:
    root.config_set("stream-node-max-entries", 10)  # small nodes, so an approximate trim is visible
    (events,) = settings.keys.event_logs  # one server: one stream
    for i in range(50):
        root.xadd(events, {"m": b"old"}, id=f"{i + 1}-0")  # written in 1970: older than any bound
    recent = [root.xadd(events, {"m": b"recent"}) for _ in range(30)]
    procs.coordinator(PHIBROKER_TRIM_EVERY="0.2")

    until(lambda: not root.xrange(events, "-", "1000000-0", count=1), procs, timeout=60)
    assert [entry_id for entry_id, _ in root.xrange(events, recent[0], recent[-1])] == recent


def test_the_events_log_is_bounded_by_size(procs: Processes, root: redis.Redis, settings: Settings) -> None:
    (events,) = settings.keys.event_logs
    for _ in range(100):
        root.xadd(events, {"m": b"x" * 20_000})  # big events, ~2 MB in all: few by count
    assert int(root.memory_usage(events, samples=0)) > 1_900_000
    procs.coordinator(PHIBROKER_TRIM_EVERY="0.2", PHIBROKER_EVENTS_MAX_BYTES="300000")

    until(lambda: int(root.memory_usage(events, samples=0)) < 600_000, procs, timeout=60)
    assert root.xlen(events) > 0  # the newest stay
