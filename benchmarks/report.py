"""What a run prints and saves: the figures (median, min–max), the speed targets with their ratios and
MET/MISSED, the validation and round-trip figures, and the same as one JSON document.

Ratios between systems are taken per run (phibroker's run i over the yardstick's run i, measured minutes
apart) and then the median, because the machine drifts more between runs than within one.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import Figure, fmt, spread


@dataclass
class Results:
    """Every figure by key, in the order first measured; failures by workload."""

    figures: dict[str, Figure] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, name: str, unit: str, value: float, note: str = "") -> None:
        figure = self.figures.setdefault(key, Figure(name, unit, note=note))
        figure.values.append(value)

    def median(self, key: str) -> float | None:
        figure = self.figures.get(key)
        return figure.median if figure and figure.values else None


@dataclass
class Target:
    """One speed target: a measured median against its goal."""

    label: str
    key: str  # the figure it reads
    goal: float
    at_least: bool  # True: measured ≥ goal; False: measured ≤ goal
    unit: str

    def judge(self, results: Results) -> dict[str, Any]:
        value = results.median(self.key)
        row: dict[str, Any] = {"target": self.label, "goal": self.goal, "unit": self.unit, "measured": value}
        if value is None:
            return {**row, "of_goal": None, "verdict": "n/a"}
        met = value >= self.goal if self.at_least else value <= self.goal
        return {**row, "of_goal": value / self.goal, "verdict": "MET" if met else "MISSED"}


FAIR_RUN_COUNTS = (1, 10, 100)  # small runs submitted right behind a big fan-out; each count has its targets

TARGETS = [
    Target("fan-out 10k, absolute", "pb.fanout", 30_000, True, "tasks/s"),
    Target("fan-out ÷ bare batched round trip", "ratio.fanout_bare", 0.5, True, "×"),
    Target("fan-out ÷ Celery group", "ratio.fanout_celery", 60, True, "×"),
    Target("fan-out ÷ RQ SimpleWorker", "ratio.fanout_rq", 150, True, "×"),
    Target("fan-out ÷ dramatiq group", "ratio.fanout_dramatiq", 15, True, "×"),
    Target("chain hop p50 ÷ bare hop p50", "ratio.hop_bare", 1.2, False, "×"),
    Target("chain hop p99", "pb.chain_p99", 2.0, False, "ms"),
    Target("1,000 workflows × 10 tasks", "pb.many", 15_000, True, "tasks/s"),
    Target("fairness: chain behind fan-out ÷ alone", "pb.fair_ratio", 3.0, False, "×"),
    *(
        Target(
            f"fairness: {n} run{'s' if n > 1 else ''} behind ÷ alone, p{q}",
            f"pb.fair_runs{n}_ratio_p{q}",
            3.0,
            False,
            "×",
        )
        for n in FAIR_RUN_COUNTS
        for q in (50, 99)
    ),
    Target("cancel → handler sees ctx.cancelled, p50", "pb.cancel_p50", 100.0, False, "ms"),
    Target("cancel → handler sees ctx.cancelled, p99", "pb.cancel_p99", 250.0, False, "ms"),
    Target("longest Lua call (EVALSHA)", "lua.max", 10.0, False, "ms"),
    Target("load + check 100k-task JSON", "val.json", 1.0, False, "s"),
    Target("coordinator RSS growth 1k→10k workflows", "mem.coordinator_growth", 10.0, False, "%"),
    Target("worker RSS growth 1k→10k workflows", "mem.worker_growth", 10.0, False, "%"),
    Target("fan-out with metrics ÷ without (no tracing SDK)", "ratio.metrics", 0.95, True, "×"),
    Target("ctx.stream chunk → following reader, p50", "pb.chunk_p50", 10, False, "ms"),
    Target("web page: slowest request (1,000 runs, 500-task DAG)", "web.max", 200, False, "ms"),
    Target("web page: event stream delay, max", "web.sse_max", 250, False, "ms"),
]

# Validation and round-trip figures: the same workloads, shown beside their yardsticks.
EARLIER = [
    ("load + check 100k-task JSON", "val.json", None),
    ("load + check 10k-task YAML", "val.yaml", None),
    ("10k fan-out (bare batched beside it)", "pb.fanout", "bare.batched"),
    ("200-task chain hop p50 (bare hop beside it)", "pb.chain200_p50", "bare.hop"),
]


# The Redis Cluster's figures beside one server's of the same run: (label, cluster, one server, ratio).
CLUSTER = [
    ("fan-out", "cl.fanout", "pb.fanout", "ratio.cluster_fanout"),
    ("chain hop p50", "cl.chain_p50", "pb.chain_p50", "ratio.cluster_hop"),
    ("chain hop p99", "cl.chain_p99", "pb.chain_p99", "ratio.cluster_hop_p99"),
]
COORDINATOR_COUNTS = (1, 2, 3)
CLUSTER += [
    (f"workflows × tasks, {n} coordinator(s)", f"cl.many_c{n}", f"pb.many_c{n}", f"ratio.cluster_many_c{n}")
    for n in COORDINATOR_COUNTS
]
# What `Bench.ratios` takes of them, per run: (key, name, numerator, denominator).
CLUSTER_RATIOS = [
    (ratio, f"Redis Cluster ÷ one server, {label}", cluster, single) for label, cluster, single, ratio in CLUSTER
]
# More coordinators beside one, on each topology.
COORDINATOR_RATIOS = [
    (f"ratio.{topology}_c{n}", f"{where}{n} coordinators ÷ 1", f"{topology}.many_c{n}", f"{topology}.many_c1")
    for topology, where in (("pb", "one server: "), ("cl", "Redis Cluster: "))
    for n in COORDINATOR_COUNTS[1:]
]


def print_figures(results: Results) -> None:
    print("\nFigures: median (min–max) over the runs")
    width = max(len(f.name) for f in results.figures.values()) if results.figures else 10
    for figure in results.figures.values():
        note = f"  [{figure.note}]" if figure.note else ""
        print(f"  {figure.name:<{width}}  {spread(figure):>28} {figure.unit}{note}")
    for key, message in results.errors.items():
        print(f"  FAILED {key}: {message.splitlines()[0]}")


def judge_all(results: Results) -> list[dict[str, Any]]:
    return [target.judge(results) for target in TARGETS]


def print_targets(rows: list[dict[str, Any]]) -> None:
    print("\nTargets: measured median vs goal")
    print(f"  {'target':<42} {'measured':>12} {'goal':>14} {'of goal':>8}  verdict")
    for row in rows:
        measured = "—" if row["measured"] is None else fmt(row["measured"], row["unit"])
        sign = "≥" if any(t.label == row["target"] and t.at_least for t in TARGETS) else "≤"
        goal = f"{sign} {fmt(row['goal'], row['unit'])} {row['unit']}"
        of_goal = "—" if row["of_goal"] is None else f"{row['of_goal']:.2f}×"
        print(f"  {row['target']:<42} {measured:>12} {goal:>14} {of_goal:>8}  {row['verdict']}")


def print_earlier(results: Results) -> None:
    print("\nValidation and round trips (same workloads)")
    for label, key, beside in EARLIER:
        figure = results.figures.get(key)
        if figure is None or not figure.values:
            print(f"  {label}: —")
            continue
        text = f"{spread(figure)} {figure.unit}"
        other = results.figures.get(beside) if beside else None
        if other is not None and other.values:
            text += f"   vs {spread(other)} {other.unit}"
        print(f"  {label}: {text}")


def print_cluster(results: Results) -> None:
    """The cluster's figures, each beside one server's and their ratio when both ran in this bench."""
    if not any(results.figures.get(cluster) for _, cluster, _, _ in CLUSTER):
        return
    print("\nRedis Cluster (3 masters + 3 replicas) beside one server, same runs")
    for label, cluster, single, ratio in CLUSTER:
        figure = results.figures.get(cluster)
        if figure is None or not figure.values:
            print(f"  {label}: —")
            continue
        text = f"{spread(figure)} {figure.unit}"
        other, times = results.figures.get(single), results.figures.get(ratio)
        if other is not None and other.values:
            text += f"   vs {spread(other)} {other.unit} on one server"
        if times is not None and times.values:
            text += f"   (cluster ÷ one server: {spread(times)}×)"
        print(f"  {label}: {text}")


def document(results: Results, rows: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": _cpus()},
        "options": options,
        "figures": {key: figure.as_dict() for key, figure in results.figures.items()},
        "targets": rows,
        "errors": results.errors,
        "notes": results.notes,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def save(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
