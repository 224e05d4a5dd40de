"""Production deployment: the ACL users on a real redis-server running deploy/redis.conf, and the
compose, Kubernetes, systemd and Docker files checked statically against the CLI and `acl generate`."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from click.testing import CliRunner
from redis.exceptions import NoPermissionError

from phibroker.cli import main
from phibroker.errors import InvalidInput
from phibroker.keys import WORKERS_GROUP, Keys
from phibroker.security import acl
from phibroker.settings import Settings
from phibroker.store import scripts, views
from phibroker.store.connection import SHAS
from phibroker.store.roles import ROLES
from tests.conftest import REPO, Processes, RedisServer, _have_redis, until

DEPLOY = REPO / "deploy"
EXAMPLES = REPO / "examples"
AGENTS = ["webc", "dc", "vssc", "kalic", "cmdc"]
STOP_GRACE = float(Settings.model_fields["stop_grace"].default)  # what SIGTERM gives handlers
ROOT_USER, ROOT_PASSWORD = "test-root", "test-root-password"  # the tests' own superuser, never generated


# -- the rules, without Redis ------------------------------------------------------------------------


def allows(user: acl.User, command: str, key: str, need: str) -> bool:
    """Redis's decision for one key: root or some selector grants the command and covers the key."""
    for grant in (user.root, *user.selectors):
        if command not in grant.commands:
            continue
        for pattern in grant.keys:
            perms, _, glob = pattern.partition("~")
            if fnmatchcase(key, glob) and set(need) <= set(perms.lstrip("%") or "RW"):
                return True
    return False


def test_each_agent_gets_its_own_keys_and_appends_to_no_shared_stream() -> None:
    keys = Keys("phi")
    users = {u.name: u for u in acl.generate("phi", AGENTS, roles=ROLES).users}
    kalic = users["kalic"]
    assert allows(kalic, "xreadgroup", keys.agent_tasks("kalic"), "RW")
    assert allows(kalic, "zadd", keys.sub_seen("kalic.on_scan"), "W")
    assert allows(kalic, "evalsha", keys.wf_marks("wf-1", "kalic"), "RW")  # its own start marks
    assert allows(kalic, "evalsha", keys.wf_lost("wf-1", "kalic"), "RW")
    assert not allows(kalic, "evalsha", keys.wf_marks("wf-1", "vssc"), "RW")  # another agent's
    assert not allows(kalic, "hset", keys.wf_marks("wf-1", "vssc"), "W")
    for key in (keys.wf("wf-1"), keys.wf_tasks("wf-1")):  # read, never written
        assert allows(kalic, "hget", key, "R")
        assert not any(allows(kalic, c, key, "W") for c in ("hset", "hsetnx", "hincrby", "evalsha"))
    assert allows(kalic, "xadd", keys.wf_agent_output("wf-1", "kalic"), "W")  # its own output of a run
    assert not allows(kalic, "set", keys.wf_agent_output("wf-1", "kalic"), "W")  # a stream, appended to only
    assert allows(kalic, "pttl", keys.wf_output("wf-1"), "R")  # the run's: how long its own output stays
    for stream in (keys.wf_output("wf-1"), keys.wf_agent_output("wf-1", "vssc")):  # the run's, another's
        assert not any(allows(kalic, c, stream, "W") for c in ("xadd", "pexpire", "set", "xtrim"))
    assert not allows(kalic, "hset", keys.wf_lost("wf-1", "kalic"), "W")  # each of its own keys: one type
    assert not allows(kalic, "rpush", keys.wf_marks("wf-1", "kalic"), "W")
    assert not allows(kalic, "zadd", keys.running, "W")  # its reactions' runs are the coordinators' to write
    # it appends to its own inbox lanes only: the coordinators publish, route and keep what it sends
    assert allows(kalic, "xadd", keys.agent_inbox("kalic", None), "W")
    assert allows(kalic, "xadd", keys.agent_inbox("kalic", None, bulk=True), "W")
    for stream in (keys.inbox(None), keys.agent_inbox("vssc", None), *keys.event_logs, keys.dlq):
        assert not allows(kalic, "xadd", stream, "W"), stream
    assert not allows(kalic, "xadd", keys.sub("listener.on_scan"), "W")  # nor into another subscription
    assert not allows(kalic, "xack", keys.sub("listener.on_scan"), "W")
    assert not allows(kalic, "zadd", keys.sub_seen("listener.on_scan"), "W")
    assert not allows(kalic, "xadd", keys.agent_tasks("vssc"), "W")
    assert not allows(kalic, "xreadgroup", keys.agent_tasks("vssc"), "RW")
    for key in (keys.wf_results("wf-1"), keys.wf_outbox("wf-1"), keys.wf_done("wf-1"), keys.wf_history("wf-1")):
        assert not any(allows(kalic, c, key, "R") or allows(kalic, c, key, "W") for c in ("hget", "hgetall", "hset"))
    assert not allows(kalic, "hset", keys.trusted_keys, "W") and not allows(kalic, "hset", keys.triggers, "W")
    assert not allows(kalic, "xreadgroup", keys.inbox(None), "R")
    assert not allows(kalic, "xadd", "other:agent:kalic:tasks", "W")  # another namespace
    watch = users["watch"]
    assert all(p.startswith("%R~") for p in watch.root.keys) and not watch.selectors
    coordinator = users["coordinator"]
    assert not allows(coordinator, "hset", keys.trusted_keys, "W")
    assert not allows(coordinator, "xreadgroup", keys.agent_tasks("kalic"), "R")


def test_the_bundle_holds_a_user_line_and_an_env_file_per_user() -> None:
    bundle = acl.generate(
        "phi", AGENTS, host="redis", port=6380, identities_path="/run/ids.json", submitters=["kalic"], roles=ROLES
    )
    users = [*AGENTS, "coordinator", "client", "approver", "watch", "admin"]
    assert set(bundle.files) == {"users.acl", "identities.json", *(f"{u}.env" for u in users)}
    lines = bundle.files["users.acl"].splitlines()
    assert lines[0] == "user default reset off resetpass"
    assert [line.split()[1] for line in lines[1:]] == users
    identities = json.loads(bundle.files["identities.json"])
    secrets = [i["secret"] for i in identities.values()]
    assert len(set(bundle.passwords.values()) | set(secrets)) == len(users) + len(AGENTS) + 3
    for user, password in bundle.passwords.items():
        assert password not in bundle.files["users.acl"]
        env = parse_env(bundle.files[f"{user}.env"])
        assert env["PHIBROKER_REDIS_URL"] == f"redis://{user}:{password}@redis:6380/0"
        assert env["PHIBROKER_NAMESPACE"] == "phi"
        assert env.get("PHIBROKER_AGENT_SECRET") == bundle.agent_secrets.get(user)
        if user in ("client", "admin"):  # the identities that submit, cancel, retry and signal
            assert env["PHIBROKER_CLIENT_NAME"] == user and env["PHIBROKER_CLIENT_SECRET"] == identities[user]["secret"]
        else:
            assert "PHIBROKER_CLIENT_SECRET" not in env
    assert parse_env(bundle.files["coordinator.env"])["PHIBROKER_IDENTITIES"] == "/run/ids.json"
    roles = {name: i["role"] for name, i in identities.items()}
    assert roles == {
        **{a: "agent" for a in AGENTS},
        "kalic": ["agent", "client"],  # its reactions submit runs
        "client": "client",
        "admin": "admin",  # a client that may cancel or retry any run
        "coordinator": "coordinator",
    }
    assert all(identities[a]["secret"] == bundle.agent_secrets[a] for a in AGENTS)
    with pytest.raises(InvalidInput):
        acl.generate("phi", AGENTS, submitters=["nobody"], roles=ROLES)


@pytest.mark.parametrize(
    "agents",
    ["", "web*", "a b", "admin", "watch,kalic", "client", "approver", "kalic,kalic.x"],
)
def test_agent_names_that_would_break_the_rules_are_refused(agents: str) -> None:
    with pytest.raises(InvalidInput):
        acl.parse_agents(agents)


def test_acl_generate_writes_the_files_and_keeps_them_unless_forced(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "secrets"
    args = ["--namespace", "prod", "acl", "generate", "--agents", "webc,kalic", "--out", str(out)]
    first = runner.invoke(main, [*args, "--host", "redis", "--subscription", "kalic=audit-log"])
    assert first.exit_code == 0, first.output
    assert {p.name for p in out.iterdir()} == set(acl.generate("prod", ["webc", "kalic"], roles=ROLES).files)
    assert (out / "users.acl").stat().st_mode & 0o777 == 0o644  # hashes only: Redis's own user reads it
    assert all((out / f).stat().st_mode & 0o777 == 0o600 for f in ("kalic.env", "identities.json"))
    assert "~prod:sub:audit-log " in (out / "users.acl").read_text()
    assert "@redis:6379/0" in (out / "kalic.env").read_text()
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(main, [*args, "--force"]).exit_code == 0
    bad = runner.invoke(main, [*args, "--force", "--subscription", "nobody=x"])
    assert bad.exit_code == 2


# -- the users on a real redis-server ------------------------------------------------------------------


class AclRedis(RedisServer):
    """A RedisServer running deploy/redis.conf as production does, with the generated users file."""

    def __init__(self, directory: Path, aclfile: Path):
        super().__init__(directory, appendonly=True)
        self.aclfile = aclfile

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        overrides = ["--port", str(self.port), "--bind", "127.0.0.1", "--aclfile", str(self.aclfile)]
        log = open(self.directory / "redis.log", "wb")  # noqa: SIM115 - closed with the process
        args = [binary, str(DEPLOY / "redis.conf"), *overrides, "--maxmemory", "256mb"]
        self.process = subprocess.Popen(args, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT)
        root = redis.Redis(port=self.port, username=ROOT_USER, password=ROOT_PASSWORD)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if root.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError((self.directory / "redis.log").read_text())


@dataclass
class Deployment:
    server: AclRedis
    secrets: Path
    namespace: str

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    @property
    def root(self) -> redis.Redis:
        return redis.Redis(port=self.server.port, username=ROOT_USER, password=ROOT_PASSWORD)

    def env(self, user: str) -> dict[str, str]:
        """What the user's env file says, as a process gets it."""
        return parse_env((self.secrets / f"{user}.env").read_text())

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.env(user)["PHIBROKER_REDIS_URL"])

    def processes(self, tmp_path: Path) -> Processes:
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        settings = Settings(
            redis_url=self.env("admin")["PHIBROKER_REDIS_URL"],
            namespace=self.namespace,
            home=tmp_path / "home",
            reclaim_after=2.0,
            coordinator_takeover=1.0,
            worker_block=0.5,
        )
        return Processes(settings, logs)

    def cli(self, procs: Processes, user: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """`phibroker ARGS` as USER: its env file (and `extra`) and nothing else of the test's settings."""
        return subprocess.run(
            [sys.executable, "-m", "phibroker", *args],
            env=procs.env(**{**self.env(user), **extra}),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def coordinators(self, procs: Processes, count: int = 1, *args: str) -> None:
        """Start coordinators and wait until one has loaded phibroker's scripts: the other users may
        only call them (until then, what they send that runs one is "unavailable", as with a busy Redis)."""
        for _ in range(count):
            procs.spawn("coordinator", "coordinator", *args, **self.env("coordinator"))
        until(lambda: all(self.root.script_exists(*SHAS.values())), procs, timeout=30)

    def worker(self, procs: Processes, agent: str, app: str, **extra: str) -> None:
        args = ["worker", "--agent", agent, "--app", app]
        procs.spawn(f"worker-{agent}", *args, **self.env(agent), **extra)

    def denials(self) -> list[tuple[str, str]]:
        """(user, what) of every ACL denial since the last reset."""
        return [(str(e.get("username")), str(e.get("object"))) for e in self.root.acl_log(count=1000)]


def parse_env(text: str) -> dict[str, str]:
    """An env file as compose, systemd and kustomize read it: KEY=VALUE lines, `#` comments."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


@contextmanager
def deployed(directory: Path, agents: list[str], submitters: Sequence[str] = ()) -> Iterator[Deployment]:
    """A redis-server loaded with the users `acl generate` writes for `agents` (`submitters`: those whose
    reactions submit runs) and the tests' own superuser, their env files and identities.json in
    `directory/secrets`."""
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    secrets = directory / "secrets"
    namespace = f"d{uuid.uuid4().hex[:8]}"
    server = AclRedis(directory, directory / "users.acl")
    bundle = acl.generate(
        namespace,
        agents,
        host="127.0.0.1",
        port=server.port,
        identities_path=str(secrets / "identities.json"),
        submitters=submitters,
        roles=ROLES,
    )
    acl.write(secrets, bundle)
    root_line = f"user {ROOT_USER} on >{ROOT_PASSWORD} ~* &* +@all"
    server.aclfile.write_text(root_line + "\n" + (secrets / "users.acl").read_text())
    server.start()
    try:
        yield Deployment(server, secrets, namespace)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(tmp_path_factory.mktemp("deploy"), [*AGENTS, "emitter", "listener"]) as running:
        yield running


def output_of(procs: Processes, *results: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(f"$ {r.args}\n{r.stdout[-2000:]}{r.stderr[-2000:]}" for r in results) + procs.output()


def test_every_process_runs_as_its_own_user(deployment: Deployment, tmp_path: Path) -> None:
    root = deployment.root
    root.acl_log_reset()
    procs = deployment.processes(tmp_path)
    try:
        deployment.coordinators(procs, 2)  # with identities.json: a result not signed by its agent would be refused
        for agent in AGENTS:
            deployment.worker(procs, agent, "tests.apps.examples")
        submitted = deployment.cli(
            procs, "client", "submit", str(EXAMPLES / "complete-dag.yaml"), "--wait", "--timeout", "60s", "--json"
        )
        assert submitted.returncode == 0, output_of(procs, submitted)
        status = json.loads(submitted.stdout)
        assert status["state"] == "succeeded"
        for task in status["tasks"].values():
            assert task["history"][0]["worker"].startswith(f"{task['agent']}@")  # its own agent's worker
        wf_id = status["id"]
        shown = deployment.cli(procs, "watch", "status", wf_id, "--json")
        listed = deployment.cli(procs, "watch", "list", "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "succeeded", output_of(procs, shown)
        assert wf_id in [row["id"] for row in json.loads(listed.stdout)], output_of(procs, listed)
        views = [["watch", "--once"], ["agents", "--json"], ["why", wf_id], ["approvals"], ["subs"], ["dlq", "list"]]
        for view in views:
            if view[0] in main.commands:  # each read-only view, run as the watch user
                seen = deployment.cli(procs, "watch", *view)
                assert seen.returncode == 0, output_of(procs, seen)
        dead = deployment.cli(procs, "admin", "dlq", "list", "--json")
        assert json.loads(dead.stdout) == [], output_of(procs, dead)
        assert deployment.denials() == [], procs.output()
    finally:
        procs.close()


GATED = """
name: gated
tasks:
  Research: {agent: webc, command: research, payload: {topic: tides}}
  Approve: {approval: {message: "Ship it?"}, depends_on: [Research]}
  CI: {signal: {name: ci-done, timeout: 5m}, depends_on: [Approve]}
  Deploy: {agent: cmdc, command: deploy, depends_on: [CI]}
"""


def test_the_client_and_approver_users_submit_cancel_retry_signal_and_approve(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Each as its own user and nothing more: the client submits, cancels, retries and signals; the
    approver lists and approves (its key trusted by the admin); the coordinators check every signature."""
    root = deployment.root
    root.acl_log_reset()
    procs = deployment.processes(tmp_path)
    (tmp_path / "gated.yaml").write_text(GATED)
    try:
        made = deployment.cli(procs, "approver", "keys", "generate", "--name", "stryk")  # local: no Redis
        assert made.returncode == 0, output_of(procs, made)
        trusted = deployment.cli(procs, "admin", "keys", "trust", *made.stdout.split())
        assert trusted.returncode == 0, output_of(procs, trusted)
        deployment.coordinators(procs)
        for agent in ("webc", "cmdc"):
            deployment.worker(procs, agent, "tests.apps.examples")

        def as_client(*args: str) -> subprocess.CompletedProcess[str]:
            done = deployment.cli(procs, "client", *args)
            assert done.returncode == 0, output_of(procs, done)
            return done

        def approve(wf_id: str) -> None:
            def request() -> Any:
                rows = json.loads(deployment.cli(procs, "approver", "approvals", "--json").stdout)
                return next((r for r in rows if r["workflow"] == wf_id), None)

            approval = until(request, procs, timeout=30)["id"]
            approved = deployment.cli(procs, "approver", "approve", approval, PHIBROKER_APPROVER="stryk")
            assert approved.returncode == 0, output_of(procs, approved)

        def state(wf_id: str, task: str | None = None) -> str:
            raw = root.hget(deployment.keys.wf_tasks(wf_id), f"{task}|state") if task else None
            return (raw if task else root.hget(deployment.keys.wf(wf_id), "state") or b"").decode()

        first = as_client("submit", str(tmp_path / "gated.yaml")).stdout.strip()
        approve(first)
        until(lambda: state(first, "CI") == "running", procs, timeout=30)
        as_client("signal", first, "ci-done", "--data", '{"green": true}')
        until(lambda: state(first) == "succeeded", procs, timeout=30)
        shown = json.loads(as_client("status", first, "--json").stdout)
        assert shown["tasks"]["CI"]["result"] == {"green": True}

        again = as_client("submit", str(tmp_path / "gated.yaml")).stdout.strip()
        until(lambda: state(again) == "waiting_approval", procs, timeout=30)
        as_client("cancel", again, "--reason", "not today")
        until(lambda: state(again) == "cancelled", procs, timeout=30)
        as_client("retry", again)
        approve(again)
        until(lambda: state(again, "CI") == "running", procs, timeout=30)
        as_client("signal", again, "ci-done")
        until(lambda: state(again) == "succeeded", procs, timeout=30)
        dead = deployment.cli(procs, "admin", "dlq", "list", "--json")
        assert json.loads(dead.stdout) == [], output_of(procs, dead)
        assert deployment.denials() == [], procs.output()
    finally:
        procs.close()


TRIGGERED = """
name: triaged
params: {severity: low, target: nowhere, n: -1}
on: {event: scan.finished, where: "data.severity == 'high'"}
tasks:
  Triage: {agent: emitter, command: announce, payload: {kind: triage.done, severity: "${params.severity}"}}
"""
ANNOUNCE = """
name: announce
params: {count: 2, severity: high}
tasks:
  A: {agent: emitter, command: announce, payload: {count: "${params.count}", severity: "${params.severity}"}}
"""


def test_subscriptions_triggers_and_admin_commands_work_under_the_acls(
    deployment: Deployment, redis_server: RedisServer, tmp_path: Path
) -> None:
    root = deployment.root
    root.acl_log_reset()
    procs = deployment.processes(tmp_path)
    (tmp_path / "triaged.yaml").write_text(TRIGGERED)
    (tmp_path / "announce.yaml").write_text(ANNOUNCE)
    ledger = redis.Redis.from_url(redis_server.url)  # the probe agents count reactions outside the ACLs
    key = f"{deployment.namespace}:ledger"
    probe = {"PROBE_LEDGER_URL": redis_server.url, "PROBE_LEDGER_KEY": key}
    try:
        added = deployment.cli(procs, "admin", "triggers", "add", str(tmp_path / "triaged.yaml"))
        made = deployment.cli(procs, "admin", "keys", "generate", "--name", "ops")
        assert added.returncode == 0 and made.returncode == 0, output_of(procs, added, made)
        trusted = deployment.cli(procs, "admin", "keys", "trust", *made.stdout.split())
        assert trusted.returncode == 0, output_of(procs, trusted)
        deployment.coordinators(procs)
        deployment.worker(procs, "emitter", "tests.apps.choreo")
        deployment.worker(procs, "listener", "tests.apps.choreo", **probe)

        def listening() -> set[str]:
            return {s["name"] for s in json.loads(deployment.cli(procs, "watch", "subs", "--json").stdout)}

        until(lambda: {"listener.on_scan", "listener.high", "listener.x"} <= listening(), procs, timeout=30)
        time.sleep(1.2)  # routers re-read subscriptions every second
        ran = deployment.cli(procs, "admin", "submit", str(tmp_path / "announce.yaml"), "--wait", "--json")
        assert ran.returncode == 0, output_of(procs, ran)
        reactions = [f"{key}:listener.on_scan", f"{key}:listener.high"]  # each counts the events it saw
        until(lambda: [len(ledger.hgetall(r)) for r in reactions] == [2, 2], procs, timeout=30)

        def triaged() -> int:
            rows = json.loads(deployment.cli(procs, "watch", "list", "--json").stdout)
            return len([r for r in rows if r["name"] == "triaged" and r["state"] == "succeeded"])

        until(lambda: triaged() == 2, procs, timeout=30)  # one workflow per high-severity event, started by the trigger
        purged = deployment.cli(procs, "admin", "dlq", "purge", "--all")
        assert purged.returncode == 0, output_of(procs, purged)
        assert deployment.denials() == [], procs.output()
    finally:
        procs.close()


def sha(source: str) -> str:
    import hashlib

    return hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - the name Redis gives a script


RUNAWAY = "while true do end"  # a script that never returns: Redis answers BUSY to everyone while it runs


def agent_denials(keys: Keys, agent: redis.Redis, other: str, other_sub: str, wf: str) -> dict[str, Callable[[], Any]]:
    """What an agent's user must be refused (NOPERM), against the agent `other`, its subscription
    `other_sub` and the run `wf`: each of these held before any control message was checked."""
    tasks = keys.agent_tasks(other)
    return {
        f"XADD to {other}'s task stream": lambda: agent.xadd(tasks, {"m": b"forged"}),
        f"XREADGROUP on {other}'s task stream": lambda: agent.xreadgroup(WORKERS_GROUP, "k", {tasks: ">"}),
        f"XRANGE on {other}'s task stream": lambda: agent.xrange(tasks),
        f"XACK on {other}'s task stream": lambda: agent.xack(tasks, WORKERS_GROUP, "0-1"),
        "HGETALL of a workflow's results": lambda: agent.hgetall(keys.wf_results(wf)),
        "HSET into a workflow's results": lambda: agent.hset(keys.wf_results(wf), "A", "forged"),
        "HSET into a workflow's outbox": lambda: agent.hset(keys.wf_outbox(wf), "x", "forged"),
        "EVALSHA APPLY (a transition)": lambda: agent.evalsha(sha(scripts.APPLY), 6, *keys.wf_keys(wf), 1),
        "HSET into a workflow's tasks hash": lambda: agent.hset(keys.wf_tasks(wf), "A|state", "succeeded"),
        f"HSET into {other}'s start marks": lambda: agent.hset(keys.wf_marks(wf, other), "A", "forged"),
        f"EVALSHA START on {other}'s start marks": lambda: agent.evalsha(
            sha(scripts.START), 2, keys.wf_marks(wf, other), keys.wf_lost(wf, other), keys.wf_tasks(wf), other, "w"
        ),
        "EVAL of undeclared keys": lambda: agent.eval("return redis.call('HGETALL', ARGV[1])", 0, keys.wf_results(wf)),
        "XRANGE on the results stream": lambda: agent.xrange(keys.inbox(None)),
        "XACK in another subscription": lambda: agent.xack(keys.sub(other_sub), WORKERS_GROUP, "0-1"),
        # appends that could trim a stream others' work goes through (Redis cannot bound XADD's arguments)
        "XADD MAXLEN 0 to the inbox": lambda: agent.xadd(keys.inbox(None), {"m": b"x"}, maxlen=0),
        f"XADD MAXLEN 0 to {other}'s inbox lane": lambda: agent.xadd(
            keys.agent_inbox(other, None), {"m": b"x"}, maxlen=0
        ),
        "XADD MAXLEN 0 to the events log": lambda: agent.xadd(keys.event_logs[0], {"m": b"x"}, maxlen=0),
        "XADD MAXLEN 0 to the dead letters": lambda: agent.xadd(keys.dlq, {"m": b"x"}, maxlen=0),
        "XADD MAXLEN 0 in another subscription": lambda: agent.xadd(keys.sub(other_sub), {"m": b"x"}, maxlen=0),
        "HSET into the trust list": lambda: agent.hset(keys.trusted_keys, "mallory", "00"),
        "HSET a trigger": lambda: agent.hset(keys.triggers, "evil", "{}"),
        "ZADD a timer": lambda: agent.zadd(keys.timer_sets[0], {"x": 1}),
        "XADD in another namespace": lambda: agent.xadd(f"other:agent:{other}:tasks", {"m": b"x"}),
        "FLUSHALL": lambda: agent.flushall(),
        "CONFIG GET": lambda: agent.config_get("*"),
        "CONFIG SET": lambda: agent.config_set("maxmemory-policy", "allkeys-lru"),
        "KEYS": lambda: agent.keys("*"),
        "ACL LIST": lambda: agent.acl_list(),
        "SCRIPT LOAD of a runaway loop": lambda: agent.script_load(RUNAWAY),
        "FUNCTION LOAD": lambda: agent.function_load(
            f"#!lua name=evil\nredis.register_function('f', function() {RUNAWAY} end)"
        ),
        "SCRIPT KILL": lambda: agent.script_kill(),
    }


def refused_all(denied: dict[str, Callable[[], Any]], user: str) -> None:
    for what, call in denied.items():
        with pytest.raises(NoPermissionError):
            call()
            pytest.fail(f"{user} may {what}")


def test_an_agent_cannot_touch_what_it_does_not_need(deployment: Deployment) -> None:
    keys, root, kalic = deployment.keys, deployment.root, deployment.client("kalic")
    wf = "denied-wf"
    root.hset(keys.wf(wf), mapping={"state": "running", "version": 1})
    root.hset(keys.wf_results(wf), "A", "secret")
    root.xadd(keys.agent_tasks("vssc"), {"m": b"a task"})  # ACLs are checked before groups or types
    root.script_load(scripts.APPLY)
    vssc_tasks = keys.agent_tasks("vssc")
    refused_all(agent_denials(keys, kalic, "vssc", "listener.on_scan", wf), "kalic")
    # ACL DRYRUN says why; the same commands on kalic's own keys pass.
    why = root.execute_command("ACL", "DRYRUN", "kalic", "XADD", vssc_tasks, "*", "m", "x")
    assert why.decode() == f"This user has no permissions to access the '{vssc_tasks}' key"
    mine = root.execute_command("ACL", "DRYRUN", "kalic", "XADD", keys.agent_tasks("kalic"), "*", "m", "x")
    assert mine == b"OK"
    assert kalic.hget(keys.wf(wf), "state") == b"running"  # what its fencing script and unit_states read
    kalic.xadd(keys.agent_inbox("kalic", None), {"m": b"x"})  # its own lane of the inbox
    logged = set(deployment.denials())
    assert ("kalic", vssc_tasks) in logged and ("kalic", keys.wf_results(wf)) in logged


def watch_denials(keys: Keys, watch: redis.Redis, agent: str) -> dict[str, Callable[[], Any]]:
    """What the read-only user must be refused (NOPERM): any write, even one that only moves a group."""
    stream = keys.agent_tasks(agent)
    return {
        "XADD": lambda: watch.xadd(keys.event_logs[0], {"m": b"x"}),
        "HSET": lambda: watch.hset(keys.wf("wf-1"), "state", "cancelled"),
        "EVALSHA of a write script": lambda: watch.evalsha(
            sha(scripts.LEASE), 1, keys.worker_leases("webc"), "me", 1000, "x"
        ),
        "SCRIPT LOAD": lambda: watch.script_load(scripts.LEASE),
        "XREADGROUP (it moves the group)": lambda: watch.xreadgroup(WORKERS_GROUP, "w", {stream: ">"}),
        "XACK": lambda: watch.xack(stream, WORKERS_GROUP, "0-1"),
        "ZADD": lambda: watch.zadd(keys.timer_sets[0], {"x": 1}),
        "DEL": lambda: watch.delete(keys.event_logs[0]),
        "FLUSHALL": lambda: watch.flushall(),
        "CONFIG GET": lambda: watch.config_get("*"),
    }


def test_the_watch_user_cannot_write_anything(deployment: Deployment) -> None:
    keys, root, watch = deployment.keys, deployment.root, deployment.client("watch")
    root.script_load(scripts.LEASE)
    refused_all(watch_denials(keys, watch, "kalic"), "watch")
    # And no command it may run writes at all, by Redis's own flags.
    commands = list(views.access(keys)[0].commands)
    conn = root.connection_pool.get_connection()
    try:
        conn.send_command("COMMAND", "INFO", *commands)
        infos = conn.read_response()
    finally:
        root.connection_pool.release(conn)
    flags = {info[0].decode(): {f.decode() for f in info[2]} for info in infos}
    assert set(flags) == set(commands)
    assert {name for name, f in flags.items() if "write" in f or "admin" in f} == set()
    superusers_only: list[Callable[[redis.Redis], Any]] = [
        lambda c: c.flushall(),
        lambda c: c.config_get("*"),
        lambda c: c.keys("*"),
    ]
    for user in ("admin", "coordinator"):  # the powerful users are still not Redis administrators
        for attempt in superusers_only:
            with pytest.raises(NoPermissionError):
                attempt(deployment.client(user))


# -- the deployment files, statically ----------------------------------------------------------------


def generated() -> set[str]:
    """The files `acl generate` writes for the reference agents."""
    return set(acl.generate("phi", AGENTS, roles=ROLES).files)


_help_checked: dict[tuple[str, ...], None] = {}


def assert_cli_accepts(args: list[str], where: str) -> None:
    """`phibroker ARGS --help` exits 0: the command exists and takes these options."""
    key = tuple(args)
    if key in _help_checked:
        return
    run = subprocess.run(
        [sys.executable, "-m", "phibroker", *args, "--help"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"{where}: `phibroker {shlex.join(args)}` is not a command line: {run.stderr}"
    _help_checked[key] = None


def redis_conf() -> dict[str, str]:
    lines = (DEPLOY / "redis.conf").read_text().splitlines()
    return dict(line.split(None, 1) for line in lines if line.strip() and not line.startswith("#"))


def seconds(text: str | int) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", str(text))
    assert match, text
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_redis_conf_is_durable_never_evicts_and_loads_the_users() -> None:
    conf = redis_conf()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction" and conf["save"] == '""'
    assert conf["aclfile"] == "/etc/redis/users.acl"
    assert "appendfsync always" in (DEPLOY / "redis.conf").read_text()  # the trade-off is explained


def test_compose_runs_every_agent_as_its_own_user() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services: dict[str, Any] = compose["services"]
    files = generated()
    redis_service = services.pop("redis")
    mounts = dict(volume.split(":")[:2] for volume in redis_service["volumes"])
    assert mounts["./secrets/users.acl"] == redis_conf()["aclfile"]
    assert redis_service["command"] == ["redis-server", mounts["./redis.conf"]]
    assert Path(redis_service["env_file"][0]).name in generated()  # the health check's login
    agents = {}
    for name, service in services.items():
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists(), name
        env_files = service["env_file"]
        assert len(env_files) == 1 and Path(env_files[0]).name in files, (name, env_files)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./secrets/"):
                assert source.removeprefix("./secrets/") in files, volume
            elif source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
        args = service.get("command", [])
        assert_cli_accepts(args, f"compose service {name}")
        assert seconds(service["stop_grace_period"]) > STOP_GRACE and service["stop_signal"] == "SIGTERM"
        if args[:1] == ["worker"]:
            agent = args[args.index("--agent") + 1]
            agents[agent] = env_files
        if args[:1] == ["coordinator"]:
            assert service["deploy"]["replicas"] >= 2
            assert f"./secrets/identities.json:{acl.IDENTITIES_PATH}:ro" in service["volumes"]
            assert env_files == ["secrets/coordinator.env"]
    assert agents == {a: [f"secrets/{a}.env"] for a in AGENTS}


def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()) if d]
    return docs


def test_kubernetes_manifests_wire_each_deployment_to_its_secret() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = generated()
    secrets: dict[str, list[str]] = {}
    for generator in kustomization["secretGenerator"]:
        sources = generator.get("envs", []) + generator.get("files", [])
        assert all(s.startswith("secrets/") and s.removeprefix("secrets/") in files for s in sources), generator
        secrets[generator["name"]] = [s.removeprefix("secrets/") for s in sources]
    docs = k8s_documents()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        by_kind.setdefault(doc["kind"], []).append(doc)
    (config,) = by_kind["ConfigMap"]
    assert config["data"]["redis.conf"] == (DEPLOY / "redis.conf").read_text()
    agents, coordinators = {}, []
    for workload in by_kind["Deployment"] + by_kind["StatefulSet"]:
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
            mounted = [volumes[m["name"]] for m in container.get("volumeMounts", []) if m["name"] in volumes]
            refs += [v["secret"]["secretName"] for v in mounted if "secret" in v]
            assert all(ref in secrets for ref in refs), refs
            if not container["image"].startswith("phibroker"):
                continue
            args = container["args"]
            assert_cli_accepts(args, f"k8s {workload['metadata']['name']}")
            assert pod["terminationGracePeriodSeconds"] > STOP_GRACE
            assert pod["securityContext"]["runAsNonRoot"]
            if args[0] == "worker":
                agents[args[args.index("--agent") + 1]] = secrets[refs[0]]
            if args[0] == "coordinator":
                coordinators.append(workload)
                assert secrets[refs[0]] == ["coordinator.env"]
                (mount,) = [m for m in container["volumeMounts"] if m["name"] == "identities"]
                assert mount["mountPath"] == str(Path(acl.IDENTITIES_PATH).parent)
                assert secrets[volumes["identities"]["secret"]["secretName"]] == ["identities.json"]
    assert agents == {a: [f"{a}.env"] for a in AGENTS}
    (coordinator,) = coordinators
    assert coordinator["spec"]["replicas"] >= 2
    (redis_set,) = by_kind["StatefulSet"]
    redis_pod = redis_set["spec"]["template"]["spec"]
    (acl_volume,) = [v for v in redis_pod["volumes"] if v["name"] == "acl"]
    assert secrets[acl_volume["secret"]["secretName"]] == ["users.acl"]
    (acl_mount,) = [m for m in redis_pod["containers"][0]["volumeMounts"] if m["name"] == "acl"]
    assert acl_mount["mountPath"] == str(Path(redis_conf()["aclfile"]).parent)


def systemd_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file: section -> key -> values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: {line}"
        key, value = line.split("=", 1)
        current.setdefault(key, []).append(value)
    return sections


@pytest.mark.parametrize("unit", ["phibroker-coordinator.service", "phibroker-worker@.service"])
def test_systemd_units_run_cli_commands_with_the_generated_env_files(unit: str) -> None:
    sections = systemd_unit(DEPLOY / "systemd" / unit)
    service = {k: v[-1] for k, v in sections["Service"].items()}
    assert service["Restart"] == "always" and service["KillSignal"] == "SIGTERM"
    assert seconds(service["TimeoutStopSec"]) > STOP_GRACE
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]
    files = generated()
    instances = AGENTS if "%i" in service["ExecStart"] else [""]
    for agent in instances:
        binary, *args = shlex.split(service["ExecStart"].replace("%i", agent))
        assert binary.endswith("/phibroker")
        assert_cli_accepts(args, unit)
        env_file = Path(service["EnvironmentFile"].replace("%i", agent))
        assert env_file.name in files
        if args[0] == "coordinator":
            assert env_file.name == "coordinator.env"
            assert str(env_file.parent) == str(Path(acl.IDENTITIES_PATH).parent)  # next to identities.json
        else:
            assert env_file.name == f"{agent}.env"


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    binary = shutil.which("phibroker") or str(Path(sys.executable).parent / "phibroker")
    if analyze is None or not Path(binary).exists():
        pytest.skip("systemd-analyze or the phibroker script is not here")
    for unit in (DEPLOY / "systemd").glob("*.service"):  # ExecStart must exist for verify to pass
        text = unit.read_text().replace("/opt/phibroker/bin/phibroker", binary)
        (tmp_path / unit.name).write_text(text)
    names = ["phibroker-coordinator.service", *(f"phibroker-worker@{a}.service" for a in AGENTS)]
    run = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in names)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in (run.stdout + run.stderr).splitlines() if "phibroker" in line]
    assert run.returncode == 0 and complaints == [], run.stdout + run.stderr


def test_the_dockerfile_builds_a_non_root_phibroker_image() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instructions = [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    (user,) = [arg for op, arg in instructions if op == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert [arg for op, arg in instructions if op == "ENTRYPOINT"] == ['["phibroker"]']
    for op, arg in instructions:
        if op == "COPY":
            *sources, _ = arg.split()
            assert all((REPO / s).exists() for s in sources), arg
    assert_cli_accepts(json.loads([arg for op, arg in instructions if op == "CMD"][0])[:-1], "Dockerfile CMD")
