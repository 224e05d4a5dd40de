"""Other protocols in front of phibroker: `mcp`."""

from __future__ import annotations

import logging

import click

from phibroker.cli.app import main
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
