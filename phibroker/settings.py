"""Every tunable in one place: the broker's address, timeouts, limits and retention (env PHIBROKER_*)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from phibroker.keys import CLUSTER_SHARDS, Keys

MiB = 1024 * 1024
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # and the plain scheme of their nodes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PHIBROKER_", extra="ignore")

    # redis://HOST:PORT/DB (rediss:// for TLS), or a Redis Cluster from any of its nodes:
    # redis+cluster://HOST:PORT[,HOST:PORT...]/ (rediss+cluster:// for TLS)
    redis_url: str = "redis://localhost:6379/0"
    namespace: str = Field(default="phi", pattern=r"^[A-Za-z0-9_.-]+$")
    home: Path = Path("~/.phibroker").expanduser()

    # Identity: a worker signs what it sends with its agent's secret, a client (submit, cancel, retry,
    # signal) with its own; coordinators check them against the identities file (JSON: name -> role
    # and secret). Without that file, nothing is checked.
    agent_secret: str | None = None
    client_name: str = Field(default="client", pattern=r"^[A-Za-z0-9_.-]+$")
    client_secret: str | None = None
    identities: Path | None = None

    # Reads: blocking reads return as soon as anything arrives, so the block only bounds idle loops.
    worker_block: float = 1.0
    coordinator_block: float = 0.02  # also the timer resolution: timers fire within ~this of due
    batch_size: int = 500  # inbox entries a coordinator reads at once (each holds a worker's batch of results)
    bulk_slice: int = 32  # bulk-lane results a coordinator handles before it looks at the inbox again
    prefetch: int = 16  # entries a worker reads beyond its free slots

    # Liveness
    reclaim_after: float = 30.0  # a worker silent this long is presumed dead
    coordinator_takeover: float = 5.0  # a coordinator silent this long is presumed dead
    max_deliveries: int = 10  # deliveries of one task message before it is dead-lettered as `lost`
    stop_grace: float = 30.0  # SIGTERM: how long running handlers may finish
    cancel_grace: float = 30.0  # a run winding down waits this long for its stopped tasks to answer
    timer_claim: float = 10.0  # a claimed timer fires again if its coordinator dies before finishing it
    # how often a coordinator looks for tasks nobody holds (a Redis that lost its last writes), which
    # are dispatched again once they stayed so for two looks and `reclaim_after`
    reconcile_every: float = 5.0

    # Limits
    max_message_bytes: int = 1 * MiB
    bulk_after: int = 64  # a transition releasing more units than this for one agent uses its bulk lane
    # units one transition dispatches: keeps every script call short, and a big release from holding up
    # the inbox; more follow in the next transitions, on the bulk lanes
    max_release: int = 64
    max_children: int = 1000  # tasks one handler may spawn (ctx.spawn): a run's size stays bounded
    max_depth: int = 10  # how deep sub-workflow runs may nest (a run's child's child ...)
    storm_depth: int = 16  # events caused by events deeper than this go to the DLQ
    # bytes of handler chunks and log records one run's output stream takes (`ctx.stream`); past it,
    # more is refused and what is stored stays
    output_max_bytes: int = 64 * MiB

    # Retention
    retention: float = 7 * 24 * 3600.0  # seconds a finished workflow stays readable
    events_maxlen: int = 100_000
    events_max_age: float = 7 * 24 * 3600.0  # the log keeps events as long as finished runs stay readable
    events_max_bytes: int = 256 * MiB  # handlers' events can be big: a capped count alone does not cap memory
    stream_maxlen: int = 10_000  # past this length, task and inbox streams lose their acked entries
    trim_every: float = 10.0  # how often a coordinator trims them
    dead_worker_memory: float = 3600.0  # a dead worker stays listed by `agents` this long
    sub_maxlen: int = 10_000
    dlq_maxlen: int = 10_000

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace, CLUSTER_SHARDS if is_cluster_url(self.redis_url) else 1)

    @property
    def shown_url(self) -> str:
        """The Redis URL as logs and messages show it: its password as ***."""
        return without_password(self.redis_url)

    @property
    def lease_renew(self) -> float:
        """How often a lease is renewed: well within the time after which it is presumed dead."""
        return max(0.05, min(self.reclaim_after / 4, 2.0))


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def without_password(url: str) -> str:
    """`url` with its password as *** (a URL that does not parse is shown as it is)."""
    try:
        parts = urlsplit(url)
        if not parts.password:
            return url
    except ValueError:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))
