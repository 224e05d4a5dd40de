"""Failures, joins and cancellation as DAG users expect them, on the real engine in memory.

Each test is a small workflow run by `phibroker.testing.Simulation`: what a user would write to check
their own error handling. The case-by-case agreement with Airflow's rules is in test_trigger_rules.py;
the same behaviour on real processes and a real Redis is in test_cancel_path.py and test_failures.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from phibroker import Agent
from phibroker.testing import Simulation


@pytest.fixture
def w() -> Agent:
    agent = Agent("w")

    @agent.command("ok")
    def ok(ctx: Any, **payload: Any) -> dict[str, Any]:
        return {"task": ctx.task, "inputs": sorted(ctx.inputs)}

    @agent.command("boom")
    def boom(ctx: Any, message: str = "boom", **payload: Any) -> None:
        raise ValueError(message)

    return agent


def task(command: str = "ok", *deps: str, **fields: Any) -> dict[str, Any]:
    return {"agent": "w", "command": command, "depends_on": list(deps), "retry": {"max_attempts": 1}, **fields}


def states(doc: dict[str, Any]) -> dict[str, str]:
    return {name: t["state"] for name, t in doc["tasks"].items()}


def test_fail_fast_runs_the_handlers_and_marks_what_lies_below_the_failure(w: Agent) -> None:
    """Build fails: Deploy below it is upstream_failed (two hops too, even with none_failed), the
    all_done clean-up and the one_failed alert run, and an unrelated task still queued never starts."""
    sim = Simulation(
        {
            "name": "ff",
            "tasks": {
                "Build": task("boom"),
                "Lint": task(),
                "Deploy": task("ok", "Build", "Lint"),
                "Announce": task("ok", "Deploy", trigger="none_failed"),
                "Cleanup": task("ok", "Build", trigger="all_done"),
                "Alert": task("ok", "Build", "Lint", trigger="one_failed"),
            },
        },
        [w],
    )
    doc = sim.run()
    assert doc["state"] == "failed" and doc["error"].startswith("task Build failed: ValueError: boom")
    assert states(doc) == {
        "Build": "failed",
        "Lint": "cancelled",
        "Deploy": "upstream_failed",
        "Announce": "upstream_failed",
        "Cleanup": "succeeded",
        "Alert": "succeeded",
    }
    assert doc["tasks"]["Alert"]["result"]["inputs"] == []  # it fired on Build's failure alone
    assert "task.upstream_failed" in sim.event_types("Announce")


def test_best_effort_runs_every_branch_that_still_can(w: Agent) -> None:
    doc = Simulation(
        {
            "name": "be",
            "failure": "best_effort",
            "tasks": {
                "A": task("boom"),
                "B": task("ok", "A"),
                "C": task("ok", "B", trigger="none_failed"),
                "X": task(),
                "Y": task("ok", "X"),
            },
        },
        [w],
    ).run()
    assert states(doc) == {
        "A": "failed",
        "B": "upstream_failed",
        "C": "upstream_failed",
        "X": "succeeded",
        "Y": "succeeded",
    }
    assert doc["state"] == "failed" and doc["error"] == "failed: A"


def test_outcome_leaves_a_failure_handled_downstream_is_handled(w: Agent) -> None:
    spec = {
        "name": "handled",
        "outcome": "leaves",
        "tasks": {"Fetch": task("boom"), "Fallback": task("ok", "Fetch", trigger="all_done")},
    }
    assert Simulation(spec, [w]).run()["state"] == "succeeded"
    spec["tasks"]["Report"] = task("ok", "Fetch")  # a leaf below the failure: not handled
    doc = Simulation(spec, [w]).run()
    assert doc["state"] == "failed" and doc["tasks"]["Report"]["state"] == "upstream_failed"
    spec["outcome"] = "all"
    del spec["tasks"]["Report"]
    assert Simulation(spec, [w]).run()["state"] == "failed"


def test_a_quorum_starts_with_k_successes_and_cancel_rest_calls_off_the_others(w: Agent) -> None:
    sim = Simulation(
        {
            "name": "race",
            "tasks": {
                "R1": task(),
                "R2": task(),
                "R3": task(),
                "Best": task("ok", "R1", "R2", "R3", trigger={"at_least": 2}, cancel_rest=True),
            },
        },
        [w],
    )
    doc = sim.run()
    assert doc["state"] == "succeeded"
    assert states(doc) == {"R1": "succeeded", "R2": "succeeded", "R3": "cancelled", "Best": "succeeded"}
    assert doc["tasks"]["Best"]["result"]["inputs"] == ["R1", "R2"]
    assert doc["tasks"]["R3"]["error"] == "cancel_rest: Best started"


def test_a_quorum_that_can_no_longer_be_met_is_decided_at_once(w: Agent) -> None:
    doc = Simulation(
        {
            "name": "quorum",
            "failure": "best_effort",
            "tasks": {
                "R1": task("boom"),
                "R2": task("boom"),
                "R3": task(),
                "Join": task("ok", "R1", "R2", "R3", trigger={"at_least": 2}),
            },
        },
        [w],
    ).run()
    assert doc["tasks"]["Join"]["state"] == "upstream_failed"


def test_cancelling_one_task_skips_what_needs_it_and_the_run_goes_on(w: Agent) -> None:
    sim = Simulation(
        {
            "name": "region",
            "tasks": {
                "Gate": {"approval": {"message": "go?"}},
                "Slow": task("ok", "Gate"),
                "After": task("ok", "Slow"),
                "Either": task("ok", "Slow", trigger="none_failed"),
                "Other": task(),
            },
        },
        [w],
    )
    assert sim.run()["state"] == "waiting_approval"
    sim.cancel("not needed", tasks=["Slow"])
    doc = sim.approve("Gate")
    assert states(doc) == {
        "Gate": "succeeded",
        "Slow": "cancelled",
        "After": "skipped",
        "Either": "succeeded",
        "Other": "succeeded",
    }
    assert doc["state"] == "succeeded"


def test_cancelling_the_run_while_its_failure_handlers_run_keeps_it_failed(w: Agent) -> None:
    sim = Simulation(
        {
            "name": "stop-handlers",
            "tasks": {
                "A": task("boom"),
                "Ask": {"approval": {"message": "clean up?"}, "depends_on": ["A"], "trigger": "all_done"},
            },
        },
        [w],
    )
    assert sim.run()["state"] == "cancelling"  # A failed; the handler gate waits for a person
    doc = sim.cancel("enough")
    assert doc["state"] == "failed" and doc["tasks"]["Ask"]["state"] == "cancelled"
    assert doc["error"].startswith("task A failed")


def test_end_true_finishes_the_run_early_as_succeeded(w: Agent) -> None:
    doc = Simulation(
        {
            "name": "early",
            "tasks": {
                "Check": task("ok", end=True),
                "Gate": {"approval": {"message": "never answered"}},
                "Later": task("ok", "Gate"),
            },
        },
        [w],
    ).run()
    assert doc["state"] == "succeeded"
    assert states(doc) == {"Check": "succeeded", "Gate": "cancelled", "Later": "skipped"}


def test_a_rejection_can_skip_the_gate_so_the_workflow_branches(w: Agent) -> None:
    spec = {
        "name": "branch",
        "tasks": {
            "Review": {"approval": {"message": "ship?", "on_reject": "skip"}},
            "Ship": task("ok", "Review"),
            "Rework": task("ok", "Review", trigger="all_done", when="tasks.Review.state == 'skipped'"),
            "Notify": task("ok", "Review", trigger="none_failed"),
        },
    }
    sim = Simulation(spec, [w])
    sim.run()
    doc = sim.reject("Review", reason="not yet")
    assert doc["state"] == "succeeded"
    assert states(doc) == {"Review": "skipped", "Ship": "skipped", "Rework": "succeeded", "Notify": "succeeded"}
    assert doc["tasks"]["Review"]["error"] == "rejected: not yet"


def test_map_over_an_empty_list_succeeds_with_an_empty_list_and_dispatches_nothing(w: Agent) -> None:
    sim = Simulation(
        {"name": "empty", "params": {"items": []}, "tasks": {"M": {**task(), "map": {"over": "${params.items}"}}}},
        [w],
    )
    doc = sim.run()
    assert doc["state"] == "succeeded" and doc["tasks"]["M"]["result"] == []
    assert "task.dispatched" not in sim.event_types()


def test_unavailable_and_busy_errors_retry_by_default(w: Agent) -> None:
    calls: list[int] = []
    agent = Agent("w")

    @agent.command("flaky")
    def flaky(ctx: Any) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("service unavailable, try later")
        return "done"

    doc = Simulation({"name": "d", "tasks": {"A": {"agent": "w", "command": "flaky"}}}, [agent]).run()
    assert doc["state"] == "succeeded" and calls == [1, 2, 3]


def test_retry_runs_what_did_not_succeed_and_keeps_every_attempt() -> None:
    agent, fixed = Agent("w"), [False]

    @agent.command("ok")
    def ok(ctx: Any) -> str:
        return ctx.task

    @agent.command("fragile")
    def fragile(ctx: Any) -> str:
        if not fixed[0]:
            raise ValueError("not yet")
        return "fixed"

    sim = Simulation(
        {
            "name": "redrive",
            "tasks": {"A": task("ok"), "B": task("fragile", "A"), "C": task("ok", "B"), "D": task("ok", "A")},
        },
        [agent],
    )
    assert states(sim.run()) == {"A": "succeeded", "B": "failed", "C": "upstream_failed", "D": "cancelled"}
    fixed[0] = True
    doc = sim.retry()
    assert doc["state"] == "succeeded" and set(states(doc).values()) == {"succeeded"}
    assert doc["tasks"]["A"]["attempts"] == 1 and doc["tasks"]["B"]["attempts"] == 2
    assert [h["error"] for h in doc["tasks"]["B"]["history"]] == ["ValueError: not yet", None]
    assert sim.event_types().count("workflow.retried") == 1
    with pytest.raises(ValueError, match="only a failed, cancelled or timed-out run"):
        sim.retry()


def test_retry_from_a_task_runs_it_and_everything_below_it_again(w: Agent) -> None:
    sim = Simulation(
        {"name": "from", "tasks": {"A": task(), "B": task("boom", "A"), "C": task("ok", "B")}},
        [w],
    )
    sim.run()
    doc = sim.retry(from_task="A")
    assert doc["tasks"]["A"]["attempts"] == 2 and doc["tasks"]["B"]["attempts"] == 2
    assert doc["state"] == "failed"


def test_a_compensated_run_is_not_retried(w: Agent) -> None:
    sim = Simulation(
        {"name": "undone", "tasks": {"A": task("ok", compensate={"command": "ok"}), "B": task("boom", "A")}},
        [w],
    )
    assert sim.run()["tasks"]["A"]["state"] == "compensated"
    with pytest.raises(ValueError, match="was compensated"):
        sim.retry()


def test_retry_gives_the_tasks_it_runs_again_a_fresh_retry_budget() -> None:
    agent, calls = Agent("w"), []

    @agent.command("flaky")
    def flaky(ctx: Any) -> str:
        calls.append(ctx.attempt)
        if len(calls) < 4:
            raise ConnectionError("unavailable")
        return "done"

    sim = Simulation(
        {"name": "budget", "tasks": {"A": {"agent": "w", "command": "flaky", "retry": {"max_attempts": 2}}}},
        [agent],
    )
    assert sim.run()["state"] == "failed" and calls == [1, 2]
    doc = sim.retry()
    assert doc["state"] == "succeeded" and calls == [1, 2, 3, 4]  # two more tries, not one
