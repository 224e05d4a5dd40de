"""Starting things as a newcomer does: an agents module in the current folder, and a broker URL that is
wrong in each way a first try gets it wrong (nothing listening, a database Redis lacks, a bad scheme)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import REPO, Processes, RedisServer, free_port, until
from tests.test_failures import flow

# The installed `phibroker` script, as a user types it: unlike `python -m`, it does not put the
# current folder on the import path by itself.
PHIBROKER = str(Path(sys.executable).with_name("phibroker"))

AGENTS = """
from phibroker import Agent

greeter = Agent("greeter")


@greeter.command()
def greet(ctx, name: str) -> dict:
    return {"greeting": f"hello {name}"}
"""


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PHIBROKER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def one_error_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The single `error: ...` line a failed command prints, after checking its exit code."""
    assert done.returncode == code, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "first_hour_agents.py").write_text(AGENTS)
    (folder / "broken_agents.py").write_text("import not_installed_dependency_xyz\n")
    return folder


@pytest.fixture
def user_env(procs: Processes) -> dict[str, str]:
    """The environment of a user's shell: the broker's settings, and no PYTHONPATH at all."""
    env = procs.env()
    env.pop("PYTHONPATH")
    return env


def test_worker_app_is_imported_from_the_current_folder(
    procs: Processes, client: Client, app_dir: Path, user_env: dict[str, str], tmp_path: Path
) -> None:
    procs.coordinator()
    wf_id = client.submit(
        flow(tmp_path, "name: hi\ntasks:\n  Hello: {agent: greeter, command: greet, payload: {name: you}}\n")
    )
    until(lambda: client.broker.read_workflow(wf_id)[1].get("Hello", {}).get("dispatch"), procs)
    done = run_cli("worker", "--agent", "greeter", "--app", "first_hour_agents", "--burst", cwd=app_dir, env=user_env)
    assert done.returncode == 0, done.stderr
    status = client.wait(wf_id, timeout=30)
    assert status["state"] == "succeeded", procs.output() + done.stderr
    assert status["tasks"]["Hello"]["result"] == {"greeting": "hello you"}


def test_an_app_that_does_not_import_says_what_was_tried(app_dir: Path, user_env: dict[str, str]) -> None:
    missing = one_error_line(
        run_cli("worker", "--agent", "greeter", "--app", "no_such_app_xyz", cwd=app_dir, env=user_env), 2
    )
    assert "'no_such_app_xyz'" in missing and str(app_dir) in missing and "No module named 'no_such_app_xyz'" in missing
    broken = one_error_line(
        run_cli("worker", "--agent", "greeter", "--app", "broken_agents", cwd=app_dir, env=user_env), 2
    )
    assert "'broken_agents'" in broken and "No module named 'not_installed_dependency_xyz'" in broken


def test_a_syntax_error_or_a_file_name_for_app_is_one_line(app_dir: Path, user_env: dict[str, str]) -> None:
    (app_dir / "typo_agents.py").write_text("from phibroker import Agent\nagent = = Agent('greeter')\n")
    typo = one_error_line(run_cli("worker", "--agent", "greeter", "--app", "typo_agents", cwd=app_dir, env=user_env), 2)
    assert f"{app_dir / 'typo_agents.py'}:2: invalid syntax" in typo
    named = run_cli("worker", "--agent", "greeter", "--app", "first_hour_agents.py", cwd=app_dir, env=user_env)
    assert "did you mean --app first_hour_agents?" in one_error_line(named, 2)


def test_an_unknown_agent_suggests_app_or_names_the_agents_there(app_dir: Path, user_env: dict[str, str]) -> None:
    default = one_error_line(run_cli("worker", "--agent", "no_such_agent", cwd=app_dir, env=user_env), 2)
    assert "workers.no_such_agent" in default and "--app MODULE" in default
    other = one_error_line(
        run_cli("worker", "--agent", "other", "--app", "first_hour_agents", cwd=app_dir, env=user_env), 2
    )
    assert "no Agent named 'other'" in other and "'greeter'" in other


@pytest.mark.parametrize(
    ("name", "said"), [("a" * 129, "is longer than 128 bytes"), ("ops@eu", "letters, digits, '_', '.' and '-' only")]
)
def test_an_agent_name_its_workers_cannot_carry_is_one_line(
    app_dir: Path, user_env: dict[str, str], name: str, said: str
) -> None:
    """A worker's consumer name (`AGENT@HOST:PID:ID`) must fit what the start script takes, and say
    whose leases are its agent's: an agent name over 128 bytes, or with an `@`, is refused as the
    worker starts, not by every start or lease look later."""
    (app_dir / "odd_agents.py").write_text(
        f"from phibroker import Agent\nagent = Agent({name!r})\n\n@agent.command('x')\ndef x(ctx):\n    return {{}}\n"
    )
    line = one_error_line(run_cli("worker", "--agent", name, "--app", "odd_agents", cwd=app_dir, env=user_env), 2)
    assert said in line


def bad_urls(redis_server: RedisServer) -> dict[str, str]:
    return {
        "nothing listening": f"redis://127.0.0.1:{free_port()}/0",
        "no such database": f"redis://127.0.0.1:{redis_server.port}/99",
        "bad scheme": "foo://x",
    }


COMMANDS = {
    "coordinator": ["coordinator"],
    "worker": ["worker", "--agent", "webc", "--app", "tests.apps.examples"],
    "submit": ["submit", str(REPO / "examples" / "complete-dag.yaml")],
    "status": ["status", "some-run"],
    "list": ["list"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", ["nothing listening", "no such database", "bad scheme"])
def test_a_bad_broker_url_is_one_line_and_exit_3(
    redis_server: RedisServer, tmp_path: Path, command: str, kind: str
) -> None:
    url = bad_urls(redis_server)[kind]
    env = {**os.environ, "PHIBROKER_REDIS_URL": url, "PHIBROKER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    line = one_error_line(run_cli(*COMMANDS[command], cwd=tmp_path, env=env), 3)
    assert url in line and "PHIBROKER_REDIS_URL" in line
    if kind == "nothing listening":
        assert "cannot reach Redis" in line and "make dev" in line
    if kind == "no such database":
        assert "DB index is out of range" in line


def test_a_password_in_the_url_never_shows_in_an_error_or_a_log(
    redis_server: RedisServer, tmp_path: Path, procs: Processes
) -> None:
    """A URL's password is shown as *** wherever phibroker prints the URL: the one-line error of a
    broker out of reach, and the coordinator's log line when it starts."""
    unreachable = f"redis://ops:s3cret-pw@127.0.0.1:{free_port()}/0"
    env = {**os.environ, "PHIBROKER_REDIS_URL": unreachable, "PHIBROKER_HOME": str(tmp_path / "home")}
    line = one_error_line(run_cli("status", "x", cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}), 3)
    assert "s3cret-pw" not in line and "redis://ops:***@127.0.0.1" in line
    root = redis.Redis.from_url(redis_server.url)
    root.execute_command("ACL", "SETUSER", "ops", "on", ">s3cret-pw", "~*", "&*", "+@all")
    root.close()
    procs.coordinator(PHIBROKER_REDIS_URL=f"redis://ops:s3cret-pw@127.0.0.1:{redis_server.port}/0")
    until(lambda: "started on redis://ops:***@" in procs.output(), procs)
    assert "s3cret-pw" not in procs.output()


def test_a_good_url_still_starts_the_coordinator(settings: Settings, procs: Processes, client: Client) -> None:
    coordinator = procs.coordinator()
    until(lambda: client.broker.leases(settings.keys.coordinators)[1], procs)
    assert coordinator.poll() is None


def test_commands_reach_redis_as_redis_py_would_send_them(settings: Settings) -> None:
    """The store packs commands itself (one C call): every kind of argument arrives as redis-py's own
    packer would have sent it, and a value Redis cannot hold is refused before anything is sent."""
    from redis.exceptions import DataError

    from phibroker.store.connection import connect

    r = connect(settings)
    values = {"float": 1796505205.6859123, "tiny": 1e-7, "big": 12345678901234567890, "text": "é ü", "raw": b"\x00\xff"}
    r.hset("packer-check", mapping=values)
    assert r.hgetall("packer-check") == {
        b"float": b"1796505205.6859124",
        b"tiny": b"1e-07",
        b"big": b"12345678901234567890",
        b"text": "é ü".encode(),
        b"raw": b"\x00\xff",
    }
    r.xadd("packer-stream", {"m": b"x"})
    assert r.xinfo_stream("packer-stream")["length"] == 1  # a two-word command name goes as two words
    with pytest.raises(DataError):
        r.set("packer-check-bool", True)  # type: ignore[arg-type]
    assert r.exists("packer-check-bool") == 0
    r.delete("packer-check", "packer-stream")
    r.close()
