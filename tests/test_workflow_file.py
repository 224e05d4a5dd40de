"""Workflow files: every invalid file is one clear line and exit 2; valid ones give levels and paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phibroker import workflow
from phibroker.errors import CycleError, UnknownDependencyError, WorkflowFileError
from phibroker.workflow.spec import coerce_param, parse_duration

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))


def check(text: str) -> workflow.Workflow:
    return workflow.check(workflow.decode(text, ".yaml"))


def error_of(text: str) -> str:
    with pytest.raises(WorkflowFileError) as caught:
        check(text)
    message = str(caught.value)
    assert "\n" not in message
    return message


BASE = """
name: w
params: {topic: x, count: 3, flag: false, items: []}
tasks:
  A: {agent: webc, command: research}
  B: {agent: dc, command: synthesize, depends_on: [A]}
"""


def test_a_valid_file_loads_with_its_analysis() -> None:
    wf = check(BASE)
    assert wf.levels == [["A"], ["B"]]
    assert wf.critical_path == (["A", "B"], 2.0)
    assert wf.retry("B").max_attempts == 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(path: Path) -> None:
    assert workflow.load(path).tasks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: w\ntasks: {A: {agent: a, comand: x}}", "task 'A': unknown field 'comand' (did you mean 'command'?)"),
        ("name: w\ntaks: {A: {agent: a, command: x}}", "workflow: unknown field 'taks' (did you mean 'tasks'?)"),
        (
            "name: w\ntasks: {A: {agent: a, command: x, retry: {max_atempts: 2}}}",
            "task 'A': unknown field 'retry.max_atempts' (did you mean 'max_attempts'?)",
        ),
        (
            "name: w\ndefaults: {timeout: 1s, retyr: {}}\ntasks: {A: {agent: a, command: x}}",
            "workflow: unknown field 'defaults.retyr' (did you mean 'retry'?)",
        ),
        (
            "name: w\non: {evnt: x}\ntasks: {A: {agent: a, command: x}}",
            "unknown field 'on.evnt' (did you mean 'event'?)",
        ),
        (
            "name: w\ntasks:\n  A:\n\tagent: a\n    command: x\n",
            "invalid YAML at line 4: tabs are not allowed in YAML indentation, use spaces",
        ),
        (
            "name: w\ntasks:\n  A:\n    agent: a\n  \tcommand: x\n",
            "invalid YAML at line 5: tabs are not allowed in YAML indentation, use spaces",
        ),
        (
            "name: w\ntasks: {A: {agent: a, command: x, depends_on: [Bee]}, Be: {agent: a, command: x}}",
            "depends on unknown task 'Bee' (did you mean 'Be'?)",
        ),
        ("name: w\ntasks:\n  A: {agent: a, command: x}\n  A: {agent: a, command: y}", "duplicate key 'A'"),
        (
            "name: w\ntasks: {A: {agent: a, command: x, depends_on: [B]}, B: {agent: a, command: x, depends_on: [A]}}",
            "dependency cycle: A -> B -> A",
        ),
        ("name: w\ntasks: {A: {agent: a, command: x, timeout: soon}}", "not a duration: 'soon'"),
        ("name: w\ntasks: {A: {agent: a, command: x, when: 'x >'}}", "task 'A': when: bad expression"),
        (
            "name: w\ntasks: {A: {agent: a, command: x, payload: {v: '${tasks.B.result.x}'}},"
            " B: {agent: a, command: x}}",
            "'B' is not upstream of 'A'",
        ),
        (
            "name: w\ntasks: {A: {agent: a, command: x, payload: {v: '${params.nope}'}}}",
            "names no declared param",
        ),
        ("name: w\ntasks: {'bad name': {agent: a, command: x}}", "task 'bad name': a name may only use"),
        ("name: w\ntasks: {A: {agent: 'a b', command: x}}", "task 'A': agent"),
        ("name: w\ntasks: {A: {agent: a}}", "needs `agent` and `command`"),
        ("name: w\ntasks: {}", "workflow: tasks is empty (at least 1 needed)"),
        ("name: w\ntasks: {A: {approval: {message: hi}, agent: a}}", "an approval gate takes no agent"),
        ("name: w\ntasks: {A: {agent: a, command: x, payload: {v: '${oops'}}}", "bad expression"),
        ("name: w\ntasks: [1, 2]", "tasks"),
        ("tasks: {A: {agent: a, command: x}}", "missing field 'name'"),
        ("name: w\ntasks: {A: {agent: a, command: x}\n", "invalid YAML"),
        (
            "name: w\ntasks: {A: {agent: a, command: x, expect: 'result.n > 1 and tasks.A.result.x'}}",
            "'A' is not upstream of 'A'",
        ),
    ],
)
def test_invalid_files_give_one_clear_line(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_an_unknown_field_far_from_any_is_named_without_a_guess() -> None:
    assert error_of("name: w\ntasks: {A: {agent: a, command: x, zzzzzz: 1}}") == "task 'A': unknown field 'zzzzzz'"


def test_a_tab_inside_a_value_is_not_an_indentation_error() -> None:
    wf = check('name: w\ntasks:\n  A: {agent: a, command: x, payload: {text: "a\tb"}}\n')
    assert wf.tasks["A"].payload == {"text": "a\tb"}
    assert "column" in error_of("name: w\ntasks: {A: {agent: a, command: x}\n")  # other errors keep theirs


def test_typed_errors_carry_their_fields() -> None:
    with pytest.raises(CycleError) as cycle:
        check("name: w\ntasks: {A: {agent: a, command: x, depends_on: [A]}}")
    assert cycle.value.path == ["A", "A"]
    with pytest.raises(UnknownDependencyError) as unknown:
        check("name: w\ntasks: {A: {agent: a, command: x, depends_on: [Z]}}")
    assert (unknown.value.task, unknown.value.missing) == ("A", "Z")


def test_json_files_with_duplicate_keys_are_refused() -> None:
    text = '{"name": "w", "tasks": {"A": {"agent": "a", "command": "x"}, "A": {"agent": "a", "command": "y"}}}'
    with pytest.raises(WorkflowFileError, match="duplicate key 'A'"):
        workflow.decode(text, ".json")


def test_retry_policy_merges_defaults_then_task() -> None:
    wf = check(
        "name: w\ndefaults: {retry: {max_attempts: 2, base_delay: 2s}}\n"
        "tasks: {A: {agent: a, command: x, retry: {base_delay: 500ms}}}"
    )
    policy = wf.retry("A")
    assert (policy.max_attempts, policy.base_delay, policy.max_delay) == (2, 0.5, 60.0)


def test_param_overrides_are_typed_from_defaults() -> None:
    wf = check(BASE)
    assert wf.parse_overrides(["count=7", "flag=yes", 'items=["a", 1]', "topic=GraphQL"]) == {
        "count": 7,
        "flag": True,
        "items": ["a", 1],
        "topic": "GraphQL",
    }
    with pytest.raises(WorkflowFileError, match="unknown param 'topc' \\(did you mean 'topic'\\?\\)"):
        wf.parse_overrides(["topc=x"])
    with pytest.raises(WorkflowFileError, match="wants an integer"):
        wf.parse_overrides(["count=many"])
    with pytest.raises(ValueError, match="JSON list"):
        coerce_param("items", '{"a": 1}', [])


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("10s", 10), ("10m", 600), ("2h", 7200), (3, 3)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60)


def test_validate_json_and_exit_codes(tmp_path: Path) -> None:
    good = run_cli("validate", "--json", str(EXAMPLES[0].parent / "complete-dag.yaml"))
    assert good.returncode == 0, good.stderr
    doc = json.loads(good.stdout)
    assert doc["levels"][2] == ["ImplementAPI", "ImplementUI"]
    assert doc["critical_path"] == ["Research", "Synthesize", "ImplementUI", "SecurityAudit", "Deploy"]
    assert doc["length"] == 30 + 20 + 180 + 60 + 20
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: w\ntasks: {A: {agent: a, command: x, depends_on: [A]}}\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: dependency cycle: A -> A"
    missing = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_validate_names_a_misspelt_field_and_a_tab(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: w\ntasks:\n  Research:\n    agent: webc\n    comand: research\n")
    result = run_cli("validate", str(typo))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: task 'Research': unknown field 'comand' (did you mean 'command'?)\n"
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("name: w\ntasks:\n  Research:\n\tagent: webc\n\tcommand: research\n")
    result = run_cli("validate", str(tabs))
    assert result.returncode == 2
    assert result.stderr == "error: invalid YAML at line 4: tabs are not allowed in YAML indentation, use spaces\n"


def test_graph_formats() -> None:
    path = str(EXAMPLES[0].parent / "parallel-research.yaml")
    dot = run_cli("graph", path)
    assert dot.returncode == 0 and '"ResearchSecurity" -> "Synthesize"' in dot.stdout
    mermaid = run_cli("graph", "--format", "mermaid", path)
    assert mermaid.returncode == 0 and "ResearchSecurity --> Synthesize" in mermaid.stdout
