"""Observability: the live view's render and snapshot, `agents`, `why`, and the side edges of `graph`.

Pure parts on crafted data; the commands against real coordinator and worker processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from phibroker import workflow as workflows
from phibroker.runtime.client import Client
from phibroker.runtime.events import subscription_edges
from phibroker.settings import Settings
from phibroker.store.connection import Connection
from phibroker.store.coordinator import CoordinatorStore
from phibroker.store.registry import Registry
from phibroker.tools.diagnose import Facts, explain, worker_rows
from phibroker.tools.watch import (
    AgentRow,
    Snapshot,
    SubRow,
    WorkflowRow,
    plan_of,
    remaining_time,
    render,
    snapshot,
)
from phibroker.workflow import dag
from tests.conftest import Processes, free_port, until

NOW = 1_800_000_000.0


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def text_of(renderable: Any, width: int = 80) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with it
    console.print(renderable)
    console.file.close()
    return console.export_text()


def row(text: str, first: str) -> list[str]:
    """The cells of the line that starts with `first`, split on runs of spaces."""
    line = next(line for line in text.splitlines() if line.startswith(first + " "))
    return [cell.strip() for cell in line.split("  ") if cell.strip()]


# -- render ---------------------------------------------------------------------------------------


def crafted(**changes: Any) -> Snapshot:
    base = Snapshot(
        taken=NOW,
        source="redis://localhost:6379/0 · phi",
        coordinators=2,
        agents=[
            AgentRow("vssc", 7, 40, pending=3, lag=None, workers=0, dead=1, busy=0, slots=0, rate=None),
            AgentRow("webc", 12, 300, pending=2, lag=5, workers=2, dead=0, busy=3, slots=8, rate=2.5),
        ],
        workflows=[
            WorkflowRow("deploy-0123456789", "running", 3, 5, elapsed=12.0, eta=42.0),
            WorkflowRow("gate-9876543210", "waiting_approval", 2, 4, elapsed=65.0, eta=30.0, gated=True),
        ],
        running_total=2,
        approvals=[
            {
                "id": "a1b2c3d4e5f60718",
                "workflow": "gate-9876543210",
                "task": "Approve",
                "message": "Ship release 7?",
                "deadline": NOW + 3600,
            }
        ],  # fmt: skip
        approvals_total=1,
        events=[
            {
                "type": "task.dispatched",
                "workflow": "deploy-0123456789",
                "task": "Build",
                "ts": NOW - 3,
                "data": {"agent": "webc", "attempt": 1},
            },
            {
                "type": "task.failed",
                "workflow": "deploy-0123456789",
                "task": "Lint",
                "ts": NOW - 1,
                "data": {"error": "ValueError: boom"},
            },
        ],  # fmt: skip
        subscriptions=[SubRow("ops.page", "ops", "task.failed", 5, None, 2, 1)],
    )
    return Snapshot(**{**base.__dict__, **changes})


def test_render_shows_the_exact_numbers() -> None:
    text = text_of(render(crafted()))
    assert "2 coordinators" in text
    assert row(text, "webc") == ["webc", "12", "2", "3/8", "2", "5", "2.5"]
    assert row(text, "vssc") == ["vssc", "7", "0 +1 dead", "0/0", "3", "unknown", "…"]
    deploy = row(text, "deploy-0123456789")
    assert deploy[0:2] == ["deploy-0123456789", "running"] and deploy[-3:] == ["3/5", "12s", "42s"]
    assert row(text, "gate-9876543210")[-3:] == ["2/4", "1m05s", "30s+gate"]
    assert row(text, "a1b2c3d4e5f60718") == [
        "a1b2c3d4e5f60718",
        "gate-9876543210 / Approve",
        "Ship release 7?",
        "in 1h00m",
    ]
    assert row(text, "ops.page (ops)") == ["ops.page (ops)", "task.failed", "5", "unknown", "2", "1"]
    assert row(text, clock(NOW - 3)) == [
        clock(NOW - 3),
        "task.dispatched",
        "deploy-0123456789",
        "Build",
        "→ webc (try 1)",
    ]
    assert row(text, clock(NOW - 1))[1:] == ["task.failed", "deploy-0123456789", "Lint", "ValueError: boom"]


def test_render_fits_80_columns_and_the_height_it_is_given() -> None:
    long = "x" * 60
    snap = crafted(
        agents=[AgentRow(f"agent-{long}", 10**9, 10**9, 10**6, None, 12, 3, 99, 400, 12345.6)],
        workflows=[WorkflowRow(f"workflow-{long}-{i:010d}", "waiting_approval", i, 10**5, 1e6, 7e5) for i in range(40)],
        running_total=400,
        approvals=[{"id": "f" * 16, "workflow": long, "task": long, "message": long * 3, "deadline": NOW + 1}] * 9,
        approvals_total=9,
        events=[{"type": "workflow.waiting_approval", "workflow": long, "task": long, "ts": NOW, "data": {"x": 1}}]
        * 15,
        subscriptions=[SubRow(long, long, long, 1, 2, 3, 4)],
        coordinators=0,
    )
    text = text_of(render(snap, height=40))
    lines = text.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 80
    assert len(lines) <= 39  # one line is left for the cursor
    assert "no live coordinator" in text and "… 390 more" in text and "… 4 more" in text
    assert "workflo…0000000007" in text  # ids give way in the middle, where they are alike
    assert len(text_of(render(snap)).splitlines()) > 60  # without a height, everything


def test_eta_follows_the_critical_path_of_what_is_left() -> None:
    spec = {
        "tasks": {
            "A": {"agent": "a", "command": "fetch"},
            "B": {"agent": "a", "command": "build", "depends_on": ["A"], "estimate": "10s"},
            "C": {"agent": "a", "command": "fetch", "depends_on": ["A"]},
            "D": {"agent": "a", "command": "ship", "depends_on": ["B", "C"]},
            "Gate": {"approval": {"message": "ok?"}, "depends_on": ["D"]},
        }
    }
    plan = plan_of(json.dumps(spec))
    units = {
        "A": {"state": "succeeded", "started": NOW - 10, "finished": NOW - 6},  # fetch took 4 s
        "B": {"state": "running", "started": NOW - 3},  # 7 s of its 10 s estimate left
        "C": {"state": "retrying", "retry_at": NOW + 20},  # 20 s wait + a fetch (4 s)
    }
    left, gated = remaining_time(plan, units, NOW)
    assert left == pytest.approx(24 + 4) and gated  # C, then D (no own measurement: the mean, 4 s)
    units["C"] = {"state": "succeeded", "started": NOW - 6, "finished": NOW - 4}  # fetch: mean 3 s now
    units["Gate"] = {"state": "skipped"}
    assert remaining_time(plan, units, NOW) == (pytest.approx(7 + 3), False)


# -- why, pure --------------------------------------------------------------------------------------

PLAN = json.dumps(
    {
        "name": "p",
        "tasks": {
            "A": {"agent": "probe", "command": "work"},
            "B": {"agent": "probe", "command": "work", "depends_on": ["A"]},
            "C": {"agent": "probe", "command": "work", "depends_on": ["B"]},
        },
    }
)


def facts(units: dict[str, dict[str, Any]], **changes: Any) -> Facts:
    meta = {"name": "p", "state": "running", "launched": 1, "spec": PLAN}
    return Facts(**{"id": "wf", "now": NOW, "meta": meta, "plan": plan_of(PLAN), "units": units, **changes})


def lease(agent: str, expires: float, **info: Any) -> dict[str, Any]:
    return {"agent": agent, "expires": expires, "reclaim_after": 2.0, "in_flight": 1, "concurrency": 4, **info}


def test_explain_names_each_blocker() -> None:
    ready = {"A": {"state": "ready", "dispatch": "d1", "dispatched": NOW - 5}}
    assert "A is ready, but agent probe has no live worker" in explain(facts(ready))[1]
    waiting = explain(facts(ready))[2]
    assert waiting == "B (pending) waits on A (ready)"

    dead = {"A": {"state": "running", "dispatch": "d1", "entry": "1-0", "worker": "w1", "started": NOW - 9}}
    lines = explain(
        facts(
            dead,
            workers={"w1": lease("probe", NOW - 3), "w2": lease("probe", NOW + 1)},
            pending={"1-0": {"consumer": "w1", "idle": 9000, "deliveries": 1}},
        )
    )
    assert lines[1] == (
        "A: running on w1 for 9.0s; its worker has been silent for 5.0s — its lease lapsed 3.0s ago,"
        " the task runs again once another worker of probe reclaims it (within 1.0s)"
    )

    retry = {"A": {"state": "retrying", "attempt": 1, "error": "Retryable: later"}}
    lines = explain(facts(retry, timers={"retry|wf|A|1": NOW + 3600}))
    assert (
        lines[1]
        == f"A is retrying: attempt 1 failed (Retryable: later); attempt 2 fires at {clock(NOW + 3600)} (in 1h00m)"
    )

    meta = {"name": "p", "state": "timed_out", "error": "the workflow's deadline passed", "spec": PLAN}
    assert explain(facts({}, meta=meta)) == [
        "wf timed_out: the workflow's deadline passed — it has ended; nothing blocks it"
    ]
    meta = {"name": "p", "state": "running", "launched": 1, "deadline": NOW + 90, "spec": PLAN}
    lines = explain(facts({}, meta=meta, coordinators=0))
    assert f"workflow deadline: it times out at {clock(NOW + 90)} (in 1m30s)" in lines
    assert any(line.startswith("no live coordinator") for line in lines)


def test_worker_rows_tell_alive_from_dead_by_redis_clock() -> None:
    rows = worker_rows(NOW, {"b@h:2": lease("webc", NOW - 0.5, pid=2), "a@h:1": lease("webc", NOW + 1.5, pid=1)})
    assert [(r["consumer"], r["alive"]) for r in rows] == [("a@h:1", True), ("b@h:2", False)]
    assert rows[0]["last_heartbeat"] == NOW - 0.5 and rows[0]["since_heartbeat"] == pytest.approx(0.5)


# -- graph side edges --------------------------------------------------------------------------------

FLOW = """
name: ship
tasks:
  Build: {agent: vssc, command: implement}
  Approve: {approval: {message: ok?}, depends_on: [Build]}
  Deploy: {agent: cmdc, command: deploy, depends_on: [Approve], compensate: {command: rollback}}
"""


def test_subscriptions_become_readable_side_edges(tmp_path: Path) -> None:
    (tmp_path / "ship.yaml").write_text(FLOW)
    wf = workflows.load(tmp_path / "ship.yaml")
    subs = {
        "ops.page": {"agent": "ops", "event": "task.failed"},
        "ops.audit": {"agent": "ops", "event": "workflow.*"},
        "ops.gates": {"agent": "ops", "event": "approval.requested"},
        "ops.deploys": {"agent": "ops", "event": "task.succeeded", "where": "event.task == 'Deploy'"},
        "ops.undo": {"agent": "ops", "event": "task.compensated"},
        "ops.scans": {"agent": "ops", "event": "scan.finished"},
    }
    assert subscription_edges(wf, subs) == [
        ("ship", "sub:ops.audit", "workflow.*"),
        ("Deploy", "sub:ops.deploys", "task.succeeded"),
        ("Approve", "sub:ops.gates", "approval.requested"),
        ("ship", "sub:ops.page", "task.failed (any task)"),
        ("Deploy", "sub:ops.undo", "task.compensated"),
    ]
    dot = dag.to_dot(wf.deps, name=wf.name, side_edges=subscription_edges(wf, subs))
    assert '"ship" -> "sub:ops.page" [style=dashed, label="task.failed (any task)"];' in dot


# -- against real processes -----------------------------------------------------------------------------


def cli(settings: Settings, *args: str, url: str | None = None, columns: int = 120) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PHIBROKER_REDIS_URL": url or settings.redis_url,
        "PHIBROKER_NAMESPACE": settings.namespace,
        "COLUMNS": str(columns),
    }
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60, env=env
    )


def states(client: Client, wf_id: str) -> dict[str, str]:
    return {name: task["state"] for name, task in client.status(wf_id)["tasks"].items()}


GATED = """
name: gated
tasks:
  Fetch: {agent: probe, command: noop}
  Slow: {agent: probe, command: work, depends_on: [Fetch], payload: {sleep: 60}, estimate: 60s}
  Side: {agent: probe, command: noop, depends_on: [Fetch]}
  Approve: {approval: {message: "Ship it?", timeout: 1h}, depends_on: [Side]}
  Deploy: {agent: probe, command: noop, depends_on: [Slow, Approve]}
  Report: {agent: ghost, command: report, depends_on: [Deploy]}
"""


def test_watch_once_shows_a_real_run(procs: Processes, client: Client, settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "gated.yaml").write_text(GATED)
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    wf_id = client.submit(tmp_path / "gated.yaml")
    until(lambda: client.approvals() and states(client, wf_id)["Slow"] == "running", procs)
    (approval,) = client.approvals()
    shown = cli(settings, "watch", "--once")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert row(text, "probe")[:6] == ["probe", "3", "1", "1/4", "1", "0"]  # Fetch, Slow, Side; Slow runs
    assert row(text, "ghost")[:6] == ["ghost", "none", "0", "0/0", "0", "unknown"]  # named by the running spec
    cells = row(text, wf_id)
    assert cells[1] == "waiting_approval" and cells[-3] == "2/6" and cells[-1].endswith("s+gate")
    assert row(text, approval["id"])[1:3] == [f"{wf_id} / Approve", "Ship it?"]
    assert "approval.requested" in text and "1 coordinator" in text
    narrow = cli(settings, "watch", "--once", "--workflow", wf_id, columns=80)
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    assert "Workflows" in narrow.stdout and "ghost" in narrow.stdout
    assert cli(settings, "watch", "--once", "--workflow", "nope").returncode == 2


def test_snapshot_measures_messages_per_second(settings: Settings) -> None:
    broker = CoordinatorStore(settings)
    stream = settings.keys.agent_tasks("pump")
    broker.ensure_group(stream, "workers")
    event = {"type": "task.dispatched", "workflow": "w", "task": "t", "data": {"agent": "pump"}, "ts": 1.0}
    broker.relay([event], None)
    first = snapshot(broker)
    for _ in range(30):
        broker.add(stream, b"x")
    second = snapshot(broker, first)
    (pump,) = second.agents  # found through the dispatch event: no lease, no running workflow
    assert pump.name == "pump" and pump.length == 30 and pump.lag == 30 and pump.workers == 0
    assert pump.rate is not None and pump.rate == pytest.approx(30 / (second.taken - first.taken))
    broker.close()


def test_agents_marks_a_killed_worker_dead(procs: Processes, settings: Settings) -> None:
    victim = procs.worker("probe", app="tests.apps.probe")
    procs.worker("webc")
    rows = until(lambda: len(r := json.loads(cli(settings, "agents", "--json").stdout)) == 2 and r, procs)
    assert [(r["agent"], r["alive"]) for r in rows] == [("probe", True), ("webc", True)]
    assert rows[0]["pid"] == victim.pid and rows[0]["concurrency"] == 4 and rows[0]["in_flight"] == 0
    victim.send_signal(signal.SIGKILL)
    time.sleep(settings.reclaim_after + 0.5)  # the lease lapses reclaim_after after its last renewal
    listed = cli(settings, "agents")
    assert listed.returncode == 0
    probe_line = next(line for line in listed.stdout.splitlines() if line.startswith("probe"))
    webc_line = next(line for line in listed.stdout.splitlines() if line.startswith("webc"))
    assert probe_line.endswith("DEAD") and f"pid {victim.pid}" in probe_line and webc_line.endswith("alive")
    dead = next(r for r in json.loads(cli(settings, "agents", "--json").stdout) if r["agent"] == "probe")
    assert dead["alive"] is False and dead["since_heartbeat"] > settings.reclaim_after


STUCK = """
name: stuck
timeout: 2h
tasks:
  Orphan: {agent: ghost, command: anything}
  Flaky:
    agent: probe
    command: flaky
    payload: {failures: 5}
    retry: {max_attempts: 3, base_delay: 1h, max_delay: 2h, jitter: 0}
  Gate: {approval: {message: "go?", timeout: 30m}}
  Long: {agent: probe, command: work, payload: {sleep: 60}}
  After: {agent: probe, command: noop, depends_on: [Long]}
"""


def test_why_names_every_blocker(procs: Processes, client: Client, settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "stuck.yaml").write_text(STUCK)
    procs.coordinator(PHIBROKER_CANCEL_GRACE="1")  # the killed worker's task will never say it stopped
    worker = procs.worker("probe", app="tests.apps.probe")
    wf_id = client.submit(tmp_path / "stuck.yaml")
    wanted = {"Orphan": "ready", "Flaky": "retrying", "Gate": "running", "Long": "running", "After": "pending"}
    until(lambda: states(client, wf_id) == wanted, procs)
    (approval,) = client.approvals()
    result = cli(settings, "why", wf_id)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{wf_id} (stuck) is waiting_approval: 0/5 tasks done"
    assert "Orphan is ready, but agent ghost has no live worker (start one: phibroker worker --agent ghost)" in lines
    flaky = next(line for line in lines if line.startswith("Flaky"))
    assert "attempt 1 failed (Retryable: attempt 1 fails on purpose); attempt 2 fires at" in flaky
    assert re.search(r"\(in (1h00m|59m5\ds)\)$", flaky), flaky
    gate = next(line for line in lines if line.startswith("Gate"))
    assert f"waits for a human decision: phibroker approve {approval['id']}" in gate and "(in 29m5" in gate
    assert next(line for line in lines if line.startswith("Long")).startswith("Long is running on probe@")
    assert "After (pending) waits on Long (running)" in lines
    assert lines[-1].startswith("workflow deadline: it times out at") and "(in 1h59m)" in lines[-1]

    worker.send_signal(signal.SIGKILL)
    time.sleep(settings.reclaim_after + 0.5)
    lines = cli(settings, "why", wf_id).stdout.splitlines()
    long = next(line for line in lines if line.startswith("Long"))
    assert long.startswith("Long: running on probe@"), lines
    assert "lease lapsed" in long and long.endswith("(none is alive: start one with phibroker worker --agent probe)")

    assert cli(settings, "why", "no-such-workflow").returncode == 2
    client.cancel(wf_id)
    until(lambda: client.status(wf_id)["state"] == "cancelled", procs)
    ended = cli(settings, "why", wf_id)
    assert ended.returncode == 0 and ended.stdout.startswith(f"{wf_id} cancelled")


def test_why_finds_a_ready_entry_held_by_a_dead_worker(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """A worker that read a task but died before starting it: the task is `ready`, its entry pending."""
    (tmp_path / "one.yaml").write_text("name: one\ntasks:\n  A: {agent: probe, command: noop}\n")
    procs.coordinator()
    wf_id = client.submit(tmp_path / "one.yaml")
    until(lambda: states(client, wf_id)["A"] == "ready", procs)
    broker = Connection(settings)
    stream = settings.keys.agent_tasks("probe")
    broker.ensure_group(stream, "workers")
    (entry,) = broker.read_group(stream, "workers", "probe@gone:1:x", count=10, block=None)
    lines = cli(settings, "why", wf_id).stdout.splitlines()
    assert lines[1] == (
        "A (ready) is pending on dead worker probe@gone:1:x (no lease);"
        " reclaimed once a probe worker runs (none is alive)"
    ), lines
    broker.close()


def test_graph_draws_subscriptions_when_a_broker_answers(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "ship.yaml").write_text(FLOW)
    registry = Registry(settings)
    registry.register_subscription("ops", "ops.page", {"event": "task.failed", "where": None})
    registry.add_to_roster("ops")
    drawn = cli(settings, "graph", str(tmp_path / "ship.yaml"), "--format", "mermaid")
    assert drawn.returncode == 0 and 'ship -.->|"task.failed (any task)"| sub_ops_page' in drawn.stdout
    began = time.monotonic()
    alone = cli(settings, "graph", str(tmp_path / "ship.yaml"), url=f"redis://127.0.0.1:{free_port()}/0")
    assert alone.returncode == 0 and "sub:" not in alone.stdout
    assert '"Build" -> "Approve";' in alone.stdout and time.monotonic() - began < 5
