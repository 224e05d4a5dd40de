"""Identities: with an identities file, a coordinator applies only results signed by the agent that owns
the task (a forged one goes to the DLQ and the task waits for its real worker); with one that names
roles, only what a client signed starts, cancels or signals a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from phibroker import wire
from phibroker.errors import InvalidInput
from phibroker.runtime.client import Client
from phibroker.runtime.gate import SecurityGate
from phibroker.settings import Settings
from tests.conftest import Processes, until
from tests.test_core import cli
from tests.test_failures import flow
from tests.test_subworkflows import CHILD, MAIN, files, task_state


def test_forged_results_are_refused(procs: Processes, client: Client, settings: Settings, tmp_path: Path) -> None:
    identities = tmp_path / "identities.json"
    identities.write_text(json.dumps({"probe": "probe-secret", "other": "other-secret"}))
    procs.coordinator(PHIBROKER_IDENTITIES=str(identities))
    path = flow(tmp_path, "name: id\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 0.5}}\n")
    wf_id = client.submit(path)
    deadline = time.monotonic() + 20
    while not client.broker.read_workflow(wf_id)[1].get("A", {}).get("dispatch"):
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    dispatch = client.broker.read_workflow(wf_id)[1]["A"]["dispatch"]
    forged = wire.Result(id=dispatch, wf=wf_id, unit="A", token=1, ok=True, worker="mallory", started=1.0, finished=2.0)
    for agent, secret in (("other", b"other-secret"), ("probe", b"wrong"), ("probe", None), ("nobody", b"x")):
        inbox = wire.Inbox(kind="results", results=[forged], agent=agent)
        client.broker.add(settings.keys.inbox(None), inbox.encode(1 << 20, secret))
    while len(client.dead_letters()) < 4:
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    reasons = sorted(row["reason"] for row in client.dead_letters())
    assert reasons == [
        "forged result: agent 'other' answered 'A' of another agent",
        "forged result: bad signature for agent 'probe'",
        "forged result: bad signature for agent 'probe'",
        "forged result: unknown agent 'nobody'",
    ]
    assert client.status(wf_id)["tasks"]["A"]["state"] == "ready"
    procs.worker("probe", app="tests.apps.probe", PHIBROKER_AGENT_SECRET="probe-secret")
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded" and status["tasks"]["A"]["result"]["task"] == "A"


ROLES = {
    "probe": {"role": "agent", "secret": "probe-secret"},
    "other": {"role": "agent", "secret": "other-secret"},
    "ops": {"role": "client", "secret": "ops-secret"},
    "coordinator": {"role": "coordinator", "secret": "coordinator-secret"},
}


def test_with_roles_only_a_client_starts_cancels_or_signals_runs_and_coordinators_sign_their_own(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """A file that names roles: runs, cancels and signals need a client's signature, a worker's reports
    its agent's; child runs, their ends and a parent's cancel still flow, signed by the coordinators."""
    identities = tmp_path / "identities.json"
    identities.write_text(json.dumps(ROLES))
    procs.coordinator(PHIBROKER_IDENTITIES=str(identities))
    procs.worker("probe", app="tests.apps.probe", PHIBROKER_AGENT_SECRET="probe-secret")
    ops = Client(settings.model_copy(update={"client_name": "ops", "client_secret": "ops-secret"}))
    parent = files(tmp_path, main=MAIN, child=CHILD)
    status = ops.wait(ops.submit(parent), timeout=60)
    assert status["state"] == "succeeded" and status["output"] == {"got": 7}, procs.output()

    unsigned = client.wait(client.submit(parent), timeout=60)  # `client` has no secret
    assert unsigned["state"] == "failed", procs.output()
    assert unsigned["error"] == "refused: not submitted by a client identity (set PHIBROKER_CLIENT_SECRET)"

    holding = CHILD.replace('command: work, payload: {value: "${params.value}"}', "command: hold, payload: {sleep: 60}")
    wf_id = ops.submit(files(tmp_path, main=MAIN, child=holding))
    child_id = f"{wf_id}~Sub"
    until(lambda: task_state(client, child_id, "Work") == "running", procs, timeout=30)
    client.cancel(wf_id, reason="unsigned")  # refused: the run goes on
    client.signal(wf_id, "nothing")
    other = Client(settings.model_copy(update={"client_name": "other", "client_secret": "other-secret"}))
    other.cancel(wf_id, reason="an agent's")  # signed, but by an agent
    reasons = until(
        lambda: sorted(r["reason"] for r in client.dead_letters()) if len(client.dead_letters()) >= 4 else None
    )
    assert reasons == [
        "forged cancel: 'other' is agent; only client or coordinator may send it",
        "forged cancel: not signed (only client or coordinator identities may send it)",
        "forged signal: not signed (only client or coordinator identities may send it)",
        "forged submit: not signed (only client or coordinator identities may send it)",  # the sweep's kick refuses it
    ]
    assert client.status(wf_id)["state"] == "running"
    ops.cancel(wf_id, reason="enough")  # the parent's cancel reaches its child, signed by a coordinator
    assert ops.wait(wf_id, timeout=30)["state"] == "cancelled"
    child = ops.wait(child_id, timeout=30)
    assert child["state"] == "cancelled" and child["error"] == f"parent {wf_id}: enough", procs.output()
    assert len(client.dead_letters()) == 4


def test_a_signed_submit_with_no_coordinator_running_is_written_once_one_runs(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """A client that signs asks the coordinators for its run, which they write: with none running,
    `submit --wait` shows it as asked once its timeout passes (running, nothing started; exit 1, as for
    any run that did not end in time), and the run is written, and runs, once a coordinator starts. A
    run bigger than a message may be is refused in one line (exit 2)."""
    identities = tmp_path / "identities.json"
    identities.write_text(json.dumps(ROLES))
    path = flow(tmp_path, "name: asked\ntasks:\n  A: {agent: probe, command: work, payload: {value: 3}}\n")
    as_ops = {"PHIBROKER_CLIENT_NAME": "ops", "PHIBROKER_CLIENT_SECRET": "ops-secret"}
    waited = cli(settings, "submit", str(path), "--id", "asked-1", "--wait", "--timeout", "1s", **as_ops)
    assert waited.returncode == 1 and "A" in waited.stdout, (waited.stdout, waited.stderr)
    assert "no coordinator has written it yet" in waited.stderr
    assert waited.stderr.splitlines()[-1] == "stopped waiting; the run goes on (phibroker status asked-1)"
    procs.coordinator(PHIBROKER_IDENTITIES=str(identities))
    procs.worker("probe", app="tests.apps.probe", PHIBROKER_AGENT_SECRET="probe-secret")
    until(lambda: "asked-1" in {row["id"] for row in client.list()}, procs)
    status = client.wait("asked-1", timeout=60)
    assert status["state"] == "succeeded" and status["tasks"]["A"]["result"]["value"] == 3, procs.output()

    big = flow(tmp_path, "name: big\ntasks:\n  A: {agent: probe, command: work, payload: {text: " + "x" * 5000 + "}}\n")
    refused = cli(settings, "submit", str(big), **as_ops, PHIBROKER_MAX_MESSAGE_BYTES="1000")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "over the 4,000 a signed submit may carry" in refused.stderr


@pytest.mark.parametrize(
    "text, error",
    [
        ('{"a": {"role": "boss", "secret": "x"}}', "'a': give a role (admin, agent, client, coordinator) and a secret"),
        ('{"a": {"role": "agent"}}', "'a': give a role (admin, agent, client, coordinator) and a secret"),
        ('{"a": {"role": "agent", "secret": "x"}}', "no identity has the coordinator role"),
        ("[1, 2]", "not a JSON object of identities"),
    ],
)
def test_an_identities_file_names_roles_or_is_refused_in_one_line(text: str, error: str, tmp_path: Path) -> None:
    path = tmp_path / "identities.json"
    path.write_text(text)
    gate = SecurityGate(Settings(identities=path), registry=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as refused:
        gate.signer()
    assert str(refused.value) == f"identities file {path}: {error}"


def test_the_older_form_names_agents_and_checks_only_what_workers_send(tmp_path: Path) -> None:
    path = tmp_path / "identities.json"
    path.write_text(json.dumps({"probe": "probe-secret"}))
    gate = SecurityGate(Settings(identities=path), registry=None)  # type: ignore[arg-type]
    assert gate.signer() is None and not gate.with_roles
    assert gate.check_sender(wire.Inbox(kind="cancel", body={"wf": "w"})) is None
    lost = wire.Inbox(kind="lost", body={"wf": "w", "unit": "A", "dispatch": "d"})
    assert gate.check_sender(lost) == "forged lost: not signed (only agent identities may send it)"
    lost.agent = "probe"
    assert gate.check_sender(wire.Inbox.decode(lost.encode(1 << 20, b"probe-secret"), 1 << 20)) is None


def test_a_signed_message_cannot_be_passed_off_as_another_kind() -> None:
    """The signature covers the kind: a worker's signed `spend` re-labelled `lost` (which would fail the
    attempt it names) no longer verifies."""
    secret = b"webc-secret"
    body = {"wf": "w1", "unit": "Scan", "dispatch": "d1", "tokens": 10}
    raw = wire.Inbox(kind="spend", body=body).signed_as(("webc", secret), 1 << 20)
    message = wire.Inbox.decode(raw, 1 << 20)
    assert message.signed_by(secret)
    message.kind = "lost"
    assert not message.signed_by(secret)


def test_what_coordinators_send_each_other_outlives_an_outage_and_a_clients_cancel_does_not(tmp_path: Path) -> None:
    """A client's signed cancel is good for minutes (a copy kept for later is refused); a parent's cancel
    of its child, sent by a coordinator, stays good as long as runs are kept, so every coordinator
    being down for an hour loses nothing."""
    path = tmp_path / "identities.json"
    roles = {"alice": {"role": "client", "secret": "a"}, "coord": {"role": "coordinator", "secret": "c"}}
    path.write_text(json.dumps(roles))
    gate = SecurityGate(Settings(identities=path), registry=None)  # type: ignore[arg-type]

    def cancel(sender: str, secret: bytes, good_for: float) -> wire.Inbox:
        raw = wire.Inbox(kind="cancel", body={"wf": "w"}).signed_as((sender, secret), 1 << 20, good_for)
        return wire.Inbox.decode(raw, 1 << 20)

    an_hour_later = time.time() + 3600
    parents = cancel("coord", b"c", Settings().retention)
    assert gate.check_sender(parents) is None and gate.check_expiry(parents, an_hour_later) is None
    clients = cancel("alice", b"a", wire.CONTROL_TTL)
    assert gate.check_sender(clients) is None
    assert str(gate.check_expiry(clients, an_hour_later)).startswith("expired cancel")
    long_lived = cancel("alice", b"a", Settings().retention)  # a client cannot date its own far ahead
    assert str(gate.check_sender(long_lived)).startswith("forged cancel")
