"""`phibroker mcp` driven by the MCP SDK's own client over stdio, against a real broker and real
coordinator and worker processes: list the tools, submit, poll, approve, signal, read the logs,
cancel, and get one-line tool errors for bad calls."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Processes

mcp = pytest.importorskip("mcp")

from mcp import Client as McpClient  # noqa: E402
from mcp import StdioServerParameters  # noqa: E402

FLOW = """\
name: mcp-flow
params: {value: 1}
output: {value: "${tasks.Work.result.value}", ci: "${tasks.CI.result}"}
tasks:
  Work: {agent: probe, command: work, payload: {value: "${params.value}"}}
  Gate: {approval: {message: "ship ${params.value}?"}, depends_on: [Work]}
  CI: {signal: {name: ci-done, timeout: 5m}, depends_on: [Gate]}
"""
TOOLS = {
    "submit_workflow",
    "run_status",
    "list_runs",
    "run_logs",
    "approve",
    "reject",
    "signal",
    "cancel",
}


async def call(session: Any, tool: str, **arguments: Any) -> tuple[bool, Any]:
    """(is_error, structured content or the error's text)."""
    result = await session.call_tool(tool, arguments)
    if result.is_error:
        return True, result.content[0].text
    assert json.loads(result.content[0].text) == result.structured_content  # the same JSON as text
    return False, result.structured_content


async def until_state(session: Any, wf_id: str, wanted: str, procs: Processes) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, status = await call(session, "run_status", id=wf_id)
        if status["state"] == wanted:
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"{wf_id} never reached {wanted}: {status['state']}\n{procs.output()}")


def with_session(procs: Processes, body: Callable[[Any], Awaitable[None]]) -> None:
    """Run `body` with an MCP client session whose server is `phibroker mcp`, started as its subprocess."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "phibroker", "mcp"], env=procs.env())

    async def main() -> None:
        async with McpClient(params) as session:
            await body(session)

    asyncio.run(main())


def test_an_mcp_client_runs_a_workflow_end_to_end(procs: Processes, tmp_path: Path) -> None:
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW)
    with_session(procs, lambda session: end_to_end(session, procs, path))


async def end_to_end(session: Any, procs: Processes, path: Path) -> None:
    tools = (await session.list_tools()).tools
    schemas = {tool.name: tool.input_schema for tool in tools}
    assert TOOLS <= set(schemas)
    assert schemas["submit_workflow"]["required"] == ["file"]
    assert set(schemas["submit_workflow"]["properties"]) == {"file", "params", "id"}
    assert schemas["signal"]["required"] == ["id", "name"]

    error, started = await call(session, "submit_workflow", file=str(path), params={"value": 7})
    assert not error
    wf_id = started["id"]
    await until_state(session, wf_id, "waiting_approval", procs)
    _, approvals = await call(session, "list_approvals")
    (request,) = [a for a in approvals["approvals"] if a["workflow"] == wf_id]
    assert request["message"] == "ship 7?"
    assert await call(session, "approve", id=request["id"], comment="fine") == (False, {"ok": True, "state": "granted"})
    deadline = time.monotonic() + 60
    while (await call(session, "run_status", id=wf_id))[1]["tasks"]["CI"]["state"] != "running":
        assert time.monotonic() < deadline, procs.output()
        await asyncio.sleep(0.2)
    assert await call(session, "signal", id=wf_id, name="ci-done", data={"green": True}) == (False, {"ok": True})
    status = await until_state(session, wf_id, "succeeded", procs)
    assert status["output"] == {"value": 7, "ci": {"green": True}}

    _, logs = await call(session, "run_logs", id=wf_id)
    types = [r["data"]["type"] for r in logs["records"] if r["kind"] == "event"]
    assert types[0] == "workflow.submitted" and types[-1] == "workflow.succeeded"
    _, runs = await call(session, "list_runs", limit=5)
    assert runs["runs"][0]["id"] == wf_id and runs["runs"][0]["state"] == "succeeded"


def test_refusals_are_tool_errors_in_one_line(procs: Processes, tmp_path: Path) -> None:
    procs.coordinator()
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntasks:\n  A: {agent: probe, command: work, depends_on: [Nope]}\n")
    with_session(procs, lambda session: refusals(session, procs, tmp_path, path, bad))


async def refusals(session: Any, procs: Processes, tmp_path: Path, path: Path, bad: Path) -> None:
    for tool, arguments in [
        ("run_status", {"id": "no-such-run"}),
        ("run_logs", {"id": "no-such-run"}),
        ("cancel", {"id": "no-such-run"}),
        ("signal", {"id": "no-such-run", "name": "x"}),
        ("approve", {"id": "no-such-approval"}),
        ("submit_workflow", {"file": str(tmp_path / "missing.yaml")}),
        ("submit_workflow", {"file": str(bad)}),
    ]:
        error, text = await call(session, tool, **arguments)
        assert error and text and "\n" not in text and "Traceback" not in text, (tool, text)

    _, started = await call(session, "submit_workflow", file=str(path), id="cancel-me")
    assert started == {"id": "cancel-me"}
    assert await call(session, "cancel", id="cancel-me") == (False, {"ok": True})
    assert (await until_state(session, "cancel-me", "cancelled", procs))["state"] == "cancelled"
    error, text = await call(session, "signal", id="cancel-me", name="ci-done")
    assert error and "has already ended (cancelled)" in text
