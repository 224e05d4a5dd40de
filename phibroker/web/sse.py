"""`/api/runs/ID/stream`: a run's output as Server-Sent Events, on the client's output reader.

A thread of its own reads the run's records (waiting on the stream between reads, so it blocks) and
hands each to the response; the response says something at least every `KEEPALIVE` seconds (a
comment), so proxies keep the connection, and ends once the run has ended and everything up to its
terminal event was sent. A reconnecting browser sends `Last-Event-ID` and gets only what came after it.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from phibroker.engine.state import WF_TERMINAL
from phibroker.errors import UnknownWorkflow
from phibroker.runtime.client import Client
from phibroker.store.connection import reaching

KEEPALIVE = 15.0  # seconds without a record before a comment is sent
WAIT = 1.0  # seconds a reader blocks on the stream before it looks whether its browser is still there
RECONNECT_MS = 2000  # what a browser waits before reconnecting to a dropped stream
_END = object()


def known(client: Client, wf_id: str) -> None:
    """Raises UnknownWorkflow for a run that is not there."""
    with reaching(client.settings):
        if client.broker.run_state(wf_id) is None:
            raise UnknownWorkflow(wf_id)


def records_after(
    client: Client, wf_id: str, after: str | None, stop: threading.Event
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The run's records until it ends (or `stop` is set), each with its token (`Client.read_on`) as
    the id its message carries, those past `after` only: a browser that reconnects with the last one
    misses nothing, and gets nothing twice but, at times, a task's start it had from its agent's copy.
    Between reads it waits on the streams at most `WAIT` seconds at a time, so a reader whose browser
    left stops soon."""
    reader = client.output_reader(wf_id, after=after or "0-0")
    while not stop.is_set():
        with reaching(client.settings):  # the end's events are written with it: read them after this
            ended = client.broker.run_state(wf_id) in WF_TERMINAL
        for token, record in client.read_on(reader):
            yield token, record
            if stop.is_set():
                return
        if ended:
            return
        with reaching(client.settings):
            reader.wait(WAIT)


def frame(message_id: str | None, record: dict[str, Any]) -> str:
    """One record as an SSE message: `id:` its stream id, `event:` the event's type (or chunk/log),
    `data:` the record as JSON on one line."""
    data = record.get("data")
    kind = (
        str(data.get("type")) if record.get("kind") == "event" and isinstance(data, dict) else str(record.get("kind"))
    )
    event = re.sub(r"[\r\n]", " ", kind)
    entry = "" if message_id is None else "id: " + re.sub(r"[\r\n]", " ", message_id) + "\n"
    return f"{entry}event: {event}\ndata: {json.dumps(record, default=str)}\n\n"


async def messages(client: Client, wf_id: str, after: str | None) -> AsyncIterator[str]:
    """The response body: records as a reader thread finds them, comments while none come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    room = threading.Semaphore(1000)  # records handed over and not yet sent: a slow browser slows the reader
    stop = threading.Event()
    records = records_after(client, wf_id, after, stop)

    def hand(item: Any) -> None:
        while not stop.is_set():
            if room.acquire(timeout=1.0):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # the loop has closed: the server is stopping
                    pass
                return

    def read() -> None:
        try:
            for record in records:
                if stop.is_set():
                    return
                hand(record)
        except Exception as exc:  # noqa: BLE001 - said to the browser as a last comment
            hand(exc)
        finally:
            hand(_END)

    threading.Thread(target=read, name="phi-web-stream", daemon=True).start()
    try:
        yield f"retry: {RECONNECT_MS}\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            room.release()
            if item is _END:
                return
            if isinstance(item, Exception):
                yield f": stopped: {str(item).splitlines()[0] if str(item) else type(item).__name__}\n\n"
                return
            yield frame(*item)
    finally:
        stop.set()
