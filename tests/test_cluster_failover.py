"""Failover on a Redis Cluster of 3 masters and 3 replicas: while chains, retries, fan-outs of 100 and
200 runs of 10 tasks run, a master is killed (kill -9), its replica takes over and the node comes back
as a replica; later a master of another shard goes the same way. Each time the replica's link is cut a second before the
kill, so the promoted replica surely lacks the master's last second of writes, as asynchronous
replication may leave it. Every run ends as it must, and every task's effect is applied once.

The runs are submitted, and replicated, before the first kill: a run whose creation is lost cannot be
recovered (docs/cluster.md says what can and what cannot). Whatever else a failover loses, the
processes recover: workers read their pending entries again and coordinators every run afresh when a
master's run id changes, the reconciler dispatches again what nobody holds and sets lost retry timers
again, and a run whose end was lost (while its removal from the running index, on another master,
stayed) is indexed again.

No clock is compared: what is checked is how each run ended and what each attempt was handed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from phibroker.engine.state import timer_member
from phibroker.runtime.client import Client
from phibroker.workflow import check
from tests.conftest import Processes, RedisCluster, RedisServer, _have_redis, short_settings, until

NODE_TIMEOUT = 1500  # ms a master may stay silent before its replica takes over
RETRY = {"max_attempts": 20, "base_delay": "100ms", "max_delay": "500ms"}
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
FIRST_KILL = 15  # effects applied before the first master dies: the runs are under way
SECOND_KILL = 60  # effects applied since the first node came back, before the second dies
LOSE = 1.0  # seconds of a master's last writes its promoted replica never had


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of this test's own, since it kills nodes; fails over within seconds."""
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    with RedisCluster(tmp_path / "cluster", node_timeout=NODE_TIMEOUT) as running:
        yield running


def effect(sleep: float, failures: int = 0, after: str | None = None) -> dict[str, Any]:
    """A task whose handler applies its effect to the ledger once, after `failures` failed attempts."""
    task: dict[str, Any] = {"agent": "probe", "command": "effect", "payload": {"sleep": sleep, "failures": failures}}
    return {**task, "depends_on": [after]} if after else task


def chain(steps: int, failures: bool = False) -> dict[str, Any]:
    """Steps one after another; with `failures`, each fails its first one or two attempts (retried)."""
    tasks = {f"s{i}": effect(0.2, 1 + i % 2 if failures else 0, f"s{i - 1}" if i else None) for i in range(steps)}
    return {"name": "retries" if failures else "chain", "defaults": {"retry": RETRY}, "tasks": tasks}


def fan_out(lead: int, width: int = 100) -> dict[str, Any]:
    """A chain of `lead` steps, then `width` steps at once (the bulk lanes, a release in chunks), a join."""
    tasks = {f"l{i}": effect(0.2, after=f"l{i - 1}" if i else None) for i in range(lead)}
    for i in range(width):
        tasks[f"b{i}"] = effect(0.05, after=f"l{lead - 1}")
    tasks["join"] = {**effect(0.05), "depends_on": [f"b{i}" for i in range(width)]}
    return {"name": f"fan-out-{lead}", "defaults": {"retry": RETRY}, "tasks": tasks}


def ten() -> dict[str, Any]:
    """Ten tasks: one, eight after it, one after those."""
    tasks = {"A": effect(0.0), **{f"B{i}": effect(0.0, after="A") for i in range(8)}}
    tasks["C"] = {**effect(0.0), "depends_on": [f"B{i}" for i in range(8)]}
    return {"name": "ten", "defaults": {"retry": RETRY}, "tasks": tasks}


def run_states(client: Client, ids: list[str]) -> dict[str, str]:
    """Each run's state; `running` for all while the cluster answers no one."""
    try:
        pipe = client.broker.redis.pipeline(transaction=False)
        for wf_id in ids:
            pipe.hget(client.settings.keys.wf(wf_id), "state")
        return {wf_id: (state or b"").decode() for wf_id, state in zip(ids, pipe.execute(), strict=True)}
    except (redis.RedisError, OSError):
        return dict.fromkeys(ids, "running")


def until_ended(client: Client, ids: list[str], timeout: float) -> bool:
    """Whether every run ended within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s in TERMINAL for s in run_states(client, ids).values()):
            return True
        time.sleep(0.2)
    return False


def stuck(client: Client, ids: list[str]) -> dict[str, Any]:
    """What the runs still going wait for: each unfinished task and its last attempts."""
    waiting = {}
    for wf_id in ids:
        status = client.status(wf_id)
        if status["state"] not in TERMINAL:
            tasks = {
                n: (t["state"], t["history"][-2:]) for n, t in status["tasks"].items() if t["state"] != "succeeded"
            }
            waiting[wf_id] = (status["state"], dict(list(tasks.items())[:5]))
    return waiting


def test_runs_survive_two_masters_failing_over(
    cluster: RedisCluster, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = short_settings(cluster.url, tmp_path / "home", prefix="fo")
    settings = settings.model_copy(update={"reclaim_after": 5.0, "coordinator_takeover": 3.0})
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(settings, logs)
    ledger = f"{settings.namespace}:ledger"
    limits = {"PHIBROKER_MAX_DELIVERIES": "50"}
    worker_env = {"PROBE_LEDGER_URL": redis_server.url, "PROBE_LEDGER_KEY": ledger, **limits}
    coordinator_env = {"PHIBROKER_RECONCILE_EVERY": "0.5", "PHIBROKER_TIMER_CLAIM": "2", **limits}
    effects = redis.Redis.from_url(redis_server.url, decode_responses=True)  # outside the cluster: loses nothing
    runs = [chain(40), chain(40), chain(16, failures=True), chain(16, failures=True), fan_out(3), fan_out(25)]
    runs += [ten() for _ in range(200)]
    try:
        for _ in range(2):
            procs.coordinator(**coordinator_env)
            procs.worker("probe", app="tests.apps.probe", concurrency=4, **worker_env)
        with Client(settings) as client:
            keys = settings.keys
            until(
                lambda: (
                    len(client.broker.leases(keys.coordinators)[1]) >= 2 and len(client.broker.worker_leases()[1]) >= 2
                ),
                procs,
                timeout=60,
            )
            ids = [client.submit(check(spec)) for spec in runs]
            cluster.wait_replicated()  # no submit is lost with a master
            began = time.monotonic()
            until(lambda: effects.hlen(ledger) >= FIRST_KILL, procs, timeout=60)
            killed, promoted = cluster.kill_master(lose=LOSE)
            cluster.restart(killed)
            applied = effects.hlen(ledger)
            until(lambda: effects.hlen(ledger) >= applied + SECOND_KILL, procs, timeout=60)
            ended_before = sum(state in TERMINAL for state in run_states(client, ids).values())
            second, _ = cluster.kill_master(spare=(killed, promoted), lose=LOSE)
            cluster.restart(second)
            ended = until_ended(client, ids, timeout=90)
            assert ended, (stuck(client, ids), procs.output())
            elapsed = time.monotonic() - began
            statuses = [client.status(wf_id) for wf_id in ids]
    finally:
        procs.close()
    attempts = [h for s in statuses for t in s["tasks"].values() for h in t["history"]]
    redispatched = sum(1 for h in attempts if "nobody holds it" in str(h["error"]))
    reruns = sum(int(v) - 1 for v in effects.hvals(f"{ledger}:runs"))
    print(
        f"\nfailover: {len(runs)} runs, {len(attempts)} attempts, {ended_before} runs had ended at the second "
        f"kill, {cluster.lost} bytes of writes lost, dispatched again {redispatched}, handler re-runs {reruns}, "
        f"{elapsed:.1f}s"
    )
    assert cluster.lost > 0 and ended_before < len(runs)  # writes were lost, the second time too with runs going
    expected = set()
    for spec, status in zip(runs, statuses, strict=True):
        failed = {n: t["error"] for n, t in status["tasks"].items() if t["state"] != "succeeded"}
        assert status["state"] == "succeeded", (status["id"], status["error"], failed, procs.output())
        for name, task in status["tasks"].items():
            where = (status["id"], name, task["history"])
            expected.add(f"{status['id']}:{name}")
            assert len([h for h in task["history"] if h["applied"] and h["error"] is None]) == 1, where
            # Dispatched only once every dependency had succeeded: it was handed each of their results.
            assert task["result"]["inputs"] == sorted(spec["tasks"][name].get("depends_on", [])), where
    assert set(effects.hkeys(ledger)) == expected  # each effect once, and nothing else


def test_a_lost_retry_timer_and_a_lost_index_entry_are_set_again(cluster: RedisCluster, tmp_path: Path) -> None:
    """Each loss made on purpose, as a failover may leave it: a retry's timer gone (the reconciler sets
    it again once it is `reclaim_after` late), and a run going that the running index lacks (its end was
    lost, its removal from the index stayed: coordinators put it back when a master changes, here by a
    `CLUSTER FAILOVER`, which loses nothing)."""
    settings = short_settings(cluster.url, tmp_path / "home", prefix="fl")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(settings, logs)
    keys = settings.keys
    flaky = {"agent": "probe", "command": "flaky", "payload": {"failures": 1}}
    retried = check(
        {"name": "retried", "tasks": {"Flaky": {**flaky, "retry": {"max_attempts": 2, "base_delay": "2s"}}}}
    )
    held = check({"name": "held", "tasks": {"Hold": {"agent": "probe", "command": "hold", "payload": {"sleep": 120}}}})
    try:
        procs.coordinator(PHIBROKER_RECONCILE_EVERY="0.5")
        procs.worker("probe", app="tests.apps.probe")
        with Client(settings) as client:
            broker = client.broker.redis
            until(lambda: "probe" in client.live_agents(), procs, timeout=60)
            wf_id = client.submit(retried)
            timer = timer_member("retry", wf_id, "Flaky", 1)
            until(lambda: broker.zscore(keys.timer_set(wf_id), timer) is not None, procs, timeout=60)
            assert broker.zrem(keys.timer_set(wf_id), timer) == 1  # before it is due
            assert client.wait(wf_id, timeout=60)["tasks"]["Flaky"]["attempts"] == 2

            going = client.submit(held)
            until(lambda: client.status(going)["tasks"]["Hold"]["state"] == "running", procs, timeout=60)
            assert broker.zrem(keys.running, going) == 1
            master = next(node for node in cluster.nodes if cluster.role(node) == "master")
            replica = cluster.replicas_of(master)[0]
            assert cluster.command(replica, "CLUSTER", "FAILOVER").strip() == "OK"
            until(lambda: cluster.serving(replica), procs, timeout=60)
            until(lambda: broker.zscore(keys.running, going) is not None, procs, timeout=60)
            client.cancel(going)
            assert client.wait(going, timeout=60)["state"] == "cancelled"
    finally:
        procs.close()
