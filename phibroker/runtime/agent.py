"""The `Agent` API: commands and event subscriptions, and the context a handler gets.

Nothing here knows Redis: `Agent.execute` runs one handler on one message and returns its outcome,
which the worker settles. That keeps handlers testable without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phibroker import wire
from phibroker.engine import records
from phibroker.engine.budgets import Spend, exhausted, reported
from phibroker.engine.records import describe_exception
from phibroker.errors import BudgetExhausted, MessageTooLarge, Retryable
from phibroker.workflow import load as load_workflow

if TYPE_CHECKING:
    from phibroker.runtime.output import AttemptOutput

Handler = Callable[..., Any]
# Told of each `ctx.spend` call, on the handler's thread: the context (its `usage`, the totals so far),
# and what this call added as (tokens + input + output, cost). The worker sends a `spend` message.
SpendReporter = Callable[["Context", int, float], None]
USAGE_KEYS = ("tokens", "input_tokens", "output_tokens", "cost")

STREAM_CHUNK_LIMIT = 64 * 1024  # bytes of one `ctx.stream` chunk, packed
# The output of the attempt whose handler runs here (its thread, or its asyncio tasks): where its log
# records go.
current_output: contextvars.ContextVar[AttemptOutput | None] = contextvars.ContextVar("phibroker_output", default=None)


class CancelFlag:
    """`ctx.cancelled`: true once the workflow asks the task to stop; `wait(t)` sleeps unless it does.

    The threading.Event a wait needs is made by the first `wait`: most handlers never wait on the flag,
    and an Event (a Condition and its locks) for each attempt was a tenth of a worker's CPU per task."""

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def __bool__(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            event = self._event
            callbacks, self._callbacks = self._callbacks, []
        if event is not None:
            event.set()
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the flag is set, on the thread that sets it; now if it is set already."""
        with self._lock:
            if not self._set:
                self._callbacks.append(callback)
                return
        callback()

    def forget(self, callback: Callable[[], None]) -> None:
        """Drop a callback that is no longer wanted (its handler ended before the flag was set)."""
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            if self._set:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def __repr__(self) -> str:
        return f"CancelFlag({self.is_set()})"


@dataclass
class Context:
    """What a handler knows about the attempt it runs."""

    workflow_id: str
    task: str
    unit: str  # `Task`, `Task#2` (a partition), `Task!undo` (a compensation)
    attempt: int
    agent: str
    command: str
    inputs: dict[str, Any] = field(default_factory=dict)
    partition: tuple[int, int] | None = None  # (index, count) for a mapped task
    result: Any = None  # compensations: the result being undone
    deadline: float | None = None
    token: int = 1  # the fencing token of this attempt
    dispatch_id: str = ""  # the dispatch this attempt answers (bridges key external jobs on it)
    cancelled: CancelFlag = field(default_factory=CancelFlag)
    iteration: int = 1  # a looping task: which iteration this is, from 1
    previous: Any = None  # a looping task: the previous iteration's result (None at first)
    events: list[dict[str, Any]] = field(default_factory=list)
    signals: list[dict[str, Any]] = field(default_factory=list)
    spawns: list[dict[str, Any]] = field(default_factory=list)
    last_heartbeat: float = field(default_factory=time.time)
    output: AttemptOutput | None = None  # the run's output stream, given by the worker
    streamed: list[Any] = field(default_factory=list)  # with no worker (a handler called by a test): the chunks
    # what `ctx.spend` reported so far in this attempt: tokens, input_tokens, output_tokens, cost
    usage: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    budgets: list[dict[str, Any]] = field(default_factory=list)  # the limits over it (the task message's)
    reporter: SpendReporter | None = None  # tells the coordinators of each report, given by the worker
    _spending: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def for_message(cls, message: wire.TaskMessage, token: int) -> Context:
        """The context of one attempt of `message`, fenced by `token`."""
        return cls(
            workflow_id=message.wf,
            task=message.task,
            unit=message.unit,
            attempt=message.attempt,
            agent=message.agent,
            command=message.command,
            inputs=message.inputs,
            partition=(message.partition[0], message.partition[1]) if message.partition else None,
            result=message.result,
            deadline=message.deadline,
            token=token,
            dispatch_id=message.id,
            iteration=message.iteration,
            previous=message.previous,
            budgets=list(message.budgets or []),
        )

    @property
    def idempotency_key(self) -> str:
        """The same on every attempt of this unit: key side effects on it to apply them once."""
        return f"{self.workflow_id}:{self.unit}"

    def heartbeat(self) -> None:
        """Say "still alive" from a long handler; the worker's lease is renewed meanwhile anyway."""
        self.last_heartbeat = time.time()

    def stream(self, chunk: Any) -> None:
        """Append `chunk` (a str or any msgpack value, at most 64 KiB packed) to the run's output stream
        now, not with the result: `phibroker logs ID` and `Client.stream` show it as it comes, tagged
        with this attempt. Raises MessageTooLarge for a bigger chunk, OutputRefused once the run's
        output is full (`output_max_bytes`; what it holds stays)."""
        if self.output is not None:
            self.output.chunk(chunk)
            return
        wire.pack_limited(chunk, STREAM_CHUNK_LIMIT, f"a chunk streamed by {self.unit}")
        self.streamed.append(chunk)

    def spend(self, tokens: int = 0, input_tokens: int = 0, output_tokens: int = 0, cost: float = 0.0) -> None:
        """Report what this attempt used just now (an LLM call's tokens, its price), as it happens: it
        counts against the task's and the run's `budget` (tokens are tokens + input + output) and shows
        in `status`. The call that passes a `fail` budget raises BudgetExhausted and sets `ctx.cancelled`
        (so does any call after it); past an `ask` budget the run waits for a person while this goes on."""
        added = {"tokens": tokens, "input_tokens": input_tokens, "output_tokens": output_tokens, "cost": cost}
        for name, value in added.items():
            sane = type(value) is int or (name == "cost" and type(value) is float)
            if not sane or value < 0 or (name == "cost" and reported(0, value) is None):
                kind = "a number" if name == "cost" else "a whole number"
                raise ValueError(f"ctx.spend: {name} must be {kind}, 0 or more (got {value!r})")
        with self._spending:
            for name, value in added.items():
                self.usage[name] += value
            if self.reporter is not None:
                self.reporter(self, tokens + input_tokens + output_tokens, float(cost))
            line = exhausted(self.budgets, self.spent())
        if line is not None:
            self.cancelled.set()
            raise BudgetExhausted(line)

    def spent(self) -> Spend:
        """This attempt's totals as budgets count them: (tokens + input + output, cost)."""
        usage = self.usage
        return usage["tokens"] + usage["input_tokens"] + usage["output_tokens"], round(float(usage["cost"]), 9)

    def emit(self, type_: str, data: Any = None) -> None:
        """An event published with this attempt's result, and only if that result is applied. Raises
        ValueError for a type of phibroker's own (`workflow.*`, `task.*`, `approval.*`, `signal.*`, in
        any case) and for one that is not printable ASCII of at most 200 characters."""
        self.events.append({"type": _own_type(type_), "data": data})

    def spawn(
        self,
        name: str,
        command: str,
        agent: str | None = None,
        payload: dict[str, Any] | None = None,
        depends_on: list[str] | tuple[str, ...] = (),
        retry: dict[str, Any] | None = None,
        timeout: str | float | None = None,
    ) -> str:
        """Add a task to the run, `TASK/NAME`, run by `agent` (this one by default) after the children
        it `depends_on`; this task succeeds once all its children have, and only then do its dependents
        run. Like `emit`, it takes effect only if this attempt's result is applied. Returns the name."""
        child: dict[str, Any] = {"name": name, "agent": agent or self.agent, "command": command}
        extra = {"payload": payload, "depends_on": list(depends_on), "retry": retry, "timeout": timeout}
        child.update({k: v for k, v in extra.items() if v})
        self.spawns.append(child)
        return f"{self.task}/{name}"

    def spawn_workflow(
        self, name: str, workflow: str | Path | dict[str, Any], params: dict[str, Any] | None = None
    ) -> str:
        """Add a sub-workflow to the run as child `TASK/NAME`: a file (relative to the worker's current
        directory, read now) or a workflow as a dict. Its `output` is the child's result.

        A signed file carries its signature along, so a coordinator run with `--require-signed` runs
        it; a dict or an unsigned file is refused there, as any unsigned run is."""
        from phibroker.runtime.submission import signature_fields  # submission's tracing imports this module

        spawn: dict[str, Any] = {"name": name, "params": params or {}}
        if isinstance(workflow, str | Path):
            loaded = load_workflow(workflow)
            spawn.update(workflow=loaded.source, signed=signature_fields(loaded))
        else:
            spawn["workflow"] = workflow
        self.spawns.append(spawn)
        return f"{self.task}/{name}"

    def signal(self, workflow_id: str, name: str, data: Any = None) -> None:
        """Signal run `workflow_id`'s gate `name` (as `phibroker signal`), sent with this attempt's
        result and only if that result is applied: a retried attempt signals nothing twice."""
        sent = {"wf": workflow_id, "name": name, "data": data, "sender": f"{self.agent}/{self.task}"}
        sent["id"] = f"{self.dispatch_id}.{self.token}.{len(self.signals)}"  # the same on a redrive, so sent once
        self.signals.append(sent)


@dataclass
class Subscription:
    name: str
    event: str  # an exact type, or `prefix.*`
    where: str | None
    handler: Handler

    def react(self, event: Event) -> None:
        """Run the handler on one event (async handlers on a private loop)."""
        value = self.handler(event)
        if inspect.isawaitable(value):
            asyncio.run(_awaited(value))


@dataclass
class Event:
    """What a subscription handler gets: an event, and ways to react that keep its causation."""

    id: str
    type: str
    workflow: str | None
    task: str | None
    data: Any
    ts: float
    depth: int = 0
    chain: list[str] = field(default_factory=list)
    agent: str | None = None  # whose handler emitted it, as the coordinators tell (None: theirs)
    emitted: list[dict[str, Any]] = field(default_factory=list)
    submitter: Callable[..., str] | None = None

    @classmethod
    def from_map(cls, event: dict[str, Any], submitter: Callable[..., str] | None = None) -> Event:
        return cls(
            id=str(event.get("id")),
            type=str(event.get("type")),
            workflow=event.get("workflow"),
            task=event.get("task"),
            data=event.get("data"),
            ts=float(event.get("ts") or 0),
            depth=int(event.get("depth") or 0),
            chain=list(event.get("chain") or []),
            agent=event["agent"] if isinstance(event.get("agent"), str) else None,
            submitter=submitter,
        )

    def __getitem__(self, name: str) -> Any:
        """`event["data"]` works as well as `event.data`."""
        return getattr(self, name)

    def emit(self, type_: str, data: Any = None) -> None:
        """Publish an event caused by this one (one level deeper, for the storm guard). Raises ValueError
        for a type of phibroker's own (`workflow.*`, `task.*`, `approval.*`, `signal.*`, in any case) and
        for one that is not printable ASCII of at most 200 characters."""
        self.emitted.append({"type": _own_type(type_), "data": data})

    def submit(self, source: Any, params: dict[str, Any] | None = None, id: str | None = None) -> str:  # noqa: A002
        """Start a workflow caused by this event; returns its id."""
        if self.submitter is None:
            raise RuntimeError("this event was not delivered by a worker; use phibroker.Client to submit")
        return self.submitter(source, params or {}, id, self.depth + 1, self.caused_chain)

    @property
    def caused_chain(self) -> list[str]:
        return [*self.chain, f"{self.type}@{self.id}"]

    def caused(self) -> list[dict[str, Any]]:
        """The emitted events as full events: ids, causation and depth filled in."""
        return [
            records.event(e["type"], self.workflow, None, e["data"], self.depth + 1, self.caused_chain, cause=self.id)
            for e in self.emitted
        ]


@dataclass(slots=True)
class Outcome:
    """What one attempt produced, ready to become a `wire.Result`."""

    ok: bool
    value: bytes | None = None
    error: dict[str, str] | None = None
    retry: bool = False
    started: float = 0.0
    finished: float = 0.0

    def result(self, ctx: Context, worker: str) -> wire.Result:
        """The result message of the attempt `ctx` ran; a failed attempt's events are never published."""
        tokens, cost = ctx.spent()
        return wire.Result(
            id=ctx.dispatch_id,
            wf=ctx.workflow_id,
            unit=ctx.unit,
            token=ctx.token,
            ok=self.ok,
            worker=worker,
            started=self.started,
            finished=self.finished,
            value=self.value,
            error=self.error,
            retry=self.retry,
            events=ctx.events if self.ok else [],
            signals=ctx.signals if self.ok else [],
            spawns=ctx.spawns if self.ok else [],
            spend={"attempt": ctx.attempt, "tokens": tokens, "cost": cost} if tokens or cost else None,
        )


class Agent:
    """An agent's commands and subscriptions: `@agent.command("scan")`, `@agent.on("task.failed")`."""

    def __init__(self, name: str):
        self.name = name
        self.commands: dict[str, Handler] = {}
        self.subscriptions: dict[str, Subscription] = {}

    def command(self, name: str | None = None) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.commands[name or fn.__name__] = fn
            return fn

        return register

    def on(self, event: str, name: str | None = None, where: str | None = None) -> Callable[[Handler], Handler]:
        """Subscribe to events: an exact type or `prefix.*`, optionally filtered by a `where` expression."""
        if where is not None:
            from phibroker.workflow.expr import compile_expression

            compile_expression(where)  # a bad filter fails here, at import, not at the first event

        def register(fn: Handler) -> Handler:
            sub_name = name or f"{self.name}.{fn.__name__}"
            self.subscriptions[sub_name] = Subscription(sub_name, event, where, fn)
            return fn

        return register

    def call(self, command: str, ctx: Context, payload: dict[str, Any]) -> Any:
        """Run a plain handler, or return the coroutine of an async one."""
        handler = self.commands.get(command)
        if handler is None:
            known = ", ".join(sorted(self.commands)) or "none"
            raise UnknownCommand(f"agent {self.name!r} has no command {command!r} (it has: {known})")
        return handler(ctx, **payload)

    def execute(self, command: str, ctx: Context, payload: dict[str, Any], limit: int) -> Outcome:
        """Run one handler to its end (async ones on a private loop, their task cancelled with
        `ctx.cancelled`) and capture what happened."""
        started = time.time()
        attached = current_output.set(ctx.output)  # the handler's log records go to its attempt's output
        try:
            value = self.call(command, ctx, payload)
            if inspect.isawaitable(value):
                value = asyncio.run(_cancellable(value, ctx.cancelled))
            # Emitted events travel with the result: check them now, as part of this attempt.
            wire.pack_limited([ctx.events, ctx.signals, ctx.spawns], limit, f"what {ctx.task} emitted and spawned")
            return finish(value, started, limit, f"result of {ctx.task}")
        except BaseException as exc:  # noqa: BLE001 - a handler's failure (SystemExit too) is data, never a crash
            return failure(exc, started, cancelled=ctx.cancelled.is_set())
        finally:
            current_output.reset(attached)


class UnknownCommand(Exception):  # noqa: N818 - reads as the error a user sees
    """The message names a command this agent does not have."""


async def _awaited(value: Any) -> Any:
    return await value


async def _cancellable(value: Awaitable[Any], flag: CancelFlag) -> Any:
    """Await a handler as a task of its own, cancelled (asyncio.CancelledError inside it) once `flag` is set."""
    task = asyncio.ensure_future(value)
    loop = asyncio.get_running_loop()

    def cancel() -> None:
        with contextlib.suppress(RuntimeError):  # the handler ended and its loop closed meanwhile
            loop.call_soon_threadsafe(task.cancel)

    flag.on_set(cancel)
    try:
        return await task
    finally:
        flag.forget(cancel)


def finish(value: Any, started: float, limit: int, what: str) -> Outcome:
    """A handler's return value as an outcome; too large or unserialisable fails the attempt."""
    try:
        raw = wire.pack_limited(value, limit, what)
    except (MessageTooLarge, TypeError) as exc:
        return failure(exc, started)
    return Outcome(ok=True, value=raw, started=started, finished=time.time())


def failure(exc: BaseException, started: float, cancelled: bool = False) -> Outcome:
    """A failed attempt. One that was asked to stop (`cancelled`) fails as `Cancelled`, whatever it
    raised on its way out (asyncio.CancelledError for an async handler), and asks for no retry; but
    BudgetExhausted, which asked for that stop itself, stays what it is."""
    error = describe_exception(exc)
    if cancelled and not isinstance(exc, BudgetExhausted):
        raised = error["type"] + (f": {error['message']}" if error["message"] else "")
        error = {**error, "type": "Cancelled", "message": f"asked to stop (the handler raised {raised})"}
    return Outcome(
        ok=False,
        error=error,
        retry=isinstance(exc, Retryable) and not cancelled,
        started=started,
        finished=time.time(),
    )


def load_agent(name: str, app: str | None = None) -> Agent:
    """The agent NAME from `module:attr`, from `module` (any Agent named NAME in it), or from `workers.NAME`.

    The current folder is searched first, as `celery -A` and `rq worker` do: a user's agents module
    beside them imports without setting PYTHONPATH.
    """
    from phibroker.errors import InvalidInput

    module_name, _, attr = (app or f"workers.{name}").partition(":")
    module = _import_app(module_name, name, default=app is None)
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, Agent):
            raise InvalidInput(f"{module_name}:{attr} is not an Agent")
        if found.name != name:
            raise InvalidInput(f"{module_name}:{attr} is agent {found.name!r}, not {name!r}")
        return found
    agents = [value for value in vars(module).values() if isinstance(value, Agent)]
    for agent in agents:
        if agent.name == name:
            return agent
    has = ", ".join(sorted(repr(agent.name) for agent in agents)) or "none"
    raise InvalidInput(f"no Agent named {name!r} in module {module_name!r} (it has: {has})")


def _import_app(module_name: str, agent: str, default: bool) -> Any:
    """Import the module holding the agent, from the current folder first; a failure says what was tried."""
    import importlib
    import os
    import sys

    from phibroker.errors import InvalidInput

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if default and exc.name in (module_name, module_name.partition(".")[0]):
            raise InvalidInput(
                f"no module {module_name!r}: {agent!r} is not a reference agent; "
                f"pass --app MODULE, the module (in {cwd} or on PYTHONPATH) that holds Agent({agent!r})"
            ) from None
        hint = f" (did you mean --app {module_name[:-3]}?)" if module_name.endswith(".py") else ""
        raise InvalidInput(
            f"cannot import {module_name!r} for agent {agent!r} (searched {cwd} first): {exc}{hint}"
        ) from None
    except SyntaxError as exc:
        raise InvalidInput(f"cannot import {module_name!r}: {exc.filename}:{exc.lineno}: {exc.msg}") from None


def _own_type(type_: str) -> str:
    """A handler's event type: printable ASCII, not the coordinators' own types (which tell state changes)."""
    if not wire.publishable(type_):
        raise ValueError(
            f"a handler may not emit {type_!r:.100}: give printable ASCII of at most {wire.EVENT_TYPE_MAX}"
            f" characters; {', '.join(wire.COORDINATOR_EVENTS)}* are phibroker's"
        )
    return type_
