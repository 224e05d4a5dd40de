"""A new run as it is written to the broker: one builder for the client, reactions and triggered starts.

Every way of starting a run — `Client.submit`, `event.submit(...)` in a reaction, a trigger matching an
event — checks the id the same way, records which events led to it (the storm guard reads `depth` and
`chain`), and carries a signed file's text and signature, so `coordinator --require-signed` runs a
signed workflow whoever started it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from phibroker import wire
from phibroker import workflow as workflows
from phibroker.engine.state import new_workflow_fields
from phibroker.errors import InvalidInput
from phibroker.security import signing
from phibroker.workflow.spec import NAME_PATTERN, RUN_ID_MAX

_ID = re.compile(NAME_PATTERN)


def submission(
    workflow: workflows.Workflow,
    params: Mapping[str, Any],
    wf_id: str | None = None,
    depth: int = 0,
    chain: Sequence[str] = (),
    signed: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The id and the workflow hash of a new run with these (already merged) params.

    `signed`: the signature fields to carry, when the workflow was rebuilt from a stored spec; by
    default they are read beside the workflow's file."""
    if wf_id is not None and (len(wf_id) > RUN_ID_MAX or not _ID.fullmatch(wf_id)):
        raise InvalidInput(f"workflow id {wf_id[:100]!r}: use at most {RUN_ID_MAX} letters, digits, '_', '.', '-'")
    wf_id = wf_id or f"{workflow.name}-{wire.short_id()}"
    fields = new_workflow_fields(workflow, dict(params), time.time(), depth, list(chain))
    fields["traceparent"] = new_traceparent()  # the run's trace, fixed now: its attempts' spans join it
    fields.update(signature_fields(workflow) if signed is None else signed)
    return wf_id, fields


def new_traceparent() -> str:
    """A run's W3C trace context: a new trace id, and the span id its attempts' spans name as their
    parent (see `tracing`). Sampled: whether spans are kept is the user's sampler's call (a parent-based
    one follows the flag)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def signature_fields(workflow: workflows.Workflow) -> dict[str, Any]:
    """A signed file travels with its text and detached signature, for `coordinator --require-signed`;
    so do the signed files it embeds (`workflow: FILE`), by task in `source_parts`, each with its own."""
    signed = _signed(workflow)
    if signed is None:
        return {}
    parts = signed.pop("parts")
    return {**signed, "source_parts": json.dumps(parts)} if parts else signed


def _signed(workflow: workflows.Workflow) -> dict[str, Any] | None:
    if workflow.path is None or workflow.text is None:
        return None
    sig = signing.sig_path(workflow.path)
    if not sig.exists():
        return None
    try:
        signature = json.loads(sig.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{sig}: unreadable signature: {exc}") from None
    parts = {task: part for task, child in workflow.subworkflows.items() if (part := _signed(child)) is not None}
    return {
        "source_text": workflow.text.decode("utf-8"),
        "source_suffix": workflow.path.suffix.lower(),
        "signature": json.dumps(signature),
        "parts": parts,
    }
