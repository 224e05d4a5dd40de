"""Chaos: a 500-task workflow of fan-outs and joins while workers and coordinators are kill -9ed and
restarted every ~0.5 s (and, in one run, Redis itself restarts with AOF on). Nothing may be lost, no
task may start before its dependencies finished, and every effect is applied once.

A second test runs several workflows at once (retries, sagas that fail and compensate, fan-outs wide
enough for the bulk lanes) while processes are killed, workers paused past their lease (SIGSTOP /
SIGCONT), and Redis is killed with its AOF's last writes cut: each run ends as it must, and each
effect and compensation is applied once.

No clock is compared: order is proven by what each attempt was handed (its dependencies' results)."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from phibroker.keys import Keys
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.workflow import check
from tests.conftest import Processes, RedisCluster, RedisServer, aof_tail, short_settings, until


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


@pytest.mark.parametrize("restart_redis", [False, True], ids=["kills", "kills+redis-restart"])
def test_chaos(restart_redis: bool, aof_server: RedisServer, tmp_path: Path) -> None:
    settings = short_settings(aof_server.url, tmp_path / "home", prefix="chaos")
    chaos(settings, settings.redis_url, aof_server if restart_redis else None, tmp_path)


def test_chaos_on_a_cluster(redis_cluster: RedisCluster, redis_server: RedisServer, tmp_path: Path) -> None:
    """The same kills on a Redis Cluster (the inbox's shards change hands as coordinators die and come
    back); the handlers' ledger is on a server of its own."""
    settings = short_settings(redis_cluster.url, tmp_path / "home", prefix="chaos")
    chaos(settings, redis_server.url, None, tmp_path)


def chaos(settings: Settings, ledger_url: str, restart: RedisServer | None, tmp_path: Path) -> None:
    """The layered workflow while coordinators and workers are killed, and `restart` (if any) restarts."""
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(settings, logs)
    restart_redis = restart is not None
    ledger = f"{settings.namespace}:ledger"
    env = {
        "PROBE_LEDGER_URL": ledger_url,
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
                if restart is not None and not restarted_redis and time.monotonic() - began > 3:
                    restart.restart()  # SHUTDOWN with AOF on: every acknowledged write survives
                    restarted_redis = True
            status = client.wait(wf_id, timeout=120)
        elapsed = time.monotonic() - began
    finally:
        procs.close()
    states = {name: task["state"] for name, task in status["tasks"].items()}
    lost = [name for name, state in states.items() if state != "succeeded"]
    r = redis.Redis.from_url(ledger_url)
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


# -- several runs at once, paused workers, and a Redis that loses its last writes ------------------

EFFECT: dict[str, Any] = {"agent": "probe", "command": "effect", "payload": {"sleep": 0.05}}
UNDO = {"command": "effect"}  # a compensation is an effect too, keyed `RUN:TASK!undo` in the ledger
RETRY = {"max_attempts": 20, "base_delay": "100ms", "max_delay": "500ms"}
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
MIXED_KILLS = 30
PAUSES = 4
PAUSE = 3.0  # seconds a worker stays stopped: past its lease (`reclaim_after` is 2 s)
CUT_AFTER = 60  # effects applied before Redis loses its last second of writes: the runs are well under way
MIXED_MAX_DELIVERIES = 2 * (MIXED_KILLS + PAUSES) * WORKERS + 10  # as MAX_DELIVERIES: a pause lapses a lease too


def retries(steps: int = 6) -> dict[str, Any]:
    """A chain whose every step fails its first one or two attempts (retryable) before its effect."""
    tasks: dict[str, Any] = {}
    for i in range(steps):
        task = {**EFFECT, "payload": {"sleep": 0.05, "failures": 1 + i % 2}}
        tasks[f"r{i}"] = {**task, "depends_on": [f"r{i - 1}"]} if i else task
    return {"name": "retries", "defaults": {"retry": RETRY}, "tasks": tasks}


def saga(width: int) -> dict[str, Any]:
    """`a`, then `width` steps beside each other, then `last`, which fails for good: every step that
    succeeded is compensated. Past 64 steps the release and the results take the bulk lanes."""
    tasks: dict[str, Any] = {"a": {**EFFECT, "compensate": UNDO}}
    for i in range(width):
        tasks[f"s{i}"] = {**EFFECT, "depends_on": ["a"], "compensate": UNDO}
    tasks["last"] = {"agent": "probe", "command": "fail", "depends_on": [f"s{i}" for i in range(width)]}
    return {"name": f"saga-{width}", "defaults": {"retry": RETRY}, "tasks": tasks}


def fan_out(width: int = 100) -> dict[str, Any]:
    """`a`, `width` steps at once (the bulk lanes: a release past 64 units is chunked), a join."""
    tasks: dict[str, Any] = {"a": EFFECT}
    for i in range(width):
        tasks[f"b{i}"] = {**EFFECT, "payload": {"sleep": 0.02}, "depends_on": ["a"]}
    tasks["join"] = {**EFFECT, "depends_on": [f"b{i}" for i in range(width)]}
    return {"name": f"fan-out-{width}", "defaults": {"retry": RETRY}, "tasks": tasks}


def mixed_runs() -> list[tuple[dict[str, Any], str]]:
    """Each workflow with the state its run must end in."""
    runs = [(retries(), "succeeded") for _ in range(3)]
    runs += [(saga(1), "failed"), (saga(1), "failed"), (saga(5), "failed"), (saga(70), "failed")]
    runs += [(fan_out(), "succeeded") for _ in range(2)]
    return runs


class Mayhem:
    """Every 0.5 s a kill -9 (and a restart) of a worker or a coordinator, or a worker stopped for
    PAUSE seconds; once, Redis killed and restarted with its AOF's last second cut off."""

    def __init__(
        self, procs: Processes, server: RedisServer, coordinator_env: dict[str, str], worker_env: dict[str, str]
    ):
        self.procs = procs
        self.server = server
        self.coordinator_env = coordinator_env
        self.worker_env = worker_env
        self.coordinators: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.rand = random.Random(5)
        self.kills = self.pauses = 0
        self.paused: dict[subprocess.Popen[bytes], float] = {}  # a stopped worker, and when it goes on
        self.tail = aof_tail(server.directory)
        self.sizes: list[tuple[float, int]] = []  # the AOF's size as time went by
        self.cut = 0  # bytes of acknowledged writes Redis lost
        self.cut_at = 0.0  # when Redis came back: 0 until then
        self.last_fault = 0.0

    def start(self) -> None:
        self.coordinators = [self.procs.coordinator(**self.coordinator_env) for _ in range(3)]
        self.workers = [self.worker() for _ in range(WORKERS)]

    def worker(self) -> subprocess.Popen[bytes]:
        return self.procs.worker("probe", app="tests.apps.probe", concurrency=4, **self.worker_env)

    def sample(self, now: float) -> None:
        """Note the AOF's size, and let the workers whose pause is over go on."""
        if not self.cut_at:
            self.sizes.append((now, self.tail.stat().st_size))
        for process, until_at in list(self.paused.items()):
            if now >= until_at:
                process.send_signal(signal.SIGCONT)
                del self.paused[process]

    def strike(self, now: float, pause: bool) -> None:
        """A pause (when asked and none is going on), else a kill while some are left."""
        if pause and self.pauses < PAUSES and not self.paused:
            process = self.rand.choice(self.workers)
            process.send_signal(signal.SIGSTOP)
            self.paused[process] = now + PAUSE
            self.pauses += 1
        elif self.kills < MIXED_KILLS:
            if self.rand.random() < 0.3:
                index = self.rand.randrange(len(self.coordinators))
                kill(self.coordinators[index])
                self.coordinators[index] = self.procs.coordinator(**self.coordinator_env)
            else:
                index = self.rand.choice([i for i, w in enumerate(self.workers) if w not in self.paused])
                kill(self.workers[index])
                self.workers[index] = self.worker()
            self.kills += 1
        else:
            return
        self.last_fault = now

    def lose_last_writes(self) -> None:
        """kill -9 Redis, cut the AOF back to its size a second ago, start Redis on what is left."""
        self.server.stop(kill=True)
        now = time.monotonic()
        keep = max(size for at, size in self.sizes if at <= now - 1.0)
        self.cut = self.tail.stat().st_size - keep
        with open(self.tail, "r+b") as fh:
            fh.truncate(keep)
        self.server.start()
        self.cut_at = self.last_fault = time.monotonic()

    def calm(self) -> None:
        for process in self.paused:
            process.send_signal(signal.SIGCONT)
        self.paused.clear()


def test_chaos_mixed(aof_server: RedisServer, redis_server: RedisServer, tmp_path: Path) -> None:
    """Kills, paused workers and an AOF cut over nine runs at once. The ledger lives on another Redis,
    which loses nothing: an effect applied before the cut stays applied, as a real one would."""
    settings = short_settings(aof_server.url, tmp_path / "home", prefix="mixed")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(settings, logs)
    ledger = f"{settings.namespace}:ledger"
    limits = {"PHIBROKER_MAX_DELIVERIES": str(MIXED_MAX_DELIVERIES)}
    worker_env = {"PROBE_LEDGER_URL": redis_server.url, "PROBE_LEDGER_KEY": ledger, **limits}
    # Coordinators look for unheld tasks often, and take back a dead one's claimed timers soon.
    coordinator_env = {"PHIBROKER_RECONCILE_EVERY": "0.5", "PHIBROKER_TIMER_CLAIM": "2", **limits}
    broker, effects = redis.Redis.from_url(settings.redis_url), redis.Redis.from_url(redis_server.url)
    runs = mixed_runs()
    mayhem = Mayhem(procs, aof_server, coordinator_env, worker_env)
    try:
        mayhem.start()
        until(
            lambda: (
                broker.hlen(settings.keys.worker_leases("probe")) >= WORKERS
                and broker.hlen(settings.keys.coordinators) >= 3
            ),
            procs,
        )
        with Client(settings) as client:
            ids = [client.submit(check(spec)) for spec, _ in runs]
            began = time.monotonic()
            ended_before_cut, tick = 0, 0
            states = run_states(broker, settings.keys, ids)
            while not (all(s in TERMINAL for s in states.values()) and mayhem.cut_at and not mayhem.paused):
                if time.monotonic() - began > 240:
                    break
                time.sleep(0.1)
                tick += 1
                now = time.monotonic()
                mayhem.sample(now)
                # The last second of writes is lost once the runs are well under way; the submits are older.
                if not mayhem.cut_at and now - began > 2 and effects.hlen(ledger) >= CUT_AFTER:
                    ended_before_cut = sum(s in TERMINAL for s in states.values())
                    mayhem.lose_last_writes()
                elif tick % 5 == 0:
                    mayhem.strike(now, pause=tick % 20 == 0)
                states = run_states(broker, settings.keys, ids)
            ended = time.monotonic()
            stuck = {wf_id: state for wf_id, state in states.items() if state not in TERMINAL}
            statuses = [] if stuck else [client.status(wf_id) for wf_id in ids]
    finally:
        mayhem.calm()
        procs.close()
    bulk = (
        broker.xlen(settings.keys.agent_bulk("probe")),
        broker.xlen(settings.keys.agent_inbox("probe", None, bulk=True)),
    )
    applied = {k.decode() for k in effects.hkeys(ledger)}
    reruns = sum(int(v) - 1 for v in effects.hvals(f"{ledger}:runs"))
    attempts = [(s["id"], name, h) for s in statuses for name, t in s["tasks"].items() for h in t["history"]]
    lost = [(s["id"], n) for s in statuses for n, t in s["tasks"].items() if str(t["error"]).startswith("lost:")]
    retried = sum(1 for _, _, h in attempts if "fails on purpose" in str(h["error"]))
    redispatched = sum(1 for _, _, h in attempts if "nobody holds it" in str(h["error"]))
    print(
        f"\nchaos mixed: {len(runs)} runs, {sum(len(spec['tasks']) for spec, _ in runs)} tasks, "
        f"{mayhem.kills} kills, {mayhem.pauses} pauses, AOF cut {mayhem.cut} bytes ({ended_before_cut} runs had "
        f"ended), stuck {len(stuck)}, lost {len(lost)}, handler re-runs {reruns}, "
        f"retries {retried}, dispatched again after the cut {redispatched}, bulk lane entries {bulk}, "
        f"{ended - began:.1f}s "
        f"({ended - mayhem.cut_at:.1f}s after the cut, {ended - mayhem.last_fault:.1f}s after the last fault)"
    )
    assert not stuck, (stuck, procs.output())
    assert mayhem.cut > 0 and ended_before_cut < len(runs)  # the cut took writes of runs still going
    expected: set[str] = set()
    for (spec, want), status in zip(runs, statuses, strict=True):
        failed = {n: t["error"] for n, t in status["tasks"].items() if t["state"] == "failed"}
        assert status["state"] == want, (status["id"], status["error"], failed, procs.output())
        for name, task in status["tasks"].items():
            where = (status["id"], name, task)
            if spec["tasks"][name]["command"] == "fail":
                assert task["state"] == "failed" and task["error"].startswith("ValueError"), where
                continue
            expected.add(f"{status['id']}:{name}")
            work = [h for h in task["history"] if not h.get("compensation")]
            undo = [h for h in task["history"] if h.get("compensation")]
            assert len([h for h in work if h["applied"] and h["error"] is None]) == 1, where
            # Dispatched only once every dependency had succeeded: it was handed each of their results.
            assert task["result"]["inputs"] == sorted(spec["tasks"][name].get("depends_on", [])), where
            if want == "failed" and "compensate" in spec["tasks"][name]:
                expected.add(f"{status['id']}:{name}!undo")
                assert task["state"] == "compensated" and task["compensation"]["state"] == "succeeded", where
                assert len([h for h in undo if h["applied"] and h["error"] is None]) == 1, where
            else:
                assert task["state"] == "succeeded" and not undo, where
    # Every effect and every compensation applied, and nothing else: no run compensated that succeeded.
    assert applied == expected, (sorted(applied - expected)[:5], sorted(expected - applied)[:5])
    assert retried > 0 and all(bulk)  # retries happened, and the fan-outs took the bulk lanes both ways


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def run_states(broker: redis.Redis, keys: Keys, ids: list[str]) -> dict[str, str]:
    """Each run's state, in one round trip; `running` for all while Redis is down or restarting."""
    try:
        pipe = broker.pipeline(transaction=False)
        for wf_id in ids:
            pipe.hget(keys.wf(wf_id), "state")
        return {wf_id: (state or b"").decode() for wf_id, state in zip(ids, pipe.execute(), strict=True)}
    except redis.RedisError:  # Redis is restarting right now
        return dict.fromkeys(ids, "running")
