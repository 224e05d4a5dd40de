"""Each store role declares what it sends Redis (its module's `access`), and `acl generate` makes its
users of those declarations: so a command a role's code sends that its declaration leaves out must
fail here, not in production as a NOPERM.

The check reads the code (ast): the commands sent on a client or pipeline (`pipe.xadd`,
`self.redis.hget`), those inside the Lua scripts a role runs (store/scripts.py), MULTI/EXEC for a
transaction, and what the `Connection` methods it calls on itself send. Where a command's key is
written as a `Keys` name (`self.keys.wf(wf_id)`, or a variable set to one), a real redis-server's
COMMAND INFO says whether it reads or writes, and one grant must allow that command on that key.
What a role's process calls on its store from outside it (`self.broker.ask_to_submit` in
runtime/client.py) is followed too; tests/test_attacks.py and tests/test_deploy.py run every process
as its generated user besides.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import redis

from phibroker.grants import Grant
from phibroker.keys import Keys
from phibroker.security import acl
from phibroker.store import client, coordinator, registry, scripts, views, worker
from phibroker.store.roles import ROLES
from tests.conftest import RedisServer

STORE = Path(__file__).resolve().parent.parent / "phibroker" / "store"
RUNTIME = STORE.parent / "runtime"
# Runtime modules that call a role's store as `self.broker` (a worker's others call only its own
# methods, or name the agents whose leases they read, where the roster would be read without them), and
# what of it their users never send: a client without an identity writes its run itself
# (`submit_workflow`), where no users are; the generated client user signs, and asks the coordinators.
PROCESSES = {"client": ("client",), "worker": ("reactor",)}
WITHOUT_USERS = {"submit_workflow"}
KEYS = Keys("phi")
AGENT, SUBSCRIPTION = "kalic", "audit-log"
# What each role module's code must fit in: its users' declarations. Clients read as the views do.
DECLARED: dict[str, Callable[[], list[Grant]]] = {
    "worker": lambda: worker.access(KEYS, AGENT, [SUBSCRIPTION]),
    "coordinator": lambda: coordinator.access(KEYS),
    "client": lambda: [*client.access(KEYS), *client.approver_access(KEYS), *client.dead_letter_edits(KEYS)],
    "views": lambda: views.access(KEYS),
    "registry": lambda: [
        *registry.access(KEYS, AGENT),
        *registry.access(KEYS),
        *registry.edits(KEYS),
        *views.access(KEYS),
    ],
}

# -- reading the code -------------------------------------------------------------------------------

# Who sends commands: redis-py clients and pipelines, as the store names them.
SENDERS = {"redis", "pipe", "client", "quick", "target", "_pubsub"}
# redis-py methods whose ACL command is not their lowercase name; any other method with a `_` fails
# the check until it is named here.
RENAMED = {
    "delete": "del",
    "xpending_range": "xpending",
    "xinfo_stream": "xinfo|stream",
    "xinfo_groups": "xinfo|groups",
    "xgroup_create": "xgroup|create",
    "xgroup_delconsumer": "xgroup|delconsumer",
    "memory_usage": "memory|usage",
    "evalsha_ro": "evalsha_ro",
    "script_load": "script|load",
    "script_exists": "script|exists",
}
NOT_COMMANDS = {"pipeline", "execute", "pubsub", "get_message", "close", "keyslot", "get_node_from_key"}
# Commands with subcommands, as `execute_command("XINFO", "STREAM", ...)` sends them: `xinfo|stream`.
CONTAINERS = {"xinfo", "xgroup", "script", "memory", "function", "cluster", "client", "object", "config"}
CHANNELS = {"publish", "subscribe"}  # their first argument is a channel, not a key
# A `Keys` method's argument, by its parameter's name: one of the agent's own names.
SAMPLES = {"agent": AGENT, "name": f"{AGENT}.fn", "wf_id": "wf-1", "sender": "client", "message_id": "1-0"}


@dataclass(frozen=True)
class Use:
    """One command a role's code sends, with the keys it names where they are `Keys` names."""

    command: str
    keys: tuple[str, ...] | None  # None: not known from the code (a parameter, a loop's variable)
    where: str
    # a script's command: it names one of the script's keys, which one its code does not tell (the
    # generated users, run against a real server, check the rest)
    one_of: bool = False


def lua_commands(source: str) -> list[str]:
    calls = re.findall(r"redis\.p?call\('([A-Za-z]+)'(?:, '([A-Za-z]+)')?", source)
    return sorted({f"{name}|{sub}".lower() if name.lower() in CONTAINERS else name.lower() for name, sub in calls})


def script_in(call: ast.Call) -> str | None:
    """The Lua source a call runs (`SHAS[scripts.START]`, `self._script(scripts.LEASE, ...)`), if any."""
    for node in ast.walk(call):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "scripts":
            return str(getattr(scripts, node.attr))
    return None


def is_keys(node: ast.expr) -> bool:
    """`keys`, `self.keys`, `self.broker.keys`: the namespace's `Keys`."""
    named = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    return named == "keys"


def samples(node: ast.expr, env: dict[str, list[str]]) -> list[str] | None:
    """The keys an expression names, for sample arguments; None when the code does not say."""
    if isinstance(node, ast.Starred):
        return samples(node.value, env)
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        parts = [samples(element, env) for element in node.elts]
        return None if any(p is None for p in parts) else [k for p in parts for k in p or ()]
    if isinstance(node, ast.IfExp):
        a, b = samples(node.body, env), samples(node.orelse, env)
        return None if a is None or b is None else a + b
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute) and is_keys(target.value) and hasattr(KEYS, target.attr):
        value = getattr(KEYS, target.attr)
        if callable(value):
            value = value(*(SAMPLES[p] for p in inspect.signature(value).parameters))
        return [value] if isinstance(value, str) else list(value)
    return None


def sent(call: ast.Call) -> str | None:
    """The ACL name of the command a call sends on a client or pipeline, if it is one."""
    func = call.func
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value
    name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
    if name not in SENDERS or func.attr in NOT_COMMANDS:
        return None
    if func.attr == "execute_command":
        words = [a.value.lower() for a in call.args[:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        words = " ".join(words).split()
        assert words, f"execute_command at line {call.lineno}: name the command with a string"
        return "|".join(words[:2]) if words[0] in CONTAINERS and len(words) > 1 else words[0]
    if func.attr in RENAMED:
        return RENAMED[func.attr]
    assert "_" not in func.attr, f"redis-py's {func.attr}: name its ACL command in RENAMED"
    return func.attr


def transaction(call: ast.Call) -> bool:
    """`pipeline()` (redis-py's default), `pipeline(transaction=True)`, `_pipeline(..., transaction=True)`."""
    flag = next((k.value for k in call.keywords if k.arg == "transaction"), None)
    if flag is None:
        return isinstance(call.func, ast.Attribute) and call.func.attr == "pipeline" and not call.args
    return isinstance(flag, ast.Constant) and flag.value is True


def uses_in(function: ast.FunctionDef, where: str) -> Iterator[Use]:
    env: dict[str, list[str]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found = samples(node.value, env)
            if found is not None:
                env[node.targets[0].id] = found
    for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
        at = f"{where}:{call.lineno}"
        if transaction(call):
            yield from (Use("multi", (), at), Use("exec", (), at))
        command, script = sent(call), script_in(call)
        read = isinstance(call.func, ast.Attribute) and call.func.attr == "_read"  # `_read(pipe, scripts.X, keys)`
        if script is not None:
            args = call.args[2:] if command in ("evalsha", "evalsha_ro") else call.args[2:3] if read else call.args[1:2]
            named = [samples(arg, env) for arg in args]
            keys = tuple(k for n in named if n for k in n) or None
            yield Use(command or ("evalsha_ro" if read else "evalsha"), keys, at)
            yield from (Use(c, keys, f"{at} (Lua)", one_of=True) for c in lua_commands(script))
        elif command is not None:
            first = samples(call.args[0], env) if call.args and command not in CHANNELS | {"xreadgroup"} else None
            yield Use(command, None if first is None else tuple(first), at)


@dataclass
class Module:
    """A store module's functions, and the store functions it imports by name."""

    name: str
    functions: dict[str, list[ast.FunctionDef]]  # module level, and methods of its classes, by name
    imported: dict[str, str]  # name -> the store module that defines it

    @classmethod
    def read(cls, name: str) -> Module:
        tree = ast.parse((STORE / f"{name}.py").read_text())
        functions: dict[str, list[ast.FunctionDef]] = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and name == "connection" and node.name != "Connection":
                continue  # its clients and pipelines: redis-py's, with refusals
            members = node.body if isinstance(node, ast.ClassDef) else [node]
            for member in (f for f in members if isinstance(f, ast.FunctionDef)):
                functions.setdefault(member.name, []).append(member)
        imported = {
            alias.name: (node.module or "").rpartition(".")[2]
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phibroker.store.")
            for alias in node.names
        }
        return cls(name, functions, imported)


def called(module: Module, function: ast.FunctionDef) -> Iterator[tuple[str, str]]:
    """(store module, function) pairs a function calls: its own module's, those imported by name, and
    `Connection`'s methods called on `self`, `super()`, `self.broker` or a `connection` that its module
    does not define."""
    for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
        func = call.func
        if isinstance(func, ast.Name) and func.id in module.imported:
            yield module.imported[func.id], func.id
        elif isinstance(func, ast.Name) and func.id in module.functions:
            yield module.name, func.id
        elif isinstance(func, ast.Attribute):
            owner = func.value
            on_super = isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super"
            on_self = isinstance(owner, ast.Name) and owner.id == "self"
            on_connection = isinstance(owner, ast.Name) and owner.id == "connection"
            on_broker = isinstance(owner, ast.Attribute) and owner.attr == "broker"
            if on_self and func.attr in module.functions:
                yield module.name, func.attr
            elif on_super or on_self or on_broker or on_connection:
                yield "connection", func.attr


def role_uses(name: str) -> list[Use]:
    """Every command a role module sends, with what it sends through the functions it calls. A user
    that may not load scripts is refused SCRIPT LOAD by design (it waits for a coordinator): that is
    counted only where a role calls `load_scripts` itself."""
    modules = {m: Module.read(m) for m in ("connection", name)}
    todo = [(name, f) for f in modules[name].functions]
    called_outside = broker_calls(name)
    unknown = {
        f for f in called_outside if f not in modules[name].functions and f not in modules["connection"].functions
    }
    assert not unknown, f"{name}'s runtime calls what its store does not define: {sorted(unknown)}"
    todo += [(name if f in modules[name].functions else "connection", f) for f in called_outside]
    seen: set[tuple[str, str]] = set()
    uses: dict[tuple[str, tuple[str, ...] | None], Use] = {}
    while todo:
        where, function_name = todo.pop()
        module = modules.setdefault(where, Module.read(where))
        if (where, function_name) in seen:
            continue
        seen.add((where, function_name))
        for function in module.functions.get(function_name, ()):
            for use in uses_in(function, f"{where}.py"):
                uses.setdefault((use.command, use.keys), use)
            todo += [(m, f) for m, f in called(module, function) if f != "load_scripts" or where == name]
    return list(uses.values())


def broker_calls(name: str) -> set[str]:
    """What the runtime of a role's process calls on its store (`self.broker.X(...)`), but loading scripts
    (a user that may not waits for a coordinator)."""
    calls = set()
    for module in PROCESSES.get(name, ()):
        for call in (n for n in ast.walk(ast.parse((RUNTIME / f"{module}.py").read_text())) if isinstance(n, ast.Call)):
            func = call.func
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Attribute)
                and func.value.attr == "broker"
            ):
                calls.add(func.attr)
    return calls - {"load_scripts", *WITHOUT_USERS}


# -- what the declarations allow ------------------------------------------------------------------


def access_of(pattern: str) -> tuple[str, str]:
    """`%R~k` -> ("R", "k"); `~k` -> ("RW", "k")."""
    perms, _, glob = pattern.partition("~")
    return perms.lstrip("%") or "RW", glob


def allows(grants: Sequence[Grant], use: Use, needs: dict[str, str]) -> bool:
    """Redis's decision, from a declaration: one grant holds the command and covers every key it names
    (`needs`: R, W or RW, from COMMAND INFO), or one of them for a script's command, or the channel."""
    for grant in grants:
        if use.command not in grant.commands:
            continue
        if not use.keys or needs.get(use.command, "").endswith("-"):  # TIME inside a script takes no key
            return True
        if use.command in CHANNELS:
            if all(any(fnmatchcase(k, c) for c in grant.channels) for k in use.keys):
                return True
            continue
        need = set(needs.get(use.command, "RW"))
        covered = (any(fnmatchcase(k, g) and need <= set(p) for p, g in map(access_of, grant.keys)) for k in use.keys)
        if (any if use.one_of else all)(covered):
            return True
    return False


def commands_missing(grants: Sequence[Grant], uses: Sequence[Use]) -> list[str]:
    declared = {command for grant in grants for command in grant.commands}
    return sorted(f"{u.command} ({u.where})" for u in uses if u.command not in declared)


def keys_refused(grants: Sequence[Grant], uses: Sequence[Use], needs: dict[str, str]) -> list[str]:
    refused = [u for u in uses if u.keys and not allows(grants, u, needs)]
    return sorted(f"{u.command} on {', '.join(u.keys or ())} ({u.where})" for u in refused)


def key_needs(server: RedisServer, commands: set[str]) -> dict[str, str]:
    """Command -> what it needs of the keys it names (R, W, RW, or "" to name them only: XLEN), from
    the server's COMMAND INFO; "-" for a command that takes no key."""
    connection = redis.Redis.from_url(server.url, protocol=2).connection_pool.get_connection()
    needs = {}
    for command in sorted(commands):
        connection.send_command("COMMAND", "INFO", command)
        (info,) = connection.read_response()
        flags = {f.decode() for spec in info[8] for f in dict(zip(spec[::2], spec[1::2], strict=True))[b"flags"]}
        needs[command] = ("R" if "access" in flags else "") + ("W" if flags & {"insert", "update", "delete"} else "")
        needs[command] += "" if info[8] else "-"  # "-": takes no key at all
    connection.disconnect()
    return needs


@pytest.fixture(scope="module")
def needs(redis_server: RedisServer) -> dict[str, str]:
    used = {u.command for role in DECLARED for u in role_uses(role)}
    declared = {c for role in DECLARED for grant in DECLARED[role]() for c in grant.commands}
    return key_needs(redis_server, used | declared)


# -- the checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(DECLARED))
def test_each_command_a_role_sends_is_declared(role: str) -> None:
    uses = role_uses(role)
    assert len({u.command for u in uses}) >= 5, "the reading of the code found next to nothing"
    assert commands_missing(DECLARED[role](), uses) == []


@pytest.mark.parametrize("role", sorted(DECLARED))
def test_each_key_a_role_names_is_declared_with_the_access_its_command_needs(role: str, needs: dict[str, str]) -> None:
    uses = role_uses(role)
    assert [u for u in uses if u.keys], "the reading of the code found no key"
    assert keys_refused(DECLARED[role](), uses, needs) == []


@pytest.mark.parametrize(
    ("code", "command"),
    [
        ("pipe.xinfo_stream(stream)", "xinfo|stream"),
        ("self.redis.execute_command('XINFO', 'STREAM', stream)", "xinfo|stream"),
        ("self.redis.execute_command('OBJECT ENCODING', key)", "object|encoding"),
        ("pipe.execute_command('GET', key)", "get"),
        ("self.redis.delete(key)", "del"),
        ("info.get('run_id')", None),  # a dict's, not Redis's GET
    ],
)
def test_a_call_reads_as_the_acl_command_it_sends(code: str, command: str | None) -> None:
    call = ast.parse(code).body[0]
    assert isinstance(call, ast.Expr) and isinstance(call.value, ast.Call)
    assert sent(call.value) == command


def test_the_check_fails_when_a_declaration_leaves_a_command_or_a_key_out(needs: dict[str, str]) -> None:
    grants, uses = DECLARED["worker"](), role_uses("worker")
    without = [replace(g, commands=tuple(c for c in g.commands if c != "zmscore")) for g in grants]
    assert [m.split()[0] for m in commands_missing(without, uses)] == ["zmscore"]  # `seen`
    meta = f"%R~{KEYS.wf('*')}"
    refused = keys_refused([g for g in grants if meta not in g.keys], uses, needs)
    assert [r.split(" (")[0] for r in refused] == [  # `unit_states`, `unit_runs`: a run's meta and tasks, read
        "hget on phi:wf:{wf-1}",
        "hget on phi:wf:{wf-1}:tasks",
        "hmget on phi:wf:{wf-1}:tasks",
    ]
    written = [replace(g, keys=(f"%W~{KEYS.wf('*')}",)) if meta in g.keys else g for g in grants]
    assert keys_refused(written, uses, needs) == refused  # HGET reads: a write-only pattern will not do


def test_a_grant_without_keys_holds_only_commands_that_take_none(needs: dict[str, str]) -> None:
    """Such a grant joins the user's root, with the root's keys: a keyed command there would gain them."""
    for role, declared in DECLARED.items():
        for grant in declared():
            if not grant.keys and not grant.channels:
                assert [c for c in grant.commands if not needs[c].endswith("-")] == [], role


def test_each_user_allows_what_its_roles_declare() -> None:
    """`acl generate` folds a role's grants into one user (root, selectors): nothing declared is lost."""
    bundle = acl.generate("phi", [AGENT], subscriptions={AGENT: [SUBSCRIPTION]}, roles=ROLES)
    users = {u.name: u for u in bundle.users}
    made: dict[str, list[Grant]] = {
        AGENT: ROLES.agent(KEYS, AGENT, [SUBSCRIPTION]),
        **{name: getattr(ROLES, name)(KEYS) for name in ("coordinator", "client", "approver", "watch", "admin")},
    }
    for name, grants in made.items():
        user = users[name]
        held = [user.root, *user.selectors]
        for grant in grants:
            where = (grant.keys, grant.channels)
            place = next(g for g in held if (g.keys, g.channels) == where) if any(where) else user.root
            assert set(grant.commands) <= set(place.commands), (name, grant)
        assert len(held) == len({(g.keys, g.channels) for g in held}), name  # one selector per set of keys
