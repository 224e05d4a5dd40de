"""What every route of the page shares: the site (client, token, whether actions exist) and how an
answer is written."""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.responses import Response

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.tools.watch import Plan

HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none';"
    " form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class Site:
    """What every request shares: the client, the page's token, whether actions exist, parsed specs."""

    def __init__(self, settings: Settings, allow_actions: bool = False):
        self.settings = settings
        self.client = Client(settings)
        self.allow_actions = allow_actions
        self.token = secrets.token_urlsafe(32)
        self.plans: dict[str, Plan] = {}


def json_response(value: Any, status: int = 200) -> Response:
    """JSON as the CLI prints it (`default=str`), so a route and its `--json` parse to the same value."""
    return Response(json.dumps(value, default=str), status, media_type="application/json", headers=HEADERS)
