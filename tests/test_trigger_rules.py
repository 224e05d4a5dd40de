"""Trigger rules checked case by case against Apache Airflow's, through the real engine in `Simulation`.

Users coming from DAG tools expect Airflow's trigger-rule semantics, so each row of `AIRFLOW` replays
one case of Airflow's own tests (`test_trigger_rule_dep.py`, class `TestTriggerRuleDep`; rows named
`trigger_rule_dep.py:...` come from Airflow's decision code where its tests leave a state uncovered).
Airflow's tests mock upstream states as counts; here every upstream really reaches its state: succeeded
(the handler returns), failed (it raises, one attempt allowed), skipped (`when: "false"`),
upstream_failed (below a failed task), cancelled (it loses a `cancel_rest` race). The expected state is
the one Airflow's scheduler sets (`flag_upstream_failed=True`) once every upstream is done; a task that
runs ends `succeeded`.

Where we differ from Airflow on purpose, the case is encoded as a documented exception, not a failure:
- `always` waits for its upstreams to be done (Airflow's starts at once), see `WAITS`;
- rules other than one_success, one_failed and at_least wait for every upstream, where Airflow's
  scheduler marks a task upstream_failed or skipped as soon as one upstream failed or was skipped:
  `WAITS` checks they wait, then end in Airflow's state;
- a cancelled upstream counts as skipped: every `AIRFLOW` row with skipped upstreams is replayed with
  cancelled ones instead (`CANCELLED`) and must end the same.
Not replayed, as phibroker has no such thing: the rules one_done, all_skipped, all_done_min_one_success
and all_done_setup_success; the `removed` state; setup/teardown tasks; mapped task groups;
depends_on_past (`wait_for_past_depends_before_skipping`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from phibroker import Agent, PhibrokerError, Retryable
from phibroker.testing import Simulation

RUNS = "succeeded"  # the task under test ran: its handler returned
TERMINAL = {"succeeded", "failed", "skipped", "upstream_failed", "cancelled"}
Rule = str | dict[str, int]


def up(**counts: int) -> dict[str, int]:
    """Upstream states as Airflow's tests give them: how many upstreams end in each state."""
    return counts


@dataclass(frozen=True)
class Case:
    source: str  # the Airflow test (or decision-code branch) the row replays
    rule: Rule
    upstream: dict[str, int]
    expected: str


# Apache Airflow, tests of ti_deps/deps/trigger_rule_dep.py: upstream states -> the task's state.
AIRFLOW = [
    Case("test_no_upstream_tasks", "all_done", up(), RUNS),
    # Airflow's `always` runs with upstream "a" still unfinished; ours waits (WAITS), then runs
    Case("test_always_tr", "always", up(succeeded=1), RUNS),
    # Airflow expects skipped with flag_upstream_failed only because the test mocks done=2 (== skipped);
    # with the counts made consistent (done=8) its decision code lets the task run
    Case("test_one_success_tr_success", "one_success", up(succeeded=1, skipped=2, failed=3, upstream_failed=2), RUNS),
    # counts of the test before it gained a `removed` upstream, a state we lack
    Case("test_one_success_tr_failure", "one_success", up(skipped=2, failed=2, upstream_failed=2), "upstream_failed"),
    Case("test_one_success_tr_failure_all_skipped", "one_success", up(skipped=2), "skipped"),
    Case("test_one_failure_tr_failure", "one_failed", up(succeeded=2), "skipped"),
    Case("test_one_failure_tr_success", "one_failed", up(skipped=2, failed=2), RUNS),
    Case("test_one_failure_tr_success_no_failed", "one_failed", up(skipped=2, upstream_failed=2), RUNS),
    Case("test_all_success_tr_success", "all_success", up(succeeded=1), RUNS),
    Case("test_all_success_tr_failure", "all_success", up(succeeded=1, failed=1), "upstream_failed"),
    Case("test_all_success_tr_skip", "all_success", up(succeeded=1, skipped=1), "skipped"),
    Case("test_none_failed_tr_success", "none_failed", up(succeeded=1, skipped=1), RUNS),
    Case("test_none_failed_tr_failure", "none_failed", up(succeeded=1, skipped=1, failed=1), "upstream_failed"),
    Case(
        "test_none_failed_tr_failure_with_upstream_failure",
        "none_failed",
        up(succeeded=1, skipped=1, upstream_failed=1),
        "upstream_failed",
    ),
    Case(
        "test_none_failed_min_one_success_tr_success", "none_failed_min_one_success", up(succeeded=1, skipped=1), RUNS
    ),
    Case("test_none_failed_min_one_success_tr_skipped", "none_failed_min_one_success", up(skipped=2), "skipped"),
    Case(
        "test_none_failed_min_one_success_tr_failure",
        "none_failed_min_one_success",
        up(succeeded=1, skipped=1, failed=1),
        "upstream_failed",
    ),
    Case(
        "test_none_failed_min_one_success_tr_upstream_failure",
        "none_failed_min_one_success",
        up(succeeded=1, skipped=1, upstream_failed=1),
        "upstream_failed",
    ),
    Case("test_all_failed_tr_success", "all_failed", up(failed=2), RUNS),
    Case("test_all_failed_tr_failure", "all_failed", up(succeeded=2), "skipped"),
    Case("test_all_done_tr_success", "all_done", up(succeeded=2), RUNS),
    Case("test_none_skipped_tr_success", "none_skipped", up(succeeded=2, failed=1), RUNS),
    Case("test_none_skipped_tr_failure", "none_skipped", up(succeeded=1, skipped=1), "skipped"),
    # branches of trigger_rule_dep.py no test above reaches
    Case("trigger_rule_dep.py:all_failed-counts-upstream_failed", "all_failed", up(failed=1, upstream_failed=1), RUNS),
    Case("trigger_rule_dep.py:all_failed-skipped", "all_failed", up(failed=1, skipped=1), "skipped"),
    Case(
        "trigger_rule_dep.py:one_success-no-success", "one_success", up(failed=1, upstream_failed=1), "upstream_failed"
    ),
    Case("trigger_rule_dep.py:one_failed-no-failure", "one_failed", up(succeeded=1, skipped=1), "skipped"),
    Case("trigger_rule_dep.py:none_failed-all-skipped", "none_failed", up(skipped=2), RUNS),
    Case("trigger_rule_dep.py:none_skipped-upstream_failed", "none_skipped", up(succeeded=1, upstream_failed=1), RUNS),
    Case("trigger_rule_dep.py:all_done-any-states", "all_done", up(failed=1, skipped=1, upstream_failed=1), RUNS),
    Case("trigger_rule_dep.py:always-any-states", "always", up(failed=1, skipped=1, upstream_failed=1), RUNS),
]

# A cancelled upstream counts as skipped, so each row with skipped upstreams holds with cancelled ones.
CANCELLED = [
    Case(
        c.source + "[cancelled]",
        c.rule,
        {"cancelled" if s == "skipped" else s: n for s, n in c.upstream.items()},
        c.expected,
    )
    for c in AIRFLOW
    if c.upstream.get("skipped")
]

# `{at_least: K}` (ours alone): K upstreams succeeded; once K can no longer be reached the task is
# upstream_failed if an upstream failed, else skipped.
QUORUM = [
    Case("at_least-all-succeeded", {"at_least": 2}, up(succeeded=3), RUNS),
    Case("at_least-enough-despite-a-failure", {"at_least": 2}, up(succeeded=2, failed=1), RUNS),
    Case("at_least-exactly-all", {"at_least": 3}, up(succeeded=3), RUNS),
    Case("at_least-one-like-one_success", {"at_least": 1}, up(succeeded=1, skipped=1), RUNS),
    Case("at_least-short-with-failures", {"at_least": 2}, up(succeeded=1, failed=2), "upstream_failed"),
    Case(
        "at_least-short-with-upstream_failed",
        {"at_least": 2},
        up(succeeded=1, skipped=1, upstream_failed=1),
        "upstream_failed",
    ),
    Case("at_least-short-with-skips", {"at_least": 2}, up(succeeded=1, skipped=2), "skipped"),
    Case("at_least-short-with-cancelled", {"at_least": 2}, up(succeeded=1, cancelled=2), "skipped"),
]


# -- building the runs -----------------------------------------------------------------------------


@dataclass
class Worker:
    """The agent every case runs on, and the tasks whose handler it ran, in order."""

    agent: Agent = field(default_factory=lambda: Agent("w"))
    ran: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        @self.agent.command("ok")
        def ok(ctx: Any, **payload: Any) -> dict[str, Any]:
            self.ran.append(ctx.task)
            return {"inputs": sorted(ctx.inputs)}

        @self.agent.command("boom")
        def boom(ctx: Any, **payload: Any) -> None:
            raise ValueError("boom")

        @self.agent.command("slow")
        def slow(ctx: Any, ready_at: int = 1_000) -> str:
            """Busy until attempt `ready_at`; each retry waits an hour of virtual time."""
            if ctx.attempt < ready_at:
                raise Retryable("still working")
            self.ran.append(ctx.task)
            return "late"


OK = {"agent": "w", "command": "ok"}
FAILS = {"agent": "w", "command": "boom", "retry": {"max_attempts": 1}}
SLOW = {"agent": "w", "command": "slow", "retry": {"max_attempts": 5, "base_delay": "1h", "jitter": 0}}
GATE = {"approval": {"message": "go?"}}
FORCED: dict[str, tuple[str, dict[str, Any]]] = {  # how an upstream is brought to each state
    "succeeded": ("Ok", OK),
    "failed": ("Failed", FAILS),
    "skipped": ("Skipped", {**OK, "when": "false"}),
    "upstream_failed": ("Below", {**OK, "depends_on": ["Broken"]}),
    "cancelled": ("Loser", SLOW),  # still retrying when `Race` starts and cancels it
}


def upstreams(counts: dict[str, int]) -> tuple[dict[str, Any], dict[str, str]]:
    """The tasks that bring upstreams to the given states, and each upstream's name -> its state."""
    tasks: dict[str, Any] = {}
    forced: dict[str, str] = {}
    for state, count in counts.items():
        prefix, task = FORCED[state]
        for i in range(1, count + 1):
            tasks[f"{prefix}{i}"] = task
            forced[f"{prefix}{i}"] = state
    if counts.get("upstream_failed"):
        tasks["Broken"] = FAILS
    losers = [name for name, state in forced.items() if state == "cancelled"]
    if losers:
        tasks["Winner"] = OK
        tasks["Race"] = {**OK, "depends_on": ["Winner", *losers], "trigger": "one_success", "cancel_rest": True}
    return tasks, forced


def flow(tasks: dict[str, Any], failure: str = "best_effort", **extra: Any) -> dict[str, Any]:
    return {"name": "rules", "failure": failure, "tasks": tasks, **extra}


def joined(rule: Rule, upstream: list[str], **extra: Any) -> dict[str, Any]:
    """The task under test: runs `ok` under `rule` below `upstream`."""
    return {**OK, "depends_on": upstream, "trigger": rule, **extra}


def states(doc: dict[str, Any]) -> dict[str, str]:
    return {name: task["state"] for name, task in doc["tasks"].items()}


def replay(case: Case) -> None:
    tasks, forced = upstreams(case.upstream)
    tasks["Join"] = joined(case.rule, list(forced))
    worker = Worker()
    got = states(Simulation(flow(tasks), [worker.agent]).run())
    assert {name: got[name] for name in forced} == forced, "the upstreams did not reach the states the case needs"
    assert got["Join"] == case.expected
    assert ("Join" in worker.ran) == (case.expected == RUNS)


# -- the tables ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", AIRFLOW, ids=lambda c: c.source)
def test_airflow_case(case: Case) -> None:
    replay(case)


@pytest.mark.parametrize("case", CANCELLED, ids=lambda c: c.source)
def test_a_cancelled_upstream_counts_as_skipped(case: Case) -> None:
    replay(case)


@pytest.mark.parametrize("case", QUORUM, ids=lambda c: c.source)
def test_quorum(case: Case) -> None:
    replay(case)


# Rules that wait for every upstream, while one upstream (an approval nobody decided yet) is open: the
# task stays pending, and once the gate is approved ends as Airflow's would. Where Airflow decides at
# once (`early` true) this is our documented difference, not a disagreement.
@dataclass(frozen=True)
class Wait:
    source: str
    rule: Rule
    finished: dict[str, int]  # the upstreams that end before the gate is decided
    expected: str  # once the gate is approved
    early: bool  # Airflow decides before the gate is done


WAITS = [
    Wait("test_always_tr", "always", up(), RUNS, early=True),
    Wait("test_all_done_tr_failure", "all_done", up(succeeded=1), RUNS, early=False),
    Wait("test_none_skipped_tr_failure_empty", "none_skipped", up(), RUNS, early=False),
    Wait("trigger_rule_dep.py:all_success-failed", "all_success", up(failed=1), "upstream_failed", early=True),
    Wait("trigger_rule_dep.py:all_success-skipped", "all_success", up(skipped=1), "skipped", early=True),
    Wait("trigger_rule_dep.py:all_failed-succeeded", "all_failed", up(succeeded=1), "skipped", early=True),
    Wait("trigger_rule_dep.py:none_failed-failed", "none_failed", up(failed=1), "upstream_failed", early=True),
    Wait(
        "trigger_rule_dep.py:none_failed_min_one_success-upstream_failed",
        "none_failed_min_one_success",
        up(upstream_failed=1),
        "upstream_failed",
        early=True,
    ),
    Wait("trigger_rule_dep.py:none_skipped-skipped", "none_skipped", up(skipped=1), "skipped", early=True),
]


@pytest.mark.parametrize("case", WAITS, ids=lambda w: w.source)
def test_rules_that_wait_for_every_upstream(case: Wait) -> None:
    tasks, forced = upstreams(case.finished)
    tasks["Gate"] = GATE
    tasks["Join"] = joined(case.rule, [*forced, "Gate"])
    worker = Worker()
    sim = Simulation(flow(tasks), [worker.agent])
    waiting = states(sim.run())
    assert {name: waiting[name] for name in forced} == forced
    assert waiting["Gate"] == "running" and waiting["Join"] == "pending"
    done = states(sim.approve("Gate"))
    assert done["Join"] == case.expected
    assert ("Join" in worker.ran) == (case.expected == RUNS)


def test_always_runs_after_a_rejected_gate_too() -> None:
    worker = Worker()
    sim = Simulation(flow({"Gate": GATE, "Join": joined("always", ["Gate"])}), [worker.agent])
    assert states(sim.run())["Join"] == "pending"
    done = states(sim.reject("Gate", reason="no"))
    assert done == {"Gate": "failed", "Join": "succeeded"} and worker.ran == ["Join"]


def test_an_unknown_rule_is_refused_before_anything_runs() -> None:
    # Airflow: test_unknown_tr fails the dependency at run time; ours refuses the file
    with pytest.raises(PhibrokerError, match="trigger: one of"):
        Simulation(flow({"A": OK, "Join": joined("Unknown Trigger Rule", ["A"])}))


def test_airflow_upstream_states_dag_with_outcome_leaves() -> None:
    # Airflow: test_UpstreamTIStates, op1 >> (op2, op3) >> op4; (op2, op3, op4) >> op5 (one_failed), op2
    # failed, and the run succeeded. Airflow's test forces op4 to success; in a real run it is below a
    # failure, so upstream_failed, which one_failed counts as a failure too.
    tasks = {
        "op1": OK,
        "op2": {**FAILS, "depends_on": ["op1"]},
        "op3": {**OK, "depends_on": ["op1"]},
        "op4": {**OK, "depends_on": ["op2", "op3"]},
        "op5": joined("one_failed", ["op2", "op3", "op4"]),
    }
    worker = Worker()
    doc = Simulation(flow(tasks, outcome="leaves"), [worker.agent]).run()
    assert states(doc) == {
        "op1": "succeeded",
        "op2": "failed",
        "op3": "succeeded",
        "op4": "upstream_failed",
        "op5": "succeeded",
    }
    assert doc["state"] == "succeeded"


# -- propagation -----------------------------------------------------------------------------------

# Two hops below a failure or a skip: (the middle task's rule, the bottom task's rule) -> their states.
PROPAGATION = [
    ("failed", "all_success", "none_failed", "upstream_failed", "upstream_failed"),
    ("failed", "all_success", "all_success", "upstream_failed", "upstream_failed"),
    ("failed", "all_success", "all_done", "upstream_failed", RUNS),
    ("failed", "all_success", "one_failed", "upstream_failed", RUNS),
    ("failed", "all_success", "all_failed", "upstream_failed", RUNS),
    ("failed", "none_failed", "none_failed_min_one_success", "upstream_failed", "upstream_failed"),
    ("skipped", "all_success", "all_success", "skipped", "skipped"),
    ("skipped", "all_success", "none_failed", "skipped", RUNS),
    ("skipped", "all_success", "none_failed_min_one_success", "skipped", "skipped"),
    ("skipped", "all_success", "none_skipped", "skipped", "skipped"),
]


@pytest.mark.parametrize(("top", "middle", "bottom", "middle_state", "bottom_state"), PROPAGATION)
def test_propagation_two_hops_down(top: str, middle: str, bottom: str, middle_state: str, bottom_state: str) -> None:
    tasks = {
        "Top": FAILS if top == "failed" else {**OK, "when": "false"},
        "Middle": joined(middle, ["Top"]),
        "Bottom": joined(bottom, ["Middle"]),
    }
    worker = Worker()
    got = states(Simulation(flow(tasks), [worker.agent]).run())
    assert got == {"Top": top, "Middle": middle_state, "Bottom": bottom_state}
    assert worker.ran == (["Bottom"] if bottom_state == RUNS else [])


# -- deciding early --------------------------------------------------------------------------------

# one_success, one_failed and at_least fire as soon as they can, while an approval nobody has decided
# is still open; the handler's inputs hold only the upstreams that had finished.
EARLY = [
    ("one_success", up(succeeded=1), RUNS, ["Ok1"]),
    ("one_success", up(failed=1, skipped=1, succeeded=1), RUNS, ["Ok1"]),
    ("one_failed", up(failed=1), RUNS, []),
    ("one_failed", up(upstream_failed=1), RUNS, []),
    ({"at_least": 2}, up(succeeded=2, failed=1), RUNS, ["Ok1", "Ok2"]),
    # two of three failed: a quorum of two can no longer be reached, whatever the gate decides
    ({"at_least": 2}, up(failed=2), "upstream_failed", None),
]


@pytest.mark.parametrize(("rule", "finished", "expected", "inputs"), EARLY)
def test_early_rules_decide_while_an_upstream_is_still_open(
    rule: Rule, finished: dict[str, int], expected: str, inputs: list[str] | None
) -> None:
    tasks, forced = upstreams(finished)
    tasks["Gate"] = GATE
    tasks["Join"] = joined(rule, [*forced, "Gate"])
    worker = Worker()
    doc = Simulation(flow(tasks), [worker.agent]).run()
    assert {name: doc["tasks"][name]["state"] for name in forced} == forced
    assert doc["tasks"]["Gate"]["state"] == "running"
    assert doc["tasks"]["Join"]["state"] == expected
    if inputs is not None:
        assert doc["tasks"]["Join"]["result"] == {"inputs": inputs}


def test_one_success_runs_while_a_slow_upstream_still_retries() -> None:
    tasks = {
        "Fast": OK,
        "Slow": {**SLOW, "payload": {"ready_at": 3}},
        "Join": joined("one_success", ["Fast", "Slow"]),
    }
    worker = Worker()
    sim = Simulation(flow(tasks), [worker.agent])
    while sim.status()["tasks"]["Join"]["state"] not in TERMINAL:
        assert sim.step(), "the run ended before Join was decided"
    early = sim.status()
    assert early["tasks"]["Join"]["state"] == "succeeded"
    assert early["tasks"]["Join"]["result"] == {"inputs": ["Fast"]}
    assert early["tasks"]["Slow"]["state"] not in TERMINAL
    done = sim.run()
    assert states(done) == {"Fast": "succeeded", "Slow": "succeeded", "Join": "succeeded"}
    assert worker.ran.count("Join") == 1 and done["tasks"]["Slow"]["attempts"] == 3


# -- fail_fast ---------------------------------------------------------------------------------------

# Under the default fail_fast, once `Failed1` fails for good nothing new starts except the tasks whose
# rule fires on failure; the open gate is stopped (cancelled) and what sits below the failure is
# upstream_failed.
FAIL_FAST = [
    ("all_done", ["Failed1"], RUNS),
    ("one_failed", ["Failed1"], RUNS),
    ("all_failed", ["Failed1"], RUNS),
    ("always", ["Failed1"], RUNS),
    ("all_done", ["Failed1", "Gate"], RUNS),
    ("always", ["Failed1", "Gate"], RUNS),
    ("all_success", ["Failed1"], "upstream_failed"),
    ("none_failed", ["Failed1"], "upstream_failed"),
]


@pytest.mark.parametrize(("rule", "upstream", "expected"), FAIL_FAST)
def test_fail_fast_still_runs_the_rules_that_fire_on_failure(rule: Rule, upstream: list[str], expected: str) -> None:
    tasks = {"Failed1": FAILS, "Gate": GATE, "Join": joined(rule, upstream)}
    worker = Worker()
    doc = Simulation(flow(tasks, failure="fail_fast"), [worker.agent]).run()
    assert states(doc) == {"Failed1": "failed", "Gate": "cancelled", "Join": expected}
    assert worker.ran == (["Join"] if expected == RUNS else [])
    assert doc["state"] == "failed"


# Only a task cancelled by cancel_rest, `cancel --task` or `end` counts as skipped for its
# dependents; under fail_fast, tasks that will now never start are cancelled.
@pytest.mark.parametrize("stopped", [GATE, OK], ids=["open-gate", "dispatched-task"])
def test_fail_fast_cancels_what_would_have_run_after_a_stopped_task(stopped: dict[str, Any]) -> None:
    tasks = {"Failed1": FAILS, "Stopped": stopped, "After": joined("all_success", ["Stopped"])}
    worker = Worker()
    doc = Simulation(flow(tasks, failure="fail_fast"), [worker.agent]).run()
    assert states(doc) == {"Failed1": "failed", "Stopped": "cancelled", "After": "cancelled"}
    assert worker.ran == []


def test_fail_fast_two_hops_below_the_failure_is_upstream_failed_never_run() -> None:
    tasks = {
        "Failed1": FAILS,
        "Middle": joined("all_success", ["Failed1"]),
        "Bottom": joined("none_failed", ["Middle"]),
        "Cleanup": joined("all_done", ["Bottom"]),
    }
    worker = Worker()
    doc = Simulation(flow(tasks, failure="fail_fast"), [worker.agent]).run()
    assert states(doc) == {
        "Failed1": "failed",
        "Middle": "upstream_failed",
        "Bottom": "upstream_failed",
        "Cleanup": "succeeded",
    }
    assert worker.ran == ["Cleanup"] and doc["state"] == "failed"
