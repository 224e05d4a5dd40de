"""The broker core end to end: real redis-server, real `phibroker coordinator` and `worker` processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from phibroker import wire
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes, until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def events_of(settings: Settings, wf_id: str) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(settings.redis_url)
    out = []
    for _, fields in r.xrange(settings.keys.event_log(wf_id)):
        out += [e for e in wire.decode_events(fields[b"m"], 1 << 24) if e["workflow"] == wf_id]
    return out


def wait_for(status: dict[str, Any], procs: Processes) -> dict[str, Any]:
    assert status["state"] == "succeeded", json.dumps(status, indent=1)[:3000] + procs.output()
    return status


@pytest.mark.parametrize("example", ["complete-dag", "parallel-research", "vulnerability-fix", "feature-deploy"])
def test_examples_run_to_success_in_dependency_order(example: str, procs: Processes, client: Client) -> None:
    procs.examples()
    wf_id = client.submit(EXAMPLES / f"{example}.yaml")
    status = wait_for(client.wait(wf_id, timeout=60), procs)
    spec = client.broker.read_workflow(wf_id)[0]["spec"]
    deps = {name: task.get("depends_on", []) for name, task in json.loads(spec)["tasks"].items()}
    for name, task in status["tasks"].items():
        if task["state"] == "skipped":
            continue
        assert task["state"] == "succeeded"
        assert task["attempts"] == 1 and len(task["history"]) == 1
        # Its one attempt was handed the result of each dependency that succeeded, so it was dispatched
        # after they ended. No clocks compared: a task's start is stamped by Redis and its dependency's
        # end by a coordinator's estimate of Redis's clock, a few ms apart on a busy machine.
        succeeded = sorted(dep for dep in deps[name] if status["tasks"][dep]["state"] == "succeeded")
        if task["agent"] is not None:
            assert task["result"]["inputs"] == succeeded, (name, task["result"])


def test_independent_tasks_overlap_and_fan_in_gets_every_input(procs: Processes, client: Client) -> None:
    procs.examples()
    dag = client.submit(EXAMPLES / "complete-dag.yaml")
    research = client.submit(EXAMPLES / "parallel-research.yaml", params={"topic": "GraphQL"})
    status = wait_for(client.wait(dag, timeout=60), procs)
    api, ui = status["tasks"]["ImplementAPI"]["result"], status["tasks"]["ImplementUI"]["result"]
    assert abs(api["started"] - ui["started"]) < 0.05  # both ran at once (each sleeps 0.05 s)
    merged = wait_for(client.wait(research, timeout=60), procs)["tasks"]["Synthesize"]["result"]
    assert merged["inputs"] == ["ResearchPatterns", "ResearchPerformance", "ResearchSecurity"]
    assert merged["title"] == "Requirements: GraphQL"


def test_a_task_waits_for_its_first_worker(procs: Processes, client: Client) -> None:
    procs.coordinator()
    wf_id = client.submit(EXAMPLES / "parallel-research.yaml")
    deadline = time.monotonic() + 10
    while client.status(wf_id)["tasks"]["ResearchPatterns"]["state"] != "ready":
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    time.sleep(0.5)
    assert client.status(wf_id)["tasks"]["ResearchPatterns"]["state"] == "ready"
    for agent in ("webc", "dc"):
        procs.worker(agent)
    wait_for(client.wait(wf_id, timeout=60), procs)


def test_two_coordinators_never_transition_or_dispatch_twice(
    procs: Processes, client: Client, settings: Settings
) -> None:
    procs.coordinator()
    procs.examples()  # a second coordinator and the workers
    ids = [client.submit(EXAMPLES / "complete-dag.yaml") for _ in range(8)]
    for wf_id in ids:
        status = wait_for(client.wait(wf_id, timeout=60), procs)

        tasks = sorted(status["tasks"])

        def dispatched(wf_id: str = wf_id, tasks: list[str] = tasks) -> list[str] | None:
            """The run's tasks, once their dispatch events are all in the log: a commit sends its
            dispatches, its drain the events, so the run may end (its last task answered to the other
            coordinator) before a slow coordinator's drain has published them."""
            found = sorted(e["task"] for e in events_of(settings, wf_id) if e["type"] == "task.dispatched")
            return found if len(found) >= len(tasks) else None

        assert until(dispatched, procs) == tasks, wf_id
        for task in status["tasks"].values():
            assert [h["applied"] for h in task["history"]] == [True]
    # Each recorded dispatch reached its agent's stream once. A transition that lost the version race
    # to the other coordinator may have sent dispatches with its commit: ids no workflow recorded,
    # which the start script refused (every task ran once, above).
    recorded = {u["dispatch"] for wf_id in ids for u in client.broker.read_workflow(wf_id)[1].values()}
    r = redis.Redis.from_url(settings.redis_url)
    sent = [
        wire.TaskMessage.decode(fields[b"m"], 1 << 20).id
        for agent in ("webc", "dc", "vssc", "kalic", "cmdc")
        for _, fields in r.xrange(settings.keys.agent_tasks(agent))
    ]
    assert len(recorded) == 6 * len(ids)
    assert sorted(d for d in sent if d in recorded) == sorted(recorded)


def test_duplicate_dispatch_and_duplicate_result_are_harmless(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "name: dup\nparams: {ledger: ''}\ntasks:\n"
        "  A: {agent: probe, command: work, payload: {ledger: '${params.ledger}'}}\n"
        "  B: {agent: probe, command: work, depends_on: [A], payload: {ledger: '${params.ledger}'}}\n"
    )
    procs.coordinator()
    wf_id = client.submit(flow, params={"ledger": str(ledger)})
    r = redis.Redis.from_url(settings.redis_url)
    stream = settings.keys.agent_tasks("probe")
    deadline = time.monotonic() + 10
    while not r.xlen(stream):
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.02)
    ((_, fields),) = r.xrange(stream)
    r.xadd(stream, fields)  # the same dispatch twice, as a redis-py retry would make it
    procs.worker("probe", app="tests.apps.probe")
    status = wait_for(client.wait(wf_id, timeout=30), procs)
    assert ledger.read_text().split("\n").count(f"{wf_id}:A 1 1") == 1
    assert len(ledger.read_text().splitlines()) == 2

    lane = settings.keys.agent_inbox("probe", None)
    results = r.xrange(lane)
    assert results
    for _, fields in results:
        r.xadd(lane, fields)  # every result again
    before = r.xlen(stream)
    time.sleep(1.0)
    again = client.status(wf_id)
    assert again["state"] == "succeeded" and r.xlen(stream) == before
    for name in ("A", "B"):
        applied = [h for h in again["tasks"][name]["history"] if h["applied"]]
        assert len(applied) == 1
        assert again["tasks"][name]["result"] == status["tasks"][name]["result"]


def cli(settings: Settings, *args: str, url: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {"PHIBROKER_REDIS_URL": url or settings.redis_url, "PHIBROKER_NAMESPACE": settings.namespace, **extra}
    import os

    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


STATUS_KEYS = {"id", "name", "state", "created_at", "finished_at", "tasks"}
TASK_KEYS = {"state", "agent", "attempts", "started_at", "finished_at", "result", "error", "history"}


def test_cli_json_shapes_and_exit_codes(procs: Processes, settings: Settings) -> None:
    procs.examples()
    submitted = cli(settings, "submit", str(EXAMPLES / "complete-dag.yaml"), "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert set(json.loads(submitted.stdout)) == {"id"}
    waited = cli(settings, "submit", str(EXAMPLES / "complete-dag.yaml"), "--wait", "--json", "-p", "feature=x")
    assert waited.returncode == 0, waited.stderr + procs.output()
    doc = json.loads(waited.stdout)
    assert STATUS_KEYS <= set(doc) and doc["state"] == "succeeded"
    for task in doc["tasks"].values():
        assert TASK_KEYS <= set(task)
        assert isinstance(task["attempts"], int) and isinstance(task["history"], list)
    shown = cli(settings, "status", doc["id"], "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["tasks"].keys() == doc["tasks"].keys()
    again = cli(settings, "submit", str(EXAMPLES / "complete-dag.yaml"), "--id", doc["id"], "--wait", "--json")
    assert json.loads(again.stdout)["created_at"] == doc["created_at"]  # same id: the same workflow
    listed = cli(settings, "list", "--json")
    assert {row["id"] for row in json.loads(listed.stdout)} >= {doc["id"], json.loads(submitted.stdout)["id"]}
    unknown = cli(settings, "status", "no-such-workflow")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no workflow")
    bad_param = cli(settings, "submit", str(EXAMPLES / "complete-dag.yaml"), "-p", "featur=x")
    assert bad_param.returncode == 2 and "did you mean 'feature'" in bad_param.stderr
    from tests.conftest import free_port

    down = cli(settings, "status", "x", url=f"redis://127.0.0.1:{free_port()}/0")
    assert down.returncode == 3 and down.stderr.count("\n") == 1, down.stderr


def test_submit_wait_exits_1_when_the_workflow_fails(procs: Processes, settings: Settings, tmp_path: Path) -> None:
    flow = tmp_path / "fails.yaml"
    flow.write_text("name: fails\ntasks:\n  A: {agent: probe, command: fail}\n")
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    result = cli(settings, "submit", str(flow), "--wait", "--json")
    assert result.returncode == 1, result.stderr + procs.output()
    doc = json.loads(result.stdout)
    assert doc["state"] == "failed"
    assert doc["tasks"]["A"]["error"] == "ValueError: boom"
    assert "Traceback" in doc["tasks"]["A"]["history"][0]["traceback"]


def test_a_small_workflow_does_not_queue_behind_a_big_fan_out(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe", concurrency=4)
    fan = "".join(f"  T{i}: {{agent: probe, command: work, payload: {{sleep: 0.005}}}}\n" for i in range(1500))
    (tmp_path / "fan.yaml").write_text("name: fan\ntasks:\n" + fan)
    chain = "  C0: {agent: probe, command: noop}\n"
    chain += "".join(f"  C{i}: {{agent: probe, command: noop, depends_on: [C{i - 1}]}}\n" for i in range(1, 5))
    (tmp_path / "chain.yaml").write_text("name: chain\ntasks:\n" + chain)
    big = client.submit(tmp_path / "fan.yaml")
    time.sleep(0.3)  # the fan-out is queued and running
    small = client.wait(client.submit(tmp_path / "chain.yaml"), timeout=60)
    assert small["state"] == "succeeded"
    assert client.status(big)["state"] == "running"  # the chain did not wait for the fan-out's 1,500 tasks
    r = redis.Redis.from_url(settings.redis_url)
    assert r.xlen(settings.keys.agent_bulk("probe")) >= 1000  # the big release went to the bulk lane
    assert client.wait(big, timeout=120)["state"] == "succeeded"
