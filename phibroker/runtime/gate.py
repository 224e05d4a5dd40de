"""The coordinator's security checks, in one place: who may send what it acts on.

A coordinator trusts nothing it reads from the inbox. With an identities file, a result must be signed
by the agent it claims to come from, and that agent must own the unit it answers; with
`--require-signed`, a workflow starts only from a file text a trusted key signed; an approval decision
counts only when a trusted key signed it. The loop asks the gate and acts on its answer; the gate
decides, and changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from functools import cached_property
from typing import Any

from phibroker import wire
from phibroker import workflow as workflows
from phibroker.engine import state
from phibroker.errors import InvalidInput, SignatureError, WorkflowFileError
from phibroker.security import signing
from phibroker.settings import Settings
from phibroker.store.registry import Registry

log = logging.getLogger("phibroker.coordinator")


class SecurityGate:
    """Answers "refused, and why" or None for each input a coordinator checks before applying it."""

    def __init__(self, settings: Settings, registry: Registry, require_signed: bool = False):
        self.settings = settings
        self.registry = registry
        self.require_signed = require_signed

    @cached_property
    def identities(self) -> dict[str, bytes]:
        """agent -> secret, from the identities file; empty: results are not checked."""
        path = self.settings.identities
        if path is None:
            return {}
        try:
            return {agent: str(secret).encode() for agent, secret in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"identities file {path}: {exc}") from None

    def check_sender(self, message: wire.Inbox) -> str | None:
        """With identities configured, results must be signed by the agent they claim to come from."""
        if not self.identities:
            return None
        secret = self.identities.get(message.agent or "")
        if secret is None:
            return f"forged result: unknown agent {message.agent!r}"
        if not message.signed_by(secret):
            return f"forged result: bad signature for agent {message.agent!r}"
        return None

    def check_answerer(self, run: state.Run, result: wire.Result, sender: str | None) -> str | None:
        """With identities configured, an agent answers only the units of its own tasks."""
        if self.identities and state.unit_agent(run.workflow, result.unit) != sender:
            return f"forged result: agent {sender!r} answered {result.unit!r} of another agent"
        return None

    def check_start(self, meta: dict[str, Any]) -> str | None:
        """Why a run may not start (`--require-signed` and its file is not signed as it should be), or None.

        A run already launched was checked then: a later kick of it is not checked again."""
        return self.verify_source(meta) if self.require_signed and not meta.get("launched") else None

    def trusted(self) -> dict[str, str]:
        """The trust list in Redis; with none configured, the local keys (read now, so new keys count)."""
        return self.registry.trusted_keys() or signing.local_public_keys(self.settings.home)

    def verify_decision(self, body: dict[str, Any]) -> str | None:
        """Why a decision is refused (forged, tampered, expired, untrusted), or None."""
        trusted = self.trusted()
        try:
            signing.verify_decision(body, trusted, time.time())
        except SignatureError as exc:
            return str(exc) + self._local_key_note(body, trusted)
        return None

    def _local_key_note(self, body: dict[str, Any], trusted: dict[str, str]) -> str:
        """Why a key in $PHIBROKER_HOME that signed fine yesterday is refused today: a trust list now exists."""
        local = signing.local_public_keys(self.settings.home)
        key = str(body.get("key", "")).lower()
        if local.get(str(body.get("approver"))) != key or trusted.get(str(body.get("approver"))) == key:
            return ""
        return " (a trust list is set, so local keys count only once trusted)"

    def verify_source(self, meta: dict[str, Any]) -> str | None:
        """`--require-signed`: the stored file text carries a trusted signature and is what runs."""
        text, raw_signature = meta.get("source_text"), meta.get("signature")
        if not text or not raw_signature:
            return "refused: the workflow file is not signed (phibroker sign FILE)"
        try:
            trusted = self.trusted()
            signer = signing.verify_file_bytes(text.encode(), json.loads(raw_signature), trusted)
            source = workflows.decode(text, str(meta.get("source_suffix") or ""))
            source = _embed_signed(source, json.loads(meta.get("source_parts") or "{}"), trusted)
            for task in json.loads(meta.get("source_path") or "[]"):  # a child run: its spec within
                source = _task_field(source, task, "workflow")
        except (SignatureError, WorkflowFileError, ValueError) as exc:
            return f"refused: {exc}"
        if source != json.loads(meta["spec"]):
            return "refused: tampered: the submitted spec differs from the signed file"
        log.info("workflow file signed by %s", signer)
        return None


def _task_field(source: Any, task: str, name: str) -> Any:
    """`source.tasks.TASK.NAME`, or None where the decoded file has no such thing."""
    tasks = source.get("tasks") if isinstance(source, dict) else None
    spec = tasks.get(task) if isinstance(tasks, dict) else None
    return spec.get(name) if isinstance(spec, dict) else None


def _embed_signed(source: Any, parts: dict[str, Any], trusted: dict[str, str]) -> Any:
    """The signed file with each `workflow: FILE` replaced by that file's signed text, decoded (and
    embedding its own): what its run's spec must be. An unsigned sub-workflow file is refused."""
    tasks = source.get("tasks") if isinstance(source, dict) else None
    if not isinstance(tasks, dict):
        return source
    embedded = {}
    for name, task in tasks.items():
        if not isinstance(task, dict) or not isinstance(task.get("workflow"), str):
            continue
        part = parts.get(name)
        if not isinstance(part, dict) or not part.get("source_text") or not part.get("signature"):
            raise SignatureError(f"the sub-workflow {task['workflow']} of task {name!r} is not signed")
        text = str(part["source_text"])
        signing.verify_file_bytes(text.encode(), json.loads(part["signature"]), trusted)
        child = workflows.decode(text, str(part.get("source_suffix") or ""))
        embedded[name] = {**task, "workflow": _embed_signed(child, part.get("parts") or {}, trusted)}
    return {**source, "tasks": {**tasks, **embedded}} if embedded else source
