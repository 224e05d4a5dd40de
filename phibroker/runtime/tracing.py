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

The run's own span is not emitted. Its span id must be known when the run is built, because attempts
name it as their parent long before the run ends and any coordinator may see the end, yet the API
makes a span only through `start_span`, whose ids the SDK's id generator picks (a chosen trace id
only by way of a parent). So no span the API can make carries the id the attempts name: they hang
under a parent a tracing backend never receives, and a run span waits for a way to emit one with a
chosen id (the SDK's, not the API's).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from phibroker.engine.records import error_text
from phibroker.runtime.agent import Context, Outcome

_tracer = trace.get_tracer("phibroker")  # a proxy: it follows a provider the user sets later
_propagator = TraceContextTextMapPropagator()
_NOTHING = contextlib.nullcontext()


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
