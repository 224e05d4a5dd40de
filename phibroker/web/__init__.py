"""`phibroker ui`: a web page of runs, their DAGs, approvals and agents, with a JSON and SSE API.

An ASGI app (Starlette) served by uvicorn; its template, script and stylesheet ship in the package,
so the page needs no CDN and no build step. Only `cli` imports it.
"""

from __future__ import annotations

import ipaddress
import socket

from phibroker.errors import InvalidInput
from phibroker.settings import Settings
from phibroker.web.app import create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8265


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, made before the server starts, so a port in use is one clear line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidInput(f"--host {host}: {getattr(exc, 'strerror', None) or exc}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def is_loopback(sock: socket.socket) -> bool:
    """Whether only this machine can reach the page (then requests must name a loopback Host too)."""
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def serve(settings: Settings, sock: socket.socket, allow_actions: bool = False) -> None:
    """Serve the page on `sock` until SIGINT or SIGTERM."""
    import uvicorn

    local = is_loopback(sock)
    config = uvicorn.Config(
        create_app(settings, allow_actions, local),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        proxy_headers=False,
    )
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "address", "create_app", "is_loopback", "listen", "serve"]
