"""The A2A bridge: a remote A2A agent served as a phibroker agent (`phibroker a2a-bridge`).

Like the RQ bridge, it is an ordinary `Worker` whose handlers are generated, one per skill on the
remote agent's card, so fetching, leases, reclaim, settling and dead letters are the worker's. A
handler is async (the worker runs it on a loop of its own and cancels it when the workflow no longer
wants the attempt) and follows one remote task:

- It finds the remote task of its dispatch, or sends the message that starts it: the command as
  `metadata.skill`, the payload as one data part, the phibroker ids in `metadata.phibroker`. The
  message's `contextId` and `messageId` are derived from the dispatch id (`phi-<namespace>-<dispatch>`),
  the same on every delivery of that dispatch. A bridge killed mid-task leaves its task unacked; the
  bridge that reclaims it asks the remote agent for the tasks of that context (`ListTasks`) and follows
  the one it finds (`SubscribeToTask`, or `GetTask` once it has ended) instead of sending it twice.
- Every artifact update's parts go to `ctx.stream`, a text part as its string and a data part as its
  value. What a found task produced before the reclaim is not streamed again.
- The remote task's end is the attempt's: COMPLETED gives the data of the last artifact's data part
  (its text joined if it has only text parts; None without artifacts); FAILED or REJECTED fail the
  attempt with the status message's text, as does a CANCELED the bridge did not ask for; INPUT_REQUIRED
  or AUTH_REQUIRED fail it too: a bridge has nobody to ask. A remote agent that answers with a message
  instead of a task gives that message's value.
- A phibroker cancel (or the task's timeout) sends `CancelTask`.
- Network trouble (the remote agent restarting, a dropped stream) is ridden out: the bridge waits and
  follows the task again by id, for up to `GIVE_UP` seconds in a row, then fails the attempt as
  retryable. An error the remote agent answers with (an unknown skill, bad params) fails the attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from a2a.client import A2ACardResolver, A2AClientError, ClientConfig, ClientFactory
from a2a.client.client import Client as A2AClient
from a2a.types import (
    AgentCard,
    Artifact,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskNotFoundError,
    TaskState,
    TaskStatus,
    UnsupportedOperationError,
)
from a2a.utils.errors import A2AError

from phibroker.errors import InvalidInput, MessageTooLarge, OutputRefused, Retryable
from phibroker.interop.a2a_parts import data_values, part_of, texts, value_of

if TYPE_CHECKING:
    from phibroker.runtime.agent import Context
    from phibroker.runtime.worker import Worker
    from phibroker.settings import Settings

log = logging.getLogger("phibroker.a2abridge")

GIVE_UP = 300.0  # seconds of network trouble in a row after which an attempt fails (retryable)
TIMEOUT = httpx.Timeout(30.0, read=60.0)  # a stream quiet for a minute is followed again by id
BINDINGS = ["JSONRPC", "HTTP+JSON"]

S = TaskState
ENDED = frozenset({S.TASK_STATE_COMPLETED, S.TASK_STATE_FAILED, S.TASK_STATE_REJECTED, S.TASK_STATE_CANCELED})
WAITING = frozenset({S.TASK_STATE_INPUT_REQUIRED, S.TASK_STATE_AUTH_REQUIRED})

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class A2ATaskFailed(Exception):
    """The remote task failed, was rejected, or was cancelled on the remote side."""


class A2AInputRequired(Exception):
    """The remote task asks for input, which a bridge cannot give."""


class A2ARemoteError(Exception):
    """The remote agent refused a request (an unknown skill, bad params, ...)."""


class A2AUnreachable(Retryable):
    """The remote agent could not be reached for `GIVE_UP` seconds, or lost the task."""


def context_for(namespace: str, dispatch: str) -> str:
    """The contextId (and messageId) of one dispatch's remote task: the same on every delivery of it."""
    return f"phi-{_UNSAFE.sub('_', namespace)}-{_UNSAFE.sub('_', dispatch)}"


def dispatch_of(ctx: Context) -> str:
    """The dispatch id of the attempt; without one (a handler called directly), a digest that also
    names exactly one dispatch."""
    if ctx.dispatch_id:
        return ctx.dispatch_id
    return hashlib.sha256(f"{ctx.workflow_id}\0{ctx.unit}\0{ctx.attempt}".encode()).hexdigest()[:16]


def fetch_card(url: str) -> AgentCard:
    """The remote agent's card, from URL's `/.well-known/agent-card.json`; one clear line if it has none."""

    async def fetch() -> AgentCard:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            return await A2ACardResolver(http, url).get_agent_card()

    try:
        card = asyncio.run(fetch())
    except A2AError as exc:
        raise InvalidInput(f"--url {url}: no A2A agent card there ({exc})") from None
    if not card.skills:
        raise InvalidInput(f"--url {url}: the agent {card.name!r} lists no skills, so no command to serve")
    return card


class Remote:
    """What the bridge knows of one remote task, from the events it has seen."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.task_id = ""
        self.state: TaskState = S.TASK_STATE_UNSPECIFIED
        self.status: TaskStatus | None = None
        self.artifacts: dict[str, list[Any]] = {}  # artifact id -> its parts, in the order they came
        self.reply: Message | None = None  # an answer that is a message, not a task
        self.refused = False  # a chunk ctx.stream could not take: said once

    @property
    def done(self) -> bool:
        return self.reply is not None or self.state in ENDED or self.state in WAITING

    def take(self, event: StreamResponse) -> None:
        kind = event.WhichOneof("payload")
        if kind == "task":
            self.take_task(event.task)
        elif kind == "message":
            self.reply = event.message
        elif kind == "status_update":
            self.task_id = self.task_id or event.status_update.task_id
            self.take_status(event.status_update.status)
        elif kind == "artifact_update":
            self.task_id = self.task_id or event.artifact_update.task_id
            self.take_artifact(event.artifact_update.artifact, event.artifact_update.append)

    def take_task(self, task: Task) -> None:
        """A whole task (the first event, or a task found again): its artifacts so far, not streamed."""
        self.task_id = task.id
        self.take_status(task.status)
        self.artifacts = {a.artifact_id: list(a.parts) for a in task.artifacts}

    def take_status(self, status: TaskStatus) -> None:
        self.state, self.status = status.state, status

    def take_artifact(self, artifact: Artifact, append: bool) -> None:
        if append and artifact.artifact_id in self.artifacts:
            self.artifacts[artifact.artifact_id].extend(artifact.parts)
        else:
            self.artifacts[artifact.artifact_id] = list(artifact.parts)
        for part in artifact.parts:
            self.stream(value_of(part))
        self.ctx.heartbeat()

    def stream(self, value: Any) -> None:
        try:
            self.ctx.stream(value)
        except (MessageTooLarge, OutputRefused) as exc:  # the output is a view: the result still comes
            if not self.refused:
                log.warning("%s/%s: a chunk was not streamed: %s", self.ctx.workflow_id, self.ctx.unit, exc)
            self.refused = True

    def outcome(self) -> Any:
        """The attempt's result, or the error that fails it."""
        if self.reply is not None:
            return answer_of(list(self.reply.parts))
        if self.state == S.TASK_STATE_COMPLETED:
            return answer_of(list(self.artifacts.values())[-1]) if self.artifacts else None
        why = self.status_text()
        name = S.Name(self.state).removeprefix("TASK_STATE_").lower()
        if self.state in WAITING:
            raise A2AInputRequired(f"remote task {self.task_id} asks for input ({name}): {why}")
        raise A2ATaskFailed(f"remote task {self.task_id} {name}: {why}")

    def status_text(self) -> str:
        if self.status is None or not self.status.HasField("message"):
            return "no message"
        parts = list(self.status.message.parts)
        return "\n".join(texts(parts)) or "; ".join(str(v) for v in data_values(parts)) or "no message"


def answer_of(parts: list[Any]) -> Any:
    """The data of the last data part; the text parts joined when there is no data part."""
    data = data_values(parts)
    if data:
        return data[-1]
    return "".join(texts(parts)) or None


class Bridge:
    """A `Worker` for agent NAME whose commands are the skills of the remote A2A agent at URL."""

    def __init__(self, agent: str, url: str, settings: Settings, concurrency: int = 16, card: AgentCard | None = None):
        from phibroker.runtime.agent import Agent
        from phibroker.runtime.worker import Worker

        self.url = url
        self.settings = settings
        self.card = card or fetch_card(url)
        self.agent = Agent(agent)
        for skill in self.card.skills:
            self.agent.command(skill.id)(self._handler(skill.id))
        self.worker: Worker = Worker(self.agent, settings, concurrency=concurrency)

    def work(self, burst: bool = False) -> bool:
        """Run the worker loop; False when tasks were still followed at the end of the grace period."""
        skills = ", ".join(s.id for s in self.card.skills)
        log.info("a2a-bridge: agent %s -> %s at %s (%s)", self.agent.name, self.card.name, self.url, skills)
        return self.worker.work(burst=burst)

    def stop(self) -> None:
        self.worker.stop()

    def _handler(self, skill: str) -> Any:
        async def handler(ctx: Context, **payload: Any) -> Any:
            return await self.run(skill, ctx, payload)

        handler.__name__ = handler.__qualname__ = skill
        handler.__doc__ = f"{skill}: the skill of the remote A2A agent {self.card.name}"
        return handler

    async def run(self, skill: str, ctx: Context, payload: dict[str, Any]) -> Any:
        """One attempt: find or start its remote task, follow it to its end, cancel it if asked to stop."""
        context_id = context_for(self.settings.namespace, dispatch_of(ctx))
        remote = Remote(ctx)
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            config = ClientConfig(streaming=True, httpx_client=http, supported_protocol_bindings=BINDINGS)
            client = ClientFactory(config).create(self.card)
            try:
                await self.follow(client, skill, ctx, payload, context_id, remote)
            except asyncio.CancelledError:
                await self.cancel(client, context_id, remote)
                raise
        return remote.outcome()

    async def follow(
        self, client: A2AClient, skill: str, ctx: Context, payload: dict[str, Any], context_id: str, remote: Remote
    ) -> None:
        """Follow the remote task until it ends or waits for input, riding out network trouble."""
        trouble_since: float | None = None
        delay = 0.2
        while True:
            try:
                async for event in self.events(client, skill, ctx, payload, context_id, remote):
                    remote.take(event)
                    trouble_since, delay = None, 0.2
                    if remote.done:
                        return
                if remote.done:
                    return
            except A2AClientError as exc:  # the network, a timeout, an HTTP error
                now = time.monotonic()
                trouble_since = trouble_since or now
                if now - trouble_since > GIVE_UP:
                    raise A2AUnreachable(f"the A2A agent at {self.url} has been unreachable: {exc}") from None
                log.warning("%s/%s: %s; following task %s again", ctx.workflow_id, ctx.unit, exc, remote.task_id or "?")
            except TaskNotFoundError:
                raise A2AUnreachable(f"the A2A agent at {self.url} no longer knows task {remote.task_id}") from None
            except UnsupportedOperationError:
                if not remote.task_id:
                    raise A2ARemoteError(f"the A2A agent at {self.url} cannot start {skill}") from None
                # it ended between GetTask and SubscribeToTask, or it cannot be subscribed to: poll it
            except A2AError as exc:
                raise A2ARemoteError(f"the A2A agent at {self.url} refused: {exc}") from None
            await asyncio.sleep(delay)  # a stream that ended without the task's end, or trouble
            delay = min(delay * 2, 5.0)

    async def events(
        self, client: A2AClient, skill: str, ctx: Context, payload: dict[str, Any], context_id: str, remote: Remote
    ) -> AsyncIterator[StreamResponse]:
        """The remote task's events: from the message that starts it, or from the task found by id."""
        if not remote.task_id:
            found = await self.find(client, context_id)
            if found is None:
                message = self.message(skill, ctx, payload, context_id)
                log.info("%s/%s attempt %d: sending %s to %s", ctx.workflow_id, ctx.unit, ctx.attempt, skill, self.url)
                async for event in client.send_message(SendMessageRequest(message=message)):
                    yield event
                return
            log.info("found remote task %s of %s/%s (context %s)", found.id, ctx.workflow_id, ctx.unit, context_id)
            task = found
        else:
            task = await client.get_task(GetTaskRequest(id=remote.task_id))
        remote.take_task(task)
        if remote.done:
            return
        async for event in client.subscribe(SubscribeToTaskRequest(id=task.id)):
            yield event  # first the task again, with what it produced meanwhile (not streamed)

    async def find(self, client: A2AClient, context_id: str) -> Task | None:
        """The remote task of this context, if it was sent before (by a bridge that died since)."""
        try:
            tasks = list((await client.list_tasks(ListTasksRequest(context_id=context_id))).tasks)
        except A2AClientError:
            raise
        except A2AError as exc:  # an agent without ListTasks: nothing can be found again there
            log.warning("the A2A agent at %s cannot list tasks (%s): a reclaimed task is sent again", self.url, exc)
            return None
        tasks = [t for t in tasks if t.context_id == context_id]
        live = [t for t in tasks if t.status.state not in ENDED]
        return (live or tasks or [None])[0]

    def message(self, skill: str, ctx: Context, payload: dict[str, Any], context_id: str) -> Message:
        message = Message(role=Role.ROLE_USER, message_id=context_id, context_id=context_id, parts=[part_of(payload)])
        ids = {"workflow": ctx.workflow_id, "task": ctx.task, "unit": ctx.unit, "attempt": ctx.attempt}
        message.metadata.update({"skill": skill, "phibroker": {**ids, "dispatch": dispatch_of(ctx)}})
        return message

    async def cancel(self, client: A2AClient, context_id: str, remote: Remote) -> None:
        """The workflow no longer wants this attempt: cancel its remote task (bounded; never raises)."""
        try:
            async with asyncio.timeout(10):
                task_id = remote.task_id or getattr(await self.find(client, context_id), "id", "")
                if task_id and remote.state not in ENDED:
                    await client.cancel_task(CancelTaskRequest(id=task_id))
                    log.info("cancelled remote task %s at %s", task_id, self.url)
        except (A2AError, TimeoutError) as exc:
            log.warning("remote task %s not cancelled: %s", remote.task_id or context_id, exc)
