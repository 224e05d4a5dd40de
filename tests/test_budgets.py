"""Budgets: `ctx.spend` reports, `budget:` limits per task and per run, `fail` and `ask`.

The rules run through the engine in memory (Simulation, and single inputs on a `Run`); the last tests
run them with a real coordinator and worker: a task stopped while it runs, the call that passes a
limit raising BudgetExhausted, and an `ask` budget approved with `phibroker approve`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from phibroker import Agent, BudgetExhausted, engine, wire
from phibroker import workflow as workflows
from phibroker.engine import budgets
from phibroker.engine.state import Run, new_workflow_fields
from phibroker.errors import WorkflowFileError
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.testing import Simulation
from phibroker.tools.styles import spend_text
from phibroker.tools.watch import WorkflowRow, _workflow_row, plan_of, task_rows
from tests.conftest import Processes, free_port, until
from tests.test_core import cli
from tests.test_metrics import scraped_until, value

NOW = 1_000_000.0
LINE = "budget_exhausted: tokens 120000 > 100000"


# -- the file ---------------------------------------------------------------------------------------


def one_task(**task: Any) -> dict[str, Any]:
    return {"name": "b", "tasks": {"A": {"agent": "llm", "command": "work", **task}}}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"budget": {}}, "workflow: budget: give tokens, cost or both"),
        ({"budget": {"tokens": 0}}, "workflow: budget.tokens: Input should be greater than or equal to 1"),
        ({"budget": {"tokens": 1.5}}, "workflow: budget.tokens: Input should be a valid integer"),
        ({"budget": {"cost": -1}}, "workflow: budget.cost: Input should be greater than 0"),
        (
            {"budget": {"tokens": 5, "on_exceed": "pause"}},
            "workflow: budget.on_exceed: Input should be 'fail' or 'ask'",
        ),
        ({"budget": {"tokns": 5}}, "workflow: unknown field 'budget.tokns' (did you mean 'tokens'?)"),
    ],
)
def test_a_bad_budget_is_one_clear_line(change: dict[str, Any], error: str) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        workflows.check({**one_task(), **change})
    assert str(caught.value) == error


def test_a_gate_or_a_sub_workflow_task_takes_no_budget() -> None:
    gate = {"name": "b", "tasks": {"A": {"approval": {}, "budget": {"tokens": 5}}}}
    with pytest.raises(WorkflowFileError, match="^task 'A': an approval gate takes no budget$"):
        workflows.check(gate)


def test_validate_shows_the_budgets(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(
        "name: b\nbudget: {tokens: 100000, cost: 5}\ntasks:\n"
        "  A: {agent: llm, command: work, budget: {tokens: 50000, cost: 2.5, on_exceed: ask}}\n"
        "  B: {agent: llm, command: work, depends_on: [A]}\n"
    )
    out = cli(settings, "validate", str(path))
    assert out.returncode == 0, out.stderr
    assert "run budget: tokens 100000, cost 5 (fail)" in out.stdout.splitlines()
    assert "task budgets: A tokens 50000, cost 2.5 (ask)" in out.stdout.splitlines()
    doc = json.loads(cli(settings, "validate", "--json", str(path)).stdout)
    assert doc["budget"] == {"tokens": 100000, "cost": 5.0, "on_exceed": "fail"}
    assert doc["tasks"]["A"]["budget"] == {"tokens": 50000, "cost": 2.5, "on_exceed": "ask"}
    assert "budget" not in doc["tasks"]["B"]


# -- the arithmetic and single inputs ----------------------------------------------------------------


def test_reports_are_totals_so_copies_and_older_ones_add_nothing() -> None:
    detail, added = budgets.merge(None, 1, (50, 0.1)) or ("", budgets.NOTHING)
    assert added == (50, 0.1)
    assert budgets.merge(detail, 1, (50, 0.1)) is None  # a copy
    assert budgets.merge(detail, 1, (30, 0.05)) is None  # an older report, read late
    detail, added = budgets.merge(detail, 1, (80, 0.3)) or ("", budgets.NOTHING)
    assert added == (30, 0.2)
    for attempt in range(2, 2 + budgets.KEEP_ATTEMPTS):  # the oldest attempt is summed away
        detail, _ = budgets.merge(detail, attempt, (1, 0.0)) or ("", budgets.NOTHING)
    assert budgets.merge(detail, 1, (500, 1.0)) is None
    assert budgets.over((120000, 0.1), (100000, None)) == "tokens 120000 > 100000"
    assert budgets.over((5, 0.30000000000000004), (None, 0.3)) is None  # costs drift; nine decimals do not
    assert budgets.over((5, 5.25), (4, 5)) == "tokens 5 > 4, cost 5.25 > 5"


def started(flow: dict[str, Any]) -> Run:
    wf = workflows.check(flow)
    run = Run("r", wf, new_workflow_fields(wf, {}, NOW), {}, {})
    run.begin()
    engine.start(run, NOW)
    return run


def report(run: Run, unit: str, attempt: int, tokens: int, cost: float = 0.0) -> bool:
    run.begin()
    body = {"wf": run.id, "unit": unit, "dispatch": run.units[unit]["dispatch"], "attempt": attempt}
    return engine.spend(run, {**body, "tokens": tokens, "cost": cost}, NOW + 1)


def test_duplicate_and_out_of_order_reports_change_nothing() -> None:
    run = started({**one_task(), "budget": {"tokens": 100000}})
    ((_, raw),) = run.tx.dispatches
    assert wire.TaskMessage.decode(raw, 1 << 20).budgets == [
        {"scope": "run", "on_exceed": "fail", "tokens": 100000, "cost": None, "spent": [0, 0.0]}
    ]
    assert report(run, "A", 1, 50000, 0.5)
    assert not report(run, "A", 1, 50000, 0.5) and not run.tx.changed  # the same report, read twice
    assert not report(run, "A", 1, 30000, 0.25) and not run.tx.changed  # an earlier one, read after it
    assert not report(run, "A", 2, 90000) and not run.tx.changed  # an attempt never dispatched
    assert report(run, "A", 1, 70000, 0.75)
    doc = status(run)
    assert doc["spend"] == doc["tasks"]["A"]["spend"] == {"tokens": 70000, "cost": 0.75}
    assert doc["tasks"]["A"]["state"] == "ready" and not run.tx.stops


def status(run: Run) -> dict[str, Any]:
    from phibroker.engine.records import status_document

    return status_document(run.id, dict(run.meta), run.units, run.raw_results, [], 1 << 20)


def test_a_report_past_a_fail_budget_stops_the_running_task_and_its_answer_fails_it() -> None:
    run = started(one_task(budget={"tokens": 100000}, retry={"max_attempts": 3, "retry_on": ["budget"]}))
    run.units["A"].update(state="running", token=1, started=NOW, worker="w")  # as the start script marks it
    dispatch = run.units["A"]["dispatch"]
    assert report(run, "A", 1, 120000)
    assert run.tx.stops == [("llm", "A", dispatch)]  # its worker is told at once
    assert status(run)["tasks"]["A"]["stopping"] == LINE
    run.begin()  # its worker answers, whatever it says: the task fails with the line, not retried
    answer = wire.Result(dispatch, "r", "A", 1, True, "w", NOW, NOW + 2, value=wire.pack({"ok": 1}))
    engine.apply_result(run, answer, NOW + 2)
    assert run.state("A") == "failed" and run.units["A"]["error"] == LINE and run.wf_state == "failed"


def test_a_late_report_past_a_fail_budget_fails_a_task_waiting_to_retry() -> None:
    run = started(one_task(budget={"tokens": 100000}, retry={"max_attempts": 3, "base_delay": 5}))
    run.units["A"].update(state="running", token=1, started=NOW, worker="w")
    error = {"type": "Retryable", "message": "the model timed out"}
    failed = wire.Result(run.units["A"]["dispatch"], "r", "A", 1, False, "w", NOW, NOW + 1, error=error, retry=True)
    run.begin()
    engine.apply_result(run, failed, NOW + 1)
    assert run.state("A") == "retrying"
    assert report(run, "A", 1, 120000)  # its report, read after its result
    assert (run.state("A"), run.units["A"]["error"], run.wf_state) == ("failed", LINE, "failed")
    assert any(member.startswith("retry|") for member in run.tx.timers_del)  # the retry is called off


def test_the_final_totals_in_a_result_count_when_reports_were_lost() -> None:
    run = started(one_task(budget={"tokens": 100000}))
    run.units["A"].update(state="running", token=1, started=NOW, worker="w")
    spend = {"attempt": 1, "tokens": 120000, "cost": 0.0}
    answer = wire.Result(run.units["A"]["dispatch"], "r", "A", 1, True, "w", NOW, NOW + 2, spend=spend)
    run.begin()
    engine.apply_result(run, answer, NOW + 2)
    assert run.units["A"]["error"] == LINE and status(run)["spend"]["tokens"] == 120000


# -- the rules, in a Simulation ---------------------------------------------------------------------


def llm(log: list[tuple[str, int, str]]) -> Agent:
    """`work`: `steps` reports of `each` tokens; logs (task, step, "raised" | "stopped") and stops when asked."""
    agent = Agent("llm")

    @agent.command("work")
    def work(ctx: Any, steps: int = 4, each: int = 40000, cost: float = 0.0) -> dict[str, int]:
        for step in range(1, steps + 1):
            try:
                ctx.spend(input_tokens=each // 4, output_tokens=each - each // 4, cost=cost)
            except BudgetExhausted:
                log.append((ctx.task, step, "raised"))
                raise
            if ctx.cancelled:
                log.append((ctx.task, step, "stopped"))
                return {"stopped": step}
        return {"steps": steps}

    return agent


def test_the_call_past_a_fail_budget_raises_and_the_task_is_never_retried() -> None:
    log: list[tuple[str, int, str]] = []
    retry = {"max_attempts": 3, "base_delay": 0.1, "retry_on": ["budget", "exhausted"]}
    flow = one_task(budget={"tokens": 100000}, retry=retry)
    flow["tasks"]["B"] = {"agent": "llm", "command": "work", "depends_on": ["A"]}
    sim = Simulation(flow, [llm(log)])
    doc = sim.run()
    assert log == [("A", 3, "raised")]  # the third report (120000) raised, in the handler
    a = doc["tasks"]["A"]
    assert (doc["state"], a["state"], a["error"], a["attempts"]) == ("failed", "failed", LINE, 1)
    assert a["history"][0]["error"] == LINE and "BudgetExhausted" in a["history"][0]["traceback"]
    assert doc["tasks"]["B"]["state"] == "upstream_failed"
    assert doc["spend"] == a["spend"] == {"tokens": 120000, "cost": 0.0}
    assert doc["error"] == f"task A failed: {LINE}"


def test_an_ask_budget_holds_new_tasks_until_approved_then_raises_the_limit_by_its_size() -> None:
    log: list[tuple[str, int, str]] = []
    flow = {**one_task(payload={"steps": 6}), "budget": {"tokens": 100000, "on_exceed": "ask"}}
    flow["tasks"]["B"] = {"agent": "llm", "command": "work", "depends_on": ["A"], "payload": {"steps": 1}}
    sim = Simulation(flow, [llm(log)])
    doc = sim.run()
    (request,) = sim.approvals.values()
    assert request["message"] == "budget exceeded: tokens 120000 > 100000 (the run's budget)"
    assert request["task"] == "A" and log == []  # the task that passed it went on, to its end
    assert (doc["state"], doc["tasks"]["A"]["state"], doc["tasks"]["B"]["state"]) == (
        "waiting_approval",
        "succeeded",
        "pending",
    )
    doc = sim.approve("A")  # the limit is now 200000: the 240000 spent pass it too, so it asks again
    (again,) = sim.approvals.values()
    assert again["message"] == "budget exceeded: tokens 240000 > 200000 (the run's budget)"
    assert doc["state"] == "waiting_approval" and doc["tasks"]["B"]["state"] == "pending"
    doc = sim.approve("A")  # 300000: room for B
    assert doc["state"] == "succeeded" and doc["tasks"]["B"]["state"] == "succeeded"
    assert doc["spend"] == {"tokens": 280000, "cost": 0.0}
    assert sim.event_types("A").count("approval.granted") == 2


def test_an_ask_budget_rejected_fails_the_task_that_passed_it() -> None:
    flow = one_task(budget={"tokens": 100000, "on_exceed": "ask"})
    flow["tasks"]["B"] = {"agent": "llm", "command": "work", "depends_on": ["A"]}
    sim = Simulation(flow, [llm([])])
    assert sim.run()["state"] == "waiting_approval"
    doc = sim.reject("A", "too dear")
    assert (doc["state"], doc["tasks"]["A"]["state"], doc["tasks"]["A"]["error"]) == ("failed", "failed", LINE)
    assert doc["tasks"]["B"]["state"] == "upstream_failed" and not sim.approvals


def test_the_run_budget_bounds_every_task_together() -> None:
    log: list[tuple[str, int, str]] = []
    flow = {
        "name": "b",
        "budget": {"tokens": 100000},
        "tasks": {
            "A": {"agent": "llm", "command": "work", "payload": {"steps": 2, "each": 30000}},
            "B": {"agent": "llm", "command": "work", "depends_on": ["A"], "payload": {"steps": 3, "each": 30000}},
        },
    }
    doc = Simulation(flow, [llm(log)]).run()
    assert log == [("B", 2, "raised")]  # B's message said 60000 were spent before it: its second report passes
    assert doc["tasks"]["A"]["state"] == "succeeded" and doc["tasks"]["B"]["error"] == LINE
    assert doc["tasks"]["B"]["spend"] == {"tokens": 60000, "cost": 0.0} and doc["spend"]["tokens"] == 120000


def test_a_task_budget_wins_over_the_run_budget_and_an_open_request_lets_the_next_one_act() -> None:
    log: list[tuple[str, int, str]] = []
    flow = {**one_task(budget={"tokens": 50000, "on_exceed": "ask"}), "budget": {"tokens": 100000}}
    sim = Simulation(flow, [llm(log)])
    doc = sim.run()
    (request,) = [e["data"]["message"] for e in sim.events if e["type"] == "approval.requested"]
    assert request == "budget exceeded: tokens 80000 > 50000 (task A's budget)"  # not the run's `fail`
    # asked already, the task's own passes the turn: at 120000 the run's `fail` stops it while it runs
    assert log == [("A", 3, "stopped")]
    assert doc["tasks"]["A"]["error"] == LINE and doc["state"] == "failed"
    assert not sim.approvals  # the run ended: its request went with it


def test_a_retried_run_counts_its_budgets_afresh() -> None:
    log: list[tuple[str, int, str]] = []
    sim = Simulation(one_task(budget={"tokens": 100000}), [llm(log)])
    assert sim.run()["state"] == "failed"
    doc = sim.retry()
    assert log == [("A", 3, "raised"), ("A", 3, "raised")]  # the same limit, over what it spent since
    assert doc["tasks"]["A"]["error"] == LINE and doc["spend"]["tokens"] == 240000


def test_costs_are_limits_too_and_spend_shows_in_plain_numbers() -> None:
    log: list[tuple[str, int, str]] = []
    flow = one_task(budget={"cost": 0.25}, payload={"steps": 4, "each": 10, "cost": 0.1})
    doc = Simulation(flow, [llm(log)]).run()
    assert doc["tasks"]["A"]["error"] == "budget_exhausted: cost 0.3 > 0.25" and log == [("A", 3, "raised")]
    assert spend_text(doc["spend"]) == "30 tokens, cost 0.3"


def test_ctx_spend_refuses_nonsense() -> None:
    from phibroker.runtime.agent import Context

    ctx = Context("r", "A", "A", 1, "llm", "work")
    for bad in ({"tokens": -1}, {"tokens": 1.5}, {"cost": float("nan")}, {"input_tokens": True}):
        with pytest.raises(ValueError, match="^ctx.spend: "):
            ctx.spend(**bad)
    ctx.spend(tokens=3, input_tokens=4, output_tokens=5, cost=1)
    assert ctx.usage == {"tokens": 3, "input_tokens": 4, "output_tokens": 5, "cost": 1} and ctx.spent() == (12, 1.0)


def test_watch_shows_what_runs_and_tasks_spent() -> None:
    plan = plan_of(json.dumps({"tasks": {"A": {"agent": "llm", "command": "work"}}}))
    units = {"A": {"state": "running", "spent": "120512 0.42"}}
    head = {"state": "running", "created_at": NOW, "spent": "120512 0.42"}
    assert _workflow_row("r", head, plan, units, NOW).spent == "120512 tokens, cost 0.42"
    assert task_rows(plan, units)[0].notes == "spent 120512 tokens, cost 0.42"
    assert WorkflowRow("r", "running", 0, 1, 0.0, None).spent == ""


# -- real processes ---------------------------------------------------------------------------------

APP = "tests.apps.spender"


def work(**task: Any) -> dict[str, Any]:
    return {"agent": "spender", "command": "spend", **task}


def logged(client: Client, wf_id: str, task: str) -> list[str]:
    return [r["data"]["message"] for r in client.stream(wf_id, task=task) if r["kind"] == "log"]


def test_a_task_past_its_fail_budget_raises_in_the_handler_and_fails_with_the_line(
    procs: Processes, settings: Settings, client: Client
) -> None:
    procs.coordinator()
    port = free_port()
    procs.spawn("worker-spender", "worker", "--agent", "spender", "--app", APP, "--metrics-port", str(port))
    retry = {"max_attempts": 3, "base_delay": 0.1, "retry_on": ["budget", "exhausted"]}
    task = work(payload={"steps": 5, "tokens": 40000}, budget={"tokens": 100000}, retry=retry)
    wf_id = client.submit(workflows.check({"name": "spends", "tasks": {"Work": task}}))
    doc = client.wait(wf_id, timeout=60)
    assert doc["state"] == "failed", procs.output()
    row = doc["tasks"]["Work"]
    assert (row["error"], row["attempts"], row["spend"]) == (LINE, 1, {"tokens": 120000, "cost": 0.0})
    assert row["history"][0]["error"] == LINE and "BudgetExhausted" in row["history"][0]["traceback"]
    assert logged(client, wf_id, "Work") == ["step 1 spent", "step 2 spent", f"step 3 raised: {LINE}"]
    shown = json.loads(cli(settings, "status", "--json", wf_id).stdout)
    assert shown["spend"] == {"tokens": 120000, "cost": 0.0}
    spent = "phibroker_spend_tokens_total"
    scraped_until(port, lambda samples: value(samples, spent, agent="spender") == 120000, procs)


def test_a_run_budget_passed_by_two_tasks_stops_the_one_whose_report_passed_it(
    procs: Processes, client: Client
) -> None:
    procs.coordinator()
    procs.worker("spender", app=APP)
    each = work(payload={"steps": 3, "tokens": 30000, "pause": 0.3, "linger": 60})  # 90000 alone: no raise
    flow = {"name": "spends", "budget": {"tokens": 100000}, "tasks": {"A": each, "B": each}}
    wf_id = client.submit(workflows.check(flow))
    doc = client.wait(wf_id, timeout=90)
    assert doc["state"] == "failed", procs.output()
    (passed,) = [name for name, row in doc["tasks"].items() if row["state"] == "failed"]
    (other,) = {"A", "B"} - {passed}
    assert doc["tasks"][passed]["error"] == LINE and doc["error"] == f"task {passed} failed: {LINE}"
    for name in (passed, other):  # it was stopped by the coordinator, which saw both; the other by fail_fast
        lines = logged(client, wf_id, name)
        assert lines[-1].startswith("asked to stop") and not any("raised" in line for line in lines)
    assert doc["tasks"][other]["error"] is None  # it answered the stop with a result: applied
    assert doc["spend"]["tokens"] == 120000


def test_an_ask_budget_approved_with_the_cli_lets_the_run_succeed(
    procs: Processes, settings: Settings, client: Client
) -> None:
    procs.coordinator()
    procs.worker("spender", app=APP)
    tasks = {
        "Work": work(payload={"steps": 4, "tokens": 40000}, budget={"tokens": 100000, "on_exceed": "ask"}),
        "Next": work(payload={"steps": 1, "tokens": 1000}, depends_on=["Work"]),
    }
    wf_id = client.submit(workflows.check({"name": "spends", "tasks": tasks}))
    (request,) = until(client.approvals, procs, timeout=60)
    assert request["message"] == "budget exceeded: tokens 120000 > 100000 (task Work's budget)"
    assert request["workflow"] == wf_id and request["task"] == "Work"

    def work_ended() -> dict[str, Any] | None:
        doc = client.status(wf_id)
        return doc if doc["tasks"]["Work"]["state"] == "succeeded" else None

    doc = until(work_ended, procs, timeout=60)  # it went on to its end; nothing new started meanwhile
    assert doc["state"] == "waiting_approval" and doc["tasks"]["Next"]["state"] == "pending"
    why = cli(settings, "why", wf_id).stdout
    passed = "task Work's budget is passed (tokens 120000 > 100000)"
    assert f"{passed}: no new task starts until phibroker approve {request['id']} (or reject)" in why
    approved = subprocess.run(
        [sys.executable, "-m", "phibroker", "approve", request["id"]],
        env=procs.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert approved.returncode == 0 and approved.stdout.strip() == f"{request['id']}: granted", approved.stderr
    doc = client.wait(wf_id, timeout=60)
    assert doc["state"] == "succeeded", procs.output()
    assert doc["tasks"]["Work"]["spend"]["tokens"] == 160000 and doc["spend"]["tokens"] == 161000
    listed = cli(settings, "list")
    assert "161000 tokens" in next(line for line in listed.stdout.splitlines() if line.startswith(wf_id))
    (row,) = json.loads(cli(settings, "list", "--json").stdout)
    assert set(row) == {"id", "name", "state", "created_at", "finished_at", "parent"}
