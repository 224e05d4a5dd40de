"""The `phibroker` command: parses arguments, calls the library, turns errors into one line and an exit code."""

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
from phibroker import workflow as workflows
from phibroker.engine.state import WF_TERMINAL
from phibroker.errors import InvalidInput, PhibrokerError
from phibroker.settings import Settings
from phibroker.workflow import dag
from phibroker.workflow.spec import parse_duration


class _Group(click.Group):
    """Every PhibrokerError becomes `error: ...` on stderr and its exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PhibrokerError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="phibroker")
@click.option("--redis", "redis_url", envvar="PHIBROKER_REDIS_URL", help="Redis URL [redis://localhost:6379/0]")
@click.option("--namespace", envvar="PHIBROKER_NAMESPACE", help="key prefix [phi]")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, namespace: str | None) -> None:
    """Workflows for teams of AI agents, on Redis Streams."""
    overrides: dict[str, Any] = {k: v for k, v in {"redis_url": redis_url, "namespace": namespace}.items() if v}
    ctx.obj = Settings(**overrides)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print levels and critical path as JSON")
def validate(file: str, as_json: bool) -> None:
    """Check FILE; print what runs in parallel and the critical path."""
    wf = workflows.load(file)
    path, length = wf.critical_path
    if as_json:
        click.echo(json.dumps({"levels": wf.levels, "critical_path": path, "length": length}))
        return
    click.echo(f"{wf.name}: valid, {len(wf.tasks)} tasks in {len(wf.levels)} levels")
    for number, level in enumerate(wf.levels, 1):
        shown = ", ".join(level[:12]) + (f", … (+{len(level) - 12})" if len(level) > 12 else "")
        click.echo(f"  {number:>3}. {shown}")
    click.echo(f"critical path ({_seconds(length)}): {' -> '.join(path)}")


@main.command()
@click.argument("target", metavar="FILE|ID")
@click.option("--format", "fmt", type=click.Choice(["dot", "mermaid"]), default="dot", show_default=True)
@click.pass_obj
def graph(settings: Settings, target: str, fmt: str) -> None:
    """Print the DAG of FILE, or of the run ID with the state of each task, for Graphviz or Mermaid;
    where a broker answers, the subscriptions that react to its events are drawn as dashed side edges."""
    from phibroker.runtime.events import graph_edges

    states: dict[str, str] | None = None
    if workflows.names_a_file(target):
        wf = workflows.load(target)
    else:
        from phibroker.errors import UnknownWorkflow
        from phibroker.runtime.client import Client

        with Client(settings) as client:
            try:
                wf, doc = client.workflow(target), client.status(target)
            except UnknownWorkflow:
                raise InvalidInput(f"{target!r} is neither a workflow file nor the id of a run") from None
        states = {name: task["state"] for name, task in doc["tasks"].items()}
    edges = graph_edges(settings, wf)
    if fmt == "dot":
        click.echo(dag.to_dot(wf.deps, name=wf.name, labels=wf.labels(), side_edges=edges, states=states), nl=False)
    else:
        click.echo(dag.to_mermaid(wf.deps, labels=wf.labels(), side_edges=edges, states=states), nl=False)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="override a param")
@click.option("--id", "wf_id", help="the workflow id; submitting the same id again is a no-op")
@click.option("--wait", is_flag=True, help="wait for the end; exit 1 unless it succeeded")
@click.option("--timeout", help="with --wait: stop waiting after this long (10s, 5m, ...)")
@click.option("--json", "as_json", is_flag=True, help="stdout: one JSON object")
@click.pass_obj
def submit(
    settings: Settings,
    file: str,
    params: tuple[str, ...],
    wf_id: str | None,
    wait: bool,
    timeout: str | None,
    as_json: bool,
) -> None:
    """Validate FILE and submit it."""
    from phibroker.runtime.client import Client

    wf = workflows.load(file)
    overrides = wf.parse_overrides(params)
    limit = _duration(timeout, "--timeout") if timeout else None
    with Client(settings) as client:
        wf_id = client.submit(wf, overrides, id=wf_id)
        if not wait:
            click.echo(json.dumps({"id": wf_id}) if as_json else wf_id)
            return
        click.echo(f"submitted {wf_id}; waiting for it to end", err=True)
        status = client.wait(wf_id, timeout=limit, on_progress=_progress_printer(client.live_agents))
    if status["state"] not in WF_TERMINAL:
        click.echo(f"stopped waiting; the run goes on (phibroker status {wf_id})", err=True)
    if as_json:
        click.echo(json.dumps(status, default=str))
    else:
        _print_status(status)
    sys.exit(0 if status["state"] == "succeeded" else 1)


@main.command()
@click.argument("wf_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(settings: Settings, wf_id: str, as_json: bool) -> None:
    """The workflow ID and every task."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        doc = client.status(wf_id)
    if as_json:
        click.echo(json.dumps(doc, default=str))
    else:
        _print_status(doc)


@main.command(name="list")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_(settings: Settings, limit: int, as_json: bool) -> None:
    """Running and recent workflows, newest first."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        rows = client.list(limit)
    paint = _painter()

    def line(row: dict[str, Any]) -> str:
        state = paint(f"{row['state'] or '?':<17}", row["state"])
        return f"{row['id']:<40} {state} {_took(row['created_at'], row['finished_at'])}"

    _show(rows, as_json, "no workflows", line)


@main.command()
@click.argument("wf_id", metavar="ID")
@click.option("--reason", help="recorded with the cancellation")
@click.option("--json", "as_json", is_flag=True, help='stdout: {"id": ..., "ok": true}')
@click.pass_obj
def cancel(settings: Settings, wf_id: str, reason: str | None, as_json: bool) -> None:
    """Cancel workflow ID: nothing new starts, running tasks are asked to stop, compensations run."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        client.cancel(wf_id, reason)
    click.echo(json.dumps({"id": wf_id, "ok": True}) if as_json else f"cancelling {wf_id}")


@main.command()
@click.option("--agent", "agent_name", required=True, help="the agent whose tasks this worker runs")
@click.option("--app", help="MODULE[:ATTR] holding the Agent (default: the workers package)")
@click.option("--concurrency", default=4, show_default=True, help="handlers running at once")
@click.option("--reclaim-after", help="presume a silent worker dead after this long [30s]")
@click.option("--burst", is_flag=True, help="exit once the stream is empty")
@click.pass_obj
def worker(
    settings: Settings,
    agent_name: str,
    app: str | None,
    concurrency: int,
    reclaim_after: str | None,
    burst: bool,
) -> None:
    """Run the commands and subscriptions of one agent."""
    from phibroker.runtime.agent import load_agent
    from phibroker.runtime.worker import Worker

    if reclaim_after:
        settings = settings.model_copy(update={"reclaim_after": _duration(reclaim_after, "--reclaim-after")})
    if concurrency < 1:
        raise InvalidInput("--concurrency must be at least 1")
    agent = load_agent(agent_name, app)
    _reachable(settings)
    _logging()
    runner = Worker(agent, settings, concurrency=concurrency)
    _long_running()
    _stop_on_signals(runner.stop)
    if not runner.work(burst=burst):
        logging.shutdown()
        os._exit(0)  # handlers past the grace period: don't wait for them, their tasks are not acked


@main.command()
@click.option("--require-signed", is_flag=True, help="refuse workflow files without a trusted signature")
@click.option("--burst", is_flag=True, help="exit once there is nothing left to do")
@click.pass_obj
def coordinator(settings: Settings, require_signed: bool, burst: bool) -> None:
    """Run a coordinator: results in, DAG progress, dispatches out. Several may run at once."""
    from phibroker.runtime.coordinator import Coordinator

    _reachable(settings)
    _logging()
    runner = Coordinator(settings, require_signed=require_signed)
    _long_running()
    _stop_on_signals(runner.stopping.set)
    runner.run(burst=burst)


@main.command()
@click.option("--example", type=click.Path(dir_okay=False, exists=True), help="workflow [examples/complete-dag.yaml]")
@click.option("--no-example", is_flag=True, help="only run the broker, the coordinator and the workers")
@click.option("--once", is_flag=True, help="stop everything once the example ends; exit 1 unless it succeeded")
@click.option("--app", help="MODULE holding the agents (default: the reference agents in the workers package)")
@click.option("--fresh", is_flag=True, help="start dev's redis-server empty: removes $PHIBROKER_HOME/dev-data")
@click.pass_obj
def dev(settings: Settings, example: str | None, no_example: bool, once: bool, app: str | None, fresh: bool) -> None:
    """A first try: a broker, the coordinator, the reference workers and an example workflow."""
    from pathlib import Path

    from phibroker.tools.devserver import DevServer, find_example

    if example and no_example:
        raise InvalidInput("--example and --no-example exclude each other")
    chosen = None if no_example else Path(example) if example else find_example()
    if not no_example and chosen is None:
        raise InvalidInput("examples/complete-dag.yaml not found; pass --example FILE or --no-example")
    sys.exit(DevServer(settings, app=app, example=chosen, once=once, fresh=fresh).run())


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def approvals(settings: Settings, as_json: bool) -> None:
    """Open approval requests."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        requests = client.approvals()
    rows = [{k: r.get(k) for k in ("id", "workflow", "task", "message", "deadline")} for r in requests]

    def line(row: dict[str, Any]) -> str:
        due = f" (times out in {row['deadline'] - time.time():.0f}s)" if row["deadline"] else ""
        return f"{row['id']}  {row['workflow']} / {row['task']}: {row['message']}{due}"

    _show(rows, as_json, "no open approvals", line)


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

    line = f"{source} {public_hex}" if public_hex else _read(Path(source))
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


def _read(path: Any) -> str:
    try:
        return str(path.read_text()).strip()
    except OSError as exc:
        raise InvalidInput(f"{path}: {exc.strerror or exc}") from None


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
    _show(
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


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def subs(settings: Settings, as_json: bool) -> None:
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

    _show(rows, as_json, "no subscriptions", line)


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
    _show(
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
    """Put dead letters back on the streams they came from."""
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


@main.command("rq-bridge")
@click.option("--agent", "agent_name", required=True, help="the agent whose tasks become RQ jobs")
@click.option("--queue", "queue_name", required=True, help="the RQ queue the jobs are enqueued on")
@click.option(
    "--map", "pairs", multiple=True, metavar="COMMAND=MODULE.FUNCTION", help="a command and the job function it runs"
)
@click.option("--concurrency", default=16, show_default=True, help="RQ jobs awaited at once")
@click.option("--rq-redis", help="the Redis URL of RQ [the broker's]")
@click.pass_obj
def rq_bridge(
    settings: Settings, agent_name: str, queue_name: str, pairs: tuple[str, ...], concurrency: int, rq_redis: str | None
) -> None:
    """Serve an agent's tasks with RQ: each task runs as an RQ job, its outcome becomes the task's result."""
    try:
        from phibroker.interop.rq import Bridge, parse_map
    except ImportError as exc:
        raise InvalidInput(f"rq-bridge needs RQ ({exc}): pip install 'phibroker[rq]'") from None

    if concurrency < 1:
        raise InvalidInput("--concurrency must be at least 1")
    mapping = parse_map(pairs)
    _logging()
    bridge = Bridge(agent_name, queue_name, mapping, settings, concurrency=concurrency, rq_redis_url=rq_redis)
    _stop_on_signals(bridge.stop)
    if not bridge.work():
        logging.shutdown()
        os._exit(0)  # jobs still awaited after the grace period: their tasks stay unacked for another bridge


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


@main.command()
@click.argument("wf_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help='stdout: {"id", "state", "lines": [...]}')
@click.pass_obj
def why(settings: Settings, wf_id: str, as_json: bool) -> None:
    """What workflow ID waits on: dependencies, workers, retries, approvals, deadlines."""
    from phibroker.tools import diagnose

    report = diagnose.why_report(settings, wf_id)
    click.echo(json.dumps(report) if as_json else "\n".join(report["lines"]))


@main.group()
def acl() -> None:
    """Redis ACL users for production: one per agent, the coordinators, a read-only `watch`, an `admin`."""


@acl.command("generate")
@click.option("--agents", required=True, help="the agents, comma-separated: webc,dc,vssc,kalic,cmdc")
@click.option("--out", "out_dir", default="deploy/secrets", show_default=True, type=click.Path(file_okay=False))
@click.option("--host", default="localhost", show_default=True, help="the Redis host the env files' URLs name")
@click.option("--port", default=6379, show_default=True, help="the Redis port the env files' URLs name")
@click.option("--tls", is_flag=True, help="rediss:// URLs")
@click.option("--identities-path", default="/etc/phibroker/identities.json", show_default=True)
@click.option(
    "--subscription",
    "subscriptions",
    multiple=True,
    metavar="AGENT=NAME",
    help="a subscription of AGENT named other than AGENT.function",
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
    identities_path: str,
    subscriptions: tuple[str, ...],
    force: bool,
) -> None:
    """Write users.acl, one USER.env per user and identities.json, with fresh random secrets."""
    from pathlib import Path

    from phibroker.security import acl as acls

    names = acls.parse_agents(agents)
    bundle = acls.generate(
        settings.namespace,
        names,
        host=host,
        port=port,
        tls=tls,
        identities_path=identities_path,
        subscriptions=acls.parse_subscriptions(subscriptions, names),
    )
    for path in acls.write(Path(out_dir), bundle, force=force):
        click.echo(str(path))


def _show(rows: list[dict[str, Any]], as_json: bool, empty: str, line: Callable[[dict[str, Any]], str]) -> None:
    """A listing: a JSON array with --json, else one line per row (or what it means to have none)."""
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(line(row))
    if not rows:
        click.echo(empty)


def _reachable(settings: Settings) -> None:
    """A long-running command checks the broker once at start: a bad URL is one line, not a loop's traceback."""
    from phibroker.store.connection import Connection

    connection = Connection(settings)
    try:
        connection.ping()
    finally:
        connection.close()


def _long_running() -> None:
    """A coordinator or worker makes short-lived objects by the thousand per batch, few in cycles:
    what is loaded by now is kept out of the cyclic collector's walks, and it runs ten times rarer."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(7_000, 10, 10)


def _stop_on_signals(stop: Any) -> None:
    """First SIGINT/SIGTERM: stop cleanly. A second SIGINT: leave now."""

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and getattr(handler, "seen", False):
            raise SystemExit(130)
        handler.seen = True  # type: ignore[attr-defined]
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _duration(text: str, option: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InvalidInput(f"{option}: {exc}") from None


def _progress_printer(live_agents: Callable[[], set[str]]) -> Callable[[dict[str, Any]], None]:
    """`submit --wait`'s progress on stderr, plus what the user can act on while it waits: an agent
    with work and no live worker, an approval to decide (each said once)."""
    last = [""]
    said: set[str] = set()

    def show(status: dict[str, Any]) -> None:
        tasks = status["tasks"].values()
        done = sum(1 for t in tasks if t["state"] in ("succeeded", "failed", "skipped", "cancelled", "compensated"))
        running = sum(1 for t in tasks if t["state"] in ("running", "ready", "retrying"))
        line = f"{status['state']}: {done}/{len(status['tasks'])} tasks done, {running} in flight"
        if line != last[0]:
            click.echo(f"  {line}", err=True)
            last[0] = line
        for note in _waiting_notes(status, live_agents, said):
            click.echo(note, err=True)

    return show


def _waiting_notes(status: dict[str, Any], live_agents: Callable[[], set[str]], said: set[str]) -> list[str]:
    """What a run waits on that only the user can give: a worker for an agent, or a decision. `said`
    keeps what was already told, so each is told once; leases are read only while something may lack one."""
    notes = []
    busy = {t["agent"] for t in status["tasks"].values() if t["agent"] and t["state"] in ("ready", "running")}
    unsaid = {agent for agent in busy if f"agent {agent}" not in said}
    if unsaid:
        for agent in sorted(unsaid - live_agents()):
            said.add(f"agent {agent}")
            notes.append(f"no live worker for agent {agent}: start one with phibroker worker --agent {agent}")
    for name, task in status["tasks"].items():
        request = (task.get("approval") or {}).get("request")
        if request and task["state"] == "running" and f"approval {request}" not in said:
            said.add(f"approval {request}")
            notes.append(
                f"approval {request} ({name}) waits: phibroker approve {request}"
                f" / phibroker reject {request} --reason ..."
            )
    return notes


def _print_status(doc: dict[str, Any]) -> None:
    paint = _painter()
    took = _took(doc["created_at"], doc["finished_at"])
    click.echo(f"{doc['id']} ({doc['name']}): {paint(str(doc['state']), doc['state'])} {took}")
    if doc.get("error"):
        click.echo(f"  {doc['error']}")
    width = max((len(n) for n in doc["tasks"]), default=4)
    for name, task in doc["tasks"].items():
        state = paint(f"{task['state']:<11}", task["state"])
        line = f"  {name:<{width}}  {state} {task['agent'] or 'approval':<8} attempts {task['attempts']}"
        if task["started_at"] and task["finished_at"]:
            line += f"  {task['finished_at'] - task['started_at']:.2f}s"
        if task["error"] and task["state"] not in ("succeeded",):
            line += f"  {task['error']}"
        click.echo(line)


def _painter() -> Callable[[str, str | None], str]:
    """Colours a state's text on a terminal; through a pipe, or with NO_COLOR set, text stays plain."""
    if os.environ.get("NO_COLOR") or not sys.stdout.isatty():
        return lambda text, state: text
    from phibroker.tools.styles import STATE_STYLES

    def paint(text: str, state: str | None) -> str:
        words = STATE_STYLES.get(state or "", "").split()  # a colour, perhaps with `bold` or `dim`
        colour = next((w for w in words if w not in ("bold", "dim")), None)
        return click.style(text, fg=colour, bold="bold" in words or None, dim="dim" in words or None) if words else text

    return paint


def _took(created: float | None, finished: float | None) -> str:
    if not created:
        return ""
    end = finished or time.time()
    verb = "took" if finished else "for"
    return f"({verb} {end - created:.1f}s)"


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f}h"
    if value >= 60:
        return f"{value / 60:.1f}m"
    return f"{value:g}s"
