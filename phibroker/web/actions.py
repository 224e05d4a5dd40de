"""The page's actions: cancel, retry, signal, approve, reject. They exist only with `--allow-actions`;
each needs the page's token (header `X-CSRF-Token` or form field `csrf_token`) and, from a browser, the
page's own origin, so another site open in the same browser cannot act through it. An approval is
signed with the key of whoever runs the page, as `phibroker approve` signs."""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from phibroker.errors import InvalidInput
from phibroker.web.site import HEADERS, Site, json_response


async def _body(request: Request) -> dict[str, Any] | None:
    """The request's fields: a JSON object or a form; None when it is neither."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's `Origin` is this page's own: the same host and port as the address the
    browser used (`X-Forwarded-Host` from a proxy in front, else `Host`)."""
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and bool(host) and netloc.lower() == str(host).lower()


async def _allowed(site: Site, request: Request) -> tuple[Response | None, dict[str, Any] | None]:
    """(a refusal, or None) and the request's fields. Without `--allow-actions` there is no action to
    refuse: 404. A foreign origin, or no token, or a wrong one: 403."""
    if not site.allow_actions:
        return Response("Not Found", 404, headers=HEADERS), None
    origin = request.headers.get("origin")
    used = request.headers.get("x-forwarded-host") or request.headers.get("host")
    if origin is not None and not _same_origin(origin, used):
        return json_response({"ok": False, "error": f"refused: a request from {origin}, not from this page"}, 403), None
    fields = await _body(request)
    token = request.headers.get("x-csrf-token") or (fields or {}).get("csrf_token")
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), site.token.encode()):
        return json_response({"ok": False, "error": "refused: missing or wrong CSRF token"}, 403), None
    if fields is None:
        raise InvalidInput("the body is neither a JSON object nor a form")
    return None, fields


def _text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name!r} must be a string")
    return value


async def act(site: Site, request: Request, wf_id: str, rest: list[str]) -> Response:
    refusal, fields = await _allowed(site, request)
    if refusal is not None or fields is None:
        return refusal or Response(status_code=400)
    client = site.client
    if rest == ["cancel"]:
        tasks = fields.get("tasks") or []
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise InvalidInput("'tasks' must be a list of task names")
        await run_in_threadpool(client.cancel, wf_id, _text(fields, "reason") or "cancelled in the web page", tasks)
    elif rest == ["retry"]:
        await run_in_threadpool(client.retry, wf_id, _text(fields, "from"))
    elif len(rest) == 2 and rest[0] == "signal":
        data = fields.get("data")
        if isinstance(data, str) and request.headers.get("content-type", "").startswith("application/x-www"):
            data = _form_json(data)
        await run_in_threadpool(client.signal, wf_id, rest[1], data)
    else:
        return Response(status_code=405, headers=HEADERS)
    return json_response({"ok": True})


def _form_json(text: str) -> Any:
    """A form's `data` field holds JSON text, as `signal --data` does."""
    try:
        return json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):
        raise InvalidInput("data is not JSON") from None


async def decide(site: Site, request: Request) -> Response:
    decision = request.path_params["decision"]
    if decision not in ("approve", "reject"):
        return Response("Not Found", 404, headers=HEADERS)
    refusal, fields = await _allowed(site, request)
    if refusal is not None or fields is None:
        return refusal or Response(status_code=400)
    approval = str(request.path_params["approval"])
    if decision == "approve":
        await run_in_threadpool(lambda: site.client.approve(approval, _text(fields, "comment")))
    else:
        reason = _text(fields, "reason") or "rejected in the web page"
        await run_in_threadpool(lambda: site.client.reject(approval, reason))
    return json_response({"ok": True})
