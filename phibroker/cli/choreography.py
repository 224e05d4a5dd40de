"""Events: triggers, subscriptions and the dead-letter queue."""

from __future__ import annotations

import json
from typing import Any

import click

from phibroker.cli.app import (
    main,
    show_rows,
)
from phibroker.errors import InvalidInput
from phibroker.settings import Settings


@main.group()
def triggers() -> None:
    """Workflows that events start: files with an `on:` section."""


@triggers.command("add")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_obj
def triggers_add(settings: Settings, file: str) -> None:
    """Register FILE: each event matching its `on:` starts it once, with the event's data as params."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        click.echo(f"trigger {client.add_trigger(file)} registered")


@triggers.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def triggers_list(settings: Settings, as_json: bool) -> None:
    """Registered triggers."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        rows = client.triggers()
    show_rows(
        rows,
        as_json,
        "no triggers",
        lambda r: f"{r['name']}: on {r['event']}" + (f" where {r['where']}" if r["where"] else ""),
    )


@triggers.command("remove")
@click.argument("name")
@click.pass_obj
def triggers_remove(settings: Settings, name: str) -> None:
    """Stop starting workflow NAME on events."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        client.remove_trigger(name)
    click.echo(f"trigger {name} removed")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def subs(ctx: click.Context, as_json: bool) -> None:
    """Event subscriptions: who listens to what, and how far behind each is."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(subs_list, as_json=as_json)


@subs.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def subs_list(settings: Settings, as_json: bool) -> None:
    """Event subscriptions: who listens to what, and how far behind each is."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        rows = client.subscriptions()

    def line(row: dict[str, Any]) -> str:
        lag = "unknown" if row["lag"] is None else row["lag"]
        return (
            f"{row['name']} ({row['agent']}) on {row['event']}: {row['length']} queued, lag {lag},"
            f" {row['pending']} pending, {row['dropped']} dropped"
        )

    show_rows(rows, as_json, "no subscriptions", line)


@subs.command("remove")
@click.argument("name")
@click.pass_obj
def subs_remove(settings: Settings, name: str) -> None:
    """Forget subscription NAME and the events queued for it (refused while a live worker serves it)."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        client.remove_subscription(name)
    click.echo(f"subscription {name} removed")


@main.group()
def dlq() -> None:
    """Dead letters: messages that could not be decoded or kept failing, with the reason."""


@dlq.command("list")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def dlq_list(settings: Settings, limit: int, as_json: bool) -> None:
    """The newest dead letters."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        rows = client.dead_letters(limit)
    show_rows(
        rows,
        as_json,
        "the dead-letter queue is empty",
        lambda r: f"{r['id']}  {r['source']}  {r['size']} bytes  {r['reason']}",
    )


@dlq.command("show")
@click.argument("entry_id", metavar="ID")
@click.pass_obj
def dlq_show(settings: Settings, entry_id: str) -> None:
    """One dead letter, its message decoded where it decodes."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        click.echo(json.dumps(client.dead_letter(entry_id), indent=2, default=repr))


@dlq.command("retry")
@click.argument("entry_ids", metavar="ID...", nargs=-1, required=True)
@click.pass_obj
def dlq_retry(settings: Settings, entry_ids: tuple[str, ...]) -> None:
    """Put dead letters back on the inbox or subscription stream they came from (a task's: retry its run)."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        for entry_id in entry_ids:
            click.echo(f"{entry_id} -> {client.retry_dead_letter(entry_id)}")


@dlq.command("purge")
@click.argument("entry_ids", metavar="[ID...]", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="every dead letter")
@click.pass_obj
def dlq_purge(settings: Settings, entry_ids: tuple[str, ...], everything: bool) -> None:
    """Delete dead letters: the ones named, or --all."""
    from phibroker.runtime.client import Client

    if not entry_ids and not everything:
        raise InvalidInput("name dead letters to purge, or pass --all")
    with Client(settings) as client:
        click.echo(f"purged {client.purge_dead_letters(list(entry_ids))}")
