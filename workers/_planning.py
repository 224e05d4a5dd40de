"""A plan of steps for the reference agents, and the report over what those steps returned.

dc's `plan` spawns the steps as children of its task (`ctx.spawn`), so the run grows at run time;
dc's `plan_report` then reads each child's result from its inputs (`ctx.inputs["Plan/NAME"]`).
"""

from __future__ import annotations

import re
from typing import Any

from workers._common import slugify

MAX_COMPONENTS = 20
SUMMARY_FIELDS = 4  # scalar fields of a step's result shown in the report
LONG_TEXT = 80


def components_of(goal: str) -> list[str]:
    """`an orders API and an admin UI` -> [`orders API`, `admin UI`]: the parts a goal lists."""
    parts = [re.sub(r"^(?:an?|the)\s+", "", p.strip(" ."), flags=re.I) for p in re.split(r",|;|\band\b", goal)]
    return [p for p in parts if p][:MAX_COMPONENTS] or [goal.strip() or "feature"]


def step_name(prefix: str, text: str) -> str:
    """A child name expressions can reach (`tasks.Plan.children.implement_orders_api`)."""
    return f"{prefix}_{slugify(text, 30).replace('-', '_')}"


def plan_steps(goal: str, components: list[str], audit: bool = True) -> list[dict[str, Any]]:
    """Research the goal, write its requirements, implement each component (in parallel), then audit
    what was built: each step a child spec with the siblings it depends on."""
    steps = [
        {"name": "research", "agent": "webc", "command": "research", "payload": {"topic": goal}},
        {
            "name": "requirements",
            "agent": "dc",
            "command": "synthesize",
            "payload": {"title": f"Requirements: {goal}"},
            "depends_on": ["research"],
        },
    ]
    built = []
    for component in components[:MAX_COMPONENTS]:
        name = step_name("implement", component)
        if name in built:
            continue  # two components with the same slug are one step
        built.append(name)
        steps.append(
            {
                "name": name,
                "agent": "vssc",
                "command": "implement",
                "payload": {"component": component},
                "depends_on": ["requirements"],
            }
        )
    if audit:
        steps.append({"name": "audit", "agent": "kalic", "command": "security_audit", "depends_on": built})
    return steps


def summary(result: Any) -> str:
    """A step's result in a line: its first short scalar fields (`release: api-1a2b · requirement_count: 3`)."""
    if not isinstance(result, dict):
        return str(result)[:LONG_TEXT]
    shown = [
        f"{key}: {value}"
        for key, value in result.items()
        if isinstance(value, str | int | float | bool) and len(str(value)) <= LONG_TEXT
    ]
    return " · ".join(shown[:SUMMARY_FIELDS]) or "(no short fields)"


def render_report(
    plans: list[tuple[str, dict[str, Any]]], inputs: dict[str, Any]
) -> tuple[str, dict[str, str], list[str]]:
    """The markdown report over every plan among the inputs, the summary line of each step that
    returned a result, and the steps that did not."""
    lines: list[str] = []
    steps: dict[str, str] = {}
    missing: list[str] = []
    for task, plan in plans:
        lines += [f"# Plan report: {plan.get('goal', task)}", "", "| step | agent | result |", "| --- | --- | --- |"]
        for step in plan.get("steps", []):
            name = f"{task}/{step['name']}"
            if name in inputs:
                steps[name] = line = summary(inputs[name])
            else:
                missing.append(name)
                line = "_no result_"
            lines.append(f"| `{name}` | {step['agent']} {step['command']} | {line.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines), steps, missing
