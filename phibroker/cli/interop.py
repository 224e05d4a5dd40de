"""Other protocols in front of phibroker: `mcp`, `a2a serve`, `a2a-bridge`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from phibroker.cli.app import main, reachable, setup_logging, stop_on_signals
from phibroker.errors import InvalidInput
from phibroker.settings import Settings


@main.command("mcp")
@click.pass_obj
def mcp(settings: Settings) -> None:
    """Serve phibroker's runs as MCP tools on stdin/stdout (for agents and IDEs that speak MCP)."""
    try:
        from phibroker.interop.mcp import serve
    except ImportError as exc:
        raise InvalidInput(f"mcp needs the MCP SDK ({exc}): pip install 'phibroker[mcp]'") from None
    logging.basicConfig(level=logging.WARNING)  # stdout is the protocol's: logs go to stderr
    serve(settings)


@main.group("a2a")
def a2a() -> None:
    """Serve phibroker's workflows to A2A (Agent2Agent) clients."""


@a2a.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="the interface to listen on")
@click.option("--port", default=8266, show_default=True, help="the port to listen on")
@click.option(
    "--workflows",
    "directory",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="the folder whose workflow files are the agent's skills",
)
@click.option("--url", help="the base URL clients reach this server at [http://HOST:PORT]")
@click.pass_obj
def a2a_serve(settings: Settings, host: str, port: int, directory: Path, url: str | None) -> None:
    """An A2A agent whose skills are the workflows of a folder: a message starts a run, the task is the run."""
    try:
        from phibroker.interop.a2a_serve import serve
    except ImportError as exc:
        raise InvalidInput(f"a2a serve needs the A2A SDK ({exc}): pip install 'phibroker[a2a]'") from None
    reachable(settings)
    setup_logging()
    serve(settings, directory, host, port, url)


@main.command("a2a-bridge")
@click.option("--agent", "agent_name", required=True, help="the phibroker agent whose tasks the remote agent runs")
@click.option("--url", required=True, help="where the remote agent's card is served (its base URL)")
@click.option("--concurrency", default=16, show_default=True, help="remote tasks followed at once")
@click.pass_obj
def a2a_bridge(settings: Settings, agent_name: str, url: str, concurrency: int) -> None:
    """Serve an agent's tasks with a remote A2A agent: each task becomes a message to the skill named
    after its command, its artifacts stream as the task's output, its end is the task's."""
    try:
        from phibroker.interop.a2a_bridge import Bridge
    except ImportError as exc:
        raise InvalidInput(f"a2a-bridge needs the A2A SDK ({exc}): pip install 'phibroker[a2a]'") from None
    if concurrency < 1:
        raise InvalidInput("--concurrency must be at least 1")
    reachable(settings)
    setup_logging()
    for chatty in ("httpx", "a2a"):  # a line per HTTP request would land in every task's output
        logging.getLogger(chatty).setLevel(logging.WARNING)
    bridge = Bridge(agent_name, url, settings, concurrency=concurrency)
    stop_on_signals(bridge.stop)
    if not bridge.work():
        logging.shutdown()
        os._exit(0)  # tasks still followed after the grace period: they stay unacked for another bridge
