"""A2A both ways, over real HTTP with the `a2a-sdk` package's own client and server, against a real
broker and real coordinator and worker processes.

`phibroker a2a serve`: an SDK client starts a run, streams its output, answers its approval and its
signal gate with follow-up messages and gets the `output` artifact; a restarted server replays the
run's stream. `phibroker a2a-bridge`: workflow tasks run by an SDK server agent (tests/apps/a2aremote.py),
cancelled there with CancelTask, and found again by a restarted bridge instead of being sent twice.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.testing import free_port
from tests.conftest import REPO, Processes, until

pytest.importorskip("a2a")

import httpx  # noqa: E402
from a2a.client import ClientConfig, ClientFactory  # noqa: E402
from a2a.client.client import Client as A2AClient  # noqa: E402
from a2a.types import (  # noqa: E402
    CancelTaskRequest,
    GetTaskRequest,
    InvalidParamsError,
    ListTasksRequest,
    Message,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskNotFoundError,
    TaskState,
)
from google.protobuf.json_format import MessageToDict  # noqa: E402

from phibroker.interop.a2a_parts import part_of, value_of  # noqa: E402

S = TaskState
STORY = """\
name: story
description: streams a story, asks before publishing it, waits for a review
params: {words: [once, upon, a, time], topic: dragons, pages: 3}
output: "${tasks.Review.result.verdict}"
tasks:
  Speak: {agent: streamer, command: speak_async, payload: {words: "${params.words}"}}
  Gate: {approval: {message: "publish ${params.topic}?"}, depends_on: [Speak]}
  Review: {signal: {name: review, timeout: 5m}, depends_on: [Gate]}
"""
HOLD = """\
name: hold
tasks:
  Hold: {agent: probe, command: hold, payload: {sleep: 60}}
"""
GATE = """\
name: gate
tasks:
  Gate: {approval: {message: "go?"}}
"""


# -- helpers -------------------------------------------------------------------------------------------


def card_at(url: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{url}/.well-known/agent-card.json", timeout=2)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def a2a_serve(procs: Processes, directory: Path, port: int) -> str:
    procs.spawn("a2a-serve", "a2a", "serve", "--port", str(port), "--workflows", str(directory))
    url = f"http://127.0.0.1:{port}"
    until(lambda: card_at(url), procs, timeout=30)
    return url


def remote_agent(procs: Processes, ledger: Path) -> str:
    """The SDK server agent of tests/apps/a2aremote.py, as a process of the test."""
    port = free_port()
    log = open(procs.logs / f"a2a-remote-{len(procs.started)}.log", "wb")  # noqa: SIM115 - closed with the process
    args = [sys.executable, "-m", "tests.apps.a2aremote", str(port), str(ledger)]
    procs.started.append(subprocess.Popen(args, env=procs.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    until(lambda: card_at(url), procs, timeout=30)
    return url


def with_client(
    url: str, body: Callable[[A2AClient], Awaitable[None]], bindings: list[str] | None = None, streaming: bool = True
) -> None:
    """Run `body` with an SDK client made from the card at URL (JSON-RPC unless `bindings` say)."""

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            config = ClientConfig(httpx_client=http, supported_protocol_bindings=bindings or [], streaming=streaming)
            client = await ClientFactory(config).create_from_url(url)
            await body(client)

    asyncio.run(main())


def message(value: Any, skill: str | None = None, task_id: str = "", message_id: str = "") -> Message:
    sent = Message(role=Role.ROLE_USER, message_id=message_id or str(uuid.uuid4()), task_id=task_id)
    sent.parts.append(part_of(value))
    if skill is not None:
        sent.metadata.update({"skill": skill})
    return sent


async def collect(events: Any) -> list[StreamResponse]:
    return [event async for event in events]


async def first(events: Any) -> StreamResponse:
    """The first event of a stream, which is then closed."""
    try:
        return await events.__anext__()
    finally:
        await events.aclose()


def chunks(events: list[StreamResponse]) -> list[Any]:
    """The values of the streamed chunks, in order (the `output` artifact left out)."""
    return [
        value_of(part)
        for e in events
        if e.WhichOneof("payload") == "artifact_update" and e.artifact_update.artifact.artifact_id != "output"
        for part in e.artifact_update.artifact.parts
    ]


def states(events: list[StreamResponse]) -> list[int]:
    out = []
    for e in events:
        if e.WhichOneof("payload") == "task":
            out.append(e.task.status.state)
        elif e.WhichOneof("payload") == "status_update":
            out.append(e.status_update.status.state)
    return out


def last_status_data(events: list[StreamResponse]) -> list[Any]:
    """The data of the last status's message (a status update's, or the task's)."""
    kinds = {"task": lambda e: e.task.status, "status_update": lambda e: e.status_update.status}
    last = [kinds[e.WhichOneof("payload")](e) for e in events if e.WhichOneof("payload") in kinds][-1]
    return [value_of(p) for p in last.message.parts]


def output_of(events: list[StreamResponse]) -> list[Any]:
    """The `output` artifact's values: from an artifact update, or from a task that has ended."""
    artifacts = [e.artifact_update.artifact for e in events if e.WhichOneof("payload") == "artifact_update"]
    artifacts += [a for e in events if e.WhichOneof("payload") == "task" for a in e.task.artifacts]
    return [value_of(part) for a in artifacts if a.name == "output" for part in a.parts]


# -- a2a serve -----------------------------------------------------------------------------------------


def test_an_a2a_client_runs_a_workflow_answers_its_gates_and_replays_it_after_a_restart(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("streamer", app="tests.apps.streamer")
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "story.yaml").write_text(STORY)
    (flows / "notes.yaml").write_text("just: notes\n")  # not a workflow: left out
    port = free_port()
    url = a2a_serve(procs, flows, port)

    card = card_at(url)
    assert card is not None
    assert [s["id"] for s in card["skills"]] == ["story"]
    assert {(i["protocolBinding"], i["url"]) for i in card["supportedInterfaces"]} == {
        ("JSONRPC", f"{url}/"),
        ("HTTP+JSON", url),
    }
    (extension,) = card["capabilities"]["extensions"]
    assert extension["uri"] == "urn:phibroker:skill-params:v1"
    schema = extension["params"]["params"]["story"]
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert {k: v["type"] for k, v in schema["properties"].items()} == {
        "words": "array",
        "topic": "string",
        "pages": "integer",
    }
    seen: dict[str, Any] = {}

    async def begin(a2a: A2AClient) -> None:
        start = message({"topic": "elves", "pages": 5}, skill="story", message_id="story-1")
        opening = await collect(a2a.send_message(SendMessageRequest(message=start)))
        wf_id = seen["id"] = opening[0].task.id
        assert states(opening)[0] == S.TASK_STATE_SUBMITTED and states(opening)[-1] == S.TASK_STATE_INPUT_REQUIRED
        assert chunks(opening) == ["once", "upon", "a", "time"]
        (gate,) = last_status_data(opening)
        assert gate["kind"] == "approval" and gate["message"] == "publish elves?"
        assert (await a2a.get_task(GetTaskRequest(id=wf_id))).status.state == S.TASK_STATE_INPUT_REQUIRED

        # the same message again is the same run, not a second one
        again = await first(a2a.send_message(SendMessageRequest(message=start, configuration=_at_once())))
        assert again.task.id == wf_id

        approve = message({"decision": "approve", "comment": "lovely"}, task_id=wf_id)
        second = await collect(a2a.send_message(SendMessageRequest(message=approve)))
        assert states(second)[-1] == S.TASK_STATE_INPUT_REQUIRED
        assert last_status_data(second) == [{"kind": "signal", "name": "review"}]

    with_client(url, begin)
    wf_id = seen["id"]
    assert client.status(wf_id)["params"] == {"words": ["once", "upon", "a", "time"], "topic": "elves", "pages": 5}

    # the server killed mid-run and started again answers for the run, and replays its stream
    serving = procs.started[-1]
    serving.send_signal(signal.SIGKILL)
    serving.wait(timeout=10)
    a2a_serve(procs, flows, port)

    async def resume(a2a: A2AClient) -> None:
        replayed = await collect(a2a.subscribe(SubscribeToTaskRequest(id=wf_id)))
        assert chunks(replayed) == ["once", "upon", "a", "time"]  # every chunk, once
        assert states(replayed)[0] == S.TASK_STATE_SUBMITTED and states(replayed)[-1] == S.TASK_STATE_INPUT_REQUIRED
        assert last_status_data(replayed) == [{"kind": "signal", "name": "review"}]
        assert (await a2a.get_task(GetTaskRequest(id=wf_id))).status.state == S.TASK_STATE_INPUT_REQUIRED

        with pytest.raises(InvalidParamsError, match="no gate waiting for signal 'nope'"):
            await collect(a2a.send_message(SendMessageRequest(message=message({"signal": "nope"}, task_id=wf_id))))
        review = message({"signal": "review", "data": {"verdict": "ship it"}}, task_id=wf_id)
        third = await collect(a2a.send_message(SendMessageRequest(message=review)))
        assert states(third)[-1] == S.TASK_STATE_COMPLETED
        assert output_of(third) == ["ship it"]  # a string output: a text part

        done = await a2a.get_task(GetTaskRequest(id=wf_id))
        assert done.status.state == S.TASK_STATE_COMPLETED
        assert [(a.name, [value_of(p) for p in a.parts]) for a in done.artifacts] == [("output", ["ship it"])]
        listed = await a2a.list_tasks(ListTasksRequest(status=S.TASK_STATE_COMPLETED))
        assert [t.id for t in listed.tasks] == [wf_id] and not listed.tasks[0].artifacts

        whole = await collect(a2a.subscribe(SubscribeToTaskRequest(id=wf_id)))  # an ended run replays whole
        assert chunks(whole) == ["once", "upon", "a", "time"] and output_of(whole) == ["ship it"]
        assert S.TASK_STATE_INPUT_REQUIRED in states(whole) and states(whole)[-1] == S.TASK_STATE_COMPLETED

    with_client(url, resume, bindings=["HTTP+JSON"])
    events = [r["data"]["type"] for r in client.stream(wf_id) if r["kind"] == "event"]
    assert "approval.granted" in events and "signal.received" in events


def _at_once() -> SendMessageConfiguration:
    return SendMessageConfiguration(return_immediately=True)


def test_skills_params_and_follow_ups_are_checked_and_cancel_task_cancels_the_run(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "hold.yaml").write_text(HOLD)
    (flows / "gate.yaml").write_text(GATE)
    url = a2a_serve(procs, flows, free_port())
    client.registry.trust_key("alice", "ab" * 32)  # a trust list without the server's key

    async def body(a2a: A2AClient) -> None:
        for sent, error in [
            (message({}, skill="nope"), "unknown skill 'nope'"),
            (message({}), "no skill"),
            (message({"nope": 1}, skill="hold"), "unknown param 'nope'"),
            (message([1, 2], skill="hold"), "one data part holding an object"),
        ]:
            with pytest.raises(InvalidParamsError, match=error):
                await first(a2a.send_message(SendMessageRequest(message=sent)))
        with pytest.raises(TaskNotFoundError):
            await a2a.get_task(GetTaskRequest(id="no-such-run"))
        outsider = tmp_path / "outsider.yaml"  # a run of the broker that is no skill of this agent
        outsider.write_text("name: outsider\ntasks:\n  Hold: {agent: probe, command: hold}\n")
        outside_run = client.submit(outsider)
        with pytest.raises(TaskNotFoundError):
            await a2a.get_task(GetTaskRequest(id=outside_run))
        with pytest.raises(TaskNotFoundError):
            await a2a.cancel_task(CancelTaskRequest(id=outside_run))
        assert client.status(outside_run)["state"] != "cancelled"

        sent = SendMessageRequest(message=message({}, skill="hold"), configuration=_at_once())
        task = (await first(a2a.send_message(sent))).task
        assert task.status.state in (S.TASK_STATE_SUBMITTED, S.TASK_STATE_WORKING)
        with pytest.raises(InvalidParamsError, match="waits for no approval"):
            await collect(
                a2a.send_message(SendMessageRequest(message=message({"decision": "approve"}, task_id=task.id)))
            )

        # an approval signed by a key the coordinators do not trust is refused, and the gate still waits
        sent = SendMessageRequest(message=message({}, skill="gate"), configuration=_at_once())
        gated = (await first(a2a.send_message(sent))).task
        until(lambda: client.status(gated.id)["tasks"]["Gate"]["state"] == "running", procs)
        approve = SendMessageRequest(message=message({"decision": "approve"}, task_id=gated.id))
        with pytest.raises(InvalidParamsError, match="decision refused: untrusted key"):
            await collect(a2a.send_message(approve))
        assert (await a2a.get_task(GetTaskRequest(id=gated.id))).status.state == S.TASK_STATE_INPUT_REQUIRED

        until(lambda: client.status(task.id)["tasks"]["Hold"]["state"] == "running", procs)
        await a2a.cancel_task(CancelTaskRequest(id=task.id))
        deadline = asyncio.get_running_loop().time() + 30
        while (await a2a.get_task(GetTaskRequest(id=task.id))).status.state != S.TASK_STATE_CANCELED:
            assert asyncio.get_running_loop().time() < deadline, procs.output()
            await asyncio.sleep(0.1)
        final = await a2a.get_task(GetTaskRequest(id=task.id))
        assert MessageToDict(final.status.message)["parts"][0]["text"]

    with_client(url, body, streaming=False)
    card = f"{url}/.well-known/agent-card.json"
    assert urllib.request.urlopen(card, timeout=10).status == 200
    rebound = urllib.request.Request(card, headers={"Host": "evil.example:8266"})  # DNS rebinding
    with pytest.raises(urllib.error.HTTPError, match="400"):
        urllib.request.urlopen(rebound, timeout=10)


# -- a2a-bridge ----------------------------------------------------------------------------------------

BRIDGED = """\
name: bridged
failure: best_effort
tasks:
  Echo: {agent: remote, command: echo, payload: {words: [hello, world]}}
  Fail: {agent: remote, command: fail, retry: {max_attempts: 1}}
"""


def bridge_setup(procs: Processes, tmp_path: Path) -> tuple[Path, str, subprocess.Popen[bytes]]:
    ledger = tmp_path / "ledger"
    procs.coordinator()
    url = remote_agent(procs, ledger)
    return ledger, url, procs.spawn("a2a-bridge", "a2a-bridge", "--agent", "remote", "--url", url)


def submit(client: Client, tmp_path: Path, text: str, **params: Any) -> str:
    path = tmp_path / f"flow-{free_port()}.yaml"
    path.write_text(text)
    return client.submit(path, params=params)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_remote_a2a_agent_serves_workflow_tasks(procs: Processes, client: Client, tmp_path: Path) -> None:
    ledger, _, _ = bridge_setup(procs, tmp_path)
    wf_id = submit(client, tmp_path, BRIDGED)
    status = client.wait(wf_id, timeout=60)
    assert status["state"] == "failed", procs.output()
    echo, fail = status["tasks"]["Echo"], status["tasks"]["Fail"]
    assert echo["state"] == "succeeded" and echo["result"] == {"echo": ["hello", "world"], "count": 2}
    assert fail["state"] == "failed" and fail["error"].startswith("A2ATaskFailed: remote task ")
    assert fail["error"].endswith("failed: remote says no")
    streamed = [r["data"] for r in client.stream(wf_id, task="Echo") if r["kind"] == "chunk"]
    assert streamed == ["hello", "world", {"echo": ["hello", "world"], "count": 2}]
    assert sorted(line.split()[-1] for line in lines(ledger)) == ["echo", "fail"]


SLOW = """\
name: slow
params: {marker: '', seconds: 4}
tasks:
  Slow: {agent: remote, command: slow, payload: {marker: "${params.marker}", seconds: "${params.seconds}"}}
"""


def test_cancelling_the_workflow_cancels_the_remote_task(procs: Processes, client: Client, tmp_path: Path) -> None:
    ledger, _, _ = bridge_setup(procs, tmp_path)
    marker = tmp_path / "started"
    wf_id = submit(client, tmp_path, SLOW, marker=str(marker), seconds=60)
    until(marker.exists, procs, timeout=30)
    client.cancel(wf_id)
    assert client.wait(wf_id, timeout=30)["state"] == "cancelled", procs.output()
    until(lambda: any(line.startswith("cancel ") for line in lines(ledger)), procs)
    (executed,) = [line.split()[1] for line in lines(ledger) if line.startswith("execute ")]
    assert f"cancel {executed}" in lines(ledger)


def test_a_bridge_killed_mid_task_loses_nothing_and_sends_the_task_once(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    ledger, url, first = bridge_setup(procs, tmp_path)
    marker = tmp_path / "started"
    wf_id = submit(client, tmp_path, SLOW, marker=str(marker), seconds=4)
    until(marker.exists, procs, timeout=30)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    procs.spawn("a2a-bridge", "a2a-bridge", "--agent", "remote", "--url", url)
    status = client.wait(wf_id, timeout=60)
    assert status["state"] == "succeeded", procs.output()
    assert status["tasks"]["Slow"]["result"] == {"slept": 4}
    assert len([line for line in lines(ledger) if line.startswith("execute ")]) == 1  # sent once
    assert "found remote task " in procs.output()


SPEND = """\
name: spend
budget: {tokens: 50000, on_exceed: ask}
tasks:
  Think: {agent: spender, command: spend, payload: {steps: 3, tokens: 40000, pause: 0.3}}
"""


def test_a_passed_ask_budget_is_input_required_and_a_follow_up_answers_it(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("spender", app="tests.apps.spender")
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "spend.yaml").write_text(SPEND)
    url = a2a_serve(procs, flows, free_port())

    async def body(a2a: A2AClient) -> None:
        sent = SendMessageRequest(message=message({}, skill="spend"), configuration=_at_once())
        task = (await first(a2a.send_message(sent))).task
        deadline = asyncio.get_running_loop().time() + 60
        while (got := await a2a.get_task(GetTaskRequest(id=task.id))).status.state != S.TASK_STATE_INPUT_REQUIRED:
            assert asyncio.get_running_loop().time() < deadline, procs.output()
            await asyncio.sleep(0.1)
        asked = MessageToDict(got.status.message)["parts"][0]["data"]
        assert asked["kind"] == "approval" and asked["message"].startswith("budget exceeded: tokens 80000 > 50000")
        answer = message({"decision": "approve", "comment": "go on"}, task_id=task.id)
        await collect(a2a.send_message(SendMessageRequest(message=answer)))
        while (got := await a2a.get_task(GetTaskRequest(id=task.id))).status.state != S.TASK_STATE_COMPLETED:
            assert asyncio.get_running_loop().time() < deadline, procs.output()
            await asyncio.sleep(0.1)

    with_client(url, body, streaming=False)
    assert client.status(client.list(limit=1)[0]["id"])["state"] == "succeeded"
