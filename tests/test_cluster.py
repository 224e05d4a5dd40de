"""phibroker on a Redis Cluster (3 masters and 3 replicas on free ports): real coordinator and worker
processes run chains, fan-outs, retries, approvals, cancels and sub-workflows to their end, with one
coordinator and with two, and the views and the web page answer on a `redis+cluster://` URL.

No clock is compared: each wait is generous, and what is checked is how every run ended."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from phibroker import wire, workflow
from phibroker.errors import BrokerUnavailable
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.store.connection import Connection, cluster_seeds, stream_read_keys
from phibroker.store.coordinator import CoordinatorStore
from phibroker.workflow import Workflow, check
from tests.conftest import Processes, RedisCluster, RedisServer, free_port, short_settings, until
from tests.test_choreography import ANNOUNCE, TRIGGERED, listening
from tests.test_web import GATED, answers, get, read_stream

ENDED = {b"succeeded", b"failed", b"cancelled", b"timed_out"}
# 200 small runs: every kind of ordering the broker relies on (dispatch after commit, result before
# ack, effects before their outbox entry's removal, a child run's creation before its kick)
MIX = {"chain": 50, "fan-out": 50, "retry": 40, "sub-workflow": 30, "approval": 15, "cancel": 15}


@pytest.fixture
def settings(redis_cluster: RedisCluster, tmp_path: Path) -> Settings:
    """The cluster, a namespace of its own; leases long enough that a process slowed by a loaded machine
    keeps its own (what is checked is that runs end, not how fast a dead process is replaced)."""
    short = short_settings(redis_cluster.url, tmp_path / "home", prefix="cl")
    return short.model_copy(update={"reclaim_after": 10.0, "coordinator_takeover": 5.0})


def phibroker(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = Processes(settings, Path()).env()
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_a_cluster_url_names_its_seeds_and_a_bad_one_is_one_line(
    redis_cluster: RedisCluster, settings: Settings
) -> None:
    assert cluster_seeds("rediss+cluster://u:p%40ss@a:7001,[::1]:7002/?ssl_cert_reqs=none") == (
        "rediss://u:p%40ss@a:7001/0?ssl_cert_reqs=none",
        [("a", 7001), ("::1", 7002)],
    )
    for url, says in (
        ("redis+cluster://a:7001,b/", "b is not HOST:PORT"),
        ("redis+cluster://a:7001/2", "database 0 only"),
        ("redis+cluster://127.0.0.1:1/", "cannot reach the Redis Cluster"),
    ):
        with pytest.raises(BrokerUnavailable, match=says):
            Connection(Settings(redis_url=url))
    plain = Connection(Settings(redis_url=f"redis://127.0.0.1:{redis_cluster.nodes[0].port}/0"))
    with pytest.raises(BrokerUnavailable, match="is a node of a Redis Cluster: set PHIBROKER_REDIS_URL"):
        plain.ping()  # a plain client would be sent elsewhere (MOVED) by every command
    plain.close()
    bad = phibroker(settings.model_copy(update={"redis_url": "redis+cluster://a:7001/2"}), "list")
    assert bad.returncode == 3 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad.stderr


def shapes(directory: Path) -> dict[str, Workflow]:
    probe: dict[str, Any] = {"agent": "probe", "command": "work"}
    (directory / "team.yaml").write_text(
        "name: team\ntasks:\n  Check: {agent: probe, command: work}\n"
        "  Sign: {agent: probe, command: work, depends_on: [Check]}\n"
    )
    (directory / "lead.yaml").write_text(
        "name: lead\ntasks:\n  Draft: {agent: probe, command: work}\n"
        "  Review: {workflow: team.yaml, depends_on: [Draft]}\n"
        "  Ship: {agent: probe, command: work, depends_on: [Review]}\n"
    )
    fan = {"A": probe, **{f"B{i}": {**probe, "depends_on": ["A"]} for i in range(4)}}
    flaky = {"agent": "probe", "command": "flaky", "payload": {"failures": 1}}
    return {
        "chain": check(
            {
                "name": "chain",
                "tasks": {"A": probe, "B": {**probe, "depends_on": ["A"]}, "C": {**probe, "depends_on": ["B"]}},
            }
        ),
        "fan-out": check(
            {"name": "fan-out", "tasks": {**fan, "D": {**probe, "depends_on": [f"B{i}" for i in range(4)]}}}
        ),
        "retry": check(
            {
                "name": "retry",
                "tasks": {
                    "Flaky": {**flaky, "retry": {"max_attempts": 3, "base_delay": 0.05}},
                    "After": {**probe, "depends_on": ["Flaky"]},
                },
            }
        ),
        "approval": check(
            {
                "name": "approval",
                "tasks": {
                    "Build": probe,
                    "Gate": {"depends_on": ["Build"], "approval": {"message": "ship?", "timeout": "1h"}},
                    "Ship": {**probe, "depends_on": ["Gate"]},
                },
            }
        ),
        "cancel": check(
            {"name": "cancel", "tasks": {"Hold": {"agent": "probe", "command": "hold", "payload": {"sleep": 120}}}}
        ),
        "sub-workflow": workflow.load(directory / "lead.yaml"),
    }


def states(client: Client, ids: list[str]) -> list[bytes | None]:
    pipe = client.broker.redis.pipeline(transaction=False)  # one pipeline over every node
    for wf_id in ids:
        pipe.hget(client.settings.keys.wf(wf_id), "state")
    return list(pipe.execute())


@pytest.mark.parametrize("coordinators", [1, 2])
def test_every_kind_of_run_ends_on_a_cluster(
    coordinators: int, settings: Settings, procs: Processes, client: Client, tmp_path: Path
) -> None:
    keys = settings.keys
    for _ in range(coordinators):
        procs.coordinator()
    for _ in range(2):
        procs.worker("probe", app="tests.apps.probe", concurrency=8)

    def up() -> bool:
        return (
            len(client.broker.leases(keys.coordinators)[1]) >= coordinators
            and len(client.broker.worker_leases()[1]) >= 2
        )

    until(up, procs, timeout=60)
    kinds = shapes(tmp_path)
    ids = {kind: [client.submit(kinds[kind]) for _ in range(count)] for kind, count in MIX.items()}

    every = [wf_id for group in ids.values() for wf_id in group]
    cancelled: set[str] = set()
    approved: set[str] = set()

    def ended() -> bool:
        """Cancel each `cancel` run once its task runs (a stop notice reaches its worker), approve each
        approval once it waits; True once every run has ended."""
        for wf_id in ids["cancel"]:
            if wf_id not in cancelled and client.status(wf_id)["tasks"]["Hold"]["state"] == "running":
                client.cancel(wf_id)
                cancelled.add(wf_id)
        for request in client.approvals():
            if request["id"] not in approved:
                client.approve(request["id"])
                approved.add(request["id"])
        return all(state in ENDED for state in states(client, every))

    until(ended, procs, timeout=180)
    assert len(cancelled) == MIX["cancel"] and len(approved) == MIX["approval"]

    for kind, group in ids.items():
        for wf_id in group:
            status = client.status(wf_id)
            assert status["state"] == ("cancelled" if kind == "cancel" else "succeeded"), (kind, status)
            if kind != "cancel":
                attempts = {name: task["attempts"] for name, task in status["tasks"].items() if task["agent"]}
                assert attempts == {name: 2 if name == "Flaky" else 1 for name in attempts}, (kind, status)
        if kind == "sub-workflow":
            children = [client.status(client.status(wf_id)["tasks"]["Review"]["child"]) for wf_id in group]
            assert {child["state"] for child in children} == {"succeeded"}

    if coordinators == 1:  # the events log: a run's events in one stream of it, its streams on every master
        on = client.broker.redis
        logged = {
            log: {event.get("workflow") for _, f in on.xrange(log) for event in wire.decode_events(f[b"m"], 1 << 24)}
            for log in keys.event_logs
        }
        for wf_id in every:
            assert {log for log, runs in logged.items() if wf_id in runs} == {keys.event_log(wf_id)}, wf_id
        assert len({on.get_node_from_key(log).name for log in keys.event_logs}) == 3

    if coordinators == 1:  # the views, on the cluster's URL
        wf_id = ids["sub-workflow"][0]
        for args, says in (
            (("status", wf_id), "succeeded"),
            (("list", "--limit", "500"), wf_id),
            (("watch", "--once"), "probe"),
            (("why", wf_id), "ended"),
            (("agents",), "alive"),
        ):
            shown = phibroker(settings, *args)
            assert shown.returncode == 0 and says in shown.stdout, (args, shown.stdout, shown.stderr)


def test_subscriptions_and_triggers_on_a_cluster(
    procs: Processes, client: Client, settings: Settings, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A listener's worker reads its task lanes and three subscription streams, each in a slot of its
    own; a trigger starts a run from the events a drain routes."""
    ledger = redis.Redis.from_url(redis_server.url)  # the test agents count on one server, with a plain client
    key = f"{settings.namespace}:ledger"
    (tmp_path / "triaged.yaml").write_text(TRIGGERED)
    (tmp_path / "announce.yaml").write_text(ANNOUNCE)
    client.add_trigger(tmp_path / "triaged.yaml")
    procs.coordinator()
    procs.worker("emitter", app="tests.apps.choreo")
    procs.worker("listener", app="tests.apps.choreo", PROBE_LEDGER_URL=redis_server.url, PROBE_LEDGER_KEY=key)
    listening(client, {"listener.on_scan", "listener.high", "listener.x"}, procs)
    for severity in ("high", "low"):
        run = client.submit(tmp_path / "announce.yaml", params={"count": 3, "severity": severity})
        assert client.wait(run, timeout=60)["state"] == "succeeded"

    def seen(name: str) -> list[int]:
        return [int(n) for n in ledger.hvals(f"{key}:{name}")]

    until(lambda: len(seen("listener.on_scan")) == 6 and len(seen("listener.high")) == 3, procs, timeout=60)
    until(lambda: len([w for w in client.list() if w["name"] == "triaged"]) == 3, procs, timeout=60)
    assert set(seen("listener.on_scan")) == set(seen("listener.high")) == {1}  # each event once
    for row in [w for w in client.list() if w["name"] == "triaged"]:
        assert client.wait(row["id"], timeout=60)["state"] == "succeeded"


CHAIN = """
name: chain
tasks:
  A: {agent: probe, command: work}
  B: {agent: probe, command: work, payload: {sleep: 1}, depends_on: [A]}
  C: {agent: probe, command: work, depends_on: [B]}
"""


def ui(procs: Processes) -> str:
    """A read-only `phibroker ui` on the cluster's URL; its base address once it answers."""
    port = free_port()
    procs.spawn("ui", "ui", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    until(lambda: answers(base + "/"), procs, timeout=60)
    return base


def test_the_web_page_on_a_cluster(settings: Settings, procs: Processes, client: Client, tmp_path: Path) -> None:
    """The page's JSON answers what the CLI's `--json` prints, and a run's event stream, opened while
    the run goes on, delivers every record of its output stream up to its end, then closes."""
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe", concurrency=4)
    base = ui(procs)
    until(lambda: "probe" in client.live_agents(), procs, timeout=60)
    (tmp_path / "chain.yaml").write_text(CHAIN)
    (tmp_path / "gated.yaml").write_text(GATED)

    wf_id = client.submit(tmp_path / "chain.yaml")
    messages = read_stream(f"{base}/api/runs/{wf_id}/stream")
    assert client.status(wf_id)["state"] == "succeeded"
    events = [m["event"] for m in messages]
    assert events[0] == "workflow.submitted" and events[-1] == "workflow.succeeded", events
    succeeded = [json.loads(m["data"])["task"] for m in messages if m["event"] == "task.succeeded"]
    assert succeeded == ["A", "B", "C"]
    assert [json.loads(m["data"]) for m in messages] == json.loads(json.dumps(list(client.stream(wf_id)), default=str))
    resumed = read_stream(f"{base}/api/runs/{wf_id}/stream", {"Last-Event-ID": messages[2]["id"]})
    assert resumed == messages[3:]

    gated = client.submit(tmp_path / "gated.yaml")
    until(lambda: client.status(gated)["state"] == "waiting_approval", procs, timeout=60)

    def same(route: str, *command: str) -> bool:  # read twice, a moment apart: allow for a late write
        shown = phibroker(settings, *command, "--json")
        assert shown.returncode == 0, shown.stderr
        return bool(get(base + route)[1] == json.loads(shown.stdout))

    until(lambda: same("/api/runs", "list"), procs, timeout=60)
    until(lambda: same("/api/runs?limit=1&state=succeeded", "list", "--limit", "1", "--state", "succeeded"), procs)
    for run in (wf_id, gated):
        until(lambda: same(f"/api/runs/{run}", "status", run), procs, timeout=60)  # noqa: B023 - called at once
    until(lambda: same("/api/approvals", "approvals"), procs, timeout=60)
    moving = ("last_heartbeat", "since_heartbeat", "expires", "handled", "in_flight")
    shown = phibroker(settings, "agents", "--json")
    steady = [[{k: v for k, v in row.items() if k not in moving} for row in rows]
              for rows in (get(base + "/api/agents")[1], json.loads(shown.stdout))]  # fmt: skip
    assert steady[0] == steady[1] and [row["agent"] for row in steady[0]] == ["probe"]
    lanes = until(lambda: (lane := get(base + "/api/streams")[1]["probe"])["pending"] == 0 and lane, procs)
    assert lanes["length"] == 4  # A, B, C and Build, each dispatched once
    code, page = get(f"{base}/runs/{wf_id}")
    drawn = re.findall(r'<g class="node [a-z]+" data-task="([^"]+)" data-state="([^"]+)"', page)
    assert code == 200 and dict(drawn) == {"A": "succeeded", "B": "succeeded", "C": "succeeded"}
    assert get(f"{base}/api/runs/no-such-run/stream")[0] == 404
    client.cancel(gated)


def test_a_coordinator_killed_mid_run_leaves_its_inbox_shards_to_the_other(
    settings: Settings, procs: Processes, client: Client, redis_server: RedisServer
) -> None:
    """200 runs of 10 tasks with two coordinators, each leasing half of the inbox's shards; one is
    killed (kill -9) mid-run. The other takes its shards and its pending entries over: every run
    succeeds, and each task's handler ran once (a ledger outside the cluster counts them)."""
    keys = settings.keys
    ledger = f"{settings.namespace}:ledger"
    effects = redis.Redis.from_url(redis_server.url, decode_responses=True)
    env = {"PROBE_LEDGER_URL": redis_server.url, "PROBE_LEDGER_KEY": ledger}
    doomed = procs.coordinator()
    procs.coordinator()
    for _ in range(2):
        procs.worker("probe", app="tests.apps.probe", concurrency=8, **env)
    shards = len(keys.inbox_lanes)

    def owners() -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in client.broker.redis.hgetall(keys.inbox_owners).items()}

    def split() -> bool:  # each coordinator leases its fair share, every shard leased
        held = owners()
        return len(held) == shards and sorted(Counter(held.values()).values()) == [shards // 2] * 2

    until(split, procs, timeout=60)
    step = {"agent": "probe", "command": "effect", "payload": {"sleep": 0.01}}
    ten = check(
        {
            "name": "ten",
            "tasks": {
                "A": step,
                **{f"B{i}": {**step, "depends_on": ["A"]} for i in range(8)},
                "C": {**step, "depends_on": [f"B{i}" for i in range(8)]},
            },
        }
    )
    ids = [client.submit(ten) for _ in range(200)]
    until(lambda: effects.hlen(ledger) >= 400, procs, timeout=120)
    doomed.kill()
    doomed.wait()
    until(lambda: all(state in ENDED for state in states(client, ids)), procs, timeout=180)

    for wf_id in ids:
        status = client.status(wf_id)
        assert status["state"] == "succeeded", status
    assert sorted(effects.hkeys(ledger)) == sorted(f"{wf_id}:{task}" for wf_id in ids for task in ten.spec.tasks)
    assert set(effects.hvals(f"{ledger}:runs")) == {"1"}  # no handler ran twice
    # the survivor leases every shard, the dead one none
    until(lambda: len(set(owners().values())) == 1 and f":{doomed.pid}:" not in next(iter(owners().values())))
    assert len(owners()) == shards
    # each run's messages went to its own shard of the inbox: the workers' to their agent's lanes there
    on = client.broker.redis
    results = 0
    for lane in keys.lanes(["probe"]):
        for _, fields in on.xrange(lane):
            message = wire.Inbox.decode(fields[b"m"], 1 << 24)
            results += len(message.results)
            runs = {result.wf for result in message.results} or {message.body.get("wf")}
            events = message.body.get("events") or ()
            runs |= {event.get("workflow") for event in events} if message.kind == "events" else set()
            wanted = {keys.inbox(wf_id) for wf_id in runs}
            if message.kind in ("results", "events", "joined"):
                wanted = {keys.agent_inbox("probe", wf_id, bulk) for wf_id in runs for bulk in (False, True)}
            assert lane in wanted, (lane, message.kind, runs)
    assert results


def test_stream_reads_are_routed_without_asking_a_node(settings: Settings) -> None:
    """The cluster client finds the streams of XREAD and XREADGROUP itself: no `COMMAND GETKEYS` round
    trip before each read (a coordinator's round reads 8 shards, a worker's read its lanes)."""
    assert stream_read_keys(
        ("XREADGROUP", b"GROUP", "g", "STREAMS", "COUNT", "2", "BLOCK", "5", "STREAMS", "a", "b", ">", ">")
    ) == ["a", "b"]
    assert stream_read_keys(("XREAD", "COUNT", 1, "BLOCK", 5, "STREAMS", "a", "0-0")) == ["a"]
    assert stream_read_keys(("XADD", "a", "*", "m", "1")) is None
    store = CoordinatorStore(settings)
    lanes = settings.keys.lanes(["probe"])
    for lane in lanes:
        store.ensure_group(lane, "coordinators")

    def asked() -> int:
        return sum(
            int(node.redis_connection.info("commandstats").get("cmdstat_command|getkeys", {}).get("calls", 0))
            for node in store.redis.get_primaries()
        )

    before = asked()
    store.read_groups(lanes, "coordinators", "probe", 10, None)
    store.poll(lanes, "coordinators", "probe", 10, None, False, {}, settings.keys.timer_sets[0])
    assert not store.read_groups(settings.keys.shard_lanes(0, ["probe"]), "coordinators", "probe", 10, 0.01)  # blocking
    assert asked() == before
    store.close()
