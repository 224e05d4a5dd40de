"""`Client`: submit, wait, status, list, cancel — what the CLI and any Python program use.

The client never runs a transition: it writes a new workflow and tells the coordinators, and it sends
cancels and decisions to them the same way, so every state change has one author.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from phibroker import wire
from phibroker import workflow as workflows
from phibroker.engine.records import status_document
from phibroker.engine.state import TASK_TERMINAL, WF_TERMINAL
from phibroker.errors import (
    ApprovalError,
    DecodeError,
    InvalidInput,
    MessageTooLarge,
    UnknownWorkflow,
)
from phibroker.runtime.events import add_trigger
from phibroker.runtime.output_reader import OutputReader
from phibroker.runtime.submission import submission
from phibroker.security import signing
from phibroker.settings import Settings
from phibroker.store.client import ClientStore
from phibroker.store.connection import denied, lease_alive, reaching
from phibroker.store.registry import Registry
from phibroker.store.views import Views
from phibroker.workflow.spec import MAX_DEPTH, did_you_mean, is_name

log = logging.getLogger("phibroker.client")


class Client:
    def __init__(self, settings: Settings | None = None, broker: ClientStore | None = None):
        self.settings = settings or Settings()
        self.broker = broker or ClientStore(self.settings)
        if self.settings.client_secret:  # coordinators with identities act only on what a client signed
            self.broker.sign_as(self.settings.client_name, self.settings.client_secret.encode())
        self.registry = Registry(self.settings, client=self.broker.redis)
        # runs asked for that no coordinator had written when `submit` returned: inbox entry, fields
        self._asked: dict[str, tuple[str, dict[str, Any]]] = {}

    @classmethod
    def from_url(cls, url: str, namespace: str = "phi") -> Client:
        return cls(Settings(redis_url=url, namespace=namespace))

    def close(self) -> None:
        self.broker.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting ------------------------------------------------------------------------------
    def submit(
        self,
        source: str | Path | workflows.Workflow,
        params: Mapping[str, Any] | None = None,
        id: str | None = None,  # noqa: A002 - the name users pass: submit(..., id="deploy-42")
        depth: int = 0,
        chain: list[str] | None = None,
    ) -> str:
        """Check and submit a workflow; returns its id. With `id`, a repeated submit is a no-op. A client
        that signs asks the coordinators for the run, and returns once one has written it (InvalidInput
        if they refused it), or after 10 s with none running: until one writes it, this client's
        `status` and `wait` show it as asked (running, nothing started).

        `depth` and `chain` say which events led here (set by reactions; the storm guard reads them)."""
        workflow = source if isinstance(source, workflows.Workflow) else workflows.load(source)
        wf_id, fields = submission(workflow, workflow.params_with(params or {}), id, depth, chain or ())
        with reaching(self.settings):
            if self.broker.sender is None:  # no identity: this user writes the run itself
                self.broker.submit_workflow(wf_id, fields)
                return wf_id
            if Views(self.broker).workflow_heads([wf_id])[0]:
                return wf_id
            try:
                entry = self.broker.ask_to_submit(wf_id, fields)
            except MessageTooLarge as exc:  # what the coordinators read of one message bounds a run
                raise InvalidInput(
                    f"{workflow.name}: the run is {exc.size:,} bytes, over the {exc.limit:,} a signed submit may"
                    " carry (4 × max_message_bytes): raise PHIBROKER_MAX_MESSAGE_BYTES, the coordinators' too,"
                    " or split the workflow"
                ) from None
        if not self._until_written(wf_id, entry, _WRITTEN):
            log.warning("run %s is asked for; no coordinator has written it yet: one will when it runs", wf_id)
            self._asked[wf_id] = (entry, fields)
        return wf_id

    def _until_written(self, wf_id: str, entry: str, timeout: float | None) -> bool:
        """A signed run is asked of the coordinators, who write it (no client's user may write runs):
        wait up to `timeout` seconds (None: for as long as it takes) until they have, so that `status`
        knows it, or refused it (InvalidInput, with why). Whether they wrote it in time."""

        def head() -> dict[str, Any]:
            with reaching(self.settings):
                return Views(self.broker).workflow_heads([wf_id])[0]

        return self._until_taken(wf_id, entry, "submit", timeout, bool, head)[0]

    def cancel(self, wf_id: str, reason: str | None = None, tasks: Sequence[str] = (), wait: float = 0.0) -> bool:
        """Ask the coordinators to cancel: nothing new starts, running tasks see `ctx.cancelled`.

        With `tasks`, only those (a region): each counts as skipped for its dependents, the run goes
        on. A run that has ended is refused (InvalidInput): nothing would change, and saying so beats
        silence; so is a task the run does not have. It is sent, and with `wait` waited for up to that
        many seconds: True once the coordinators took it (the run, or each task, is stopping or ended),
        False if none did in time; InvalidInput if they refused it (with an identities file, a run this
        identity did not submit, unless it is an admin: the cancel is dead-lettered)."""
        with reaching(self.settings):
            (head,) = Views(self.broker).workflow_heads([wf_id])
            if not head:
                raise UnknownWorkflow(wf_id)
            if head.get("state") in WF_TERMINAL:
                raise InvalidInput(f"run {wf_id} has already ended ({head['state']})")
            if tasks:
                known = self.status(wf_id)["tasks"]
                unknown = [t for t in tasks if t not in known]
                if unknown:
                    raise InvalidInput(f"run {wf_id} has no task {unknown[0]!r}{did_you_mean(unknown[0], known)}")
            body: dict[str, Any] = {"wf": wf_id, "reason": reason or "cancelled by request"}
            if tasks:
                body["tasks"] = list(tasks)
            before = self.status(wf_id) if wait else {"state": "", "tasks": {}}
            entry = self._send(wire.Inbox(kind="cancel", body=body))

        def taken(status: dict[str, Any]) -> bool:
            if not tasks:
                return status["state"] in ("cancelling", "compensating", *WF_TERMINAL)
            rows = [status["tasks"].get(task, {}) for task in tasks]
            return all(row.get("state") in TASK_TERMINAL or row.get("stopping") for row in rows)

        if not wait:
            return False
        if taken(before):  # nothing in the run would show it: only a refusal would, within a round or two
            return not self._until_taken(wf_id, entry, "cancel", min(wait, _SETTLED), lambda _: False)[0]
        return self._until_taken(wf_id, entry, "cancel", wait, taken)[0]

    def retry(self, wf_id: str, from_task: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Re-open an ended run: `from_task` (or every task that did not succeed) and everything below
        it run again; succeeded tasks upstream keep their results. Returns the status once the run is
        re-opened (or after `timeout`, the request still queued). Refused (InvalidInput) for a run
        that is still going or whose compensations ran, for a task the run does not have, and when a
        coordinator dead-letters the request (with an identities file: a run this identity did not
        submit, unless it is an admin)."""
        with reaching(self.settings):
            status = self.status(wf_id)
            if status["state"] not in ("failed", "cancelled", "timed_out"):
                raise InvalidInput(
                    f"run {wf_id} is {status['state']}: only a failed, cancelled or timed-out run can be retried"
                )
            if any(t["state"] == "compensated" or t.get("compensation") for t in status["tasks"].values()):
                raise InvalidInput(f"run {wf_id} was compensated: what it did was undone, so it cannot be retried")
            if from_task is not None and from_task not in status["tasks"]:
                raise InvalidInput(f"run {wf_id} has no task {from_task!r}{did_you_mean(from_task, status['tasks'])}")
            if from_task is not None and "/" in from_task:
                parent = from_task.rsplit("/", 1)[0]
                raise InvalidInput(f"{from_task} was spawned by {parent}: retry --from {parent} runs it again")
            body: dict[str, Any] = {"wf": wf_id, "id": wire.new_id()}  # a copy of it is known
            if from_task is not None:
                body["from"] = from_task
            ended_at = status.get("finished_at")
            entry = self._send(wire.Inbox(kind="retry", body=body))

        def taken(now: dict[str, Any]) -> bool:
            return now["state"] not in WF_TERMINAL or now.get("finished_at") != ended_at

        return self._until_taken(wf_id, entry, "retry", timeout, taken)[1] or status

    def _until_taken(
        self,
        wf_id: str,
        entry: str,
        what: str,
        timeout: float | None,
        taken: Callable[[Any], bool],
        read: Callable[[], Any] | None = None,
    ) -> tuple[bool, Any]:
        """Wait up to `timeout` seconds (None: for as long as it takes) for the coordinators to take the
        request sent as inbox entry `entry` (`taken` of what `read` gives: the run's status unless told),
        or to refuse it (InvalidInput, with why: its dead letter). Whether they took it, and what `read`
        gave last (None: not looked at)."""
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        look_at_dead_letters = time.monotonic() + _DLQ_EVERY
        seen = None
        while True:
            try:
                seen = read() if read is not None else self.status(wf_id)
                if taken(seen):
                    return True, seen
                refusal = self._refusal(wf_id, entry) if time.monotonic() > look_at_dead_letters else None
            except Exception as exc:
                if not denied(exc):
                    raise
                return False, seen  # this user may not read the run or the dead letters: it cannot tell
            if refusal:
                raise InvalidInput(f"{what} of {wf_id} refused: {refusal}")
            if time.monotonic() > look_at_dead_letters:
                look_at_dead_letters = time.monotonic() + _DLQ_EVERY
            if time.monotonic() >= deadline:
                return False, seen
            time.sleep(0.02)

    def _send(self, message: wire.Inbox) -> str:
        """Into the coordinators' inbox, signed as this client's identity; returns its inbox entry id."""
        with reaching(self.settings):
            raw = message.signed_as(self.broker.sender, self.settings.max_message_bytes)
            return self.broker.add(self.settings.keys.inbox(message.body.get("wf")), raw)

    def _refusal(self, wf_id: str, entry: str) -> str | None:
        """Why the coordinators dead-lettered the inbox entry `entry` about run `wf_id` (among the newest
        dead letters), or None. Its lane is the run's: entry ids repeat across the inbox's shards. A dead
        letter a worker sent (it has a `lane`) names what its worker wrote: none of it counts here."""
        lane = self.settings.keys.inbox(wf_id)
        with reaching(self.settings):
            rows = self.broker.dead_letters(_DLQ_LOOK)
        mine = (r for _, r in rows if r.get("entry") == entry and r.get("source") in (lane, None) and "lane" not in r)
        return next((str(record.get("reason")) for record in mine), None)

    def signal(self, wf_id: str, name: str, data: Any = None) -> None:
        """Send run `wf_id` the signal `name`: the first gate waiting for it takes `data` as its result;
        sent before any gate waits, it is kept for the run. Refused (InvalidInput) for a run that ended."""
        if not is_name(name):
            raise InvalidInput(f"signal name {name!r}: use letters, digits, '_', '.', '-'")
        if wire.nests_deeper(data, MAX_DEPTH):
            raise InvalidInput(f"signal {name}: the data nests deeper than {MAX_DEPTH} levels")
        with reaching(self.settings):
            (head,) = Views(self.broker).workflow_heads([wf_id])
            if not head:
                raise UnknownWorkflow(wf_id)
            if head.get("state") in WF_TERMINAL:
                raise InvalidInput(
                    f"run {wf_id} has already ended ({head['state']}): no gate will take signal {name!r}"
                )
            body = {"wf": wf_id, "name": name, "data": data, "id": wire.new_id()}  # a copy of it is known
            self.broker.send_to_coordinators(wire.Inbox(kind="signal", body=body))

    # -- approvals -------------------------------------------------------------------------------
    def approvals(self) -> list[dict[str, Any]]:
        """Open approval requests, oldest first: id, workflow, task, message, deadline, approvers."""
        with reaching(self.settings):
            requests = self.broker.approvals()
        return sorted(requests.values(), key=lambda r: r.get("requested_at") or 0)

    def approve(self, approval_id: str, comment: str | None = None, wait: float = 10.0) -> dict[str, Any]:
        return self.decide(approval_id, "approve", comment=comment, wait=wait)

    def reject(self, approval_id: str, reason: str, wait: float = 10.0) -> dict[str, Any]:
        return self.decide(approval_id, "reject", reason=reason, wait=wait)

    def decide(
        self,
        approval_id: str,
        decision: str,
        comment: str | None = None,
        reason: str | None = None,
        wait: float = 10.0,
        key: signing.KeyPair | None = None,
    ) -> dict[str, Any]:
        """Sign a decision with the approver's key (made on first use), send it, and wait for the verdict.

        Returns the `approval.granted`/`approval.rejected` event; raises ApprovalError when the request
        is unknown or decided, or when the coordinator refuses the decision (untrusted key, not an
        approver). If no coordinator answers within `wait`, the decision stays queued and the
        returned event is `approval.sent`.
        """
        with reaching(self.settings):
            request = self.broker.approvals().get(approval_id)
            if request is None:
                raise ApprovalError(f"no open approval {approval_id!r} (unknown, or already decided)")
            if key is None:
                key, _ = signing.load_or_create(self.settings.home, signing.default_name())
            body = signing.sign_decision(
                key,
                approval=approval_id,
                workflow=request["workflow"],
                task=request["task"],
                decision=decision,
                expires=time.time() + 300,
                comment=comment,
                reason=reason,
            )
            after = self.broker.last_event_id(request["workflow"])
            self.broker.send_to_coordinators(wire.Inbox(kind="decide", body=body))
            return self._verdict(approval_id, body["signature"][:16], request["workflow"], after, wait)

    def _verdict(self, approval_id: str, decision: str, wf_id: str, after: str, wait: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        while (remaining := deadline - time.monotonic()) > 0:
            after, events = self.broker.read_events(wf_id, after, block=remaining)
            for event in events:
                data = event.get("data") or {}
                if data.get("approval") != approval_id or data.get("decision") != decision:
                    continue
                if event["type"] == "approval.refused":
                    raise ApprovalError(f"decision refused: {event['data'].get('reason')}")
                if event["type"] in ("approval.granted", "approval.rejected"):
                    return event
        return {"type": "approval.sent", "data": {"approval": approval_id}}

    # -- choreography ----------------------------------------------------------------------------
    def add_trigger(self, source: str | Path | workflows.Workflow) -> str:
        """Register a workflow file with `on:`: a matching event starts it with the event's data as params."""
        workflow = source if isinstance(source, workflows.Workflow) else workflows.load(source)
        with reaching(self.settings):
            return add_trigger(self.registry, workflow)

    def triggers(self) -> list[dict[str, Any]]:
        with reaching(self.settings):
            _, triggers = self.registry.choreography()
        return [
            {"name": name, "event": info["event"], "where": info.get("where"), "added": info.get("added")}
            for name, info in sorted(triggers.items())
        ]

    def remove_trigger(self, name: str) -> None:
        with reaching(self.settings):
            if not self.registry.remove_trigger(name):
                raise InvalidInput(f"no trigger named {name!r}")

    def remove_subscription(self, name: str) -> None:
        """Forget a subscription and drop its stream: events stop reaching it. Refused while a live worker
        serves it, because that worker reads the stream and registers it again when it starts."""
        with reaching(self.settings):
            agents = {info["agent"] for named, info in self.registry.routing()[0] if named == name}
            if not agents:
                raise InvalidInput(f"no subscription named {name!r} (phibroker subs lists them)")
            now, leases = self.broker.worker_leases(agents)  # each agent that registered the name
            serving = sorted(
                worker
                for worker, info in leases.items()
                if lease_alive(info, now) and name in (info.get("subscriptions") or ())
            )
            if serving:
                workers = ("live worker " if len(serving) == 1 else "live workers ") + ", ".join(serving)
                raise InvalidInput(
                    f"subscription {name!r} is served by {workers}: stop them, or drop the handler from the"
                    " agent, first (a worker registers its subscriptions again when it starts)"
                )
            self.registry.remove_subscription(name)

    def subscriptions(self) -> list[dict[str, Any]]:
        """Every registered subscription with its stream's length, lag, pending and dropped events."""
        with reaching(self.settings):
            subs, _ = self.registry.choreography()
            return [
                {
                    "name": name,
                    **{k: info.get(k) for k in ("agent", "event", "where")},
                    **self.registry.subscription_health(name),
                }
                for name, info in sorted(subs.items())
            ]

    # -- dead letters ----------------------------------------------------------------------------
    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; each with its DLQ id, reason, source stream, size, and what it names."""
        with reaching(self.settings):
            rows = self.broker.dead_letters(limit)
        return [_dead_letter_row(entry_id, record) for entry_id, record in rows]

    def dead_letter(self, entry_id: str) -> dict[str, Any]:
        """One dead letter, with its raw bytes decoded where they decode."""
        with reaching(self.settings):
            record = self.broker.read_dead_letter(entry_id)
        if record is None:
            raise InvalidInput(f"no dead letter {entry_id!r}")
        row = _dead_letter_row(entry_id, record)
        try:
            row["message"] = wire.unpack(record.get("raw") or b"", 1 << 26)
        except DecodeError as exc:
            row["message"] = None
            row["decode_error"] = exc.reason
        return row

    def retry_dead_letter(self, entry_id: str) -> str:
        """Put a dead letter's bytes back on the stream it came from; returns that stream. Only the
        coordinators' inbox (which checks who signed what it reads; an agent's lane's go to its shard's
        own lane) and subscription streams take them: a worker's dead letter is put back only on a
        subscription of its own agent's (named `AGENT.*`, and no other agent's too), as its bytes and
        its `source` are the agent's to choose."""
        keys = self.settings.keys
        with reaching(self.settings):
            record = self.broker.read_dead_letter(entry_id)
            if record is None:
                raise InvalidInput(f"no dead letter {entry_id!r}")
            if record.get("truncated"):
                raise InvalidInput(f"dead letter {entry_id!r} was too large to keep whole; it cannot be retried")
            raw = record.get("raw")
            if not isinstance(raw, bytes):
                raise InvalidInput(f"dead letter {entry_id!r} holds no message bytes; it cannot be retried")
            source = str(record.get("source") or "")
            if source.startswith(keys.sub("")):
                name = str(record.get("subscription") or source.rsplit(":", 1)[-1])
                owner = keys.lane_owner(str(record.get("lane") or "")) if record.get("lane") else None
                if record.get("lane") and not (
                    owner and name.startswith(f"{owner}.") and self.registry.registrants(name) == {owner}
                ):
                    raise InvalidInput(
                        f"dead letter {entry_id!r} was sent by a worker about subscription {name!r}, which is"
                        " not its agent's alone: it is not put back there"
                    )
                source = keys.sub(name)
            elif keys.shard_of(source):  # an agent's lane too: the admin appends to the shard's own
                source = str(keys.shard_of(source))
            else:
                raise InvalidInput(
                    f"dead letter {entry_id!r} came from {source or 'nowhere'!r}: only the inbox's and the"
                    " subscriptions' are put back (a task's: `phibroker retry RUN --from TASK`)"
                )
            self.broker.add(source, raw)
            self.broker.remove_dead_letters([entry_id])
        return source

    def purge_dead_letters(self, entry_ids: list[str] | None = None) -> int:
        with reaching(self.settings):
            if entry_ids:
                return self.broker.remove_dead_letters(entry_ids)
            return self.broker.purge_dead_letters()

    # -- reading ---------------------------------------------------------------------------------
    def status(self, wf_id: str) -> dict[str, Any]:
        """The documented `status --json` shape: the workflow and every task."""
        with reaching(self.settings):
            meta, units, results, history = self.broker.read_workflow(wf_id)
        if not meta.get("spec") and wf_id in self._asked:  # as asked for: running, nothing started yet
            meta, units, results, history = self._asked[wf_id][1], {}, {}, []
        elif wf_id in self._asked:
            del self._asked[wf_id]
        if not meta.get("spec"):
            raise UnknownWorkflow(wf_id)
        return status_document(wf_id, meta, units, results, history, self.settings.max_message_bytes)

    def workflow(self, wf_id: str) -> workflows.Workflow:
        """The workflow a run was submitted with, rebuilt from the spec stored with the run."""
        with reaching(self.settings):
            (spec,), _ = Views(self.broker).workflow_bodies([wf_id], [])
        if spec is None:
            raise UnknownWorkflow(wf_id)
        return workflows.from_stored(spec)

    def wait(
        self,
        wf_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        every: float = 1.0,
    ) -> dict[str, Any]:
        """Block until the workflow ends (or `timeout`), waking on its end signal, not by polling.

        `on_progress` is called with the status about once per `every` seconds while it runs.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = every if on_progress is not None else 5.0
        if wf_id in self._asked:  # this client asked for it, and no coordinator has written it yet
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._until_written(wf_id, self._asked[wf_id][0], left):
                return self.status(wf_id)
        while True:
            status = self.status(wf_id)
            if status["state"] in WF_TERMINAL:
                return status
            if on_progress is not None:
                on_progress(status)
            remaining = pause if deadline is None else min(pause, deadline - time.monotonic())
            if remaining <= 0:
                return status
            with reaching(self.settings):
                self.broker.wait_done(wf_id, remaining)

    def stream(
        self,
        wf_id: str,
        task: str | None = None,
        follow: bool = False,
        after: str = "0-0",
    ) -> Iterator[dict[str, Any]]:
        """The run's output in order, from its start: what its handlers streamed (`kind: chunk`) and
        logged (`log`, `data` = `{"level", "logger", "message"}`), and its events (`event`, `data` = the
        event). Each record is a dict with `kind`, `task`, `unit`, `partition`, `attempt`, `seq` (per
        attempt, from 1; None for events), `data`, `ts` and `id` (its entry's id in its stream, the
        run's events' or its agent's; the events of one state change share one). Kept as long as the
        run. `follow` waits for more until the run ends; `task` keeps that task's records only; `after`
        starts past that entry id in every stream (ids repeat across streams: a reader that calls again
        and again keeps its place whole with `output_reader`). An event is yielded once (a worker writes
        a task's start beside its output, and the coordinators publish it too)."""
        reader = self.output_reader(wf_id, task, after)
        while True:
            with reaching(self.settings):  # the end's events are written with it: read them after this
                ended = not follow or self.broker.run_state(wf_id) in WF_TERMINAL
            for _, record in self.read_on(reader):
                yield record
            if ended:
                return
            with reaching(self.settings):
                reader.wait(1.0)

    def read_on(self, reader: OutputReader) -> Iterator[tuple[str, dict[str, Any]]]:
        """What the run's output held as this call began, past the reader's place (`output_reader`):
        records with their tokens, a page at a time."""
        while True:
            with reaching(self.settings):
                records = reader.read()
            yield from records
            if not reader.more:
                return

    def output_reader(self, wf_id: str, task: str | None = None, after: str = "0-0") -> OutputReader:
        """A reader of the run's output that keeps its place across reads (`stream` reads with one):
        what a page or a bridge that reads again and again holds on to. `after` is an entry id or a
        record's token, which `read_on` gives with each record. Raises UnknownWorkflow."""
        with reaching(self.settings):
            if self.broker.run_state(wf_id) is None:
                raise UnknownWorkflow(wf_id)
        return OutputReader(self.broker, self.settings, wf_id, task, after)

    def live_agents(self, agents: Iterable[str] = ()) -> set[str]:
        """The agents that have at least one worker whose lease has not lapsed (by Redis's clock): of
        those on the roster, and of `agents` (which may not be on it yet: a signing agent's worker asks
        the coordinators to put it there)."""
        with reaching(self.settings):
            now, leases = self.broker.worker_leases(agents, with_roster=True)
        return {str(info.get("agent")) for info in leases.values() if lease_alive(info, now)}

    def unserved(self, workflow: workflows.Workflow) -> list[dict[str, Any]]:
        """The agent commands of `workflow` that no live worker advertises (a typo, or a worker not
        started): `{"agent", "command", "tasks", "workers", "commands"}`, where `workers` counts the
        agent's live workers and `commands` lists what they serve. Empty while no worker lease is known
        at all: a fleet that starts after the work arrives is no mistake."""
        named = {task.agent for task in workflow.tasks.values() if task.agent}
        with reaching(self.settings):
            now, leases = self.broker.worker_leases(named, with_roster=True)
        if not leases:
            return []
        live = [info for info in leases.values() if lease_alive(info, now) and not info.get("stopping")]
        wanted: dict[tuple[str, str], list[str]] = {}
        for name, task in workflow.tasks.items():
            if task.agent and task.command:
                wanted.setdefault((task.agent, task.command), []).append(name)
        gaps = []
        for (agent, command), tasks in wanted.items():
            mine = [info for info in live if info.get("agent") == agent]
            if any("commands" not in info or command in info["commands"] for info in mine):
                continue  # a lease without `commands` may serve anything: it cannot say
            commands = sorted({c for info in mine for c in info["commands"]})
            gaps.append(
                {"agent": agent, "command": command, "tasks": tasks, "workers": len(mine), "commands": commands}
            )
        return gaps

    def list(self, limit: int = 50, states: Collection[str] = (), spend: bool = False) -> list[dict[str, Any]]:
        """Recent workflows, newest first, only those in `states` if any are named. Each row is
        `{"id", "name", "state", "created_at", "finished_at", "parent"}`; `parent` is `{"id", "task"}` for
        a child run that a `workflow:` task started, else null. With `spend`, rows add `"spend": {"tokens",
        "cost"}`, what the run spent (`ctx.spend`)."""
        with reaching(self.settings):
            return Views(self.broker).recent_workflows(limit, states, spend)


_SETTLED = 1.0  # seconds a cancel the run cannot show (its tasks ended already) waits for a refusal
_DLQ_EVERY, _DLQ_LOOK = 0.5, 20  # a retry waiting to be re-opened looks this often at this many dead letters
_WRITTEN = 10.0  # seconds a signed submit waits for the coordinators to write its run


def _dead_letter_row(entry_id: str, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": entry_id,
        "reason": record.get("reason"),
        "source": record.get("source"),
        "entry": record.get("entry"),
        "size": record.get("size", len(record.get("raw") or b"")),
        "truncated": bool(record.get("truncated")),
        **{k: record[k] for k in ("agent", "subscription", "chain") if k in record},
    }
