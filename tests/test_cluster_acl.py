"""ACL users on a Redis Cluster: every node loads the users.acl that `phibroker acl generate --cluster`
writes, and a coordinator, a worker and a client, each as its own user from its env file (a
`redis+cluster://` URL naming the nodes), run a workflow to its end with no command refused anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from click.testing import CliRunner

from phibroker.cli import main
from phibroker.settings import Settings
from phibroker.store.connection import SHAS
from tests.conftest import Processes, RedisCluster, _have_redis, until

ROOT = ("test-root", "test-root-password")  # the test's own superuser: the harness and the replicas log in as it
FLOW = """
name: chain
tasks:
  A: {agent: probe, command: work}
  B: {agent: probe, command: flaky, payload: {failures: 1}, retry: {max_attempts: 3, base_delay: 0.05}, depends_on: [A]}
  C: {agent: probe, command: work, depends_on: [B]}
"""


def parse_env(text: str) -> dict[str, str]:
    """An env file as a process gets it: KEY=VALUE lines, `#` comments."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


@dataclass
class Deployment:
    cluster: RedisCluster
    secrets: Path
    namespace: str

    def env(self, user: str) -> dict[str, str]:
        """What the user's env file says, as a process gets it."""
        return parse_env((self.secrets / f"{user}.env").read_text())

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, username=ROOT[0], password=ROOT[1])

    def denials(self) -> list[tuple[int, str, str]]:
        """(port, user, what) of every ACL denial on every node."""
        return [
            (node.port, str(entry.get("username")), str(entry.get("object")))
            for node in self.cluster.nodes
            for entry in self.node(node.port).acl_log(count=1000)
        ]

    def scripts_loaded(self) -> bool:
        """Every master holds phibroker's scripts (only a coordinator may load them)."""
        masters = [node for node in self.cluster.nodes if self.cluster.role(node) == "master"]
        return all(all(self.node(node.port).script_exists(*SHAS.values())) for node in masters)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A cluster whose every node loads the generated users (and the test's superuser)."""
    if not _have_redis():
        pytest.skip("redis-server is not installed")
    aclfile, secrets = tmp_path / "users.acl", tmp_path / "secrets"
    namespace = f"c{uuid.uuid4().hex[:8]}"
    cluster = RedisCluster(tmp_path / "cluster", aclfile=aclfile, auth=ROOT)
    nodes = ",".join(f"127.0.0.1:{node.port}" for node in cluster.nodes)
    generated(secrets, namespace, "--cluster", nodes, "--identities-path", str(secrets / "identities.json"))
    aclfile.write_text(f"user {ROOT[0]} on >{ROOT[1]} ~* &* +@all\n" + (secrets / "users.acl").read_text())
    with cluster:
        yield Deployment(cluster, secrets, namespace)


def test_each_process_runs_as_its_own_user_on_every_node(deployment: Deployment, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    client_env = deployment.env("client")
    assert client_env["PHIBROKER_REDIS_URL"].startswith("redis+cluster://client:")
    settings = Settings(redis_url=client_env["PHIBROKER_REDIS_URL"], namespace=deployment.namespace, home=tmp_path)
    procs = Processes(settings, logs)
    (tmp_path / "chain.yaml").write_text(FLOW)
    try:
        procs.spawn("coordinator", "coordinator", **deployment.env("coordinator"))
        until(deployment.scripts_loaded, procs, timeout=60)  # the others may only call them
        procs.spawn(
            "worker-probe", "worker", "--agent", "probe", "--app", "tests.apps.probe", **deployment.env("probe")
        )
        submit = ["submit", str(tmp_path / "chain.yaml"), "--wait", "--timeout", "60s", "--json"]
        submitted = phibroker(procs, client_env, *submit)
        assert submitted.returncode == 0, (submitted.stderr, procs.output())
        status = json.loads(submitted.stdout)
        assert status["state"] == "succeeded", status
        assert {task["history"][-1]["worker"].split("@")[0] for task in status["tasks"].values()} == {"probe"}
        assert status["tasks"]["B"]["attempts"] == 2  # a retry's timer too
        shown = phibroker(procs, deployment.env("watch"), "status", status["id"], "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "succeeded", shown.stderr
    finally:
        procs.close()
    said = procs.output() + submitted.stderr + shown.stderr
    assert "NOPERM" not in said and "no permissions" not in said, said
    assert deployment.denials() == []

    # The same user made for one server (no --cluster) may not ask where the slots are: one line, exit 3.
    watch = rules_of(generated(tmp_path / "plain", deployment.namespace), "watch")
    for node in deployment.cluster.nodes:
        deployment.node(node.port).execute_command("ACL", "SETUSER", "plain", "reset", "on", ">pw", *watch)
    nodes = client_env["PHIBROKER_REDIS_URL"].partition("@")[2]
    refused = phibroker(procs, {"PHIBROKER_REDIS_URL": f"redis+cluster://plain:pw@{nodes}"}, "list")
    assert refused.returncode == 3 and refused.stderr.count("\n") == 1, refused.stderr
    assert "may not ask the cluster" in refused.stderr and "acl generate --cluster" in refused.stderr
    assert ":pw@" not in refused.stderr  # the password is not shown


def phibroker(procs: Processes, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`phibroker ARGS` with a user's env file."""
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args],
        env=procs.env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def generated(out: Path, namespace: str, *options: str) -> Path:
    """`phibroker acl generate` for the agent `probe` into `out`."""
    args = ["--namespace", namespace, "acl", "generate", "--agents", "probe", "--out", str(out), *options]
    made = CliRunner().invoke(main, args)
    assert made.exit_code == 0, made.output
    return out


def rules_of(out: Path, user: str) -> list[str]:
    """A user's rules as users.acl holds them (after `user NAME reset on #HASH`)."""
    line = next(line for line in (out / "users.acl").read_text().splitlines() if line.startswith(f"user {user} "))
    return line.split()[5:]


def test_acl_generate_names_a_clusters_nodes_and_grants_what_its_client_asks(tmp_path: Path) -> None:
    out = generated(tmp_path / "cluster", "phi", "--cluster", "10.0.0.1:7000,[::1]:7001", "--tls")
    for env in out.glob("*.env"):
        user = env.stem
        url = urlsplit(parse_env(env.read_text())["PHIBROKER_REDIS_URL"])
        assert (url.scheme, url.username, url.path) == ("rediss+cluster", user, "/")
        assert url.netloc.endswith("@10.0.0.1:7000,[::1]:7001"), url  # every node named
        assert {f"+{command}" for command in ("cluster|slots", "command", "asking")} <= set(rules_of(out, user))
    one_server = generated(tmp_path / "one", "phi", "--host", "redis", "--port", "6380")
    assert "cluster" not in (one_server / "users.acl").read_text()  # granted to a cluster's users only
    assert parse_env((one_server / "client.env").read_text())["PHIBROKER_REDIS_URL"].startswith("redis://client:")
    for bad, says in (
        (["--cluster", "a:7000,b"], "--cluster 'b': name the nodes as HOST:PORT[,HOST:PORT...]"),
        (["--cluster", "a:70000"], "--cluster 'a:70000'"),
        (["--cluster", "a:7000", "--host", "b"], "--cluster names the nodes: leave out --host and --port"),
    ):
        args = ["acl", "generate", "--agents", "probe", "--out", str(tmp_path / "out"), *bad]
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 2 and refused.output.count("\n") == 1 and says in refused.output, refused.output
        assert not (tmp_path / "out").exists()
