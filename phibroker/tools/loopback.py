"""Servers bound to a loopback address answer only requests that name a loopback host: a web page the
operator visits cannot reach them by DNS rebinding (its requests name the attacker's host)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class LoopbackOnly:
    """Refuses a request whose `Host` is not a loopback name or address (400)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = Headers(scope=scope).get("host", "") if scope["type"] == "http" else "localhost"
        if not loopback(host):
            refusal = PlainTextResponse(f"Host {host!r}: this server answers only at a loopback address", 400)
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def loopback(host: str) -> bool:
    """`localhost`, `127.0.0.1:8265`, `[::1]:8265`: yes; any other name or address: no."""
    try:
        name = urlsplit("//" + host).hostname or ""
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_address(host: str) -> bool:
    """Whether listening on `host` (an address or `localhost`) lets only this machine in."""
    return loopback(host) and host not in ("", "0.0.0.0", "::")
