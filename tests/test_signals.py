"""Signal gates: a run waits for something outside — CI, a person, another run — and
`phibroker signal ID NAME --data JSON`, `Client.signal` or a handler's `ctx.signal` wakes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from phibroker import Agent
from phibroker.runtime.client import Client
from phibroker.testing import Simulation
from tests.conftest import Processes, until

WAIT_FOR_CI = {
    "name": "wait-for-ci",
    "tasks": {
        "Build": {"agent": "w", "command": "ok"},
        "CI": {"signal": {"name": "ci-done", "timeout": "30m"}, "depends_on": ["Build"]},
        "Ship": {"agent": "w", "command": "ok", "depends_on": ["CI"]},
    },
}


def agent() -> Agent:
    w = Agent("w")

    @w.command("ok")
    def ok(ctx: Any) -> dict[str, Any]:
        return {"inputs": ctx.inputs}

    return w


def test_a_gate_waits_for_its_signal_and_takes_its_data() -> None:
    sim = Simulation(WAIT_FOR_CI, [agent()])
    doc = sim.run()
    assert doc["state"] == "running" and doc["tasks"]["CI"]["waiting_for"] == "signal ci-done"
    doc = sim.signal("ci-done", {"green": True})
    assert doc["state"] == "succeeded" and doc["tasks"]["CI"]["result"] == {"green": True}
    assert doc["tasks"]["Ship"]["result"] == {"inputs": {"CI": {"green": True}}}


def test_signals_that_come_early_are_kept_in_order_for_the_gates_of_that_name() -> None:
    spec = {
        "name": "two-waits",
        "tasks": {
            "Gate": {"approval": {"message": "go?"}},
            "First": {"signal": {"name": "step"}, "depends_on": ["Gate"]},
            "Second": {"signal": {"name": "step"}, "depends_on": ["First"]},
        },
    }
    sim = Simulation(spec, [agent()])
    sim.run()
    sim.signal("step", 1)
    sim.signal("step", 2)
    assert "signal.kept" in sim.event_types()
    doc = sim.approve("Gate")
    assert doc["state"] == "succeeded"
    assert (doc["tasks"]["First"]["result"], doc["tasks"]["Second"]["result"]) == (1, 2)


def test_a_gate_whose_signal_never_comes_times_out() -> None:
    sim = Simulation(WAIT_FOR_CI, [agent()])
    sim.run()
    assert sim.advance(29 * 60)["state"] == "running"
    doc = sim.advance(2 * 60)
    assert doc["state"] == "failed" and doc["tasks"]["CI"]["error"] == "timeout"
    assert doc["tasks"]["Ship"]["state"] == "upstream_failed"


def test_a_handler_signals_with_its_applied_result_only() -> None:
    w, tries = agent(), []

    @w.command("report")
    def report(ctx: Any) -> str:
        tries.append(ctx.attempt)
        ctx.signal(ctx.workflow_id, "ci-done", {"attempt": ctx.attempt})
        if ctx.attempt == 1:
            raise ConnectionError("unavailable")  # retried by default; its signal is not sent
        return "reported"

    spec = {
        "name": "self",
        "tasks": {
            "Report": {"agent": "w", "command": "report", "retry": {"base_delay": "10ms"}},
            "CI": {"signal": {"name": "ci-done"}},
            "Later": {"signal": {"name": "ci-done", "timeout": "1m"}, "depends_on": ["CI"]},
        },
    }
    sim = Simulation(spec, [w])
    doc = sim.run()
    assert tries == [1, 2]
    assert doc["tasks"]["CI"]["result"] == {"attempt": 2}
    assert doc["tasks"]["Later"]["waiting_for"] == "signal ci-done"  # one signal was sent, not two
    assert sim.advance(120)["tasks"]["Later"]["error"] == "timeout"


def phibroker(procs: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60, env=procs.env()
    )


def test_phibroker_signal_on_real_processes(procs: Processes, client: Client, tmp_path: Path) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    path = tmp_path / "ci.yaml"
    path.write_text(
        "name: ci\ntasks:\n  CI: {signal: {name: ci-done, timeout: 10m}}\n"
        "  Ship: {agent: probe, command: work, depends_on: [CI]}\n"
    )
    wf_id = client.submit(path)
    until(lambda: client.status(wf_id)["tasks"]["CI"].get("waiting_for") == "signal ci-done", procs)

    bad = phibroker(procs, "signal", wf_id, "ci-done", "--data", "{green")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not JSON" in bad.stderr
    unknown = phibroker(procs, "signal", "no-such-run", "ci-done")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1

    sent = phibroker(procs, "signal", wf_id, "ci-done", "--data", '{"green": true}', "--json")
    assert sent.returncode == 0 and json.loads(sent.stdout) == {"id": wf_id, "signal": "ci-done", "ok": True}
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded", procs.output()
    assert status["tasks"]["CI"]["result"] == {"green": True}

    ended = phibroker(procs, "signal", wf_id, "ci-done")
    assert ended.returncode == 2 and "has already ended" in ended.stderr
