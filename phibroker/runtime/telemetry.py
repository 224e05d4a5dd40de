"""Prometheus metrics of one worker or coordinator, served at `/metrics` with `--metrics-port`.

Each `Telemetry` keeps its metrics in a registry of its own, never prometheus_client's global one: two
workers in one process (tests, an embedding application) count apart. The worker and the coordinator
call the small methods below where they learn something; they hold no Telemetry unless metrics are
served, so a worker without `--metrics-port` pays nothing per task.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from phibroker import wire
from phibroker.engine.records import error_text
from phibroker.errors import InvalidInput
from phibroker.keys import Keys
from phibroker.runtime.agent import Outcome
from phibroker.store.views import Views
from phibroker.workflow import Workflow
from phibroker.workflow.spec import DEFAULT_RETRY_ON, retries_error

# Handler wall times: a no-op's milliseconds up to an LLM agent's minutes.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Telemetry:
    """The metrics of one process, and the methods that move them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "phibroker_tasks", "Finished task attempts, by outcome", ["agent", "command", "outcome"], registry=r
        )
        self.duration = Histogram(
            "phibroker_task_duration_seconds",
            "Handler wall time of a task attempt",
            ["agent", "command"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("phibroker_tasks_in_flight", "Task handlers running now", ["agent"], registry=r)
        self.spend_tokens = Counter(
            "phibroker_spend_tokens", "Tokens reported with ctx.spend (tokens + input + output)", ["agent"], registry=r
        )
        self.spend_cost = Counter("phibroker_spend_cost", "Cost reported with ctx.spend", ["agent"], registry=r)
        self.workflows = Counter("phibroker_workflows", "Runs that reached a terminal state", ["state"], registry=r)
        self.lag = Gauge(
            "phibroker_stream_lag",
            "Task entries not yet read by the agent's workers (both lanes)",
            ["agent"],
            registry=r,
        )
        self._stopping = threading.Event()

    # -- serving ----------------------------------------------------------------------------------
    def serve(self, port: int, host: str = "") -> None:
        """Serve `/metrics` on `port` from a daemon thread; a port taken or refused is bad input."""
        if not 0 < port < 65536:
            raise InvalidInput(f"--metrics-port {port}: not a port number (1-65535)")
        try:
            start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise InvalidInput(f"--metrics-port {port}: {reason}") from None

    def stop(self) -> None:
        """End the refresh thread (`refresh_every`)."""
        self._stopping.set()

    def refresh_every(self, seconds: float, refresh: Callable[[], None], on_error: Callable[[Exception], None]) -> None:
        """Call `refresh` every `seconds` from a daemon thread until `stop()`: gauges read from Redis."""

        def loop() -> None:
            while not self._stopping.is_set():
                try:
                    refresh()
                except Exception as exc:  # noqa: BLE001 - a failed look must not end the refreshing
                    on_error(exc)
                self._stopping.wait(seconds)

        threading.Thread(target=loop, name="phi-metrics", daemon=True).start()

    # -- the worker -------------------------------------------------------------------------------
    def serving(self, agent: str) -> None:
        """A worker of `agent` starts: its in-flight gauge shows 0 before the first task, not nothing."""
        self.in_flight.labels(agent)  # made at 0; a second worker in this process keeps the count

    def handler_started(self, agent: str) -> None:
        self.in_flight.labels(agent).inc()

    def handler_ended(self, agent: str, command: str, seconds: float) -> None:
        self.in_flight.labels(agent).dec()
        self.duration.labels(agent, command).observe(max(0.0, seconds))

    def finished(self, agent: str, command: str, outcome: str) -> None:
        """One attempt settled (or, `lost`, found abandoned by a dead worker)."""
        self.tasks.labels(agent, command, outcome).inc()

    def spent(self, agent: str, tokens: float, cost: float) -> None:
        """What one `ctx.spend` call reported: `tokens` already summed (tokens + input + output)."""
        if tokens:
            self.spend_tokens.labels(agent).inc(tokens)
        if cost:
            self.spend_cost.labels(agent).inc(cost)

    # -- the coordinator --------------------------------------------------------------------------
    def run_ended(self, state: str) -> None:
        self.workflows.labels(state).inc()

    def set_lags(self, lags: Mapping[str, int]) -> None:
        for agent, lag in lags.items():
            self.lag.labels(agent).set(lag)


def attempt_outcome(message: wire.TaskMessage, outcome: Outcome) -> str:
    """An attempt's `outcome` label, as far as its worker can tell: whether a failure is retried, the
    task's retry policy says (the message carries what the worker needs of it)."""
    if outcome.ok:
        return "succeeded"
    if outcome.error and outcome.error.get("type") == "Cancelled":
        return "cancelled"
    if outcome.error and outcome.error.get("type") == "BudgetExhausted":
        return "failed"  # a `fail` budget passed: the coordinator never retries it, whatever retry_on says
    retry_on = DEFAULT_RETRY_ON if message.retry_on is None else message.retry_on
    if message.retries_left > 0 and retries_error(retry_on, error_text(outcome.error), outcome.retry):
        return "retrying"
    return "failed"


def agent_lags(views: Views, keys: Keys, agents: Iterable[str]) -> dict[str, int]:
    """Each agent's lag: the entries of its two lanes its workers have still to read. An agent whose
    lag Redis cannot tell now is left out (its gauge keeps the last value)."""
    names = sorted(set(agents))
    lags = views.workers_lag([lane for name in names for lane in (keys.agent_tasks(name), keys.agent_bulk(name))])
    out = {}
    for name, tasks, bulk in zip(names, lags[::2], lags[1::2], strict=True):
        if tasks is not None and bulk is not None:
            out[name] = tasks + bulk
    return out


def workflow_agents(workflow: Workflow) -> set[str]:
    """The agents a workflow's tasks and compensations name (spawned tasks may name others)."""
    names = {str(task.agent) for task in workflow.spec.tasks.values() if task.agent}
    names |= {str(t.compensate.agent) for t in workflow.spec.tasks.values() if t.compensate and t.compensate.agent}
    for child in workflow.subworkflows.values():
        names |= workflow_agents(child)
    return names
