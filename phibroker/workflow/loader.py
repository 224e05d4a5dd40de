"""Loads a workflow file and checks it whole: schema, graph, expressions and references.

A `Workflow` is what every other module works from: a spec that passed every check, plus its graph
analysis and its compiled expressions. Nothing here touches Redis.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from phibroker.errors import (
    CycleError,
    ExpressionError,
    IncludeCycleError,
    UnknownDependencyError,
    WorkflowFileError,
)
from phibroker.wire import nests_deeper
from phibroker.workflow import dag
from phibroker.workflow.decoding import collector_paused, decode, read_bounded
from phibroker.workflow.expr import (
    WHERE_MAX,
    Expression,
    Reference,
    Template,
    compile_expression,
    compile_template,
    task_of,
)
from phibroker.workflow.spec import (
    MAX_DEPTH,
    RetryPolicy,
    Task,
    WorkflowSpec,
    coerce_param,
    did_you_mean,
    is_name,
    parse_spec,
    retry_policy,
    task_timeout,
)

_TASK = TypeAdapter(Task)
_TASK_FIELDS = ("result", "state", "error", "iterations", "children")  # what `tasks.NAME.` may reach
_EVENT_ROOTS = frozenset({"event", "type", "data", "workflow", "task", "ts", "agent"})


SIGNED = "signed"
"""A spawned workflow's key for the signed file it came from, kept beside its task spec."""


def task_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spawned child's task spec, without the signed file its workflow came from."""
    return {k: v for k, v in spec.items() if k != SIGNED}


class Workflow:
    """A checked workflow: the spec plus everything derived from it once."""

    def __init__(self, spec: WorkflowSpec, source: dict[str, Any]):
        self.spec = spec
        self.source = source  # the decoded file, stored with each run
        self.deps: dict[str, list[str]] = {name: task.depends_on for name, task in spec.tasks.items()}
        self.when: dict[str, Expression] = {}
        self.expect: dict[str, Expression] = {}
        self.payload: dict[str, Template] = {}
        self.approval_message: dict[str, Template] = {}
        self.map_over: dict[str, Template] = {}
        self.loop_until: dict[str, Expression] = {}
        self.output: Template | None = None
        self.trigger_where: Expression | None = None
        self._retry: dict[str, RetryPolicy] = {}
        self.path: Path | None = None  # the file it came from, and its bytes (for signatures)
        self.text: bytes | None = None
        # `workflow:` tasks: the checked sub-workflow each runs, and its templated params
        self.subworkflows: dict[str, Workflow] = {}
        self.sub_params: dict[str, Template] = {}

    @cached_property
    def spec_json(self) -> str:
        """The decoded file as compact JSON, as each run stores it: encoded once per loaded file."""
        return json.dumps(self.source, separators=(",", ":"))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> dict[str, Task]:
        return self.spec.tasks

    @cached_property
    def order(self) -> list[str]:
        return dag.topological_order(self.deps)

    @cached_property
    def gates(self) -> list[str]:
        """The approval gates, looked at after every transition."""
        return [name for name, task in self.tasks.items() if task.approval is not None]

    @cached_property
    def children_of(self) -> dict[str, list[str]]:
        """Task -> the tasks its handler spawned (`T/NAME`), in the order they came."""
        out: dict[str, list[str]] = {}
        for name in self.tasks:
            parent, slash, _ = name.rpartition("/")
            if slash:
                out.setdefault(parent, []).append(name)
        return out

    def with_children(self, children: Mapping[str, Mapping[str, Any]]) -> Workflow:
        """This workflow plus tasks spawned at run time (checked by `children.plan_children`): what one
        run schedules. Their payloads are data, never templates: a planner's text is not expanded."""
        if not children:
            return self
        spawned = {name: _TASK.validate_python(task_fields(spec)) for name, spec in children.items()}
        tasks = {**self.spec.tasks, **spawned}
        grown = Workflow(dataclasses.replace(self.spec, tasks=tasks), self.source)
        shared = ("when", "expect", "payload", "approval_message", "map_over", "loop_until", "output", "path", "text")
        for name in (*shared, "trigger_where", "sub_params"):
            setattr(grown, name, getattr(self, name))
        grown.__dict__["spec_json"] = self.spec_json
        grown.subworkflows = dict(self.subworkflows)  # its own: spawned tasks' are added on first use
        return grown

    @cached_property
    def signal_gates(self) -> dict[str, list[str]]:
        """Signal name -> the gates waiting for it, in file order (the first waiting takes a signal)."""
        out: dict[str, list[str]] = {}
        for name, task in self.tasks.items():
            if task.signal is not None:
                out.setdefault(task.signal.name, []).append(name)
        return out

    @cached_property
    def order_index(self) -> dict[str, int]:
        """Declaration order: ties among ready tasks go to the one written first."""
        return {name: i for i, name in enumerate(self.tasks)}

    @cached_property
    def levels(self) -> list[list[str]]:
        return dag.levels(self.deps)

    @cached_property
    def dependents(self) -> dict[str, list[str]]:
        return dag.dependents(self.deps)

    @cached_property
    def critical_path(self) -> tuple[list[str], float]:
        estimates = {n: t.estimate for n, t in self.tasks.items() if t.estimate is not None}
        return dag.critical_path(self.deps, estimates)

    def subworkflow(self, task: str) -> Workflow:
        """The checked sub-workflow a `workflow:` task runs; one added at run time is checked on first use."""
        child = self.subworkflows.get(task)
        if child is None:
            child = self.subworkflows[task] = check(self.tasks[task].workflow)
        return child

    def retry(self, task: str) -> RetryPolicy:
        """The merged policy, built on first use: most tasks of a big file never fail, and those with no
        `retry:` of their own share the file's."""
        spec = self.tasks[task]
        key = task if spec.retry is not None else ""
        policy = self._retry.get(key)
        if policy is None:
            policy = self._retry[key] = retry_policy(self.spec, spec)
        return policy

    @cached_property
    def budgeted(self) -> bool:
        """Whether any budget covers a task (the run's, or one of a task's): the budget checks on each
        dispatch and result are skipped when none does."""
        return self.spec.budget is not None or any(task.budget is not None for task in self.tasks.values())

    def timeout(self, task: str) -> float | None:
        return task_timeout(self.spec, self.tasks[task])

    def labels(self) -> dict[str, str]:
        """A second line per node for graphs: who runs it."""
        out = {}
        for name, task in self.tasks.items():
            if task.approval is not None:
                out[name] = "approval: " + ", ".join(task.approval.approvers or ["anyone trusted"])
            elif task.signal is not None:
                out[name] = f"signal: {task.signal.name}"
            elif task.workflow is not None:
                child = self.subworkflows.get(name)
                if child is not None:  # named by its file when it came from one, else by its name
                    out[name] = "workflow: " + (child.path.name if child.path else child.name)
                else:
                    out[name] = "workflow: " + (task.workflow if isinstance(task.workflow, str) else "embedded")
            else:
                out[name] = f"{task.agent} · {task.command}" + (" (map)" if task.map else "")
        return out

    def parse_overrides(self, pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
        """`-p key=value` strings, typed from each param's default (lists and maps as JSON)."""
        out: dict[str, Any] = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise WorkflowFileError(f"-p {pair!r}: write KEY=VALUE")
            if key not in self.spec.params:
                self.params_with({key: raw})  # raises with the did-you-mean
            try:
                out[key] = coerce_param(key, raw, self.spec.params[key])
            except ValueError as exc:
                raise WorkflowFileError(str(exc)) from None
        return out

    def params_with(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The file's params with overrides applied (already typed by the caller)."""
        unknown = [k for k in overrides if k not in self.spec.params]
        if unknown:
            hint = did_you_mean(unknown[0], self.spec.params)
            declared = ", ".join(self.spec.params) or "none"
            raise WorkflowFileError(f"unknown param {unknown[0]!r}{hint} (the file declares: {declared})")
        if nests_deeper(dict(overrides), MAX_DEPTH + 1):
            raise WorkflowFileError(f"params nest deeper than {MAX_DEPTH} levels")
        return {**self.spec.params, **overrides}


def load(path: str | Path) -> Workflow:
    """Read, decode and check a workflow file; any problem is one WorkflowFileError line.

    Its `workflow: FILE` tasks (relative to it) are loaded, checked and embedded now: a run carries
    its sub-workflows, so later edits of their files change nothing for it."""
    path = Path(path)
    try:
        text = read_bounded(path)
    except OSError as exc:
        raise WorkflowFileError(f"{path}: {exc.strerror or exc}") from None
    return _load(path, text, ((path.resolve(), path.name),))


# The files being loaded, outermost first: (resolved path, the name it was written as).
_Including = tuple[tuple[Path, str], ...]


def _load(path: Path, text: bytes, including: _Including) -> Workflow:
    with collector_paused():
        workflow = _check(decode(text, path.suffix.lower()), path.parent, including)
    workflow.path, workflow.text = path, text
    return workflow


def names_a_file(target: str) -> bool:
    """Whether a FILE|ID argument means a workflow file: an existing path, or a name no run id can be
    (a workflow file's suffix, a path), so a mistyped file name is reported as a missing file."""
    path = Path(target)
    return path.exists() or path.suffix.lower() in (".yaml", ".yml", ".json") or not is_name(target)


def from_stored(spec_json: str) -> Workflow:
    """The Workflow of a run, rebuilt from the spec JSON stored with it (a run outlives its file)."""
    try:
        source = json.loads(spec_json)
    except json.JSONDecodeError as exc:
        raise WorkflowFileError(f"the stored spec is not JSON: {exc.msg}") from None
    return check(source)


def check(data: Any, base: str | Path | None = None) -> Workflow:
    """Every check a workflow file gets, in order: shape, graph, expressions, references, sub-workflows.

    A `workflow: FILE` task is read relative to `base` (the current directory by default) and
    embedded; one already embedded (a mapping) is checked as it is."""
    return _check(data, Path(base or "."), ())


def _check(data: Any, base: Path, including: _Including) -> Workflow:
    with collector_paused():
        spec = parse_spec(data)
        workflow = Workflow(spec, data)
        _check_dependencies(workflow)
        _compile(workflow)
        _embed(workflow, base, including)
    return workflow


def _embed(workflow: Workflow, base: Path, including: _Including) -> None:
    """Check each `workflow:` task's sub-workflow and its params; a file's decoded text replaces its
    name in the source, so what a run stores (and a signature covers) is what runs."""
    embedded: dict[str, dict[str, Any]] = {}
    for name, task in workflow.tasks.items():
        if task.workflow is None:
            continue
        extra = [f for f in ("retry", "timeout") if getattr(task, f) is not None]
        if extra:
            raise WorkflowFileError(
                f"task {name!r}: a sub-workflow task takes no {', '.join(extra)} (set them in the sub-workflow)"
            )
        if isinstance(task.workflow, str):
            child = _include(name, task.workflow, base, including)
            task.workflow = embedded[name] = child.source
        else:
            try:
                child = _check(task.workflow, base, including)
            except IncludeCycleError:
                raise
            except WorkflowFileError as exc:
                raise WorkflowFileError(f"task {name!r}: workflow: {exc}") from None
        workflow.subworkflows[name] = child
        workflow.sub_params[name] = _sub_params(workflow, name, task.params, child)
    if embedded:
        tasks = workflow.source["tasks"]
        tasks = {**tasks, **{name: {**tasks[name], "workflow": child} for name, child in embedded.items()}}
        workflow.source = {**workflow.source, "tasks": tasks}


def _include(task: str, target: str, base: Path, including: _Including) -> Workflow:
    """Load the sub-workflow file `target` (relative to `base`); a file that includes itself, directly
    or through others, is an IncludeCycleError naming the chain."""
    path = base / target
    resolved = path.resolve()
    if any(resolved == seen for seen, _ in including):
        start = next(i for i, (seen, _) in enumerate(including) if seen == resolved)
        raise IncludeCycleError([name for _, name in including[start:]] + [target])
    try:
        text = read_bounded(path)
    except OSError as exc:
        raise WorkflowFileError(f"task {task!r}: workflow {target}: {exc.strerror or exc}") from None
    try:
        return _load(path, text, (*including, (resolved, target)))
    except IncludeCycleError:
        raise
    except WorkflowFileError as exc:
        raise WorkflowFileError(f"task {task!r}: workflow {target}: {exc}") from None


def _sub_params(workflow: Workflow, task: str, params: dict[str, Any], child: Workflow) -> Template:
    """A sub-workflow's params: each one the child declares, templated like a payload."""
    for key in params:
        if key not in child.spec.params:
            hint = did_you_mean(key, child.spec.params)
            declared = ", ".join(child.spec.params) or "none"
            raise WorkflowFileError(
                f"task {task!r}: params: {child.name} has no param {key!r}{hint} (it declares: {declared})"
            )
    return _template(workflow, task, "params", params)


def _check_dependencies(workflow: Workflow) -> None:
    tasks = workflow.tasks
    named = set().union(*workflow.deps.values())  # one pass in C; the loop below runs only on an error
    if named <= tasks.keys():
        named.clear()
    for name, task in tasks.items() if named else ():
        for dep in task.depends_on:
            if dep not in tasks:
                suggestion = difflib.get_close_matches(dep, list(tasks), n=1)
                raise UnknownDependencyError(name, dep, suggestion[0] if suggestion else None)
    cycle = dag.find_cycle(workflow.deps)
    if cycle:
        raise CycleError(cycle)


def _compile(workflow: Workflow) -> None:
    """Compile every expression and template, and check that each reference can be resolved."""
    spec = workflow.spec
    for name, task in spec.tasks.items():
        if task.payload:
            workflow.payload[name] = _template(workflow, name, "payload", task.payload)
        if task.when is not None:
            workflow.when[name] = _expression(workflow, name, "when", task.when)
        if task.expect is not None:
            workflow.expect[name] = _expression(workflow, name, "expect", task.expect, extra_roots={"result"})
        if task.approval is not None:
            workflow.approval_message[name] = _template(workflow, name, "approval.message", task.approval.message)
        if task.map is not None:
            workflow.map_over[name] = _template(workflow, name, "map.over", task.map.over)
        if task.compensate is not None and task.compensate.payload:
            _template(workflow, name, "compensate.payload", task.compensate.payload)
        if task.loop is not None:
            until = _expression(workflow, name, "loop.until", task.loop.until, extra_roots={"result", "iteration"})
            workflow.loop_until[name] = until
    if spec.output is not None:
        workflow.output = _output(workflow, spec.output)
    if spec.on is not None and spec.on.where is not None:
        if len(spec.on.where) > WHERE_MAX:
            raise WorkflowFileError(f"on.where: longer than {WHERE_MAX:,} characters (it runs on every event)")
        try:
            where = compile_expression(spec.on.where)
        except ExpressionError as exc:
            raise WorkflowFileError(f"on.where: {exc}") from None
        for ref in where.references:
            if ref.path[0] not in _EVENT_ROOTS:
                raise WorkflowFileError(f"on.where: {ref} is not part of an event (use event.data.X)")
        workflow.trigger_where = where


def _output(workflow: Workflow, value: Any) -> Template:
    """The run's `output`: it may read any task, as the run is over when it is rendered."""
    try:
        template = compile_template(value)
    except ExpressionError as exc:
        raise WorkflowFileError(f"output: {exc}") from None
    for ref in template.references:
        if ref.path[0] == "tasks" and task_of(ref, workflow.tasks) is None:
            name = ref.path[1] if len(ref.path) > 1 else ""
            raise WorkflowFileError(f"output: ${{{ref}}} names no task{did_you_mean(name, workflow.tasks)}")
        if ref.path[0] == "params" and not _param_exists(workflow.spec.params, ref):
            raise WorkflowFileError(f"output: ${{{ref}}} names no declared param")
        if ref.path[0] not in ("tasks", "params"):
            raise WorkflowFileError(f"output: ${{{ref}}}: unknown name {ref.path[0]!r} (use params or tasks)")
    return template


def _template(workflow: Workflow, task: str, field: str, value: Any) -> Template:
    try:
        template = compile_template(value)
    except ExpressionError as exc:
        raise WorkflowFileError(f"task {task!r}: {field}: {exc}") from None
    _check_references(workflow, task, field, template.references)
    return template


def _expression(
    workflow: Workflow, task: str, field: str, source: str, extra_roots: set[str] | None = None
) -> Expression:
    try:
        expression = compile_expression(source)
    except ExpressionError as exc:
        raise WorkflowFileError(f"task {task!r}: {field}: {exc}") from None
    _check_references(workflow, task, field, expression.references, extra_roots or set())
    return expression


def _check_references(
    workflow: Workflow,
    task: str,
    field: str,
    references: frozenset[Reference],
    extra_roots: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Each reference names a declared param or reaches `result`/`state` of an upstream task."""
    upstream: set[str] | None = None
    for ref in references:
        root = ref.path[0]
        where = f"task {task!r}: {field}: ${{{ref}}}"
        if root in extra_roots:
            continue
        if root == "params":
            if len(ref.path) < 2 or not _param_exists(workflow.spec.params, ref):
                name = ref.path[1] if len(ref.path) > 1 else ""
                hint = did_you_mean(name, workflow.spec.params)
                raise WorkflowFileError(f"{where} names no declared param{hint} (declare it under params:)")
        elif root == "tasks":
            target = task_of(ref, workflow.tasks)
            if target is None:
                name = ref.path[1] if len(ref.path) > 1 else ""
                hint = did_you_mean(name, workflow.tasks)
                raise WorkflowFileError(f"{where} names no task{hint}")
            if upstream is None:
                upstream = dag.ancestors(workflow.deps, task)
                if workflow.tasks[task].loop is not None:  # a loop reads its own last iteration
                    upstream.add(task)
            if target not in upstream:
                raise WorkflowFileError(f"{where}: {target!r} is not upstream of {task!r} (add it to depends_on)")
            rest = ref.path[1 + len(target.split(".")) :]
            if not rest or rest[0] not in _TASK_FIELDS:
                fields = " or ".join(f"tasks.{target}.{f}" for f in _TASK_FIELDS)
                raise WorkflowFileError(f"{where}: write {fields}")
        else:
            allowed = ", ".join(sorted({"params", "tasks", *extra_roots}))
            raise WorkflowFileError(f"{where}: unknown name {root!r} (use one of: {allowed})")


def _param_exists(params: Mapping[str, Any], ref: Reference) -> bool:
    rest = ref.path[1:]
    return any(".".join(rest[:n]) in params for n in range(len(rest), 0, -1))
