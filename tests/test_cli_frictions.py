"""What a newcomer meets on the command line: `list` rows and filters, removing a subscription, a
submit nobody will serve, aligned `agents`, short durations, the URL `--help` names, and `dev` brokers
on two ports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.tools.styles import duration_text
from tests.conftest import Processes, free_port, until

LIST_KEYS = {"id", "name", "state", "created_at", "finished_at", "parent"}


def phibroker(procs: Processes, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The `phibroker` command as a user types it, on the test's broker and namespace."""
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args], capture_output=True, text=True, timeout=60, env=procs.env(**env)
    )


def flow(tmp_path: Path, name: str, tasks: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\ntasks:\n{tasks}")
    return str(path)


def probe_up(procs: Processes, client: Client) -> None:
    """A coordinator and a live `probe` worker."""
    procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    until(lambda: "probe" in client.live_agents(), procs)


def test_list_rows_filters_and_submitted_times(procs: Processes, client: Client, tmp_path: Path) -> None:
    probe_up(procs, client)
    good = client.submit(flow(tmp_path, "good", "  A: {agent: probe, command: noop}\n"))
    bad = client.submit(flow(tmp_path, "bad", "  A: {agent: probe, command: fail}\n"))
    assert client.wait(good, timeout=30)["state"] == "succeeded", procs.output()
    assert client.wait(bad, timeout=30)["state"] == "failed", procs.output()

    rows = json.loads(phibroker(procs, "list", "--json").stdout)
    assert [row["id"] for row in rows] == [bad, good]
    for row in rows:
        assert set(row) == LIST_KEYS and row["parent"] is None
        assert row["finished_at"] >= row["created_at"] > 0

    failed = phibroker(procs, "list", "--state", "failed", "--json")
    assert failed.returncode == 0 and [row["id"] for row in json.loads(failed.stdout)] == [bad]
    both = json.loads(phibroker(procs, "list", "--state", "failed", "--state", "succeeded", "--json").stdout)
    assert {row["id"] for row in both} == {good, bad}

    shown = phibroker(procs, "list", "--state", "succeeded")
    (line,) = shown.stdout.splitlines()
    assert line.split()[:5] == [good, "good", "succeeded", "just", "now"], line
    assert re.search(r"took (<1ms|\d+ms|\d+\.\d+s)$", line), line

    none = phibroker(procs, "list", "--state", "timed_out")
    assert none.returncode == 0 and none.stdout.strip() == "no workflows in state timed_out"
    unknown = phibroker(procs, "list", "--state", "finished")
    assert unknown.returncode == 2 and "'finished' is not one of" in unknown.stderr
    assert phibroker(procs, "list", "--limit", "0").returncode == 2


def test_list_limit_counts_rows_of_the_state_asked_for(procs: Processes, client: Client, tmp_path: Path) -> None:
    """Filtering reads past the newest `limit` runs: the older runs of that state are still found."""
    probe_up(procs, client)
    old = client.submit(flow(tmp_path, "old", "  A: {agent: probe, command: fail}\n"))
    assert client.wait(old, timeout=30)["state"] == "failed", procs.output()
    for n in range(3):
        client.submit(flow(tmp_path, f"new{n}", "  A: {agent: nobody, command: x}\n"))
    rows = json.loads(phibroker(procs, "list", "--limit", "1", "--state", "failed", "--json").stdout)
    assert [row["id"] for row in rows] == [old]


def test_subs_remove(procs: Processes, client: Client, settings: Settings) -> None:
    worker = procs.worker("other", app="tests.apps.choreo")
    name = "other.other_scan"
    until(lambda: name in {row["name"] for row in json.loads(phibroker(procs, "subs", "--json").stdout)}, procs)

    busy = phibroker(procs, "subs", "remove", name)
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1, busy.stderr
    assert busy.stderr.startswith(f"error: subscription '{name}' is served by live worker ")

    worker.send_signal(signal.SIGTERM)  # a clean stop gives its lease back
    assert worker.wait(timeout=60) == 0, procs.output()
    removed = phibroker(procs, "subs", "remove", name)
    assert removed.returncode == 0 and removed.stdout.strip() == f"subscription {name} removed", removed.stderr
    assert name not in {row["name"] for row in json.loads(phibroker(procs, "subs", "list", "--json").stdout)}
    assert redis.Redis.from_url(settings.redis_url).exists(settings.keys.sub(name)) == 0

    again = phibroker(procs, "subs", "remove", name)
    assert (
        again.returncode == 2 and again.stderr == f"error: no subscription named '{name}' (phibroker subs lists them)\n"
    )


def test_submit_warns_of_commands_no_live_worker_serves(procs: Processes, client: Client, tmp_path: Path) -> None:
    tasks = (
        "  A: {agent: probe, command: noop}\n  B: {agent: probe, command: nop}\n  C: {agent: ghost, command: haunt}\n"
    )
    path = flow(tmp_path, "mixed", tasks)
    quiet = phibroker(procs, "submit", path)  # no worker known at all: they may start later
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr

    probe_up(procs, client)
    warned = phibroker(procs, "submit", path, "--json")
    assert warned.returncode == 0 and set(json.loads(warned.stdout)) == {"id"}
    lines = warned.stderr.splitlines()
    assert len(lines) == 2, warned.stderr
    assert lines[0].startswith("warning: no live worker of agent probe has command nop (B waits")
    assert lines[0].endswith("did you mean noop?")
    assert lines[1].startswith("warning: agent ghost has no live worker (C waits")
    assert lines[1].endswith("start one: phibroker worker --agent ghost")

    served = phibroker(procs, "submit", flow(tmp_path, "fine", "  A: {agent: probe, command: noop}\n"), "--wait")
    assert served.returncode == 0 and "warning" not in served.stderr, served.stderr
    assert "(took " in served.stdout.splitlines()[0]

    waited = phibroker(
        procs, "submit", flow(tmp_path, "lost", "  A: {agent: ghost, command: haunt}\n"), "--wait", "--timeout", "3s"
    )
    assert waited.returncode == 1, waited.stderr
    assert (
        waited.stderr.count("ghost has no live worker") == 1 and "no live worker for agent ghost" not in waited.stderr
    )


def test_agents_columns_line_up(procs: Processes, client: Client) -> None:
    procs.worker("probe", app="tests.apps.probe")
    procs.worker("webc", app="tests.apps.examples", concurrency=12)
    until(lambda: client.live_agents() >= {"probe", "webc"}, procs)
    lines = phibroker(procs, "agents").stdout.splitlines()
    assert len(lines) == 2 and [line.split()[0] for line in lines] == ["probe", "webc"]
    for column in ("pid ", "heartbeat ", "alive"):
        assert len({line.index(column) for line in lines}) == 1, lines


def test_durations_under_50ms_read_in_milliseconds() -> None:
    assert duration_text(0.012) == "12ms"
    assert duration_text(0.0001) == "<1ms"
    assert duration_text(0.049) == "49ms"
    assert duration_text(0.05) == "0.1s"
    assert duration_text(1.5, digits=2) == "1.50s"
    assert duration_text(185) == "3m05s"


def test_help_names_the_redis_url_in_use(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PHIBROKER_REDIS_URL", "PHIBROKER_NAMESPACE")}

    def help_text(**extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "phibroker", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra},
        )
        assert done.returncode == 0, done.stderr
        return " ".join(done.stdout.split())  # undo click's wrapping

    assert "[now: redis://localhost:6379/0 (default, or $PHIBROKER_REDIS_URL)]" in help_text()
    mine = help_text(PHIBROKER_REDIS_URL="redis://ops:hunter2@10.0.0.7:6380/2", PHIBROKER_NAMESPACE="prod")
    assert "[now: redis://ops:***@10.0.0.7:6380/2 (from $PHIBROKER_REDIS_URL)]" in mine and "hunter2" not in mine
    assert "[now: prod (from $PHIBROKER_NAMESPACE)]" in mine


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_dev_brokers_on_two_ports_keep_their_data_apart(tmp_path: Path) -> None:
    from tests.test_dev import Dev

    home = tmp_path / "home"
    home.mkdir()

    def serve(port: int) -> Dev:
        own = tmp_path / str(port)  # its output apart, its $PHIBROKER_HOME shared
        own.mkdir()
        (own / "home").symlink_to(home)
        dev = Dev(own, f"redis://127.0.0.1:{port}/0", "--no-example")
        assert dev.wait(until="Ctrl-C stops everything") is None, dev.output
        return dev

    def stop(dev: Dev, port: int) -> None:
        dev.process.send_signal(signal.SIGINT)
        assert dev.wait() == 0, dev.output
        dev.assert_nothing_left(port)

    first, second = free_port(), free_port()
    dev = serve(first)
    assert f"dev-data/{first}/" in dev.output
    with Client(Settings(redis_url=f"redis://127.0.0.1:{first}/0")) as client:
        client.registry.trust_key("alice", "ab" * 32)
    other = serve(second)  # while the first still runs
    assert f"dev-data/{second}/" in other.output
    with Client(Settings(redis_url=f"redis://127.0.0.1:{second}/0")) as client:
        assert client.registry.trusted_keys() == {}
    stop(other, second)
    stop(dev, first)
    assert (home / "dev-data" / str(first) / "appendonlydir").is_dir()
    assert (home / "dev-data" / str(second) / "appendonlydir").is_dir()
