"""OpenTelemetry spans of task attempts, through the OpenTelemetry API only.

phibroker never installs a tracer provider: users configure the SDK as usual (`opentelemetry-instrument
phibroker worker ...` with the standard `OTEL_*` settings, or in the process that embeds a worker).
Until they do, every call here is a no-op, and a worker skips even those.

A run is one trace. Its W3C `traceparent` is fixed when the run is built (`submission`; a sub-workflow's
run joins its parent's trace), kept in the run's meta and carried by each task message; it names the
run's trace and the span id its attempts hang under. Each attempt is a span `invoke_agent AGENT`, from
the handler's start to the attempt's settlement, and it is the current span in the handler's thread
(and so in an async handler's task, which copies that thread's context): the spans a handler makes, an
LLM client's, nest under it.

The run's own span, `invoke_workflow NAME`, is emitted once, by the coordinator whose commit ended
the run, from `created_at` to `finished_at`. Its ids are the ones the run's `traceparent` fixed when
it was built, since attempts named it as their parent long before; the API cannot choose a span's
ids, so the SDK's id generator must: `RunSpanIds` (`OTEL_PYTHON_ID_GENERATOR=phibroker`) gives the
span being made the ids pinned here and random ones to every other span. With another generator the
run's span gets ids of its own and the attempts hang under a parent no backend receives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from phibroker.engine.records import error_text
from phibroker.runtime.agent import Context, Outcome

_tracer = trace.get_tracer("phibroker")  # a proxy: it follows a provider the user sets later
_propagator = TraceContextTextMapPropagator()
_NOTHING = contextlib.nullcontext()
_pinned: ContextVar[tuple[int, int] | None] = ContextVar("phibroker_pinned_span_ids", default=None)


def pinned_ids() -> tuple[int, int] | None:
    """The (trace id, span id) the span being made right now must have (a run's own), or None."""
    return _pinned.get()


def tracing() -> bool:
    """Whether a tracer provider was set: without one a span costs a worker a few microseconds for
    nothing. Asked about once a second (a worker's heartbeat), not per task: asking costs about as much."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def attempt_span(ctx: Context, traceparent: str | None) -> Span:
    """The span of one attempt, started now under the run's span (a new trace without a `traceparent`)."""
    parent = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    return _tracer.start_span(
        f"invoke_agent {ctx.agent}",
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes={
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": ctx.agent,
            "phibroker.run_id": ctx.workflow_id,
            "phibroker.task": ctx.task,
            "phibroker.unit": ctx.unit,
            "phibroker.command": ctx.command,
            "phibroker.attempt": ctx.attempt,
        },
    )


def current(span: Span | None) -> AbstractContextManager[Any]:
    """`span` as the current span of this thread (and of what it starts) while the block runs."""
    if span is None:
        return _NOTHING
    return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def attempt_settled(span: Span, ctx: Context, outcome: Outcome) -> None:
    """End an attempt's span: the tokens its handler reported with `ctx.spend`, ERROR if it failed."""
    usage: dict[str, Any] = getattr(ctx, "usage", None) or {}
    for key in ("input_tokens", "output_tokens"):
        if usage.get(key):
            span.set_attribute(f"gen_ai.usage.{key}", int(usage[key]))
    if not outcome.ok:
        error = outcome.error or {}
        span.set_attribute("error.type", str(error.get("type") or "Error"))
        span.set_status(Status(StatusCode.ERROR, error_text(error)))
    span.end()


def run_ended(run_id: str, meta: Mapping[str, Any]) -> None:
    """Emit the span of a run that has just ended (its meta after the commit), with the ids its
    `traceparent` fixed; a sub-workflow's run under its parent run's span."""
    ids = _ids(meta.get("traceparent"))
    if ids is None:
        return
    above = meta.get("parent_traceparent")
    parent = _propagator.extract({"traceparent": str(above)}) if above else otel_context.Context()
    state = str(meta.get("state"))
    token = _pinned.set(ids)
    try:
        span = _tracer.start_span(
            f"invoke_workflow {meta.get('name')}",
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=_nanoseconds(meta.get("created_at")),
            attributes={
                "gen_ai.operation.name": "invoke_workflow",
                "phibroker.run_id": run_id,
                "phibroker.state": state,
            },
        )
    finally:
        _pinned.reset(token)
    if state != "succeeded":
        span.set_status(Status(StatusCode.ERROR, str(meta.get("error") or state)))
    span.end(end_time=_nanoseconds(meta.get("finished_at")))


def _ids(traceparent: Any) -> tuple[int, int] | None:
    parts = str(traceparent or "").split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        return int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None


def _nanoseconds(seconds: Any) -> int | None:
    try:
        return int(float(seconds) * 1e9)
    except (TypeError, ValueError):
        return None
