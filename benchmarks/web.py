"""The web page under load: how long its pages and JSON take with 1,000 runs listed and a 500-task DAG
drawn, and how soon a state change reaches a browser's event stream.

Requests go over real HTTP to a real `phibroker ui` process, as a browser's would (no browser: its
rendering time is not the server's). An event's delay is its arrival on the stream minus its `ts`, both
read from this host's clock.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from typing import Any

from benchmarks.harness import percentile, spawn, stop, wait_for
from benchmarks.workloads import Deployment, chain, fan_out, independent
from phibroker.testing import free_port

REPEATS = 10  # of each request; the figure is the slowest of them, and the median


def page_timings(deployment: Deployment, runs: int, dag: int) -> dict[str, tuple[float, float]]:
    """For each page and API route: (median, slowest) of REPEATS requests, in ms."""
    ids = [deployment.submit(independent(1)) for _ in range(runs - 1)]
    big = deployment.submit(fan_out(dag))
    for wf_id in [*ids, big]:
        deployment.wait(wf_id)
    with ui(deployment) as base:
        routes = {
            f"/ ({runs:,} runs)": f"/?limit={runs}",
            f"/api/runs ({runs:,})": f"/api/runs?limit={runs}",
            f"/runs/ID ({dag}-task DAG)": f"/runs/{big}",
            f"/runs/ID?part=graph ({dag}-task SVG)": f"/runs/{big}?part=graph",
            f"/api/runs/ID ({dag} tasks)": f"/api/runs/{big}",
            "/approvals": "/approvals",
            "/agents": "/agents",
        }
        out = {}
        for label, path in routes.items():
            times = [_get_ms(base + path) for _ in range(REPEATS)]
            out[label] = (percentile(times, 50), max(times))
        return out


def stream_delays(deployment: Deployment, hops: int) -> list[float]:
    """The delay (ms) of each event of a `hops`-task chain on the run's event stream, subscribed to
    before the run starts moving."""
    with ui(deployment) as base:
        wf_id = deployment.submit(chain(hops))
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", f"/api/runs/{wf_id}/stream", headers={"Accept": "text/event-stream"})
        response = conn.getresponse()
        delays = []
        for raw in response:  # one line at a time, as they arrive
            line = raw.decode().rstrip("\n")
            if not line.startswith("data:"):
                continue
            record = json.loads(line[5:])
            if record.get("kind") == "event" and record.get("ts"):
                delays.append((time.time() - float(record["ts"])) * 1000)
        conn.close()
        deployment.wait(wf_id)
        return delays


class ui:
    """`phibroker ui` on a free port beside the deployment; the base URL while inside."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.port = free_port()
        self.process: Any = None

    def __enter__(self) -> str:
        s = self.deployment.settings
        env = {"PHIBROKER_REDIS_URL": s.redis_url, "PHIBROKER_NAMESPACE": s.namespace, "PHIBROKER_HOME": str(s.home)}
        args = ["-m", "phibroker", "ui", "--port", str(self.port)]
        self.process, _ = spawn(args, self.deployment.logs, "ui", env)
        base = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: _answers(base), 30, "the web page")
        _get_ms(base + "/")  # warm: templates read, first connection made
        return base

    def __exit__(self, *exc: object) -> None:
        stop(self.process)


def _answers(base: str) -> bool:
    try:
        _get_ms(base + "/api/runs?limit=1")
        return True
    except OSError:
        return False


def _get_ms(url: str) -> float:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
    return (time.perf_counter() - began) * 1000


def summary(timings: dict[str, tuple[float, float]]) -> str:
    return "; ".join(f"{label}: p50 {p50:.0f} ms, max {worst:.0f} ms" for label, (p50, worst) in timings.items())
