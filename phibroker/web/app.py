"""The ASGI app of `phibroker ui`: its routes, the pages, the JSON API and the event streams.

The JSON routes answer exactly what the CLI's `--json` prints (`list`, `status`, `approvals`,
`agents`): they call the same library functions. The actions are `actions`'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from html import escape
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote, unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from phibroker.engine.records import approval_document
from phibroker.engine.state import WF_WINDING_DOWN
from phibroker.errors import BrokerUnavailable, InvalidInput, PhibrokerError, UnknownWorkflow
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.store.connection import reaching, unusable
from phibroker.tools import diagnose
from phibroker.tools.loopback import LoopbackOnly
from phibroker.web import actions, graph, sse, views
from phibroker.web.site import HEADERS, Site, json_response
from phibroker.workflow.render import STATE_COLOURS

HERE = Path(__file__).parent
RUN_STATES = frozenset(WF_WINDING_DOWN | {"running", "waiting_approval"})  # what `list --state` takes
LIST_LIMIT = 20  # `list`'s default
NAME_SCAN = 1_000  # newest runs looked through for a name filter
Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Site, Request], Awaitable[Response]]


def create_app(settings: Settings, allow_actions: bool = False, local: bool = True) -> Starlette:
    """The app; `local` (it listens on a loopback address) answers only requests made to a loopback
    name, so a web page whose domain was made to point at 127.0.0.1 (DNS rebinding) reads nothing."""
    site = Site(settings, allow_actions)
    app = Starlette(
        middleware=[Middleware(LoopbackOnly)] if local else [],
        routes=[
            Route("/", _page(site, "runs", "Runs")),
            Route("/approvals", _page(site, "approvals", "Approvals")),
            Route("/agents", _page(site, "agents", "Agents")),
            Route("/runs/{rest:path}", _guarded(site, _run_page)),
            Route("/states.css", _states_css),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            Route("/api/runs", _guarded(site, _runs)),
            Route("/api/progress", _guarded(site, _progress)),
            Route("/api/streams", _guarded(site, _streams)),
            Route("/api/approvals", _guarded(site, _approvals)),
            Route("/api/agents", _guarded(site, _agents)),
            Route("/api/approvals/{approval}/{decision}", _guarded(site, actions.decide), methods=["POST"]),
            Route("/api/runs/{rest:path}", _guarded(site, _run_api), methods=["GET", "POST"]),
        ],
    )
    app.state.site = site
    return app


# -- answers -------------------------------------------------------------------------------------------


def _error(exc: PhibrokerError, api: bool) -> Response:
    """The CLI's one line, with a status that says whose fault it is."""
    status = 503 if isinstance(exc, BrokerUnavailable) else 404 if isinstance(exc, UnknownWorkflow) else 400
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if api:
        return json_response({"ok": False, "error": line}, status)
    return _html(_shell("error", "Error", f'<p class="failure">{escape(line)}</p>', site=None), status)


def _guarded(site: Site, handler: Handler) -> Endpoint:
    """A PhibrokerError, or a broker out of reach or saying "not now", answers with its one line."""

    async def endpoint(request: Request) -> Response:
        api = request.url.path.startswith("/api/")
        try:
            return await handler(site, request)
        except PhibrokerError as exc:
            return _error(exc, api)
        except Exception as exc:
            error = unusable(site.settings, exc)
            if error is None:
                raise
            return _error(error, api)

    return endpoint


async def _json(read: Callable[..., Any], *args: Any) -> Response:
    return json_response(await run_in_threadpool(read, *args))


async def _approvals(site: Site, request: Request) -> Response:
    """`approvals --json`: the documented fields of each open request, nothing more."""
    requests = await run_in_threadpool(site.client.approvals)
    return json_response([approval_document(r) for r in requests])


async def _agents(site: Site, request: Request) -> Response:
    """`agents --json`."""
    return await _json(_worker_rows, site)


def _worker_rows(site: Site) -> list[dict[str, Any]]:
    """What `diagnose.agents` reads, on the page's own connection: a connection per request would, on
    a Redis Cluster, ask the nodes for the cluster's layout at every poll of the agents page."""
    with reaching(site.settings):
        now, leases = site.client.broker.worker_leases()
    return diagnose.worker_rows(now, leases)


# -- pages ---------------------------------------------------------------------------------------------


@cache
def _template(name: str) -> Template:
    return Template((HERE / "templates" / f"{name}.html").read_text())


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status, headers={**HEADERS, "Cache-Control": "no-store"})


def _shell(page: str, title: str, body: str, site: Site | None) -> str:
    """The page around a body: header, navigation, the token when actions are allowed."""
    actions = bool(site and site.allow_actions)
    token = escape(site.token) if site and actions else ""
    return _template("page").substitute(
        page=page,
        title=escape(title),
        body=body,
        actions="1" if actions else "0",
        csrf=f'<meta name="csrf-token" content="{token}">' if actions else "",
        csrf_field=f'<input type="hidden" name="csrf_token" value="{token}">' if actions else "",
        mode="actions on" if actions else "read-only",
    )


def _page(site: Site, page: str, title: str) -> Endpoint:
    """A page whose content the script reads from the JSON API."""

    async def endpoint(request: Request) -> Response:
        return _html(_shell(page, title, _template(page).substitute(), site))

    return endpoint


async def _run_page(site: Site, request: Request) -> Response:
    """`/runs/ID`: the run with its DAG drawn; `?part=graph` the drawing alone (for tasks spawned since)."""
    raw = request.scope.get("raw_path", b"").decode("latin-1").removeprefix("/runs/")
    wf_id = unquote(raw) if raw else str(request.path_params["rest"])
    doc, workflow = await run_in_threadpool(_status_and_workflow, site.client, wf_id)
    drawing = graph.svg(workflow, doc)
    if request.query_params.get("part") == "graph":
        return Response(drawing, media_type="image/svg+xml", headers={**HEADERS, "Cache-Control": "no-store"})
    parent = doc.get("parent")
    link = f'<a href="/runs/{_path(parent["id"])}">{escape(parent["id"])}</a>' if parent else ""
    body = _template("run").substitute(
        id=escape(wf_id),
        name=escape(str(doc.get("name"))),
        state=escape(str(doc.get("state"))),
        parent=f"child run of {link}, task {escape(str(parent['task']))}" if parent else "",
        graph=drawing,
    )
    return _html(_shell("run", wf_id, body, site))


def _status_and_workflow(client: Client, wf_id: str) -> tuple[dict[str, Any], Any]:
    return client.status(wf_id), client.workflow(wf_id)


def _path(wf_id: str) -> str:
    """A run id as one path segment (a spawned workflow's id holds a `/`)."""
    return quote(wf_id, safe="~@")


async def _states_css(request: Request) -> Response:
    """The fill of a task by its state: the colours `phibroker graph` uses."""
    rules = [f'svg.dag [data-state="{state}"] > .box {{ fill: {colour}; }}' for state, colour in STATE_COLOURS.items()]
    return Response("\n".join(rules) + "\n", media_type="text/css", headers=HEADERS)


# -- reading -------------------------------------------------------------------------------------------


async def _runs(site: Site, request: Request) -> Response:
    """`list --json`: `limit` (20), `state` (repeatable); `name` keeps the runs whose name holds it."""
    raw = request.query_params.get("limit", str(LIST_LIMIT))
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInput(f"limit {raw!r}: a whole number of at least 1")
    limit, states = int(raw), request.query_params.getlist("state")
    unknown = sorted(set(states) - RUN_STATES)
    if unknown:
        raise InvalidInput(f"state {unknown[0]!r}: one of {', '.join(sorted(RUN_STATES))}")
    name = request.query_params.get("name", "").strip()
    if not name:
        return await _json(site.client.list, limit, states)
    rows = await run_in_threadpool(site.client.list, max(limit, NAME_SCAN), states)
    return json_response([r for r in rows if name in str(r.get("name"))][:limit])


async def _progress(site: Site, request: Request) -> Response:
    ids = request.query_params.getlist("id")[:500]
    return json_response(await run_in_threadpool(views.progress, site.client, ids, site.plans))


async def _streams(site: Site, request: Request) -> Response:
    """Per agent with a worker lease: its lanes' length, pending and lag."""

    def read() -> dict[str, Any]:
        agents = sorted({str(row["agent"]) for row in _worker_rows(site) if row["agent"]})
        return views.lanes(site.client, agents)

    return json_response(await run_in_threadpool(read))


def _run_route(request: Request) -> tuple[str, list[str]]:
    """`/api/runs/ID[/stream | /tasks/NAME | /cancel | /retry | /signal/NAME]` -> (ID, what follows), read
    from the raw path, so an id or a name holding an encoded `/` (`%2F`) stays one piece. A path that
    fits none of these is one id written with its slashes."""
    raw = request.scope.get("raw_path", b"").decode("latin-1").removeprefix("/api/runs/")
    parts = [unquote(part) for part in raw.split("/")]
    wf_id, rest = parts[0], parts[1:]
    shapes = {("stream",), ("cancel",), ("retry",)}
    if tuple(rest) in shapes or (len(rest) == 2 and rest[0] in ("tasks", "signal")):
        return wf_id, rest
    return unquote(raw) if raw else str(request.path_params["rest"]), []


async def _run_api(site: Site, request: Request) -> Response:
    wf_id, rest = _run_route(request)
    if request.method == "POST":
        return await actions.act(site, request, wf_id, rest)
    if not rest:
        return await _json(site.client.status, wf_id)
    if rest == ["stream"]:
        await run_in_threadpool(sse.known, site.client, wf_id)  # an unknown run: 404 before the stream starts
        after = request.headers.get("last-event-id") or request.query_params.get("after")
        body = sse.messages(site.client, wf_id, after)
        headers = {**HEADERS, "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    if rest[0] == "tasks":
        return await _json(views.task_detail, site.client, wf_id, rest[1])
    return Response(status_code=405, headers=HEADERS)
