"""The `phibroker` group, its error handling, and what several commands share."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from phibroker import __version__
from phibroker.errors import BrokerUnavailable, InvalidInput, PhibrokerError
from phibroker.settings import Settings, without_password
from phibroker.workflow.spec import parse_duration


class _Group(click.Group):
    """Every PhibrokerError becomes `error: ...` on stderr and its exit code, never a traceback; so does
    a broker out of reach or saying "not now" (full, busy, loading) wherever a command met it: exit 3."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PhibrokerError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:
            from phibroker.store.connection import unusable

            error = unusable(ctx.obj if isinstance(ctx.obj, Settings) else Settings(), exc)
            if error is None:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)


class _Setting(click.Option):
    """A global option named after its setting, whose help ends with the value a command would use
    now: its environment variable's, else the default (a password in a URL shown as ***)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        names, text = record
        value = os.environ.get(str(self.envvar))
        source = f"from ${self.envvar}" if value else f"default, or ${self.envvar}"
        shown = without_password(value or str(Settings.model_fields[str(self.name)].default))
        return names, f"{text} [now: {shown} ({source})]"


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="phibroker")
@click.option("--redis", "redis_url", cls=_Setting, envvar="PHIBROKER_REDIS_URL", metavar="URL", help="Redis URL")
@click.option("--namespace", cls=_Setting, envvar="PHIBROKER_NAMESPACE", metavar="NS", help="key prefix")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, namespace: str | None) -> None:
    """Workflows for teams of AI agents, on Redis Streams."""
    overrides: dict[str, Any] = {k: v for k, v in {"redis_url": redis_url, "namespace": namespace}.items() if v}
    ctx.obj = Settings(**overrides)


def read_text(path: Any) -> str:
    try:
        return str(path.read_text()).strip()
    except OSError as exc:
        raise InvalidInput(f"{path}: {exc.strerror or exc}") from None


def show_rows(rows: list[dict[str, Any]], as_json: bool, empty: str, line: Callable[[dict[str, Any]], str]) -> None:
    """A listing: a JSON array with --json, else one line per row (or what it means to have none)."""
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(line(row))
    if not rows:
        click.echo(empty)


def reachable(settings: Settings) -> None:
    """A long-running command checks the broker once at start: a bad URL is one line, not a loop's
    traceback. A Redis that answers "not now" (a runaway script, loading its data) is waited for, as
    the loops wait for it: a process started meanwhile runs once it serves again."""
    from phibroker.store.connection import Connection

    connection = Connection(settings)
    backoff = 0.1
    try:
        while True:
            try:
                connection.ping()
                return
            except BrokerUnavailable as exc:
                if not exc.for_now:
                    raise
                logging.getLogger("phibroker").warning("%s; retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
    finally:
        connection.close()


def long_running() -> None:
    """A coordinator or worker makes short-lived objects by the thousand per batch, few in cycles:
    what is loaded by now is kept out of the cyclic collector's walks, and it runs ten times rarer."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(7_000, 10, 10)


def stop_on_signals(stop: Any) -> None:
    """First SIGINT/SIGTERM: stop cleanly. A second SIGINT: leave now."""

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and getattr(handler, "seen", False):
            raise SystemExit(130)
        handler.seen = True  # type: ignore[attr-defined]
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def duration(text: str, option: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InvalidInput(f"{option}: {exc}") from None
