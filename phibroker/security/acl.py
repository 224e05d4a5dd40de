"""Redis ACL users for a production deployment: what each phibroker process may touch, and nothing more.

The rules are not written here: each store role declares the grants its code needs, beside that code
(`access` in `store/worker.py`, `coordinator.py`, `client.py`, `views.py`, `registry.py`;
`tests/test_acl_declarations.py` fails on a command a role sends that its declaration leaves out), and
`generate` is handed them as `Roles` (security does not import the store) and makes the users of them.
Pure: the files `phibroker acl generate` writes are made here too — `users.acl` for `aclfile`, one
`<user>.env` per user (Redis URL with its credentials, namespace, and the secret its process signs
with: an agent's results and reports, a client's runs, cancels, retries and signals) and
`identities.json` (name -> role and secret) for the coordinators, which also holds the secret they sign
their own messages with. No Redis here.

The users, by process: one per agent (its workers), `coordinator`, `client` (submit, cancel, retry,
signal, status, wait), `approver` (approvals, approve, reject), `watch` (read-only views) and `admin`
(operators: trust list, triggers, dead letters, killing a runaway script; its identity's role, `admin`,
is a client's that may cancel or retry any run, where a client's may only touch the runs it submitted).
Only `coordinator` and `admin` may load scripts or run Lua of their own: every other user may only call
what is loaded, by its SHA (`EVAL_RO` would run any text, a loop that never ends too). A user's
first grant is its root permissions, with every grant that names no key (PING, MULTI); the others are
its selectors, one per set of keys and channels.

How Redis decides: a command runs if the user's root permissions, or one of its selectors `(...)`,
allow the command *and* every key it names (`~` read and write, `%R~` read, `%W~` write only). So
shared keys get narrow selectors — an agent may XADD into another subscription's stream but never read,
ack or trim it — and each script's keys sit together in one selector (EVALSHA needs read and write on
every key it declares). The `{*}` patterns match one key of a workflow each: `NS:wf:{*}` only the meta
hash (a pattern ending in `}` cannot match `NS:wf:{ID}:results`), `NS:wf:{*}:tasks` only the unit
states, `NS:wf:{*}:marks:AGENT` only that agent's start marks of a run.

An agent writes no key of a run but its own: the start marks of its units (`NS:wf:{ID}:marks:AGENT`),
the attempts its workers reclaimed (`:lost:AGENT`) and its output (`:output:AGENT`, with the bytes it
holds, `:output-bytes:AGENT`): what an agent trims or ends there is its own. It reads the rest: its
start script checks the unit's dispatch and the run's end in the tasks hash, which it does not declare
(a script's declared keys need write permission). Coordinators read a unit's mark only from its own agent's hash, and a
reaction's run goes to them as a signed `submit` carrying its fields. What ACLs cannot do: tell a
script's writes from direct ones (an agent allowed to run START may also HSET its own marks directly),
or limit a hash to some fields, so each agent's workers' leases are a hash of their own
(`NS:{agents}:AGENT`), and a lease counts only in the hash of the agent its worker's name says. Forged outcomes
and control messages are stopped by signatures (the identities file), not here.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from phibroker.errors import InvalidInput
from phibroker.grants import Grant, Roles
from phibroker.keys import CLUSTER_SHARDS, Keys

COORDINATOR, WATCH, ADMIN, CLIENT, APPROVER = "coordinator", "watch", "admin", "client", "approver"
RESERVED = frozenset({COORDINATOR, WATCH, ADMIN, CLIENT, APPROVER, "default"})
USERS_FILE, IDENTITIES_FILE = "users.acl", "identities.json"
IDENTITIES_PATH = "/etc/phibroker/identities.json"  # where coordinators read it (compose, k8s, systemd)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# What operators do by hand as `admin`, which no phibroker code sends: SCRIPT KILL / FUNCTION KILL for
# a runaway script (Redis answers BUSY to everyone until someone stops it), SCRIPT FLUSH so nobody calls
# it again, SCRIPT LOAD of phibroker's own (coordinators load them too) and EVALSHA. A user who may load
# a script may run any Lua, a runaway loop included: nobody else may.
OPERATOR = ("script|load", "evalsha", "script|kill", "script|flush", "function|kill")
# What redis-py's cluster client asks of the nodes besides phibroker's own commands, granted to the
# users of a Redis Cluster only: CLUSTER SLOTS, the map of slots to nodes (at start, after a MOVED or a
# failover), COMMAND, where each command's keys are (at start), and ASKING, sent before a command an ASK
# redirects while a slot moves between nodes. Facts about the cluster and the commands, nothing of the
# data; ASKING only lets the next command reach a slot being imported.
CLUSTER_BASICS = ("cluster|slots", "command", "asking")


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


def user_of(name: str, role: str, grants: Sequence[Grant], agent: str | None = None) -> User:
    """The user of a role's grants: the first is its root, and so is every grant that names no key or
    channel; grants on the same keys and channels are one selector (Redis would try each alike)."""
    places: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, None]] = {}
    root = (grants[0].keys, grants[0].channels)
    for grant in grants:
        place = (grant.keys, grant.channels) if grant.keys or grant.channels else root
        places.setdefault(place, {}).update(dict.fromkeys(grant.commands))
    first, *others = (Grant(tuple(commands), keys, channels) for (keys, channels), commands in places.items())
    return User(name=name, role=role, root=first, selectors=tuple(others), agent=agent)


def users_of(roles: Roles, keys: Keys, agents: Sequence[str], subscriptions: Mapping[str, Sequence[str]]) -> list[User]:
    """One user per agent, then coordinator, client, approver, watch and admin (and what operators
    do by hand as admin), each of its role's grants."""
    users = [user_of(a, "agent", roles.agent(keys, a, subscriptions.get(a, ())), agent=a) for a in agents]
    users += [user_of(COORDINATOR, COORDINATOR, roles.coordinator(keys))]
    users += [user_of(CLIENT, CLIENT, roles.client(keys)), user_of(APPROVER, APPROVER, roles.approver(keys))]
    users += [user_of(WATCH, WATCH, roles.watch(keys))]
    return [*users, user_of(ADMIN, ADMIN, [*roles.admin(keys), Grant(OPERATOR)])]


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
    cluster: Sequence[tuple[str, int]] = (),
    *,
    roles: Roles,
) -> Bundle:
    """Users for these agents plus coordinator, client, approver, watch and admin, made of the grants
    `roles` declares (the store's: `phibroker.store.roles.ROLES`), with fresh random passwords and
    secrets, and the text of every file. `submitters`: agents whose reactions submit runs
    (their identity is a client's too). `token` makes secrets (tests pass a fixed one). `cluster`: the
    (host, port) of nodes of a Redis Cluster, named by the env files' `redis+cluster://` URLs instead
    of `host` and `port`; every user may also ask what a cluster client asks (CLUSTER_BASICS)."""
    keys = Keys(check_name(namespace, "namespace"), CLUSTER_SHARDS if cluster else 1)
    make = token or (lambda: secrets.token_urlsafe(32))
    subs = subscriptions or {}
    unknown = [a for a in submitters if a not in agents]
    if unknown:
        raise InvalidInput(f"--submitter {unknown[0]!r}: name one of the --agents")
    users = users_of(roles, keys, agents, subs)
    if cluster:
        users = [on_cluster(user) for user in users]
    bundle = Bundle(users, {u.name: make() for u in users}, {a: make() for a in agents})
    for agent, secret in bundle.agent_secrets.items():
        bundle.identities[agent] = {"role": ["agent", "client"] if agent in submitters else "agent", "secret": secret}
    for name, role in ((CLIENT, "client"), (ADMIN, "admin"), (COORDINATOR, "coordinator")):
        bundle.identities[name] = {"role": role, "secret": make()}
    # The default user can do nothing and cannot log in (`resetpass` also drops `nopass`, so
    # protected mode stays meaningful); every process authenticates as its own user.
    lines = ["user default reset off resetpass"] + [u.line(bundle.passwords[u.name]) for u in users]
    bundle.files[USERS_FILE] = "\n".join(lines) + "\n"
    scheme = ("rediss" if tls else "redis") + ("+cluster" if cluster else "")
    address = ",".join(f"{h}:{p}" for h, p in cluster) + "/" if cluster else f"{host}:{port}/0"
    for user in users:
        url = f"{scheme}://{user.name}:{bundle.passwords[user.name]}@{address}"
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


def on_cluster(user: User) -> User:
    """The same user, also allowed what a cluster client asks of every node."""
    return replace(user, root=replace(user.root, commands=(*user.root.commands, *CLUSTER_BASICS)))


def parse_nodes(text: str) -> list[tuple[str, int]]:
    """`HOST:PORT[,HOST:PORT...]`, nodes of a Redis Cluster, as (host, port) pairs."""
    nodes = []
    for address in (part.strip() for part in text.split(",")):
        host, _, port = address.rpartition(":")
        if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInput(f"--cluster {address!r}: name the nodes as HOST:PORT[,HOST:PORT...]")
        nodes.append((host, int(port)))
    return nodes


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
