"""cmdc: run_tests (success, failure, timeout, cancellation), log analysis and merge, deploy/rollback, start_ci."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from phibroker import wire
from phibroker.runtime.agent import Context
from workers import cmdc


def ctx(result: Any = None, inputs: dict[str, Any] | None = None, command: str = "run_tests") -> Context:
    return Context(
        workflow_id="wf",
        task="T",
        unit="T",
        attempt=1,
        agent="cmdc",
        command=command,
        result=result,
        inputs=inputs or {},
    )


def test_run_tests_default_runs_nothing_harmful() -> None:
    result = cmdc.run_tests(ctx(), suite="regression")
    assert result["passed"] is True and result["exit_code"] == 0
    assert "suite 'regression': no command given" in result["output_tail"]


def test_run_tests_keeps_the_last_40_lines(tmp_path: Path) -> None:
    script = "for i in range(100): print(i)"
    result = cmdc.run_tests(ctx(), command=[sys.executable, "-c", script], cwd=str(tmp_path))
    assert result["output_tail"].splitlines() == [str(i) for i in range(60, 100)]
    assert result["duration"] >= 0


def test_run_tests_takes_a_string_but_uses_no_shell(tmp_path: Path) -> None:
    result = cmdc.run_tests(ctx(), command=f"{sys.executable} -c 'print(1)' ; echo hacked")
    assert "hacked" not in result["output_tail"]


def test_run_tests_non_zero_exit_fails_with_code_and_tail() -> None:
    script = "import sys; print('boom happened'); sys.exit(3)"
    with pytest.raises(cmdc.CommandFailed, match=r"exited with code 3\n.*boom happened"):
        cmdc.run_tests(ctx(), command=[sys.executable, "-c", script])


def test_run_tests_timeout_stops_the_command() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 0.3s"):
        cmdc.run_tests(ctx(), command=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3)
    assert time.monotonic() - started < 10


def test_run_tests_cancellation_from_another_thread(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    script = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    context = ctx()

    def cancel_once_started() -> None:
        while not marker.exists():
            time.sleep(0.02)
        context.cancelled.set()

    threading.Thread(target=cancel_once_started, daemon=True).start()
    with pytest.raises(InterruptedError, match="cancelled"):
        cmdc.run_tests(context, command=[sys.executable, "-c", script])
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_run_tests_outcome_via_execute() -> None:
    outcome = cmdc.agent.execute(
        "run_tests", ctx(), {"command": [sys.executable, "-c", "raise SystemExit(1)"]}, 1 << 20
    )
    assert not outcome.ok and outcome.error is not None and outcome.error["type"] == "CommandFailed"


LOGS = [
    "2024-01-01 10:00:01 INFO started",
    "2024-01-01 10:00:02 ERROR connection to db-3 failed after 30s",
    "2024-01-01 10:00:03 warn: slow query 120ms",
    "2024-01-01 10:00:04 [error] connection to db-7 failed after 10s",
    "2024-01-01 10:00:05 WARNING disk 91% full\n2024-01-01 10:00:06 Error: timeout 5",
    "no level here, terrorism is not a level",
]


def test_analyze_logs_counts_levels_and_normalises_messages() -> None:
    result = cmdc.analyze_logs(ctx(command="analyze_logs"), items=LOGS)
    assert result == {
        "lines": 7,
        "errors": 3,
        "warnings": 2,
        "unique_errors": {"connection to db-N failed after Ns": 2, "timeout N": 1},
    }


def test_analyze_logs_without_items() -> None:
    assert cmdc.analyze_logs(ctx(command="analyze_logs")) == {
        "lines": 0,
        "errors": 0,
        "warnings": 0,
        "unique_errors": {},
    }


def test_merge_log_counts_adds_partitions() -> None:
    parts = [cmdc.analyze_logs(ctx(command="analyze_logs"), items=LOGS[:3]), cmdc.analyze_logs(ctx(), items=LOGS[3:])]
    merged = cmdc.merge_log_counts(parts)
    assert merged == cmdc.analyze_logs(ctx(), items=LOGS)
    assert cmdc.merge_logs(ctx(inputs={"Analyze": parts, "Other": {"x": 1}}, command="merge_logs")) == merged


def test_merge_keeps_the_top_20() -> None:
    parts = [{"lines": 1, "errors": 1, "warnings": 0, "unique_errors": {f"e{i}": i + 1}} for i in range(30)]
    merged = cmdc.merge_log_counts(parts)
    assert merged["errors"] == 30 and len(merged["unique_errors"]) == 20 and "e29" in merged["unique_errors"]


def test_read_logs_synthetic_is_deterministic_small_and_mixed() -> None:
    result = cmdc.read_logs(ctx(command="read_logs"), lines=10_000, seed=7)
    lines = result["lines"]
    assert result["count"] == len(lines) == 10_000
    assert cmdc.read_logs(ctx(command="read_logs"))["lines"] == lines  # the defaults: 10,000 lines, seed 7
    assert cmdc.read_logs(ctx(command="read_logs"), seed=8)["lines"] != lines
    assert len(wire.pack(result)) < 800_000  # it travels as a result, and again as the inputs of each partition
    levels = Counter(line.split()[2] for line in lines)
    assert set(levels) == {"INFO", "WARN", "ERROR"} and levels["INFO"] > levels["WARN"] > levels["ERROR"] > 100
    stamps = [line.split()[0] for line in lines]
    assert stamps == sorted(stamps) and stamps[0].startswith("2025-03-14T09:00")
    analysed = cmdc.analyze_logs(ctx(command="analyze_logs"), items=lines)
    assert (analysed["errors"], analysed["warnings"]) == (levels["ERROR"], levels["WARN"])
    assert 3 <= len(analysed["unique_errors"]) <= 10  # a handful of recurring messages, numbers varying


def test_read_logs_partitions_merge_to_the_whole() -> None:
    lines = cmdc.read_logs(ctx(command="read_logs"), lines=1000, seed=1)["lines"]
    parts = [cmdc.analyze_logs(ctx(command="analyze_logs"), items=lines[i::4]) for i in range(4)]
    assert cmdc.merge_log_counts(parts) == cmdc.analyze_logs(ctx(command="analyze_logs"), items=lines)
    assert cmdc.read_logs(ctx(command="read_logs"), lines=0) == {
        "lines": [],
        "count": 0,
        "source": "synthetic (seed 7)",
    }
    with pytest.raises(ValueError, match="lines must be 0 or more"):
        cmdc.read_logs(ctx(command="read_logs"), lines=-1)


def test_read_logs_from_a_file_keeps_its_lines(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("boot\r\nERROR disk full\nWARN slow\n\nlast line without newline", encoding="utf-8")
    result = cmdc.read_logs(ctx(command="read_logs"), path=str(log))
    assert result["lines"] == ["boot", "ERROR disk full", "WARN slow", "", "last line without newline"]
    assert result["count"] == 5 and result["source"] == str(log.resolve())
    assert cmdc.read_logs(ctx(command="read_logs"), path=str(log), lines=2)["lines"] == ["boot", "ERROR disk full"]
    with pytest.raises(FileNotFoundError):
        cmdc.read_logs(ctx(command="read_logs"), path=str(tmp_path / "missing.log"))


def live(folder: Path) -> str:
    return os.readlink(folder / "current")


def test_deploy_twice_then_rollback_restores_the_first(tmp_path: Path) -> None:
    target = tmp_path / "site"
    first = cmdc.deploy(ctx(command="deploy"), release="api-1111", target=str(target))
    assert first["previous"] is None and first["path"] == str(target / "releases" / "api-1111")
    assert (target / "releases" / "api-1111" / "RELEASE").read_text().startswith("api-1111\n")
    second = cmdc.deploy(ctx(command="deploy"), release="api-2222", target=str(target), environment="production")
    assert second["previous"] == "api-1111" and second["environment"] == "production"
    assert live(target) == "releases/api-2222" and (target / "current" / "RELEASE").exists()
    assert cmdc.rollback(ctx(result=second, command="rollback")) == {"restored": "api-1111", "changed": True}
    assert live(target) == "releases/api-1111"
    assert cmdc.rollback(ctx(result=second, command="rollback"))["changed"] is False
    assert live(target) == "releases/api-1111"
    assert cmdc.rollback(ctx(result=first, command="rollback")) == {"restored": None, "changed": True}
    assert not (target / "current").exists() and not (target / "current").is_symlink()
    assert cmdc.rollback(ctx(result=first, command="rollback"))["changed"] is False
    assert sorted(p.name for p in target.iterdir()) == ["releases"]


def test_rollback_leaves_a_later_deploy_alone(tmp_path: Path) -> None:
    first = cmdc.deploy(ctx(), release="a", target=str(tmp_path))
    cmdc.deploy(ctx(), release="b", target=str(tmp_path))
    result = cmdc.rollback(ctx(result=first))
    assert result["changed"] is False and result["live"] == "b" and live(tmp_path) == "releases/b"


def test_deploy_defaults_to_the_workspace_and_an_input_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIBROKER_WORKSPACE", str(tmp_path))
    result = cmdc.deploy(ctx(inputs={"Build": {"release": "ui-abcdef12"}}, command="deploy"))
    assert result["current"] == str(tmp_path / "deploy" / "staging" / "current")
    assert result["release"] == "ui-abcdef12"


def test_deploy_without_a_release_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a `release`"):
        cmdc.deploy(ctx(command="deploy"), workspace=str(tmp_path))


def test_rollback_without_a_result_does_nothing() -> None:
    assert cmdc.rollback(ctx(command="rollback")) == {"restored": None, "changed": False}


def test_start_ci_queues_a_build_and_says_how_to_report_it(tmp_path: Path) -> None:
    context = ctx(inputs={"Build": {"release": "ui-abcdef12"}}, command="start_ci")
    result = cmdc.start_ci(context, workspace=str(tmp_path))
    assert result["status"] == "queued" and result["release"] == "ui-abcdef12" and result["signal"] == "ci-done"
    assert (
        result["build"].startswith("ci-")
        and result["build"] == cmdc.start_ci(context, workspace=str(tmp_path))["build"]
    )
    assert (
        result["notify"] == f'phibroker signal wf ci-done --data \'{{"build": "{result["build"]}", "passed": true}}\''
    )
    request = json.loads(Path(result["request"]).read_text(encoding="utf-8"))
    assert Path(result["request"]).parent == tmp_path / "ci" / "queue" and request["workflow"] == "wf"
    other = cmdc.start_ci(ctx(command="start_ci"), release="ui-abcdef13", workspace=str(tmp_path))
    assert other["build"] != result["build"]  # another release, another build
    assert sorted(p.name for p in (tmp_path / "ci" / "queue").iterdir()) == sorted(
        f"{b}.json" for b in (result["build"], other["build"])
    )


def test_start_ci_without_a_release_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="start_ci needs a `release`"):
        cmdc.start_ci(ctx(command="start_ci"), workspace=str(tmp_path))
