"""A small A2A agent built with the `a2a-sdk` server alone, for the `a2a-bridge` tests:
`python -m tests.apps.a2aremote PORT LEDGER` serves it on 127.0.0.1:PORT, and writes one line to
LEDGER for each task it starts (`execute TASK CONTEXT SKILL`) and each cancel it gets (`cancel TASK`).

Skills: `echo` streams its words as text chunks, then answers with a data artifact; `slow` writes
`marker` when it starts and answers after `seconds`; `fail` fails with a status message."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import uvicorn
from a2a.helpers.proto_helpers import get_data_parts, new_data_part, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue_v2 import EventQueue
from a2a.server.request_handlers.default_request_handler_v2 import DefaultRequestHandlerV2
from a2a.server.routes import create_agent_card_routes, create_rest_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Task, TaskState, TaskStatus
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette

SKILLS = ("echo", "slow", "fail")


class Remote(AgentExecutor):
    def __init__(self, ledger: Path):
        self.ledger = ledger

    def note(self, line: str) -> None:
        with self.ledger.open("a") as fh:
            fh.write(line + "\n")

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None and context.task_id and context.context_id
        skill = MessageToDict(context.message.metadata).get("skill")
        (payload,) = get_data_parts(context.message.parts) or [{}]
        self.note(f"execute {context.task_id} {context.context_id} {skill}")
        await event_queue.enqueue_event(
            Task(
                id=context.task_id,
                context_id=context.context_id,
                status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
            )
        )
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.start_work()
        if skill == "echo":
            for i, word in enumerate(payload.get("words", [])):
                await updater.add_artifact([new_text_part(str(word))], artifact_id="words", append=i > 0)
            answer: dict[str, Any] = {"echo": payload.get("words", []), "count": len(payload.get("words", []))}
            await updater.add_artifact([new_data_part(answer)], artifact_id="answer", name="answer")
            await updater.complete()
        elif skill == "slow":
            Path(payload["marker"]).touch()
            await updater.add_artifact([new_text_part("begun")], artifact_id="progress")
            await asyncio.sleep(float(payload.get("seconds", 1)))
            await updater.add_artifact([new_data_part({"slept": payload.get("seconds", 1)})], artifact_id="answer")
            await updater.complete()
        else:
            await updater.failed(new_text_message("remote says no", context_id=context.context_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id
        self.note(f"cancel {context.task_id}")
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def app(port: int, ledger: Path) -> Starlette:
    base = f"http://127.0.0.1:{port}"
    card = AgentCard(
        name="remote",
        description="a test agent",
        version="1.0",
        supported_interfaces=[AgentInterface(url=base, protocol_binding="HTTP+JSON", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["application/json"],
        default_output_modes=["application/json", "text/plain"],
        skills=[AgentSkill(id=s, name=s, description=f"the {s} skill", tags=["test"]) for s in SKILLS],
    )
    handler = DefaultRequestHandlerV2(Remote(ledger), InMemoryTaskStore(), card)
    return Starlette(routes=[*create_agent_card_routes(card), *create_rest_routes(handler)])


if __name__ == "__main__":
    port, ledger = int(sys.argv[1]), Path(sys.argv[2])
    uvicorn.run(app(port, ledger), host="127.0.0.1", port=port, log_level="warning")
