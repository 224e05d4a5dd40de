"""`phibroker graph ID`: the DAG of a run, each task drawn in the colour of its state, from the CLI."""

from __future__ import annotations

from pathlib import Path

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.workflow.dag import STATE_COLOURS
from tests.conftest import Processes, until
from tests.test_core import cli
from tests.test_failures import flow

MIXED = """
name: mixed
failure: best_effort
tasks:
  A: {agent: probe, command: work}
  B: {agent: probe, command: fail, depends_on: [A], retry: {max_attempts: 1}}
  C: {agent: probe, command: work, depends_on: [B]}
  D: {agent: probe, command: noop, depends_on: [A]}
"""


def dot_node(task: str, label: str, state: str) -> str:
    return f'    "{task}" [label="{task}\\n{label}\\n{state}", fillcolor="{STATE_COLOURS[state]}"];'


def test_graph_of_a_run_shows_each_task_state_while_it_runs_and_once_it_ended(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator()
    wf_id = client.submit(flow(tmp_path, MIXED))
    until(lambda: client.status(wf_id)["tasks"]["A"]["state"] == "ready", procs)  # no worker yet

    waiting = cli(settings, "graph", wf_id)
    assert waiting.returncode == 0, waiting.stderr
    assert dot_node("A", "probe · work", "ready") in waiting.stdout.splitlines()
    assert dot_node("B", "probe · fail", "pending") in waiting.stdout.splitlines()
    assert '    "A" -> "B";' in waiting.stdout.splitlines()

    procs.worker("probe", app="tests.apps.probe")
    status = client.wait(wf_id, timeout=30)
    states = {name: task["state"] for name, task in status["tasks"].items()}
    assert states["A"] == states["D"] == "succeeded" and states["B"] == "failed", procs.output()

    dot = cli(settings, "graph", "--format", "dot", wf_id)
    assert dot.returncode == 0, dot.stderr
    lines = dot.stdout.splitlines()
    assert lines[0] == 'digraph "mixed" {'
    labels = {"A": "probe · work", "B": "probe · fail", "C": "probe · work", "D": "probe · noop"}
    for task, state in states.items():
        assert dot_node(task, labels[task], state) in lines

    mermaid = cli(settings, "graph", "--format", "mermaid", wf_id)
    assert mermaid.returncode == 0, mermaid.stderr
    lines = mermaid.stdout.splitlines()
    assert '    B["B<br/>probe · fail<br/>failed"]' in lines
    assert "    A --> D" in lines
    assert f"    classDef succeeded fill:{STATE_COLOURS['succeeded']},stroke:#495057" in lines
    assert "    class A,D succeeded" in lines
    assert "    class B failed" in lines
    assert f"    class C {states['C']}" in lines


def test_graph_of_an_unknown_id_is_one_line_and_exit_2(settings: Settings) -> None:
    result = cli(settings, "graph", "no-such-run")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: 'no-such-run' is neither a workflow file nor the id of a run\n"


def test_graph_of_a_missing_file_names_the_file_without_asking_a_broker(settings: Settings, tmp_path: Path) -> None:
    unreachable = "redis://127.0.0.1:1/0"
    missing = cli(settings, "graph", str(tmp_path / "nope.yaml"), url=unreachable)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "nope.yaml" in missing.stderr and "No such file" in missing.stderr
    run_id = cli(settings, "graph", "some-run", url=unreachable)
    assert run_id.returncode == 3 and run_id.stderr.count("\n") == 1 and "Traceback" not in run_id.stderr


def test_graph_of_a_file_still_draws_no_states(tmp_path: Path, settings: Settings) -> None:
    result = cli(settings, "graph", str(flow(tmp_path, MIXED)))
    assert result.returncode == 0, result.stderr
    assert '    "B" [label="B\\nprobe · fail"];' in result.stdout.splitlines()
    assert "fillcolor" not in result.stdout
