"""Redis ACL users for a production deployment: what each phibroker process may touch, and nothing more.

Pure: the rules are built from the namespace and the agent names with `keys.py`, and so are the files
`phibroker acl generate` writes — `users.acl` for `aclfile`, one `<user>.env` per user (Redis URL with
its credentials, namespace, and the secret its process signs with: an agent's results and reports, a
client's runs, cancels, retries and signals) and `identities.json` (name -> role and secret) for the
coordinators, which also holds the secret they sign their own messages with. No Redis here.

The users, by process: one per agent (its workers), `coordinator`, `client` (submit, cancel, retry,
signal, status, wait), `approver` (approvals, approve, reject), `watch` (read-only views) and `admin`
(operators: trust list, triggers, dead letters, killing a runaway script; its identity's role, `admin`,
is a client's that may cancel or retry any run, where a client's may only touch the runs it submitted).
Only `coordinator` and `admin` may load scripts: every other user may only call what is loaded.

How Redis decides: a command runs if the user's root permissions, or one of its selectors `(...)`,
allow the command *and* every key it names (`~` read and write, `%R~` read, `%W~` write only). So
shared keys get narrow selectors — an agent may XADD into another subscription's stream but never read,
ack or trim it — and each script's keys sit together in one selector (EVALSHA needs read and write on
every key it declares). The `{*}` patterns match one key of a workflow each: `NS:wf:{*}` only the meta
hash (a pattern ending in `}` cannot match `NS:wf:{ID}:results`), `NS:wf:{*}:tasks` only the unit states.

What agents write of a run is kept out of its meta hash (its spec, params, state and version), which
only coordinators and clients write: a worker's scripts keep their counters in the tasks hash (a
reclaim's `reclaims`, which moves the run's version as the commit script reads it; the output's
`output_bytes`), read the run's end there (`finished`), and a reaction's run goes to the coordinators as
a signed `submit` carrying its fields. What ACLs cannot do: tell a script's writes from direct ones (an
agent allowed to run START may also HSET a workflow's unit states directly), or limit a hash to some
fields (an agent's lease lives in the shared `NS:agents` hash). Forged outcomes and control messages
are stopped by signatures (the identities file), not here.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phibroker.errors import InvalidInput
from phibroker.keys import Keys

COORDINATOR, WATCH, ADMIN, CLIENT, APPROVER = "coordinator", "watch", "admin", "client", "approver"
RESERVED = frozenset({COORDINATOR, WATCH, ADMIN, CLIENT, APPROVER, "default"})
USERS_FILE, IDENTITIES_FILE = "users.acl", "identities.json"
IDENTITIES_PATH = "/etc/phibroker/identities.json"  # where coordinators read it (compose, k8s, systemd)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# Key-less commands every phibroker process sends: health checks, Redis's clock (leases, and TIME
# inside scripts), and INFO for the server's run id (a restart may have lost the last writes: workers
# re-read their pending entries).
BASICS = ("ping", "time", "script|exists", "info")
# Loading phibroker's scripts after a restart (EVALSHA answers NOSCRIPT): coordinators and the admin
# only. A user who may load a script may run any Lua, a runaway loop included (Redis then answers BUSY
# to everyone); the others wait for a coordinator to load them.
LOADER = (*BASICS, "script|load")
# A consumer of its own streams: read, ack, give back (requeue: MULTI/EXEC), reclaim from the dead.
CONSUMER = (
    "xreadgroup",
    "xack",
    "xadd",
    "xpending",
    "xclaim",
    "xautoclaim",
    "xgroup|create",
    "xgroup|delconsumer",
    "multi",
    "exec",
    "discard",
)
# Everything `status`, `list`, `watch`, `approvals`, `subs`, `dlq list|show` read; not one write.
READS = (
    "exists",
    "type",
    "hget",
    "hmget",
    "hgetall",
    "hlen",
    "hstrlen",
    "hexists",
    "hrandfield",
    "zrange",
    "zrevrange",
    "zrangebyscore",
    "zcard",
    "zscore",
    "zmscore",
    "lrange",
    "llen",
    "xrange",
    "xrevrange",
    "xread",
    "xlen",
    "xpending",
    "xinfo|stream",
    "xinfo|groups",
    "xinfo|consumers",
)


@dataclass(frozen=True)
class Grant:
    """Commands on keys: a user's root permissions, or one selector."""

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
class User:
    """One ACL user: who it is for, its root permissions and its selectors."""

    name: str
    role: str  # agent | coordinator | client | approver | watch | admin
    root: Grant
    selectors: tuple[Grant, ...] = ()
    agent: str | None = None

    def rules(self) -> list[str]:
        """The user's rules after `reset`: no password, no keys, no channels, no commands until granted."""
        return [*self.root.rules(), *("(" + " ".join(s.rules()) + ")" for s in self.selectors)]

    def line(self, password: str) -> str:
        """The `users.acl` line; it holds the SHA-256 of the password, never the password itself."""
        digest = hashlib.sha256(password.encode()).hexdigest()
        return " ".join(["user", self.name, "reset", "on", f"#{digest}", *self.rules()])


def agent_user(keys: Keys, agent: str, subscriptions: Iterable[str] = ()) -> User:
    """A worker of `agent`: its task stream and its subscriptions' streams and seen-sets (own keys), the
    START and OUTPUT scripts on workflow tasks/history/output, reads of the meta hash (never a write, nor
    results or outbox), XADD only into the results, events, DLQ, subscription and output streams, its
    lease, and the choreography tables. A reaction's run goes to the coordinators, who write it."""
    own = [
        f"~{keys.agent_tasks(agent)}",
        f"~{keys.agent_bulk(agent)}",
        f"~{keys.sub(agent + '.')}*",
    ]  # `AGENT.fn`: the default names
    for name in subscriptions:
        own += [f"~{keys.sub(name)}", f"~{keys.sub_seen(name)}"]
    return User(
        name=agent,
        role="agent",
        agent=agent,
        root=Grant(
            (*BASICS, *CONSUMER, "zmscore", "zadd", "zremrangebyscore", "subscribe"),
            tuple(own),
            (keys.agent_stops(agent),),  # its own stop notices only
        ),
        selectors=(
            # START (fencing) and OUTPUT (ctx.stream, log records, a task's start) and their counters
            # in the tasks hash; unit_states reads; nothing else of a workflow.
            Grant(
                ("evalsha", "exists", "hget", "hmget", "hset", "hincrby", "rpush", "xadd"),
                (f"~{keys.wf_tasks('*')}", f"~{keys.wf_history('*')}", f"~{keys.wf_output('*')}"),
            ),
            Grant(("hget", "hmget"), (f"%R~{keys.wf('*')}",)),  # the run's state: read, never written
            # Results, events, dead letters, routed copies and trigger starts: append only.
            Grant(
                ("xadd",),
                (
                    f"%W~{keys.results}",
                    f"%W~{keys.results_bulk}",
                    f"%W~{keys.events}",
                    f"%W~{keys.dlq}",
                    f"%W~{keys.sub('*')}",
                ),
            ),
            Grant(("evalsha", "hset", "hgetall", "hdel"), (f"~{keys.agents}",)),  # leases: LEASE, reclaim
            Grant(("hset", "hgetall"), (f"~{keys.subs}", f"%R~{keys.triggers}")),  # register; route
        ),
    )


def client_user(keys: Keys, name: str = CLIENT) -> User:
    """A submitter (`submit --wait`, `cancel`, `retry`, `signal`, `status`, `list`): reads the namespace,
    creates runs (the CREATE script and a new run's big fields), indexes them, appends to the inbox, and
    waits on a run's end. No script loading, no other writes."""
    return User(
        name=name,
        role=CLIENT,
        root=Grant((*BASICS, *READS, "multi", "exec", "discard"), (f"%R~{keys.namespace}:*",)),
        selectors=(
            # CREATE writes with HSET inside the script, and Redis checks a script's commands like direct
            # ones: a client may HSET a run's meta hash (signed runs are checked once, at their start)
            Grant(("evalsha", "hexists", "hset", "hsetnx"), (f"~{keys.wf('*')}",)),
            Grant(("zadd",), (f"%W~{keys.workflows}", f"%W~{keys.running}")),
            Grant(("xadd",), (f"%W~{keys.results}",)),
            Grant(("blmove",), (f"~{keys.wf_done('*')}",)),  # waking on a run's end, never consuming it
        ),
    )


def approver_user(keys: Keys) -> User:
    """`approvals`, `approve`, `reject`: reads the namespace and appends decisions to the inbox. The
    decision carries its approver's Ed25519 signature: the user only carries it."""
    return User(
        name=APPROVER,
        role=APPROVER,
        root=Grant(("ping", "time", *READS), (f"%R~{keys.namespace}:*",)),
        selectors=(Grant(("xadd",), (f"%W~{keys.results}",)),),
    )


def coordinator_user(keys: Keys) -> User:
    """Every workflow's keys and the coordinators' own tables; append-only into agent, subscription and
    event streams; read-only on subscriptions, triggers and the trust list; no worker leases."""
    ns = keys.namespace
    return User(
        name=COORDINATOR,
        role=COORDINATOR,
        root=Grant(
            (
                *LOADER,
                *CONSUMER,
                "evalsha",
                "exists",
                "expire",
                "persist",  # a retried run keeps its keys again (APPLY), and waiters wait for its next end
                "del",
                "hget",
                "hmget",
                "hgetall",
                "hset",
                "hsetnx",
                "hexists",
                "hdel",
                "hlen",
                "hincrby",
                "rpush",
                "lrange",
                "zadd",
                "zrem",
                "zrange",
                "zrevrange",
                "zrangebyscore",
                "zscore",
                "zmscore",
                "xlen",
                "xinfo|groups",
                "xrevrange",
                "xtrim",
                "publish",
            ),
            (
                f"~{ns}:wf:*",
                f"~{keys.results}",
                f"~{keys.results_bulk}",
                f"~{keys.timers}",
                f"~{keys.running}",
                f"~{keys.workflows}",
                f"~{keys.approvals}",
                f"~{keys.coordinators}",
                f"%W~{keys.dlq}",
                f"%R~{keys.subs}",
                f"%R~{keys.triggers}",
                f"%R~{keys.trusted_keys}",
            ),
            (keys.agent_stops("*"),),  # stop notices to every agent's workers
        ),
        selectors=(
            Grant(
                ("xadd", "xgroup|create"),
                (
                    f"%W~{keys.agent_tasks('*')}",
                    f"%W~{keys.agent_bulk('*')}",
                    f"%W~{keys.sub('*')}",
                    f"%W~{keys.events}",
                ),
            ),
            # XADD_MANY, a dispatch batch in one call. EVALSHA asks read and write on the keys it
            # declares, but the script's own XADDs are checked against the rules above: no reads.
            Grant(("evalsha",), (f"~{keys.agent_tasks('*')}", f"~{keys.agent_bulk('*')}")),
            # Trimming what workers acked, forgetting long-dead workers (Maintenance.trim), and finding
            # the tasks nobody holds (Reconciler: which dispatches are pending or unread).
            Grant(
                ("xlen", "xinfo|groups", "xpending", "xtrim", "xrange"),
                (f"~{keys.agent_tasks('*')}", f"~{keys.agent_bulk('*')}"),
            ),
            Grant(("hgetall", "hdel"), (f"~{keys.agents}",)),
            Grant(("set", "get"), (f"~{keys.applied('*', '*')}",)),  # the control messages applied, until they expire
            Grant(("xtrim", "memory|usage"), (f"%W~{keys.events}",)),  # the log's age and size bounds
        ),
    )


def watch_user(keys: Keys) -> User:
    """`watch`, `status`, `list`, `approvals`, `subs`: read commands on read-only keys — no writes at all."""
    return User(name=WATCH, role=WATCH, root=Grant(("ping", "time", *READS), (f"%R~{keys.namespace}:*",)))


def admin_user(keys: Keys) -> User:
    """Operators: `keys trust`, `triggers add|remove`, `dlq`, and submit, cancel, approve (with a
    client identity of its own) — data commands on the namespace's keys, and SCRIPT KILL / FUNCTION
    KILL for a runaway script, SCRIPT FLUSH so nobody calls it again (coordinators load phibroker's
    scripts again); no FLUSHALL, CONFIG, KEYS, SCAN, ACL or SHUTDOWN."""
    writes = (
        "xadd",
        "xdel",
        "xack",
        "xgroup|create",
        "hset",
        "hsetnx",
        "hdel",
        "zadd",
        "zrem",
        "del",
        "blmove",
        "evalsha",
    )
    return User(
        name=ADMIN,
        role=ADMIN,
        # SCRIPT KILL: a runaway script makes Redis answer BUSY to everyone until someone stops it
        root=Grant(
            (*LOADER, *READS, *writes, "multi", "exec", "discard", "script|kill", "script|flush", "function|kill"),
            (f"~{keys.namespace}:*",),
        ),
    )


# -- the files ---------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """What `acl generate` writes: file name -> text, plus the users and secrets it was made from."""

    users: list[User]
    passwords: dict[str, str]
    agent_secrets: dict[str, str]
    identities: dict[str, dict[str, object]] = field(default_factory=dict)  # identities.json: name -> role, secret
    files: dict[str, str] = field(default_factory=dict)


def check_name(name: str, what: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"{what} {name!r}: use letters, digits, '_', '.', '-'")
    return name


def parse_agents(text: str | Sequence[str]) -> list[str]:
    """`webc,dc,vssc` (or a list of such) -> unique names, in order; reserved or clashing names refused."""
    parts = [text] if isinstance(text, str) else list(text)
    agents: list[str] = []
    for part in parts:
        for name in (n.strip() for n in part.split(",")):
            if name and name not in agents:
                agents.append(check_name(name, "agent"))
    if not agents:
        raise InvalidInput("--agents: name at least one agent")
    for name in agents:
        if name in RESERVED:
            taken = ", ".join(sorted(RESERVED))
            raise InvalidInput(f"agent {name!r}: that name is taken by a phibroker user ({taken})")
        # `NS:sub:A.*` would also match the default subscription names of an agent called `A.x`.
        clash = next((other for other in agents if other != name and other.startswith(name + ".")), None)
        if clash:
            raise InvalidInput(f"agents {name!r} and {clash!r}: one name must not start with the other and a dot")
    return agents


def parse_subscriptions(items: Iterable[str], agents: Sequence[str]) -> dict[str, list[str]]:
    """`AGENT=NAME` options (subscriptions named other than `AGENT.function`) -> agent -> names."""
    out: dict[str, list[str]] = {agent: [] for agent in agents}
    for item in items:
        agent, sep, name = item.partition("=")
        if not sep or agent not in out:
            raise InvalidInput(f"--subscription {item!r}: use AGENT=NAME with one of the --agents")
        out[agent].append(check_name(name, "subscription"))
    return out


def generate(
    namespace: str,
    agents: Sequence[str],
    host: str = "localhost",
    port: int = 6379,
    tls: bool = False,
    identities_path: str = IDENTITIES_PATH,
    subscriptions: Mapping[str, Sequence[str]] | None = None,
    token: Callable[[], str] | None = None,
    submitters: Sequence[str] = (),
) -> Bundle:
    """Users for these agents plus coordinator, client, approver, watch and admin, with fresh random
    passwords and secrets, and the text of every file. `submitters`: agents whose reactions submit runs
    (their identity is a client's too). `token` makes secrets (tests pass a fixed one)."""
    keys = Keys(check_name(namespace, "namespace"))
    make = token or (lambda: secrets.token_urlsafe(32))
    subs = subscriptions or {}
    unknown = [a for a in submitters if a not in agents]
    if unknown:
        raise InvalidInput(f"--submitter {unknown[0]!r}: name one of the --agents")
    users = [agent_user(keys, a, subs.get(a, ())) for a in agents]
    users += [coordinator_user(keys), client_user(keys), approver_user(keys), watch_user(keys), admin_user(keys)]
    bundle = Bundle(users, {u.name: make() for u in users}, {a: make() for a in agents})
    for agent, secret in bundle.agent_secrets.items():
        bundle.identities[agent] = {"role": ["agent", "client"] if agent in submitters else "agent", "secret": secret}
    for name, role in ((CLIENT, "client"), (ADMIN, "admin"), (COORDINATOR, "coordinator")):
        bundle.identities[name] = {"role": role, "secret": make()}
    # The default user can do nothing and cannot log in (`resetpass` also drops `nopass`, so
    # protected mode stays meaningful); every process authenticates as its own user.
    lines = ["user default reset off resetpass"] + [u.line(bundle.passwords[u.name]) for u in users]
    bundle.files[USERS_FILE] = "\n".join(lines) + "\n"
    scheme = "rediss" if tls else "redis"
    for user in users:
        url = f"{scheme}://{user.name}:{bundle.passwords[user.name]}@{host}:{port}/0"
        env = [
            f"# phibroker: Redis ACL user {user.name!r} ({user.role}). Secret: keep it mode 600.",
            f"PHIBROKER_REDIS_URL={url}",
            f"PHIBROKER_NAMESPACE={namespace}",
        ]
        if user.agent is not None:
            env.append(f"PHIBROKER_AGENT_SECRET={bundle.agent_secrets[user.agent]}")
        if user.role == COORDINATOR:  # its own secret is in the identities file
            env.append(f"PHIBROKER_IDENTITIES={identities_path}")
        elif user.name in bundle.identities and user.agent is None:  # a client identity: client, admin
            own = bundle.identities[user.name]["secret"]
            env += [f"PHIBROKER_CLIENT_NAME={user.name}", f"PHIBROKER_CLIENT_SECRET={own}"]
        bundle.files[f"{user.name}.env"] = "\n".join(env) + "\n"
    bundle.files[IDENTITIES_FILE] = json.dumps(bundle.identities, indent=2) + "\n"
    return bundle


def write(directory: Path, bundle: Bundle, force: bool = False) -> list[Path]:
    """Write the files; existing ones are kept unless `force`. The env files and identities.json are
    secrets (mode 600); users.acl holds only SHA-256 hashes of 256-bit passwords, so it is 644: the
    Redis container's own user must read it."""
    directory.mkdir(parents=True, exist_ok=True)
    targets = [directory / name for name in bundle.files]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise InvalidInput(f"{existing[0]} exists; pass --force to replace every file (new passwords)")
    for path in targets:
        mode = 0o644 if path.name == USERS_FILE else 0o600
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(bundle.files[path.name])
        path.chmod(mode)
    return targets


def describe(users: Iterable[User]) -> list[str]:
    """One line per user: its name, role and rules (for `acl generate` and the docs)."""
    return [f"{u.name} ({u.role}): {' '.join(u.rules())}" for u in users]
