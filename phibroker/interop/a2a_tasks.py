"""What an A2A client sees of phibroker: the agent card of a folder of workflows, a run as an A2A
task (from its status), and a run's progress as its output stream tells it (for streams).

Nothing here reads Redis or serves HTTP (the card reads the workflow files once); `a2a_serve` does,
with these.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    Artifact,
    Message,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
)
from google.protobuf.timestamp_pb2 import Timestamp

from phibroker import __version__
from phibroker import workflow as workflows
from phibroker.errors import InvalidInput, PhibrokerError
from phibroker.interop.a2a_parts import part_of

log = logging.getLogger("phibroker.a2a")

SKILL_PARAMS = "urn:phibroker:skill-params:v1"  # the card extension holding each skill's params schema

S = TaskState
ENDS = {
    "succeeded": S.TASK_STATE_COMPLETED,
    "failed": S.TASK_STATE_FAILED,
    "timed_out": S.TASK_STATE_FAILED,
    "cancelled": S.TASK_STATE_CANCELED,
}
TERMINAL = frozenset(ENDS.values())
# Events that end a gate's wait, whichever way it went.
GATE_CLOSED = frozenset(
    {
        "approval.granted",
        "approval.rejected",
        "signal.received",
        "task.succeeded",
        "task.failed",
        "task.cancelled",
        "task.skipped",
        "task.upstream_failed",
    }
)


# -- the card -----------------------------------------------------------------------------------------


def load_skills(directory: Path) -> dict[str, workflows.Workflow]:
    """The workflow files of DIRECTORY by workflow name; a file that does not load is left out with a
    warning, two files of one name are refused."""
    if not directory.is_dir():
        raise InvalidInput(f"--workflows {directory}: not a folder")
    skills: dict[str, workflows.Workflow] = {}
    paths = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    for path in paths:
        try:
            loaded = workflows.load(path)
        except PhibrokerError as exc:
            log.warning("%s left out: %s", path, exc)
            continue
        if loaded.name in skills:
            raise InvalidInput(f"{path}: a second workflow named {loaded.name!r} (skill ids must be unique)")
        skills[loaded.name] = loaded
    if not skills:
        raise InvalidInput(f"--workflows {directory}: no workflow file there")
    return skills


def params_schema(defaults: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema of a workflow's params, typed from their defaults (a null default: any type)."""
    properties: dict[str, Any] = {}
    for name, default in defaults.items():
        prop: dict[str, Any] = {"default": default}
        kind = json_type(default)
        if kind:
            prop["type"] = kind
        properties[name] = prop
    return {"type": "object", "properties": properties, "additionalProperties": False}


def json_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    for kind, name in ((float, "number"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return None


def agent_card(skills: dict[str, workflows.Workflow], base_url: str) -> AgentCard:
    base = base_url.rstrip("/")
    extension = AgentExtension(
        uri=SKILL_PARAMS,
        description="the JSON Schema of each skill's params (the data part of the message that starts it)",
        required=False,
    )
    schemas = {name: params_schema(json.loads(json.dumps(wf.spec.params, default=str))) for name, wf in skills.items()}
    extension.params.update({"params": schemas})
    return AgentCard(
        name="phibroker",
        description="phibroker workflows: each skill runs one workflow; the task is the run.",
        version=__version__,
        supported_interfaces=[
            AgentInterface(url=f"{base}/", protocol_binding="JSONRPC", protocol_version="1.0"),
            AgentInterface(url=base, protocol_binding="HTTP+JSON", protocol_version="1.0"),
        ],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False, extensions=[extension]),
        default_input_modes=["application/json"],
        default_output_modes=["application/json", "text/plain"],
        skills=[
            AgentSkill(
                id=name,
                name=name,
                description=wf.spec.description or f"runs the workflow {name} ({len(wf.tasks)} tasks)",
                tags=["workflow"],
                input_modes=["application/json"],
                output_modes=["application/json", "text/plain"],
            )
            for name, wf in skills.items()
        ],
    )


# -- a run as an A2A task -----------------------------------------------------------------------------


def timestamp(ts: Any) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((ts if isinstance(ts, int | float) else time.time()) * 1e9))
    return stamp


def agent_message(wf_id: str, values: list[Any]) -> Message:
    return Message(
        role=Role.ROLE_AGENT,
        message_id=str(uuid.uuid4()),
        task_id=wf_id,
        context_id=wf_id,
        parts=[part_of(v) for v in values],
    )


def status_of(wf_id: str, state: TaskState, gates: list[dict[str, Any]], error: Any, ts: Any) -> TaskStatus:
    """A task status: waiting for input, its message says for what; failed or cancelled, why."""
    status = TaskStatus(state=state, timestamp=timestamp(ts))
    if state == S.TASK_STATE_INPUT_REQUIRED and gates:
        status.message.CopyFrom(agent_message(wf_id, gates))
    elif state in (S.TASK_STATE_FAILED, S.TASK_STATE_CANCELED) and error:
        status.message.CopyFrom(agent_message(wf_id, [str(error)]))
    return status


def output_artifact(output: Any) -> Artifact:
    return Artifact(artifact_id="output", name="output", parts=[part_of(output)])


def task_of(status: dict[str, Any], approvals: dict[str, dict[str, Any]]) -> Task:
    """The A2A task of a run's `status --json` document.

    Ended runs map by their end; a run with an approval or a signal gate waiting is INPUT_REQUIRED;
    one whose tasks have not been dispatched yet is SUBMITTED; any other (running, cancelling,
    compensating) is WORKING."""
    wf_id, state = status["id"], status["state"]
    gates = open_gates(status, approvals)
    if state in ENDS:
        a2a_state = ENDS[state]
    elif gates:
        a2a_state = S.TASK_STATE_INPUT_REQUIRED
    elif all(t["state"] == "pending" for t in status["tasks"].values()):
        a2a_state = S.TASK_STATE_SUBMITTED
    else:
        a2a_state = S.TASK_STATE_WORKING
    ts = status.get("finished_at") or status.get("created_at")
    task = Task(id=wf_id, context_id=wf_id, status=status_of(wf_id, a2a_state, gates, status.get("error"), ts))
    task.metadata.update({"workflow": status.get("name"), "state": state})
    if state == "succeeded":
        task.artifacts.append(output_artifact(status.get("output")))
    return task


def open_gates(status: dict[str, Any], approvals: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    gates: list[dict[str, Any]] = []
    for task in status["tasks"].values():
        request = (task.get("approval") or {}).get("request")
        if task["state"] == "running" and request:
            message = (approvals.get(request) or {}).get("message")
            gates.append({"kind": "approval", "id": request, "message": message})
        waiting = str(task.get("waiting_for") or "")
        if waiting.startswith("signal "):
            gates.append({"kind": "signal", "name": waiting.removeprefix("signal ")})
    for request in approvals.values():  # a passed `ask` budget: the run waits for a person, gate or not
        if request.get("budget"):
            gates.append({"kind": "approval", "id": request["id"], "message": request.get("message")})
    return gates


def gate_key(gate: dict[str, Any]) -> tuple[Any, ...]:
    return gate.get("kind"), gate.get("id") or gate.get("name")


@dataclass
class Progress:
    """A run's A2A state as its output stream tells it, record by record, in the order things happened."""

    started: bool = False
    ended: str | None = None
    error: Any = None
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> what it waits for
    ts: Any = None

    @property
    def state(self) -> TaskState:
        if self.ended:
            return ENDS[self.ended]
        if self.gates:
            return S.TASK_STATE_INPUT_REQUIRED
        return S.TASK_STATE_WORKING if self.started else S.TASK_STATE_SUBMITTED

    @property
    def seen(self) -> tuple[Any, ...]:
        """What a status update shows: a change in it is worth one."""
        return self.state, json.dumps(list(self.gates.values()), default=str)

    def status(self, wf_id: str) -> TaskStatus:
        return status_of(wf_id, self.state, list(self.gates.values()), self.error, self.ts)

    def take(self, record: dict[str, Any]) -> None:
        self.ts = record.get("ts") or self.ts
        if record["kind"] != "event":
            self.started = True
            return
        event = record["data"]
        kind, task = str(event.get("type")), event.get("task")
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if kind == "workflow.submitted":
            return
        self.started = True
        if kind == "approval.requested":
            self.gates[task] = {"kind": "approval", "id": data.get("approval"), "message": data.get("message")}
        elif kind == "task.waiting" and str(data.get("waiting_for") or "").startswith("signal "):
            self.gates[task] = {"kind": "signal", "name": str(data["waiting_for"]).removeprefix("signal ")}
        elif kind in GATE_CLOSED:
            self.gates.pop(task, None)
        elif kind == "workflow.retried":
            self.ended, self.error = None, None
            self.gates.clear()
        elif kind.removeprefix("workflow.") in ENDS:
            self.ended, self.error = kind.removeprefix("workflow."), data.get("error")


def chunk_of(wf_id: str, record: dict[str, Any], chunked: set[str]) -> TaskArtifactUpdateEvent | None:
    """A `ctx.stream` chunk as an artifact chunk: one artifact per task attempt, appended to."""
    if record["kind"] != "chunk":
        return None
    artifact_id = f"{record['unit']}@{record['attempt']}"
    artifact = Artifact(artifact_id=artifact_id, name=str(record["task"]), parts=[part_of(record["data"])])
    artifact.metadata.update({"task": record["task"], "unit": record["unit"], "attempt": record["attempt"]})
    appended = artifact_id in chunked
    chunked.add(artifact_id)
    return TaskArtifactUpdateEvent(task_id=wf_id, context_id=wf_id, artifact=artifact, append=appended)
