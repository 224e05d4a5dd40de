"""What the page reads beyond the CLI's documents: list progress, agents' lanes, one task's inputs.

Read-only and bounded, like `watch`: progress is read only for runs still going, and a run's units only
while they are few enough (`PROGRESS_FIELDS`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from phibroker.engine.records import status_document
from phibroker.engine.state import TASK_TERMINAL, WF_TERMINAL
from phibroker.errors import InvalidInput, UnknownWorkflow
from phibroker.runtime.client import Client
from phibroker.store.connection import reaching
from phibroker.store.views import Views
from phibroker.tools.watch import SPEC_CAP, Plan, plan_of, spawned_tasks
from phibroker.workflow import from_stored
from phibroker.workflow.loader import Workflow, task_fields

PROGRESS_FIELDS = 50_000  # unit fields read per request for progress, over all runs
PLANS_KEPT = 2_000  # specs parsed and kept between requests


def progress(client: Client, ids: Sequence[str], plans: dict[str, Plan]) -> dict[str, dict[str, Any]]:
    """`{id: {"done", "total"}}` for the runs among `ids` still going (tasks ended / tasks, spawned ones
    included); runs that ended, or too big to read now, are left out. `plans` keeps parsed specs."""
    views = Views(client.broker)
    with reaching(client.settings):
        heads = views.workflow_heads(list(ids))
        going = [(i, h) for i, h in zip(ids, heads, strict=True) if h and h.get("state") not in WF_TERMINAL]
        budget, wanted = PROGRESS_FIELDS, []
        for wf_id, head in going:
            if head["fields"] <= budget and 0 < head["spec_size"] <= SPEC_CAP:
                wanted.append(wf_id)
                budget -= head["fields"]
        unread = [i for i in wanted if i not in plans]
        specs, units = views.workflow_bodies(unread, wanted)
    if len(plans) > PLANS_KEPT:
        plans.clear()
    plans.update({i: plan_of(text) for i, text in zip(unread, specs, strict=True) if text})
    out = {}
    for wf_id, unit_states in zip(wanted, units, strict=True):
        plan = plans.get(wf_id)
        if plan is None:
            continue
        names = [*plan.deps, *spawned_tasks(plan, unit_states)]
        done = sum(1 for t in names if unit_states.get(t, {}).get("state") in TASK_TERMINAL)
        out[wf_id] = {"done": done, "total": len(names)}
    return out


def lanes(client: Client, agents: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per agent, its two lanes (tasks and bulk) as one: length, pending and lag (None: Redis cannot tell)."""
    keys = client.settings.keys
    with reaching(client.settings):
        health = Views(client.broker).stream_health(
            [keys.agent_tasks(a) for a in agents] + [keys.agent_bulk(a) for a in agents]
        )
    out = {}
    for agent, tasks, bulk in zip(agents, health[: len(agents)], health[len(agents) :], strict=True):
        present = [h for h in (tasks, bulk) if h is not None]
        lags = [h["lag"] for h in present]
        out[agent] = {
            "length": sum(h["length"] for h in present),
            "pending": sum(h["pending"] for h in present),
            "lag": None if None in lags else sum(lags),
        }
    return out


def task_detail(client: Client, wf_id: str, name: str) -> dict[str, Any]:
    """One task as the page's side panel shows it beside its status row: its spec, its payload (with
    `${...}` filled in once the task was dispatched), its inputs (the results of what it depends on)."""
    with reaching(client.settings):
        meta, units, results, history = client.broker.read_workflow(wf_id)
    if not meta.get("spec"):
        raise UnknownWorkflow(wf_id)
    doc = status_document(wf_id, meta, units, results, history, client.settings.max_message_bytes)
    if name not in doc["tasks"]:
        raise InvalidInput(f"run {wf_id} has no task {name!r}")
    workflow = from_stored(meta["spec"])
    spawned = (meta.get("children") or {}).get(name)
    spec = task_fields(spawned) if spawned is not None else _spec_of(workflow, name)
    row = doc["tasks"][name]
    return {
        "task": name,
        "spec": spec,
        "payload": _payload(workflow, name, spec, doc) if row["attempts"] else spec.get("payload") or {},
        "inputs": _inputs(spec.get("depends_on") or [], doc["tasks"]),
    }


def _spec_of(workflow: Workflow, name: str) -> dict[str, Any]:
    """The task as its file wrote it (a sub-workflow by its name, not its whole body)."""
    spec = dict((workflow.source.get("tasks") or {}).get(name) or {})
    if isinstance(spec.get("workflow"), dict):
        spec["workflow"] = spec["workflow"].get("name") or "embedded"
    return spec


def _payload(workflow: Workflow, name: str, spec: Mapping[str, Any], doc: Mapping[str, Any]) -> Any:
    """The payload as the coordinator rendered it from what the run knows; as written if it cannot be."""
    template = workflow.payload.get(name)
    if template is None:
        return spec.get("payload") or {}
    try:
        return template.render({"params": doc.get("params") or {}, "tasks": _task_scope(doc["tasks"]), "result": None})
    except Exception:  # noqa: BLE001 - a reference this view cannot fill: show the template
        return spec.get("payload") or {}


def _task_scope(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """`tasks.NAME.result|state|error|iterations|children` as expressions see them, from the status."""
    scope: dict[str, dict[str, Any]] = {}
    for name, row in tasks.items():
        iterations = row.get("iterations") or (1 if row["state"] == "succeeded" else 0)
        useful = row["state"] == "succeeded" or iterations > 1
        scope[name] = {
            "state": row["state"],
            "result": row.get("result") if useful else None,
            "error": row.get("error") if row["state"] in ("failed", "upstream_failed") else None,
            "iterations": iterations,
        }
    for name in tasks:
        parent, slash, child = name.rpartition("/")
        if slash and parent in scope:
            scope[parent].setdefault("children", {})[child] = scope[name]
    return scope


def _inputs(deps: Sequence[str], tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What a handler's `ctx.inputs` holds: the results of the upstream tasks that succeeded, and of
    the tasks they spawned (`TASK/NAME`)."""
    out = {}
    for dep in deps:
        for name, row in tasks.items():
            if (name == dep or name.startswith(dep + "/")) and row["state"] == "succeeded":
                out[name] = row.get("result")
    return out
