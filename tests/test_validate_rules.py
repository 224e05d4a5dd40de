"""`phibroker validate` explains each task's trigger rule and warns about rules that can never fire or
have no effect. Every warning is checked twice: the CLI prints it, and the real engine (`Simulation`)
shows that what it says holds — and the near misses it stays quiet about really do fire."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from phibroker import Agent, workflow
from phibroker.testing import Simulation
from phibroker.workflow.rules import explain_rules, rule_warnings

EXAMPLES = Path(__file__).parent.parent / "examples"
SKIP_GATE = {"approval": {"message": "go?", "on_reject": "skip"}}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60)


def task(command: str = "ok", *deps: str, **fields: Any) -> dict[str, Any]:
    return {"agent": "w", "command": command, "depends_on": list(deps), "retry": {"max_attempts": 1}, **fields}


def gate(*deps: str, **approval: Any) -> dict[str, Any]:
    return {"approval": {"message": "go?", **approval}, "depends_on": list(deps)}


def flow(tasks: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"name": "w", "tasks": tasks, **top}


def warnings_of(doc: dict[str, Any]) -> list[str]:
    return rule_warnings(workflow.check(doc))


@pytest.fixture
def w() -> Agent:
    agent = Agent("w")

    @agent.command("ok")
    def ok(ctx: Any, **payload: Any) -> str:
        return ctx.task

    @agent.command("boom")
    def boom(ctx: Any, **payload: Any) -> None:
        raise ValueError("boom")

    return agent


def states(doc: dict[str, Any]) -> dict[str, str]:
    return {name: t["state"] for name, t in doc["tasks"].items()}


# -- the CLI ---------------------------------------------------------------------------------------

NOISY = {
    "name": "noisy",
    "tasks": {
        "Review": {"approval": {"message": "ship?", "on_reject": "skip"}},
        "Alert": {"agent": "w", "command": "ok", "depends_on": ["Review"], "trigger": "one_failed"},
        "Build": {"agent": "w", "command": "build", "trigger": "all_done"},
        "Fast": {"agent": "w", "command": "a", "depends_on": ["Build"]},
        "Slow": {"agent": "w", "command": "b", "depends_on": ["Build"]},
        "Quorum": {
            "agent": "w",
            "command": "ok",
            "depends_on": ["Fast", "Slow"],
            "trigger": {"at_least": 2},
            "cancel_rest": True,
        },
    },
}
NOISY_WARNINGS = [
    "task 'Alert': trigger one_failed can never fire, no upstream can fail (Review: each an approval gate "
    "with on_reject: skip and no timeout); it is always skipped",
    "task 'Build': trigger all_done has no effect: the task has no upstreams, so it runs at the start",
    "task 'Quorum': cancel_rest has no effect: {at_least: 2} starts only once every upstream succeeded, "
    "so none is left to cancel",
]


def test_validate_warns_on_stderr_and_still_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "noisy.yaml"
    path.write_text(yaml.safe_dump(NOISY))
    result = run_cli("validate", str(path))
    assert result.returncode == 0
    assert result.stdout.startswith("noisy: valid, 6 tasks in 3 levels\n")
    assert result.stderr.splitlines() == [f"warning: {line}" for line in NOISY_WARNINGS]


def test_validate_json_explains_each_rule_and_keeps_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "noisy.json"
    path.write_text(json.dumps(NOISY))
    result = run_cli("validate", "--json", str(path))
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert doc["levels"] == [["Review", "Build"], ["Alert", "Fast", "Slow"], ["Quorum"]]
    assert doc["critical_path"] == ["Build", "Fast", "Quorum"] and doc["length"] == 3
    assert doc["warnings"] == NOISY_WARNINGS
    assert set(doc["tasks"]) == set(NOISY["tasks"])
    quorum = doc["tasks"]["Quorum"]["trigger"]
    assert quorum["rule"] == "at_least" and quorum["k"] == 2
    assert quorum["explains"].startswith("runs as soon as 2 of its 2 upstreams succeeded")
    assert "upstreams still pending or running are cancelled" in quorum["explains"]
    alert = doc["tasks"]["Alert"]["trigger"]
    assert alert == {"rule": "one_failed", "explains": alert["explains"]}  # no k but for at_least
    assert "it still starts after a task failed (failure: fail_fast" in alert["explains"]
    assert doc["tasks"]["Build"]["trigger"]["explains"].startswith("runs at the start: it has no upstreams (its rule")


def test_a_clean_example_has_no_warnings() -> None:
    path = str(EXAMPLES / "feature-deploy.yaml")
    plain = run_cli("validate", path)
    assert plain.returncode == 0 and plain.stderr == ""
    doc = json.loads(run_cli("validate", "--json", path).stdout)
    assert doc["warnings"] == []
    deploy = doc["tasks"]["Deploy"]["trigger"]
    assert deploy["rule"] == "none_failed" and "no longer starts (failure: fail_fast)" in deploy["explains"]
    assert "then skipped if its `when` is false" in doc["tasks"]["Approve"]["trigger"]["explains"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_no_example_warns(path: Path) -> None:
    assert rule_warnings(workflow.load(path)) == []


# -- each warning, and what the engine does --------------------------------------------------------


def test_one_failed_below_gates_that_cannot_fail_is_always_skipped(w: Agent) -> None:
    doc = flow({"A": SKIP_GATE, "B": SKIP_GATE, "Alert": task("ok", "A", "B", trigger="one_failed")})
    assert warnings_of(doc) == [
        "task 'Alert': trigger one_failed can never fire, no upstream can fail (A, B: each an approval gate "
        "with on_reject: skip and no timeout); it is always skipped"
    ]
    for decisions in itertools.product(("approve", "reject"), repeat=2):
        sim = Simulation(doc, [w])
        sim.run()
        for name, decision in zip("AB", decisions, strict=True):
            getattr(sim, decision)(name, **({"reason": "no"} if decision == "reject" else {}))
        assert states(sim.status())["Alert"] == "skipped", decisions


def test_all_failed_over_a_gate_that_cannot_fail_is_always_skipped(w: Agent) -> None:
    doc = flow({"A": task("boom"), "G": SKIP_GATE, "Both": task("ok", "A", "G", trigger="all_failed")})
    assert warnings_of(doc) == [
        "task 'Both': trigger all_failed can never fire, upstream 'G' cannot fail (an approval gate with "
        "on_reject: skip and no timeout); it is always skipped"
    ]
    sim = Simulation({**doc, "failure": "best_effort"}, [w])
    sim.run()
    assert states(sim.reject("G", "no")) == {"A": "failed", "G": "skipped", "Both": "skipped"}


def test_a_rule_on_a_task_without_upstreams_is_ignored(w: Agent) -> None:
    doc = flow({"Alert": task("ok", trigger="one_failed")})
    assert warnings_of(doc) == [
        "task 'Alert': trigger one_failed has no effect: the task has no upstreams, so it runs at the start"
    ]
    assert states(Simulation(doc, [w]).run()) == {"Alert": "succeeded"}  # nothing failed, yet it ran


def test_cancel_rest_with_a_quorum_of_every_upstream(w: Agent) -> None:
    one = flow({"A": task(), "Pick": task("ok", "A", trigger="one_success", cancel_rest=True)})
    assert warnings_of(one) == [
        "task 'Pick': cancel_rest has no effect: one_success starts only once every upstream succeeded, "
        "so none is left to cancel"
    ]
    race = flow({"A": task(), "B": task(), "Pick": task("ok", "A", "B", trigger="one_success", cancel_rest=True)})
    assert warnings_of(race) == []


def test_end_on_a_failure_handler_under_fail_fast(w: Agent) -> None:
    doc = flow(
        {
            "A": task("boom"),
            "Handle": task("ok", "A", trigger="one_failed", end=True),
            "Report": task("ok", "A", trigger="all_done"),
        }
    )
    assert warnings_of(doc) == [
        "task 'Handle': end has no effect: a one_failed task runs only after a failure, and failure: fail_fast "
        "has the run failing by then (failure: best_effort keeps it running)"
    ]
    ran = Simulation(doc, [w]).run()
    assert ran["state"] == "failed"  # Handle succeeded, and did not end the run
    assert states(ran) == {"A": "failed", "Handle": "succeeded", "Report": "succeeded"}
    best_effort = {**doc, "failure": "best_effort"}
    assert warnings_of(best_effort) == []
    assert Simulation(best_effort, [w]).run()["state"] == "succeeded"


# -- near misses: no warning, and the rule does fire ------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "decide"),
    [
        (gate(), "reject"),  # on_reject: fail (the default): a rejection fails the gate
        (gate(on_reject="skip", timeout="1s"), "wait"),  # a timeout fails it, on_reject or not
        (gate("X", on_reject="skip"), "none"),  # upstream_failed below a failed task
    ],
    ids=["on_reject-fail", "timeout", "upstream_failed"],
)
def test_gates_that_can_fail_give_no_warning(w: Agent, upstream: dict[str, Any], decide: str) -> None:
    doc = flow({"X": task("boom"), "G": upstream, "Alert": task("ok", "G", trigger="one_failed")})
    assert warnings_of(doc) == []
    sim = Simulation({**doc, "failure": "best_effort"}, [w])
    sim.run()
    if decide == "reject":
        sim.reject("G", "no")
    elif decide == "wait":
        sim.advance(5)
    assert states(sim.run())["Alert"] == "succeeded"


def test_a_gate_whose_rule_stops_failure_cannot_fail(w: Agent) -> None:
    """all_done never makes a task upstream_failed: the gate below a failure still cannot fail."""
    doc = flow({"X": task("boom"), "G": gate("X", on_reject="skip") | {"trigger": "all_done"}})
    doc["tasks"]["Alert"] = task("ok", "G", trigger="one_failed")
    assert len(warnings_of(doc)) == 1
    sim = Simulation({**doc, "failure": "best_effort"}, [w])
    sim.run()
    assert states(sim.reject("G", "no")) == {"X": "failed", "G": "skipped", "Alert": "skipped"}


def test_one_success_over_gates_that_cannot_fail_is_fine(w: Agent) -> None:
    """Any of several approvers: a real use of on_reject: skip, so no warning."""
    doc = flow({"A": SKIP_GATE, "B": SKIP_GATE, "Go": task("ok", "A", "B", trigger="one_success")})
    assert warnings_of(doc) == []
    sim = Simulation(doc, [w])
    sim.run()
    sim.reject("A", "no")
    assert states(sim.approve("B"))["Go"] == "succeeded"


# -- explanations ----------------------------------------------------------------------------------

RULES = [
    "all_success",
    "all_done",
    "all_failed",
    "one_success",
    "one_failed",
    "none_failed",
    "none_failed_min_one_success",
    "none_skipped",
    "always",
]


def test_every_rule_is_explained_in_one_line() -> None:
    tasks: dict[str, Any] = {"A": task(), "B": task()}
    tasks |= {rule: task("ok", "A", "B", trigger=rule) for rule in RULES}
    tasks["Q"] = task("ok", "A", "B", trigger={"at_least": 1}, end=True)
    notes = explain_rules(workflow.check(flow(tasks, failure="best_effort")))
    assert [notes[rule].rule for rule in RULES] == RULES
    texts = [note.explains for note in notes.values()]
    assert all(text.startswith("runs ") and "\n" not in text for text in texts)
    assert len(set(texts[2:])) == len(texts) - 2  # each rule says something of its own
    assert not any("fail_fast" in text for text in texts)
    assert notes["Q"].as_json() == {
        "rule": "at_least",
        "k": 1,
        "explains": "runs as soon as 1 of its 2 upstreams succeeded; once 1 no longer can, upstream_failed if "
        "one failed, else skipped; its success ends the run as succeeded (the rest stops or is skipped)",
    }


def test_a_trigger_filter_too_long_to_run_on_every_event_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "loud.yaml"
    where = "event.data.channel == '" + "x" * 1_000 + "'"
    tasks = {"Tell": {"agent": "webc", "command": "note"}}
    path.write_text(yaml.safe_dump({"name": "loud", "on": {"event": "release.tagged", "where": where}, "tasks": tasks}))
    result = run_cli("validate", str(path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "on.where: longer than 1,000 characters" in result.stderr
