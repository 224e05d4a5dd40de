"""Test harnesses, for our tests and users' own: a private `redis-server` on a free port (or a Redis
Cluster of them), and a `Simulation` that drives a workflow through the engine in memory.

Tests and benchmarks must never touch a Redis someone else runs (or its data): each session starts its
own, and stops it at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from phibroker import engine
from phibroker.engine.records import status_document
from phibroker.engine.state import WF_TERMINAL, Run, new_workflow_fields, timer_member, timer_workflow
from phibroker.runtime.agent import Agent, Context
from phibroker.wire import Inbox, TaskMessage, unpack
from phibroker.workflow import Workflow, check, from_stored, load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """`redis-server` on a free port in a directory of its own; `restart()` keeps its AOF when on."""

    def __init__(
        self,
        directory: Path | None = None,
        appendonly: bool = False,
        cluster_node_timeout: int = 0,
        options: Sequence[str] = (),
    ):
        self.directory = directory or Path(tempfile.mkdtemp(prefix="phibroker-redis-"))
        self.appendonly = appendonly
        self.options = list(options)  # more `redis-server` arguments: `--aclfile PATH`, ...
        self.port = free_port()
        # a node of a Redis Cluster (`RedisCluster`) when set: its bus on a free port of its own, since
        # the default (port + 10000) may be taken or past 65535
        self.cluster_node_timeout = cluster_node_timeout
        self.bus_port = free_port() if cluster_node_timeout else 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it answers. On its first start, a port another process took
        meanwhile (tests run side by side) makes it exit at once: it starts again on another free port.
        Started again later (`restart`), it keeps its port: its clients know that one."""
        movable = self.process is None
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
            args += ["--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
            if self.cluster_node_timeout:
                args += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port)]
                args += ["--cluster-node-timeout", str(self.cluster_node_timeout)]
            args += self.options
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while time.monotonic() < deadline and self.process.poll() is None:
                if self.answers() and self.process.poll() is None:
                    return
                time.sleep(0.02)
            if self.process.poll() is not None and movable:  # it could not bind: the port was taken
                self.port = free_port()
                self.bus_port = free_port() if self.cluster_node_timeout else 0
            elif self.process.poll() is not None:
                time.sleep(0.1)  # the port is still held (by its last run, or by another): try again
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: it serves, ACL users only
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisCluster:
    """A Redis Cluster on free ports: `masters` masters with `replicas` replicas each, every node a
    `RedisServer` in a directory of its own, the slots spread by `redis-cli --cluster create`.

        with RedisCluster() as cluster:
            settings = Settings(redis_url=cluster.url)

    `node_timeout` (ms) is how long a master may stay silent before its replica takes over: short
    enough for a failover test, long enough that a loaded machine does not fail a master over by itself.
    `aclfile` loads users on every node; `auth` (user, password) is then who the harness itself (and
    each replica, to its master) logs in as: a user the file holds, allowed every command.
    `kill_master` and `restart` make a master fail over, and bring the dead node back as a replica.
    """

    def __init__(
        self,
        directory: Path | None = None,
        masters: int = 3,
        replicas: int = 1,
        node_timeout: int = 5000,
        aclfile: Path | None = None,
        auth: tuple[str, str] | None = None,
    ):
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        if aclfile is not None and auth is None:
            raise ValueError("an aclfile needs `auth`: the user the harness and the replicas log in as")
        self.directory = directory or Path(tempfile.mkdtemp(prefix="phibroker-cluster-"))
        self.replicas = replicas
        self.auth = auth
        self.lost = 0  # bytes of writes masters acknowledged and their promoted replicas never had (`lose`)
        options = ["--repl-diskless-sync-delay", "0"]  # a node back from the dead syncs at once
        options += ["--aclfile", str(aclfile)] if aclfile else []
        if auth:
            options += ["--masteruser", auth[0], "--masterauth", auth[1]]
        self.nodes = [
            RedisServer(self.directory / f"node-{i}", cluster_node_timeout=node_timeout, options=options)
            for i in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """Every node as a seed, so a client starts whichever of them is down."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes) + "/"

    @property
    def live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def start(self, timeout: float = 60.0) -> None:
        """Start every node, join them into one cluster and wait until every node sees all slots served."""
        binary = shutil.which("redis-cli")
        if binary is None:
            raise RuntimeError("redis-cli is not installed (apt-get install -y redis-server)")
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        args = [binary, *self._login(), "--cluster", "create", *addresses]
        args += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        made = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
        if made.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {made.stdout.decode()[-2000:]}")
        self._wait(self.ready, timeout, "the Redis Cluster did not come up")

    def ready(self) -> bool:
        """Every node says the cluster is ok, and every replica is in sync with its master."""
        for node in self.nodes:
            info = self.command(node, "CLUSTER", "INFO") + self.command(node, "INFO", "replication")
            if "cluster_state:ok" not in info or "master_link_status:down" in info:
                return False
        return True

    def command(self, node: RedisServer, *args: str) -> str:
        """A command to one node, by `redis-cli`: its reply as text ("" when the node does not answer)."""
        argv = ["redis-cli", "-p", str(node.port), *self._login(), *args]
        reply = subprocess.run(argv, capture_output=True, timeout=10, check=False)
        return reply.stdout.decode(errors="replace")

    def _login(self) -> list[str]:
        return ["--user", self.auth[0], "--pass", self.auth[1], "--no-auth-warning"] if self.auth else []

    def role(self, node: RedisServer) -> str:
        """`master` or `slave` as the node says it now; "" for a node that does not answer."""
        for line in self.command(node, "INFO", "replication").splitlines():
            if line.startswith("role:"):
                return line.partition(":")[2].strip()
        return ""

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The live nodes replicating `master`, as it lists them."""
        info = self.command(master, "INFO", "replication")
        ports = {part.partition("=")[2] for part in info.replace(",", "\n").splitlines() if part.startswith("port=")}
        return [node for node in self.live if str(node.port) in ports]

    def kill_master(
        self, spare: Iterable[RedisServer] = (), lose: float = 0.0, timeout: float = 60.0
    ) -> tuple[RedisServer, RedisServer]:
        """kill -9 a master (none of `spare`, nor one a node of `spare` replicates) and wait until a
        replica of it is promoted and every live node sees all slots served again: (killed, promoted).

        What the master acknowledged and had not yet sent its replica is lost, as in production; on
        one machine that is rarely anything. `lose` makes it certain: the replica's link is cut that
        many seconds before the kill, so the master's last `lose` seconds of writes are gone (`lost`
        counts their bytes)."""
        master, promoted = self._victim({id(node) for node in spare})
        if lose:
            self._cut(master, promoted)
            time.sleep(lose)
            self.lost += self._offset(master, "master_repl_offset") - self._offset(promoted, "slave_repl_offset")
        master.stop(kill=True)
        self._wait(lambda: self.serving(promoted), timeout, f"no replica took over from port {master.port}")
        if lose:
            self.command(promoted, "CONFIG", "SET", "masterauth", self.auth[1] if self.auth else "")
        return master, promoted

    def _offset(self, node: RedisServer, field: str) -> int:
        """A replication offset the node reports (INFO replication)."""
        for line in self.command(node, "INFO", "replication").splitlines():
            if line.startswith(f"{field}:"):
                return int(line.partition(":")[2])
        return 0

    def _cut(self, master: RedisServer, replica: RedisServer) -> None:
        """Drop the replica's link to its master, and keep it from logging in again (a wrong password)."""
        self.command(replica, "CONFIG", "SET", "masterauth", "not-the-password")
        self.command(master, "CLIENT", "KILL", "TYPE", "replica")

        def cut() -> bool:
            return "master_link_status:down" in self.command(replica, "INFO", "replication")

        self._wait(cut, 10.0, f"the replica on port {replica.port} kept its link")

    def _victim(self, spared: set[int]) -> tuple[RedisServer, RedisServer]:
        """A live master not spared, with a replica not spared either: (master, replica)."""
        for master in self.live:
            if id(master) in spared or self.role(master) != "master":
                continue
            followers = [node for node in self.replicas_of(master) if id(node) not in spared]
            if followers and len(followers) == len(self.replicas_of(master)):
                return master, followers[0]
        raise RuntimeError("no master with a replica to kill (of those not spared)")

    def serving(self, promoted: RedisServer) -> bool:
        """`promoted` is a master, and every live node sees all slots served."""
        if self.role(promoted) != "master":
            return False
        return all("cluster_state:ok" in self.command(node, "CLUSTER", "INFO") for node in self.live)

    def restart(self, node: RedisServer, timeout: float = 60.0) -> None:
        """Start a killed node again: its cluster config makes it a replica of whoever took its slots.
        Returns once every node is in sync."""
        node.start()

        def joined() -> bool:
            return self.role(node) == "slave" and self.ready()

        self._wait(joined, timeout, f"the node on port {node.port} did not join again as a replica")

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Return once every replica has what its master held when asked (by the offsets the replicas
        confirm each second): what was written before is no longer lost with a master."""
        for master in [node for node in self.live if self.role(node) == "master"]:
            info = self.command(master, "INFO", "replication")
            fields = dict(line.partition(":")[::2] for line in info.splitlines() if ":" in line)
            if fields.get("connected_slaves", "0") != "0":
                self._wait(self._caught_up(master, int(fields["master_repl_offset"])), timeout, "a replica lags")

    def _caught_up(self, master: RedisServer, offset: int) -> Callable[[], bool]:
        """Whether every replica of `master` has confirmed `offset`."""
        return lambda: self._acked(master) >= offset

    def _acked(self, master: RedisServer) -> int:
        """The smallest offset a replica of `master` has confirmed."""
        info = self.command(master, "INFO", "replication")
        offsets = [
            int(part.partition("=")[2]) for part in info.replace(",", "\n").splitlines() if part.startswith("offset=")
        ]
        return min(offsets, default=0)

    def _wait(self, check: Callable[[], bool], timeout: float, failure: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(failure)
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(kill=True)

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Simulation:
    """A run driven through the real engine in memory: no Redis, no processes, a virtual clock.

    For unit tests of the engine and of users' own workflows (as dramatiq's StubBroker or Temporal's
    test environment serve theirs): every dispatch runs the matching `Agent`'s handler at once, its
    result goes through the same transition a coordinator applies, and retries, deadlines and
    approval timeouts fire on a clock that jumps to the next due time.

        sim = Simulation("examples/saga.yaml", [vssc, kalic, cmdc])  # a file, or the same as a dict
        assert sim.run()["state"] == "failed"

    A `workflow:` task's child runs are driven beside the run, as a coordinator drives them:
    `sim.runs` holds every run by id and `sim.status(child_id)` shows one. A handler's `ctx.spend`
    goes through the engine at once, as a coordinator takes a worker's report: budgets stop it
    (`ctx.cancelled`, BudgetExhausted) or open a request to approve while it runs.
    """

    worker = "simulation"

    def __init__(
        self,
        source: str | Path | Workflow | Mapping[str, Any],
        agents: Iterable[Agent] = (),
        params: Mapping[str, Any] | None = None,
        *,
        run_id: str = "sim",
        start: float = 1_000_000.0,
        seed: int = 0,
        limit: int = 1 << 20,
    ):
        if isinstance(source, Workflow):
            workflow = source
        else:
            workflow = check(source) if isinstance(source, Mapping) else load(source)
        self.agents = {agent.name: agent for agent in agents}
        self.now = start
        self.limit = limit
        self.seed = seed
        meta = new_workflow_fields(workflow, workflow.params_with(params or {}), start)
        self.run_state = self._new_run(run_id, workflow, meta)
        self.runs: dict[str, Run] = {run_id: self.run_state}  # the run and its child runs
        self.queue: deque[TaskMessage] = deque()
        self.timers: dict[str, float] = {}
        self.approvals: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.history: list[bytes] = []
        self.histories: dict[str, list[bytes]] = {run_id: self.history}
        self.signals_sent: list[dict[str, Any]] = []  # ctx.signal to other runs: wf, name, data, sender
        self._inbox: deque[dict[str, Any]] = deque()  # ctx.signal to these runs, delivered in order
        self._messages: deque[Inbox] = deque()  # between runs: a child's end, a cancel of a child
        self._running: dict[str, Context] = {}  # the attempt whose handler runs now, by dispatch id
        self._apply(engine.start)

    # -- driving -----------------------------------------------------------------------------------
    def run(self, max_steps: int = 1_000_000) -> dict[str, Any]:
        """Step until the run ends, or waits for a person with nothing else due first; its status."""
        for _ in range(max_steps):
            if self.ended or self._waiting_for_a_person() or not self.step():
                return self.status()
        raise RuntimeError(f"{self.run_state.id} did not settle in {max_steps} steps")

    def step(self) -> bool:
        """Deliver the next message, run the next dispatched attempt, or fire the next timer; False
        when nothing is left."""
        if self._work_now():
            return True
        if not self.timers:
            return False
        member = min(self.timers, key=self.timers.__getitem__)
        self._fire(member)
        return True

    def advance(self, seconds: float) -> dict[str, Any]:
        """Let `seconds` pass: whatever is due by then runs (an approval may time out); the status."""
        until = self.now + seconds
        while not self.ended:
            if self._work_now():
                continue
            due = [m for m, at in self.timers.items() if at <= until]
            if not due:
                break
            self._fire(min(due, key=self.timers.__getitem__))
        self.now = max(self.now, until)
        return self.status()

    def approve(
        self, task: str, approver: str = "stryk", comment: str | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        """Decide the open approval of `task` as `approver` (no signature: nothing leaves memory), in
        the run or, with `run_id`, in one of its child runs; then run on."""
        return self._decide(task, "approve", approver, run_id, comment=comment)

    def reject(self, task: str, reason: str, approver: str = "stryk", run_id: str | None = None) -> dict[str, Any]:
        return self._decide(task, "reject", approver, run_id, reason=reason)

    def cancel(self, reason: str = "cancelled by request", tasks: Iterable[str] = ()) -> dict[str, Any]:
        """Cancel the run, or only `tasks` of it (as `phibroker cancel ID --task T`); then run on."""
        names = list(tasks)
        if names:
            self._apply(lambda run, now: engine.cancel_tasks(run, names, now, reason))
        else:
            self._apply(lambda run, now: engine.cancel(run, now, reason))
        return self.run()

    def retry(self, from_task: str | None = None) -> dict[str, Any]:
        """Re-open the ended run (as `phibroker retry ID [--from TASK]`); then run on."""
        refusal = self._apply(lambda run, now: engine.reopen(run, now, from_task))
        if refusal:
            raise ValueError(refusal)
        return self.run()

    def signal(self, name: str, data: Any = None, run_id: str | None = None) -> dict[str, Any]:
        """Send the run (or, with `run_id`, one of its child runs) a signal, as `phibroker signal ID
        NAME --data JSON`; then run on."""
        self._apply(lambda run, now: engine.signal(run, name, data, now, "simulation"), self._run(run_id))
        return self.run()

    # -- reading -----------------------------------------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.run_state.wf_state in WF_TERMINAL

    def status(self, run_id: str | None = None) -> dict[str, Any]:
        """The run (or one of its child runs) as `status --json` shows it."""
        run = self._run(run_id)
        units = {name: dict(record) for name, record in run.units.items()}
        history = self.histories[run.id]
        return status_document(run.id, dict(run.meta), units, dict(run.raw_results), history, self.limit)

    def event_types(self, task: str | None = None) -> list[str]:
        """The types of the events published so far, of one task or all."""
        return [e["type"] for e in self.events if task is None or e.get("task") == task]

    # -- inside ------------------------------------------------------------------------------------
    def _apply(self, step: Callable[[Run, float], Any], run: Run | None = None) -> Any:
        """One input applied to the run (or a child run), and its transition carried out as a
        coordinator would."""
        run = run or self.run_state
        tx = run.begin()
        value = step(run, self.now)
        self.histories[run.id] += tx.history
        self.events += tx.events
        self.queue.extend(TaskMessage.decode(raw, self.limit) for _, raw in tx.dispatches)
        self.timers.update(tx.timers_add)
        for member in tx.timers_del:
            self.timers.pop(member, None)
        self.approvals.update({k: unpack(v, self.limit) for k, v in tx.approvals_set.items()})
        for request in tx.approvals_del:
            self.approvals.pop(request, None)
        for _, _, dispatch in tx.stops:  # a running handler is asked to stop (a budget passed)
            if dispatch in self._running:
                self._running[dispatch].cancelled.set()
        for sent in tx.signals:  # ctx.signal: to these runs it arrives, to any other it is only recorded
            if sent["wf"] in self.runs:
                self._inbox.append(sent)
            else:
                self.signals_sent.append(sent)
        self._messages.extend(Inbox.decode(raw, self.limit * 4) for raw in tx.inbox)
        for child_id, fields in tx.child_runs:
            self._create(child_id, fields)
        return value

    def _create(self, run_id: str, fields: Mapping[str, Any]) -> None:
        """A child run, created once (as the create script does) and started."""
        if run_id in self.runs:
            return
        meta = dict(fields)
        child = self._new_run(run_id, from_stored(meta["spec"]), meta)
        self.runs[run_id] = child
        self.histories[run_id] = []
        self._apply(engine.start, child)

    def _work_now(self) -> bool:
        """Deliver one message between runs, or one signal, or run one dispatched attempt: False if none."""
        if self._messages:
            message = self._messages.popleft()
            target = self.runs.get(str(message.body["wf"]))
            if target is not None:
                self._deliver(message, target)
            return True
        if self._inbox:
            sent = self._inbox.popleft()
            name, data, sender, sid = sent["name"], sent.get("data"), sent.get("sender"), str(sent.get("id") or "")
            self._apply(lambda run, now: engine.signal(run, name, data, now, sender, sid), self.runs[sent["wf"]])
            return True
        if self.queue:
            self._execute(self.queue.popleft())
            return True
        return False

    def _deliver(self, message: Inbox, target: Run) -> None:
        body = message.body
        if message.kind == "child":
            self._apply(lambda run, now: engine.child_ended(run, body, now), target)
        elif message.kind == "cancel":
            reason = str(body.get("reason") or "cancelled by request")
            self._apply(lambda run, now: engine.cancel(run, now, reason), target)

    def _new_run(self, run_id: str, workflow: Workflow, meta: dict[str, Any]) -> Run:
        run = Run(run_id, workflow, meta, {}, {}, limit=self.limit)
        run.rand.seed(self.seed)
        run.fresh = False  # no start script here: a result's token is taken as the one handed out
        return run

    def _execute(self, message: TaskMessage) -> None:
        if self.runs[message.wf].units.get(message.unit, {}).get("stop"):  # asked to stop before it started
            self._apply(lambda run, now: engine.declined(run, message.unit, message.id, now), self.runs[message.wf])
            return
        agent = self.agents.get(message.agent)
        if agent is None:
            known = ", ".join(sorted(self.agents)) or "none"
            raise LookupError(f"{message.unit} needs agent {message.agent!r}; the simulation has: {known}")
        record = self.runs[message.wf].units[message.unit]
        if record.get("state") == "ready" and record.get("dispatch") == message.id:  # as a start script marks it
            record.update(state="running", token=message.attempt, started=self.now, worker=self.worker)
        ctx = Context.for_message(message, token=message.attempt)
        ctx.reporter = self._spent
        self._running[message.id] = ctx
        try:
            outcome = agent.execute(message.command, ctx, message.payload, self.limit)
        finally:
            del self._running[message.id]
        outcome.started = outcome.finished = self.now  # handlers take no virtual time
        result = outcome.result(ctx, self.worker)
        self._apply(lambda run, now: engine.apply_result(run, result, now), self.runs[message.wf])

    def _spent(self, ctx: Context, tokens: int, cost: float) -> None:
        """A handler's `ctx.spend`: its attempt's totals, as a worker reports them to the coordinators."""
        total_tokens, total_cost = ctx.spent()
        body = {"wf": ctx.workflow_id, "unit": ctx.unit, "dispatch": ctx.dispatch_id, "attempt": ctx.attempt}
        body.update(tokens=total_tokens, cost=total_cost)
        self._apply(lambda run, now: engine.spend(run, body, now), self.runs[ctx.workflow_id])

    def _fire(self, member: str) -> None:
        self.now = max(self.now, self.timers.pop(member))
        target = self.runs.get(timer_workflow(member))
        if target is not None:
            self._apply(lambda run, now: engine.apply_timer(run, member, now), target)

    def _waiting_for_a_person(self) -> bool:
        """An approval or a signal gate is open and nothing but its timeout (or a later timer) would
        happen next: the run waits for someone outside."""
        waiting = [
            timer_member("signal", run.id, t)
            for run in self.runs.values()
            for named in run.workflow.signal_gates.values()
            for t in named
            if run.state(t) == "running"
        ]
        waiting += [timer_member("approval", r["workflow"], r["task"], r["id"]) for r in self.approvals.values()]
        if self.queue or self._inbox or self._messages or not waiting:
            return False
        first = min(self.timers.values(), default=None)
        return first is None or first in {self.timers.get(m) for m in waiting}

    def _run(self, run_id: str | None) -> Run:
        if run_id is not None and run_id not in self.runs:
            raise LookupError(f"no run {run_id!r} (the simulation has: {', '.join(sorted(self.runs))})")
        return self.runs[run_id or self.run_state.id]

    def _decide(
        self, task: str, decision: str, approver: str, run_id: str | None, **words: str | None
    ) -> dict[str, Any]:
        target = self._run(run_id)
        request = next((r for r in self.approvals.values() if r["task"] == task and r["workflow"] == target.id), None)
        if request is None:
            raise LookupError(f"no open approval for task {task!r} in {target.id}")
        body = {"task": task, "approval": request["id"], "approver": approver, "decision": decision, **words}
        refusal = self._apply(lambda run, now: engine.decide(run, body, now), target)
        if refusal:
            raise ValueError(f"decision refused: {refusal}")
        return self.run()
