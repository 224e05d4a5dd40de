"""What a Redis user may do, as data: grants of commands on keys and channels.

Each store role declares the grants its code needs, beside that code (`access` in `store/worker.py`,
`coordinator.py`, `client.py`, `views.py`, `registry.py`); `phibroker acl generate` makes the Redis user
of each process from its role's grants (`security/acl.py`, which is handed them as `Roles`: security
does not import the store). A test reads the roles' code and fails on a command it sends that its
declaration leaves out. Pure: no Redis here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from phibroker.keys import Keys

# Key-less commands every process sends on its connection: health checks (PING, and INFO for the
# server's run id and whether it is a cluster node) and Redis's clock (leases, `clocked` reads).
BASICS = ("ping", "time", "info")
# What a consumer of streams sends through its connection: read, ack, give back (a requeue is one
# MULTI/EXEC), reclaim from the dead, make its group and leave it.
CONSUMER = ("xreadgroup", "xack", "xadd", "xpending", "xclaim", "xgroup|create", "xgroup|delconsumer", "multi", "exec")


@dataclass(frozen=True)
class Grant:
    """Commands on keys: a user's root permissions, or one selector. A grant that names no key or
    channel holds commands that take none (PING, MULTI): they join the user's root."""

    commands: tuple[str, ...]
    keys: tuple[str, ...] = ()  # ACL key patterns with their prefix: `~k`, `%R~k`, `%W~k`
    channels: tuple[str, ...] = ()  # pub/sub channel patterns (stop notices)

    def rules(self) -> list[str]:
        return [
            *self.keys,
            *(f"&{channel}" for channel in self.channels),
            *(f"+{command}" for command in self.commands),
        ]


@dataclass(frozen=True)
class Roles:
    """Each Redis user's grants, as the store roles its process runs declare them."""

    agent: Callable[[Keys, str, Sequence[str]], list[Grant]]  # an agent's workers (agent, its subscriptions)
    coordinator: Callable[[Keys], list[Grant]]
    client: Callable[[Keys], list[Grant]]  # submit, cancel, retry, signal, status, wait
    approver: Callable[[Keys], list[Grant]]  # approvals, approve, reject
    watch: Callable[[Keys], list[Grant]]  # the read-only views
    admin: Callable[[Keys], list[Grant]]  # trust list, triggers, dead letters, and a client's commands
