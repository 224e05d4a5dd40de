"""The engine when handlers are in flight: inputs applied by hand to a `Simulation`'s run, so a test
can hold a task `running` while a cancel, a second stop, a deadline or a copy of an input arrives.

(A `Simulation` runs each handler the moment it is dispatched; these cases need one that has not
answered yet, as a worker on another machine would be.)
"""

from __future__ import annotations

from typing import Any

import pytest

from phibroker import engine, wire
from phibroker.engine.state import timer_member
from phibroker.testing import Simulation


def in_flight(spec: dict[str, Any]) -> tuple[Simulation, dict[str, wire.TaskMessage]]:
    """A simulation whose first dispatches are taken by a worker that has not answered yet."""
    sim = Simulation(spec, [])
    messages = {m.unit: m for m in sim.queue}
    sim.queue.clear()
    for unit in messages:  # what the start script writes
        sim.run_state.units[unit].update(state="running", token=1)
    return sim, messages


def answer(sim: Simulation, message: wire.TaskMessage, ok: bool = True, **extra: Any) -> None:
    result = wire.Result(
        message.id,
        sim.run_state.id,
        message.unit,
        token=1,
        ok=ok,
        worker="w",
        started=1.0,
        finished=2.0,
        value=wire.pack({"from": message.unit}) if ok else None,
        error=None if ok else {"type": "Cancelled", "message": "asked to stop"},
        **extra,
    )
    sim._apply(lambda run, now: engine.apply_result(run, result, now))


def states(sim: Simulation) -> dict[str, str]:
    return {name: task["state"] for name, task in sim.status()["tasks"].items()}


def test_a_mapped_task_asked_to_stop_ends_when_its_partitions_have() -> None:
    sim, messages = in_flight(
        {
            "name": "m",
            "params": {"xs": [1, 2]},
            "tasks": {"M": {"agent": "a", "command": "c", "map": {"over": "${params.xs}", "partitions": 2}}},
        }
    )
    sim._apply(lambda run, now: engine.cancel(run, now, "bye"))
    answer(sim, messages["M#1"], ok=False)
    answer(sim, messages["M#0"])  # this one finished its work anyway
    assert sim.status()["state"] == "cancelled" and states(sim) == {"M": "cancelled"}


def test_a_second_stop_waits_for_the_handler_and_nothing_is_undone_under_it() -> None:
    """U (below T) is asked to stop, then the whole run is cancelled: T is not compensated while U's
    handler still runs."""
    spec = {
        "name": "two-stops",
        "tasks": {
            "T": {"agent": "a", "command": "c", "compensate": {"command": "undo"}},
            "U": {"agent": "a", "command": "c", "depends_on": ["T"]},
        },
    }
    sim, messages = in_flight(spec)
    answer(sim, messages["T"])
    u = sim.queue.popleft()
    sim.run_state.units["U"].update(state="running", token=1)
    sim._apply(lambda run, now: engine.cancel_tasks(run, ["U"], now, "region"))
    sim._apply(lambda run, now: engine.cancel(run, now, "all"))
    assert sim.status()["state"] == "cancelling" and not sim.queue  # no compensation dispatched
    answer(sim, u, ok=False)
    assert sim.status()["state"] == "compensating" and [m.unit for m in sim.queue] == ["T!undo"]


def test_a_quorum_task_in_a_failing_run_is_cancelled_not_a_crash() -> None:
    spec = {
        "name": "quorum-failing",
        "tasks": {
            "A": {"agent": "a", "command": "c"},
            "B": {"agent": "a", "command": "c"},
            "F": {"agent": "a", "command": "c", "retry": {"max_attempts": 1}},
            "Q": {"agent": "a", "command": "c", "depends_on": ["A", "B"], "trigger": {"at_least": 1}},
        },
    }
    sim, messages = in_flight(spec)
    answer(sim, messages["F"], ok=False)
    answer(sim, messages["A"])
    assert states(sim)["Q"] == "cancelled"


def test_a_deadline_or_a_loss_does_not_touch_a_task_that_answered_and_waits_for_its_children() -> None:
    spec = {"name": "spawned", "tasks": {"Plan": {"agent": "dc", "command": "plan", "timeout": "10s"}}}
    sim, messages = in_flight(spec)
    message = messages["Plan"]
    answer(sim, message, spawns=[{"name": "s0", "agent": "dc", "command": "do"}])
    sim._apply(lambda run, now: engine.apply_timer(run, timer_member("deadline", "sim", "Plan", message.id), now))
    sim._apply(lambda run, now: engine.lost(run, "Plan", message.id, "delivered too often", now))
    assert states(sim) == {"Plan": "running", "Plan/s0": "ready"}
    assert sim.status()["tasks"]["Plan"]["error"] is None


@pytest.mark.parametrize("copies", [1, 2])
def test_a_signal_read_twice_opens_one_gate(copies: int) -> None:
    spec = {
        "name": "twice",
        "tasks": {"G1": {"signal": {"name": "ci"}}, "G2": {"signal": {"name": "ci"}, "depends_on": ["G1"]}},
    }
    sim = Simulation(spec, [])
    for _ in range(copies):  # an inbox entry read again after a take-over, or an outbox carried out twice
        sim._apply(lambda run, now: engine.signal(run, "ci", {"n": 1}, now, "ci", "signal-1"))
    assert states(sim) == {"G1": "succeeded", "G2": "running"}


def test_a_retry_read_twice_reopens_once() -> None:
    sim = Simulation(
        {"name": "again", "tasks": {"A": {"agent": "a", "command": "c", "retry": {"max_attempts": 1}}}}, []
    )
    message = sim.queue.popleft()
    sim.run_state.units["A"].update(state="running", token=1)
    answer(sim, message, ok=False)
    assert sim.status()["state"] == "failed"
    assert sim._apply(lambda run, now: engine.reopen(run, now, None, "retry-1")) is None
    again = sim.queue.popleft()
    sim.run_state.units["A"].update(state="running", token=1)
    answer(sim, again, ok=False)
    assert "this request already" in sim._apply(lambda run, now: engine.reopen(run, now, None, "retry-1"))


def test_a_result_publishes_no_event_of_the_coordinators_own_types() -> None:
    """`ctx.emit` refuses `workflow.*`, `task.*`, `approval.*` and `signal.*` in any case, and types that
    are not printable text; a result that carries one anyway (a worker's user sends what it likes) has
    it dropped: only a commit tells those."""
    sim, messages = in_flight({"name": "e", "tasks": {"T": {"agent": "a", "command": "c"}}})
    told = ("task.failed", "workflow.failed", "approval.requested", "Task.Failed", " signal.received", "scan\x1b[2K")
    forged = [{"type": t, "data": {"error": "forged"}} for t in told]
    answer(sim, messages["T"], events=[*forged, {"type": "scan.done", "data": {"n": 1}}])
    assert sim.status()["state"] == "succeeded"
    types = [e["type"] for e in sim.events]
    assert "scan.done" in types and not set(told) & set(types)
