"""phibroker workloads on real processes: `phibroker coordinator` and `phibroker worker`, fresh per workload.

Every figure comes from the workflow's own clock (`created_at` → `finished_at` from `Client.status()`,
units' `finished` for chain hops), so it covers the whole path a user waits on: submit, coordinator,
dispatch, worker, result, transition. The agent is `probe` from `tests.apps.probe`, its `noop` command;
the cancel workload's is `holder` from `benchmarks.holder`, whose handler waits to be cancelled.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks.harness import Logs, percentile, rss_mib, spawn, stop, wait_for
from phibroker import workflow as workflows
from phibroker.runtime.client import Client
from phibroker.settings import Settings, is_cluster_url
from phibroker.store.client import ClientStore
from phibroker.store.connection import cluster_seeds
from phibroker.testing import free_port

AGENT, APP, COMMAND = "probe", "tests.apps.probe", "noop"
HOLDER, HOLDER_APP = "holder", "benchmarks.holder"
TALKER, TALKER_APP = "talker", "benchmarks.talker"
CONCURRENCY = 64  # handler threads: agents wait on I/O (models, tools), so a worker runs many at once
TIMEOUT = 120.0  # the longest any one workflow may take before the workload counts as hung
WARM_UP_TIMEOUT = 30.0


# -- workflows ----------------------------------------------------------------------------------------
def _task(*deps: str, agent: str = AGENT) -> dict[str, Any]:
    task: dict[str, Any] = {"agent": agent, "command": COMMAND}
    if deps:
        task["depends_on"] = list(deps)
    return task


@functools.cache
def fan_out(n: int) -> workflows.Workflow:
    """A root, then `n` tasks that depend on it: one transition releases them all (chunked by max_release)."""
    tasks = {"root": _task(), **{f"t{i:05d}": _task("root") for i in range(n)}}
    return workflows.check({"name": f"fan-out-{n}", "tasks": tasks})


@functools.cache
def chain(n: int) -> workflows.Workflow:
    """`n` tasks, each depending on the one before: every hop is a full round trip through the broker."""
    tasks = {f"c{i:04d}": _task(*([f"c{i - 1:04d}"] if i else [])) for i in range(n)}
    return workflows.check({"name": f"chain-{n}", "tasks": tasks})


@functools.cache
def independent(n: int, agent: str = AGENT) -> workflows.Workflow:
    tasks = {f"t{i:02d}": _task(agent=agent) for i in range(n)}
    return workflows.check({"name": f"flat-{n}", "tasks": tasks})


def holding(marks: Path) -> workflows.Workflow:
    """One task whose handler waits to be cancelled, noting in `marks` when it starts and when it is told."""
    task = {"agent": HOLDER, "command": "hold", "payload": {"marks": str(marks)}}
    return workflows.check({"name": "hold", "tasks": {"Hold": task}})


# -- one coordinator and one worker ---------------------------------------------------------------------
class Deployment:
    """One coordinator and one worker in a namespace of their own, warm before anything is timed."""

    def __init__(
        self,
        redis_url: str,
        logs: Logs,
        concurrency: int = CONCURRENCY,
        agent: str = AGENT,
        app: str = APP,
        metrics: bool = False,
        coordinators: int = 1,
    ):
        self.home = tempfile.mkdtemp(prefix="phibroker-bench-home-")
        self.settings = Settings(redis_url=redis_url, namespace=f"bench{uuid.uuid4().hex[:8]}", home=Path(self.home))
        self.logs = logs
        self.concurrency = concurrency
        self.agent, self.app = agent, app
        self.metrics = metrics  # both processes serve `--metrics-port` (no tracing SDK is configured)
        self.coordinators = coordinators
        self.client = Client(self.settings)
        self.processes: dict[str, tuple[Any, Path]] = {}

    def start(self) -> None:
        env = {
            "PHIBROKER_REDIS_URL": self.settings.redis_url,
            "PHIBROKER_NAMESPACE": self.settings.namespace,
            "PHIBROKER_HOME": self.home,
        }
        metrics = (lambda: ["--metrics-port", str(free_port())]) if self.metrics else list
        for n in range(self.coordinators):  # `coordinator`, then `coordinator-2`...
            name = "coordinator" + (f"-{n + 1}" if n else "")
            self.processes[name] = spawn(["-m", "phibroker", "coordinator", *metrics()], self.logs, name, env)
        worker = ["-m", "phibroker", "worker", "--agent", self.agent, "--app", self.app, *metrics()]
        self.processes["worker"] = spawn([*worker, "--concurrency", str(self.concurrency)], self.logs, "worker", env)
        wait_for(self._leases_held, 30, "coordinator and worker leases", every=0.05)
        warm_up = self.submit(independent(1, self.agent))  # scripts loaded, groups created, code paths imported
        self.wait(warm_up, WARM_UP_TIMEOUT)

    def _leases_held(self) -> bool:
        self.check_alive()
        broker: ClientStore = self.client.broker
        now, workers = broker.worker_leases()
        _, coordinators = broker.leases(self.settings.keys.coordinators)
        worker_up = any(info.get("agent") == self.agent and info["expires"] > now for info in workers.values())
        return worker_up and sum(info["expires"] > now for info in coordinators.values()) >= self.coordinators

    def check_alive(self) -> None:
        for name, (process, log) in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}:\n{self.logs.tail(log)}")

    def pid(self, name: str) -> int:
        return int(self.processes[name][0].pid)

    def stop(self) -> None:
        for process, _ in self.processes.values():
            stop(process)
        self.client.close()
        _forget_namespace(self.settings.redis_url, self.settings.namespace)

    # -- submitting and waiting ---------------------------------------------------------------------
    def submit(self, workflow: workflows.Workflow) -> str:
        return self.client.submit(workflow)

    def wait(self, wf_id: str, timeout: float = TIMEOUT, expect: str | None = "succeeded") -> dict[str, Any]:
        """Block on the workflow's end signal (no status reads while it runs); then its status, which must
        be `expect` (None: however it ended)."""
        deadline = time.monotonic() + timeout
        while not self.client.broker.wait_done(wf_id, 1.0):
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{wf_id} did not finish within {timeout:.0f} s (hung?)")
        status = self.client.status(wf_id)
        if expect is not None and status["state"] != expect:
            raise RuntimeError(f"{wf_id} ended {status['state']}: {status.get('error')}")
        return status

    def run(self, workflow: workflows.Workflow) -> dict[str, Any]:
        return self.wait(self.submit(workflow))


def _forget_namespace(url: str, namespace: str) -> None:
    """Drop a finished workload's keys, so Redis's memory does not grow from run to run."""
    r = _plain_client(url)
    try:
        batch = []
        for key in r.scan_iter(match=f"{namespace}:*", count=1000, **_every_master(r)):
            batch.append(key)
            if len(batch) >= 1000:
                r.unlink(*batch)
                batch.clear()
        if batch:
            r.unlink(*batch)
    finally:
        r.close()


def _plain_client(url: str) -> Any:
    """redis-py's own client of the bench's Redis: its cluster client for a `redis+cluster://` URL."""
    if not is_cluster_url(url):
        return redis.Redis.from_url(url)
    seeds = [redis.cluster.ClusterNode(host, port) for host, port in cluster_seeds(url)[1]]
    return redis.RedisCluster(startup_nodes=seeds)


def _every_master(client: Any) -> dict[str, Any]:
    """SCAN's options that make a cluster client look at every master's keys (a plain client has one server)."""
    return {"target_nodes": redis.RedisCluster.PRIMARIES} if isinstance(client, redis.RedisCluster) else {}


@contextmanager
def deployed(
    redis_url: str,
    logs: Logs,
    concurrency: int = CONCURRENCY,
    agent: str = AGENT,
    app: str = APP,
    metrics: bool = False,
    coordinators: int = 1,
) -> Iterator[Deployment]:
    deployment = Deployment(redis_url, logs, concurrency, agent, app, metrics, coordinators)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


def elapsed(status: dict[str, Any]) -> float:
    """The workflow's own clock: created_at (the client) → finished_at (the coordinator), in seconds."""
    return float(status["finished_at"]) - float(status["created_at"])


def looping(n: int) -> workflows.Workflow:
    """One task that runs `n` iterations, one after another (`loop:`)."""
    until = {"until": f"iteration >= {n}", "max_iterations": n}
    return workflows.check({"name": f"loop-{n}", "tasks": {"L": {**_task(), "loop": until}}})


def spawning(n: int) -> workflows.Workflow:
    """One planner task whose handler spawns `n` children at once (`ctx.spawn`), then a join."""
    plan = {"agent": AGENT, "command": "spawner", "payload": {"children": n}}
    return workflows.check({"name": f"spawn-{n}", "tasks": {"Plan": plan, "Join": _task("Plan")}})


def run_bytes(deployment: Deployment, wf_id: str) -> int:
    """What one run holds in Redis (MEMORY USAGE of its keys): bounded, whatever unfolds at run time."""
    keys = deployment.client.settings.keys.wf_keys(wf_id, [AGENT])
    r = deployment.client.broker.redis
    return sum(int(r.memory_usage(key) or 0) for key in keys)


def unfolding(deployment: Deployment, workflow: workflows.Workflow) -> tuple[float, int]:
    """A run that grows at run time: its seconds, and the bytes it holds once done."""
    status = deployment.run(workflow)
    return elapsed(status), run_bytes(deployment, status["id"])


# -- the workloads: each returns one run's figures ------------------------------------------------------
def fan_out_throughput(deployment: Deployment, n: int) -> float:
    workflow = fan_out(n)
    return len(workflow.tasks) / elapsed(deployment.run(workflow))


def chain_hops(deployment: Deployment, n: int) -> tuple[list[float], float]:
    """Each hop in ms (finished[i] − finished[i−1]) and the whole chain's time per task in ms."""
    wf_id = deployment.submit(chain(n))
    status = deployment.wait(wf_id)
    _, units, _, _ = deployment.client.broker.read_workflow(wf_id)
    finished = [float(units[f"c{i:04d}"]["finished"]) for i in range(n)]
    hops = [(b - a) * 1000 for a, b in zip(finished, finished[1:], strict=False)]
    return hops, elapsed(status) * 1000 / n


def many_workflows(deployment: Deployment, count: int, width: int) -> tuple[float, float]:
    """`count` workflows of `width` independent tasks, submitted in a tight loop by one client.

    Returns tasks/s over the set (first created_at → last finished_at) and p99 workflow time in ms."""
    workflow = independent(width)
    ids = [deployment.submit(workflow) for _ in range(count)]
    statuses = [deployment.wait(wf_id) for wf_id in ids]
    first = min(float(s["created_at"]) for s in statuses)
    last = max(float(s["finished_at"]) for s in statuses)
    return count * width / (last - first), percentile([elapsed(s) * 1000 for s in statuses], 99)


def fairness(deployment: Deployment, hops: int, fan: int) -> tuple[float, float]:
    """A chain's time alone, then right behind a big fan-out on the same agent (ms, ms)."""
    alone = elapsed(deployment.run(chain(hops))) * 1000
    big = deployment.submit(fan_out(fan))
    behind = elapsed(deployment.run(chain(hops))) * 1000
    deployment.wait(big)
    return alone, behind


def small_runs(deployment: Deployment, count: int, tasks: int) -> list[float]:
    """`count` chains of `tasks` submitted in a tight loop; each one's time, submit to end, in ms."""
    ids = [deployment.submit(chain(tasks)) for _ in range(count)]
    return [elapsed(deployment.wait(wf_id)) * 1000 for wf_id in ids]


def fairness_small_runs(deployment: Deployment, count: int, tasks: int, fan: int) -> tuple[list[float], list[float]]:
    """`count` small runs alone, then as many right behind a big fan-out on the same agent (each run's ms):
    a big run must not starve the small ones users wait on."""
    alone = small_runs(deployment, count, tasks)
    big = deployment.submit(fan_out(fan))
    behind = small_runs(deployment, count, tasks)
    deployment.wait(big)
    return alone, behind


def cancel_latency(deployment: Deployment, n: int) -> list[float]:
    """`n` times, one after another: a task whose handler waits to be cancelled, cancelled once it runs.
    Returns, in ms, the time from `Client.cancel` returning to the handler seeing `ctx.cancelled` (both
    read time.time() on this host). One more round before them warms the cancel path and is not counted."""
    marks = Path(tempfile.mkdtemp(prefix="phibroker-bench-cancel-"))
    workflow = holding(marks)
    latencies = []
    try:
        for _ in range(n + 1):
            wf_id = deployment.submit(workflow)
            started, seen = marks / f"{wf_id}.started", marks / f"{wf_id}.seen"
            wait_for(started.exists, TIMEOUT, f"{wf_id}'s handler to start", every=0.005)
            deployment.client.cancel(wf_id, "benchmark")
            cancelled = time.time()
            wait_for(seen.exists, TIMEOUT, f"{wf_id}'s handler to see the cancel", every=0.005)
            latencies.append((float(seen.read_text()) - cancelled) * 1000)
            deployment.wait(wf_id, expect=None)  # each cancel alone: the next starts on a quiet broker
    finally:
        shutil.rmtree(marks, ignore_errors=True)
    return latencies[1:]


@dataclass
class MemoryPoint:
    workflows: int
    coordinator_mib: float
    worker_mib: float
    redis_mib: float


def memory(deployment: Deployment, total: int, checkpoint: int, batch: int = 500) -> list[MemoryPoint]:
    """RSS of both processes after `checkpoint` and after `total` one-task workflows (batches waited for)."""
    r = redis.Redis.from_url(deployment.settings.redis_url)
    points = []
    workflow, done = independent(1), 0
    while done < total:
        size = min(batch, total - done, checkpoint - done if done < checkpoint else batch)
        for wf_id in [deployment.submit(workflow) for _ in range(size)]:
            deployment.wait(wf_id)
        done += size
        if done in (checkpoint, total):
            used = int(r.info("memory")["used_memory"]) / 2**20
            points.append(
                MemoryPoint(done, rss_mib(deployment.pid("coordinator")), rss_mib(deployment.pid("worker")), used)
            )
    r.close()
    return points


def live_output(deployment: Deployment, chunks: int, firsts: int) -> tuple[float, list[float]]:
    """Chunks/s through `ctx.stream` to a reader following the run (`Client.stream(follow=True)`, what
    `logs --follow` reads), over one task streaming `chunks`; and, over `firsts` runs one after another,
    the delay (ms) from a chunk's sending to its arrival at a reader already following."""
    burst = workflows.check(
        {"name": "talk", "tasks": {"Talk": {"agent": TALKER, "command": "talk", "payload": {"chunks": chunks}}}}
    )
    wf_id = deployment.submit(burst)
    arrived = [time.time() for r in deployment.client.stream(wf_id, follow=True) if r["kind"] == "chunk"]
    rate = (len(arrived) - 1) / (arrived[-1] - arrived[0]) if len(arrived) > 1 else 0.0
    one = workflows.check(
        {
            "name": "talk-one",
            "tasks": {"Talk": {"agent": TALKER, "command": "talk", "payload": {"chunks": 3, "pause": 0.05}}},
        }
    )
    delays = []
    for _ in range(firsts):
        wf_id = deployment.submit(one)
        for record in deployment.client.stream(wf_id, follow=True):
            if record["kind"] == "chunk":
                delays.append((time.time() - float(record["data"]["sent"])) * 1000)
    return rate, delays
