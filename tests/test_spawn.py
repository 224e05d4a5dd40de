"""Work planned at run time: a handler's `ctx.spawn` adds tasks to the running task, which
waits for them; its dependents then see their results. In memory here; on real processes and under
kill -9 in test_spawn_live.py."""

from __future__ import annotations

from typing import Any

import pytest

from phibroker import Agent
from phibroker.testing import Simulation


@pytest.fixture
def dc() -> Agent:
    agent = Agent("dc")

    @agent.command("plan")
    def plan(ctx: Any, steps: int = 3, chain: bool = True, bad: str = "") -> dict[str, Any]:
        for i in range(steps):
            ctx.spawn(f"step{i}", command="do", payload={"i": i}, depends_on=[f"step{i - 1}"] if chain and i else [])
        if bad:
            ctx.spawn(bad, command="do")
        return {"planned": steps}

    @agent.command("do")
    def do(ctx: Any, i: int = 0, fail: int = -1) -> dict[str, Any]:
        if i == fail:
            raise ValueError(f"step {i} broke")
        return {"i": i, "after": sorted(ctx.inputs)}

    @agent.command("sum")
    def total(ctx: Any) -> list[str]:
        return sorted(ctx.inputs)

    return agent


def spec(**plan: Any) -> dict[str, Any]:
    return {
        "name": "plan-and-execute",
        "tasks": {
            "Plan": {"agent": "dc", "command": "plan", "payload": plan, "retry": {"max_attempts": 1}},
            "Report": {"agent": "dc", "command": "sum", "depends_on": ["Plan"]},
        },
    }


def test_children_run_in_their_order_and_the_dependents_see_their_results(dc: Agent) -> None:
    sim = Simulation(spec(), [dc])
    doc = sim.run()
    assert doc["state"] == "succeeded"
    assert list(doc["tasks"]) == ["Plan", "Report", "Plan/step0", "Plan/step1", "Plan/step2"]
    assert doc["tasks"]["Plan/step2"]["result"] == {"i": 2, "after": ["Plan/step1"]}
    assert doc["tasks"]["Report"]["result"] == ["Plan", "Plan/step0", "Plan/step1", "Plan/step2"]
    done = [e["task"] for e in sim.events if e["type"] == "task.succeeded"]
    assert done.index("Plan") > done.index("Plan/step2") and done[-1] == "Report"


def test_a_child_name_must_be_a_plain_name(dc: Agent) -> None:
    bad = Simulation(spec(steps=0, bad="no/slash"), [dc]).run()
    assert bad["tasks"]["Plan"]["state"] == "failed"
    assert bad["tasks"]["Plan"]["error"].startswith("SpawnError: child name 'no/slash'")
    assert "Plan/no/slash" not in bad["tasks"]


def test_a_child_failure_names_the_child(dc: Agent) -> None:
    agent = Agent("dc")

    @agent.command("plan")
    def plan(ctx: Any) -> None:
        ctx.spawn("ok", command="do")
        ctx.spawn("broken", command="do", payload={"fail": True})

    @agent.command("do")
    def do(ctx: Any, fail: bool = False) -> str:
        if fail:
            raise ValueError("no luck")
        return "done"

    doc = Simulation(
        {
            "name": "child-fails",
            "defaults": {"retry": {"max_attempts": 1}},
            "tasks": {
                "Plan": {"agent": "dc", "command": "plan"},
                "After": {"agent": "dc", "command": "do", "depends_on": ["Plan"]},
            },
        },
        [agent],
    ).run()
    assert doc["state"] == "failed"
    assert doc["tasks"]["Plan"]["error"] == "child broken failed: ValueError: no luck"
    assert doc["tasks"]["After"]["state"] == "upstream_failed"


def test_a_retried_attempt_spawns_nothing_only_the_applied_one_does() -> None:
    agent, attempts = Agent("dc"), []

    @agent.command("plan")
    def plan(ctx: Any) -> None:
        attempts.append(ctx.attempt)
        ctx.spawn(f"from-attempt-{ctx.attempt}", command="do")
        if ctx.attempt == 1:
            raise ConnectionError("unavailable")

    @agent.command("do")
    def do(ctx: Any) -> str:
        return ctx.task

    doc = Simulation(
        {"name": "once", "tasks": {"Plan": {"agent": "dc", "command": "plan", "retry": {"base_delay": "1ms"}}}},
        [agent],
    ).run()
    assert attempts == [1, 2] and doc["state"] == "succeeded"
    assert [t for t in doc["tasks"] if t.startswith("Plan/")] == ["Plan/from-attempt-2"]


def test_children_may_spawn_in_turn_and_the_top_waits_for_all_descendants() -> None:
    agent = Agent("dc")

    @agent.command("split")
    def split(ctx: Any, depth: int) -> int:
        if depth:
            ctx.spawn("a", command="split", payload={"depth": depth - 1})
            ctx.spawn("b", command="split", payload={"depth": depth - 1})
        return depth

    doc = Simulation(
        {"name": "tree", "tasks": {"Root": {"agent": "dc", "command": "split", "payload": {"depth": 3}}}}, [agent]
    ).run()
    assert doc["state"] == "succeeded" and len(doc["tasks"]) == 15
    assert doc["tasks"]["Root/a/b/a"]["result"] == 0


def test_a_bad_spawn_fails_the_attempt_with_one_line() -> None:
    agent = Agent("dc")

    @agent.command("plan")
    def plan(ctx: Any, case: str) -> None:
        if case == "unknown-dep":
            ctx.spawn("x", command="do", depends_on=["nope"])
        elif case == "cycle":
            ctx.spawn("x", command="do", depends_on=["y"])
            ctx.spawn("y", command="do", depends_on=["x"])
        elif case == "too-many":
            for i in range(6):
                ctx.spawn(f"c{i}", command="do")
        elif case == "agent":
            ctx.spawn("x", command="do", agent="not an agent")

    def error(case: str) -> str:
        sim = Simulation(
            {
                "name": "bad",
                "tasks": {
                    "P": {"agent": "dc", "command": "plan", "payload": {"case": case}, "retry": {"max_attempts": 1}}
                },
            },
            [agent],
        )
        sim.run_state.max_children = 5
        doc = sim.run()
        assert doc["state"] == "failed" and list(doc["tasks"]) == ["P"]
        text = doc["tasks"]["P"]["error"]
        assert "\n" not in text and text.startswith("SpawnError: ")
        return text

    assert "depends on 'nope', which is no child of P" in error("unknown-dep")
    assert "cycle" in error("cycle")
    assert "at most 5 children" in error("too-many")
    assert "child 'x': agent" in error("agent")


def test_cancelling_the_run_stops_the_children_and_their_parent() -> None:
    agent = Agent("dc")

    @agent.command("plan")
    def plan(ctx: Any) -> None:
        ctx.spawn("slow", command="flaky")
        ctx.spawn("later", command="flaky", depends_on=["slow"])

    @agent.command("flaky")
    def flaky(ctx: Any) -> None:
        raise ConnectionError("unavailable")  # retried by default, an hour later

    sim = Simulation(
        {"name": "stop", "tasks": {"Plan": {"agent": "dc", "command": "plan", "retry": {"base_delay": "1h"}}}},
        [agent],
    )
    sim.step()  # Plan runs and spawns
    sim.step()  # slow fails and waits an hour to retry
    assert sim.status()["tasks"]["Plan/slow"]["state"] == "retrying"
    doc = sim.cancel("changed plans")
    assert doc["state"] == "cancelled"
    states = {name: task["state"] for name, task in doc["tasks"].items()}
    assert states == {"Plan": "cancelled", "Plan/slow": "cancelled", "Plan/later": "cancelled"}


def test_retry_spawns_the_children_anew(dc: Agent) -> None:
    agent, fixed = Agent("dc"), [False]

    @agent.command("plan")
    def plan(ctx: Any) -> None:
        ctx.spawn("step", command="do")

    @agent.command("do")
    def do(ctx: Any) -> str:
        if not fixed[0]:
            raise ValueError("not yet")
        return "ok"

    sim = Simulation(
        {
            "name": "again",
            "defaults": {"retry": {"max_attempts": 1}},
            "tasks": {"Plan": {"agent": "dc", "command": "plan"}},
        },
        [agent],
    )
    assert sim.run()["tasks"]["Plan"]["error"] == "child step failed: ValueError: not yet"
    fixed[0] = True
    doc = sim.retry()
    assert doc["state"] == "succeeded" and doc["tasks"]["Plan/step"]["result"] == "ok"
    assert doc["tasks"]["Plan"]["attempts"] == 2


def test_a_loop_whose_handler_spawns_a_reviewer_each_round() -> None:
    """A writer drafts and spawns a reviewer each iteration; `until` reads the reviewer's score and the
    payload reads the writer's own last iteration."""
    agent = Agent("w")

    @agent.command("draft")
    def draft(ctx: Any, last: Any = None) -> dict[str, Any]:
        ctx.spawn("review", command="review", payload={"n": ctx.iteration})
        return {"iteration": ctx.iteration, "last": last}

    @agent.command("review")
    def review(ctx: Any, n: int) -> dict[str, int]:
        return {"score": 3 * n}

    spec = {
        "name": "rounds",
        "tasks": {
            "Draft": {
                "agent": "w",
                "command": "draft",
                "payload": {"last": "${tasks.Draft.result.iteration}"},
                "loop": {"until": "tasks.Draft.children.review.result.score >= 8", "max_iterations": 5},
            }
        },
    }
    doc = Simulation(spec, [agent]).run()
    assert doc["state"] == "succeeded" and doc["tasks"]["Draft"]["iterations"] == 3
    assert doc["tasks"]["Draft"]["result"] == {"iteration": 3, "last": 2}
    assert doc["tasks"]["Draft/review"]["result"] == {"score": 9}


def test_a_second_copy_of_the_spawning_result_is_a_duplicate() -> None:
    """A coordinator that dies before acking re-reads the result: the task, still waiting for its
    children, must know it as the copy it is, not spawn them again."""
    from phibroker import engine, wire
    from phibroker.engine.state import Run, new_workflow_fields
    from phibroker.workflow import check

    workflow = check({"name": "twice", "tasks": {"Plan": {"agent": "dc", "command": "plan"}}})
    run = Run("r", workflow, new_workflow_fields(workflow, {}, 0.0), {}, {})
    run.begin()
    engine.start(run, 0.0)
    message = wire.TaskMessage.decode(run.tx.dispatches[0][1], 1 << 20)
    spawns = [{"name": "step", "agent": "dc", "command": "do"}]
    result = wire.Result(message.id, "r", "Plan", 1, True, "w", 0.0, 0.0, wire.pack(None), spawns=spawns)
    run.units["Plan"].update(state="running", token=1)  # what the start script wrote
    run.begin()
    assert engine.apply_result(run, result, 1.0)
    run.begin()
    assert not engine.apply_result(run, result, 2.0)
    assert run.workflow.children_of["Plan"] == ["Plan/step"] and run.state("Plan") == "running"


def test_under_fail_fast_a_failed_child_fails_its_parent_and_the_handlers_run() -> None:
    agent = Agent("dc")

    @agent.command("plan")
    def plan(ctx: Any) -> None:
        ctx.spawn("a", command="bad")
        ctx.spawn("b", command="ok", depends_on=["a"])

    @agent.command("bad")
    def bad(ctx: Any) -> None:
        raise ValueError("nope")

    @agent.command("ok")
    def ok(ctx: Any) -> str:
        return "ok"

    spec = {
        "name": "handled",
        "outcome": "leaves",
        "defaults": {"retry": {"max_attempts": 1}},
        "tasks": {
            "Plan": {"agent": "dc", "command": "plan"},
            "Handle": {"agent": "dc", "command": "ok", "depends_on": ["Plan"], "trigger": "one_failed"},
        },
    }
    doc = Simulation(spec, [agent]).run()
    assert (
        doc["tasks"]["Plan"]["state"] == "failed"
        and doc["tasks"]["Plan"]["error"] == "child a failed: ValueError: nope"
    )
    assert doc["tasks"]["Handle"]["state"] == "succeeded"
    assert doc["state"] == "succeeded" and doc["error"] is None  # the only leaf handled it; children are not leaves


def test_a_child_cancelled_on_purpose_counts_as_skipped() -> None:
    agent = Agent("dc")

    @agent.command("plan")
    def plan(ctx: Any) -> None:
        ctx.spawn("keep", command="ok")
        ctx.spawn("drop", command="ok", depends_on=["keep"])

    @agent.command("ok")
    def ok(ctx: Any) -> str:
        return "ok"

    sim = Simulation({"name": "drop", "tasks": {"Plan": {"agent": "dc", "command": "plan"}}}, [agent])
    sim.step()  # Plan spawns; its children wait in the queue
    doc = sim.cancel("not needed", tasks=["Plan/drop"])
    assert doc["state"] == "succeeded"
    assert {n: t["state"] for n, t in doc["tasks"].items()} == {
        "Plan": "succeeded",
        "Plan/keep": "succeeded",
        "Plan/drop": "cancelled",
    }


def test_retry_from_a_spawned_task_is_refused_with_its_parent_named() -> None:
    agent = Agent("dc")

    @agent.command("plan")
    def plan(ctx: Any) -> None:
        ctx.spawn("a", command="bad")

    @agent.command("bad")
    def bad(ctx: Any) -> None:
        raise ValueError("nope")

    sim = Simulation(
        {
            "name": "r",
            "defaults": {"retry": {"max_attempts": 1}},
            "tasks": {"Plan": {"agent": "dc", "command": "plan"}},
        },
        [agent],
    )
    assert sim.run()["state"] == "failed"
    with pytest.raises(ValueError, match="Plan/a was spawned by Plan: retry --from Plan runs it again"):
        sim.retry(from_task="Plan/a")


def test_a_handler_hands_work_to_a_spawned_workflow_file_or_dict(tmp_path: Any) -> None:
    (tmp_path / "review.yaml").write_text(
        "name: review\nparams: {text: ''}\noutput: {seen: '${tasks.Read.result}'}\n"
        "tasks:\n  Read: {agent: dc, command: echo, payload: {text: '${params.text}'}}\n"
    )
    agent = Agent("dc")

    @agent.command("plan")
    def plan(ctx: Any) -> str:
        ctx.spawn_workflow("file", tmp_path / "review.yaml", params={"text": "from a file"})
        ctx.spawn_workflow("inline", {"name": "inline", "tasks": {"Read": {"agent": "dc", "command": "echo"}}})
        return "planned"

    @agent.command("echo")
    def echo(ctx: Any, text: str = "inline") -> str:
        return text

    @agent.command("sum")
    def total(ctx: Any) -> list[str]:
        return sorted(ctx.inputs)

    flow = spec()
    flow["tasks"]["Plan"]["payload"] = {}
    doc = Simulation(flow, [agent], run_id="p").run()
    assert doc["state"] == "succeeded", {name: task["error"] for name, task in doc["tasks"].items()}
    assert doc["tasks"]["Plan/file"]["result"] == {"seen": "from a file"}
    assert doc["tasks"]["Plan/file"]["child"] == "p~Plan/file"
    assert doc["tasks"]["Plan/inline"]["result"] is None  # a workflow without `output`
    assert doc["tasks"]["Report"]["result"] == ["Plan", "Plan/file", "Plan/inline"]
