"""OpenTelemetry spans of task attempts: one trace per run, fixed at submit, and the attempt's span current
in the handler, so spans a handler makes nest under it. The SDK is configured here, as a user would; the
worker runs in this process so its spans land in an in-memory exporter."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from phibroker import Agent, Client
from phibroker.runtime.agent import Context
from phibroker.runtime.coordinator import Coordinator
from phibroker.runtime.run_span_ids import RunSpanIds
from phibroker.runtime.worker import Worker
from phibroker.settings import Settings
from tests.conftest import Processes, until, working

traced = Agent("traced")
handler_tracer = trace.get_tracer("a handler's own library")


def report_usage(ctx: Context, input_tokens: int, output_tokens: int) -> None:
    if hasattr(ctx, "spend"):
        ctx.spend(input_tokens=input_tokens, output_tokens=output_tokens)
    else:
        ctx.usage = {"tokens": 0, "input_tokens": input_tokens, "output_tokens": output_tokens, "cost": 0.0}  # type: ignore[attr-defined]


@traced.command()
def ask(ctx: Context, **extra: Any) -> dict[str, Any]:
    with handler_tracer.start_as_current_span("chat model"):
        report_usage(ctx, 120, 30)
    return {"answer": 42}


@traced.command()
async def ask_async(ctx: Context, **extra: Any) -> dict[str, Any]:
    async def call() -> None:
        with handler_tracer.start_as_current_span("async chat model"):
            await asyncio.sleep(0)

    await asyncio.gather(call())  # a task of its own: it inherits the handler task's context
    return {"answer": 43}


@traced.command()
def broken(ctx: Context, **extra: Any) -> None:
    raise ValueError("no model answered")


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the first SDK setup in this process: set it, as users do
        provider = TracerProvider(id_generator=RunSpanIds())  # OTEL_PYTHON_ID_GENERATOR=phibroker
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.shutdown()


@pytest.fixture
def worker(settings: Settings, exporter: InMemorySpanExporter) -> Iterator[Worker]:
    exporter.clear()
    with working(Worker(traced, settings, concurrency=2)) as running:
        yield running


def traceparent(settings: Settings, wf_id: str) -> tuple[int, int]:
    """The run's trace id and the span id its attempts hang under, as stored at submit."""
    raw = redis.Redis.from_url(settings.redis_url).hget(settings.keys.wf(wf_id), "traceparent")
    assert raw, "no traceparent in the run's meta"
    _, trace_id, span_id, flags = raw.decode().split("-")
    assert flags == "01"
    return int(trace_id, 16), int(span_id, 16)


def test_each_attempt_is_a_span_of_the_runs_trace_with_the_handlers_spans_under_it(
    procs: Processes, client: Client, worker: Worker, exporter: InMemorySpanExporter, tmp_path: Path, settings: Settings
) -> None:
    procs.coordinator()
    path = tmp_path / "traced.yaml"
    path.write_text(
        "name: traced\nfailure: best_effort\ntasks:\n"
        "  A: {agent: traced, command: ask}\n"
        "  B: {agent: traced, command: ask_async, depends_on: [A]}\n"
        "  F: {agent: traced, command: broken, retry: {max_attempts: 2, base_delay: 10ms, retry_on: [model]}}\n"
    )
    wf_id = client.submit(path)
    assert client.wait(wf_id, timeout=60)["state"] == "failed", procs.output()
    trace_id, run_span = traceparent(settings, wf_id)

    def attempts() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.name == "invoke_agent traced"]

    spans = until(lambda: attempts() if len(attempts()) == 4 else None, procs)
    by_task: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        assert span.attributes is not None and span.parent is not None
        by_task.setdefault(str(span.attributes["phibroker.task"]), []).append(span)
        assert span.context.trace_id == trace_id  # one trace per run
        assert span.parent.span_id == run_span and span.parent.trace_id == trace_id
        assert span.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert span.attributes["gen_ai.agent.name"] == "traced"
        assert span.attributes["phibroker.run_id"] == wf_id
    assert sorted(by_task) == ["A", "B", "F"]

    (a,) = by_task["A"]
    assert a.attributes is not None
    assert a.status.status_code == StatusCode.UNSET
    assert (a.attributes["gen_ai.usage.input_tokens"], a.attributes["gen_ai.usage.output_tokens"]) == (120, 30)
    assert a.attributes["phibroker.attempt"] == 1

    failed = sorted(by_task["F"], key=lambda s: s.attributes["phibroker.attempt"] if s.attributes else 0)
    assert [s.attributes["phibroker.attempt"] for s in failed if s.attributes] == [1, 2]
    assert all(s.status.status_code == StatusCode.ERROR for s in failed)
    assert failed[0].status.description == "ValueError: no model answered"
    assert failed[0].context.span_id != failed[1].context.span_id

    (b,) = by_task["B"]
    inner = {s.name: s for s in exporter.get_finished_spans() if s.name in ("chat model", "async chat model")}
    assert inner["chat model"].parent is not None and inner["chat model"].parent.span_id == a.context.span_id
    assert inner["async chat model"].parent is not None
    assert inner["async chat model"].parent.span_id == b.context.span_id
    assert all(s.context.trace_id == trace_id for s in inner.values())
    # each attempt's span lasts from its handler's start to its settlement
    assert all(s.start_time is not None and s.end_time is not None and s.start_time <= s.end_time for s in spans)


def test_a_child_runs_attempts_join_its_parents_trace(
    procs: Processes, client: Client, worker: Worker, exporter: InMemorySpanExporter, tmp_path: Path, settings: Settings
) -> None:
    procs.coordinator()
    (tmp_path / "inner.yaml").write_text("name: inner\ntasks:\n  Ask: {agent: traced, command: ask}\n")
    path = tmp_path / "outer.yaml"
    path.write_text("name: outer\ntasks:\n  Sub: {workflow: inner.yaml}\n")
    wf_id = client.submit(path)
    assert client.wait(wf_id, timeout=60)["state"] == "succeeded", procs.output()
    trace_id, _ = traceparent(settings, wf_id)
    child = client.status(wf_id)["tasks"]["Sub"]["child"]
    child_trace, child_span = traceparent(settings, child)
    assert child_trace == trace_id
    (span,) = until(lambda: [s for s in exporter.get_finished_spans() if s.name == "invoke_agent traced"], procs)
    assert span.context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == child_span


@pytest.fixture
def coordinator(settings: Settings) -> Iterator[Coordinator]:
    """A coordinator in this process, so the run spans it emits reach the exporter."""
    running = Coordinator(settings)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.stopping.set()
        thread.join(timeout=60)


def test_a_run_is_one_span_whose_direct_children_are_its_attempts(
    client: Client, worker: Worker, coordinator: Coordinator, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    (tmp_path / "inner.yaml").write_text("name: inner\ntasks:\n  Ask: {agent: traced, command: ask}\n")
    path = tmp_path / "outer.yaml"
    path.write_text(
        "name: outer\ntasks:\n  A: {agent: traced, command: ask}\n"
        "  Sub: {workflow: inner.yaml, depends_on: [A]}\n  B: {agent: traced, command: broken, depends_on: [Sub]}\n"
    )
    wf_id = client.submit(path)
    status = client.wait(wf_id, timeout=60)
    assert status["state"] == "failed"
    child = status["tasks"]["Sub"]["child"]

    def runs() -> dict[str, ReadableSpan] | None:
        spans = [s for s in exporter.get_finished_spans() if s.name.startswith("invoke_workflow")]
        found = {str((s.attributes or {}).get("phibroker.run_id")): s for s in spans}
        return found if len(found) == 2 else None

    found = until(runs)
    outer, inner = found[wf_id], found[child]
    assert [s.name for s in exporter.get_finished_spans()].count("invoke_workflow outer") == 1

    def attempts() -> list[ReadableSpan] | None:  # a worker ends an attempt's span once its settle returned
        spans = [s for s in exporter.get_finished_spans() if s.name == "invoke_agent traced"]
        return spans if len(spans) == 3 else None

    assert outer.parent is None and outer.status.status_code == StatusCode.ERROR
    assert outer.attributes is not None and outer.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert inner.parent is not None and inner.parent.span_id == outer.context.span_id
    assert inner.status.status_code == StatusCode.UNSET and inner.context.trace_id == outer.context.trace_id
    assert outer.start_time == int(status["created_at"] * 1e9) and outer.end_time == int(status["finished_at"] * 1e9)
    for span in until(attempts):
        run = found[str((span.attributes or {})["phibroker.run_id"])]
        assert span.parent is not None and span.parent.span_id == run.context.span_id  # a direct child


def test_the_id_generator_is_found_by_the_name_users_set() -> None:
    """`OTEL_PYTHON_ID_GENERATOR=phibroker` finds it: the SDK's configurator loads this entry point."""
    from importlib.metadata import entry_points

    (point,) = entry_points(group="opentelemetry_id_generator", name="phibroker")
    assert point.load() is RunSpanIds
