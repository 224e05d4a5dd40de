"""The OpenTelemetry SDK id generator that lets a run's own span carry the ids its attempts name.

A run's trace context is fixed when the run is built, and its attempts' spans name its span id as
their parent; the run's span is made only when the run ends, by whichever coordinator ends it. The
API cannot choose a span's ids, so this generator does: the ids `tracing.run_ended` pins for the span
it is making, random ones otherwise. Configure it with `OTEL_PYTHON_ID_GENERATOR=phibroker`, or pass
`RunSpanIds()` as a `TracerProvider`'s `id_generator`. Only this module needs the SDK.
"""

from __future__ import annotations

from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

from phibroker.runtime.tracing import pinned_ids


class RunSpanIds(IdGenerator):
    """Random ids, except for a run's own span, whose ids were fixed when the run was built."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        pinned = pinned_ids()
        return pinned[1] if pinned is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        pinned = pinned_ids()
        return pinned[0] if pinned is not None else self._random.generate_trace_id()
