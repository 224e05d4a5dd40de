"""Each task's trigger rule in plain words, and the rules in a file that can never fire or never matter.

`trigger_verdict` is what the engine decides when a task's upstreams change; the rest says the same to
a person, for `phibroker validate`. Words as the engine counts: `failed` includes `upstream_failed`, `skipped`
includes `cancelled`. A warning is given only where the file alone makes it certain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phibroker.workflow.loader import Workflow
from phibroker.workflow.spec import AtLeast, Task, TriggerRule

# Rules that fire when an upstream failed: while a failed run winds down these still start (clean-up,
# handlers); every other task that has not started by then never will.
HANDLER_RULES = frozenset({"all_done", "one_failed", "all_failed", "always"})


def trigger_verdict(rule: TriggerRule, states: list[str]) -> str:
    """`run`, `skip`, `upstream_failed` or `wait`, by a task's rule over its upstreams' states.

    Airflow's decisions (its `trigger_rule_dep.py`), with two differences: only `one_success`,
    `one_failed` and `{at_least: K}` decide before every upstream is done (`always` waits too), and a
    cancelled upstream counts as skipped. A rule that can no longer fire gives `upstream_failed` when an
    upstream failed, else `skip`. A task without upstreams runs, whatever its rule.
    """
    if not states:
        return "run"
    succeeded = sum(1 for s in states if s in ("succeeded", "compensated"))
    failed = sum(1 for s in states if s in ("failed", "upstream_failed"))
    skipped = sum(1 for s in states if s in ("skipped", "cancelled"))
    open_ = len(states) - succeeded - failed - skipped
    cannot_fire = "upstream_failed" if failed else "skip"
    if isinstance(rule, AtLeast) or rule == "one_success":
        needed = rule.at_least if isinstance(rule, AtLeast) else 1
        if succeeded >= needed:
            return "run"
        return "wait" if succeeded + open_ >= needed else cannot_fire
    if rule == "one_failed":
        return "run" if failed else "wait" if open_ else "skip"
    if open_:
        return "wait"
    if rule in ("all_done", "always"):
        return "run"
    if rule == "all_failed":
        return "skip" if succeeded or skipped else "run"
    if rule == "none_skipped":
        return "skip" if skipped else "run"
    if failed:
        return "upstream_failed"  # all_success, none_failed, none_failed_min_one_success
    if rule == "all_success":
        return "skip" if skipped else "run"
    if rule == "none_failed_min_one_success":
        return "run" if succeeded else "skip"
    return "run"  # none_failed


def upstream_summary(deps: list[str], states: list[str]) -> str:
    """The upstreams that did not succeed, as a skip or an upstream_failed gives its reason."""
    return ", ".join(f"{d} {s}" for d, s in zip(deps, states, strict=True) if s != "succeeded") or "not satisfied"


# Rules that leave a task `upstream_failed` (which counts as failed below it) when an upstream failed.
_PASS_FAILURE_ON = frozenset({"all_success", "none_failed", "none_failed_min_one_success", "one_success", "at_least"})

_FALLS_THROUGH = "upstream_failed if one failed, else skipped"
_RUNS_WHEN = {
    "all_success": "runs when every upstream succeeded; upstream_failed if one failed, else skipped if one was skipped",
    "all_done": "runs when every upstream is done, whatever their states",
    "always": "runs when every upstream is done, whatever their states (as all_done: it waits for them)",
    "all_failed": "runs when every upstream failed; skipped if one succeeded or was skipped",
    "one_failed": "runs as soon as one upstream failed; skipped if none did",
    "one_success": f"runs as soon as one upstream succeeded; once none can, {_FALLS_THROUGH}",
    "none_failed": "runs when every upstream is done and none failed (skipped ones are fine); "
    "upstream_failed if one failed",
    "none_failed_min_one_success": "runs when every upstream is done, none failed and at least one succeeded; "
    + _FALLS_THROUGH,
    "none_skipped": "runs when every upstream is done and none was skipped (failed ones are fine); skipped if one was",
}

# Rules that fire only when an upstream failed.
_AFTER_FAILURE = ("one_failed", "all_failed")
_UNFAILING = "an approval gate with on_reject: skip and no timeout"


@dataclass(frozen=True, slots=True)
class RuleNote:
    """One task's rule: its name, the quorum of `at_least`, and when the task runs, in one line."""

    rule: str
    k: int | None
    explains: str

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"rule": self.rule}
        if self.k is not None:
            doc["k"] = self.k
        doc["explains"] = self.explains
        return doc


def explain_rules(workflow: Workflow) -> dict[str, RuleNote]:
    """Every task's rule and when the task runs, in the file's order."""
    fail_fast = workflow.spec.failure == "fail_fast"
    notes = {}
    for name, task in workflow.tasks.items():
        k = task.trigger.at_least if isinstance(task.trigger, AtLeast) else None
        notes[name] = RuleNote(rule_name(task), k, _explain(task, fail_fast))
    return notes


def rule_warnings(workflow: Workflow) -> list[str]:
    """One line per task whose rule can never fire, or whose rule, cancel_rest or end has no effect."""
    can_fail = _can_fail(workflow)
    fail_fast = workflow.spec.failure == "fail_fast"
    warnings = []
    for name, task in workflow.tasks.items():
        problem = _never_fires(name, task, can_fail) or _no_effect(name, task, fail_fast)
        if problem:
            warnings.append(problem)
    return warnings


def rule_name(task: Task) -> str:
    return "at_least" if isinstance(task.trigger, AtLeast) else task.trigger


def _can_fail(workflow: Workflow) -> dict[str, bool]:
    """Whether each task may end failed or upstream_failed. Only an approval gate that a rejection
    skips and no timeout fails cannot fail itself; it still can be upstream_failed by its rule."""
    if not any(_unfailing(workflow.tasks[gate]) for gate in workflow.gates):
        return dict.fromkeys(workflow.tasks, True)
    out: dict[str, bool] = {}
    for name in workflow.order:
        task = workflow.tasks[name]
        passes = rule_name(task) in _PASS_FAILURE_ON and any(out[d] for d in task.depends_on)
        out[name] = not _unfailing(task) or passes
    return out


def _unfailing(task: Task) -> bool:
    """An approval gate that a rejection skips and no timeout fails: nothing else fails it."""
    return task.approval is not None and task.approval.on_reject == "skip" and task.approval.timeout is None


def _never_fires(name: str, task: Task, can_fail: dict[str, bool]) -> str | None:
    """A failure-handling rule over upstreams that cannot fail: the task is always skipped."""
    if not task.depends_on:
        return None
    if task.trigger == "one_failed" and not any(can_fail[d] for d in task.depends_on):
        gates = ", ".join(task.depends_on)
        why = f"no upstream can fail ({gates}: each {_UNFAILING})"
    elif task.trigger == "all_failed" and not all(can_fail[d] for d in task.depends_on):
        gate = next(d for d in task.depends_on if not can_fail[d])
        why = f"upstream {gate!r} cannot fail ({_UNFAILING})"
    else:
        return None
    return f"task {name!r}: trigger {task.trigger} can never fire, {why}; it is always skipped"


def _no_effect(name: str, task: Task, fail_fast: bool) -> str | None:
    """A rule, cancel_rest or end that the file makes pointless."""
    rule = rule_name(task)
    if not task.depends_on:
        if rule != "all_success":
            return f"task {name!r}: trigger {rule} has no effect: the task has no upstreams, so it runs at the start"
        return None
    if task.cancel_rest and _quorum(task) == len(task.depends_on):
        why = f"{_rule_text(task)} starts only once every upstream succeeded, so none is left to cancel"
        return f"task {name!r}: cancel_rest has no effect: {why}"
    if task.end and fail_fast and rule in _AFTER_FAILURE:
        why = f"a {rule} task runs only after a failure, and failure: fail_fast has the run failing by then"
        return f"task {name!r}: end has no effect: {why} (failure: best_effort keeps it running)"
    return None


def _explain(task: Task, fail_fast: bool) -> str:
    rule = rule_name(task)
    if not task.depends_on:
        ignored = f" (its rule {rule} does not apply)" if rule != "all_success" else ""
        parts = [f"runs at the start: it has no upstreams{ignored}"]
    elif isinstance(task.trigger, AtLeast):
        k, n = task.trigger.at_least, len(task.depends_on)
        parts = [f"runs as soon as {k} of its {n} upstreams succeeded; once {k} no longer can, {_FALLS_THROUGH}"]
    else:
        parts = [_RUNS_WHEN[rule]]
    if task.when is not None:
        parts.append("then skipped if its `when` is false")
    if task.cancel_rest and task.depends_on:
        parts.append("when it starts, its upstreams still pending or running are cancelled")
    if fail_fast and task.depends_on:
        if rule in HANDLER_RULES:
            parts.append("it still starts after a task failed (failure: fail_fast lets failure handlers run)")
        else:
            parts.append("once any task has failed it no longer starts (failure: fail_fast)")
    if task.end:
        if fail_fast and rule in _AFTER_FAILURE and task.depends_on:
            parts.append("its end: true has no effect (the run is failing by the time it runs)")
        else:
            parts.append("its success ends the run as succeeded (the rest stops or is skipped)")
    return "; ".join(parts)


def _quorum(task: Task) -> int | None:
    if isinstance(task.trigger, AtLeast):
        return task.trigger.at_least
    return 1 if task.trigger == "one_success" else None


def _rule_text(task: Task) -> str:
    return f"{{at_least: {task.trigger.at_least}}}" if isinstance(task.trigger, AtLeast) else str(task.trigger)
