"""The state machine of a run: a run's state (state), what each input does to it (transitions). Pure."""

from phibroker.engine.transitions import (
    advance,
    apply_result,
    apply_timer,
    cancel,
    cancel_tasks,
    child_ended,
    decide,
    declined,
    lost,
    redispatch,
    refuse,
    reopen,
    signal,
    spend,
    start,
    wind_down,
)

__all__ = [
    "advance",
    "apply_result",
    "apply_timer",
    "cancel",
    "cancel_tasks",
    "child_ended",
    "decide",
    "declined",
    "lost",
    "redispatch",
    "refuse",
    "reopen",
    "signal",
    "spend",
    "start",
    "wind_down",
]
