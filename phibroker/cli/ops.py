"""Operating a deployment: the live view, workers, Redis ACL users."""

from __future__ import annotations

import json

import click

from phibroker.cli.app import (
    main,
)
from phibroker.settings import Settings


@main.command()
@click.option("--workflow", "wf_id", metavar="ID", help="only this workflow, its agents and its events")
@click.option("--agent", "agent_name", metavar="NAME", help="only this agent and the workflows that use it")
@click.option("--once", is_flag=True, help="print one frame and exit")
@click.pass_obj
def watch(settings: Settings, wf_id: str | None, agent_name: str | None, once: bool) -> None:
    """Live view: agents' streams, workers, lag and pending; workflows with progress; recent events."""
    from phibroker.tools import watch as view

    view.watch(settings, workflow=wf_id, agent=agent_name, once=once)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def agents(settings: Settings, as_json: bool) -> None:
    """Every worker lease: who runs where, how busy, the last heartbeat, and alive or dead."""
    from phibroker.tools import diagnose

    rows = diagnose.agents(settings)
    click.echo(json.dumps(rows) if as_json else "\n".join(diagnose.agent_lines(rows)))


@main.group()
def acl() -> None:
    """Redis ACL users for production: one per agent, the coordinators, a `client` (submitter), an
    `approver`, a read-only `watch`, an `admin`."""


@acl.command("generate")
@click.option("--agents", required=True, help="the agents, comma-separated: webc,dc,vssc,kalic,cmdc")
@click.option("--out", "out_dir", default="deploy/secrets", show_default=True, type=click.Path(file_okay=False))
@click.option("--host", default="localhost", show_default=True, help="the Redis host the env files' URLs name")
@click.option("--port", default=6379, show_default=True, help="the Redis port the env files' URLs name")
@click.option("--tls", is_flag=True, help="rediss:// URLs")
@click.option(
    "--cluster",
    "cluster_nodes",
    metavar="HOST:PORT[,HOST:PORT...]",
    help="nodes of a Redis Cluster: redis+cluster:// URLs naming them (instead of --host and --port)",
)
@click.option("--identities-path", default="/etc/phibroker/identities.json", show_default=True)
@click.option(
    "--subscription",
    "subscriptions",
    multiple=True,
    metavar="AGENT=NAME",
    help="a subscription of AGENT named other than AGENT.function",
)
@click.option(
    "--submitter",
    "submitters",
    multiple=True,
    metavar="AGENT",
    help="an agent whose reactions submit runs: its identity is a client's too",
)
@click.option("--force", is_flag=True, help="replace existing files: every password and secret changes")
@click.pass_obj
def acl_generate(
    settings: Settings,
    agents: str,
    out_dir: str,
    host: str,
    port: int,
    tls: bool,
    cluster_nodes: str | None,
    identities_path: str,
    subscriptions: tuple[str, ...],
    submitters: tuple[str, ...],
    force: bool,
) -> None:
    """Write users.acl, one USER.env per user and identities.json, with fresh random secrets. On a
    Redis Cluster, load users.acl on every node (`aclfile`, or ACL LOAD on each)."""
    from pathlib import Path

    from phibroker.errors import InvalidInput
    from phibroker.security import acl as acls
    from phibroker.store.roles import ROLES

    names = acls.parse_agents(agents)
    given = click.get_current_context().get_parameter_source
    if cluster_nodes is not None and click.core.ParameterSource.COMMANDLINE in (given("host"), given("port")):
        raise InvalidInput("--cluster names the nodes: leave out --host and --port")
    bundle = acls.generate(
        settings.namespace,
        names,
        host=host,
        port=port,
        tls=tls,
        cluster=acls.parse_nodes(cluster_nodes) if cluster_nodes is not None else (),
        identities_path=identities_path,
        subscriptions=acls.parse_subscriptions(subscriptions, names),
        submitters=submitters,
        roles=ROLES,
    )
    for path in acls.write(Path(out_dir), bundle, force=force):
        click.echo(str(path))
