"""What a user waits for: `submit --wait` naming what only they can give (a worker, a decision), `why`
on a silent worker, attempts that count reclaims, JSON from the deciding commands, colour on a terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from phibroker.cli import main
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.tools.diagnose import Facts, explain
from phibroker.tools.watch import plan_of
from tests.conftest import Processes, until

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def phibroker(procs: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    """The `phibroker` command as a user types it, on the test's broker and namespace."""
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60, env=procs.env()
    )


def flow(tmp_path: Path, text: str) -> str:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    return str(path)


def coordinator_up(procs: Processes, client: Client) -> None:
    """A coordinator, once it holds its lease: a submit made now is taken at once."""
    procs.coordinator()
    until(lambda: client.broker.leases(client.settings.keys.coordinators)[1], procs)


class Background:
    """A `phibroker` process whose stderr is read line by line while it runs."""

    def __init__(self, procs: Processes, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "phibroker", *args],
            env=procs.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.started.append(self.process)  # type: ignore[arg-type]
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def finish(self) -> tuple[int, str, list[str]]:
        stdout, _ = self.process.communicate(timeout=60)
        self.reader.join(timeout=10)
        return self.process.returncode, stdout, self.lines


# -- submit --wait -------------------------------------------------------------------------------------


def test_submit_wait_names_an_agent_without_a_worker_once_and_stops_at_its_timeout(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    coordinator_up(procs, client)
    procs.worker("probe", app="tests.apps.probe")
    until(lambda: "probe" in client.live_agents(), procs)
    path = flow(
        tmp_path,
        "name: orphan\ntasks:\n  Served: {agent: probe, command: work, payload: {sleep: 60}}\n"
        "  Orphan: {agent: ghost, command: anything}\n  Later: {agent: ghost, command: anything}\n",
    )
    result = phibroker(procs, "submit", path, "--wait", "--timeout", "4s", "--json")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    told = [line for line in lines if "ghost" in line]  # said once: at the submit, not again while waiting
    assert len(told) == 1 and "no live worker" in told[0] and "phibroker worker --agent ghost" in told[0], lines
    assert not any("agent probe" in line for line in lines), lines  # probe has a live worker
    assert lines[-1].startswith("stopped waiting; the run goes on"), lines
    status = json.loads(result.stdout)  # --json: still the status document, of a run that goes on
    assert status["state"] == "running" and status["tasks"]["Orphan"]["state"] == "ready"
    assert client.status(status["id"])["state"] == "running"


GATES = """
name: gates
tasks:
  Ship: {approval: {message: "ship?", timeout: 1h}}
  Announce: {approval: {message: "announce?", timeout: 1h}}
"""


def test_submit_wait_prints_each_approval_with_the_commands_that_decide_it(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    coordinator_up(procs, client)
    waiting = Background(procs, "submit", flow(tmp_path, GATES), "--wait")
    pattern = re.compile(
        r"^approval (\S+) \((\w+)\) waits: phibroker approve \1 / phibroker reject \1 --reason \.\.\.$"
    )
    found = until(lambda: len(m := [p for line in waiting.lines if (p := pattern.match(line))]) == 2 and m, procs)
    gate = {match.group(2): match.group(1) for match in found}
    assert sorted(gate[task] for task in gate) == sorted(r["id"] for r in client.approvals())

    granted = phibroker(procs, "approve", gate["Ship"], "--json")
    assert granted.returncode == 0, granted.stderr
    verdict = json.loads(granted.stdout)
    assert {k: verdict[k] for k in ("id", "decision", "state", "task")} == {
        "id": gate["Ship"],
        "decision": "approve",
        "state": "granted",
        "task": "Ship",
    }
    rejected = phibroker(procs, "reject", gate["Announce"], "--reason", "not today", "--json")
    assert rejected.returncode == 0, rejected.stderr
    assert json.loads(rejected.stdout)["state"] == "rejected"

    code, _, lines = waiting.finish()
    assert code == 1  # a rejected gate fails the run
    assert sum(1 for line in lines if pattern.match(line)) == 2, lines  # each said once
    again = phibroker(procs, "approve", gate["Ship"], "--json")
    assert again.returncode == 2 and again.stdout == "" and again.stderr.count("\n") == 1


# -- why -----------------------------------------------------------------------------------------------


def test_why_tells_when_a_silent_workers_lease_lapses_and_that_its_task_runs_again(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    coordinator_up(procs, client)
    victim = procs.worker("probe", app="tests.apps.probe")
    hang = "name: hang\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 60}}\n"
    wf_id = client.submit(flow(tmp_path, hang))
    until(lambda: client.status(wf_id)["tasks"]["A"]["state"] == "running", procs)
    victim.send_signal(signal.SIGSTOP)
    try:

        def lapsed_line() -> str | None:
            report = json.loads(phibroker(procs, "why", wf_id, "--json").stdout)
            assert (report["id"], report["state"]) == (wf_id, "running")
            return next((line for line in report["lines"] if "lease lapsed" in line), None)

        line = until(lapsed_line, procs)
        assert line.startswith("A: running on probe@") and f":{victim.pid}:" in line, line
        assert re.search(r"its worker has been silent for [\d.]+s — its lease lapsed [\d.]+s ago", line), line
        assert line.endswith(
            "the task runs again once another worker of probe reclaims it"
            " (none is alive: start one with phibroker worker --agent probe)"
        ), line
        rescuer = procs.worker("probe", app="tests.apps.probe")
        until(lambda: f":{rescuer.pid}:" in str(client.broker.read_workflow(wf_id)[1]["A"]["worker"]), procs)
        task = client.status(wf_id)["tasks"]["A"]
        assert (task["state"], task["attempts"], len(task["history"])) == ("running", 2, 1)
    finally:
        victim.send_signal(signal.SIGCONT)


NOW = 1_700_000_000.0
PLAN = json.dumps({"name": "p", "tasks": {"A": {"agent": "probe", "command": "work"}}})
RUNNING = {"A": {"state": "running", "dispatch": "d1", "entry": "1-0", "worker": "w1", "started": NOW - 9}}


def lease(expires: float) -> dict[str, Any]:
    return {"agent": "probe", "expires": expires, "reclaim_after": 2.0, "in_flight": 1, "concurrency": 4}


def why_line(workers: dict[str, dict[str, Any]]) -> str:
    meta = {"name": "p", "state": "running", "launched": 1, "spec": PLAN}
    facts = Facts(
        "wf",
        NOW,
        meta,
        plan_of(PLAN),
        RUNNING,
        workers=workers,
        pending={"1-0": {"consumer": "w1", "idle": 9000, "deliveries": 1}},
    )
    return explain(facts)[1]


def test_why_tells_a_renewing_worker_from_a_silent_one_before_its_lease_lapses() -> None:
    # w1 renews every 0.5 s (reclaim_after 2 s): a lease renewed 0.1 s ago is a busy worker, not a silent one
    assert why_line({"w1": lease(NOW + 1.9)}) == "A is running on w1 for 9.0s"
    assert why_line({"w1": lease(NOW + 0.5), "w2": lease(NOW + 1.5)}) == (
        "A: running on w1 for 9.0s; its worker has been silent for 1.5s — its lease lapses in 0.5s,"
        " then the task runs again once another worker of probe reclaims it (within 1.0s)"
    )
    assert why_line({"w2": lease(NOW + 1.5)}) == (
        "A: running on w1 for 9.0s; its worker holds no lease —"
        " the task runs again once another worker of probe reclaims it (within 1.0s)"
    )


# -- attempts ------------------------------------------------------------------------------------------


def test_a_reclaimed_run_counts_as_an_attempt_and_the_lost_one_keeps_its_start(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    coordinator_up(procs, client)
    workers = [procs.worker("probe", app="tests.apps.probe", PROBE_LEDGER=str(ledger)) for _ in range(2)]
    wf_id = client.submit(
        flow(
            tmp_path,
            "name: k\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 3}, retry: {max_attempts: 1}}\n",
        )
    )
    first = until(lambda: (t := client.status(wf_id)["tasks"]["A"])["state"] == "running" and t, procs)
    victim = next(p for p in workers if f":{p.pid}:" in str(client.broker.read_workflow(wf_id)[1]["A"]["worker"]))
    victim.send_signal(signal.SIGKILL)
    until(lambda: client.status(wf_id)["state"] == "succeeded", procs)

    shown = phibroker(procs, "status", wf_id, "--json")
    assert shown.returncode == 0, shown.stderr
    task = json.loads(shown.stdout)["tasks"]["A"]
    assert task["attempts"] == 2
    lost, ran = task["history"]
    assert (lost["attempt"], lost["applied"], lost["started_at"]) == (1, False, first["started_at"])
    assert lost["error"].startswith("lost: worker probe@") and f":{victim.pid}:" in lost["worker"]
    assert (ran["attempt"], ran["applied"], ran["error"]) == (2, True, None)
    assert ran["started_at"] > lost["started_at"] and task["started_at"] > lost["started_at"]
    (effect,) = ledger.read_text().splitlines()  # the killed run never reached its effect
    assert effect.split()[1:] == ["2", "2"]  # the handler saw ctx.attempt 2 (and fencing token 2)


def test_a_reclaim_does_not_use_up_the_retry_budget(procs: Processes, client: Client, tmp_path: Path) -> None:
    """max_attempts 2: the first run is lost with its worker, the reclaimed one fails (retryable), and
    the retry still runs, because a reclaim is a new attempt but not a retry."""
    coordinator_up(procs, client)
    workers = [procs.worker("probe", app="tests.apps.probe") for _ in range(2)]
    task = "{agent: probe, command: work, payload: {sleep: 3, fail_on: 2}, retry: {max_attempts: 2, base_delay: 0.1}}"
    wf_id = client.submit(flow(tmp_path, f"name: budget\ntasks:\n  A: {task}\n"))
    until(lambda: client.status(wf_id)["tasks"]["A"]["state"] == "running", procs)
    victim = next(p for p in workers if f":{p.pid}:" in str(client.broker.read_workflow(wf_id)[1]["A"]["worker"]))
    victim.send_signal(signal.SIGKILL)
    status = client.wait(wf_id, timeout=60)
    assert status["state"] == "succeeded", procs.output()
    history = status["tasks"]["A"]["history"]
    assert [(h["attempt"], h["applied"]) for h in history] == [(1, False), (2, True), (3, True)]
    assert history[0]["error"].startswith("lost: ") and history[1]["error"] == "Retryable: attempt 2 fails on purpose"
    assert status["tasks"]["A"]["attempts"] == 3


# -- cancel --------------------------------------------------------------------------------------------


def test_cancel_answers_json_and_refuses_a_run_that_has_ended(procs: Processes, client: Client, tmp_path: Path) -> None:
    coordinator_up(procs, client)
    procs.worker("probe", app="tests.apps.probe")
    stuck = client.submit(flow(tmp_path, "name: stuck\ntasks:\n  A: {agent: ghost, command: anything}\n"))
    cancelled = phibroker(procs, "cancel", stuck, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {"id": stuck, "ok": True}
    until(lambda: client.status(stuck)["state"] == "cancelled", procs)

    done = client.submit(flow(tmp_path, "name: quick\ntasks:\n  A: {agent: probe, command: noop}\n"))
    assert client.wait(done, timeout=30)["state"] == "succeeded"
    for wf_id, state in ((done, "succeeded"), (stuck, "cancelled")):
        again = phibroker(procs, "cancel", wf_id)
        assert (again.returncode, again.stdout) == (2, "")
        assert again.stderr == f"error: run {wf_id} has already ended ({state})\n"
    unknown = phibroker(procs, "cancel", "no-such-run", "--json")
    assert (unknown.returncode, unknown.stdout) == (2, "")
    assert unknown.stderr == "error: no workflow with id 'no-such-run'\n"


# -- colour --------------------------------------------------------------------------------------------


def on_a_terminal(procs: Processes, *args: str) -> str:
    """What `phibroker ARGS` prints when its stdout is a terminal (a pseudo-terminal here)."""
    env = {k: v for k, v in procs.env().items() if k != "NO_COLOR"}
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "phibroker", *args], stdin=terminal, stdout=terminal, stderr=terminal, env=env
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=60) == 0
    return b"".join(chunks).decode()


def test_status_and_list_colour_states_on_a_terminal_and_never_through_a_pipe(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    coordinator_up(procs, client)
    procs.worker("probe", app="tests.apps.probe")
    wf_id = client.submit(flow(tmp_path, "name: green\ntasks:\n  A: {agent: probe, command: noop}\n"))
    assert client.wait(wf_id, timeout=30)["state"] == "succeeded"
    green = "\x1b[32m"
    for args in (("status", wf_id), ("list",)):
        piped = phibroker(procs, *args)
        assert piped.returncode == 0 and "succeeded" in piped.stdout and not ANSI.search(piped.stdout)
        env = {"PHIBROKER_REDIS_URL": settings.redis_url, "PHIBROKER_NAMESPACE": settings.namespace}
        runner = CliRunner().invoke(main, list(args), env=env)
        assert runner.exit_code == 0 and "succeeded" in runner.output and not ANSI.search(runner.output)
        shown = on_a_terminal(procs, *args)
        assert f"{green}succeeded" in shown, repr(shown)
        assert ANSI.sub("", shown).replace("\r\n", "\n") == piped.stdout


def test_a_task_for_a_command_one_worker_lacks_goes_to_one_that_has_it(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    """Two versions of an agent side by side (a rolling deploy, or a dev worker beside the reference
    one): the new version is paused, so the old one reads every task; it runs what it can and hands the
    rest to the new one (whose lease holds meanwhile), and every task runs where its command is."""
    coordinator_up(procs, client)
    new = procs.worker("fleet", app="tests.apps.fleet:new", PHIBROKER_RECLAIM_AFTER="60")
    fleet = lambda: [w for w in json.loads(phibroker(procs, "agents", "--json").stdout) if w["agent"] == "fleet"]  # noqa: E731
    until(lambda: len([w for w in fleet() if w["alive"]]) == 1, procs)
    new.send_signal(signal.SIGSTOP)
    # A read the paused worker had blocking when it stopped would still be served by Redis: wait out
    # its BLOCK (PHIBROKER_WORKER_BLOCK, 0.5 s here), which the server ends whether the client runs or not.
    time.sleep(procs.settings.worker_block * 3)
    try:
        procs.worker("fleet", app="tests.apps.fleet:old")
        until(lambda: len([w for w in fleet() if w["alive"]]) == 2, procs)
        tasks = "".join(f"  T{i}: {{agent: fleet, command: {'two' if i % 2 else 'one'}}}\n" for i in range(20))
        wf_id = client.submit(flow(tmp_path, f"name: fleet\ntasks:\n{tasks}"))
        until(lambda: procs.output().count("handed T") == 10, procs, timeout=60)
    finally:
        new.send_signal(signal.SIGCONT)
    status = client.wait(wf_id, timeout=60)
    assert status["state"] == "succeeded", procs.output()
    assert {name: t["result"] for name, t in status["tasks"].items()} == {
        f"T{i}": "two" if i % 2 else "one" for i in range(20)
    }
