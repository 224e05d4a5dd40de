"""Fencing without an identities file: a result is applied only with the token the start script gave
that attempt. A forged result for a task nobody started, or with a token never issued, changes nothing,
whether the coordinator reads the run afresh or holds it in its cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from phibroker import wire
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes, until
from tests.test_core import events_of
from tests.test_failures import flow


def forge(client: Client, settings: Settings, wf_id: str, unit: str, token: int) -> None:
    dispatch = until(lambda: client.broker.read_workflow(wf_id)[1].get(unit, {}).get("dispatch"))
    value = wire.pack({"forged": True})
    result = wire.Result(
        dispatch, wf_id, unit, token=token, ok=True, worker="mallory", started=1.0, finished=2.0, value=value
    )
    client.broker.add(settings.keys.inbox(None), wire.Inbox(kind="results", results=[result]).encode(1 << 20))


def forged_attempt(client: Client, wf_id: str, unit: str) -> dict:
    """The forged result, once the coordinator has read it: in the history, not applied."""
    return until(
        lambda: next((h for h in client.status(wf_id)["tasks"][unit]["history"] if h["worker"] == "mallory"), None)
    )


@pytest.mark.parametrize("cached", [False, True], ids=["read-afresh", "held-in-cache"])
def test_a_result_for_a_task_nobody_started_is_not_applied(
    cached: bool, procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """`Waits` is dispatched to an agent with no worker; a forged success for it must not start `Then`."""
    procs.coordinator()
    path = flow(
        tmp_path,
        "name: fence\ntasks:\n  Gate: {approval: {message: go?}}\n  Waits: {agent: ghost, command: anything}\n"
        "  Then: {agent: ghost, command: anything, depends_on: [Waits]}\n",
    )
    wf_id = client.submit(path)
    if cached:  # an input the coordinator applies keeps the run in its cache
        until(lambda: client.status(wf_id)["state"] == "waiting_approval", procs)
        client.signal(wf_id, "nothing-waits-for-this")
        until(lambda: "signal.kept" in [e["type"] for e in events_of(settings, wf_id)], procs)
    forge(client, settings, wf_id, "Waits", token=1)
    assert not forged_attempt(client, wf_id, "Waits")["applied"]
    status = client.status(wf_id)
    assert status["tasks"]["Waits"]["state"] == "ready" and status["tasks"]["Then"]["state"] == "pending"


def test_a_token_never_issued_is_refused_and_the_real_result_applies(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    wf_id = client.submit(
        flow(tmp_path, "name: fence2\ntasks:\n  A: {agent: probe, command: work, payload: {sleep: 2}}\n")
    )
    until(lambda: client.status(wf_id)["tasks"]["A"]["state"] == "running", procs)
    forge(client, settings, wf_id, "A", token=7)
    assert not forged_attempt(client, wf_id, "A")["applied"]
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded" and status["tasks"]["A"]["result"]["task"] == "A"
