"""Loads a workflow file and checks it whole: schema, graph, expressions and references.

A `Workflow` is what every other module works from: a spec that passed every check, plus its graph
analysis and its compiled expressions. Nothing here touches Redis.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import re
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
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
from phibroker.workflow.expr import Expression, Reference, Template, compile_expression, compile_template, task_of
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
_EVENT_ROOTS = frozenset({"event", "type", "data", "workflow", "task", "ts"})


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
        tasks = {**self.spec.tasks, **{name: _TASK.validate_python(dict(spec)) for name, spec in children.items()}}
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
        """The merged policy, built on first use: most tasks of a big file never fail."""
        policy = self._retry.get(task)
        if policy is None:
            policy = self._retry[task] = retry_policy(self.spec, self.tasks[task])
        return policy

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
        text = _read(path)
    except OSError as exc:
        raise WorkflowFileError(f"{path}: {exc.strerror or exc}") from None
    return _load(path, text, ((path.resolve(), path.name),))


# The files being loaded, outermost first: (resolved path, the name it was written as).
_Including = tuple[tuple[Path, str], ...]


def _load(path: Path, text: bytes, including: _Including) -> Workflow:
    with _collector_paused():
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


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Decoding and checking a big file makes objects by the hundred thousand, none of them in cycles:
    the cyclic collector would walk them again and again (half the time of a 100,000-task file)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# What a workflow file may make the parsers do; past each, a one-line error in bounded time and memory.
MAX_FILE_BYTES = 16 * 1024 * 1024  # a generated 100,000-task file is ~12 MB; YAML takes ~50x its size to decode
MAX_ALIASES = 10_000  # `*name` uses: a hand-written file shares a block tens of times, a generated one never
MAX_ALIAS_NODES = 1_000_000  # nodes the aliases add once expanded (a billion laughs: 10^9 from 400 bytes)
_TOO_DEEP = f"maps and lists nest deeper than {MAX_DEPTH} levels"


def _read(path: Path) -> bytes:
    """The file, or just enough of it to tell that it is too big (a 10 GB file is not read whole)."""
    with path.open("rb") as file:
        return file.read(MAX_FILE_BYTES + 1)


def decode(text: bytes | str, suffix: str = "") -> Any:
    """YAML or JSON by suffix (JSON if it starts with `{` otherwise); duplicate keys are errors.

    Bounded: the size, what YAML aliases expand to, and the nesting, each checked before it costs."""
    if len(text) > MAX_FILE_BYTES:
        raise WorkflowFileError(f"the file is over {MAX_FILE_BYTES >> 20} MiB, the limit for a workflow file")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise WorkflowFileError("the file is not UTF-8 text") from None
    if suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")):
        data = _decode_json(text)
    else:
        data = _decode_yaml(text)
    if nests_deeper(data, MAX_DEPTH):
        raise WorkflowFileError(_TOO_DEEP)
    return data


def _decode_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as exc:
        raise WorkflowFileError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # the decoder recurses once a level
        raise WorkflowFileError(_TOO_DEEP) from None
    except ValueError as exc:  # a number of more than 4300 digits
        raise WorkflowFileError(f"invalid JSON: {str(exc).partition(':')[0]}") from None


def _decode_yaml(text: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.anchored = "&" in text  # no anchor, no alias: nothing to expand
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        raise WorkflowFileError(_yaml_problem(text, exc)) from None
    except yaml.YAMLError as exc:
        raise WorkflowFileError(f"invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:  # the pure-Python parser (no libyaml) recurses a few times a level
        raise WorkflowFileError(_TOO_DEEP) from None
    except ValueError as exc:  # a number of more than 4300 digits
        raise WorkflowFileError(f"invalid YAML: {str(exc).partition(':')[0]}") from None
    finally:
        loader.dispose()


_YAML_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # what PyYAML counts as a new line


def _yaml_problem(text: str, exc: yaml.MarkedYAMLError) -> str:
    """One line for a YAML syntax error. A tab in the indentation is named as such: PyYAML only says
    "found character that cannot start any token", and an editor shows the tab as spaces."""
    mark = exc.problem_mark
    if mark is None:
        return f"invalid YAML: {exc.problem or exc}"
    lines = _YAML_LINE_BREAK.split(text)
    line = lines[mark.line] if mark.line < len(lines) else ""
    indent = line[: len(line) - len(line.lstrip(" \t"))]
    if "\t" in indent and mark.column <= len(indent):
        return f"invalid YAML at line {mark.line + 1}: tabs are not allowed in YAML indentation, use spaces"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem or exc}"


def check(data: Any, base: str | Path | None = None) -> Workflow:
    """Every check a workflow file gets, in order: shape, graph, expressions, references, sub-workflows.

    A `workflow: FILE` task is read relative to `base` (the current directory by default) and
    embedded; one already embedded (a mapping) is checked as it is."""
    return _check(data, Path(base or "."), ())


def _check(data: Any, base: Path, including: _Including) -> Workflow:
    with _collector_paused():
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
        text = _read(path)
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


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise WorkflowFileError(f"duplicate key {key!r}")
            seen.add(key)
    return out


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (the C one when built) that refuses duplicate keys instead of keeping the last,
    and checks what aliases expand to before building anything."""

    anchored = True  # whether the text may hold anchors (and so aliases)

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        if self.anchored:
            _check_aliases(node)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: the safe constructor merges, and keys written here win
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # a list or map as a key: the safe constructor's own error says so
            if key in seen:
                mark = key_node.start_mark
                raise WorkflowFileError(f"duplicate key {key!r} at line {mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_aliases(root: yaml.Node) -> None:
    """Aliases turn a small file huge (a billion laughs) or endless (an alias inside its own anchor).
    Count the nodes they stand for without expanding them: each shared node is walked once."""
    sizes: dict[int, int] = {}  # id(node) -> how many nodes it is, expanded
    walking: set[int] = set()  # the nodes on the way down to here: meeting one again is a loop
    aliases = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, walked = stack.pop()
        key = id(node)
        if walked:
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            walking.discard(key)
        elif key in sizes:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise WorkflowFileError(f"the YAML uses more than {MAX_ALIASES:,} aliases")
        elif key in walking:
            line = node.start_mark.line + 1
            raise WorkflowFileError(f"invalid YAML at line {line}: an alias refers to a node it is inside of")
        elif isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
        else:
            walking.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    added = sizes[id(root)] - len(sizes)
    if added > MAX_ALIAS_NODES:
        raise WorkflowFileError(f"YAML aliases expand to {added:,} more nodes, over the limit of {MAX_ALIAS_NODES:,}")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _not_json(loader: Any, node: yaml.Node) -> Any:
    """A workflow file holds what JSON can: a set, bytes or a date would pass `validate`, then fail to submit."""
    kind = node.tag.rpartition(":")[2]
    problem = f"!!{kind} values are not allowed: a workflow file holds JSON values (quote it as a string)"
    raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)


def _yaml12_booleans(loader: Any) -> None:
    """Only true/false are booleans (YAML 1.2), so `on:` stays the key `on`, not True; and a date stays
    text (YAML 1.2 has no timestamps), as in JSON."""
    dropped = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    resolvers = {
        first: [(tag, regexp) for tag, regexp in entries if tag not in dropped]
        for first, entries in loader.yaml_implicit_resolvers.items()
    }
    loader.yaml_implicit_resolvers = resolvers
    loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )


_yaml12_booleans(_UniqueKeyLoader)
for _tag in ("binary", "set", "omap", "pairs", "timestamp"):
    _UniqueKeyLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _not_json)
