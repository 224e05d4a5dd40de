"""Every error phibroker raises on purpose: one root, typed subclasses with the fields a user acts on."""

from __future__ import annotations

from typing import Any


class PhibrokerError(Exception):
    """Root of every error phibroker raises on purpose."""

    exit_code = 3


class InvalidInput(PhibrokerError):
    """The user gave something phibroker cannot use (a file, an id, a flag)."""

    exit_code = 2


class WorkflowFileError(InvalidInput):
    """A workflow file is not valid; the message names the place and the problem."""


class CycleError(WorkflowFileError):
    """The dependencies form a cycle."""

    def __init__(self, path: list[str]):
        self.path = path
        super().__init__("dependency cycle: " + " -> ".join(path))


class IncludeCycleError(WorkflowFileError):
    """Sub-workflow files include each other (or one includes itself)."""

    def __init__(self, chain: list[str]):
        self.chain = chain
        super().__init__("sub-workflow files include themselves: " + " -> ".join(chain))


class UnknownDependencyError(WorkflowFileError):
    """A task depends on a task that does not exist."""

    def __init__(self, task: str, missing: str, suggestion: str | None = None):
        self.task, self.missing, self.suggestion = task, missing, suggestion
        hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
        super().__init__(f"task {task!r}: depends on unknown task {missing!r}{hint}")


class ExpressionError(WorkflowFileError):
    """An expression or a `${...}` template does not parse."""

    def __init__(self, source: str, reason: str, position: int | None = None):
        self.source, self.reason, self.position = source, reason, position
        where = f" at column {position + 1}" if position is not None else ""
        super().__init__(f"bad expression {source!r}{where}: {reason}")


class UnknownWorkflow(InvalidInput):
    """No workflow with that id is stored."""

    def __init__(self, workflow_id: str):
        self.workflow_id = workflow_id
        super().__init__(f"no workflow with id {workflow_id!r}")


class ApprovalError(InvalidInput):
    """An approval request is unknown, already decided, or may not be decided by this key."""


class SignatureError(InvalidInput):
    """A signature is missing, forged, expired or made by an untrusted key."""


class MessageTooLarge(PhibrokerError):
    """A message or result exceeds the configured size limit."""

    def __init__(self, what: str, size: int, limit: int):
        self.what, self.size, self.limit = what, size, limit
        super().__init__(f"{what} is {size} bytes, over the {limit}-byte limit")


class OutputRefused(PhibrokerError):
    """`ctx.stream` could not append: the run's output is full (`output_max_bytes`), or the run is gone.
    What the stream already holds stays."""


class BudgetExhausted(PhibrokerError):
    """Raised by the `ctx.spend` call that passes a `fail` budget (the task's or the run's): the task
    is asked to stop and fails with this line (`budget_exhausted: tokens 120512 > 100000`), and no
    `retry_on` retries it."""


class DecodeError(PhibrokerError):
    """A stream entry could not be decoded into a valid message."""

    def __init__(self, raw: Any, reason: str):
        self.raw, self.reason = raw, reason
        super().__init__(f"undecodable message: {reason}")


class BrokerUnavailable(PhibrokerError):
    """Redis could not be reached, or it failed."""

    exit_code = 3

    def __init__(self, message: str, for_now: bool = False):
        super().__init__(message)
        self.for_now = for_now  # it answered "not now" (BUSY, LOADING, OOM, ...): waiting may do


class Retryable(Exception):  # noqa: N818 - a signal to try again, not an error to report
    """Raised by a handler to ask for another attempt while attempts remain."""
