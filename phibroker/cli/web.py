"""The web page: ui."""

from __future__ import annotations

import click

from phibroker.cli.app import main, reachable
from phibroker.settings import Settings


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="the address to listen on")
@click.option("--port", default=8265, show_default=True, type=click.IntRange(0, 65535), help="0: any free port")
@click.option("--allow-actions", is_flag=True, help="cancel, retry, signal, approve and reject from the page")
@click.pass_obj
def ui(settings: Settings, host: str, port: int, allow_actions: bool) -> None:
    """Serve a web page of runs (their DAGs, live), approvals and agents, with a JSON and SSE API.

    Read-only unless --allow-actions; approvals made there are signed with your key, as `approve` signs."""
    from phibroker import web

    reachable(settings)
    sock = web.listen(host, port)
    mode = "actions on" if allow_actions else "read-only; --allow-actions to act from the page"
    click.echo(f"phibroker ui at {web.address(sock)} ({mode}); Ctrl-C stops it", err=True)
    if allow_actions and not web.is_loopback(sock):
        click.echo(
            "warning: actions on a page others can reach: anyone who loads it may approve with your key; "
            "listen on 127.0.0.1 behind a proxy that authenticates (see the README)",
            err=True,
        )
    web.serve(settings, sock, allow_actions)
