"""Human decisions and their keys: approvals, approve, reject, keys, sign."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from phibroker import workflow as workflows
from phibroker.cli.app import (
    main,
    read_text,
    show_rows,
)
from phibroker.settings import Settings


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def approvals(settings: Settings, as_json: bool) -> None:
    """Open approval requests."""
    from phibroker.engine.records import approval_document
    from phibroker.runtime.client import Client
    from phibroker.tools.watch import span

    with Client(settings) as client:
        requests = client.approvals()
    if as_json:  # the documented shape, nothing more
        requests = [approval_document(r) for r in requests]

    def line(row: dict[str, Any]) -> str:
        notes = [f"approvers: {', '.join(row['approvers'])}" if row.get("approvers") else "anyone may decide"]
        if row.get("deadline"):
            notes.append(f"times out in {span(row['deadline'] - time.time())}")
        return f"{row['id']}  {row['workflow']} / {row['task']}: {row['message']}  ({'; '.join(notes)})"

    show_rows(requests, as_json, "no open approvals", line)


@main.command()
@click.argument("approval_id", metavar="ID")
@click.option("--comment", help="recorded with the approval")
@click.option("--json", "as_json", is_flag=True, help="stdout: the verdict as one JSON object")
@click.pass_obj
def approve(settings: Settings, approval_id: str, comment: str | None, as_json: bool) -> None:
    """Approve request ID, signed with your key (made on first use)."""
    _decide(settings, approval_id, "approve", as_json, comment=comment)


@main.command()
@click.argument("approval_id", metavar="ID")
@click.option("--reason", required=True, help="why: recorded, and the gate task fails with it")
@click.option("--json", "as_json", is_flag=True, help="stdout: the verdict as one JSON object")
@click.pass_obj
def reject(settings: Settings, approval_id: str, reason: str, as_json: bool) -> None:
    """Reject request ID, signed with your key."""
    _decide(settings, approval_id, "reject", as_json, reason=reason)


def _decide(
    settings: Settings,
    approval_id: str,
    decision: str,
    as_json: bool,
    comment: str | None = None,
    reason: str | None = None,
) -> None:
    """Send a signed decision and say the verdict: granted, rejected, or sent (no coordinator answered)."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        outcome = client.decide(approval_id, decision, comment=comment, reason=reason)
    verdict = outcome["type"].split(".")[1]
    if verdict == "sent":
        click.echo(f"{decision} {approval_id}: sent; no coordinator has answered yet", err=True)
    if as_json:
        data = outcome.get("data") or {}
        essentials = {"id": approval_id, "decision": decision, "state": verdict}
        where = {"workflow": outcome.get("workflow"), "task": outcome.get("task"), "approver": data.get("approver")}
        click.echo(json.dumps({**essentials, **where}))
    elif verdict != "sent":
        click.echo(f"{approval_id}: {verdict}")


@main.group()
def keys() -> None:
    """Signing keys: yours (in $PHIBROKER_HOME/keys) and the trust list coordinators check."""


@keys.command("generate")
@click.option("--name", help="the approver name [$PHIBROKER_APPROVER or your login]")
@click.option("--force", is_flag=True, help="replace an existing key")
@click.pass_obj
def keys_generate(settings: Settings, name: str | None, force: bool) -> None:
    """Make a key pair; prints the public line to give to whoever runs the coordinators."""
    from phibroker.security import signing

    key = signing.generate(settings.home, name or signing.default_name(), overwrite=force)
    click.echo(f"{key.name} {key.public_hex}")


@keys.command("trust")
@click.argument("source", metavar="PUBFILE|NAME")
@click.argument("public_hex", required=False, metavar="[HEX]")
@click.pass_obj
def keys_trust(settings: Settings, source: str, public_hex: str | None) -> None:
    """Add a public key to the trust list (a .pub file, or NAME HEX)."""
    from pathlib import Path

    from phibroker.security import signing
    from phibroker.store.registry import Registry

    line = f"{source} {public_hex}" if public_hex else read_text(Path(source))
    name, key_hex = signing.parse_public(line)
    registry = Registry(settings)
    registry.ping()
    registry.trust_key(name, key_hex)
    click.echo(f"trusted {name}")


@keys.command("list")
@click.pass_obj
def keys_list(settings: Settings) -> None:
    """Local keys, and the trust list in Redis (or what a coordinator trusts without one)."""
    from phibroker.security import signing
    from phibroker.store.registry import Registry

    local = signing.local_public_keys(settings.home)
    for name, key_hex in local.items():
        click.echo(f"local    {name} {key_hex}")
    registry = Registry(settings)
    registry.ping()
    trusted = registry.trusted_keys()
    for name, key_hex in trusted.items():
        click.echo(f"trusted  {name} {key_hex}")
    if not trusted:
        click.echo("no trust list configured: coordinators trust the local keys above")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", help="the signer [$PHIBROKER_APPROVER or your login]")
@click.pass_obj
def sign(settings: Settings, file: str, name: str | None) -> None:
    """Sign FILE (writes FILE.sig) so a `coordinator --require-signed` runs it."""
    from pathlib import Path

    from phibroker.security import signing

    workflows.load(file)  # only valid files are worth signing
    key, created = signing.load_or_create(settings.home, name or signing.default_name())
    if created:
        click.echo(f"created key {key.name} in {settings.home}", err=True)
    click.echo(str(signing.sign_file(key, Path(file))))
