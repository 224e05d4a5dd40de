"""`phibroker triggers add` refuses a workflow whose `on:` would start it again on its own events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phibroker.settings import Settings

FLOW = """
name: notify
on: {{event: "{event}"{where}}}
tasks:
  Build: {{agent: probe, command: work}}
  {gate}
"""
GATE = "Approve: {approval: {message: ok?}, depends_on: [Build]}"


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PHIBROKER_REDIS_URL": settings.redis_url, "PHIBROKER_NAMESPACE": settings.namespace}
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60, env=env
    )


def add(
    settings: Settings, tmp_path: Path, event: str, where: str = "", gate: bool = False
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "notify.yaml"
    path.write_text(
        FLOW.format(event=event, where=f", where: {json.dumps(where)}" if where else "", gate=GATE if gate else "")
    )
    return cli(settings, "triggers", "add", str(path))


def registered(settings: Settings) -> list[str]:
    listed = cli(settings, "triggers", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return [row["name"] for row in json.loads(listed.stdout)]


@pytest.mark.parametrize(
    ("event", "gate"),
    [("workflow.*", False), ("task.*", False), ("workflow.succeeded", False), ("*", False), ("approval.*", True)],
)
def test_a_trigger_on_its_own_events_without_where_is_refused(
    settings: Settings, tmp_path: Path, event: str, gate: bool
) -> None:
    done = add(settings, tmp_path, event, gate=gate)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: notify: `on: {event}` matches events its own runs publish")
    assert "where" in line and "Traceback" not in done.stderr
    assert registered(settings) == []


@pytest.mark.parametrize(
    ("event", "where", "gate"),
    [
        ("workflow.succeeded", "data.name != 'notify'", False),  # a `where` that leaves its own runs out
        ("scan.finished", "", False),  # a type only handlers emit
        ("approval.granted", "", False),  # a gate's event, and this file has no gate
    ],
)
def test_other_triggers_are_registered(settings: Settings, tmp_path: Path, event: str, where: str, gate: bool) -> None:
    done = add(settings, tmp_path, event, where, gate)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "trigger notify registered"
    assert registered(settings) == ["notify"]
