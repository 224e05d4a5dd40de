"""Per-agent identity: with an identities file, a coordinator applies only results signed by the agent
that owns the task; a forged one goes to the DLQ and the task waits for its real worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

from phibroker import wire
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import Processes
from tests.test_failures import flow


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
        client.broker.add(settings.keys.results, inbox.encode(1 << 20, secret))
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
