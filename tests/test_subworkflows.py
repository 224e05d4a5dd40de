"""Sub-workflows: a `workflow: FILE` task runs a child run and waits for it. Loading and embedding, the
engine in memory (phibroker.testing.Simulation drives child runs too), then real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from phibroker import engine, workflow
from phibroker.errors import IncludeCycleError, UnknownWorkflow, WorkflowFileError
from phibroker.runtime.agent import Agent, Context
from phibroker.runtime.client import Client
from phibroker.security import signing
from phibroker.settings import Settings
from phibroker.testing import Simulation
from phibroker.wire import Inbox
from tests.conftest import Processes, until
from tests.test_core import events_of
from tests.test_crash import ledger_lines

REVIEW = """\
name: review
params: {text: "", level: 1}
output: {verdict: "${tasks.Check.result.verdict}", level: "${params.level}"}
tasks:
  Check: {agent: team, command: check, payload: {text: "${params.text}"}}
"""
PARENT = """\
name: parent
params: {topic: tides}
output: "${tasks.Review.result}"
tasks:
  Draft: {agent: team, command: draft, payload: {topic: "${params.topic}"}}
  Review:
    workflow: review.yaml
    params: {text: "${tasks.Draft.result.text}", level: 2}
    depends_on: [Draft]
  Publish: {agent: team, command: publish, depends_on: [Review]}
"""


def files(tmp_path: Path, **texts: str) -> Path:
    """Write `name=text` workflow files (name.yaml; `__` is a folder separator); the first one's path."""
    paths = []
    for name, text in texts.items():
        path = tmp_path / (name.replace("__", "/") + ".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths[0]


def team(calls: list[str] | None = None, verdict: Callable[[str], str] = lambda text: "ok") -> Agent:
    agent = Agent("team")
    seen = calls if calls is not None else []

    @agent.command()
    def draft(ctx: Context, topic: str = "", **_: Any) -> dict[str, Any]:
        seen.append("draft")
        return {"text": f"all about {topic}"}

    @agent.command()
    def check(ctx: Context, text: str = "", **_: Any) -> dict[str, Any]:
        seen.append(f"check:{ctx.workflow_id}")
        result = verdict(text)
        if result == "boom":
            raise ValueError("the checker broke")
        return {"verdict": result}

    @agent.command()
    def publish(ctx: Context, **_: Any) -> dict[str, Any]:
        seen.append("publish")
        return {"published": ctx.inputs["Review"]}

    return agent


# -- loading ----------------------------------------------------------------------------------------


def test_a_sub_workflow_file_is_embedded_relative_to_its_parent(tmp_path: Path) -> None:
    parent = files(tmp_path, parent=PARENT.replace("review.yaml", "teams/review.yaml"), teams__review=REVIEW)
    loaded = workflow.load(parent)
    embedded = json.loads(loaded.spec_json)["tasks"]["Review"]["workflow"]
    assert embedded["name"] == "review" and embedded["tasks"]["Check"]["command"] == "check"
    (tmp_path / "teams" / "review.yaml").write_text(REVIEW.replace("check", "other"))
    again = workflow.from_stored(loaded.spec_json)  # what a run stores: the file as it was
    assert again.subworkflow("Review").tasks["Check"].command == "check"
    assert workflow.check(json.loads(loaded.spec_json)).subworkflow("Review").name == "review"


@pytest.mark.parametrize(
    ("texts", "chain"),
    [
        ({"a": "name: a\ntasks:\n  Me: {workflow: a.yaml}\n"}, "a.yaml -> a.yaml"),
        (
            {
                "a": "name: a\ntasks:\n  B: {workflow: b.yaml}\n",
                "b": "name: b\ntasks:\n  C: {workflow: sub/c.yaml}\n",
                "sub__c": "name: c\ntasks:\n  A: {workflow: ../a.yaml}\n",
            },
            "a.yaml -> b.yaml -> sub/c.yaml -> ../a.yaml",
        ),
    ],
    ids=["itself", "through-others"],
)
def test_a_file_that_includes_itself_is_an_error_naming_the_chain(
    tmp_path: Path, texts: dict[str, str], chain: str
) -> None:
    with pytest.raises(IncludeCycleError) as caught:
        workflow.load(files(tmp_path, **texts))
    assert str(caught.value) == f"sub-workflow files include themselves: {chain}"


def test_one_file_used_twice_is_no_cycle(tmp_path: Path) -> None:
    parent = files(
        tmp_path,
        p="name: p\ntasks:\n  A: {workflow: review.yaml}\n  B: {workflow: review.yaml, depends_on: [A]}\n",
        review=REVIEW,
    )
    assert sorted(workflow.load(parent).subworkflows) == ["A", "B"]


@pytest.mark.parametrize(
    ("review_task", "message"),
    [
        (
            "workflow: review.yaml\n    params: {txt: x}",
            "task 'Review': params: review has no param 'txt' (did you mean 'text'?)",
        ),
        (
            "workflow: review.yaml\n    params: {text: '${tasks.Publish.result}'}",
            "task 'Review': params: ${tasks.Publish.result}: 'Publish' is not upstream of 'Review'",
        ),
        ("workflow: missing.yaml", "task 'Review': workflow missing.yaml: No such file or directory"),
        ("workflow: broken.yaml", "task 'Review': workflow broken.yaml: task 'X': depends on unknown task 'Y'"),
        ("workflow: review.yaml\n    retry: {max_attempts: 2}", "task 'Review': a sub-workflow task takes no retry"),
    ],
    ids=["unknown-param", "not-upstream", "missing-file", "broken-child", "retry"],
)
def test_sub_workflow_problems_are_one_line_naming_the_task(tmp_path: Path, review_task: str, message: str) -> None:
    text = "name: p\ntasks:\n  Draft: {agent: team, command: draft}\n  Review:\n    " + review_task + "\n"
    text += "    depends_on: [Draft]\n  Publish: {agent: team, command: publish, depends_on: [Review]}\n"
    broken = "name: broken\ntasks:\n  X: {agent: team, command: check, depends_on: [Y]}\n"
    with pytest.raises(WorkflowFileError) as caught:
        workflow.load(files(tmp_path, p=text, review=REVIEW, broken=broken))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# -- the engine, in memory ----------------------------------------------------------------------------


def test_the_task_succeeds_with_the_child_runs_output(tmp_path: Path) -> None:
    calls: list[str] = []
    sim = Simulation(files(tmp_path, parent=PARENT, review=REVIEW), [team(calls)], run_id="p1")
    status = sim.run()
    assert status["state"] == "succeeded" and status["parent"] is None
    review = status["tasks"]["Review"]
    assert review["child"] == "p1~Review" and review["result"] == {"verdict": "ok", "level": 2}
    assert review["agent"] is None and [h["worker"] for h in review["history"]] == ["p1~Review"]
    assert status["tasks"]["Publish"]["result"] == {"published": {"verdict": "ok", "level": 2}}
    assert status["output"] == {"verdict": "ok", "level": 2}
    child = sim.status("p1~Review")
    assert child["parent"] == {"id": "p1", "task": "Review"} and child["state"] == "succeeded"
    assert child["params"] == {"text": "all about tides", "level": 2}
    assert calls == ["draft", "check:p1~Review", "publish"]


@pytest.mark.parametrize(
    ("verdict", "error"),
    [
        ("boom", "child p1~Review failed: task Check failed: ValueError: the checker broke"),
        ("fine", None),
    ],
)
def test_a_failed_child_fails_the_task_with_its_error(tmp_path: Path, verdict: str, error: str | None) -> None:
    sim = Simulation(files(tmp_path, parent=PARENT, review=REVIEW), [team(verdict=lambda _: verdict)], run_id="p1")
    status = sim.run()
    review = status["tasks"]["Review"]
    assert review["error"] == error
    if error:
        assert status["state"] == "failed" and review["state"] == "failed" and review["attempts"] == 1
        assert status["tasks"]["Publish"]["state"] == "upstream_failed"
        assert sim.status("p1~Review")["state"] == "failed"


GATED = """\
name: gated
tasks:
  Wait: {approval: {message: go?}}
  Check: {agent: team, command: check, depends_on: [Wait]}
"""


def test_a_child_runs_gate_is_decided_in_the_simulation_by_its_run_id(tmp_path: Path) -> None:
    parent = files(tmp_path, p="name: p\ntasks:\n  Sub: {workflow: gated.yaml}\n", gated=GATED)
    sim = Simulation(parent, [team()], run_id="p1")
    sim.run()
    with pytest.raises(LookupError, match="no open approval for task 'Wait' in p1$"):
        sim.approve("Wait")
    status = sim.approve("Wait", run_id="p1~Sub")
    assert status["state"] == "succeeded" and sim.status("p1~Sub")["tasks"]["Check"]["state"] == "succeeded"


def test_cancelling_the_parent_cancels_the_child(tmp_path: Path) -> None:
    parent = files(tmp_path, p="name: p\ntasks:\n  Sub: {workflow: gated.yaml}\n", gated=GATED)
    sim = Simulation(parent, [team()], run_id="p1")
    assert sim.run()["state"] == "running" and sim.status("p1~Sub")["state"] == "waiting_approval"
    status = sim.cancel("enough")
    assert status["state"] == "cancelled" and status["tasks"]["Sub"]["state"] == "cancelled"
    child = sim.status("p1~Sub")
    assert child["state"] == "cancelled" and child["error"] == "parent p1: enough"


def test_cancelling_the_workflow_task_cancels_the_child_and_the_run_goes_on(tmp_path: Path) -> None:
    text = "name: p\ntasks:\n  Sub: {workflow: gated.yaml}\n  After: {agent: team, command: draft, depends_on: [Sub]}\n"
    text += "  Other: {agent: team, command: draft}\n"
    sim = Simulation(files(tmp_path, p=text, gated=GATED), [team()], run_id="p1")
    sim.run()
    status = sim.cancel("not needed", tasks=["Sub"])
    assert status["state"] == "succeeded", status
    states = {name: task["state"] for name, task in status["tasks"].items()}
    assert states == {"Sub": "cancelled", "After": "skipped", "Other": "succeeded"}
    assert sim.status("p1~Sub")["state"] == "cancelled"


def test_a_stopped_task_whose_child_does_not_end_is_cancelled_after_cancel_grace(tmp_path: Path) -> None:
    sim = Simulation(files(tmp_path, p="name: p\ntasks:\n  Sub: {workflow: gated.yaml}\n", gated=GATED), [team()])
    sim.run()
    run = sim.runs["sim"]
    run.begin()
    engine.cancel(run, sim.now, "stop")  # its outbox is not carried out: the child never hears of it
    cancels = [Inbox.decode(raw, 1 << 20) for raw in run.tx.inbox]
    assert [(m.kind, m.body["wf"]) for m in cancels] == [("cancel", "sim~Sub")]
    assert run.wf_state == "cancelling" and run.state("Sub") == "running"
    grace = next(member for member in run.tx.timers_add if member.startswith("grace|"))
    run.begin()
    engine.apply_timer(run, grace, sim.now + 30)
    assert run.wf_state == "cancelled" and run.state("Sub") == "cancelled"
    assert run.units["Sub"]["error"] == "did not stop within cancel_grace"
    notice = {"wf": "sim", "task": "Sub", "child": "sim~Sub", "state": "cancelled", "error": "late"}
    run.begin()
    assert engine.child_ended(run, notice, sim.now + 31) is False and not run.tx.changed


def test_a_looped_workflow_task_starts_each_child_after_the_last_ended(tmp_path: Path) -> None:
    counter = iter(range(1, 100))
    text = (
        "name: p\noutput: '${tasks.Sub.iterations}'\ntasks:\n  Sub:\n    workflow: review.yaml\n"
        "    loop: {until: 'result.verdict == \"3\"', max_iterations: 5}\n"
    )
    sim = Simulation(files(tmp_path, p=text, review=REVIEW), [team(verdict=lambda _: str(next(counter)))], run_id="p")
    status = sim.run()
    assert status["state"] == "succeeded" and status["output"] == 3
    sub = status["tasks"]["Sub"]
    assert sub["iterations"] == 3 and sub["child"] == "p~Sub@3" and sub["result"]["verdict"] == "3"
    assert sorted(sim.runs) == ["p", "p~Sub", "p~Sub@2", "p~Sub@3"]
    starts = [e["data"]["child"] for e in sim.events if e["type"] == "task.child_started"]
    ends = [e["workflow"] for e in sim.events if e["type"] == "workflow.succeeded" and e["workflow"] != "p"]
    assert starts == ends == ["p~Sub", "p~Sub@2", "p~Sub@3"]
    order = [
        (e["type"], e.get("workflow")) for e in sim.events if e["type"] in ("task.child_started", "workflow.succeeded")
    ]
    assert order[:4] == [
        ("task.child_started", "p"),
        ("workflow.succeeded", "p~Sub"),
        ("task.child_started", "p"),
        ("workflow.succeeded", "p~Sub@2"),
    ]


def test_nesting_deeper_than_max_depth_fails_the_task_with_one_line(tmp_path: Path) -> None:
    levels = {f"d{i}": f"name: d{i}\ntasks:\n  In: {{workflow: d{i + 1}.yaml}}\n" for i in range(11)}
    levels["d11"] = "name: d11\ntasks:\n  Leaf: {agent: team, command: draft}\n"
    sim = Simulation(files(tmp_path, **levels), [team()], run_id="r")
    status = sim.run()
    assert status["state"] == "failed"
    deepest = sim.status("r" + "~In" * 10)
    assert deepest["tasks"]["In"]["error"] == "sub-workflow runs nest 11 deep, over max_depth 10"
    assert "r" + "~In" * 11 not in sim.runs


def test_a_late_or_repeated_notice_changes_nothing(tmp_path: Path) -> None:
    sim = Simulation(files(tmp_path, parent=PARENT, review=REVIEW), [team()], run_id="p1")
    before = sim.run()
    run = sim.runs["p1"]
    notice = {"wf": "p1", "task": "Review", "child": "p1~Review", "state": "failed", "error": "late"}
    stranger = {**notice, "child": "someone-else", "state": "succeeded"}
    for body in (notice, stranger):
        run.begin()
        assert engine.child_ended(run, body, sim.now) is False and not run.tx.changed
    assert sim.status() == before


def test_a_child_run_can_have_its_own_child(tmp_path: Path) -> None:
    middle = "name: middle\nparams: {text: ''}\noutput: '${tasks.Inner.result}'\ntasks:\n"
    middle += "  Inner: {workflow: review.yaml, params: {text: '${params.text}'}}\n"
    parent = files(
        tmp_path, p=PARENT.replace("review.yaml", "middle.yaml").replace(", level: 2", ""), middle=middle, review=REVIEW
    )
    sim = Simulation(parent, [team()], run_id="p")
    status = sim.run()
    assert status["state"] == "succeeded" and status["output"] == {"verdict": "ok", "level": 1}
    assert sim.status("p~Review~Inner")["parent"] == {"id": "p~Review", "task": "Inner"}


def test_dotted_task_names_give_each_child_run_its_own_id(tmp_path: Path) -> None:
    """Task `a.b` of the parent and task `b` of the child run for task `a` are different runs."""
    outer = "name: outer\ntasks:\n  a: {workflow: inner.yaml}\n  a.b: {workflow: review.yaml}\n"
    inner = "name: inner\ntasks:\n  b: {workflow: review.yaml}\n"
    calls: list[str] = []
    sim = Simulation(files(tmp_path, outer=outer, inner=inner, review=REVIEW), [team(calls)], run_id="r")
    assert sim.run()["state"] == "succeeded"
    assert sorted(calls) == ["check:r~a.b", "check:r~a~b"]
    assert sim.status("r~a~b")["parent"] == {"id": "r~a", "task": "b"}


# -- real processes -------------------------------------------------------------------------------------

CHILD = """\
name: child
params: {value: 0}
output: {got: "${tasks.Work.result.value}"}
tasks:
  Work: {agent: probe, command: work, payload: {value: "${params.value}"}}
"""
MAIN = """\
name: main
output: "${tasks.Sub.result}"
tasks:
  First: {agent: probe, command: work, payload: {value: 7}}
  Sub:
    workflow: child.yaml
    params: {value: "${tasks.First.result.value}"}
    depends_on: [First]
"""


def phibroker(procs: Processes, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60, env=procs.env(**env)
    )


def up(procs: Processes, concurrency: int = 4, **env: str) -> None:
    procs.coordinator(**env)
    procs.worker("probe", app="tests.apps.probe", concurrency=concurrency)


def ended(client: Client, wf_id: str, procs: Processes, timeout: float = 60) -> dict[str, Any]:
    status = client.wait(wf_id, timeout=timeout)
    assert status["state"] in ("succeeded", "failed", "cancelled", "timed_out"), procs.output()
    return status


def test_a_sub_workflow_runs_as_a_child_run_listed_under_its_parent(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    up(procs)
    wf_id = client.submit(files(tmp_path, main=MAIN, child=CHILD))
    status = ended(client, wf_id, procs)
    assert status["state"] == "succeeded" and status["output"] == {"got": 7}, procs.output()
    child_id = status["tasks"]["Sub"]["child"]
    assert child_id == f"{wf_id}~Sub" and status["tasks"]["Sub"]["result"] == {"got": 7}
    child = json.loads(phibroker(procs, "status", child_id, "--json").stdout)
    assert child["parent"] == {"id": wf_id, "task": "Sub"} and child["state"] == "succeeded"
    assert child["params"] == {"value": 7} and child["tasks"]["Work"]["result"]["value"] == 7
    rows = {row["id"]: row for row in client.list()}
    assert rows[wf_id]["parent"] is None and rows[child_id]["parent"] == {"id": wf_id, "task": "Sub"}
    assert json.loads(phibroker(procs, "list", "--json").stdout) == client.list()
    lines = phibroker(procs, "list").stdout.splitlines()
    parent_line = next(i for i, line in enumerate(lines) if line.startswith(wf_id + " "))
    assert lines[parent_line + 1].startswith(f"└ {child_id} ")


def test_a_failed_child_fails_the_parents_task(procs: Processes, client: Client, tmp_path: Path) -> None:
    up(procs)
    failing = CHILD.replace("command: work", "command: fail")
    status = ended(client, client.submit(files(tmp_path, main=MAIN, child=failing)), procs)
    sub = status["tasks"]["Sub"]
    assert status["state"] == "failed" and sub["state"] == "failed"
    assert sub["error"] == f"child {sub['child']} failed: task Work failed: ValueError: boom"
    assert client.status(sub["child"])["state"] == "failed"


def task_state(client: Client, wf_id: str, task: str) -> str | None:
    try:
        return str(client.status(wf_id)["tasks"][task]["state"])
    except UnknownWorkflow:
        return None  # not created yet


def test_cancelling_the_parent_cancels_its_child_run(procs: Processes, client: Client, tmp_path: Path) -> None:
    up(procs)
    holding = CHILD.replace('command: work, payload: {value: "${params.value}"}', "command: hold, payload: {sleep: 60}")
    wf_id = client.submit(files(tmp_path, main=MAIN, child=holding))
    child_id = f"{wf_id}~Sub"
    until(lambda: task_state(client, child_id, "Work") == "running", procs)
    client.cancel(wf_id, reason="enough")
    status = ended(client, wf_id, procs, timeout=30)
    assert status["state"] == "cancelled" and status["tasks"]["Sub"]["state"] == "cancelled"
    child = client.wait(child_id, timeout=30)
    assert child["state"] == "cancelled" and child["error"] == f"parent {wf_id}: enough"
    assert child["tasks"]["Work"]["state"] == "cancelled"
    assert "stopped when asked" in child["tasks"]["Work"]["history"][-1]["error"]


def test_a_looped_workflow_task_runs_its_children_one_after_another(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    up(procs)
    looped = MAIN.replace("depends_on: [First]", "depends_on: [First]\n    loop: {until: 'iteration >= 3'}")
    status = ended(client, client.submit(files(tmp_path, main=looped, child=CHILD)), procs)
    sub = status["tasks"]["Sub"]
    assert status["state"] == "succeeded" and sub["iterations"] == 3, procs.output()
    wf_id = status["id"]
    children = [client.status(c) for c in (f"{wf_id}~Sub", f"{wf_id}~Sub@2", f"{wf_id}~Sub@3")]
    assert sub["child"] == children[-1]["id"] and all(c["state"] == "succeeded" for c in children)
    for before, after in zip(children, children[1:], strict=False):
        assert after["created_at"] >= before["finished_at"]


def test_validate_names_the_include_cycle(procs: Processes, tmp_path: Path) -> None:
    first = files(
        tmp_path, a="name: a\ntasks:\n  B: {workflow: b.yaml}\n", b="name: b\ntasks:\n  A: {workflow: a.yaml}\n"
    )
    result = phibroker(procs, "validate", str(first))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: sub-workflow files include themselves: a.yaml -> b.yaml -> a.yaml\n"


def test_waiting_for_a_child_holds_no_worker_slot(procs: Processes, client: Client, tmp_path: Path) -> None:
    """One slot, and two sub-workflows at once whose tasks need it: had the waiting tasks held the
    slot, nothing could run their children's work."""
    up(procs, concurrency=1)
    text = "name: both\ntasks:\n  A: {workflow: child.yaml}\n  B: {workflow: child.yaml}\n"
    text += "  C: {agent: probe, command: work, depends_on: [A, B]}\n"
    status = ended(client, client.submit(files(tmp_path, both=text, child=CHILD)), procs)
    assert status["state"] == "succeeded", procs.output()
    assert [client.status(status["tasks"][t]["child"])["state"] for t in "AB"] == ["succeeded"] * 2


@pytest.mark.parametrize("point", ["after_child_end", "child_notice"])
def test_a_coordinator_killed_between_a_childs_end_and_its_parent_loses_nothing(
    point: str, procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    procs.worker("probe", app="tests.apps.probe", PROBE_LEDGER=str(ledger))
    doomed = procs.coordinator(PHIBROKER_CRASH_AT=point)
    wf_id = client.submit(files(tmp_path, main=MAIN, child=CHILD))
    assert doomed.wait(timeout=30) == 137, procs.output()
    assert client.status(f"{wf_id}~Sub")["state"] == "succeeded"
    assert client.status(wf_id)["tasks"]["Sub"]["state"] == "running"
    procs.coordinator()
    status = ended(client, wf_id, procs)
    assert status["state"] == "succeeded" and status["output"] == {"got": 7}, procs.output()
    assert [h["applied"] for h in status["tasks"]["Sub"]["history"]] == [True]
    time.sleep(0.5)  # a duplicate notice, had one been applied, would show by now
    events = [e for e in events_of(settings, wf_id) if e["type"] in ("task.succeeded", "workflow.succeeded")]
    assert sorted((e["type"], e["task"]) for e in events) == [
        ("task.succeeded", "First"),
        ("task.succeeded", "Sub"),
        ("workflow.succeeded", None),
    ]
    assert sorted(line.split()[0] for line in ledger_lines(ledger)) == [f"{wf_id}:First", f"{wf_id}~Sub:Work"]


def test_nesting_over_max_depth_fails_the_task(procs: Processes, client: Client, tmp_path: Path) -> None:
    up(procs, PHIBROKER_MAX_DEPTH="1")
    middle = "name: middle\ntasks:\n  Deeper: {workflow: child.yaml}\n"
    top = "name: top\ntasks:\n  Sub: {workflow: middle.yaml}\n"
    status = ended(client, client.submit(files(tmp_path, top=top, middle=middle, child=CHILD)), procs)
    middle_run = client.status(status["tasks"]["Sub"]["child"])
    assert middle_run["tasks"]["Deeper"]["error"] == "sub-workflow runs nest 2 deep, over max_depth 1"
    assert status["state"] == "failed" and status["tasks"]["Sub"]["error"].startswith(
        f"child {middle_run['id']} failed"
    )


def test_a_signed_parent_runs_its_signed_children_under_require_signed(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.spawn("signed-coordinator", "coordinator", "--require-signed")
    procs.worker("probe", app="tests.apps.probe")
    key = signing.generate(settings.home, "stryk")
    inline = "  Inline:\n    workflow: {name: inline, tasks: {Step: {agent: probe, command: noop}}}\n"
    parent = files(tmp_path, main=MAIN + inline, child=CHILD)
    signing.sign_file(key, parent)
    unsigned = ended(client, client.submit(parent), procs)
    assert unsigned["state"] == "failed"
    assert unsigned["error"] == "refused: the sub-workflow child.yaml of task 'Sub' is not signed"
    signing.sign_file(key, tmp_path / "child.yaml")
    signed = ended(client, client.submit(parent), procs)
    assert signed["state"] == "succeeded" and signed["output"] == {"got": 7}, procs.output()
    assert client.status(signed["tasks"]["Inline"]["child"])["state"] == "succeeded"
    (tmp_path / "child.yaml").write_text(CHILD.replace("command: work", "command: noop"))
    tampered = ended(client, client.submit(parent), procs)
    assert tampered["state"] == "failed" and "tampered" in tampered["error"]


def test_a_spawned_workflow_runs_under_require_signed_only_from_a_signed_file(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """What a handler spawns is not covered by its parent's signature: the file it names must be signed."""
    procs.spawn("signed-coordinator", "coordinator", "--require-signed")
    procs.worker("probe", app="tests.apps.probe")
    key = signing.generate(settings.home, "stryk")
    child = files(tmp_path, child=CHILD)

    def delegating(name: str, **payload: Any) -> Path:
        text = f"name: {name}\noutput: ${{tasks.Plan.children.sub.result}}\ntasks:\n"
        text += f"  Plan: {{agent: probe, command: delegate, payload: {json.dumps(payload)}}}\n"
        path = files(tmp_path, **{name: text})
        signing.sign_file(key, path)
        return path

    unsigned = ended(client, client.submit(delegating("unsigned", file=str(child), value=3)), procs)
    assert unsigned["state"] == "failed"
    refusal = "refused: the workflow file is not signed (phibroker sign FILE)"
    assert unsigned["tasks"]["Plan/sub"]["error"].endswith(refusal)
    inline = ended(client, client.submit(delegating("inline", inline=True)), procs)
    assert inline["state"] == "failed" and "not signed" in inline["tasks"]["Plan/sub"]["error"]
    signing.sign_file(key, child)
    signed = ended(client, client.submit(delegating("signed", file=str(child), value=3)), procs)
    assert signed["state"] == "succeeded" and signed["output"] == {"got": 3}, procs.output()
    assert client.status(signed["tasks"]["Plan/sub"]["child"])["parent"] == {"id": signed["id"], "task": "Plan/sub"}
    child.write_text(CHILD.replace("command: work", "command: noop"))  # edited after signing
    tampered = ended(client, client.submit(delegating("tampered", file=str(child), value=3)), procs)
    assert tampered["state"] == "failed" and "tampered" in tampered["tasks"]["Plan/sub"]["error"]


def test_a_child_whose_parent_no_longer_waits_does_not_run(procs: Processes, client: Client, tmp_path: Path) -> None:
    """A coordinator that died between the parent's commit and creating the child leaves that creation to
    a redrive; if the parent was cancelled or ended meanwhile, the child must not run as an orphan."""
    from phibroker import workflow as workflows
    from phibroker.runtime.submission import submission

    up(procs)
    wf_id = client.submit(files(tmp_path, main=MAIN, child=CHILD))
    assert ended(client, wf_id, procs)["state"] == "succeeded"
    late = workflows.load(tmp_path / "child.yaml")
    child_id, fields = submission(late, late.params_with({"value": 1}), f"{wf_id}-Sub-late")
    fields.update(parent=wf_id, parent_task="Sub", nesting=1)
    client.broker.submit_workflow(child_id, fields)
    status = ended(client, child_id, procs)
    assert status["state"] == "failed" and "no longer waits for it" in status["error"]
    assert all(task["attempts"] == 0 for task in status["tasks"].values())
