"""`phibroker dev`: a first try in one command, on a broker other terminals reach with no settings.

It uses the Redis at the configured URL if one answers, else starts one *at that address* (a
`redis-server` if installed, else fakeredis's TCP server in a thread), runs the coordinator and one worker
per reference agent as child processes logging to files, submits an example workflow and shows it
running. Everything it started stops on Ctrl-C or SIGTERM, in order: processes first, then the broker.
A `redis-server` it starts keeps its data in an append-only file under `$PHIBROKER_HOME/dev-data/PORT`
(one folder per port, so two dev brokers never share a file), so runs, approvals and trusted keys
outlive a restart; `fresh` starts it empty.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from phibroker import workflow as workflows
from phibroker.engine.state import TASK_TERMINAL, WF_TERMINAL
from phibroker.errors import BrokerUnavailable, PhibrokerError
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from phibroker.store.connection import CONNECTION_ERRORS, unusable
from phibroker.tools.styles import STATE_STYLES as STYLES
from phibroker.tools.styles import duration_text

REFERENCE_AGENTS = ("webc", "dc", "vssc", "kalic", "cmdc")
DEFAULT_URL = str(Settings.model_fields["redis_url"].default)
DEFAULT_NAMESPACE = str(Settings.model_fields["namespace"].default)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
STOP_WAIT = 10.0  # seconds a child gets after SIGTERM before it is killed
WEB_PORT = 8265  # `phibroker ui`'s default
_PAGE_AT = re.compile(r"phibroker ui at (\S+)")  # what `phibroker ui` says once it listens


def find_example(name: str = "complete-dag.yaml") -> Path | None:
    """The repository's examples folder (editable install), else ./examples."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (base / "examples" / name).is_file():
            return base / "examples" / name
    return None


def shown_path(path: Path) -> str:
    """A path as a user would type it: relative to the current folder, else to ~, else absolute."""
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return prefix + str(path.resolve().relative_to(base))
        except ValueError:
            continue
    return str(path)


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived: unwind to `run()`, which stops everything."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]


class DevServer:
    """Owns what `dev` started — a broker perhaps, and the processes — so that `stop()` can undo it all."""

    def __init__(
        self,
        settings: Settings,
        app: str | None = None,
        example: Path | None = None,
        once: bool = False,
        fresh: bool = False,
    ):
        self.settings = settings
        self.app = app
        self.example = example
        self.once = once
        self.fresh = fresh
        self.logs = settings.home / "dev-logs"
        self.console = Console(highlight=False, soft_wrap=True)  # long paths and URLs stay whole
        self.client = Client(settings)
        self.children: list[Child] = []
        self.redis_server: Child | None = None
        self.page: Child | None = None  # `phibroker ui`, and where it answers
        self.page_url = ""
        self.embedded: Any = None  # a fakeredis.TcpFakeServer serving from self.embedded_thread
        self.embedded_thread: threading.Thread | None = None
        self.broker_line = ""
        self.broker_note = ""
        self.stopping = threading.Event()  # Ctrl-C, SIGTERM or SIGHUP: stop cleanly
        self.hurry = threading.Event()  # a second one: kill instead of waiting

    # -- the whole run -----------------------------------------------------------------------------
    def run(self) -> int:
        """Start, show the example, then serve until a signal; with `once`, stop when the example ends.

        The exit code: 0 — Ctrl-C is the normal way out — except with `once` and an example, where it
        is 0 only if the example succeeded, so scripts and tests can rely on it.
        """
        checked = workflows.load(self.example) if self.example else None  # a bad file: exit 2, nothing started
        self._trap_signals()
        try:
            self.find_or_start_broker()
            self.start_processes()
            self.wait_until_up()
            self.start_page()
            status = None
            if self.example and checked:
                wf_id = self.client.submit(checked)
                self.console.print(f"Submitted {shown_path(self.example)} as [bold]{wf_id}[/]")
                status = self.show_progress(wf_id)
                self.print_summary(status)
            if self.once:
                return 0 if status is None or status["state"] == "succeeded" else 1
            self.print_usage()
            while not self.stopping.wait(0.5):
                self.check_children()
            return 0
        except _Interrupted:
            return 1 if self.once and checked else 0
        finally:
            self.stop()

    def _check_stop(self) -> None:
        if self.stopping.is_set():
            raise _Interrupted

    def _trap_signals(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            (self.hurry if self.stopping.is_set() else self.stopping).set()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, handler)

    # -- the broker --------------------------------------------------------------------------------
    def find_or_start_broker(self) -> None:
        """A Redis that answers wins; else one of ours at the URL's address, so the URL stays the same."""
        url = self.settings.redis_url
        if self._answers():
            self.broker_line = f"Using the Redis already running at {url}"
            self.console.print(self.broker_line)
            if self.fresh:
                self.console.print("  (--fresh: dev did not start this Redis, so its data stays)", style="dim")
            return
        host, port = self._local_address()
        self.logs.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary:
            self.redis_server = self._spawn("redis-server", self._redis_server_args(binary, host, port))
            self.broker_line = f"Started redis-server at {url} (stopped on exit)"
            kept = "started empty" if self.fresh else "kept across restarts; `phibroker dev --fresh` starts empty"
            self.broker_note = f"  (its data: {shown_path(self.data_dir(port))}/, {kept})"
        else:
            try:
                import fakeredis
            except ImportError:
                raise BrokerUnavailable(
                    "no redis-server here and no embedded broker: install redis-server (apt-get install"
                    " redis-server), or pip install 'phibroker[embedded]'"
                ) from None
            embedded_read_scripts()
            try:
                self.embedded = fakeredis.TcpFakeServer((host, port), server_type="redis")
            except OSError as exc:
                raise BrokerUnavailable(f"cannot start the embedded broker at {host}:{port}: {exc}") from None
            self.embedded_thread = threading.Thread(target=self.embedded.serve_forever, name="phi-embedded-broker")
            self.embedded_thread.start()
            self.broker_line = f"Started the embedded broker (fakeredis) at {url}"
            self.broker_note = (
                "  (inside this process, about 20× slower than redis-server and keeping nothing:"
                " fine for a try; install redis-server for real work)"
            )
        deadline = time.monotonic() + 10
        while not self._answers():
            if self.redis_server and self.redis_server.process.poll() is not None:
                raise BrokerUnavailable(f"redis-server could not start at {url}:\n{self._tail(self.redis_server)}")
            self._check_stop()
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"the broker started at {url} does not answer")
            time.sleep(0.05)
        self.console.print(self.broker_line)
        if self.broker_note:
            self.console.print(self.broker_note, style="dim")

    def data_dir(self, port: int) -> Path:
        """Where the redis-server dev starts on `port` keeps its AOF: one folder per port, since two
        servers writing one AOF would corrupt it."""
        return self.settings.home / "dev-data" / str(port)

    def _redis_server_args(self, binary: str, host: str, port: int) -> list[str]:
        """A redis-server that logs every write to an AOF in the port's dev data folder (emptied first if
        fresh): Ctrl-C then `make dev` again finds the runs, approvals and keys where they were."""
        data = self.data_dir(port)
        if self.fresh:
            shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        bind = "127.0.0.1" if host == "localhost" else host
        persistence = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data)]
        return [binary, "--port", str(port), "--bind", bind, *persistence]

    def _answers(self) -> bool:
        """Whether a Redis answers at the URL; one that answers but cannot be used (a database it does
        not have, a password it refuses) ends the run: starting another one there would fail anyway."""
        try:
            self.client.broker.redis.ping()
            return True
        except CONNECTION_ERRORS:
            return False
        except Exception as exc:  # noqa: BLE001 - whatever else it says, it is not a Redis we can use
            reason = unusable(self.settings, exc)
            raise reason or BrokerUnavailable(f"{self.settings.shown_url} answers, but not as Redis: {exc}") from None

    def _local_address(self) -> tuple[str, int]:
        """Where to start a broker; only on this machine, and only for a plain redis:// URL."""
        parts = urlsplit(self.settings.redis_url)
        host, port = parts.hostname or "localhost", parts.port or 6379
        if parts.scheme != "redis" or not (host in LOCAL_HOSTS or host.startswith("127.")):
            raise BrokerUnavailable(
                f"nothing answers at {self.settings.shown_url}, and dev starts a broker only at redis://localhost:PORT"
            )
        return host, port

    # -- the processes -----------------------------------------------------------------------------
    def start_processes(self) -> None:
        """The coordinator and one worker per reference agent, as `phibroker` children of this process."""
        self._check_stop()
        self.logs.mkdir(parents=True, exist_ok=True)
        app = ["--app", self.app] if self.app else []
        phibroker = [sys.executable, "-m", "phibroker"]
        self.children.append(self._spawn("coordinator", [*phibroker, "coordinator"]))
        for agent in REFERENCE_AGENTS:
            self.children.append(self._spawn(f"worker-{agent}", [*phibroker, "worker", "--agent", agent, *app]))

    def wait_until_up(self) -> None:
        """Until every child holds its lease, so the example's timings show work, not Python starting up."""
        pids = {child.process.pid for child in self.children}
        text = f"the coordinator and workers for {', '.join(REFERENCE_AGENTS)}"
        keys = self.settings.keys
        with self.console.status(f"Starting {text}…"):
            while True:
                self._check_stop()
                try:
                    leases = [*self.client.broker.leases(keys.coordinators)[1].values()]
                    leases += self.client.broker.worker_leases()[1].values()
                except CONNECTION_ERRORS as exc:
                    raise BrokerUnavailable(f"lost Redis at {self.settings.shown_url}: {exc}") from None
                if pids <= {lease.get("pid") for lease in leases}:
                    break
                self.check_children()
                self.stopping.wait(0.1)
        self.console.print(f"Started {text}")
        self.console.print(f"  (their logs: {shown_path(self.logs)}/)", style="dim")

    def start_page(self) -> None:
        """`phibroker ui --allow-actions` on 8265, or on a free port if that one is taken (by another
        page, or by another `dev` starting at the same moment). Where it listens is what the page itself
        says in its log once its socket is bound: a page that answers on 8265 may be another's."""
        for port in (WEB_PORT, 0):
            if self.page is not None:  # it could not listen on 8265
                self.page.handle.close()
            page = [sys.executable, "-m", "phibroker", "ui", "--port", str(port), "--allow-actions"]
            self.page = self._spawn("ui", page)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.page.process.poll() is None:
                self._check_stop()
                self.check_children(but=self.page)
                said = _PAGE_AT.search(self.page.log.read_text(errors="replace"))
                if said:
                    self.page_url = said[1]
                    self.console.print(f"The web page: {self.page_url} (runs, DAGs, approvals, agents)")
                    return
                self.stopping.wait(0.1)
            if self.page.process.poll() is None:
                self.console.print(f"The web page did not answer in 30s; see {shown_path(self.page.log)}", style="dim")
                return
        self.check_children()  # neither port: say why

    def _spawn(self, name: str, args: list[str]) -> Child:
        """A child in its own process group: a terminal's Ctrl-C reaches only us, and we stop it in order."""
        env = {
            **os.environ,
            "PHIBROKER_REDIS_URL": self.settings.redis_url,
            "PHIBROKER_NAMESPACE": self.settings.namespace,
            "PHIBROKER_HOME": str(self.settings.home),
        }
        log = self.logs / f"{name}.log"
        handle = open(log, "wb")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env, process_group=0
        )
        return Child(name, process, log, handle)

    def check_children(self, but: Child | None = None) -> None:
        """A child that exits on its own (a bad --app, a crash) ends the run with its log's last lines."""
        for child in self.children + [c for c in (self.page, self.redis_server) if c]:
            if child is not but and child.process.poll() is not None:
                raise PhibrokerError(
                    f"{child.name} exited with code {child.process.returncode}; "
                    f"the end of {shown_path(child.log)}:\n{self._tail(child)}"
                )

    @staticmethod
    def _tail(child: Child, lines: int = 8) -> str:
        child.handle.flush()
        return "\n".join(child.log.read_text(errors="replace").splitlines()[-lines:])

    # -- showing the example -----------------------------------------------------------------------
    def show_progress(self, wf_id: str) -> dict[str, Any]:
        """Redraw the workflow 4 times a second until it ends; its last status."""
        status = self.client.status(wf_id)
        try:
            with Live(render(status), console=self.console, auto_refresh=False) as live:
                while status["state"] not in WF_TERMINAL:
                    self.check_children()
                    self.stopping.wait(0.25)
                    self._check_stop()
                    status = self.client.status(wf_id)
                    live.update(render(status), refresh=True)
        finally:
            if not self.console.is_terminal:
                self.console.line()  # Live ends a terminal's last line itself, not a file's
        return status

    def print_summary(self, status: dict[str, Any]) -> None:
        counts = Counter(task["state"] for task in status["tasks"].values())
        tally = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        style = "green" if status["state"] == "succeeded" else "red"
        self.console.print(f"[{style}]{status['name']} {status['state']}[/] in {_elapsed(status)}: {tally}")
        if status["state"] != "succeeded":
            for name, task in status["tasks"].items():
                if task["state"] == "failed":
                    self.console.print(f"  {name}: {task['error']}", soft_wrap=False, no_wrap=True, overflow="ellipsis")
            self.console.print(f"  more: phibroker status {status['id']}")

    def print_usage(self) -> None:
        """How another terminal reaches what runs here: the exports it needs (none by default)."""
        lines = ["", self.broker_line + ".", "The coordinator and the workers keep running. From another terminal:"]
        if self.settings.redis_url != DEFAULT_URL:
            lines.append(f"  export PHIBROKER_REDIS_URL={self.settings.redis_url}")
        if self.settings.namespace != DEFAULT_NAMESPACE:
            lines.append(f"  export PHIBROKER_NAMESPACE={self.settings.namespace}")
        if sys.prefix != sys.base_prefix:
            lines.append(f"  source {shown_path(Path(sys.prefix))}/bin/activate")
        research = find_example("parallel-research.yaml")
        lines.append(f"  phibroker submit {shown_path(research) if research else 'FILE.yaml'} --wait")
        lines.append("  phibroker list")
        if self.page_url:
            lines.append(f"Or open {self.page_url} in a browser.")
        lines.append("[bold]Ctrl-C stops everything.[/]")
        self.console.print("\n".join(lines))

    # -- stopping ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """SIGTERM to every child, wait (kill after STOP_WAIT or a second Ctrl-C), then the broker."""
        started = bool(self.children or self.redis_server or self.embedded)
        if started:
            self._say(("\n" if self.stopping.is_set() else "") + "Stopping what dev started…")
        self._terminate(self.children + ([self.page] if self.page else []))
        self.client.close()
        if self.redis_server:
            self._terminate([self.redis_server])
        if self.embedded is not None:
            self.embedded.shutdown()
            self.embedded.server_close()
            if self.embedded_thread:
                self.embedded_thread.join(timeout=STOP_WAIT)
        if started:
            self._say("Stopped.")

    def _say(self, text: str) -> None:
        """Print, unless the terminal is gone (closed, or a pipe whose reader Ctrl-C killed too):
        stopping what we started must not depend on having somewhere to say so."""
        try:
            self.console.print(text)
        except OSError:
            pass

    def _terminate(self, children: list[Child]) -> None:
        for child in children:
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_WAIT
        while any(c.process.poll() is None for c in children) and time.monotonic() < deadline:
            if self.hurry.wait(0.05):
                break
        for child in children:
            if child.process.poll() is None:
                child.process.kill()
            child.process.wait()
            child.handle.close()


def render(status: dict[str, Any]) -> Group:
    """The live view of one workflow: a header, then one line per task. Pure, so it can be tested alone."""
    state = status["state"] or "?"
    done = sum(1 for task in status["tasks"].values() if task["state"] in TASK_TERMINAL)
    header = Text.assemble(
        (status["id"], "bold"), "  ", (state, STYLES.get(state, "bold")), f"  {done}/{len(status['tasks'])} tasks done"
    )
    header.append(f"  {_elapsed(status)}", "dim")
    table = Table(box=None, padding=(0, 2, 0, 0), show_header=True, header_style="dim")
    for column in ("task", "state", "agent", "time"):
        table.add_column(column, justify="right" if column == "time" else "left", no_wrap=column != "task")
    for name, task in status["tasks"].items():
        took = ""
        if task["started_at"]:
            took = duration_text((task["finished_at"] or time.time()) - task["started_at"], digits=2)
        attempts = f" (try {task['attempts']})" if task["attempts"] > 1 else ""
        table.add_row(name, Text(task["state"] + attempts, STYLES.get(task["state"], "")), task["agent"] or "-", took)
    return Group(header, table)


def _elapsed(status: dict[str, Any]) -> str:
    if not status.get("created_at"):
        return ""
    return duration_text((status["finished_at"] or time.time()) - status["created_at"])


def embedded_read_scripts() -> None:
    """The embedded broker runs EVALSHA_RO (Redis 7), which it lacks, as EVALSHA: phibroker's read
    scripts (`READ_OWN`, `READ_LEASES`) write nothing, and no other user is there to keep out."""
    from fakeredis import _commands

    if "evalsha_ro" not in _commands.SUPPORTED_COMMANDS:
        alias = copy.copy(_commands.SUPPORTED_COMMANDS["evalsha"])
        alias.name = "evalsha_ro"
        _commands.SUPPORTED_COMMANDS["evalsha_ro"] = alias
