"""Workflow files and runs: validate, graph, submit, status, list, cancel, why."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import click

from phibroker import workflow as workflows
from phibroker.cli.app import (
    duration,
    main,
)
from phibroker.cli.output import (
    drawn_states,
    looped_workflow,
    output_line,
    painter,
    print_status,
    progress_printer,
    run_lines,
    seconds,
    warn_unserved,
)
from phibroker.engine.state import WF_TERMINAL, WF_WINDING_DOWN
from phibroker.errors import InvalidInput
from phibroker.settings import Settings
from phibroker.workflow import drawing
from phibroker.workflow.rules import explain_rules, rule_warnings


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print levels, critical path and each task's rule as JSON")
def validate(file: str, as_json: bool) -> None:
    """Check FILE; print what runs in parallel and the critical path. Warns on stderr about trigger
    rules that can never fire or have no effect (the file is still valid)."""
    wf = workflows.load(file)
    path, length = wf.critical_path
    warnings = rule_warnings(wf)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        notes = explain_rules(wf)
        tasks: dict[str, dict[str, Any]] = {name: {"trigger": note.as_json()} for name, note in notes.items()}
        for name, task in wf.tasks.items():
            if task.budget is not None:
                tasks[name]["budget"] = dataclasses.asdict(task.budget)
        doc = {"levels": wf.levels, "critical_path": path, "length": length, "tasks": tasks}
        if wf.spec.budget is not None:  # only then: the keys above are a contract
            doc["budget"] = dataclasses.asdict(wf.spec.budget)
        click.echo(json.dumps({**doc, "warnings": warnings}))
        return
    click.echo(f"{wf.name}: valid, {len(wf.tasks)} tasks in {len(wf.levels)} levels")
    for number, level in enumerate(wf.levels, 1):
        shown = ", ".join(level[:12]) + (f", … (+{len(level) - 12})" if len(level) > 12 else "")
        click.echo(f"  {number:>3}. {shown}")
    click.echo(f"critical path ({seconds(length)}): {' -> '.join(path)}")
    for line in drawing.summary(wf):
        click.echo(line)
    for line in budget_lines(wf):
        click.echo(line)


def budget_lines(wf: workflows.Workflow) -> list[str]:
    """`validate`'s lines on budgets: the run's, and the tasks' own (none set: no line)."""
    lines = [f"run budget: {wf.spec.budget.describe()}"] if wf.spec.budget else []
    own = [f"{name} {task.budget.describe()}" for name, task in wf.tasks.items() if task.budget]
    if own:
        lines.append(f"task budgets: {'; '.join(own)}")
    return lines


@main.command()
@click.argument("target", metavar="FILE|ID")
@click.option("--format", "fmt", type=click.Choice(["dot", "mermaid"]), default="dot", show_default=True)
@click.pass_obj
def graph(settings: Settings, target: str, fmt: str) -> None:
    """Print the DAG of FILE, or of the run ID with the state of each task, for Graphviz or Mermaid;
    where a broker answers, the subscriptions that react to its events are drawn as dashed side edges."""
    from phibroker.runtime.events import graph_edges

    states: dict[str, str] | None = None
    doc: dict[str, Any] | None = None
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
            states = drawn_states(client, doc)
    figure = drawing.figure(wf, doc)
    edges = [*graph_edges(settings, wf), *(drawing.spawn_edges(doc) if doc else ())]
    if fmt == "dot":
        click.echo(drawing.to_dot(figure, wf.name, edges, states), nl=False)
    else:
        click.echo(drawing.to_mermaid(figure, edges, states), nl=False)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="override a param")
@click.option(
    "--id", "wf_id", help="the workflow id (at most 200 letters, digits, _ . -); submitting it again is a no-op"
)
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
    limit = duration(timeout, "--timeout") if timeout else None
    with Client(settings) as client:
        wf_id = client.submit(wf, overrides, id=wf_id)
        told = warn_unserved(client, wf)
        if not wait:
            click.echo(json.dumps({"id": wf_id}) if as_json else wf_id)
            return
        click.echo(f"submitted {wf_id}; waiting for it to end", err=True)
        status = client.wait(wf_id, timeout=limit, on_progress=progress_printer(client.live_agents, told))
    if status["state"] not in WF_TERMINAL:
        click.echo(f"stopped waiting; the run goes on (phibroker status {wf_id})", err=True)
    if as_json:
        click.echo(json.dumps(status, default=str))
    else:
        print_status(status, wf)
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
        workflow = None if as_json else looped_workflow(client, doc)
    if as_json:
        click.echo(json.dumps(doc, default=str))
    else:
        print_status(doc, workflow)


@main.command()
@click.argument("wf_id", metavar="ID")
@click.option("--task", metavar="TASK", help="only this task's output, log records and events")
@click.option("--follow", "-f", is_flag=True, help="go on until the run ends; exit 1 unless it succeeded")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.pass_obj
def logs(settings: Settings, wf_id: str, task: str | None, follow: bool, as_json: bool) -> None:
    """What run ID's tasks streamed (ctx.stream) and logged, and its state changes, in order."""
    from phibroker.runtime.client import Client
    from phibroker.workflow.spec import did_you_mean

    paint = painter()
    with Client(settings) as client:
        if task is not None and not follow:
            known = client.status(wf_id)["tasks"]
            if task not in known:
                raise InvalidInput(f"run {wf_id} has no task {task!r}{did_you_mean(task, known)}")
        for record in client.stream(wf_id, task=task, follow=follow):
            click.echo(json.dumps(record, default=str) if as_json else output_line(record, paint))
        if follow:
            state = client.status(wf_id)["state"]
    if follow:
        sys.exit(0 if state == "succeeded" else 1)


RUN_STATES = sorted(WF_WINDING_DOWN | {"running", "waiting_approval"})
CANCEL_WAIT = 5.0  # seconds `cancel` waits for the coordinators to take it (or refuse it)


@main.command(name="list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--state", "states", multiple=True, type=click.Choice(RUN_STATES), help="only runs in this state (repeatable)"
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_(settings: Settings, limit: int, states: tuple[str, ...], as_json: bool) -> None:
    """Running and recent workflows, newest first: state, when submitted, how long they took."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        rows = client.list(limit, states, spend=not as_json)  # `--json` rows keep their documented keys
    if as_json:
        click.echo(json.dumps(rows))
    elif rows:
        click.echo("\n".join(run_lines(rows)))
    else:
        click.echo("no workflows" + (f" in state {' or '.join(states)}" if states else ""))


@main.command()
@click.argument("wf_id", metavar="ID")
@click.option("--reason", help="recorded with the cancellation")
@click.option("--task", "tasks", multiple=True, metavar="TASK", help="cancel only this task (repeat for a region)")
@click.option("--json", "as_json", is_flag=True, help='stdout: {"id": ..., "ok": true}')
@click.pass_obj
def cancel(settings: Settings, wf_id: str, reason: str | None, tasks: tuple[str, ...], as_json: bool) -> None:
    """Cancel workflow ID: nothing new starts, running tasks are asked to stop, compensations run.

    With --task, only those tasks: they count as skipped for what depends on them, and the run goes on.
    It waits a few seconds for the coordinators to take it: one they refuse (not this identity's run)
    exits 2, saying why."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        taken = client.cancel(wf_id, reason, tasks, wait=CANCEL_WAIT)
    what = f"{', '.join(tasks)} of {wf_id}" if tasks else wf_id
    if as_json:
        click.echo(json.dumps({"id": wf_id, "ok": True}))
    else:
        click.echo(f"cancelling {what}" if taken else f"cancel of {what} sent; no coordinator has taken it yet")


@main.command()
@click.argument("wf_id", metavar="ID")
@click.option(
    "--from", "from_task", metavar="TASK", help="run again from this task (default: every task that did not succeed)"
)
@click.option("--wait", is_flag=True, help="wait for the end; exit 1 unless it succeeded")
@click.option("--json", "as_json", is_flag=True, help="stdout: the status, as status --json")
@click.pass_obj
def retry(settings: Settings, wf_id: str, from_task: str | None, wait: bool, as_json: bool) -> None:
    """Run an ended run again from a step: TASK (or every task that did not succeed) and all below it.

    Succeeded tasks upstream keep their results; the history keeps every earlier attempt."""
    from phibroker.runtime.client import Client

    with Client(settings) as client:
        status = client.retry(wf_id, from_task)
        click.echo(f"re-opened {wf_id}" + (f" from {from_task}" if from_task else ""), err=True)
        if wait:
            status = client.wait(wf_id, on_progress=progress_printer(client.live_agents, set()))
    if as_json:
        click.echo(json.dumps(status, default=str))
    elif wait:
        print_status(status)
    if wait:
        sys.exit(0 if status["state"] == "succeeded" else 1)


@main.command()
@click.argument("wf_id", metavar="ID")
@click.argument("name")
@click.option("--data", default="null", metavar="JSON", help="the signal's data: the gate's result")
@click.option("--json", "as_json", is_flag=True, help='stdout: {"id": ..., "signal": ..., "ok": true}')
@click.pass_obj
def signal(settings: Settings, wf_id: str, name: str, data: str, as_json: bool) -> None:
    """Send run ID the signal NAME: the first `signal: {name: NAME}` gate waiting takes it (or the
    next to open: a signal that comes early is kept)."""
    from phibroker.runtime.client import Client

    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--data is not JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise InvalidInput("--data nests too deep") from None
    except ValueError as exc:  # a number of more than 4300 digits
        raise InvalidInput(f"--data: {str(exc).partition(':')[0]}") from None
    with Client(settings) as client:
        client.signal(wf_id, name, value)
    click.echo(json.dumps({"id": wf_id, "signal": name, "ok": True}) if as_json else f"signalled {name} to {wf_id}")


@main.command()
@click.argument("wf_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help='stdout: {"id", "state", "lines": [...]}')
@click.pass_obj
def why(settings: Settings, wf_id: str, as_json: bool) -> None:
    """What workflow ID waits on: dependencies, workers, retries, approvals, deadlines."""
    from phibroker.tools import diagnose

    report = diagnose.why_report(settings, wf_id)
    click.echo(json.dumps(report) if as_json else "\n".join(report["lines"]))
