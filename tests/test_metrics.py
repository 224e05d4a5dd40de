"""`--metrics-port`: Prometheus metrics of real workers and coordinators, scraped over HTTP.

Each process counts what it saw: a worker its attempts by outcome (a failure the retry policy runs again
counts as `retrying`), their handler times and the spend its handlers report; a coordinator the runs
that ended and the lag of each agent's stream.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from phibroker.runtime.client import Client
from phibroker.runtime.telemetry import Telemetry
from phibroker.testing import free_port
from tests.conftest import Processes, until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for one not there (a labelled counter shows only once it moved)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scraped(port: int) -> Samples:
    """The metrics once the server answers (the process may still be starting)."""

    def attempt() -> Samples | None:
        try:
            return scrape(port)
        except OSError:
            return None

    return until(attempt, timeout=30)


def scraped_until(port: int, check: Callable[[Samples], bool], procs: Processes) -> Samples:
    """The metrics once `check` holds for them."""

    def attempt() -> Samples | None:
        samples = scraped(port)
        return samples if check(samples) else None

    return until(attempt, procs, timeout=30)


def flow(tmp_path: Path, name: str, tasks: str, extra: str = "") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n{extra}tasks:\n{tasks}")
    return str(path)


def test_a_worker_counts_attempts_by_outcome_and_a_coordinator_counts_runs(
    procs: Processes, client: Client, tmp_path: Path
) -> None:
    worker_port, coordinator_port = free_port(), free_port()
    procs.spawn("coordinator", "coordinator", "--metrics-port", str(coordinator_port))
    procs.spawn("worker", "worker", "--agent", "probe", "--app", "tests.apps.probe", "--metrics-port", str(worker_port))
    fast = "base_delay: 10ms"
    good = client.submit(
        flow(
            tmp_path,
            "good",
            "  A: {agent: probe, command: work}\n"
            "  B: {agent: probe, command: work}\n"
            "  C: {agent: probe, command: work, depends_on: [A, B]}\n",
        )
    )
    bad = client.submit(
        flow(
            tmp_path,
            "bad",
            # Retryable: retried while attempts remain; a plain error: retried when `retry_on` matches it
            f"  F: {{agent: probe, command: flaky, payload: {{failures: 9}}, retry: {{max_attempts: 3, {fast}}}}}\n"
            f"  U: {{agent: probe, command: fail, payload: {{message: flaky disk}},"
            f" retry: {{max_attempts: 2, {fast}, retry_on: [disk]}}}}\n"
            "  P: {agent: probe, command: fail, payload: {message: plain}}\n",
            extra="failure: best_effort\n",
        )
    )
    assert client.wait(good, timeout=60)["state"] == "succeeded", procs.output()
    assert client.wait(bad, timeout=60)["state"] == "failed", procs.output()

    def settled(samples: Samples) -> bool:
        return sum(v for (name, _), v in samples.items() if name == "phibroker_tasks_total") == 9

    worker = scraped_until(worker_port, settled, procs)
    tasks = "phibroker_tasks_total"
    assert value(worker, tasks, agent="probe", command="work", outcome="succeeded") == 3
    assert value(worker, tasks, agent="probe", command="flaky", outcome="retrying") == 2
    assert value(worker, tasks, agent="probe", command="flaky", outcome="failed") == 1
    assert value(worker, tasks, agent="probe", command="fail", outcome="retrying") == 1
    assert value(worker, tasks, agent="probe", command="fail", outcome="failed") == 2
    hist = "phibroker_task_duration_seconds"
    assert value(worker, f"{hist}_count", agent="probe", command="work") == 3
    assert value(worker, f"{hist}_count", agent="probe", command="flaky") == 3
    assert value(worker, f"{hist}_bucket", agent="probe", command="work", le="+Inf") == 3
    assert value(worker, f"{hist}_sum", agent="probe", command="work") > 0
    assert value(worker, "phibroker_tasks_in_flight", agent="probe") == 0
    assert not any(name.startswith("phibroker_workflows") for name, _ in worker)  # the coordinator's

    coordinator = scraped_until(
        coordinator_port, lambda s: value(s, "phibroker_workflows_total", state="failed") > 0, procs
    )
    assert value(coordinator, "phibroker_workflows_total", state="succeeded") == 1
    assert value(coordinator, "phibroker_workflows_total", state="failed") == 1
    assert not any(name.startswith("phibroker_tasks") for name, _ in coordinator)  # the worker's


def test_stream_lag_shows_tasks_no_worker_has_read(procs: Processes, client: Client, tmp_path: Path) -> None:
    port = free_port()
    procs.spawn("coordinator", "coordinator", "--metrics-port", str(port))
    procs.worker("probe", app="tests.apps.probe")
    client.submit(
        flow(
            tmp_path,
            "lag",
            "  A: {agent: probe, command: work}\n  B: {agent: nobody, command: x}\n  C: {agent: nobody, command: y}\n",
        )
    )

    samples = scraped_until(port, lambda s: value(s, "phibroker_stream_lag", agent="nobody") == 2, procs)
    assert ("phibroker_stream_lag", (("agent", "probe"),)) in samples  # known from its lease and the file
    until(lambda: value(scraped(port), "phibroker_stream_lag", agent="probe") == 0, procs, timeout=30)


def test_an_attempt_lost_with_its_worker_and_one_cancelled(procs: Processes, client: Client, tmp_path: Path) -> None:
    procs.coordinator()
    doomed = procs.worker("probe", app="tests.apps.probe", concurrency=1)
    wf_id = client.submit(flow(tmp_path, "lost", "  A: {agent: probe, command: work, payload: {sleep: 1.5}}\n"))
    until(lambda: client.status(wf_id)["tasks"]["A"]["state"] == "running", procs)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    port = free_port()
    procs.spawn("heir", "worker", "--agent", "probe", "--app", "tests.apps.probe", "--metrics-port", str(port))
    assert ("phibroker_tasks_in_flight", (("agent", "probe"),)) in scraped(port)  # there before its first task
    assert client.wait(wf_id, timeout=60)["state"] == "succeeded", procs.output()
    tasks = "phibroker_tasks_total"
    samples = scraped_until(
        port, lambda s: value(s, tasks, agent="probe", command="work", outcome="succeeded") > 0, procs
    )
    assert value(samples, tasks, agent="probe", command="work", outcome="lost") == 1

    held = client.submit(flow(tmp_path, "held", "  H: {agent: probe, command: hold, payload: {sleep: 60}}\n"))
    until(lambda: client.status(held)["tasks"]["H"]["state"] == "running", procs)
    client.cancel(held)
    assert client.wait(held, timeout=60)["state"] == "cancelled", procs.output()
    until(lambda: value(scraped(port), tasks, agent="probe", command="hold", outcome="cancelled") == 1, procs)


def test_spend_is_counted_per_agent() -> None:
    telemetry = Telemetry()
    port = free_port()
    telemetry.serve(port)
    telemetry.spent("writer", tokens=1200, cost=0.25)
    telemetry.spent("writer", tokens=300, cost=0.0)
    samples = scraped(port)
    assert value(samples, "phibroker_spend_tokens_total", agent="writer") == 1500
    assert value(samples, "phibroker_spend_cost_total", agent="writer") == 0.25


def test_a_busy_metrics_port_is_one_line_and_exit_2(procs: Processes, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (["coordinator"], ["worker", "--agent", "probe", "--app", "tests.apps.probe"]):
            done = run(procs, *args, "--metrics-port", str(port))
            assert done.returncode == 2, done.stderr
            assert done.stderr.strip() == f"error: --metrics-port {port}: already in use"
    done = run(procs, "coordinator", "--metrics-port", "70000")
    assert done.returncode == 2 and "not a port number" in done.stderr


def run(procs: Processes, *args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60, env=procs.env()
    )


def test_an_attempt_past_a_fail_budget_counts_as_failed_whatever_retry_on_says() -> None:
    """The coordinator never retries it: a `retry_on` entry matching its text must not label it retrying."""
    from phibroker import wire
    from phibroker.errors import BudgetExhausted
    from phibroker.runtime.agent import failure
    from phibroker.runtime.telemetry import attempt_outcome

    message = wire.TaskMessage(
        id="d1", wf="w", unit="A", task="A", agent="writer", command="draft", attempt=1, retries_left=3
    )
    message.retry_on = ["budget"]
    outcome = failure(BudgetExhausted("budget_exhausted: tokens 1200 > 1000"), 1.0)
    assert attempt_outcome(message, outcome) == "failed"
    assert attempt_outcome(message, failure(TimeoutError("budget of time"), 1.0)) == "retrying"  # any other error
