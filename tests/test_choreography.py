"""Choreography on real Redis: subscriptions, emitted events, event-triggered workflows, the storm guard."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from phibroker.engine import records
from phibroker.runtime.client import Client
from phibroker.security import signing
from phibroker.settings import Settings
from phibroker.store.worker import WorkerStore
from tests.conftest import Processes, until
from tests.test_core import events_of
from tests.test_failures import flow

APP = "tests.apps.choreo"


@pytest.fixture
def ledger(settings: Settings) -> Iterator[dict[str, str]]:
    yield {"PROBE_LEDGER_URL": settings.redis_url, "PROBE_LEDGER_KEY": f"{settings.namespace}:ledger"}


def counts(settings: Settings, subscription: str) -> dict[str, int]:
    r = redis.Redis.from_url(settings.redis_url)
    raw = r.hgetall(f"{settings.namespace}:ledger:{subscription}")
    return {k.decode(): int(v) for k, v in raw.items()}


def seen_types(settings: Settings, subscription: str, what: str = "types") -> list[str]:
    r = redis.Redis.from_url(settings.redis_url)
    return [v.decode() for v in r.lrange(f"{settings.namespace}:ledger:{subscription}:{what}", 0, -1)]


def listening(client: Client, names: set[str], procs: Processes) -> None:
    """Wait until the subscriptions are registered and the routers have read them (1 s refresh)."""
    deadline = time.monotonic() + 20
    while not names <= {row["name"] for row in client.subscriptions()}:
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    time.sleep(1.2)


ANNOUNCE = """
name: announce
params: {count: 1, severity: low}
tasks:
  A: {agent: emitter, command: announce, payload: {count: "${params.count}", severity: "${params.severity}"}}
"""


def test_an_event_reaches_a_subscription_once_with_two_workers_and_two_subscriptions_both_fire(
    procs: Processes, client: Client, settings: Settings, ledger: dict[str, str], tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("emitter", app=APP)
    for _ in range(2):
        procs.worker("listener", app=APP, **ledger)
    procs.worker("other", app=APP, **ledger)
    listening(client, {"listener.on_scan", "other.other_scan"}, procs)
    path = flow(tmp_path, ANNOUNCE)
    for _ in range(10):
        assert client.wait(client.submit(path, params={"count": 5}), timeout=30)["state"] == "succeeded"
    until(
        lambda: len(counts(settings, "listener.on_scan")) == 50 and len(counts(settings, "other.other_scan")) == 50,
        procs,
    )
    time.sleep(0.5)
    assert set(counts(settings, "listener.on_scan").values()) == {1}
    assert set(counts(settings, "other.other_scan").values()) == {1}
    workers = {row["consumer"] for row in consumers(settings)}
    assert len(workers) >= 2  # both listener workers shared the stream


def consumers(settings: Settings) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(settings.redis_url)
    rows = r.xinfo_consumers(settings.keys.sub("listener.on_scan"), "workers")
    return [{"consumer": row["name"], "pending": row["pending"]} for row in rows]


def test_a_retried_attempts_events_are_never_published(
    procs: Processes, client: Client, settings: Settings, ledger: dict[str, str], tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("emitter", app=APP)
    procs.worker("listener", app=APP, **ledger)
    listening(client, {"listener.x"}, procs)
    path = flow(
        tmp_path, "name: flaky\ntasks:\n  A: {agent: emitter, command: flaky_emit, retry: {base_delay: 10ms}}\n"
    )
    wf_id = client.submit(path)
    assert client.wait(wf_id, timeout=30)["state"] == "succeeded"
    until(lambda: seen_types(settings, "listener.x"), procs)
    time.sleep(0.5)
    assert seen_types(settings, "listener.x") == ["x.attempt2|2"]
    assert [e["type"] for e in events_of(settings, wf_id) if e["type"].startswith("x.")] == ["x.attempt2"]


def test_a_where_filter(
    procs: Processes, client: Client, settings: Settings, ledger: dict[str, str], tmp_path: Path
) -> None:
    procs.coordinator()
    procs.worker("emitter", app=APP)
    procs.worker("listener", app=APP, **ledger)
    procs.worker("other", app=APP, **ledger)  # on the roster: the coordinators read its lane
    listening(client, {"listener.high", "listener.on_scan", "listener.emitted", "other.other_scan"}, procs)
    path = flow(tmp_path, ANNOUNCE)
    for severity in ("low", "high", "low", "high", "high"):
        client.wait(client.submit(path, params={"severity": severity}), timeout=30)
    other = WorkerStore(settings)  # other's user, claiming the event is emitter's
    other.serve("other")
    other.relay([records.event("scan.finished", None, None, {"severity": "high"}, agent="emitter")])
    until(lambda: len(counts(settings, "listener.on_scan")) == 6 and len(counts(settings, "listener.high")) >= 4, procs)
    time.sleep(0.5)
    assert len(counts(settings, "listener.high")) == 4
    assert len(counts(settings, "listener.emitted")) == 5  # `agent` is the sender's, whatever it claimed


TRIGGERED = """
name: triaged
params: {severity: low, target: nowhere, n: -1}
on: {event: scan.finished, where: "data.severity == 'high' and agent == 'emitter'"}
tasks:
  Triage: {agent: emitter, command: announce, payload: {kind: triage.done, severity: "${params.severity}"}}
"""


def test_a_trigger_starts_a_workflow_once_per_event_with_two_coordinators(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    client.add_trigger(flow(tmp_path, TRIGGERED))
    assert [t["name"] for t in client.triggers()] == ["triaged"]
    procs.coordinator()
    procs.coordinator()
    procs.worker("emitter", app=APP)
    time.sleep(1.2)
    path = tmp_path / "announce.yaml"
    path.write_text(ANNOUNCE)
    for severity in ("high", "low", "high"):
        client.wait(client.submit(path, params={"count": 2, "severity": severity}), timeout=30)
    until(lambda: len([w for w in client.list() if w["name"] == "triaged"]) >= 4, procs)
    time.sleep(1.0)
    started = [w for w in client.list() if w["name"] == "triaged"]
    assert len(started) == 4  # two high announcements of two events each
    for row in started:
        status = client.wait(row["id"], timeout=30)
        assert status["state"] == "succeeded"
        assert status["params"]["severity"] == "high" and status["params"]["target"] == "repo"
        assert status["params"]["n"] in (0, 1)
    client.remove_trigger("triaged")
    assert client.triggers() == []


def test_a_reaction_loop_stops_at_the_depth_limit_in_the_dlq(
    procs: Processes, client: Client, settings: Settings, ledger: dict[str, str], tmp_path: Path
) -> None:
    env = {**ledger, "PHIBROKER_STORM_DEPTH": "6"}
    procs.coordinator(PHIBROKER_STORM_DEPTH="6")
    procs.worker("emitter", app=APP)
    procs.worker("ping", app=APP, **env)
    procs.worker("pong", app=APP, **env)
    listening(client, {"ping.on_ping", "pong.on_pong"}, procs)
    path = flow(tmp_path, "name: start\ntasks:\n  A: {agent: emitter, command: announce, payload: {kind: ping}}\n")
    wf_id = client.submit(path)
    client.wait(wf_id, timeout=30)
    until(lambda: any("storm guard" in row["reason"] for row in client.dead_letters()), procs)
    time.sleep(1.0)
    (storm,) = [row for row in client.dead_letters() if "storm guard" in row["reason"]]
    assert storm["chain"][0].startswith("ping@") and len(storm["chain"]) == 7
    assert [c.split("@")[0] for c in storm["chain"]] == ["ping", "pong"] * 3 + ["ping"]
    reactions = len(counts(settings, "ping.on_ping")) + len(counts(settings, "pong.on_pong"))
    assert reactions == 6
    # each handler's event says whose handler emitted it: the task's, then each reaction's
    emitted = [(e["type"], e["agent"]) for e in events_of(settings, wf_id) if e["type"] in ("ping", "pong")]
    assert emitted == [("ping", "emitter")] + [("pong", "ping"), ("ping", "pong")] * 3
    assert seen_types(settings, "ping.on_ping", "agents") == ["emitter", "pong", "pong"]
    assert seen_types(settings, "pong.on_pong", "agents") == ["ping", "ping", "ping"]


def test_an_orphaned_subscription_stays_within_its_retention_and_counts_drops(
    procs: Processes, client: Client, settings: Settings, ledger: dict[str, str], tmp_path: Path
) -> None:
    listener = procs.worker("listener", app=APP, PHIBROKER_SUB_MAXLEN="100", **ledger)
    listening(client, {"listener.on_scan"}, procs)
    listener.terminate()
    listener.wait(timeout=20)
    procs.coordinator(PHIBROKER_SUB_MAXLEN="100")
    procs.worker("emitter", app=APP)
    time.sleep(1.2)
    path = flow(tmp_path, ANNOUNCE)
    for _ in range(6):
        client.wait(client.submit(path, params={"count": 100}), timeout=30)

    def health() -> dict[str, Any]:
        return next(r for r in client.subscriptions() if r["name"] == "listener.on_scan")

    until(lambda: health()["dropped"] + health()["length"] == 600, procs)  # events follow the end signal
    row = health()
    assert row["length"] <= 200  # approximate trimming works in whole nodes of 100 entries
    assert row["dropped"] >= 400 and row["pending"] == 0


def test_runs_a_reaction_or_a_trigger_starts_from_signed_files_pass_require_signed(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    """Every way of starting a run carries a signed file's signature: a coordinator that refuses
    unsigned files runs what a reaction and a trigger start from signed ones."""
    key = signing.generate(settings.home, "stryk")
    launched = tmp_path / "launched.yaml"
    launched.write_text("name: launched\ntasks:\n  A: {agent: emitter, command: announce, payload: {kind: done}}\n")
    triggered = tmp_path / "triaged.yaml"
    triggered.write_text(TRIGGERED)
    announce = tmp_path / "announce.yaml"
    announce.write_text(ANNOUNCE)
    for path in (launched, triggered, announce):
        signing.sign_file(key, path)
    client.add_trigger(triggered)
    procs.spawn("signed-coordinator", "coordinator", "--require-signed")
    procs.worker("emitter", app=APP)
    procs.worker("starter", app=APP, STARTER_FILE=str(launched))
    listening(client, {"starter.launch"}, procs)
    first = client.wait(client.submit(announce, params={"severity": "high"}), timeout=30)
    assert first["state"] == "succeeded", first["error"]
    until(lambda: {r["name"] for r in client.list()} >= {"announce", "launched", "triaged"}, procs)
    for row in client.list():
        status = client.wait(row["id"], timeout=30)
        assert status["state"] == "succeeded", (row["name"], status["error"])
