"""`python -m benchmarks [--runs N] [--quick] [--only NAME]... [--json PATH]`: every speed figure and target in one run.

One private redis-server for the whole run, and one private Redis Cluster (3 masters, 3 replicas)
started the first time a workload needs it. Each run measures every workload once, alternating the
yardstick and phibroker (A B A B…), because this 2-core machine drifts: figures taken minutes apart are
comparable, figures taken a quarter of an hour apart are not. The longest-Lua-call and memory workloads
run once, after the timed runs, since they change Redis's settings or take long.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import bare, compare, report, validation, web, workloads
from benchmarks.harness import Logs, RedisCluster, RedisServer, percentile
from benchmarks.report import Results
from benchmarks.slowlog import SlowlogWatch

T = TypeVar("T")
WORKLOADS = (  # the names `--only` takes, as each run prints them
    "bare.batched",
    "phibroker.fan-out",
    "phibroker.fan-out+metrics",
    "bare.hop",
    "phibroker.chain",
    "phibroker.cluster",
    "bare.unbatched",
    "phibroker.many",
    "phibroker.coordinators",
    "phibroker.fairness",
    "phibroker.cancel",
    "phibroker.output",
    "validation",
    "rq",
    "celery",
    "dramatiq",
    "lua",
    "memory",
    "web",
)
DEFAULT_JSON = Path(__file__).resolve().parent / "last-run.json"


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; `--quick` shrinks them (its absolute figures are then not the targets')."""

    bare_tasks: int = 10_000
    bare_unbatched: int = 10_000
    hops: int = 1_000
    fan_out: int = 10_000
    chain: int = 1_000
    short_chain: int = 200  # the chain whose hop is compared with the bare hop
    workflows: int = 1_000
    width: int = 10
    fair_hops: int = 20
    fair_fan_out: int = 10_000
    fair_runs: tuple[int, ...] = report.FAIR_RUN_COUNTS  # how many small runs go behind that fan-out
    fair_run_tasks: int = 3  # each small run: a chain of this many tasks
    cancels: int = 100
    lua_fan_out: int = 50_000
    memory_total: int = 10_000
    iterations: int = 1_000  # a loop's, and a planner's children below
    children: int = 1_000
    memory_checkpoint: int = 1_000
    json_tasks: int = 100_000
    yaml_tasks: int = 10_000
    rq_jobs: int = 2_000
    rq_forking_jobs: int = 300  # the forking worker does ~55 jobs/s: 2,000 would take half a minute a run
    rq_chain: int = 100
    celery_tasks: int = 2_000
    dramatiq_tasks: int = 2_000
    chunks: int = 10_000  # streamed by one task, read as they come
    chunk_runs: int = 20  # runs whose chunks' delay to a following reader is measured
    web_runs: int = 1_000  # runs in the web page's list
    web_dag: int = 500  # tasks of the DAG it draws
    web_hops: int = 50  # the chain whose events its stream carries


QUICK = Sizes(
    bare_tasks=2_000,
    bare_unbatched=1_000,
    hops=200,
    fan_out=2_000,
    chain=200,
    workflows=200,
    fair_fan_out=2_000,
    cancels=20,
    lua_fan_out=10_000,
    memory_total=2_000,
    iterations=200,
    children=200,
    memory_checkpoint=200,
    rq_jobs=300,
    rq_forking_jobs=50,
    rq_chain=30,
    celery_tasks=300,
    dramatiq_tasks=300,
    chunks=2_000,
    chunk_runs=5,
    web_runs=200,
    web_dag=100,
    web_hops=20,
)


class Bench:
    """Runs the workloads against one Redis and records every figure in `results`."""

    def __init__(self, redis_url: str, sizes: Sizes, logs: Logs, only: frozenset[str] = frozenset()):
        self.url = redis_url
        self.sizes = sizes
        self.logs = logs
        self.only = only  # the workloads to run (by the names `attempt` prints); empty: all of them
        self.results = Results()
        self.run_values: dict[str, float] = {}  # this run's figures, for run-by-run ratios
        self.cluster: RedisCluster | None = None  # started by the first workload that needs one

    def cluster_url(self) -> str:
        """The bench's Redis Cluster, started on first use: six nodes take seconds to join."""
        if self.cluster is None:
            cluster = RedisCluster()
            cluster.start()
            self.cluster = cluster
        return self.cluster.url

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    def record(self, key: str, name: str, unit: str, value: float, note: str = "") -> None:
        self.results.add(key, name, unit, value, note)
        self.run_values[key] = value

    def attempt(self, key: str, work: Callable[[], T]) -> T | None:
        """Run one workload; a failure is reported and recorded, and the other workloads go on."""
        if self.only and key not in self.only:
            return None
        started = time.monotonic()
        try:
            value = work()
        except Exception as exc:  # noqa: BLE001 - one broken workload must not hide the others' figures
            message = f"{type(exc).__name__}: {exc}"
            self.results.errors.setdefault(key, message)
            print(f"    ! {key} failed: {message}", file=sys.stderr)
            traceback.print_exc(limit=3, file=sys.stderr)
            return None
        print(f"    {key:<22} {time.monotonic() - started:6.1f} s", flush=True)
        return value

    # -- one run: yardstick and phibroker alternating -------------------------------------------------
    def run(self, files: validation.Files) -> None:
        self.run_values = {}
        self.attempt("bare.batched", self.bare_batched)
        self.attempt("phibroker.fan-out", self.fan_out)
        self.attempt("phibroker.fan-out+metrics", self.fan_out_metrics)
        self.attempt("bare.hop", self.bare_hop)
        self.attempt("phibroker.chain", self.chain)
        self.attempt("phibroker.cluster", self.on_cluster)
        self.attempt("bare.unbatched", self.bare_unbatched)
        self.attempt("phibroker.many", self.many)
        self.attempt("phibroker.coordinators", self.coordinators)
        self.attempt("phibroker.fairness", self.fairness)
        self.attempt("phibroker.cancel", self.cancel)
        self.attempt("phibroker.output", self.output)
        self.attempt("validation", lambda: self.validation(files))
        self.attempt("rq", self.rq)
        self.attempt("celery", self.celery)
        self.attempt("dramatiq", self.dramatiq)
        self.ratios()

    def bare_batched(self) -> None:
        n = self.sizes.bare_tasks
        self.record(
            "bare.batched", f"bare round trip, batched ×100 ({n:,})", "tasks/s", bare.batched(self.url, n, self.logs)
        )

    def bare_unbatched(self) -> None:
        n = self.sizes.bare_unbatched
        self.record(
            "bare.unbatched", f"bare round trip, unbatched ({n:,})", "tasks/s", bare.unbatched(self.url, n, self.logs)
        )

    def bare_hop(self) -> None:
        hops = self.sizes.hops
        self.record(
            "bare.hop", f"bare round trip, chain hop p50 ({hops:,})", "ms", bare.hop_p50(self.url, hops, self.logs)
        )

    def fan_out(self) -> None:
        n = self.sizes.fan_out
        with workloads.deployed(self.url, self.logs) as deployment:
            rate = workloads.fan_out_throughput(deployment, n)
        note = f"1 coordinator + 1 worker --concurrency {workloads.CONCURRENCY}"
        self.record("pb.fanout", f"phibroker fan-out {n:,}", "tasks/s", rate, note)

    def fan_out_metrics(self) -> None:
        """The same fan-out with both processes serving metrics and no tracing SDK: what telemetry costs."""
        n = self.sizes.fan_out
        with workloads.deployed(self.url, self.logs, metrics=True) as deployment:
            rate = workloads.fan_out_throughput(deployment, n)
        self.record("pb.fanout_metrics", f"phibroker fan-out {n:,}, --metrics-port on", "tasks/s", rate)

    def chain(self) -> None:
        s = self.sizes
        with workloads.deployed(self.url, self.logs) as deployment:
            short, _ = workloads.chain_hops(deployment, s.short_chain)
            hops, per_task = workloads.chain_hops(deployment, s.chain)
        self.record("pb.chain200_p50", f"phibroker {s.short_chain}-task chain, hop p50", "ms", percentile(short, 50))
        self.record("pb.chain_p50", f"phibroker {s.chain:,}-task chain, hop p50", "ms", percentile(hops, 50))
        self.record("pb.chain_p99", f"phibroker {s.chain:,}-task chain, hop p99", "ms", percentile(hops, 99))
        self.record("pb.chain_total", f"phibroker {s.chain:,}-task chain, total ÷ tasks", "ms", per_task)

    def on_cluster(self) -> None:
        """The fan-out and the chain of `fan_out` and `chain`, on a Redis Cluster: what spreading a
        namespace's keys over three masters costs (a run's commit stays in one slot, its dispatches and
        the inbox are elsewhere, so each effect is a round trip of its own)."""
        s = self.sizes
        with workloads.deployed(self.cluster_url(), self.logs) as deployment:
            rate = workloads.fan_out_throughput(deployment, s.fan_out)
            hops, _ = workloads.chain_hops(deployment, s.chain)
        note = f"3 masters + 3 replicas; 1 coordinator + 1 worker --concurrency {workloads.CONCURRENCY}"
        self.record("cl.fanout", f"Redis Cluster: phibroker fan-out {s.fan_out:,}", "tasks/s", rate, note)
        chain = f"Redis Cluster: phibroker {s.chain:,}-task chain"
        self.record("cl.chain_p50", f"{chain}, hop p50", "ms", percentile(hops, 50))
        self.record("cl.chain_p99", f"{chain}, hop p99", "ms", percentile(hops, 99))

    def many(self) -> None:
        s = self.sizes
        with workloads.deployed(self.url, self.logs) as deployment:
            rate, p99 = workloads.many_workflows(deployment, s.workflows, s.width)
        label = f"phibroker {s.workflows:,} workflows × {s.width}"
        self.record("pb.many", label, "tasks/s", rate)
        self.record("pb.many_p99", f"{label}, p99 workflow time", "ms", p99)

    def coordinators(self) -> None:
        """The `many` workload with 1, 2 and 3 coordinators, on one server and on the cluster. On two
        cores more coordinators cannot go faster; what is measured is that they go no slower than
        their share of the CPU, on either topology."""
        s = self.sizes
        for topology, url in (("pb", self.url), ("cl", self.cluster_url())):
            for count in report.COORDINATOR_COUNTS:
                with workloads.deployed(url, self.logs, coordinators=count) as deployment:
                    rate, _ = workloads.many_workflows(deployment, s.workflows, s.width)
                where = "Redis Cluster: " if topology == "cl" else ""
                label = f"{where}phibroker {s.workflows:,} workflows × {s.width}, {count} coordinator(s)"
                self.record(f"{topology}.many_c{count}", label, "tasks/s", rate)

    def fairness(self) -> None:
        s = self.sizes
        with workloads.deployed(self.url, self.logs) as deployment:
            alone, behind = workloads.fairness(deployment, s.fair_hops, s.fair_fan_out)
            small = {
                n: workloads.fairness_small_runs(deployment, n, s.fair_run_tasks, s.fair_fan_out) for n in s.fair_runs
            }
        self.record("pb.fair_alone", f"phibroker {s.fair_hops}-hop chain alone", "ms", alone)
        self.record("pb.fair_behind", f"… right after a {s.fair_fan_out:,} fan-out", "ms", behind)
        self.record("pb.fair_ratio", "… ratio (behind ÷ alone)", "×", behind / alone)
        for count, (alone_ms, behind_ms) in small.items():
            self.record_small_runs(count, alone_ms, behind_ms)

    def record_small_runs(self, count: int, alone: list[float], behind: list[float]) -> None:
        """p50 and p99 of the small runs' submit → end, alone and behind the fan-out, and their ratios."""
        s = self.sizes
        runs = f"phibroker {count} run{'s' if count > 1 else ''} of a {s.fair_run_tasks}-task chain"
        for q in (50, 99):
            a, b = percentile(alone, q), percentile(behind, q)
            self.record(f"pb.fair_runs{count}_alone_p{q}", f"{runs} alone, p{q} submit → end", "ms", a)
            self.record(f"pb.fair_runs{count}_behind_p{q}", f"… right after a {s.fair_fan_out:,} fan-out", "ms", b)
            self.record(f"pb.fair_runs{count}_ratio_p{q}", f"… ratio p{q} (behind ÷ alone)", "×", b / a)

    def cancel(self) -> None:
        n = self.sizes.cancels
        with workloads.deployed(self.url, self.logs, agent=workloads.HOLDER, app=workloads.HOLDER_APP) as deployment:
            latencies = workloads.cancel_latency(deployment, n)
        label = f"phibroker cancel → handler sees ctx.cancelled ({n} cancels)"
        self.record("pb.cancel_p50", f"{label}, p50", "ms", percentile(latencies, 50))
        self.record("pb.cancel_p99", f"{label}, p99", "ms", percentile(latencies, 99))

    def output(self) -> None:
        s = self.sizes
        with workloads.deployed(self.url, self.logs, agent=workloads.TALKER, app=workloads.TALKER_APP) as deployment:
            rate, delays = workloads.live_output(deployment, s.chunks, s.chunk_runs)
        self.record("pb.chunks", f"ctx.stream to a following reader ({s.chunks:,} chunks)", "chunks/s", rate)
        label = f"ctx.stream chunk → reader following the run ({len(delays)} chunks of {s.chunk_runs} runs)"
        self.record("pb.chunk_p50", f"{label}, p50", "ms", percentile(delays, 50))
        self.record("pb.chunk_p99", f"{label}, p99", "ms", percentile(delays, 99))

    def validation(self, files: validation.Files) -> None:
        s = self.sizes
        self.record("val.json", f"load + check {s.json_tasks:,}-task JSON", "s", validation.load_seconds(files.json))
        self.record("val.yaml", f"load + check {s.yaml_tasks:,}-task YAML", "s", validation.load_seconds(files.yaml))

    def rq(self) -> None:
        s = self.sizes
        simple = compare.rq_throughput(self.url, s.rq_jobs, compare.SIMPLE_WORKER, self.logs)
        self.record("rq.simple", f"RQ SimpleWorker ({s.rq_jobs:,} jobs)", "jobs/s", simple)
        forking = compare.rq_throughput(self.url, s.rq_forking_jobs, compare.FORKING_WORKER, self.logs)
        self.record("rq.forking", f"RQ forking Worker ({s.rq_forking_jobs:,} jobs)", "jobs/s", forking)
        hop = compare.rq_chain_hop(self.url, s.rq_chain, self.logs)
        self.record("rq.chain", f"RQ chain hop p50 ({s.rq_chain} jobs, depends_on)", "ms", hop)

    def celery(self) -> None:
        if self._installed("celery", "Celery", "celery"):
            n = self.sizes.celery_tasks
            rate = compare.celery_throughput(self.url, n, self.logs)
            self.record("celery.group", f"Celery group + results, solo pool ({n:,})", "tasks/s", rate)

    def dramatiq(self) -> None:
        if self._installed("dramatiq", "dramatiq", "'dramatiq[redis]'"):
            n = self.sizes.dramatiq_tasks
            rate = compare.dramatiq_throughput(self.url, n, self.logs)
            self.record("dramatiq.group", f"dramatiq group + results, 1 process × 8 threads ({n:,})", "tasks/s", rate)

    def _installed(self, module: str, name: str, requirement: str) -> bool:
        """An optional yardstick (the `[bench]` extra); without it, a note says how to add it."""
        if importlib.util.find_spec(module) is not None:
            return True
        note = f"{name}: not installed (pip install {requirement} for this comparison)"
        if note not in self.results.notes:
            self.results.notes.append(note)
        return False

    def ratios(self) -> None:
        """This run's phibroker figures over this run's yardsticks."""
        v = self.run_values
        pairs = [
            ("ratio.fanout_bare", "fan-out ÷ bare batched", "pb.fanout", "bare.batched"),
            ("ratio.fanout_celery", "fan-out ÷ Celery", "pb.fanout", "celery.group"),
            ("ratio.fanout_dramatiq", "fan-out ÷ dramatiq", "pb.fanout", "dramatiq.group"),
            ("ratio.fanout_rq", "fan-out ÷ RQ SimpleWorker", "pb.fanout", "rq.simple"),
            ("ratio.hop_bare", "chain hop p50 ÷ bare hop p50", "pb.chain_p50", "bare.hop"),
            ("ratio.metrics", "fan-out with metrics ÷ without", "pb.fanout_metrics", "pb.fanout"),
            *report.CLUSTER_RATIOS,
            *report.COORDINATOR_RATIOS,
        ]
        for key, name, top, bottom in pairs:
            if v.get(top) and v.get(bottom):
                self.results.add(key, name, "×", v[top] / v[bottom])

    # -- once, after the timed runs ------------------------------------------------------------------
    def longest_lua(self) -> None:
        """Every command logged while a fan-out, a chain and a huge fan-out run; the longest EVALSHA."""
        s = self.sizes
        shapes: list[tuple[str, Callable[[workloads.Deployment], Any]]] = [
            (f"fan-out {s.fan_out:,}", lambda d: workloads.fan_out_throughput(d, s.fan_out)),
            (f"chain {s.chain:,}", lambda d: workloads.chain_hops(d, s.chain)),
            (f"fan-out {s.lua_fan_out:,}", lambda d: workloads.fan_out_throughput(d, s.lua_fan_out)),
        ]
        longest = 0.0
        for label, work in shapes:
            with workloads.deployed(self.url, self.logs) as deployment, SlowlogWatch(self.url) as watch:
                outcome = work(deployment)
            note = f"{watch.longest.script}, of {watch.longest.calls:,} EVALSHA calls"
            self.results.add(f"lua.{label}", f"longest EVALSHA during {label}", "ms", watch.longest.ms, note)
            if label.endswith(f"{s.lua_fan_out:,}"):
                self.results.add(
                    "pb.fanout_big", f"phibroker fan-out {s.lua_fan_out:,} (slowlog on)", "tasks/s", outcome
                )
            longest = max(longest, watch.longest.ms)
        for label, workflow in (
            (f"loop of {s.iterations:,} iterations", workloads.looping(s.iterations)),
            (f"spawn of {s.children:,} children", workloads.spawning(s.children)),
        ):
            with workloads.deployed(self.url, self.logs) as deployment, SlowlogWatch(self.url) as watch:
                seconds, size = workloads.unfolding(deployment, workflow)
            note = f"{watch.longest.script}, of {watch.longest.calls:,} EVALSHA calls; the run took {seconds:.1f} s"
            self.results.add(f"lua.{label}", f"longest EVALSHA during a {label}", "ms", watch.longest.ms, note)
            self.results.add(f"mem.run.{label}", f"Redis memory of one {label} run", "KiB", size / 1024)
            longest = max(longest, watch.longest.ms)
        self.results.add("lua.max", "longest EVALSHA of all", "ms", longest)

    def web(self) -> None:
        """The web page: each route's median and slowest request, and the delay of its event stream."""
        s = self.sizes
        with workloads.deployed(self.url, self.logs) as deployment:
            timings = web.page_timings(deployment, s.web_runs, s.web_dag)
            delays = web.stream_delays(deployment, s.web_hops)
        for label, (p50, worst) in timings.items():
            name = f"web page {label}, slowest of {web.REPEATS}"
            self.results.add(f"web.{label}", name, "ms", worst, f"p50 {p50:.0f} ms")
        self.results.add("web.max", "web page, slowest request of all", "ms", max(w for _, w in timings.values()))
        label = f"web page event stream, delay after the event ({len(delays)} events of a {s.web_hops}-task chain)"
        self.results.add("web.sse_p50", f"{label}, p50", "ms", percentile(delays, 50))
        self.results.add("web.sse_max", f"{label}, max", "ms", max(delays))

    def memory(self) -> None:
        s = self.sizes
        with workloads.deployed(self.url, self.logs) as deployment:
            first, last = workloads.memory(deployment, s.memory_total, s.memory_checkpoint)
        for who, label in (
            ("coordinator", "coordinator RSS"),
            ("worker", "worker RSS"),
            ("redis", "Redis used_memory"),
        ):
            a, b = getattr(first, f"{who}_mib"), getattr(last, f"{who}_mib")
            self.results.add(f"mem.{who}.first", f"{label} after {first.workflows:,} workflows", "MiB", a)
            self.results.add(f"mem.{who}.last", f"{label} after {last.workflows:,} workflows", "MiB", b)
            if who != "redis":
                self.results.add(f"mem.{who}_growth", f"{label} growth", "%", (b - a) / a * 100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each workload (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 run, smaller sizes (a smoke test, not the targets)")
    parser.add_argument(
        "--only",
        action="append",
        choices=WORKLOADS,
        metavar="NAME",
        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures [{DEFAULT_JSON.name}]"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes, runs = (QUICK, 1) if args.quick else (Sizes(), max(1, args.runs))
    started = time.monotonic()
    logs = Logs()
    print(f"phibroker benchmarks: {runs} run(s){' (quick sizes)' if args.quick else ''}; logs in {logs.directory}")
    files = validation.Files(sizes.json_tasks, sizes.yaml_tasks)
    with RedisServer() as server:
        bench = Bench(server.url, sizes, logs, frozenset(args.only or ()))
        if args.quick:
            bench.results.notes.append("--quick: smaller sizes and 1 run; a smoke test, not the targets' figures")
        print(f"private redis-server on port {server.port}")
        try:
            for number in range(1, runs + 1):
                print(f"  run {number}/{runs}", flush=True)
                bench.run(files)
            print("  once", flush=True)
            bench.attempt("lua", bench.longest_lua)
            bench.attempt("memory", bench.memory)
            bench.attempt("web", bench.web)
        finally:
            bench.close()
    files.close()
    results = bench.results
    rows = report.judge_all(results)
    report.print_figures(results)
    report.print_targets(rows)
    report.print_earlier(results)
    report.print_cluster(results)
    for note in results.notes:
        print(f"\n{note}")
    options = {"runs": runs, "quick": args.quick, "sizes": asdict(sizes), "seconds": round(time.monotonic() - started)}
    report.save(args.json, report.document(results, rows, options))
    print(f"\nJSON: {args.json}  ({options['seconds']} s in all)")
    if results.errors:
        print(f"subprocess logs kept in {logs.directory}")
    else:
        logs.remove()
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
