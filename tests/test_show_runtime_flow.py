"""Showing what unfolds at run time: `validate` and `graph` draw loops, signal gates
and sub-workflows; `status`, `watch` and `why` tell iterations, spawned children, what a gate waits
for, a child run, an upstream failure and a run that is cancelling. Through the CLI, on real processes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.workflow.render import STATE_COLOURS
from tests.conftest import Processes, until
from tests.test_core import cli

REVIEW = """
name: review
params: {text: ""}
output: "${tasks.Judge.result.value}"
tasks:
  Lint: {agent: probe, command: work}
  Judge: {agent: probe, command: work, payload: {value: "${params.text}"}, depends_on: [Lint]}
"""

MAIN = """
name: write-and-ship
output: "${tasks.CI.result}"
tasks:
  Draft:
    agent: probe
    command: work
    loop: {until: "iteration >= 3", max_iterations: 5}
  Review:
    workflow: review.yaml
    params: {text: "looks good"}
    depends_on: [Draft]
  Plan: {agent: probe, command: spawner, payload: {children: 2}, depends_on: [Review]}
  CI:
    signal: {name: ci-done, timeout: 10m}
    depends_on: [Plan]
  Ship: {agent: probe, command: work, depends_on: [CI]}
"""


def write_flow(tmp_path: Path) -> Path:
    (tmp_path / "review.yaml").write_text(REVIEW)
    path = tmp_path / "main.yaml"
    path.write_text(MAIN)
    return path


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def line_of(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


# -- a workflow file -------------------------------------------------------------------------------


def test_validate_names_loops_signal_gates_and_sub_workflows(settings: Settings, tmp_path: Path) -> None:
    path = write_flow(tmp_path)
    out = ok(cli(settings, "validate", str(path)))
    assert "loops: Draft (until iteration >= 3, at most 5 iterations)" in out.splitlines()
    assert "signal gates: CI (ci-done)" in out.splitlines()
    assert "sub-workflows: Review (review, 2 tasks)" in out.splitlines()
    doc = json.loads(ok(cli(settings, "validate", "--json", str(path))))
    assert set(doc) == {"levels", "critical_path", "length", "tasks", "warnings"}

    plain = tmp_path / "plain.yaml"
    plain.write_text("name: plain\ntasks:\n  A: {agent: probe, command: work}\n")
    assert not re.search(r"^(loops|signal gates|sub-workflows):", ok(cli(settings, "validate", str(plain))), re.M)


def test_graph_of_a_file_draws_a_loop_a_signal_gate_and_a_sub_workflow(settings: Settings, tmp_path: Path) -> None:
    path = str(write_flow(tmp_path))
    dot = ok(cli(settings, "graph", path)).splitlines()
    assert '    "Draft" -> "Draft" [label="until iteration >= 3 · max 5", style=bold];' in dot
    assert '    "CI" [label="CI\\nsignal: ci-done", shape=cds];' in dot
    cluster = dot.index('    subgraph "cluster_Review" {')
    assert dot[cluster + 1 : cluster + 7] == [
        '        label="workflow review";',
        "        style=dashed;",
        '        "Review" [label="Review\\nworkflow: review.yaml"];',
        '        "Review::Lint" [label="Lint\\nprobe · work"];',
        '        "Review::Judge" [label="Judge\\nprobe · work"];',
        "    }",
    ]
    assert '    "Review" -> "Review::Lint" [style=dotted];' in dot
    assert '    "Review::Lint" -> "Review::Judge";' in dot
    assert '    "Review" -> "Plan";' in dot and '    "CI" -> "Ship";' in dot

    mermaid = ok(cli(settings, "graph", "--format", "mermaid", path)).splitlines()
    assert '    CI{{"CI<br/>signal: ci-done"}}' in mermaid
    assert '    Draft -->|"until iteration #gt;= 3 · max 5"| Draft' in mermaid
    start = mermaid.index('    subgraph Review__ ["workflow review"]')
    assert mermaid[start + 1 : start + 5] == [
        '        Review["Review<br/>workflow: review.yaml"]',
        '        Review__Lint["Lint<br/>probe · work"]',
        '        Review__Judge["Judge<br/>probe · work"]',
        "    end",
    ]
    assert "    Review -.- Review__Lint" in mermaid and "    Review__Lint --> Review__Judge" in mermaid


# -- a run -----------------------------------------------------------------------------------------


def test_a_run_waiting_on_its_signal_shows_iterations_children_the_gate_and_its_child_run(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    wf_id = client.submit(write_flow(tmp_path))
    until(lambda: client.status(wf_id)["tasks"]["CI"].get("waiting_for") == "signal ci-done", procs)
    child = client.status(wf_id)["tasks"]["Review"]["child"]
    assert child and client.status(child)["state"] == "succeeded"

    status = ok(cli(settings, "status", wf_id))
    assert "iteration 3/5" in line_of(status, "  Draft ")
    assert f"child run {child}" in line_of(status, "  Review ")
    plan = line_of(status, "  Plan ")
    assert "spawned 2" in plan
    lines = status.splitlines()
    below = lines[lines.index(plan) + 1 : lines.index(plan) + 3]
    assert [line.split()[0] for line in below] == ["Plan/c0", "Plan/c1"]
    assert all(line.startswith("    Plan/c") and "succeeded" in line for line in below)
    gate = line_of(status, "  CI ")
    assert "running" in gate and " signal " in gate and "waiting for signal ci-done" in gate
    assert "output:" not in status  # not set until the run succeeds

    why = ok(cli(settings, "why", wf_id)).splitlines()
    gate_line = line_of("\n".join(why), "CI ")
    assert gate_line.startswith(f"CI waits for signal ci-done: phibroker signal {wf_id} ci-done --data '...'")
    assert "; times out at " in gate_line

    dot = ok(cli(settings, "graph", wf_id)).splitlines()
    running = STATE_COLOURS["running"]
    assert f'    "CI" [label="CI\\nsignal: ci-done\\nrunning", fillcolor="{running}", shape=cds];' in dot
    assert '    "Draft" -> "Draft" [label="until iteration >= 3 · max 5", style=bold];' in dot
    done = STATE_COLOURS["succeeded"]
    assert f'        "Review::Judge" [label="Judge\\nprobe · work\\nsucceeded", fillcolor="{done}"];' in dot
    assert f'    "Plan/c1" [label="Plan/c1\\nprobe\\nsucceeded", fillcolor="{done}"];' in dot
    assert '    "Plan" -> "Plan/c0" [style=dashed, label="spawned"];' in dot
    mermaid = ok(cli(settings, "graph", "--format", "mermaid", wf_id)).splitlines()
    assert '    CI{{"CI<br/>signal: ci-done<br/>running"}}' in mermaid
    assert "    class CI running" in mermaid

    frame = ok(cli(settings, "watch", "--workflow", wf_id, "--once"))
    assert re.search(r"^Draft +succeeded +iteration 3/5", frame, re.M), frame
    assert re.search(r"^CI +running +waiting for signal ci-done", frame, re.M), frame
    assert re.search(r"^Plan +succeeded +spawned 2", frame, re.M), frame
    assert re.search(r"^  Plan/c0 +succeeded", frame, re.M), frame
    assert re.search(rf"^Review +succeeded +child run {re.escape(child)}", frame, re.M), frame

    ok(cli(settings, "signal", wf_id, "ci-done", "--data", '{"green": true}'))
    assert client.wait(wf_id, timeout=30)["state"] == "succeeded", procs.output()
    status = ok(cli(settings, "status", wf_id))
    assert status.splitlines()[-1] == 'output: {"green": true}'
    assert "waiting for" not in status


BROKEN = """
name: broken
tasks:
  Bad: {agent: probe, command: fail, retry: {max_attempts: 1}}
  Next: {agent: probe, command: work, depends_on: [Bad]}
  Last: {agent: probe, command: work, depends_on: [Next]}
"""


def test_an_upstream_failure_is_named_by_why_status_and_graph(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    (tmp_path / "broken.yaml").write_text(BROKEN)
    wf_id = client.submit(tmp_path / "broken.yaml")
    assert client.wait(wf_id, timeout=30)["state"] == "failed", procs.output()

    why = ok(cli(settings, "why", wf_id)).splitlines()
    assert "Next is upstream_failed (never ran): Bad failed: ValueError: boom" in why
    assert "Last is upstream_failed (never ran): Bad failed: ValueError: boom" in why
    status = ok(cli(settings, "status", wf_id))
    assert "upstream_failed" in line_of(status, "  Last ")
    dot = ok(cli(settings, "graph", wf_id)).splitlines()
    colour = STATE_COLOURS["upstream_failed"]
    assert f'    "Last" [label="Last\\nprobe · work\\nupstream_failed", fillcolor="{colour}"];' in dot


SLOW = """
name: slow
tasks:
  Slow: {agent: probe, command: stubborn, payload: {sleep: 120}}
  After: {agent: probe, command: work, depends_on: [Slow]}
"""


def test_a_cancelling_run_names_the_tasks_it_waits_to_stop_and_when_its_grace_ends(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator(PHIBROKER_CANCEL_GRACE="3600")  # the run stays cancelling while the test looks
    procs.worker("probe", app="tests.apps.probe")
    (tmp_path / "slow.yaml").write_text(SLOW)
    wf_id = client.submit(tmp_path / "slow.yaml")
    until(lambda: client.status(wf_id)["tasks"]["Slow"]["started_at"], procs)
    client.cancel(wf_id, "changed my mind")
    until(lambda: client.status(wf_id)["tasks"]["Slow"].get("stopping"), procs)  # it ignores the stop

    why = ok(cli(settings, "why", wf_id)).splitlines()
    assert why[0].startswith(f"{wf_id} (slow) is cancelling:")
    cancelling = line_of("\n".join(why), "cancelling (")
    assert cancelling.startswith("cancelling (changed my mind): waits for Slow to stop; cancel_grace ends at ")
    assert cancelling.endswith(", then they count as cancelled") and re.search(r"\(in \d+m\d\ds\)", cancelling)
    assert line_of("\n".join(why), "Slow ").endswith("; asked to stop: changed my mind")

    status = ok(cli(settings, "status", wf_id))
    assert status.splitlines()[0].startswith(f"{wf_id} (slow): cancelling")
    assert "stopping: changed my mind" in line_of(status, "  Slow ")
    dot = ok(cli(settings, "graph", wf_id)).splitlines()
    colour = STATE_COLOURS["cancelling"]
    assert f'    "Slow" [label="Slow\\nprobe · stubborn\\ncancelling", fillcolor="{colour}"];' in dot
