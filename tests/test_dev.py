"""`phibroker dev` as a user runs it: a subprocess on a free port, on each kind of broker it can use.

Every run is bounded in time, and each test checks that nothing `dev` started outlives it: no child
process left, and nothing listening on a port it opened.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from rich.console import Console

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.tools.devserver import render
from tests.conftest import REPO, RedisServer, free_port

# The reference agents when they are there, else the stand-ins with the same commands.
APP = [] if importlib.util.find_spec("workers.webc") else ["--app", "tests.apps.examples"]
TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")


def children_of(pid: int) -> set[int]:
    """The processes whose parent is `pid`, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Dev:
    """One `phibroker dev` subprocess; its output goes to a file, its children are noted while it runs."""

    def __init__(self, tmp_path: Path, url: str, *args: str, namespace: str = "phi", path: str | None = None):
        env = {
            **os.environ,
            "PHIBROKER_REDIS_URL": url,
            "PHIBROKER_NAMESPACE": namespace,
            "PHIBROKER_HOME": str(tmp_path / "home"),
            "PHIBROKER_WORKSPACE": str(tmp_path / "workspace"),
        }
        if path is not None:
            env["PATH"] = path
        self.log = tmp_path / "dev.out"
        self.home = tmp_path / "home"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "phibroker", "dev", *APP, *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.children: set[int] = set()

    @property
    def output(self) -> str:
        logs = sorted((self.home / "dev-logs").glob("*.log"))
        tails = "".join(f"\n== {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
        return self.log.read_text(errors="replace") + tails

    def wait(self, until: str | None = None) -> int | None:
        """Until the process exits, or until its output shows `until`; noting its children meanwhile."""
        deadline = time.monotonic() + TIMEOUT
        while self.process.poll() is None:
            self.children |= children_of(self.process.pid)
            if until and until in self.log.read_text(errors="replace"):
                return None
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"phibroker dev did not finish in {TIMEOUT}s:\n{self.output}")
            time.sleep(0.1)
        return self.process.returncode

    def assert_nothing_left(self, port: int | None = None) -> None:
        assert self.children, "dev started no processes?\n" + self.output
        assert not [pid for pid in self.children if alive(pid)], self.output
        if port is not None:
            assert not listening(port), self.output


def test_uses_a_redis_that_answers_and_leaves_it_running(redis_server: RedisServer, tmp_path: Path) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    dev = Dev(tmp_path, redis_server.url, "--once", namespace=namespace)
    assert dev.wait() == 0, dev.output
    assert f"Using the Redis already running at {redis_server.url}" in dev.output
    assert "The web page: http://127.0.0.1:" in dev.output
    assert "complete-dag succeeded" in dev.output
    dev.assert_nothing_left()
    assert redis.Redis.from_url(redis_server.url).ping()
    with Client(Settings(redis_url=redis_server.url, namespace=namespace)) as client:
        (row,) = client.list()
    assert row["state"] == "succeeded"


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_starts_redis_server_where_nothing_answers_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    dev = Dev(tmp_path, f"redis://127.0.0.1:{port}/0", "--once")
    assert dev.wait() == 0, dev.output
    assert f"Started redis-server at redis://127.0.0.1:{port}/0" in dev.output
    assert "complete-dag succeeded" in dev.output
    assert (tmp_path / "home" / "dev-logs" / "worker-webc.log").read_text()
    dev.assert_nothing_left(port)


def test_embedded_broker_without_redis_server(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    port = free_port()
    dev = Dev(tmp_path, f"redis://127.0.0.1:{port}/0", "--once", path=str(bin_dir))
    assert dev.wait() == 0, dev.output
    assert f"Started the embedded broker (fakeredis) at redis://127.0.0.1:{port}/0" in dev.output
    assert "complete-dag succeeded" in dev.output
    dev.assert_nothing_left(port)


def test_without_redis_server_or_the_embedded_extra_dev_says_what_to_install(tmp_path: Path) -> None:
    bin_dir, hidden = tmp_path / "bin", tmp_path / "hidden"
    bin_dir.mkdir()
    hidden.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (hidden / "fakeredis.py").write_text("raise ImportError(\"No module named 'fakeredis'\")\n")
    done = subprocess.run(
        [sys.executable, "-m", "phibroker", "dev", "--once"],
        cwd=REPO,
        env={
            **os.environ,
            "PATH": str(bin_dir),
            "PYTHONPATH": f"{hidden}:{REPO}",
            "PHIBROKER_HOME": str(tmp_path),
            "PHIBROKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        },  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: no redis-server here and no embedded broker")
    assert "pip install 'phibroker[embedded]'" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_everything_it_started(tmp_path: Path, signum: int) -> None:
    port = free_port()
    dev = Dev(tmp_path, f"redis://127.0.0.1:{port}/0", "--no-example")
    assert dev.wait(until="Ctrl-C stops everything") is None, dev.output
    assert listening(port)
    dev.children |= children_of(dev.process.pid)
    assert len(dev.children) >= 6, dev.output  # the coordinator and five workers (and a redis-server)
    dev.process.send_signal(signum)
    assert dev.wait() == 0, dev.output
    assert "Stopped." in dev.output
    dev.assert_nothing_left(port)


def test_a_bad_app_ends_the_run_with_the_workers_log(tmp_path: Path) -> None:
    port = free_port()
    dev = Dev(tmp_path, f"redis://127.0.0.1:{port}/0", "--once", "--app", "no_such_module_here")
    assert dev.wait() == 3, dev.output
    assert "exited with code" in dev.output and "no_such_module_here" in dev.output
    dev.assert_nothing_left(port)


def test_render_shows_each_task_with_its_state_agent_and_time() -> None:
    now = time.time()
    task = {"state": "succeeded", "agent": "webc", "attempts": 1, "started_at": now - 2.5, "finished_at": now - 1}
    status = {
        "id": "demo-1",
        "state": "running",
        "created_at": now - 3,
        "finished_at": None,
        "tasks": {
            "Research": task,
            "Approve": {**task, "state": "running", "agent": None, "attempts": 2, "finished_at": None},
            "Deploy": {**task, "state": "pending", "agent": "cmdc", "started_at": None, "finished_at": None},
        },
    }
    console = Console(file=io.StringIO(), width=80)
    console.print(render(status))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[0].startswith("demo-1  running  1/3 tasks done  3.")
    assert lines[2].split() == ["Research", "succeeded", "webc", "1.50s"]
    assert lines[3].split()[:5] == ["Approve", "running", "(try", "2)", "-"]
    assert lines[4].split() == ["Deploy", "pending", "cmdc"]


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_the_redis_server_dev_starts_keeps_runs_and_keys_and_fresh_starts_empty(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = Settings(redis_url=url)

    def serve(*args: str) -> Dev:
        dev = Dev(tmp_path, url, "--no-example", *args)
        assert dev.wait(until="Ctrl-C stops everything") is None, dev.output
        return dev

    def stop(dev: Dev) -> None:
        dev.process.send_signal(signal.SIGINT)
        assert dev.wait() == 0, dev.output
        dev.assert_nothing_left(port)

    dev = serve()
    with Client(settings) as client:
        wf_id = client.submit(REPO / "examples" / "complete-dag.yaml")
        assert client.wait(wf_id, timeout=60)["state"] == "succeeded", dev.output
        client.registry.trust_key("alice", "ab" * 32)
    stop(dev)

    dev = serve()
    assert "kept across restarts" in dev.output
    with Client(settings) as client:
        assert [(row["id"], row["state"]) for row in client.list()] == [(wf_id, "succeeded")]
        assert client.registry.trusted_keys() == {"alice": "ab" * 32}
    stop(dev)

    dev = serve("--fresh")
    assert "started empty" in dev.output
    with Client(settings) as client:
        assert client.list() == [] and client.registry.trusted_keys() == {}
    stop(dev)


def test_a_taken_web_port_gives_the_page_another_and_the_address_shown_is_its_own(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two `dev` started at once both find 8265 free; the one whose page cannot listen there moves it to
    a free port, and shows the address its own page is on (a page answering on 8265 is the other's)."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = Dev(tmp_path / "first", redis_server.url, namespace=namespace)
    second = Dev(tmp_path / "second", redis_server.url, namespace=namespace)
    for dev in (first, second):
        assert dev.wait(until="The web page: ") is None, dev.output
    shown = [dev.log.read_text().split("The web page: ")[1].split()[0] for dev in (first, second)]
    assert len(set(shown)) == 2, shown
    for dev, url in zip((first, second), shown, strict=True):
        page = dev.home / "dev-logs" / "ui.log"
        assert f"phibroker ui at {url}" in page.read_text(), dev.output  # the page it started says so
        with urllib.request.urlopen(url + "api/runs", timeout=10) as answer:
            assert answer.status == 200
    for dev in (first, second):
        dev.process.send_signal(signal.SIGINT)
        assert dev.wait() is not None
        dev.assert_nothing_left()
