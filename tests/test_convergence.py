"""Convergence: after Redis loses its last writes every run still ends, and a worker paused
past its lease never starts or acks work it no longer owns. Real processes on a real redis-server.

No clock is compared: each wait is generous, and what is checked is where the runs and entries end up."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import redis
import yaml

from phibroker.keys import WORKERS_GROUP
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes, RedisServer, aof_tail, short_settings, until

TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
FAST = {"PHIBROKER_RECONCILE_EVERY": "0.5"}  # coordinators look for unheld tasks often: the tests take seconds


def _processes(settings: Settings, tmp_path: Path) -> Processes:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    return Processes(settings, logs)


def _state(client: Client, wf_id: str) -> str:
    try:
        return str(client.broker.read_workflow(wf_id)[0].get("state"))
    except Exception:  # noqa: BLE001 - Redis may be restarting right now
        return "running"


def layers(tasks: int = 15, width: int = 5) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for i in range(tasks):
        task: dict[str, Any] = {"agent": "probe", "command": "work", "payload": {"sleep": 0.15}}
        if i >= width:
            layer = i // width
            task["depends_on"] = [f"t{(layer - 1) * width + (i + k) % width}" for k in (0, 1)]
        spec[f"t{i}"] = task
    return {"name": "layers", "tasks": spec}


def test_runs_end_after_redis_loses_its_last_writes(aof_server: RedisServer, tmp_path: Path) -> None:
    """kill -9 of Redis mid-run, the AOF's last ~0.5 s cut, a restart: every run still ends."""
    settings = short_settings(aof_server.url, tmp_path / "home", prefix="conv")
    procs = _processes(settings, tmp_path)
    path = tmp_path / "layers.yaml"
    path.write_text(yaml.safe_dump(layers()))
    runs = 20
    try:
        procs.coordinator(**FAST)
        procs.coordinator(**FAST)
        for _ in range(2):
            procs.worker("probe", app="tests.apps.probe", concurrency=4)
        r = redis.Redis.from_url(settings.redis_url)
        until(
            lambda: r.hlen(settings.keys.worker_leases("probe")) >= 4 and r.hlen(settings.keys.coordinators) >= 4, procs
        )
        with Client(settings) as client:
            tail = aof_tail(aof_server.directory)
            sizes: list[tuple[float, int]] = []
            ids: list[str] = []
            began = time.monotonic()
            # Runs start one after another, so some have ended and some are mid-way at the kill; the
            # last starts a second before it, so the cut takes no submit.
            while time.monotonic() - began < 0.2 * runs + 1.0:
                if len(ids) < runs and time.monotonic() - began >= 0.2 * len(ids):
                    ids.append(client.submit(path))
                sizes.append((time.monotonic(), tail.stat().st_size))
                time.sleep(0.02)
            done = sum(_state(client, wf_id) in TERMINAL for wf_id in ids)
            aof_server.stop(kill=True)
            cut_at = time.monotonic() - 0.5
            keep = max(size for at, size in sizes if at <= cut_at)
            lost = tail.stat().st_size - keep
            with open(tail, "r+b") as fh:
                fh.truncate(keep)
            aof_server.start()
            deadline = time.monotonic() + 180
            states: dict[str, str] = {}
            while time.monotonic() < deadline:
                states = {wf_id: _state(client, wf_id) for wf_id in ids}
                if all(state in TERMINAL for state in states.values()):
                    break
                time.sleep(0.5)
            stuck = {wf_id: state for wf_id, state in states.items() if state not in TERMINAL}
            assert not stuck, (stuck, procs.output())
            statuses = [client.status(wf_id) for wf_id in ids]
    finally:
        procs.close()
    redispatched = sum(
        1
        for status in statuses
        for task in status["tasks"].values()
        for attempt in task["history"]
        if str(attempt["error"]).startswith("lost: nobody holds it")
    )
    print(f"\nAOF cut: {lost} bytes lost, {done} of {runs} runs had ended, {redispatched} tasks dispatched again")
    assert lost > 0 and done < runs  # the cut took writes of runs still going
    failed = {s["id"]: s["error"] for s in statuses if s["state"] != "succeeded"}
    assert not failed, failed
    for status in statuses:
        for name, task in status["tasks"].items():
            assert task["state"] == "succeeded", (status["id"], name, task)


def test_a_run_the_running_index_lost_to_a_restart_still_ends(aof_server: RedisServer, tmp_path: Path) -> None:
    """What a restart from an older AOF once left: a run's last commit was cut, but the coordinator's
    removal of the run from the running index, retried by the client onto the restarted Redis, was
    not, so the reconciler never looked at it again; its task's entry is gone too. A coordinator that
    sees Redis restart walks the runs and puts such a run back in the index: it ends."""
    settings = short_settings(aof_server.url, tmp_path / "home", prefix="reindex")
    procs = _processes(settings, tmp_path)
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump({"name": "one", "tasks": {"only": {"agent": "probe", "command": "noop"}}}))
    r = redis.Redis.from_url(settings.redis_url)
    keys, stream = settings.keys, settings.keys.agent_tasks("probe")
    try:
        procs.coordinator(**FAST)
        with Client(settings) as client:
            wf_id = client.submit(path)
            until(lambda: r.exists(stream) and r.xlen(stream) >= 1, procs)
            for entry_id, _ in r.xrange(stream):
                r.xdel(stream, entry_id)
            r.zrem(keys.running, wf_id)
            aof_server.stop()  # a clean stop: the AOF keeps all of the above; the coordinator sees a new run id
            aof_server.start()
            procs.worker("probe", app="tests.apps.probe", concurrency=2)
            status = client.wait(wf_id, timeout=60)
    finally:
        procs.close()
    assert status["state"] == "succeeded", (status, procs.output())


def test_a_paused_worker_neither_acks_nor_starts_what_another_claimed(
    settings: Settings, tmp_path: Path, redis_server: RedisServer
) -> None:
    """W1 runs a task and is SIGSTOPped with two more prefetched; W2 claims all three; W1 resumes: its
    late result is recorded, but it acks none of W2's entries and starts none of them; W2 is killed:
    every task still ends, each with one applied result."""
    log = tmp_path / "pacer.log"
    procs = _processes(settings, tmp_path)
    spec = {"name": "paced", "tasks": {name: {"agent": "pacer", "command": "paced"} for name in "abc"}}
    path = tmp_path / "paced.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {"PACER_LOG": str(log)}
    r = redis.Redis.from_url(settings.redis_url)
    stream = settings.keys.agent_tasks("pacer")

    def lines() -> list[list[str]]:
        return [line.split() for line in log.read_text().splitlines()] if log.exists() else []

    try:
        procs.coordinator(**FAST)
        w1 = procs.worker("pacer", app="tests.apps.pacer", concurrency=1, PACER_SLEEP="3", **env)
        with Client(settings) as client:
            wf_id = client.submit(path)
            first = until(lambda: next((x for x in lines() if x[0] == "start"), None), procs)
            task = first[1]
            assert first[3] == str(w1.pid)
            until(lambda: r.xpending(stream, WORKERS_GROUP)["pending"] == 3, procs)  # all three read by W1
            w1.send_signal(signal.SIGSTOP)
            w2 = procs.worker("pacer", app="tests.apps.pacer", concurrency=3, PACER_SLEEP="8", **env)
            until(lambda: any(x[:2] == ["start", task] and x[3] == str(w2.pid) for x in lines()), procs, timeout=60)
            w1.send_signal(signal.SIGCONT)

            def late() -> bool:
                history = client.status(wf_id)["tasks"][task]["history"]
                return any("late result" in str(h["error"]) for h in history)

            until(late, procs, timeout=60)
            time.sleep(1.0)  # W1 had its chance to ack or start what is W2's now
            pending = r.xpending_range(stream, WORKERS_GROUP, min="-", max="+", count=10)
            owners = {row["consumer"].decode().split(":")[-2] for row in pending}
            assert owners == {str(w2.pid)} and len(pending) == 3, (pending, procs.output())
            assert [x for x in lines() if x[0] == "start" and x[3] == str(w1.pid)] == [first]
            w2.kill()
            w2.wait()
            status = client.wait(wf_id, timeout=120)
    finally:
        procs.close()
    assert status["state"] == "succeeded", (status, procs.output())
    for name, info in status["tasks"].items():
        applied = [h for h in info["history"] if h["applied"] and h["error"] is None]
        assert len(applied) == 1, (name, info["history"])


def test_a_running_tasks_lost_deadline_timer_is_set_again(
    settings: Settings, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A task's deadline timer gone (a drain that removed it sent again, by the client's own retry, to a
    Redis that lost the commit that set it): the reconciler sets it again, and the task times out."""
    procs = _processes(settings, tmp_path)
    path = tmp_path / "slow.yaml"
    task = {"agent": "probe", "command": "stubborn", "payload": {"sleep": 40}, "timeout": "1s"}  # answers late
    path.write_text(yaml.safe_dump({"name": "slow", "tasks": {"only": task}}))
    r = redis.Redis.from_url(settings.redis_url)
    (timers,) = settings.keys.timer_sets
    try:
        procs.coordinator(**FAST)
        procs.worker("probe", app="tests.apps.probe")
        with Client(settings) as client:
            wf_id = client.submit(path)
            member = until(
                lambda: next((m for m in r.zrange(timers, 0, -1) if m.startswith(b"deadline|")), None), procs
            )
            assert r.zrem(timers, member) == 1
            status = client.wait(wf_id, timeout=60)
    finally:
        procs.close()
    history = status["tasks"]["only"]["history"]
    assert [h["error"] for h in history] == ["timeout", None], history


def test_a_dispatch_whose_message_was_lost_runs_again(
    settings: Settings, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A unit `ready` whose stream entry is gone (its XADD lost) is dispatched again as a new attempt."""
    procs = _processes(settings, tmp_path)
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump({"name": "one", "tasks": {"only": {"agent": "probe", "command": "noop"}}}))
    r = redis.Redis.from_url(settings.redis_url)
    stream = settings.keys.agent_tasks("probe")
    try:
        procs.coordinator(**FAST)
        with Client(settings) as client:
            wf_id = client.submit(path)
            entries = until(lambda: r.xrange(stream), procs)
            assert r.xdel(stream, *[entry_id for entry_id, _ in entries]) == 1
            procs.worker("probe", app="tests.apps.probe")
            status = client.wait(wf_id, timeout=60)
    finally:
        procs.close()
    task = status["tasks"]["only"]
    assert status["state"] == "succeeded", status
    assert [h["error"] for h in task["history"]] == ["lost: nobody holds it", None], task["history"]


def test_without_workers_nothing_is_dispatched_again(
    settings: Settings, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A message waiting unread in its stream is held: no worker yet is no reason to send it again."""
    procs = _processes(settings, tmp_path)
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump({"name": "one", "tasks": {"only": {"agent": "probe", "command": "noop"}}}))
    r = redis.Redis.from_url(settings.redis_url)
    stream = settings.keys.agent_tasks("probe")
    try:
        procs.coordinator(**FAST)
        with Client(settings) as client:
            wf_id = client.submit(path)
            until(lambda: r.xlen(stream), procs)
            time.sleep(3 * settings.reclaim_after + 2)  # several passes of the reconciler, well past the margin
            assert r.xlen(stream) == 1, procs.output()
            procs.worker("probe", app="tests.apps.probe")
            status = client.wait(wf_id, timeout=60)
    finally:
        procs.close()
    assert [h["error"] for h in status["tasks"]["only"]["history"]] == [None]
