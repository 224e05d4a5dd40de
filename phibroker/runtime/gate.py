"""The coordinator's security checks, in one place: who may send what it acts on.

A coordinator trusts nothing it reads from the inbox. With an identities file, every message is signed
by the identity it names, and that identity's role may send its kind: what workers report (results,
`lost`, `declined`, `spend`) comes from the agent that owns the unit it is about; cancels, retries,
signals and runs come from a client (a run is a `submit` carrying its fields, from a client or an agent
that is a client too: their users may not write runs, so coordinators write it); kicks, re-dispatches and a
child run's end from a coordinator. What a client may send is dated and used once: a copy of a signed
cancel, retry or signal, added to the inbox again, is dead-lettered (`expires` in its body; the
coordinators remember the ids they applied until then); a copy of a run's `submit` writes nothing over
the run that exists. A run is cancelled or retried only by whoever submitted it, a coordinator (a
parent's cancel of its child) or an admin.
With `--require-signed`, a workflow starts only from a file text a trusted key signed; an approval
decision counts only when a trusted key signed it. The loop asks the gate and acts on its answer; the
gate decides, and changes nothing.

The identities file is JSON, one entry per identity: `{"NAME": {"role": "agent", "secret": "..."}}`,
`role` one of agent, client, coordinator, admin, or a list of them (an agent whose reactions submit runs
is also a client; an admin is a client that may cancel or retry any run). The older form
`{"AGENT": "SECRET"}` names agents only; with it, only what workers send is checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from phibroker import wire
from phibroker import workflow as workflows
from phibroker.engine import state
from phibroker.errors import InvalidInput, SignatureError, WorkflowFileError
from phibroker.security import signing
from phibroker.settings import Settings
from phibroker.store.registry import Registry
from phibroker.workflow.spec import MAX_DEPTH, NAME_PATTERN, RUN_ID_MAX

log = logging.getLogger("phibroker.coordinator")


AGENT, CLIENT, COORDINATOR, ADMIN = "agent", "client", "coordinator", "admin"
ROLES = frozenset({AGENT, CLIENT, COORDINATOR, ADMIN})
# Who may send each kind of inbox message. `decide` is not here: a decision carries its approver's
# Ed25519 signature, whoever carried it. `trigger`: an event matched a trigger where a coordinator
# published it (workers send theirs as `events`); `events` and `dead`: what a worker's agent publishes
# and could not handle, which the coordinators write where its user may not append.
SENDERS: Mapping[str, frozenset[str]] = {
    "results": frozenset({AGENT}),
    "lost": frozenset({AGENT}),
    "declined": frozenset({AGENT}),
    "spend": frozenset({AGENT}),
    "submit": frozenset({CLIENT, COORDINATOR}),
    "cancel": frozenset({CLIENT, COORDINATOR}),
    "signal": frozenset({CLIENT, COORDINATOR}),
    "retry": frozenset({CLIENT}),
    "kick": frozenset({COORDINATOR}),
    "redispatch": frozenset({COORDINATOR}),
    "child": frozenset({COORDINATOR}),
    "trigger": frozenset({COORDINATOR}),
    "joined": frozenset({AGENT}),
    "events": frozenset({AGENT}),
    "dead": frozenset({AGENT}),
}
WORKER_KINDS = frozenset(kind for kind, roles in SENDERS.items() if roles == {AGENT})
# What a `submit` carrying a new run may hold (a client's or a reaction's: their users may not write runs,
# so the coordinators do): the fields `submission` builds, no parent (child runs are the coordinators'),
# and nothing only a commit writes.
ASKED_FIELDS = frozenset(
    {"name", "state", "version", "launched", "created_at", "depth", "chain", "spec", "params", "traceparent"}
    | {"source_text", "source_suffix", "signature", "source_parts", "submitter", "submit_sig"}
)
# Each field's type: params and chain are written as JSON, the counts and times as numbers, the rest as text
_ASKED_TYPES: dict[str, type | tuple[type, ...]] = {
    "params": dict,
    "chain": list,
    "version": int,
    "launched": int,
    "depth": int,
    "created_at": (int, float),
}
# The events that led to a run, and the characters of each: every event of the run repeats them
CHAIN_MAX, LINK_MAX = 1000, 300
_RUN_ID = re.compile(NAME_PATTERN)
# A run's fields its start checked under `--require-signed` (its spec and the signed file it came from)
SIGNED_FIELDS = ("spec", "source_text", "source_suffix", "signature", "source_parts")
VERDICTS_KEPT = 1000


@dataclass(frozen=True)
class Identity:
    roles: frozenset[str]
    secret: bytes


def read_identities(text: str) -> tuple[dict[str, Identity], bool]:
    """The identities, and whether the file names roles (else it is the older `agent -> secret` form)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object of identities")
    out, with_roles = {}, False
    for name, entry in data.items():
        if isinstance(entry, str):
            out[name] = Identity(frozenset({AGENT}), entry.encode())
            continue
        with_roles = True
        role, secret = (entry.get("role"), entry.get("secret")) if isinstance(entry, dict) else (None, None)
        roles = frozenset([role] if isinstance(role, str) else role if isinstance(role, list) else [])
        if not roles or not roles <= ROLES or not isinstance(secret, str) or not secret:
            raise ValueError(f"{name!r}: give a role ({', '.join(sorted(ROLES))}) and a secret")
        out[name] = Identity(roles | {CLIENT} if ADMIN in roles else roles, secret.encode())
    return out, with_roles


class SecurityGate:
    """Answers "refused, and why" or None for each input a coordinator checks before applying it."""

    def __init__(self, settings: Settings, registry: Registry, require_signed: bool = False):
        self.settings = settings
        self.registry = registry
        self.require_signed = require_signed
        self._verdicts: dict[str, str | None] = {}  # check_launched's, by signed file and trust list

    @cached_property
    def _identities(self) -> tuple[dict[str, Identity], bool]:
        path = self.settings.identities
        if path is None:
            return {}, False
        try:
            return read_identities(path.read_text())
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise InvalidInput(f"identities file {path}: {exc}") from None

    @property
    def identities(self) -> dict[str, Identity]:
        """name -> identity, from the identities file; empty: nothing is checked."""
        return self._identities[0]

    @property
    def with_roles(self) -> bool:
        """The file names roles: every kind of message is checked, not only what workers send."""
        return self._identities[1]

    @property
    def agents(self) -> frozenset[str]:
        """The agents the identities file names: the coordinators read their lanes from the start, before
        any of their workers joined the roster."""
        return frozenset(name for name, identity in self.identities.items() if AGENT in identity.roles)

    def signer(self) -> tuple[str, bytes] | None:
        """The coordinators' own identity (name, secret), to sign what they send each other; None
        without a file that names roles. Such a file without a coordinator is refused: every kick and
        child run's end would be."""
        if not self.with_roles:
            return None
        for name, identity in self.identities.items():
            if COORDINATOR in identity.roles:
                return name, identity.secret
        raise InvalidInput(f"identities file {self.settings.identities}: no identity has the coordinator role")

    def check_sender(self, message: wire.Inbox) -> str | None:
        """With identities configured, a message is signed by the identity it names, whose role may
        send its kind (a file without roles: what workers send, by their agent), and what a client may
        send is not past its expiry."""
        roles = SENDERS.get(message.kind)
        if not self.identities or roles is None or (not self.with_roles and message.kind not in WORKER_KINDS):
            return None
        what = "result" if message.kind == "results" else message.kind
        who = "agent" if message.kind in WORKER_KINDS else "identity"
        if message.agent is None:
            return f"forged {what}: not signed (only {' or '.join(sorted(roles))} identities may send it)"
        identity = self.identities.get(message.agent)
        if identity is None:
            return f"forged {what}: unknown {who} {message.agent!r}"
        if not message.signed_by(identity.secret):
            return f"forged {what}: bad signature for {who} {message.agent!r}"
        if not identity.roles & roles:
            held = "/".join(sorted(identity.roles))
            return f"forged {what}: {message.agent!r} is {held}; only {' or '.join(sorted(roles))} may send it"
        return self.check_expiry(message, time.time())

    def check_expiry(self, message: wire.Inbox, now: float) -> str | None:
        """With roles, what a client may send is good until the `expires` its sender signed, and never
        dated further ahead than a message is good for: a copy kept for later is of no use. What the
        coordinators send each other (a child's kick, a parent's cancel, a handler's signal) is good for
        as long as runs are kept, so no outage of every coordinator loses it."""
        if not self.with_roles or message.kind not in wire.DATED_KINDS:
            return None
        expires = message.body.get("expires")
        if not isinstance(expires, int | float) or isinstance(expires, bool) or not math.isfinite(expires):
            return f"undated {_control(message)}: signed without an expiry (a client older than the coordinators?)"
        if now > expires:
            return f"expired {_control(message)}: {now - expires:.0f} s past its expiry (send it again)"
        coordinator = COORDINATOR in self.identities[str(message.agent)].roles
        asked_run = message.kind == "submit" and "fields" in message.body  # a reaction's: one id, one run
        window = self.settings.retention if coordinator else wire.ASKED_RUN_TTL if asked_run else wire.CONTROL_TTL
        if expires - now > 2 * window:
            ahead = expires - now
            return f"forged {_control(message)}: it expires {ahead:.0f} s from now (is its sender's clock ahead?)"
        return None

    def remembers(self, message: wire.Inbox) -> bool:
        """Whether the coordinators apply this message once: a signed, dated one, under a file with roles."""
        return self.with_roles and message.kind in wire.DATED_KINDS and message.agent is not None

    def claim(self, message: wire.Inbox, now: float) -> tuple[str, int]:
        """Where the coordinators remember that they applied this message (its sender's name and its id:
        one sender cannot take another's ids), and for how many ms: until it expires."""
        ttl = int((float(message.body["expires"]) - now) * 1000) + 1000
        return self.settings.keys.applied(str(message.agent), message.id), max(ttl, 1000)

    @staticmethod
    def replayed(message: wire.Inbox, first: str) -> str:
        """Why a copy of an applied message is dead-lettered; `first`: the inbox entry that was applied."""
        return f"replayed {_control(message)}: message {message.id} was applied already (inbox entry {first})"

    def check_owner(self, run: state.Run, kind: str, sender: str | None) -> str | None:
        """With roles, a run is cancelled or retried only by whoever submitted it, a coordinator (a
        parent's cancel of its child) or an admin: any other client is refused."""
        if not self.with_roles:
            return None
        identity = self.identities.get(sender or "")
        submitter = run.meta.get("submitter")
        if (sender is not None and sender == submitter) or (identity and identity.roles & {COORDINATOR, ADMIN}):
            return None
        return (
            f"refused {kind} of run {run.id!r} from {sender!r}: only its submitter ({submitter!r}),"
            " a coordinator or an admin may"
        )

    def check_asked_run(self, message: wire.Inbox) -> str | None:
        """Why the coordinators must not write the run a `submit` carries (a client's, a reaction's), or
        None: only a new run's fields, as `submission` builds them, each of the type and within the
        bounds the coordinators read it with (a field they cannot read would stop each coordinator that
        reads the run), and with identities signed for the identity that sends it (the signature itself
        is checked when the run starts)."""
        wf_id, fields = str(message.body["wf"]), message.body.get("fields")
        if len(wf_id) > RUN_ID_MAX or not _RUN_ID.fullmatch(wf_id):
            return f"forged submit: run id {wf_id[:100]!r}: use at most {RUN_ID_MAX} letters, digits, '_', '.', '-'"
        if not isinstance(fields, dict) or not all(isinstance(name, str) for name in fields):
            return "forged submit: the run's fields are not a map of names"
        extra = sorted(set(fields) - ASKED_FIELDS)
        if extra:
            return f"forged submit: a new run has no field {extra[0]!r}"
        if (fields.get("state"), fields.get("version"), fields.get("launched")) != ("running", 0, 0):
            return "forged submit: not a new run (its state, version or launched is not a new run's)"
        if not isinstance(fields.get("spec"), str) or type(fields.get("created_at")) not in (int, float):
            return "forged submit: a run needs its spec (text) and created_at (a number)"
        for name, value in fields.items():
            if not isinstance(value, _ASKED_TYPES.get(name, str)) or isinstance(value, bool):
                return f"forged submit: field {name!r} is a {type(value).__name__}"
        submitter = fields.get("submitter")
        if self.with_roles and submitter is not None and submitter != message.agent:
            return f"forged submit: a run signed for {submitter!r} sent by {message.agent!r}"
        return _unreadable(fields)

    def check_answerer(self, run: state.Run, result: wire.Result, sender: str | None) -> str | None:
        """With identities configured, an agent answers only the units of its own tasks."""
        return self.check_unit(run, result.unit, sender, "result")

    def check_unit(self, run: state.Run, unit: str, sender: str | None, what: str) -> str | None:
        """With identities configured, a worker reports (results, `lost`, `declined`) only on its own
        agent's units."""
        if self.identities and state.unit_agent(run.workflow, unit) != sender:
            verb = "answered" if what == "result" else "reported"
            return f"forged {what}: agent {sender!r} {verb} {unit!r} of another agent"
        return None

    def check_submitter(self, run_id: str, meta: dict[str, Any]) -> str | None:
        """With a file that names roles, a run starts only if a client (or a coordinator: child runs,
        triggers) signed its id, creation time, spec, params and parent when it was written: a copy of a
        signed file written by an agent does not run, nor a run whose spec or params changed after it was
        asked for, nor one created longer ago than runs are kept (a copy of an expired run, written again)."""
        if not self.with_roles:
            return None
        name = str(meta.get("submitter") or "")
        identity = self.identities.get(name)
        if not name or not meta.get("submit_sig"):
            return "refused: not submitted by a client identity (set PHIBROKER_CLIENT_SECRET)"
        if identity is None:
            return f"refused: submitted by unknown identity {name!r}"
        if not identity.roles & SENDERS["submit"]:
            return f"refused: submitted by {name!r}, which is not a client"
        expected = wire.submit_signature(identity.secret, run_id, name, meta)
        if not wire.same_digest(str(meta["submit_sig"]), expected):
            return f"refused: bad submit signature for {name!r} (the run was changed after it was submitted)"
        age, kept = time.time() - float(meta.get("created_at") or 0), self.settings.retention
        if age > kept:  # its keys would have expired: a copy written again, or nobody started it in time
            return f"refused: submitted {age:.0f} s ago, longer than runs are kept ({kept:.0f} s): submit it again"
        return None

    def check_start(self, run_id: str, meta: dict[str, Any]) -> str | None:
        """Why a run may not start (not asked for by a client; `--require-signed` and its file is not
        signed as it should be), or None.

        A run already launched was checked then: a later kick of it is not checked again."""
        if meta.get("launched"):
            return None
        return self.check_submitter(run_id, meta) or (self.verify_source(meta) if self.require_signed else None)

    def check_launched(self, run_id: str, meta: dict[str, Any]) -> str | None:
        """Under `--require-signed`, why a launched run read again from Redis must go no further, or None:
        its spec must still be its signed file's (whoever may write runs, the admin's user say, could
        rewrite a payload after the start), and its params and spawned tasks what the coordinators sealed (`seal`). Who
        submitted it is not asked again: a client's secret may have been rotated since, and the client
        could sign again anyway. A verdict is kept per signed file and trust list: a run is read again
        often where several coordinators share its inputs."""
        if not self.require_signed:
            return None
        return self._check_file(meta) or self._check_seal(run_id, meta)

    def seal(self, run_id: str, meta: Mapping[str, Any]) -> str | None:
        """Under `--require-signed` with identities that name roles, the coordinators' mark over what no
        signed file covers, a launched run's params and spawned tasks: `IDENTITY:HMAC`, written with each
        change of them. None where there is nothing to seal with."""
        signer = self.signer() if self.require_signed else None
        if signer is None:
            return None
        name, secret = signer
        return f"{name}:{wire.run_seal(secret, run_id, meta.get('params'), meta.get('children'))}"

    def _check_seal(self, run_id: str, meta: Mapping[str, Any]) -> str | None:
        """Why a launched run's params or spawned tasks are not what a coordinator identity sealed, or None
        (nothing to check without identities that name roles)."""
        if not self.with_roles:
            return None
        name, _, mark = str(meta.get("seal") or "").rpartition(":")
        identity = self.identities.get(name)
        if identity is not None and COORDINATOR in identity.roles:
            expected = wire.run_seal(identity.secret, run_id, meta.get("params"), meta.get("children"))
            if wire.same_digest(mark, expected):
                return None
        return "tampered: its params or spawned tasks are not what the coordinators wrote"

    def _check_file(self, meta: dict[str, Any]) -> str | None:
        trusted = self.trusted()
        signed = [str(meta.get(k) or "") for k in (*SIGNED_FIELDS, "source_path")]
        key = hashlib.sha256("\0".join([*signed, json.dumps(trusted, sort_keys=True)]).encode()).hexdigest()
        if key not in self._verdicts:
            self._verdicts[key] = self.verify_source(meta, trusted)
            while len(self._verdicts) > VERDICTS_KEPT:
                del self._verdicts[next(iter(self._verdicts))]
        return self._verdicts[key]

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

    def verify_source(self, meta: dict[str, Any], trusted: dict[str, str] | None = None) -> str | None:
        """`--require-signed`: the stored file text carries a trusted signature and is what runs.
        `trusted`: the trust list already read (a run read again: then nothing is logged)."""
        text, raw_signature = meta.get("source_text"), meta.get("signature")
        if not text or not raw_signature:
            return "refused: the workflow file is not signed (phibroker sign FILE)"
        again = trusted is not None
        try:
            trusted = trusted if trusted is not None else self.trusted()
            signer = signing.verify_file_bytes(text.encode(), json.loads(raw_signature), trusted)
            source = workflows.decode(text, str(meta.get("source_suffix") or ""))
            source = _embed_signed(source, json.loads(meta.get("source_parts") or "{}"), trusted)
            for task in json.loads(meta.get("source_path") or "[]"):  # a child run: its spec within
                source = _task_field(source, task, "workflow")
        except (SignatureError, WorkflowFileError, ValueError) as exc:
            return f"refused: {exc}"
        if source != json.loads(meta["spec"]):
            return "refused: tampered: the submitted spec differs from the signed file"
        if not again:
            log.info("workflow file signed by %s", signer)
        return None


def _unreadable(fields: Mapping[str, Any]) -> str | None:
    """Why the coordinators, the views or a run's events could not take an asked run's fields as they
    take a run's, or None: a time not ahead of the clock, a whole depth, params as JSON of bounded depth,
    a bounded chain of text, a spec that is a workflow of the run's name, and signature fields that are
    JSON objects."""
    created, depth, chain = fields["created_at"], fields.get("depth", 0), fields.get("chain", [])
    if not math.isfinite(created) or not 0 < created < time.time() + wire.CONTROL_TTL:
        return f"forged submit: created_at {created!r} is no time, or ahead of the clock"
    if not 0 <= depth < 2**31:
        return f"forged submit: depth {depth!r} is not a whole number of events"
    if len(chain) > CHAIN_MAX or not all(isinstance(link, str) and len(link) <= LINK_MAX for link in chain):
        return f"forged submit: chain is not at most {CHAIN_MAX} links of text of at most {LINK_MAX} characters"
    if wire.nests_deeper(fields.get("params"), MAX_DEPTH):
        return f"forged submit: params nest deeper than {MAX_DEPTH} levels"
    try:
        json.dumps(fields.get("params"))
        name = workflows.check(json.loads(fields["spec"])).name
        signed = [json.loads(fields[key]) for key in ("signature", "source_parts") if key in fields]
    except (WorkflowFileError, TypeError, ValueError, RecursionError) as exc:
        return f"forged submit: {str(exc)[:200]}"
    if fields.get("name") != name:
        return f"forged submit: the run's name is not its workflow's ({name!r})"
    if not all(isinstance(value, dict) for value in signed):
        return "forged submit: signature and source_parts are not JSON objects"
    return None


def _control(message: wire.Inbox) -> str:
    """`cancel of run 'ID' from 'NAME'`: what a refusal of a control message names."""
    return f"{message.kind} of run {message.body.get('wf')!r} from {message.agent!r}"


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
