"""`phibroker.testing.Simulation`: the real engine driven in memory, as a user tests their own workflow.

Each test writes a workflow and plain handler functions, runs it with no Redis and no processes, and
checks what `status --json` and the events would say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from phibroker import Agent, Retryable
from phibroker.testing import Simulation


def flow(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    return path


def states(doc: dict[str, Any]) -> dict[str, str]:
    return {name: task["state"] for name, task in doc["tasks"].items()}


@pytest.fixture
def worker() -> Agent:
    agent = Agent("w")

    @agent.command("echo")
    def echo(ctx: Any, **payload: Any) -> dict[str, Any]:
        return {"payload": payload, "inputs": ctx.inputs, "attempt": ctx.attempt}

    @agent.command("boom")
    def boom(ctx: Any, **payload: Any) -> None:
        raise ValueError("boom")

    return agent


def test_inputs_flow_along_the_dag_and_templates_render(tmp_path: Path, worker: Agent) -> None:
    path = flow(
        tmp_path,
        "name: w\nparams: {topic: x}\ntasks:\n"
        "  A: {agent: w, command: echo, payload: {topic: '${params.topic}'}}\n"
        "  B: {agent: w, command: echo, depends_on: [A], payload: {got: '${tasks.A.result.payload.topic}'}}\n",
    )
    doc = Simulation(path, [worker], params={"topic": "GraphQL"}).run()
    assert doc["state"] == "succeeded"
    assert doc["tasks"]["B"]["result"] == {
        "payload": {"got": "GraphQL"},
        "inputs": {"A": {"payload": {"topic": "GraphQL"}, "inputs": {}, "attempt": 1}},
        "attempt": 1,
    }


def test_retries_back_off_on_the_virtual_clock_then_succeed(tmp_path: Path) -> None:
    agent, seen = Agent("w"), []

    @agent.command("flaky")
    def flaky(ctx: Any) -> str:
        seen.append(ctx.attempt)
        if ctx.attempt < 3:
            raise Retryable("not yet")
        return "ok"

    path = flow(tmp_path, "name: w\ntasks:\n  A: {agent: w, command: flaky, retry: {base_delay: 10s, jitter: 0}}\n")
    sim = Simulation(path, [agent])
    doc = sim.run()
    assert doc["state"] == "succeeded" and seen == [1, 2, 3]
    task = doc["tasks"]["A"]
    assert task["attempts"] == 3 and [h["error"] for h in task["history"]] == [
        "Retryable: not yet",
        "Retryable: not yet",
        None,
    ]
    assert task["finished_at"] - doc["created_at"] == 30.0  # 10 s, then 20 s of backoff
    assert sim.event_types("A").count("task.retrying") == 2


def test_a_failure_compensates_newest_first(tmp_path: Path, worker: Agent) -> None:
    undone = []

    @worker.command("undo")
    def undo(ctx: Any, **payload: Any) -> None:
        undone.append(ctx.task)

    path = flow(
        tmp_path,
        "name: w\ntasks:\n"
        "  A: {agent: w, command: echo, compensate: {command: undo}}\n"
        "  B: {agent: w, command: echo, depends_on: [A], compensate: {command: undo}}\n"
        "  C: {agent: w, command: boom, depends_on: [B], retry: {max_attempts: 1}}\n",
    )
    doc = Simulation(path, [worker]).run()
    assert doc["state"] == "failed" and undone == ["B", "A"]
    assert states(doc) == {"A": "compensated", "B": "compensated", "C": "failed"}
    assert doc["tasks"]["C"]["error"] == "ValueError: boom"


def test_an_approval_waits_for_a_person_then_approve_or_reject_or_timeout(tmp_path: Path, worker: Agent) -> None:
    text = (
        "name: w\ntasks:\n"
        "  Gate: {approval: {message: ship?, timeout: 1h, approvers: [stryk]}}\n"
        "  Ship: {agent: w, command: echo, depends_on: [Gate]}\n"
    )
    path = flow(tmp_path, text)
    approved = Simulation(path, [worker])
    assert approved.run()["state"] == "waiting_approval"
    doc = approved.approve("Gate", comment="go")
    assert doc["state"] == "succeeded" and doc["tasks"]["Gate"]["result"]["comment"] == "go"

    rejected = Simulation(path, [worker])
    rejected.run()
    with pytest.raises(ValueError, match="may not decide"):
        rejected.reject("Gate", reason="no", approver="mallory")
    doc = rejected.reject("Gate", reason="not today")
    assert doc["state"] == "failed" and doc["tasks"]["Gate"]["error"] == "rejected: not today"

    forgotten = Simulation(path, [worker])
    forgotten.run()
    assert forgotten.advance(59 * 60)["state"] == "waiting_approval"
    doc = forgotten.advance(61)
    assert doc["state"] == "failed" and doc["tasks"]["Gate"]["error"] == "timeout"
    assert states(doc)["Ship"] == "upstream_failed"


def test_map_scatters_in_order_and_gathers(tmp_path: Path) -> None:
    agent = Agent("w")

    @agent.command("count")
    def count(ctx: Any, items: list[int]) -> dict[str, Any]:
        return {"part": ctx.partition, "sum": sum(items)}

    path = flow(
        tmp_path,
        "name: w\nparams: {xs: []}\ntasks:\n"
        "  M: {agent: w, command: count, map: {over: '${params.xs}', partitions: 3}}\n",
    )
    doc = Simulation(path, [agent], params={"xs": list(range(10))}).run()
    assert doc["tasks"]["M"]["result"] == [
        {"part": [0, 3], "sum": 0 + 1 + 2 + 3},
        {"part": [1, 3], "sum": 4 + 5 + 6},
        {"part": [2, 3], "sum": 7 + 8 + 9},
    ]


def test_a_partition_over_the_size_limit_fails_its_task_once(tmp_path: Path, worker: Agent) -> None:
    path = flow(
        tmp_path,
        "name: w\nfailure: best_effort\nparams: {items: []}\ntasks:\n"
        "  M: {agent: w, command: echo, map: {over: '${params.items}', partitions: 3}}\n"
        "  Other: {agent: w, command: echo}\n",
    )
    sim = Simulation(path, [worker], params={"items": ["x" * 1000] * 3}, limit=600)
    doc = sim.run()
    assert states(doc) == {"M": "failed", "Other": "succeeded"} and doc["state"] == "failed"
    assert sim.event_types("M").count("task.failed") == 1


def test_when_skips_and_trigger_rules_converge(tmp_path: Path, worker: Agent) -> None:
    path = flow(
        tmp_path,
        "name: w\ntasks:\n"
        "  Check: {agent: w, command: echo, payload: {ok: true}}\n"
        "  Yes: {agent: w, command: echo, depends_on: [Check], when: 'tasks.Check.result.payload.ok'}\n"
        "  No: {agent: w, command: echo, depends_on: [Check], when: 'not tasks.Check.result.payload.ok'}\n"
        "  Join: {agent: w, command: echo, depends_on: [Yes, No], trigger: one_success}\n",
    )
    doc = Simulation(path, [worker]).run()
    assert states(doc) == {"Check": "succeeded", "Yes": "succeeded", "No": "skipped", "Join": "succeeded"}


def test_a_release_bigger_than_one_transition_goes_on_in_the_next(tmp_path: Path, worker: Agent) -> None:
    tasks = "".join(f"  T{i}: {{agent: w, command: echo}}\n" for i in range(2500))
    sim = Simulation(flow(tmp_path, "name: many\ntasks:\n" + tasks), [worker])
    doc = sim.run()
    assert doc["state"] == "succeeded" and len(doc["tasks"]) == 2500
    assert sim.event_types().count("task.succeeded") == 2500


def test_cancel_stops_what_is_waiting(tmp_path: Path, worker: Agent) -> None:
    path = flow(
        tmp_path,
        "name: w\ntasks:\n  Gate: {approval: {message: go?}}\n  After: {agent: w, command: echo, depends_on: [Gate]}\n",
    )
    sim = Simulation(path, [worker])
    sim.run()
    doc = sim.cancel("changed my mind")
    assert doc["state"] == "cancelled" and states(doc) == {"Gate": "cancelled", "After": "cancelled"}


def test_an_agent_the_simulation_lacks_is_named(tmp_path: Path, worker: Agent) -> None:
    with pytest.raises(LookupError, match="needs agent 'other'"):
        Simulation(flow(tmp_path, "name: w\ntasks:\n  A: {agent: other, command: c}\n"), [worker]).run()


@pytest.mark.parametrize(
    "type_", ["task.failed", "Task.Failed", " workflow.failed", "t\u0430sk.failed", "scan\x1b[2Kdone", "x" * 201]
)
def test_a_handler_may_not_emit_the_coordinators_own_event_types_nor_unprintable_ones(type_: str) -> None:
    agent = Agent("w")

    @agent.command()
    def claim(ctx: Any) -> None:
        ctx.emit("scan.done", {"ok": True})
        ctx.emit(type_, {"error": "not mine to tell"})

    doc = Simulation({"name": "e", "tasks": {"T": {"agent": "w", "command": "claim"}}}, [agent]).run()
    assert doc["state"] == "failed"
    assert f"ValueError: a handler may not emit {type_!r:.100}" in doc["tasks"]["T"]["error"]
