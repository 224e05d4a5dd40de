"""Chaos: a 500-task workflow of fan-outs and joins while workers and coordinators are kill -9ed and
restarted every ~0.5 s (and, in one run, Redis itself restarts with AOF on). Nothing may be lost, no
task may start before its dependencies finished, and every effect is applied once.

No clock is compared: order is proven by what each attempt was handed (its dependencies' results)."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from phibroker.runtime.client import Client
from tests.conftest import Processes, RedisServer, _have_redis, short_settings


def layered_workflow(tasks: int = 500, width: int = 50, seed: int = 3) -> dict[str, Any]:
    """Layers of `width` tasks; each task past the first layer joins 1–3 tasks of the layer before."""
    rand = random.Random(seed)
    spec: dict[str, Any] = {}
    for i in range(tasks):
        layer = i // width
        task: dict[str, Any] = {"agent": "probe", "command": "effect", "payload": {"sleep": 0.04}}
        if layer:
            previous = range((layer - 1) * width, layer * width)
            task["depends_on"] = [f"t{j}" for j in sorted(rand.sample(previous, rand.randint(1, 3)))]
        spec[f"t{i}"] = task
    # The handlers write their ledger to the Redis that restarts: that error is transient, so retried.
    retry = {"max_attempts": 20, "base_delay": "100ms", "max_delay": "1s", "retry_on": ["ConnectionError", "Loading"]}
    return {"name": "chaos", "defaults": {"retry": retry}, "tasks": spec}


WORKERS = 3
KILLS = 40
"""Kills per run, then the run finishes in peace: an unloaded machine ends the workflow within about 20
kills, and a loaded one would otherwise go on killing for as long as it is slow."""

MAX_DELIVERIES = 2 * KILLS * WORKERS + 10
"""A message is delivered again only when its holder's lease lapsed, and each kill lets each live worker
claim the dead one's entries at most once (and read them back once as its own as it starts): no kill
schedule can use this up, so a task that fails as `lost` is a real loss, however slow the machine (the
margin covers a starved worker's lapsed lease)."""


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("restart_redis", [False, True], ids=["kills", "kills+redis-restart"])
def test_chaos(restart_redis: bool, aof_server: RedisServer, tmp_path: Path) -> None:
    settings = short_settings(aof_server.url, tmp_path / "home", prefix="chaos")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(settings, logs)
    ledger = f"{settings.namespace}:ledger"
    env = {
        "PROBE_LEDGER_URL": settings.redis_url,
        "PROBE_LEDGER_KEY": ledger,
        "PHIBROKER_MAX_DELIVERIES": str(MAX_DELIVERIES),
    }
    spec = layered_workflow()
    path = tmp_path / "chaos.yaml"
    path.write_text(yaml.safe_dump(spec))
    rand = random.Random(11)
    kills = restarts = 0
    try:
        coordinators = [procs.coordinator() for _ in range(2)]
        workers = [procs.worker("probe", app="tests.apps.probe", concurrency=4, **env) for _ in range(WORKERS)]
        with Client(settings) as client:
            wf_id = client.submit(path)
            began = time.monotonic()
            restarted_redis = False
            while client_state(client, wf_id) == "running":
                assert time.monotonic() - began < 180, procs.output()
                time.sleep(0.5)
                if kills < KILLS:
                    pool, role = (coordinators, "coordinator") if rand.random() < 0.3 else (workers, "worker")
                    index = rand.randrange(len(pool))
                    pool[index].send_signal(signal.SIGKILL)
                    pool[index].wait()
                    kills += 1
                    if role == "coordinator":
                        pool[index] = procs.coordinator()
                    else:
                        pool[index] = procs.worker("probe", app="tests.apps.probe", concurrency=4, **env)
                    restarts += 1
                if restart_redis and not restarted_redis and time.monotonic() - began > 3:
                    aof_server.restart()  # SHUTDOWN with AOF on: every acknowledged write survives
                    restarted_redis = True
            status = client.wait(wf_id, timeout=120)
        elapsed = time.monotonic() - began
    finally:
        procs.close()
    states = {name: task["state"] for name, task in status["tasks"].items()}
    lost = [name for name, state in states.items() if state != "succeeded"]
    r = redis.Redis.from_url(settings.redis_url)
    applied = {k.decode() for k in r.hkeys(ledger)}
    runs = {k.decode(): int(v) for k, v in r.hgetall(f"{ledger}:runs").items()}
    reruns = sum(runs.values()) - len(runs)
    reclaims = max(
        sum(1 for h in t["history"] if str(h["error"]).startswith("lost:")) for t in status["tasks"].values()
    )
    print(
        f"\nchaos: {len(states)} tasks, {kills} kills, {restarts} restarts, redis restarted: {restart_redis}, "
        f"lost {len(lost)}, applied twice 0 of {len(applied)}, handler re-runs {reruns}, "
        f"most reclaims of one task {reclaims} (of {MAX_DELIVERIES - 1} allowed), {elapsed:.1f}s"
    )
    failed = {n: t["error"] for n, t in status["tasks"].items() if t["state"] == "failed"}
    assert status["state"] == "succeeded" and not lost, (status["error"], failed, lost[:5], procs.output())
    assert applied == {f"{wf_id}:{name}" for name in states}
    for name, task in status["tasks"].items():
        assert len([h for h in task["history"] if h["applied"] and h["error"] is None]) == 1, name
        # The attempt that counted was handed the result of every dependency: it was dispatched only
        # after each of them had succeeded (a dispatch carries the results of succeeded ones only).
        assert task["result"]["inputs"] == sorted(spec["tasks"][name].get("depends_on", [])), name


def client_state(client: Client, wf_id: str) -> str:
    try:
        return str(client.broker.read_workflow(wf_id)[0].get("state"))
    except Exception:  # noqa: BLE001 - Redis may be restarting right now
        return "running"
