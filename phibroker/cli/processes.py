"""The long-running processes: worker, coordinator, dev, rq-bridge."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

import click

from phibroker.cli.app import (
    duration,
    long_running,
    main,
    reachable,
    setup_logging,
    stop_on_signals,
)
from phibroker.errors import InvalidInput
from phibroker.settings import Settings

if TYPE_CHECKING:
    from phibroker.runtime.telemetry import Telemetry


@main.command()
@click.option("--agent", "agent_name", required=True, help="the agent whose tasks this worker runs")
@click.option("--app", help="MODULE[:ATTR] holding the Agent (default: the workers package)")
@click.option("--concurrency", default=4, show_default=True, help="handlers running at once")
@click.option("--reclaim-after", help="presume a silent worker dead after this long [30s]")
@click.option("--burst", is_flag=True, help="exit once the stream is empty")
@click.option("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
@click.pass_obj
def worker(
    settings: Settings,
    agent_name: str,
    app: str | None,
    concurrency: int,
    reclaim_after: str | None,
    burst: bool,
    metrics_port: int | None,
) -> None:
    """Run the commands and subscriptions of one agent."""
    from phibroker.runtime.agent import load_agent
    from phibroker.runtime.worker import Worker

    if reclaim_after:
        settings = settings.model_copy(update={"reclaim_after": duration(reclaim_after, "--reclaim-after")})
    if concurrency < 1:
        raise InvalidInput("--concurrency must be at least 1")
    agent = load_agent(agent_name, app)
    reachable(settings)
    telemetry = _metrics(metrics_port)
    setup_logging()
    runner = Worker(agent, settings, concurrency=concurrency, telemetry=telemetry)
    long_running()
    stop_on_signals(runner.stop)
    if not runner.work(burst=burst):
        logging.shutdown()
        os._exit(0)  # handlers past the grace period: don't wait for them, their tasks are not acked


@main.command()
@click.option("--require-signed", is_flag=True, help="refuse workflow files without a trusted signature")
@click.option("--burst", is_flag=True, help="exit once there is nothing left to do")
@click.option("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
@click.pass_obj
def coordinator(settings: Settings, require_signed: bool, burst: bool, metrics_port: int | None) -> None:
    """Run a coordinator: results in, DAG progress, dispatches out. Several may run at once."""
    from phibroker.runtime.coordinator import Coordinator

    reachable(settings)
    telemetry = _metrics(metrics_port)
    setup_logging()
    runner = Coordinator(settings, require_signed=require_signed, telemetry=telemetry)
    long_running()
    stop_on_signals(runner.stopping.set)
    runner.run(burst=burst)


def _metrics(port: int | None) -> Telemetry | None:
    """The process's metrics, served on `port` (all interfaces) before any work starts; None without one."""
    if port is None:
        return None
    from phibroker.runtime.telemetry import Telemetry

    telemetry = Telemetry()
    telemetry.serve(port)
    return telemetry


@main.command()
@click.option("--example", type=click.Path(dir_okay=False, exists=True), help="workflow [examples/complete-dag.yaml]")
@click.option("--no-example", is_flag=True, help="only run the broker, the coordinator and the workers")
@click.option("--once", is_flag=True, help="stop everything once the example ends; exit 1 unless it succeeded")
@click.option("--app", help="MODULE holding the agents (default: the reference agents in the workers package)")
@click.option("--fresh", is_flag=True, help="start dev's redis-server empty: removes $PHIBROKER_HOME/dev-data/PORT")
@click.pass_obj
def dev(settings: Settings, example: str | None, no_example: bool, once: bool, app: str | None, fresh: bool) -> None:
    """A first try: a broker, the coordinator, the reference workers and an example workflow."""
    from pathlib import Path

    from phibroker.tools.devserver import DevServer, find_example

    if example and no_example:
        raise InvalidInput("--example and --no-example exclude each other")
    chosen = None if no_example else Path(example) if example else find_example()
    if not no_example and chosen is None:
        raise InvalidInput("examples/complete-dag.yaml not found; pass --example FILE or --no-example")
    sys.exit(DevServer(settings, app=app, example=chosen, once=once, fresh=fresh).run())


@main.command("rq-bridge")
@click.option("--agent", "agent_name", required=True, help="the agent whose tasks become RQ jobs")
@click.option("--queue", "queue_name", required=True, help="the RQ queue the jobs are enqueued on")
@click.option(
    "--map", "pairs", multiple=True, metavar="COMMAND=MODULE.FUNCTION", help="a command and the job function it runs"
)
@click.option("--concurrency", default=16, show_default=True, help="RQ jobs awaited at once")
@click.option("--rq-redis", help="the Redis URL of RQ [the broker's]")
@click.pass_obj
def rq_bridge(
    settings: Settings, agent_name: str, queue_name: str, pairs: tuple[str, ...], concurrency: int, rq_redis: str | None
) -> None:
    """Serve an agent's tasks with RQ: each task runs as an RQ job, its outcome becomes the task's result."""
    try:
        from phibroker.interop.rq import Bridge, parse_map
    except ImportError as exc:
        raise InvalidInput(f"rq-bridge needs RQ ({exc}): pip install 'phibroker[rq]'") from None

    if concurrency < 1:
        raise InvalidInput("--concurrency must be at least 1")
    mapping = parse_map(pairs)
    setup_logging()
    bridge = Bridge(agent_name, queue_name, mapping, settings, concurrency=concurrency, rq_redis_url=rq_redis)
    stop_on_signals(bridge.stop)
    if not bridge.work():
        logging.shutdown()
        os._exit(0)  # jobs still awaited after the grace period: their tasks stay unacked for another bridge
