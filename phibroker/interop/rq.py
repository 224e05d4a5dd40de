"""The RQ bridge: an agent whose commands run as RQ jobs (`phibroker rq-bridge`).

The bridge is an ordinary `Worker` whose agent's handlers are generated from `--map command=module.function`
pairs, so fetching, fencing tokens, leases, reclaim, settling and dead letters are the worker's. A handler
enqueues its task as an RQ job and waits for the job's outcome:

- The payload becomes the job's keyword arguments; the phibroker ids (namespace, workflow, task, unit,
  dispatch id, attempt, token, partition, inputs, deadline) go to `job.meta["phibroker"]`.
- The job id is derived from the dispatch id (`phi-<namespace>-<dispatch>`) and the job is enqueued with
  `unique=True`. A bridge killed mid-flight leaves its task unacked; whoever reclaims the entry (a restarted
  bridge, or another one) computes the same id, finds the existing job and waits for it instead of
  enqueueing it again. Jobs are kept `KEEP` seconds after they end, the window for finding them again.
- phibroker owns retries. Jobs are enqueued without an RQ `Retry`; one attempt is one job. A failed job
  fails the attempt with the job's own `Type: message`, so `retry_on` matches as for any handler, and a job
  that raises `phibroker.Retryable` retries while attempts remain. The next attempt is a new dispatch, hence
  a new job.
- Outcomes: the bridge blocks on the job's RQ result stream (XREAD), which wakes it as soon as the job
  ends. The job's callbacks run in the RQ worker: `on_failure` records the exact exception type, message,
  traceback and whether it is retryable in `job.meta` (RQ's `exc_string` is only text); `on_success`
  checks that the return value fits phibroker's wire format (msgpack, size limit), so a result phibroker
  cannot carry fails the RQ job too and both sides agree. RQ workers therefore need `phibroker`
  importable (it is where the callbacks live); without it every job fails with that ImportError. Where
  no note was made, the error is parsed from the job's latest result (`job.latest_result().exc_string`).
- The registries are the fallback for jobs whose RQ worker died. Such a job stays STARTED until its
  heartbeat runs out, which RQ sets to the job monitoring interval + 60 s (90 s by default). While it
  waits on a STARTED job the bridge runs `StartedJobRegistry.cleanup()` every few seconds (RQ's own
  workers do it only every 10 minutes), which moves an expired job to the FailedJobRegistry with
  `AbandonedJobError`; the bridge fails the attempt with that error, as retryable (a lost RQ worker is
  transient, like a lost phibroker worker). Meanwhile the bridge keeps its lease (the worker heartbeat
  runs while handlers wait), so the phibroker task is not reclaimed, and the task's `timeout` still
  applies: at the deadline the task fails as `timeout` and the bridge stops the job.
- When the workflow no longer wants the attempt (cancelled, superseded, timed out), the bridge cancels
  the job if it is still queued, or sends RQ's stop-job command if it runs.
- The job's RQ timeout is what remains of the task's deadline (none without one).

The bridge speaks to RQ through a phibroker `Connection` (the phibroker Redis, or `--rq-redis`).
Module-level imports stay light: the callbacks are imported in every RQ work horse.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from rq import Callback, Queue
from rq.command import send_stop_job_command
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.timeouts import BaseDeathPenalty

from phibroker.errors import InvalidInput, Retryable

if TYPE_CHECKING:
    from phibroker.runtime.agent import Context
    from phibroker.runtime.worker import Worker
    from phibroker.settings import Settings
    from phibroker.store.connection import Connection

log = logging.getLogger("phibroker.rqbridge")

META = "phibroker"  # the job.meta key holding the phibroker ids and the failure note
KEEP = 24 * 3600  # seconds a finished or failed job (and its result) stays findable by a restarted bridge
WAIT = 1  # seconds one blocking read of a job's result stream lasts (also the cancellation latency)
SWEEP_EVERY = 5.0  # seconds between two StartedJobRegistry cleanups of one queue
ABANDONED = "AbandonedJobError"

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_FUNCTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?:: (.*))?$")

T = TypeVar("T")


# -- errors the handlers raise: the worker turns them into the attempt's error ------------------------


class RQJobError(Exception):
    """An RQ job failed; `job_error` raises a subclass named after the job's own exception type."""


class JobStopped(Exception):  # noqa: N818 - the error a workflow shows
    """The RQ job was stopped or cancelled (by the bridge, for a task the workflow no longer wants, or in RQ)."""


class JobLost(Retryable):
    """The RQ job disappeared (deleted, or expired from Redis) before it had an outcome."""


def job_error(kind: str, message: str, retryable: bool, trace: str, job_id: str) -> Exception:
    """An exception whose `Type: message` is the RQ job's; RQ's traceback rides along as a note."""
    base: type[Exception] = Retryable if retryable else RQJobError
    cls = type(kind or "RQJobError", (base,), {"__module__": "rq.job"})
    exc = cls(message)
    if trace:
        exc.add_note(f"RQ job {job_id}:\n{trace.rstrip()}")
    return exc


def parse_exc_string(text: str) -> tuple[str, str]:
    """`(type, message)` from RQ's `exc_string`: the exception after the last traceback frame.

    An abandoned job's `exc_string` is a sentence (`Moved to FailedJobRegistry, due to AbandonedJobError,
    at ...`), not a traceback.
    """
    text = (text or "").strip()
    if not text:
        return "RQJobError", "the RQ job failed without an error text"
    if ABANDONED in text and "Traceback" not in text:
        return ABANDONED, text
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith((" ", "\t"))]
    tail = lines[frames[-1] + 1 :] if frames else lines
    tail = [line for line in tail if line.strip()] or lines[-1:]
    match = _EXCEPTION_LINE.match(tail[0])
    if not match:
        return "RQJobError", "\n".join(tail)
    kind = match.group(1).rsplit(".", 1)[-1]
    message = "\n".join([match.group(2) or "", *tail[1:]]).strip()
    return kind, message


# -- callbacks: run in the RQ worker (work horse, or a registry cleanup) -------------------------------


def on_job_success(job: Job, connection: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    """Refuse a return value phibroker could not carry: raising here makes RQ record the job as failed."""
    from phibroker import wire

    limit = int((job.meta.get(META) or {}).get("limit") or 1024 * 1024)
    wire.pack_limited(result, limit, f"result of RQ job {job.id}")


def on_job_failure(job: Job, connection: Any, exc_type: Any, exc_value: Any, tb: Any, *args: Any, **kw: Any) -> None:
    """Keep the exact error in `job.meta` for the bridge; never raises (RQ would record that instead)."""
    try:
        kind = getattr(exc_type, "__name__", None) or type(exc_value).__name__
        retryable = isinstance(exc_type, type) and issubclass(exc_type, Retryable)
        message = str(exc_value) if exc_value is not None else ""
        if kind == ABANDONED:
            retryable = True
            message = message or "the RQ worker running this job stopped sending heartbeats (it died)"
        trace = ""
        if exc_value is not None:
            trace = "".join(traceback.format_exception(exc_type, exc_value, tb))[-8000:]
        note = {"type": kind, "message": message, "retryable": retryable, "traceback": trace, "at": time.time()}
        meta = job.meta.get(META)
        if not isinstance(meta, dict):
            meta = job.meta[META] = {}
        meta["error"] = note
        job.save_meta()
    except Exception:  # noqa: BLE001 - the fallback (exc_string) still tells the bridge
        log.exception("could not record the failure of RQ job %s", getattr(job, "id", "?"))


class _NoDeathPenalty(BaseDeathPenalty):
    """Callbacks run from the bridge's own registry cleanup are ours and short: no SIGALRM off the main thread."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


# -- names --------------------------------------------------------------------------------------------


def job_id_for(namespace: str, dispatch: str) -> str:
    """The RQ job id of one dispatch: the same on every delivery of that dispatch, unique across namespaces."""
    return f"phi-{_UNSAFE.sub('_', namespace)}-{_UNSAFE.sub('_', dispatch)}"


def parse_map(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`command=module.function` (or `module.function`, named after the function) -> {command: function}."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        command, sep, function = pair.partition("=")
        command, function = command.strip(), function.strip()
        if not sep:
            command, function = command.rsplit(".", 1)[-1], command
        if not _NAME.match(command):
            raise InvalidInput(f"--map {pair!r}: {command!r} is not a command name ([A-Za-z0-9_.-]+)")
        if not _FUNCTION.match(function):
            raise InvalidInput(f"--map {pair!r}: {function!r} is not a dotted module.function path")
        if command in mapping and mapping[command] != function:
            raise InvalidInput(f"--map: command {command!r} is mapped twice ({mapping[command]}, {function})")
        mapping[command] = function
    if not mapping:
        raise InvalidInput("give at least one --map command=module.function")
    return mapping


# -- the bridge ---------------------------------------------------------------------------------------


class Bridge:
    """A `Worker` for agent NAME whose commands enqueue RQ jobs on QUEUE and wait for their outcome."""

    def __init__(
        self,
        agent: str,
        queue: str,
        mapping: dict[str, str],
        settings: Settings,
        concurrency: int = 16,
        rq_redis_url: str | None = None,
        keep: int = KEEP,
    ):
        from phibroker.runtime.agent import Agent
        from phibroker.runtime.worker import Worker
        from phibroker.store.connection import CONNECTION_ERRORS, Connection

        self.settings = settings
        self.mapping = dict(mapping)
        self.keep = keep
        self.agent = Agent(agent)
        for command, function in self.mapping.items():
            self.agent.command(command)(self._handler(command, function))
        self.worker: Worker = Worker(self.agent, settings, concurrency=concurrency)
        self.rq_broker: Connection = self.worker.broker
        if rq_redis_url:
            self.rq_broker = Connection(settings.model_copy(update={"redis_url": rq_redis_url}))
        self.connection = self.rq_broker.redis
        self.queue = Queue(queue, connection=self.connection)
        self.connection_errors: tuple[type[BaseException], ...] = CONNECTION_ERRORS
        self._lock = threading.Lock()
        self._next_sweep: dict[str, float] = {}

    # -- running --------------------------------------------------------------------------------------
    def work(self, burst: bool = False) -> bool:
        """Run the worker loop; False when jobs were still awaited at the end of the grace period."""
        self.rq_broker.ping()
        log.info(
            "rq-bridge: agent %s -> RQ queue %s (%s)",
            self.agent.name,
            self.queue.name,
            ", ".join(f"{c}={f}" for c, f in self.mapping.items()),
        )
        return self.worker.work(burst=burst)

    def stop(self) -> None:
        self.worker.stop()

    def _handler(self, command: str, function: str) -> Callable[..., Any]:
        def handler(ctx: Context, **payload: Any) -> Any:
            return self.run(function, ctx, payload)

        handler.__name__ = handler.__qualname__ = command
        handler.__doc__ = f"{command}: runs {function} as an RQ job"
        return handler

    def run(self, function: str, ctx: Context, payload: dict[str, Any]) -> Any:
        """One attempt: find or enqueue its job, then wait for the job's outcome."""
        dispatch = self.dispatch_of(ctx)
        job_id = job_id_for(self.settings.namespace, dispatch)
        job = self._retrying(ctx, lambda: self.submit(job_id, function, ctx, dispatch, payload))
        return self.wait(job, ctx)

    def dispatch_of(self, ctx: Context) -> str:
        """The dispatch id of the attempt `ctx` belongs to.

        `ctx.dispatch_id` once the worker sets it; until then it is read from the worker's running table
        (filled before the handler is submitted). Failing both, a digest of workflow, unit and attempt,
        which also names exactly one dispatch (every dispatch of a unit has its own attempt number).
        """
        dispatch = getattr(ctx, "dispatch_id", None)
        if dispatch:
            return str(dispatch)
        for _ in range(3):
            try:
                for running in list(self.worker.running.values()):
                    if running.ctx is ctx:
                        return running.item.message.id
                break
            except RuntimeError:  # the table changed size while we looked
                continue
        key = f"{ctx.workflow_id}\0{ctx.unit}\0{ctx.attempt}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def submit(self, job_id: str, function: str, ctx: Context, dispatch: str, payload: dict[str, Any]) -> Job:
        """Enqueue the attempt's job once: a job with its id already there is the one to wait for."""
        while True:
            try:
                job = Job.fetch(job_id, connection=self.connection)
            except NoSuchJobError:
                pass
            else:
                log.info(
                    "found RQ job %s (%s) of %s/%s attempt %d: waiting for it",
                    job_id,
                    job.get_status(refresh=False).value,
                    ctx.workflow_id,
                    ctx.unit,
                    ctx.attempt,
                )
                return job
            try:
                job = self.queue.enqueue_call(
                    function,
                    kwargs=payload,
                    job_id=job_id,
                    unique=True,
                    meta={META: self._meta(ctx, dispatch)},
                    description=f"phibroker {ctx.workflow_id}/{ctx.unit} attempt {ctx.attempt}: {function}",
                    timeout=self._timeout(ctx),
                    result_ttl=self.keep,
                    failure_ttl=self.keep,
                    on_success=Callback(on_job_success),
                    on_failure=Callback(on_job_failure),
                )
            except DuplicateJobError:
                continue  # enqueued meanwhile (a redis-py retry, or another bridge): fetch it
            log.info(
                "enqueued RQ job %s: %s for %s/%s attempt %d", job_id, function, ctx.workflow_id, ctx.unit, ctx.attempt
            )
            return job

    def _meta(self, ctx: Context, dispatch: str) -> dict[str, Any]:
        return {
            "namespace": self.settings.namespace,
            "workflow": ctx.workflow_id,
            "task": ctx.task,
            "unit": ctx.unit,
            "dispatch": dispatch,
            "attempt": ctx.attempt,
            "token": ctx.token,  # the fencing token of the attempt that enqueued the job
            "agent": ctx.agent,
            "command": ctx.command,
            "partition": list(ctx.partition) if ctx.partition else None,
            "inputs": ctx.inputs,
            "deadline": ctx.deadline,
            "limit": self.settings.max_message_bytes,
        }

    @staticmethod
    def _timeout(ctx: Context) -> int:
        """RQ's timeout: what remains of the task's deadline, else none (-1)."""
        if ctx.deadline is None:
            return -1
        return max(1, math.ceil(ctx.deadline - time.time()))

    def wait(self, job: Job, ctx: Context) -> Any:
        """Block until the job has an outcome; stop it when the workflow no longer wants this attempt."""
        while True:
            if ctx.cancelled:
                self._retrying(None, lambda: self.stop_job(job))
                raise JobStopped(f"RQ job {job.id} stopped: the workflow no longer wants this attempt")
            done, value = self._retrying(ctx, lambda: self.poll(job))
            if done:
                return value
            ctx.heartbeat()

    def poll(self, job: Job) -> tuple[bool, Any]:
        """`(True, value)` once the job succeeded; raises once it failed; else waits up to `WAIT` seconds."""
        try:
            status = job.get_status(refresh=True)
        except InvalidJobOperation:
            raise JobLost(f"RQ job {job.id} disappeared from Redis before it had an outcome") from None
        if status == JobStatus.FINISHED:
            return True, job.return_value(refresh=True)
        if status == JobStatus.FAILED:
            raise self.failure_of(job)
        if status in (JobStatus.STOPPED, JobStatus.CANCELED):
            raise JobStopped(f"RQ job {job.id} was {status.value} in RQ")
        if status == JobStatus.STARTED:
            self.sweep(job.origin)
        began = time.monotonic()
        job.latest_result(timeout=WAIT)  # XREAD on the job's result stream: wakes as soon as it ends
        if time.monotonic() - began < WAIT / 4:
            time.sleep(0.1)  # a result without a final status (a moment between two writes): don't spin
        return False, None

    def failure_of(self, job: Job) -> Exception:
        """The job's error: the callback's note where there is one, else parsed from RQ's `exc_string`."""
        note = (job.get_meta(refresh=True).get(META) or {}).get("error")
        result = job.latest_result()
        text = (result.exc_string if result is not None else None) or ""
        if isinstance(note, dict) and note.get("type"):
            kind, message = str(note["type"]), str(note.get("message") or "")
            retryable, trace = bool(note.get("retryable")), str(note.get("traceback") or text)
        else:
            kind, message = parse_exc_string(text)
            retryable, trace = kind in (ABANDONED, "Retryable"), text
        if kind == ABANDONED:
            retryable = True
        log.info("RQ job %s failed: %s: %s", job.id, kind, message.splitlines()[0] if message else "")
        return job_error(kind, message, retryable, trace, job.id)

    def stop_job(self, job: Job) -> None:
        """Cancel the job if it waits in its queue; ask its RQ worker to stop it if it runs."""
        try:
            status = job.get_status(refresh=True)
            if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                job.cancel()
                log.info("cancelled RQ job %s", job.id)
            elif status == JobStatus.STARTED:
                send_stop_job_command(self.connection, job.id)
                log.info("asked RQ to stop job %s", job.id)
        except (InvalidJobOperation, NoSuchJobError) as exc:
            log.info("RQ job %s not stopped: %s", job.id, exc)

    def sweep(self, queue: str) -> None:
        """Move jobs whose RQ worker died (heartbeat expired) to the FailedJobRegistry, at most every few seconds."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_sweep.get(queue, 0.0):
                return
            self._next_sweep[queue] = now + SWEEP_EVERY
        registry = StartedJobRegistry(queue, connection=self.connection, death_penalty_class=_NoDeathPenalty)
        registry.cleanup()

    def _retrying(self, ctx: Context | None, call: Callable[[], T]) -> T:
        """Run `call`, riding out Redis blips (the job does not care); give up once the attempt is cancelled."""
        delay = 0.1
        while True:
            try:
                return call()
            except self.connection_errors as exc:
                if ctx is not None and ctx.cancelled:
                    raise JobStopped("the workflow no longer wants this attempt (RQ's Redis unreachable)") from None
                if ctx is None and delay > 2:
                    raise
                log.warning("RQ's Redis unreachable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
