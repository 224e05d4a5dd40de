"""The documentation is a contract: every code block of README.md (and of docs/*.md) runs as a user runs it.

- A python block that defines an `Agent` is copied verbatim into a module of an empty folder and served
  with `phibroker worker --agent NAME --app MODULE` from that folder; a workflow calling each of its
  commands must succeed. Other python blocks compile, and run when they need no broker.
- A yaml block that is a workflow file passes `phibroker validate`.
- Every `phibroker ...` line of an sh block runs against a test broker with a coordinator and the
  reference workers, and exits with its documented code. `ID` placeholders become real ids.

The last tests edit copies of the README's blocks and check that a broken promise fails these checks.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from phibroker import wire
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.tools import diagnose
from tests.conftest import REPO, Processes, until

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = {"python": "python", "py": "python", "yaml": "yaml", "yml": "yaml", "sh": "sh", "bash": "sh", "shell": "sh"}
FENCE = re.compile(r"^([ \t]*)```([A-Za-z]+)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
PHIBROKER = str(Path(sys.executable).with_name("phibroker"))  # the entry point a user types
AGENTS = ("webc", "dc", "vssc", "kalic", "cmdc")
LINE_TIMEOUT = 120.0
SKIPPED = ("make", "source", ".")  # setup a person does once; `make dev` is tests/test_dev.py's
NO_BROKER = ("validate", "graph", "sign", "keys", "acl", "--help", "--version")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a document."""

    doc: Path
    line: int
    language: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    """The python, yaml and sh blocks of a markdown file, dedented, with the line of their fence."""
    source = doc.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(source):
        language = LANGUAGES.get(match.group(2).lower())
        if language:
            line = source.count("\n", 0, match.start()) + 1
            found.append(Block(doc, line, language, textwrap.dedent(match.group(3))))
    return found


ALL_BLOCKS = [block for doc in DOCS for block in blocks_of(doc)]


def of_language(language: str) -> list[Any]:
    return [pytest.param(b, id=b.name) for b in ALL_BLOCKS if b.language == language]


def run(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = LINE_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def shown(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


# -- python blocks ----------------------------------------------------------------------------------


@dataclass
class AgentBlock:
    """What an agent example declares: its agent's name, its commands with the arguments they need."""

    agent: str
    commands: dict[str, dict[str, Any]]  # command -> a payload for its required keyword arguments
    emitted: set[str]  # the event types its commands pass to `ctx.emit`
    subscriptions: list[str]  # the event types of its `@agent.on(...)`
    reacts_by_emitting: bool


SAMPLE_VALUES = {"str": "example", "int": 1, "float": 1.0, "bool": True, "list": [], "dict": {}}


def _decorator(node: ast.expr, method: str) -> ast.Call | None:
    """`x.METHOD(...)` (a decorator, or a call in a body) as its call, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
        return node
    return None


def _required_payload(function: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, Any]:
    """A value for every parameter after `ctx` that has no default, chosen by its annotation."""
    args = function.args
    positional = args.posonlyargs + args.args
    required = positional[1 : len(positional) - len(args.defaults)]
    required += [a for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    return {a.arg: SAMPLE_VALUES.get(ast.unparse(a.annotation) if a.annotation else "str", "example") for a in required}


def _emitted(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The literal event types a function passes to `.emit(...)`."""
    calls = [node for node in ast.walk(function) if isinstance(node, ast.Call) and _decorator(node, "emit")]
    return {str(c.args[0].value) for c in calls if c.args and isinstance(c.args[0], ast.Constant)}


def agent_block(text: str) -> AgentBlock | None:
    """The agent a python block defines (`Agent("name")`), or None for any other block."""
    tree = ast.parse(text)
    names = [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Agent"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]
    if not names:
        return None
    commands: dict[str, dict[str, Any]] = {}
    emitted: set[str] = set()
    subscriptions: list[str] = []
    emits = False
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for decorator in node.decorator_list:
            if call := _decorator(decorator, "command"):
                name = call.args[0].value if call.args and isinstance(call.args[0], ast.Constant) else node.name
                commands[str(name)] = _required_payload(node)
                emitted |= _emitted(node)
            elif (call := _decorator(decorator, "on")) and call.args and isinstance(call.args[0], ast.Constant):
                subscriptions.append(str(call.args[0].value))
                emits = emits or bool(_emitted(node))
    return AgentBlock(str(names[0]), commands, emitted, subscriptions, emits)


def user_env(procs: Processes) -> dict[str, str]:
    """The test broker's settings, and no PYTHONPATH: the worker must find the module in its own folder."""
    env = procs.env()
    env.pop("PYTHONPATH", None)
    return env


def events(settings: Settings) -> list[dict[str, Any]]:
    """Everything on the events log of the test's namespace."""
    r = redis.Redis.from_url(settings.redis_url)
    try:
        entries = [f for log in settings.keys.event_logs for _, f in r.xrange(log)]
        return [e for f in entries for e in wire.decode_events(f[b"m"], 1 << 24)]
    finally:
        r.close()


def serve_agent_block(block: Block, procs: Processes, client: Client, folder: Path) -> None:
    """Serve the block verbatim as a user's module; each of its commands must run to success."""
    found = agent_block(block.text)
    assert found is not None and found.commands, f"{block.name}: no Agent with a command in this block"
    folder.mkdir()
    module = f"doc_agent_{block.line}"
    (folder / f"{module}.py").write_text(block.text, encoding="utf-8")
    env = user_env(procs)
    procs.coordinator()
    with open(procs.logs / f"doc-worker-{found.agent}.log", "wb") as log:
        worker = subprocess.Popen(
            [PHIBROKER, "worker", "--agent", found.agent, "--app", module], cwd=folder, env=env, stdout=log, stderr=log
        )
    procs.started.append(worker)

    def serving() -> bool:
        assert worker.poll() is None, f"{block.name}: the worker exited ({worker.returncode})\n{procs.output()}"
        return any(row["agent"] == found.agent and row.get("alive", True) for row in diagnose.agents(procs.settings))

    until(serving, procs, timeout=30)
    tasks = {cmd: {"agent": found.agent, "command": cmd, "payload": payload} for cmd, payload in found.commands.items()}
    flow = folder.parent / "doc-agent-flow.json"
    flow.write_text(json.dumps({"name": "doc-agent", "tasks": tasks}), encoding="utf-8")
    result = run([PHIBROKER, "submit", str(flow), "--wait", "--timeout", "60s", "--json"], env, folder.parent)
    assert result.returncode == 0, f"{block.name}: {shown(result)}\n{procs.output()}"
    status = json.loads(result.stdout)
    assert status["state"] == "succeeded", result.stdout
    published = {e["type"] for e in events(procs.settings) if e["workflow"] == status["id"] and e["task"] in tasks}
    assert found.emitted <= published, published
    subscribed = {row["event"] for row in client.subscriptions() if row["agent"] == found.agent}
    assert subscribed == set(found.subscriptions), subscribed
    if "task.failed" in found.subscriptions and found.reacts_by_emitting:
        react_to_a_failure(found, procs, env, folder.parent)


def react_to_a_failure(found: AgentBlock, procs: Processes, env: dict[str, str], cwd: Path) -> None:
    """A task that fails for good publishes `task.failed`; the example's subscription reacts to it."""
    flow = cwd / "doc-agent-fails.json"
    tasks = {"Fails": {"agent": found.agent, "command": "no_such_command", "retry": {"max_attempts": 1}}}
    flow.write_text(json.dumps({"name": "doc-agent-fails", "tasks": tasks}), encoding="utf-8")
    result = run([PHIBROKER, "submit", str(flow), "--wait", "--timeout", "60s", "--json"], env, cwd)
    assert result.returncode == 1, shown(result)
    wf_id = json.loads(result.stdout)["id"]
    failed = [e for e in events(procs.settings) if e["type"] == "task.failed" and e["workflow"] == wf_id]
    assert len(failed) == 1 and {"type", "workflow", "task", "data", "ts", "id"} <= set(failed[0])
    assert "no_such_command" in failed[0]["data"]["error"], failed[0]
    until(lambda: [e for e in events(procs.settings) if e.get("cause") == failed[0]["id"]], procs)


def needs_no_broker(text: str) -> bool:
    """A block that does not reach for a broker can run on its own; one that does only compiles."""
    return not re.search(r"Client|redis|localhost|submit\(", text)


@pytest.mark.parametrize("block", of_language("python"))
def test_python_block(block: Block, procs: Processes, client: Client, tmp_path: Path) -> None:
    compile(block.text, block.name, "exec")
    if agent_block(block.text):
        serve_agent_block(block, procs, client, tmp_path / "user-project")
    elif needs_no_broker(block.text):
        folder = tmp_path / "user-project"
        folder.mkdir()
        (folder / "example.py").write_text(block.text, encoding="utf-8")
        result = run([sys.executable, "example.py"], user_env(procs), folder)
        assert result.returncode == 0, f"{block.name}: {shown(result)}"


# -- yaml blocks ------------------------------------------------------------------------------------


def check_yaml_block(block: Block, folder: Path) -> None:
    """The block parses; a workflow file (it has `name` or `tasks`) passes `phibroker validate`."""
    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        raise AssertionError(f"{block.name}: not YAML: {exc}") from None
    if not (isinstance(data, dict) and {"name", "tasks"} & set(data)):
        return
    path = folder / f"block-{block.line}.yaml"
    path.write_text(block.text, encoding="utf-8")
    result = run([PHIBROKER, "validate", str(path)], {**os.environ}, folder)
    assert result.returncode == 0, f"{block.name}: {shown(result)}"


@pytest.mark.parametrize("block", of_language("yaml"))
def test_yaml_block(block: Block, tmp_path: Path) -> None:
    check_yaml_block(block, tmp_path)


def workflow_blocks() -> list[Any]:
    """The yaml blocks that are whole workflow files naming only the reference agents."""
    found = []
    for block in ALL_BLOCKS:
        try:
            data = yaml.safe_load(block.text) if block.language == "yaml" else None
        except yaml.YAMLError:
            continue  # test_yaml_block names it
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if isinstance(tasks, dict) and all(t.get("agent") in (None, *AGENTS) for t in tasks.values()):
            found.append(pytest.param(block, id=block.name))
    return found


@pytest.mark.parametrize("block", workflow_blocks())
def test_a_workflow_block_runs_to_success_on_the_reference_agents(
    block: Block, procs: Processes, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copied as it stands, a documented workflow runs, not only validates (a gate is approved as stryk)."""
    path = tmp_path / "flow.yaml"
    path.write_text(block.text, encoding="utf-8")
    procs.coordinator()
    for agent in AGENTS:
        procs.worker(agent, app=f"workers.{agent}", PHIBROKER_WORKSPACE=str(tmp_path / "workspace"))
    monkeypatch.setenv("PHIBROKER_APPROVER", "stryk")
    wf_id = client.submit(path)

    def ended() -> dict[str, Any] | None:
        for request in client.approvals():
            if request["workflow"] == wf_id:
                client.approve(request["id"], comment="approved by the docs test")
        status = client.wait(wf_id, timeout=0.5)
        return status if status["state"] in ("succeeded", "failed", "cancelled", "timed_out") else None

    status = until(ended, procs, timeout=90)
    assert status["state"] == "succeeded", f"{block.name}: {status.get('error')}"


# -- sh blocks --------------------------------------------------------------------------------------

ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = (";", "&&")
COMPLETION_MARK = {"bash": "complete -o nosort -F", "zsh": "compdef _phibroker_completion", "fish": "complete "}


@dataclass
class Command:
    """One command of an sh block: its words, the env it sets, the exit code its line documents."""

    words: list[str]
    env: dict[str, str]
    expected_exit: int
    source: str


def documented_exit(line: str) -> int:
    """1 where the line's comment says the command exits 1 (a `submit --wait` that does not succeed)."""
    comment = re.split(r"\s#", line, maxsplit=1)[-1] if re.search(r"\s#", line) else ""
    return 1 if re.search(r"\bexits? (with )?(code )?1\b", comment) else 0


def commands_of(text: str) -> Iterator[Command]:
    """The commands of an sh block: `# comments` dropped, `;` and `&&` split, `\\` continuations joined."""
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word not in SEPARATORS:
                words.append(word)
                continue
            env = {}
            while words and ASSIGNMENT.match(words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if words or env:
                yield Command(words, env, documented_exit(line), line.strip())
            words = []


@dataclass
class Shell:
    """Runs an sh block's `phibroker` lines as a person would, from the repository, on the test broker."""

    procs: Processes
    workspace: Path
    env: dict[str, str] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    person_waits_on: list[str] | None = None  # the last submit that did not `--wait`
    started: bool = False

    def run_block(self, block: Block) -> None:
        for command in commands_of(block.text):
            self.run_command(block, command)

    def run_command(self, block: Block, command: Command) -> None:
        words = command.words
        if not words:
            self.env.update(command.env)
        elif words[0] == "export":
            self.env.update(dict(w.partition("=")[::2] for w in words[1:]))
        elif words[0] in SKIPPED or words[:2] == ["phibroker", "dev"]:
            return
        elif words[0] == "eval" and len(words) == 2 and words[1].startswith("$(") and words[1].endswith(")"):
            inner = list(commands_of(words[1][2:-1]))
            assert len(inner) == 1 and inner[0].words[:1] == ["phibroker"], f"{block.name}: {command.source!r}"
            self.completion(block, inner[0], command.source)
        elif words[0] == "phibroker" and words[-2:] == ["|", "source"]:
            self.completion(block, Command(words[:-2], command.env, 0, command.source), command.source)
        elif words[0] == "phibroker" and "|" not in words:
            self.phibroker(block, command)
        else:
            raise AssertionError(f"{block.name}: no rule to run {command.source!r}: teach tests/test_docs.py")

    def phibroker(self, block: Block, command: Command) -> None:
        words = list(command.words)
        subcommand = words[1] if len(words) > 1 else "--help"
        if subcommand == "watch" and "--once" not in words:
            words.append("--once")  # the live view until Ctrl-C, one frame of it here
        if subcommand not in NO_BROKER:
            self.start_processes()
        words = [self.fill(subcommand, w) for w in words]
        result = self.run(words, command.env)
        assert result.returncode == command.expected_exit, (
            f"{block.name}: {command.source!r} ran as {shlex.join(words)}\n{shown(result)}\n{self.procs.output()}"
        )
        if subcommand == "submit" and result.stdout.strip():
            self.run_ids.append(result.stdout.split()[0])
            if "--wait" not in words:
                self.person_waits_on = words

    def completion(self, block: Block, command: Command, line: str) -> None:
        """A shell completion script: printed by phibroker; bash's is loaded into a real bash."""
        result = self.run(command.words, command.env)
        shell = command.env.get("_PHIBROKER_COMPLETE", "").removesuffix("_source")
        assert result.returncode == 0 and COMPLETION_MARK.get(shell, "\0") in result.stdout, (
            f"{block.name}: {line!r}\n{shown(result)}"
        )
        if shell == "bash":
            env = self.procs.env(PATH=f"{Path(PHIBROKER).parent}{os.pathsep}{os.environ['PATH']}")
            loaded = run(["bash", "-c", f"{line}\ncomplete -p phibroker"], env, REPO)
            assert loaded.returncode == 0 and "_phibroker_completion phibroker" in loaded.stdout, shown(loaded)

    def run(self, words: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run([PHIBROKER, *words[1:]], self.procs.env(**self.env, **(env or {})), REPO)

    def fill(self, subcommand: str, word: str) -> str:
        """`ID`: an open approval request for approve/reject, else the run submitted last."""
        if word != "ID":
            return word
        if subcommand in ("approve", "reject"):
            return self.open_approval()
        assert self.run_ids, "an `ID` placeholder before any submit"
        return self.run_ids[-1]

    def open_approval(self) -> str:
        """The person's answer needs a question: the open request, or one from submitting again."""
        if not (requests := self.approvals(wait=False)) and self.person_waits_on:
            result = self.run(self.person_waits_on)
            assert result.returncode == 0, shown(result)
            self.run_ids.append(result.stdout.split()[0])
        requests = requests or self.approvals(wait=True)
        return str(requests[0]["id"])

    def approvals(self, wait: bool) -> list[dict[str, Any]]:
        def listed() -> list[dict[str, Any]]:
            result = self.run(["phibroker", "approvals", "--json"])
            assert result.returncode == 0, shown(result)
            return list(json.loads(result.stdout))

        return until(listed, self.procs, timeout=60) if wait else listed()

    def start_processes(self) -> None:
        """A coordinator and the reference workers, as `make dev` leaves them running."""
        if not self.started:
            self.started = True
            self.procs.coordinator()
            for agent in AGENTS:
                self.procs.worker(agent, app=f"workers.{agent}", PHIBROKER_WORKSPACE=str(self.workspace))


@pytest.mark.parametrize("block", of_language("sh"))
def test_sh_block(block: Block, procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHIBROKER_APPROVER", raising=False)
    Shell(procs, tmp_path / "workspace").run_block(block)


# -- the extraction, and proof that a broken promise fails ------------------------------------------


def test_the_readme_has_an_agent_a_workflow_and_a_quick_start() -> None:
    readme = [b for b in ALL_BLOCKS if b.doc == REPO / "README.md"]
    assert any(b.language == "python" and agent_block(b.text) for b in readme)
    assert any(b.language == "yaml" and "tasks:" in b.text for b in readme)
    assert any(b.language == "sh" and "phibroker submit" in b.text for b in readme)


def test_comments_semicolons_and_env_prefixes_are_understood() -> None:
    text = (
        "phibroker list; phibroker status ID   # one; two\n"
        'PHIBROKER_APPROVER=stryk phibroker reject ID --reason "not today"  # signs\n'
        "phibroker submit f.yaml --wait   # exits 1: the smoke test fails\n"
        "make dev && phibroker watch\n"
        'eval "$(_PHIBROKER_COMPLETE=bash_source phibroker)"   # bash\n'
        "_PHIBROKER_COMPLETE=fish_source phibroker | source    # fish\n"
    )
    commands = [(c.words, c.env, c.expected_exit) for c in commands_of(text)]
    assert commands == [
        (["phibroker", "list"], {}, 0),
        (["phibroker", "status", "ID"], {}, 0),
        (["phibroker", "reject", "ID", "--reason", "not today"], {"PHIBROKER_APPROVER": "stryk"}, 0),
        (["phibroker", "submit", "f.yaml", "--wait"], {}, 1),
        (["make", "dev"], {}, 0),
        (["phibroker", "watch"], {}, 0),
        (["eval", "$(_PHIBROKER_COMPLETE=bash_source phibroker)"], {}, 0),
        (["phibroker", "|", "source"], {"_PHIBROKER_COMPLETE": "fish_source"}, 0),
    ]


def readme_block(language: str, must_contain: str) -> Block:
    return next(b for b in ALL_BLOCKS if b.language == language and must_contain in b.text)


def edited(block: Block, old: str, new: str) -> Block:
    """A copy of a README block with one edit; the edit must take, or the check proves nothing."""
    assert old in block.text, f"{block.name} no longer contains {old!r}"
    return Block(block.doc, block.line, block.language, block.text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("block_with", "old", "new"),
    [
        ("phibroker submit", "phibroker approvals ", "phibroker approvls "),
        ("bash_source", "_PHIBROKER_COMPLETE=bash_source", "_PHIBROKER_COMPLETION=bash_source"),
    ],
    ids=["unknown-command", "no-completion-script"],
)
def test_a_broken_sh_line_fails(block_with: str, old: str, new: str, procs: Processes, tmp_path: Path) -> None:
    broken = edited(readme_block("sh", block_with), old, new)
    with pytest.raises(AssertionError, match=re.escape(new.strip())):
        Shell(procs, tmp_path / "workspace").run_block(broken)


def test_a_line_without_a_rule_fails(procs: Processes, tmp_path: Path) -> None:
    block = Block(REPO / "README.md", 1, "sh", "pip install phibroker\n")
    with pytest.raises(AssertionError, match="no rule to run"):
        Shell(procs, tmp_path / "workspace").run_block(block)


@pytest.mark.parametrize(
    ("old", "new"),
    [("depends_on: [Implement]", "depends_on: [Implemnt]"), ("tasks:\n", "tasks:\n  - broken: [\n")],
    ids=["unknown-dependency", "not-yaml"],
)
def test_a_broken_yaml_block_fails(old: str, new: str, tmp_path: Path) -> None:
    workflow = readme_block("yaml", "tasks:")
    check_yaml_block(workflow, tmp_path)  # the README's own block passes...
    with pytest.raises(AssertionError):
        check_yaml_block(edited(workflow, old, new), tmp_path)  # ...and the edited copy does not


def test_an_agent_block_that_fails_to_import_fails(procs: Processes, client: Client, tmp_path: Path) -> None:
    agent = next(b for b in ALL_BLOCKS if b.language == "python" and agent_block(b.text))
    broken = edited(agent, "from phibroker import Agent", "from phibroker import NoSuchName, Agent")
    with pytest.raises(AssertionError, match="the worker exited"):
        serve_agent_block(broken, procs, client, tmp_path / "user-project")


def test_a_python_block_that_fails_fails(procs: Processes, client: Client, tmp_path: Path) -> None:
    block = Block(REPO / "README.md", 1, "python", "from phibroker import Retryable\nraise Retryable('no')\n")
    with pytest.raises(AssertionError, match="Retryable: no"):
        test_python_block(block, procs, client, tmp_path)


def test_the_documented_imports_work() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from phibroker import Agent, Client, PhibrokerError, Retryable, __version__"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO.parent,
    )
    assert result.returncode == 0, result.stderr
