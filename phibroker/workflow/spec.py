"""The workflow file's schema as pydantic models: shape, names and durations.

Graph and reference checks live in `workflow.py`; this module only says what a well-formed file is.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, with_config

from phibroker.errors import WorkflowFileError
from phibroker.wire import nests_deeper

# For pydantic's (Rust) regexes, where `$` is the very end. Python's `$` also matches before a final
# newline: test names with `is_name` (fullmatch), never `re.match(NAME_PATTERN, ...)`.
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
RUN_ID_MAX = 200  # characters of a run's id: a part of every key of the run, and of each message about it
_NAME = re.compile(NAME_PATTERN)
# Maps and lists inside maps and lists: a workflow file needs 4 levels for itself and a payload a few
# more; JSON or YAML nested far deeper is an attack on the parsers (recursion, then the wire's limit).
MAX_DEPTH = 100
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def is_name(value: str) -> bool:
    """A task, agent, command, param, signal or run name: letters, digits, '_', '.', '-', nothing else."""
    return _NAME.fullmatch(value) is not None


def parse_duration(value: Any) -> float:
    """`500ms`, `10s`, `10m`, `2h`, `1d` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"not a duration: {value!r} (use 500ms, 10s, 10m, 2h or seconds)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"not a duration: {value!r} (negative)")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
RuleName = Literal[
    "all_success",
    "all_done",
    "all_failed",
    "one_success",
    "one_failed",
    "none_failed",
    "none_failed_min_one_success",
    "none_skipped",
    "always",
]
FailureMode = Literal["fail_fast", "best_effort"]
Outcome = Literal["all", "leaves"]
DEFAULT_RETRY_ON = ("timeout", "unavailable", "busy")


_FORBID = ConfigDict(extra="forbid")


@with_config(_FORBID)
@dataclass(slots=True)
class RetryPolicy:
    """How a failed attempt is retried; `max_attempts` counts the first attempt."""

    max_attempts: Annotated[int, Field(ge=1)] = 4
    base_delay: Duration = 1.0
    max_delay: Duration = 60.0
    jitter: Annotated[float, Field(ge=0.0, le=10.0)] = 0.1
    retry_on: list[str] = field(default_factory=lambda: list(DEFAULT_RETRY_ON))

    def delay(self, retry: int, rand: random.Random) -> float:
        """Before retry n (n = 1 for the first): min(max_delay, base_delay·2^(n-1)) plus 0..jitter×that."""
        delay = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        return delay + rand.uniform(0.0, self.jitter * delay)


def retries_error(retry_on: Sequence[str], error: str, retryable: bool) -> bool:
    """Whether a policy with this `retry_on` retries a failure (attempts left aside): the handler raised
    `Retryable`, or an entry is a case-insensitive substring of the error's `Type: message`. The
    coordinator decides with it, and a worker uses it to count an attempt as `retrying` or `failed`."""
    text = error.lower()
    return retryable or any(str(entry).lower() in text for entry in retry_on)


@with_config(_FORBID)
@dataclass(slots=True)
class RetryOverride:
    """A partial retry policy: the fields set here win over the defaults'."""

    max_attempts: Annotated[int, Field(ge=1)] | None = None
    base_delay: Duration | None = None
    max_delay: Duration | None = None
    jitter: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    retry_on: list[str] | None = None


@with_config(_FORBID)
@dataclass(slots=True)
class Compensate:
    """The saga step that undoes a succeeded task; runs on the task's agent unless it names one."""

    command: Name
    agent: Name | None = None
    payload: dict[str, Any] | None = None


@with_config(_FORBID)
@dataclass(slots=True)
class Approval:
    message: str = "Approve?"
    timeout: Duration | None = None
    approvers: list[Name] = field(default_factory=list)
    on_reject: Literal["fail", "skip"] = "fail"  # skip: a rejection skips the gate, so rules can branch


@with_config(_FORBID)
@dataclass(slots=True)
class MapSpec:
    """Scatter: the list `over` is split in order into `partitions` runs of the command."""

    over: Any
    partitions: Annotated[int, Field(ge=1, le=10_000)] = 4


@with_config(_FORBID)
@dataclass(slots=True)
class Loop:
    """Run the task again, one iteration after another, until `until` holds on its result."""

    until: str
    max_iterations: Annotated[int, Field(ge=1, le=100_000)] = 10


@with_config(_FORBID)
@dataclass(slots=True)
class Signal:
    """A gate that waits for a named signal (`phibroker signal ID NAME`); its result is the data."""

    name: Name
    timeout: Duration | None = None


@with_config(_FORBID)
@dataclass(slots=True)
class Budget:
    """What a task, or a whole run, may spend (`ctx.spend`): tokens (tokens + input + output), cost, or
    both; past a limit the task fails (`fail`) or the run waits for a person (`ask`)."""

    tokens: Annotated[int, Field(ge=1, strict=True)] | None = None
    cost: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    on_exceed: Literal["fail", "ask"] = "fail"

    def __post_init__(self) -> None:
        if self.tokens is None and self.cost is None:
            raise ValueError("give tokens, cost or both")

    def describe(self) -> str:
        """`tokens 100000, cost 5 (fail)`: what `validate` shows."""
        limits = [f"{kind} {plain(value)}" for kind, value in (("tokens", self.tokens), ("cost", self.cost)) if value]
        return f"{', '.join(limits)} ({self.on_exceed})"


def plain(number: float) -> str:
    """A number as people write it: `120512`, `0.42`, never `1.2e+05` nor `0.30000000000000004`."""
    if float(number).is_integer():
        return str(int(number))
    return repr(round(float(number), 9))


@with_config(_FORBID)
@dataclass(slots=True)
class AtLeast:
    """`trigger: {at_least: K}`: a quorum, run once K upstreams succeeded."""

    at_least: Annotated[int, Field(ge=1)]


TriggerRule = RuleName | AtLeast


@with_config(_FORBID)
@dataclass(slots=True)
class Task:
    """One task. Names in `depends_on` are checked for shape by `parse_spec` in one pass (speed)."""

    description: str | None = None
    agent: Name | None = None
    command: Name | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    timeout: Duration | None = None
    retry: RetryOverride | None = None
    when: str | None = None
    expect: str | None = None
    trigger: TriggerRule = "all_success"
    cancel_rest: bool = False
    compensate: Compensate | None = None
    approval: Approval | None = None
    map: MapSpec | None = None
    estimate: Duration | None = None
    end: bool = False  # its success ends the run as succeeded: the rest stops or is skipped
    loop: Loop | None = None
    signal: Signal | None = None
    # a sub-workflow: a file (relative to this one) when written, the embedded workflow once submitted
    workflow: str | dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the sub-workflow's, templated
    budget: Budget | None = None  # what this task may spend, all its attempts together

    @property
    def is_gate(self) -> bool:
        """Waits for a person or a signal: no agent runs it."""
        return self.approval is not None or self.signal is not None


@with_config(_FORBID)
@dataclass(slots=True)
class Defaults:
    timeout: Duration | None = None
    retry: RetryOverride | None = None


@with_config(_FORBID)
@dataclass(slots=True)
class EventTrigger:
    """`on:` — start this workflow when a matching event arrives, with the event's data as params."""

    event: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.*-]+$")]
    where: str | None = None


@with_config(_FORBID)
@dataclass(slots=True)
class WorkflowSpec:
    name: Name
    tasks: Annotated[dict[str, Task], Field(min_length=1)]
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    timeout: Duration | None = None
    failure: FailureMode = "fail_fast"
    outcome: Outcome = "all"
    output: Any = None  # the run's result, templated over its tasks: `status --json` "output"
    defaults: Defaults = field(default_factory=Defaults)
    on: EventTrigger | None = None
    budget: Budget | None = None  # what the whole run may spend, every task together


_SPEC = TypeAdapter(WorkflowSpec)
_NAMES_ONLY = re.compile(r"[A-Za-z0-9_.\-\n]*")
_NAME_RULE = "may only use letters, digits, '_', '.', '-'"


def parse_spec(data: Any) -> WorkflowSpec:
    """Validate a decoded file; every problem becomes one `WorkflowFileError` line naming its place."""
    if not isinstance(data, dict):
        raise WorkflowFileError("a workflow file must be a mapping with `name` and `tasks`")
    try:
        spec = _SPEC.validate_python(data)
    except ValidationError as exc:
        raise WorkflowFileError(_first_error(exc)) from None
    _check_names(spec)
    for key in spec.params:
        if not is_name(key):
            raise WorkflowFileError(f"params: {key!r}: a param name {_NAME_RULE}")
    for name, task in spec.tasks.items():
        plain = task.agent and task.command and isinstance(task.trigger, str) and not task.cancel_rest
        plain = plain and task.approval is None and task.signal is None and task.workflow is None and not task.params
        plain = plain and not (task.loop and task.map)
        if plain and len(set(task.depends_on)) == len(task.depends_on):
            continue  # the common case, decided without a call (100k tasks load in well under a second)
        problem = _kind_problem(task)
        if problem:
            raise WorkflowFileError(f"task {name!r}: {problem}")
    return spec


def _check_names(spec: WorkflowSpec) -> None:
    """Task names and dependencies match NAME_PATTERN; one regex pass over all of them, for speed."""
    names = list(spec.tasks)
    for task in spec.tasks.values():
        names.extend(task.depends_on)
    joined = "\n".join(names)
    separators = joined.count("\n") == len(names) - 1  # so no name holds a newline of its own
    if separators and _NAMES_ONLY.fullmatch(joined) and "" not in (names[0], names[-1]) and "\n\n" not in joined:
        return
    for name, task in spec.tasks.items():
        if not is_name(name):
            raise WorkflowFileError(f"task {name!r}: a name {_NAME_RULE}")
        for dep in task.depends_on:
            if not is_name(dep):
                raise WorkflowFileError(f"task {name!r}: depends_on {dep!r} is not a valid task name")


_KINDS = {"approval": "an approval gate", "signal": "a signal gate", "workflow": "a sub-workflow task"}


def _kind_problem(task: Task) -> str | None:
    kinds = [k for k in _KINDS if getattr(task, k) is not None]
    if len(kinds) > 1:
        return f"a task is one of: agent task, {', '.join(_KINDS.values())} (this one has {' and '.join(kinds)})"
    if kinds:
        allowed = {"loop"} if kinds == ["workflow"] else set()
        extra = [f for f in ("agent", "command", "map", "compensate", "expect", "loop", "budget") if getattr(task, f)]
        extra = [f for f in extra if f not in allowed]
        if extra:
            return f"{_KINDS[kinds[0]]} takes no {', '.join(extra)}"
    elif task.agent is None or task.command is None:
        return "a task needs `agent` and `command` (or `approval`, `signal` or `workflow`)"
    if task.params and kinds != ["workflow"]:
        return "`params` are a sub-workflow's: only a task with `workflow:` takes them"
    if task.loop is not None and task.map is not None:
        return "a mapped task cannot loop (loop a task that maps in a sub-workflow)"
    if len(set(task.depends_on)) != len(task.depends_on):
        return "depends_on names a task twice"
    if task.cancel_rest and not (task.trigger == "one_success" or isinstance(task.trigger, AtLeast)):
        return "cancel_rest needs trigger one_success or {at_least: K}"
    if isinstance(task.trigger, AtLeast) and task.trigger.at_least > len(task.depends_on):
        return f"trigger at_least {task.trigger.at_least} but the task has {len(task.depends_on)} upstreams"
    return None


_UNKNOWN_FIELD = ("unexpected_keyword_argument", "extra_forbidden")

# Which model a mapping at each place of the file is ("*" stands for a task's name): the fields an
# unknown field may have been meant as.
_SECTIONS: dict[tuple[str, ...], type] = {
    (): WorkflowSpec,
    ("tasks", "*"): Task,
    ("tasks", "*", "retry"): RetryOverride,
    ("tasks", "*", "compensate"): Compensate,
    ("tasks", "*", "approval"): Approval,
    ("tasks", "*", "map"): MapSpec,
    ("tasks", "*", "trigger"): AtLeast,
    ("tasks", "*", "loop"): Loop,
    ("tasks", "*", "signal"): Signal,
    ("tasks", "*", "budget"): Budget,
    ("budget",): Budget,
    ("defaults",): Defaults,
    ("defaults", "retry"): RetryOverride,
    ("on",): EventTrigger,
}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'X'?)` for the closest choice, or "" when none is close: most typos are one slip."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _first_error(exc: ValidationError) -> str:
    """Pydantic's first error as one line: `task 'Deploy': unknown field 'agnt' (did you mean 'agent'?)`.

    An unknown field goes first: a misspelt `taks:` also makes `tasks` missing, and the typo is the news.
    """
    errors = exc.errors(include_url=False)
    err = next((e for e in errors if e["type"] in _UNKNOWN_FIELD), errors[0])
    loc = [str(part) for part in err["loc"]]
    if len(loc) >= 2 and loc[0] == "tasks":
        place, rest = f"task {loc[1]!r}", loc[2:]
    else:
        place, rest = "workflow", loc
    if rest[:1] == ["trigger"]:  # a union: pydantic names its members, the user wants the choices
        rules = ", ".join(get_args(RuleName))
        return f"{place}: trigger: one of {rules}, or {{at_least: K}} with K >= 1"
    field_name = ".".join(rest)
    if err["type"] in _UNKNOWN_FIELD:
        return f"{place}: unknown field {field_name!r}{_field_hint(loc)}"
    if err["type"] == "missing" or err["type"] == "missing_argument":
        return f"{place}: missing field {field_name!r}"
    if err["type"] == "too_short":
        return f"{place}: {field_name} is empty (at least {err.get('ctx', {}).get('min_length', 1)} needed)"
    message = err["msg"].removeprefix("Value error, ")
    return f"{place}: {field_name}: {message}" if field_name else f"{place}: {message}"


def _field_hint(loc: list[str]) -> str:
    """The did-you-mean for an unknown field at `loc`, from the fields of the section it sits in."""
    section = tuple("*" if i == 1 and loc[0] == "tasks" else part for i, part in enumerate(loc[:-1]))
    model = _SECTIONS.get(section)
    return did_you_mean(loc[-1], (f.name for f in dataclass_fields(model))) if model else ""


def retry_policy(spec: WorkflowSpec, task: Task) -> RetryPolicy:
    """Built-in policy, then `defaults.retry`, then the task's own fields."""
    fields: dict[str, Any] = {}
    for layer in (spec.defaults.retry, task.retry):
        if layer is not None:
            fields.update({k: v for k, v in asdict(layer).items() if v is not None})
    return RetryPolicy(**fields)


def task_timeout(spec: WorkflowSpec, task: Task) -> float | None:
    return task.timeout if task.timeout is not None else spec.defaults.timeout


def coerce_param(name: str, raw: str, default: Any) -> Any:
    """Type a `-p name=value` override from the default's type; lists and maps are JSON."""
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"param {name!r} wants true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"param {name!r} wants an integer, got {raw!r}") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"param {name!r} wants a number, got {raw!r}") from None
    if isinstance(default, list | dict):
        kind = "list" if isinstance(default, list) else "map"
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested ~1000 deep
            raise ValueError(f"param {name!r} wants a JSON {kind}, got {raw[:80]!r}") from None
        if not isinstance(value, type(default)):
            raise ValueError(f"param {name!r} wants a JSON {kind}, got {raw[:80]!r}")
        if nests_deeper(value, MAX_DEPTH):
            raise ValueError(f"param {name!r}: nested deeper than {MAX_DEPTH} levels")
        return value
    return raw
