"""Hostile files and messages fail fast: one line, exit 2, bounded time and memory.

Each file is run through the real CLI in a process whose address space is capped, so a blow-up
(the issue saw 2.7 GB) fails the test instead of the machine; the subprocess timeout is generous and
only there to end a hang. Deep msgpack on a stream is dead-lettered by the worker and the coordinator.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import redis

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.workflow import load
from tests.conftest import Processes

MEMORY_CAP = 512 * 1024 * 1024  # address space: refusing any of these takes under 100 MB; the issue saw 2.7 GB
FLOW = "name: after\ntasks:\n  A: {agent: probe, command: work}\n  B: {agent: probe, command: work, depends_on: [A]}\n"


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def phibroker(*args: str, settings: Settings | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if settings is not None:
        env.update(PHIBROKER_REDIS_URL=settings.redis_url, PHIBROKER_NAMESPACE=settings.namespace)
    return subprocess.run(
        [sys.executable, "-m", "phibroker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        preexec_fn=_cap_memory,  # noqa: PLW1509 - only setrlimit, before exec
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


# --- the files --------------------------------------------------------------------------------------


def laughs(indent: str) -> str:
    """A billion laughs: nine levels of nine aliases each, ~400 bytes that expand to 9^9 strings."""
    lines = [f'{indent}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"{indent}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


HOSTILE = {
    "bomb.yaml": (
        "name: w\ntasks:\n  A:\n    agent: a\n    command: x\n    payload:\n" + laughs("      "),
        "YAML aliases expand to",
    ),
    "params-bomb.yaml": (
        "name: w\nparams:\n" + laughs("  ") + "tasks:\n  A: {agent: a, command: x}\n",
        "YAML aliases expand to",
    ),
    "loop.yaml": (
        "name: w\ntasks:\n  A: {agent: a, command: x, payload: {x: &x [*x]}}\n",
        "refers to a node it is inside",
    ),
    "aliases.yaml": (
        "name: w\nparams:\n  b: &b 1\n  many: ["
        + ", ".join(["*b"] * 20_000)
        + "]\ntasks:\n  A: {agent: a, command: x}\n",
        "more than 10,000 aliases",
    ),
    "alias-chain.yaml": (  # each alias one level deeper: few nodes, deep nesting
        "name: w\nparams:\n  a0: &a0 [x]\n"
        + "".join(f"  a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 200))
        + "tasks:\n  A: {agent: a, command: x}\n",
        "nest deeper than 100 levels",
    ),
    "deep.yaml": (
        f"name: w\ntasks:\n  A: {{agent: a, command: x, payload: {{x: {nested(100_000)}}}}}\n",
        "nest",  # libyaml stops at 1000 levels itself; the limit is 100
    ),
    "deep.json": (
        '{"name": "w", "tasks": {"A": {"agent": "a", "command": "x", "payload": {"x": ' + nested(100_000) + "}}}}",
        "nest deeper than 100 levels",
    ),
    "shallower.json": (  # deep enough for the wire to choke on, not for the JSON decoder
        '{"name": "w", "tasks": {"A": {"agent": "a", "command": "x", "payload": {"x": ' + nested(600) + "}}}}",
        "nest deeper than 100 levels",
    ),
    "newline-task.yaml": ('name: w\ntasks:\n  "A\\nB": {agent: a, command: x}\n', r"task 'A\nB': a name may only"),
    "trailing-newline.yaml": ('name: w\ntasks:\n  "A\\n": {agent: a, command: x}\n', r"task 'A\n': a name may only"),
    "newline-dep.json": (
        '{"name": "w", "tasks": {"A": {"agent": "a", "command": "x"},'
        ' "B": {"agent": "a", "command": "x", "depends_on": ["A\\n"]}}}',
        r"depends_on 'A\n' is not a valid task name",
    ),
    "bell-task.json": (
        '{"name": "w", "tasks": {"A\\u0007": {"agent": "a", "command": "x"}}}',
        r"task 'A\x07': a name may only",
    ),
    "newline-param.yaml": (
        'name: w\nparams: {"topic\\n": x}\ntasks:\n  A: {agent: a, command: x}\n',
        r"params: 'topic\n': a param name may only",
    ),
    "escape-param.json": (
        '{"name": "w", "params": {"a\\u001b[2J": 1}, "tasks": {"A": {"agent": "a", "command": "x"}}}',
        r"params: 'a\x1b[2J'",
    ),
    "newline-signal.yaml": (
        'name: w\ntasks:\n  G: {signal: {name: "go\\n"}}\n',
        "task 'G': signal.name",
    ),
    "newline-approver.yaml": (
        'name: w\ntasks:\n  G: {approval: {approvers: ["ann\\n"]}}\n',
        "task 'G': approval.approvers",
    ),
    "raw-control.yaml": ("name: w\ntasks:\n  A\x01: {agent: a, command: x}\n", "control characters are not allowed"),
    "long-number.json": (
        '{"name": "w", "tasks": {"A": {"agent": "a", "command": "x", "payload": {"n": ' + "9" * 5000 + "}}}}",
        "4300 digits",
    ),
    "binary.yaml": ("name: w\ntasks:\n  A: {agent: a, command: x, payload: {b: !!binary aGk=}}\n", "!!binary values"),
    "set.yaml": ("name: w\ntasks:\n  A: {agent: a, command: x, payload: {s: !!set {a, b}}}\n", "!!set values"),
    "list-key.yaml": ("name: w\ntasks:\n  A: {agent: a, command: x, payload: {? [a, b] : 1}}\n", "unhashable key"),
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hostile")
    for name, (text, _) in HOSTILE.items():
        (directory / name).write_text(text)
    # Over the size limit, and sparse: the loader must stop reading long before the end.
    with open(directory / "huge.yaml", "wb") as file:
        file.write(b"name: w\ntasks:\n  A: {agent: a, command: x}\n# ")
        file.truncate(2 * 1024**3)
    return directory


CASES = sorted([*HOSTILE, "huge.yaml"])


def expected(name: str) -> str:
    return "over 16 MiB" if name == "huge.yaml" else HOSTILE[name][1]


@pytest.mark.parametrize("name", CASES)
def test_validate_refuses_a_hostile_file_in_one_line(hostile_dir: Path, name: str) -> None:
    line = one_error_line(phibroker("validate", str(hostile_dir / name)))
    assert expected(name) in line


@pytest.mark.parametrize("name", ["bomb.yaml", "params-bomb.yaml", "deep.json", "newline-task.yaml", "huge.yaml"])
def test_submit_refuses_a_hostile_file_and_writes_nothing(hostile_dir: Path, settings: Settings, name: str) -> None:
    line = one_error_line(phibroker("submit", str(hostile_dir / name), settings=settings))
    assert expected(name) in line
    r = redis.Redis.from_url(settings.redis_url)
    assert r.keys(f"{settings.namespace}:*") == []


def test_triggers_add_refuses_an_alias_bomb(hostile_dir: Path, settings: Settings) -> None:
    text = "name: w\non: {event: x.done}\nparams:\n" + laughs("  ") + "tasks:\n  A: {agent: a, command: x}\n"
    path = hostile_dir / "trigger-bomb.yaml"
    path.write_text(text)
    assert "YAML aliases expand to" in one_error_line(phibroker("triggers", "add", str(path), settings=settings))
    assert redis.Redis.from_url(settings.redis_url).keys(f"{settings.namespace}:*") == []


def test_submit_refuses_hostile_params_in_one_line(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: w\nparams: {items: []}\ntasks:\n  A: {agent: a, command: x}\n")
    deep = phibroker("submit", str(path), "-p", "items=" + nested(60_000), settings=settings)  # under the argv limit
    assert "wants a JSON list" in one_error_line(deep)
    deeper = phibroker("submit", str(path), "-p", "items=" + nested(200), settings=settings)
    assert "nested deeper than 100 levels" in one_error_line(deeper)
    newline = phibroker("submit", str(path), "-p", "items\n=[]", settings=settings)
    assert "unknown param 'items\\n'" in one_error_line(newline)
    run_id = phibroker("submit", str(path), "--id", "run\n", settings=settings)
    assert "workflow id 'run\\n'" in one_error_line(run_id)
    long_id = phibroker("submit", str(path), "--id", "r" * 201, settings=settings)  # a part of every key of the run
    assert "use at most 200 letters" in one_error_line(long_id)
    assert redis.Redis.from_url(settings.redis_url).keys(f"{settings.namespace}:*") == []


def test_signal_refuses_a_control_character_and_deep_data(settings: Settings) -> None:
    assert "signal name 'go\\n'" in one_error_line(phibroker("signal", "some-run", "go\n", settings=settings))
    deep = phibroker("signal", "some-run", "go", "--data", nested(60_000), settings=settings)
    assert "--data nests too deep" in one_error_line(deep)


# --- what must still load ------------------------------------------------------------------------------


def test_a_100k_task_file_is_within_every_limit(tmp_path: Path) -> None:
    tasks = {
        f"task-{i:06d}": {"agent": "a", "command": "x", "depends_on": [f"task-{i - 1:06d}"] if i else []}
        for i in range(100_000)
    }
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"name": "big", "tasks": tasks}))
    assert len(load(path).tasks) == 100_000


def test_shared_blocks_merge_keys_and_dates_still_load(tmp_path: Path) -> None:
    path = tmp_path / "shared.yaml"
    path.write_text(
        "name: w\n"
        "params: {when: 2024-01-01, common: &common {region: eu, tiers: [1, 2]}}\n"
        "tasks:\n"
        "  A: &task {agent: a, command: x, payload: {settings: *common}}\n"
        "  B: {<<: *task, command: y, depends_on: [A]}\n"
    )
    workflow = load(path)
    assert workflow.spec.params["when"] == "2024-01-01"  # YAML 1.2: a date is text, as in JSON
    assert workflow.tasks["B"].agent == "a" and workflow.tasks["B"].command == "y"
    assert workflow.tasks["B"].payload == {"settings": {"region": "eu", "tiers": [1, 2]}}
    assert json.loads(workflow.spec_json)["tasks"]["B"]["payload"]["settings"]["region"] == "eu"


# --- deep msgpack on the streams -----------------------------------------------------------------------

DEEP_REASON = "nested deeper than 500 levels"


def with_deep(envelope: dict[str, object], levels: int) -> bytes:
    """`envelope` packed, its string "DEEP" replaced by a list nested `levels` deep (msgpack packs
    at most 511 levels itself; an attacker's bytes have no such limit)."""
    return msgpack.packb(envelope).replace(msgpack.packb("DEEP"), b"\x91" * levels + b"\xc0")


def deep_task_message(levels: int) -> bytes:
    envelope = {"v": 1, "id": f"d{levels}", "wf": "ghost", "unit": "A", "task": "A", "agent": "probe"}
    return with_deep({**envelope, "command": "work", "attempt": 1, "payload": {"x": "DEEP"}, "inputs": {}}, levels)


def deep_inbox_messages(levels: int) -> list[bytes]:
    signal = {"v": 1, "id": f"s{levels}", "kind": "signal", "body": {"wf": "ghost", "name": "go", "data": "DEEP"}}
    event = {"id": "e", "type": "x", "data": "DEEP"}
    trigger = {"v": 1, "id": f"t{levels}", "kind": "trigger", "body": {"wf": "w", "trigger": "t", "event": event}}
    result = {"id": "d", "wf": "ghost", "unit": "A", "token": 1, "ok": True, "worker": "w", "started": 1.0}
    blob = with_deep([{**result, "finished": 2.0, "events": [{"type": "x", "data": "DEEP"}]}], levels)
    results = msgpack.packb({"v": 1, "id": f"r{levels}", "kind": "results", "results": blob})
    return [with_deep(signal, levels), with_deep(trigger, levels), results]


def test_deep_task_messages_are_dead_lettered_and_the_worker_goes_on(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    stream = settings.keys.agent_tasks("probe")
    r.xgroup_create(stream, "workers", id="0", mkstream=True)
    for levels in (600, 100_000):  # past our limit only, and past msgpack's own stack too
        r.xadd(stream, {"m": deep_task_message(levels)})
    procs.coordinator()
    worker = procs.worker("probe", app="tests.apps.probe")
    (tmp_path / "flow.yaml").write_text(FLOW)
    status = client.wait(client.submit(tmp_path / "flow.yaml"), timeout=60)
    assert status["state"] == "succeeded", procs.output()
    assert worker.poll() is None
    assert [row["reason"] for row in client.dead_letters()] == [DEEP_REASON] * 2
    assert r.xpending(stream, "workers")["pending"] == 0


def test_deep_inbox_entries_are_dead_lettered_and_the_coordinator_goes_on(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    r.xgroup_create(settings.keys.inbox(None), "coordinators", id="0", mkstream=True)
    for levels in (600, 100_000):
        for raw in deep_inbox_messages(levels):
            r.xadd(settings.keys.inbox(None), {"m": raw})
    coordinator = procs.coordinator()
    procs.worker("probe", app="tests.apps.probe")
    (tmp_path / "flow.yaml").write_text(FLOW)
    status = client.wait(client.submit(tmp_path / "flow.yaml"), timeout=60)
    assert status["state"] == "succeeded", procs.output()
    assert coordinator.poll() is None
    assert [row["reason"] for row in client.dead_letters()] == [DEEP_REASON] * 6
