"""`phibroker mcp`: phibroker's runs as tools of a Model Context Protocol server on stdio, so an agent
or an IDE that speaks MCP can start workflows, watch them, and answer their approvals and signals.

Each tool calls the `Client` a Python user would, and answers with structured content (the same JSON
also as text, for clients that read only text). A refusal is a tool error carrying the one line the
CLI would print, never a traceback: the model reads it and can act on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent

from phibroker.engine.records import approval_document
from phibroker.errors import PhibrokerError
from phibroker.runtime.client import Client
from phibroker.settings import Settings

INSTRUCTIONS = (
    "phibroker runs workflows of AI agents. submit_workflow starts one from a workflow file and returns "
    "its id; run_status and run_logs show how it goes; a task waiting for a person is answered with "
    "approve or reject (list_approvals gives the ids), a signal gate with signal."
)


def answer(value: Any) -> CallToolResult:
    """A tool's result: structured (an object, as MCP wants) and the same JSON as text."""
    text = json.dumps(value, default=str)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=value)


def refusal(line: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=line)], is_error=True)


def calling(work: Callable[[], Any]) -> CallToolResult:
    """Run one client call: its value as the answer, a phibroker error as a tool error in one line."""
    try:
        return answer(work())
    except PhibrokerError as exc:
        return refusal(str(exc))
    except (OSError, ValueError) as exc:  # a file that cannot be read, data that is not JSON
        return refusal(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


OK = {"ok": True}


def server(settings: Settings) -> MCPServer:
    """The MCP server, its tools bound to one `Client` of these settings."""
    client = Client(settings)
    app = MCPServer("phibroker", instructions=INSTRUCTIONS)

    @app.tool()
    def submit_workflow(file: str, params: dict[str, Any] | None = None, id: str | None = None) -> CallToolResult:  # noqa: A002
        """Check and start the workflow in FILE (YAML or JSON) with these params; its run id. With `id`,
        submitting the same id again starts nothing new."""
        return calling(lambda: {"id": client.submit(file, params=params or {}, id=id)})

    @app.tool()
    def run_status(id: str) -> CallToolResult:  # noqa: A002
        """A run and every task, as `phibroker status ID --json`: states, results, errors, attempts."""
        return calling(lambda: client.status(id))

    @app.tool()
    def list_runs(limit: int = 20) -> CallToolResult:
        """The newest runs, newest first: `{"runs": [{"id", "name", "state", "created_at", ...}]}`."""
        return calling(lambda: {"runs": client.list(limit=max(1, min(limit, 1000)))})

    @app.tool()
    def run_logs(id: str, task: str | None = None) -> CallToolResult:  # noqa: A002
        """What a run's handlers streamed and logged, and its events, in order so far: `{"records": [...]}`."""

        def records() -> dict[str, Any]:
            client.status(id)  # an unknown run is an error, not an empty list
            return {"records": list(client.stream(id, task=task))}

        return calling(records)

    @app.tool()
    def list_approvals() -> CallToolResult:
        """Open approval requests: `{"approvals": [{"id", "workflow", "task", "message", "deadline"}]}`."""
        return calling(lambda: {"approvals": [approval_document(r) for r in client.approvals()]})

    @app.tool()
    def approve(id: str, comment: str | None = None) -> CallToolResult:  # noqa: A002
        """Approve request ID (from list_approvals), signed with the key of whoever runs this server."""
        return calling(lambda: decided(client.approve(id, comment=comment)))

    @app.tool()
    def reject(id: str, reason: str) -> CallToolResult:  # noqa: A002
        """Reject request ID with a reason, signed with the key of whoever runs this server."""
        return calling(lambda: decided(client.reject(id, reason)))

    @app.tool()
    def signal(id: str, name: str, data: Any = None) -> CallToolResult:  # noqa: A002
        """Send run ID the signal NAME with `data`, as `phibroker signal`: a gate waiting for it goes on."""

        def sent() -> dict[str, Any]:
            client.signal(id, name, data)
            return OK

        return calling(sent)

    @app.tool()
    def cancel(id: str) -> CallToolResult:  # noqa: A002
        """Cancel run ID: running tasks are asked to stop, compensations run."""

        def cancelled() -> dict[str, Any]:
            client.status(id)
            client.cancel(id)
            return OK

        return calling(cancelled)

    return app


def decided(outcome: dict[str, Any]) -> dict[str, Any]:
    """A decision's answer: ok, and its verdict (`granted`, `rejected`, or only `sent` when no
    coordinator answered in time)."""
    return {**OK, "state": outcome["type"].split(".")[1]}


def serve(settings: Settings) -> None:
    """Serve the tools on stdin/stdout until the client goes away."""
    server(settings).run("stdio")
