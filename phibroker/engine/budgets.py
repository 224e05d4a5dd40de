"""Budgets: what a run's tasks spent (`ctx.spend`) and the limits a file sets on it. Pure arithmetic.

Spend is counted as (tokens, cost), tokens being `tokens + input_tokens + output_tokens`. A worker
reports each attempt's running totals, never deltas, so a report read twice, or after a later one,
changes nothing: each unit keeps the largest totals heard per attempt (`merge`), and its task and
the run keep sums that grow by exactly what that adds.

A limit is the file's number, times one more for each `ask` a person approved, over what was spent
since the run was last re-opened (`retry` gives a fresh allowance). The transitions decide what
passing one does; the worker uses `exhausted` to raise `BudgetExhausted` in the very call that
passes a `fail` limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from phibroker.workflow.spec import Budget, plain

Spend = tuple[int, float]  # tokens (tokens + input + output), cost
NOTHING: Spend = (0, 0.0)
KEEP_ATTEMPTS = 8  # attempts a unit keeps apart; older ones are summed, and a report of theirs is ignored


def parse(text: Any) -> Spend:
    """`"120512 0.42"` (how tasks and the run keep a sum) -> (120512, 0.42); empty -> nothing spent."""
    if not text:
        return NOTHING
    tokens, _, cost = str(text).partition(" ")
    return int(tokens or 0), float(cost or 0)


def text(spend: Spend) -> str:
    return f"{spend[0]} {_rounded(spend[1])!r}"


def add(a: Spend, b: Spend) -> Spend:
    return a[0] + b[0], _rounded(a[1] + b[1])


def less(a: Spend, b: Spend) -> Spend:
    return max(0, a[0] - b[0]), max(0.0, _rounded(a[1] - b[1]))


def _rounded(cost: float) -> float:
    """Costs summed over many reports drift (0.1 + 0.2); nine decimals is finer than any price."""
    return round(cost, 9)


def reported(tokens: Any, cost: Any) -> Spend | None:
    """A report's totals if they are sane (whole tokens, finite cost, neither negative), else None."""
    if type(tokens) is not int or type(cost) not in (int, float) or tokens < 0 or cost < 0:
        return None
    if not math.isfinite(cost):
        return None
    return tokens, _rounded(float(cost))


def merge(detail: Any, attempt: int, totals: Spend) -> tuple[str, Spend] | None:
    """Take an attempt's running totals into a unit's record of them (`detail`, as kept in the unit's
    `spend` field): the new record and what it adds, or None when it adds nothing (a copy, an older
    report, an attempt long summed away)."""
    record: dict[str, Any] = json.loads(detail) if detail else {"sum": [0, 0.0], "upto": 0, "attempts": {}}
    attempts: dict[str, list[Any]] = record["attempts"]
    if attempt <= int(record["upto"]):
        return None
    old = attempts.get(str(attempt), [0, 0.0])
    new = [max(int(old[0]), totals[0]), max(float(old[1]), totals[1])]
    if new == old:
        return None
    attempts[str(attempt)] = new
    while len(attempts) > KEEP_ATTEMPTS:
        oldest = min(attempts, key=int)
        kept = attempts.pop(oldest)
        record["sum"] = list(add((int(record["sum"][0]), float(record["sum"][1])), (int(kept[0]), float(kept[1]))))
        record["upto"] = int(oldest)
    added = (int(new[0]) - int(old[0]), _rounded(new[1] - float(old[1])))
    return json.dumps(record, separators=(",", ":")), added


def limit_of(budget: Budget, raised: int) -> tuple[int | None, float | None]:
    """The limit in force: the file's numbers times one more for each approved `ask`."""
    times = 1 + max(0, raised)
    return (
        None if budget.tokens is None else budget.tokens * times,
        None if budget.cost is None else _rounded(budget.cost * times),
    )


def over(spent: Spend, limit: Sequence[Any]) -> str | None:
    """`tokens 120512 > 100000` (and/or `cost 5.2 > 5`) when `spent` passes `limit`, else None."""
    tokens, cost = limit
    passed = []
    if tokens is not None and spent[0] > tokens:
        passed.append(f"tokens {spent[0]} > {plain(tokens)}")
    if cost is not None and _rounded(spent[1]) > _rounded(cost):
        passed.append(f"cost {plain(spent[1])} > {plain(cost)}")
    return ", ".join(passed) or None


def exhausted(limits: Sequence[Mapping[str, Any]], attempt: Spend) -> str | None:
    """What a worker decides on its own, from the limits its task message carries (`scope`,
    `on_exceed`, `tokens`, `cost`, and `spent` before this attempt): the `budget_exhausted: ...` line
    when the attempt's totals pass a `fail` limit, as the coordinator will decide it: the first limit
    passed counts (the task's own comes first), so a task's passed `ask` limit means no raise. Spend of
    other tasks since the dispatch is not known here: the coordinator, which knows it, stops the task."""
    for limit in limits:
        if not isinstance(limit, Mapping):
            continue
        before = limit.get("spent") or [0, 0.0]
        try:
            spent = add((int(before[0]), float(before[1])), attempt)
            line = over(spent, (limit.get("tokens"), limit.get("cost")))
        except (TypeError, ValueError, IndexError):
            continue
        if line is not None:
            return f"budget_exhausted: {line}" if limit.get("on_exceed") == "fail" else None
    return None
