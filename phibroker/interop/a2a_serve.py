"""`phibroker a2a serve`: phibroker's workflows as the skills of an A2A agent (A2A 1.0, JSON-RPC and
HTTP+JSON, on the `a2a-sdk` package's own routes).

Each workflow file of a folder is a skill named after its workflow. A message naming a skill in
`metadata.skill`, with the params as a data part, starts a run, and the A2A task is that run: the
task id is the run id, and the run's context is its own (`contextId` = the run id). The run id is
derived from the message id and the params, so a client that sends the same message again gets the
same run, not a second one.

Why a `RequestHandler` of its own rather than the SDK's default handler with a task store and an
`AgentExecutor`: that handler keeps each task's live state (its event queue, its running executor) in
the serving process, and an executor would have to stay there for the run's whole life turning
phibroker's progress into events. A run already is durable state, and its output stream a replayable
record of what happened in order; this handler keeps nothing. Every call reads the run
(`Client.status`) or its output stream, so a restarted server answers for runs it never saw start.

- GetTask, ListTasks, CancelTask: the run's status, mapped by `task_of`.
- SubscribeToTask and SendStreamingMessage: the run's output stream read from its start (from now for
  a follow-up message): a status update whenever its events change the A2A state, each `ctx.stream`
  chunk as an artifact chunk (one artifact per task attempt), the `output` artifact at the end. The
  stream ends with the run, or once it waits for input (INPUT_REQUIRED reached in this stream) and
  nothing more is there to read.
- SendMessage waits the same way, then answers with the task (with `returnImmediately`, at once).
- A follow-up message (task id = run id) answers the gate the run waits on: data `{"decision":
  "approve" | "reject", "comment" | "reason"}` an approval, signed with the key of whoever runs this
  server (the coordinators refuse it unless they trust that key), `{"signal": NAME, "data": ...}` a
  signal gate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.server.request_handlers.request_handler import RequestHandler, validate_request_params
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    InternalError,
    InvalidParamsError,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    PushNotificationNotSupportedError,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskNotCancelableError,
    TaskNotFoundError,
    TaskPushNotificationConfig,
    TaskStatusUpdateEvent,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.middleware import Middleware

from phibroker import workflow as workflows
from phibroker.engine.state import WF_TERMINAL
from phibroker.errors import BrokerUnavailable, InvalidInput, PhibrokerError, UnknownWorkflow
from phibroker.interop.a2a_parts import data_values
from phibroker.interop.a2a_tasks import (
    ENDS,
    TERMINAL,
    Progress,
    S,
    agent_card,
    chunk_of,
    gate_key,
    load_skills,
    open_gates,
    output_artifact,
    task_of,
)
from phibroker.runtime.client import Client
from phibroker.runtime.output_reader import OutputReader
from phibroker.settings import Settings
from phibroker.tools.loopback import LoopbackOnly, is_loopback_address

log = logging.getLogger("phibroker.a2a")

POLL = (0.05, 0.5)  # seconds between two reads of an idle output stream: first, and at most
LISTED = 1000  # newest runs ListTasks looks through

T = TypeVar("T")


# -- the handler --------------------------------------------------------------------------------------


class RunHandler(RequestHandler):
    """A2A requests answered from phibroker's runs (see the module's docstring)."""

    def __init__(self, client: Client, skills: dict[str, workflows.Workflow]):
        self.client = client
        self.skills = skills

    async def call(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One blocking client call, off the event loop; phibroker errors as A2A errors in one line."""
        try:
            return await asyncio.to_thread(work, *args, **kwargs)
        except UnknownWorkflow as exc:
            raise TaskNotFoundError(message=str(exc)) from None
        except BrokerUnavailable as exc:
            raise InternalError(message=str(exc)) from None
        except PhibrokerError as exc:
            raise InvalidParamsError(message=str(exc)) from None

    async def status(self, wf_id: str) -> dict[str, Any]:
        """A run's status, if it is a run of a skill served here: the others are not this agent's tasks
        (an A2A client must not read, answer or cancel the broker's other runs through it)."""
        status = await self.call(self.client.status, wf_id)
        if status.get("name") not in self.skills:
            raise TaskNotFoundError(message=f"no task {wf_id!r} of this agent's skills")
        return status

    async def snapshot(self, wf_id: str) -> Task:
        status = await self.status(wf_id)
        return task_of(status, await self.approvals_of(status))

    async def approvals_of(self, status: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The open approval requests of this run: a gate's, or a passed `ask` budget's (read only while
        the run can wait for one)."""
        if status["state"] not in ("running", "waiting_approval"):
            return {}
        return {r["id"]: r for r in await self.call(self.client.approvals) if r.get("workflow") == status["id"]}

    # -- reading -------------------------------------------------------------------------------------
    @validate_request_params
    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        return await self.snapshot(params.id)

    @validate_request_params
    async def on_list_tasks(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        """The newest runs of this agent's skills, newest first, filtered as asked; pages by offset."""
        size = params.page_size if params.HasField("page_size") else 50
        if not 1 <= size <= 100:
            raise InvalidParamsError(message="pageSize must be between 1 and 100")
        try:
            offset = int(params.page_token or 0)
        except ValueError:
            raise InvalidParamsError(message=f"pageToken {params.page_token!r} is not one this server gave") from None
        rows = [r for r in await self.call(self.client.list, LISTED) if r.get("name") in self.skills]
        if params.context_id:
            rows = [r for r in rows if r["id"] == params.context_id]
        if params.HasField("status_timestamp_after"):
            after = params.status_timestamp_after.ToNanoseconds() / 1e9
            rows = [r for r in rows if (r.get("finished_at") or r.get("created_at") or 0) >= after]
        tasks: dict[str, Task] = {}
        if params.status:
            kept = []
            for row in rows:
                state = ENDS.get(str(row.get("state")))
                if state is None:  # a live run: only its status says whether it waits
                    tasks[row["id"]] = await self.snapshot(row["id"])
                    state = tasks[row["id"]].status.state
                if state == params.status:
                    kept.append(row)
            rows = kept
        page = rows[offset : offset + size]
        response = ListTasksResponse(page_size=size, total_size=len(rows))
        for row in page:
            task = tasks.get(row["id"]) or await self.snapshot(row["id"])
            if not params.include_artifacts:
                task.ClearField("artifacts")
            response.tasks.append(task)
        if offset + size < len(rows):
            response.next_page_token = str(offset + size)
        return response

    @validate_request_params
    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncIterator[Event]:
        await self.status(params.id)  # an unknown run is an error before the stream
        async for event in self.watch(params.id):
            yield event

    # -- acting --------------------------------------------------------------------------------------
    @validate_request_params
    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        task = await self.snapshot(params.id)
        if task.status.state in TERMINAL:
            raise TaskNotCancelableError(message=f"run {params.id} has already ended")
        try:
            await asyncio.to_thread(self.client.cancel, params.id, "cancelled over A2A")
        except InvalidInput as exc:  # it ended meanwhile
            raise TaskNotCancelableError(message=str(exc)) from None
        except PhibrokerError as exc:
            raise InternalError(message=str(exc)) from None
        return await self.snapshot(params.id)

    @validate_request_params
    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext) -> Task | Message:
        wf_id, answered = await self.act(params.message)
        if not params.configuration.return_immediately:
            async for _ in self.watch(wf_id, answered):
                pass
        return await self.snapshot(wf_id)

    @validate_request_params
    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncIterator[Event]:
        wf_id, answered = await self.act(params.message)
        async for event in self.watch(wf_id, answered):
            yield event

    async def act(self, message: Message) -> tuple[str, dict[str, Any] | None]:
        """Start a run, or answer the gate of the run a follow-up names: the run id, and the gate answered."""
        if message.task_id:
            return message.task_id, await self.answer(message.task_id, message)
        return await self.start(message), None

    async def start(self, message: Message) -> str:
        skill = MessageToDict(message.metadata).get("skill")
        if not isinstance(skill, str) or skill not in self.skills:
            known = ", ".join(sorted(self.skills))
            what = f"unknown skill {skill!r}" if skill else "no skill: put a skill id in message.metadata.skill"
            raise InvalidParamsError(message=f"{what} (this agent's skills: {known})")
        workflow = self.skills[skill]
        params = self.params_of(workflow, data_values(message.parts))
        digest = hashlib.sha256(json.dumps([message.message_id, params], sort_keys=True, default=str).encode())
        return await self.call(self.client.submit, workflow, params, f"{skill}-{digest.hexdigest()[:16]}")

    @staticmethod
    def params_of(workflow: workflows.Workflow, values: list[Any]) -> dict[str, Any]:
        if len(values) > 1 or (values and not isinstance(values[0], dict)):
            raise InvalidParamsError(message="the params go in one data part holding an object")
        params = dict(values[0]) if values else {}
        for name, value in params.items():  # a JSON number is a double: `1.0` for a float param stays one
            if isinstance(workflow.spec.params.get(name), float) and isinstance(value, int):
                params[name] = float(value)
        return params

    async def answer(self, wf_id: str, message: Message) -> dict[str, Any]:
        """A follow-up: a decision for the run's approval, or a signal for its signal gate."""
        values = data_values(message.parts)
        data = values[0] if len(values) == 1 and isinstance(values[0], dict) else None
        if data is None or not ({"decision", "signal"} & data.keys()):
            raise InvalidParamsError(
                message='a follow-up answers a gate: one data part {"decision": "approve"|"reject", ...}'
                ' or {"signal": NAME, "data": ...}'
            )
        status = await self.status(wf_id)
        gates = open_gates(status, await self.approvals_of(status))
        if "decision" in data:
            return await self.decide(wf_id, data, [g for g in gates if g["kind"] == "approval"])
        name = data["signal"]
        waiting = [g for g in gates if g["kind"] == "signal" and g["name"] == name]
        if not waiting:
            raise InvalidParamsError(message=f"run {wf_id} has no gate waiting for signal {name!r}")
        await self.call(self.client.signal, wf_id, name, data.get("data"))
        return waiting[0]

    async def decide(self, wf_id: str, data: dict[str, Any], approvals: list[dict[str, Any]]) -> dict[str, Any]:
        decision = data["decision"]
        if decision not in ("approve", "reject"):
            raise InvalidParamsError(message=f'decision {decision!r}: "approve" or "reject"')
        ids = [g["id"] for g in approvals]
        chosen = data.get("id") or (ids[0] if len(ids) == 1 else None)
        if not ids:
            raise InvalidParamsError(message=f"run {wf_id} waits for no approval")
        if chosen not in ids:
            raise InvalidParamsError(message=f'run {wf_id} waits for approvals {", ".join(ids)}: name one as "id"')
        if decision == "approve":
            await self.call(self.client.decide, chosen, "approve", comment=data.get("comment"))
        else:
            reason = data.get("reason") or data.get("comment") or "rejected over A2A"
            await self.call(self.client.decide, chosen, "reject", reason=str(reason))
        return next(g for g in approvals if g["id"] == chosen)

    # -- the stream ----------------------------------------------------------------------------------
    async def watch(self, wf_id: str, answered: dict[str, Any] | None = None) -> AsyncIterator[Event]:
        """The run as A2A stream events: a Task first, then an update for each change, until it ends or
        waits for input with nothing more to read. From the run's start; after a follow-up that
        `answered` a gate, from now (a gate other than that one already waiting ends it at once)."""
        progress, delay, waited = Progress(), POLL[0], False
        chunked: set[str] = set()  # the artifacts that have had a chunk
        reader = await self.call(self.client.output_reader, wf_id)
        records = await self.read(reader)
        if answered is None:
            yield Task(id=wf_id, context_id=wf_id, status=progress.status(wf_id))
        else:  # a follow-up: the client saw what came before; the task as it is now
            for record in records:
                chunk_of(wf_id, record, chunked)
                progress.take(record)
            records = []
            now = await self.snapshot(wf_id)
            yield now
            if now.status.state in TERMINAL:
                return
            waited = any(gate_key(g) != gate_key(answered) for g in progress.gates.values())
        while True:
            for record in records:
                shown = progress.seen
                progress.take(record)
                chunk = chunk_of(wf_id, record, chunked)
                if chunk is not None:
                    yield chunk
                if progress.ended:
                    status = await self.call(self.client.status, wf_id)
                    if status["state"] not in WF_TERMINAL:  # the run's state, not its output, says
                        progress.ended = None  # whether it ended
                        continue
                    progress.ended = str(status["state"])
                    if progress.ended == "succeeded":
                        yield TaskArtifactUpdateEvent(
                            task_id=wf_id,
                            context_id=wf_id,
                            artifact=output_artifact(status.get("output")),
                            last_chunk=True,
                        )
                    progress.error = progress.error or status.get("error")
                    yield TaskStatusUpdateEvent(task_id=wf_id, context_id=wf_id, status=progress.status(wf_id))
                    return
                if progress.seen != shown:
                    waited = waited or progress.state == S.TASK_STATE_INPUT_REQUIRED
                    yield TaskStatusUpdateEvent(task_id=wf_id, context_id=wf_id, status=progress.status(wf_id))
            if records:
                delay = POLL[0]
            elif waited and progress.state == S.TASK_STATE_INPUT_REQUIRED:
                return  # caught up, and the run waits for an answer
            else:
                if await self.call(self.client.broker.run_state, wf_id) in WF_TERMINAL and not progress.ended:
                    records = await self.read(reader)  # its end may have landed meanwhile
                    if records:
                        continue
                    yield TaskStatusUpdateEvent(
                        task_id=wf_id, context_id=wf_id, status=(await self.snapshot(wf_id)).status
                    )
                    return  # ended without its end in the output (it expired)
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL[1])
            records = await self.read(reader)

    async def read(self, reader: OutputReader) -> list[dict[str, Any]]:
        """Every output record past the reader's place (`Client.stream`'s records, an event once across
        calls). Never blocks in Redis: a watcher that goes away holds no thread."""

        return await self.call(lambda: [record for _, record in self.client.read_on(reader)])

    # -- what this agent does not offer ------------------------------------------------------------------
    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError

    async def on_get_task_push_notification_config(
        self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError

    async def on_list_task_push_notification_configs(
        self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        raise PushNotificationNotSupportedError

    async def on_delete_task_push_notification_config(
        self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        raise PushNotificationNotSupportedError

    async def on_get_extended_agent_card(
        self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> AgentCard:
        raise UnsupportedOperationError(message="this agent has no extended card")


# -- serving ------------------------------------------------------------------------------------------


def app(settings: Settings, directory: Path, base_url: str, local: bool = False) -> Starlette:
    """The agent card, the JSON-RPC endpoint (`/`) and the HTTP+JSON one (`/message:send`, `/tasks/...`).
    `local` (it listens on a loopback address): only requests made to a loopback host are answered."""
    skills = load_skills(directory)
    card = agent_card(skills, base_url)
    handler = RunHandler(Client(settings), skills)
    routes = [*create_agent_card_routes(card), *create_jsonrpc_routes(handler, "/"), *create_rest_routes(handler)]
    return Starlette(routes=routes, middleware=[Middleware(LoopbackOnly)] if local else [])


def public_url(host: str, port: int) -> str:
    """Where clients reach this server: HOST, or this machine's name when HOST means every interface."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve(settings: Settings, directory: Path, host: str, port: int, url: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's own handling)."""
    base = url or public_url(host, port)
    application = app(settings, directory, base, local=is_loopback_address(host))
    log.info("a2a serve: %s (workflows of %s)", base, directory)
    uvicorn.run(application, host=host, port=port, log_level="warning")
