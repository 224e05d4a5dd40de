"""A task's live output: `ctx.stream` chunks, its handler's log records and the run's events, in a stream
per agent of the run and the run's own, read merged by `phibroker logs` and `Client.stream` (real Redis,
real worker and coordinator)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from phibroker import Client, wire
from phibroker import workflow as workflows
from phibroker.engine.records import event as make_event
from phibroker.engine.records import output_record
from phibroker.settings import Settings
from tests.conftest import Processes, until
from tests.test_core import cli

APP = "tests.apps.streamer"
RETRY = {"max_attempts": 3, "base_delay": 0.1, "jitter": 0}
RECORD_KEYS = {"kind", "task", "unit", "partition", "attempt", "seq", "data", "ts"}


def flow(name: str, tasks: dict[str, Any]) -> workflows.Workflow:
    steps = {n: {"agent": "streamer", **t} for n, t in tasks.items()}
    return workflows.check({"name": name, "tasks": steps})


def order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def lines_of(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def what(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each record in short: (kind, unit, attempt, chunk | log message | event type)."""
    out = []
    for r in records:
        shown = r["data"]["type"] if r["kind"] == "event" else r["data"]
        if r["kind"] == "log":
            shown = (r["data"]["level"], r["data"]["message"])
        out.append((r["kind"], r["unit"], r["attempt"], shown))
    return out


def test_logs_replays_chunks_logs_and_events_in_order(procs: Processes, settings: Settings, client: Client) -> None:
    procs.coordinator()
    procs.worker("streamer", app=APP)
    speak = {"command": "speak", "payload": {"words": ["a", "b", "c"]}, "retry": RETRY}
    after = {"command": "speak_async", "payload": {"words": ["x", "y"]}, "depends_on": ["Speak"]}
    wf_id = client.submit(flow("talk", {"Speak": speak, "After": after}))
    assert client.wait(wf_id, timeout=60)["state"] == "succeeded", procs.output()

    records = lines_of(cli(settings, "logs", wf_id, "--json"))
    assert all(RECORD_KEYS <= set(r) for r in records)
    shown = what(records)
    speak_part = [s for s in shown if s[1] == "Speak"]
    assert speak_part == [
        ("event", "Speak", 1, "task.dispatched"),
        ("event", "Speak", 1, "task.started"),
        ("log", "Speak", 1, ("INFO", "attempt 1 begins")),
        ("chunk", "Speak", 1, "a"),
        ("chunk", "Speak", 1, "b"),
        ("log", "Speak", 1, ("WARNING", "attempt 1 gives up")),
        ("event", "Speak", 1, "task.retrying"),
        ("event", "Speak", 2, "task.dispatched"),
        ("event", "Speak", 2, "task.started"),
        ("log", "Speak", 2, ("INFO", "attempt 2 begins")),
        ("chunk", "Speak", 2, "a"),
        ("chunk", "Speak", 2, "b"),
        ("chunk", "Speak", 2, "c"),
        ("chunk", "Speak", 2, {"done": True, "attempt": 2}),
        ("event", "Speak", 2, "task.succeeded"),
    ], shown
    # each attempt numbers its chunks and log records from 1; the debug record never came
    for attempt in (1, 2):
        seqs = [r["seq"] for r in records if r["unit"] == "Speak" and r["attempt"] == attempt and r["kind"] != "event"]
        assert seqs == list(range(1, len(seqs) + 1))
    assert not any(r["kind"] == "log" and "below INFO" in r["data"]["message"] for r in records)
    logged = next(r for r in records if r["kind"] == "log")
    assert logged["data"]["logger"] == "streamer.speak" and logged["task"] == "Speak"
    # the async handler's records come from its asyncio tasks, after what released it
    after_part = [s for s in shown if s[1] == "After"]
    assert [s for s in after_part if s[0] != "event"] == [
        ("log", "After", 1, ("INFO", "part x")),
        ("chunk", "After", 1, "x"),
        ("log", "After", 1, ("INFO", "part y")),
        ("chunk", "After", 1, "y"),
    ]
    assert shown.index(("event", "Speak", 2, "task.succeeded")) < shown.index(after_part[0])
    assert shown[0][3] == "workflow.submitted" and shown[-1][3] == "workflow.succeeded"
    event_ids = [r["data"]["id"] for r in records if r["kind"] == "event"]
    assert len(event_ids) == len(set(event_ids))

    # one task, the same records; the human form says the same in lines
    only = lines_of(cli(settings, "logs", wf_id, "--task", "After", "--json"))
    assert what(only) == after_part
    human = cli(settings, "logs", wf_id)
    assert human.returncode == 0, human.stderr
    assert "Speak [1]  a" in human.stdout and "Speak [2]  c" in human.stdout
    assert "INFO streamer.speak: attempt 2 begins" in human.stdout and "● task.retrying" in human.stdout
    assert '● spoke from streamer {"words": 2}' in human.stdout  # a handler's event says whose it was

    # the run's events and the agent's own output stream expire with the run's other keys
    keys = settings.keys
    kept = (keys.wf(wf_id), keys.wf_output(wf_id), keys.wf_agent_output(wf_id, "streamer"))
    ttls = [client.broker.redis.ttl(key) for key in kept]
    assert all(ttl > 0 for ttl in ttls) and max(ttls) - min(ttls) <= 2

    # read again from past the first dispatch: the agent's output is there, though its dispatch is not
    dispatched = next(r["id"] for r in records if r["kind"] == "event" and r["data"]["type"] == "task.dispatched")
    past = [r for r in records if order(r["id"]) > order(dispatched)]
    assert any(r["kind"] == "chunk" for r in past) and list(client.stream(wf_id, after=dispatched)) == past

    # from the public API, replayed from the start after the run ended
    with Client.from_url(settings.redis_url, namespace=settings.namespace) as public:
        assert list(public.stream(wf_id)) == records
        assert list(public.stream(wf_id, follow=True)) == records  # ended: it stops at once

    unknown = cli(settings, "logs", "no-such-run")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: no workflow with id 'no-such-run'"
    assert cli(settings, "logs", wf_id, "--task", "Nope").returncode == 2


def test_logs_follow_prints_chunks_as_they_come(procs: Processes, settings: Settings, tmp_path: Path) -> None:
    procs.coordinator()
    procs.worker("streamer", app=APP)
    gate = tmp_path / "gate"
    speak = {"command": "speak", "payload": {"words": ["one", "two", "last"], "fail_first": False, "gate": str(gate)}}
    with Client(settings) as client:
        wf_id = client.submit(flow("follow", {"Speak": speak}))
        env = {**os.environ, "PHIBROKER_REDIS_URL": settings.redis_url, "PHIBROKER_NAMESPACE": settings.namespace}
        follower = subprocess.Popen(
            [sys.executable, "-m", "phibroker", "logs", wf_id, "--follow", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        lines: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        reader = threading.Thread(target=lambda: [lines.put(json.loads(line)) for line in follower.stdout or ()])
        reader.start()
        try:
            seen: list[dict[str, Any]] = []

            def saw_two() -> bool:
                while not lines.empty():
                    seen.append(lines.get())
                return any(r["kind"] == "chunk" and r["data"] == "two" for r in seen)

            until(saw_two, procs, timeout=60)
            assert follower.poll() is None and client.status(wf_id)["state"] == "running"
            gate.touch()
            assert follower.wait(timeout=60) == 0, follower.stderr.read() if follower.stderr else ""
            reader.join(timeout=10)
            while not lines.empty():
                seen.append(lines.get())
        finally:
            if follower.poll() is None:
                follower.kill()
    chunks = [r["data"] for r in seen if r["kind"] == "chunk"]
    assert chunks == ["one", "two", "last", {"done": True, "attempt": 1}]
    assert seen[-1]["kind"] == "event" and seen[-1]["data"]["type"] == "workflow.succeeded"


def test_chunk_and_run_limits(procs: Processes, settings: Settings, client: Client) -> None:
    procs.coordinator()
    procs.worker("streamer", app=APP, PHIBROKER_OUTPUT_MAX_BYTES="5000")
    once = {"max_attempts": 1}
    big = client.submit(flow("big", {"Big": {"command": "big", "retry": once}}))
    flood = client.submit(flow("flood", {"Flood": {"command": "flood", "retry": once}}))
    assert client.wait(big, timeout=60)["state"] == "failed", procs.output()
    status = client.wait(flood, timeout=60)
    assert status["state"] == "succeeded", procs.output()

    # a chunk over 64 KiB fails the handler with one clear line; the chunk before it stays
    error = client.status(big)["tasks"]["Big"]["error"]
    assert error == "MessageTooLarge: a chunk streamed by Big is 70005 bytes, over the 65536-byte limit"
    assert [r["data"] for r in client.stream(big) if r["kind"] == "chunk"] == ["small first"]
    failed = cli(settings, "logs", big, "--follow")  # an ended run: printed at once, exit as submit --wait
    assert failed.returncode == 1 and "small first" in failed.stdout

    # past the run's limit, more is refused and nothing stored is lost
    result = status["tasks"]["Flood"]["result"]
    stored = result["stored"]
    assert 0 < stored < 100
    assert "output is full" in result["refused"] and "output_max_bytes (5000)" in result["refused"]
    chunks = [r for r in client.stream(flood) if r["kind"] == "chunk"]
    assert [c["data"][:5] for c in chunks] == [f"{i:05d}" for i in range(stored)]
    assert all(len(c["data"]) == 1000 for c in chunks) and [c["seq"] for c in chunks] == list(range(1, stored + 1))


CAPTURE = """
import logging, sys
from phibroker.runtime.agent import current_output
from phibroker.runtime.output import capture_logs

class Sink:
    def __init__(self):
        self.records = []
    def log(self, record):
        self.records.append((record.levelname, record.getMessage()))

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="printed %(message)s")
capture_logs()
sink = Sink()
current_output.set(sink)
log = logging.getLogger("handler")
log.debug("debug"); log.info("info"); log.warning("warning")
current_output.set(None)
log.info("elsewhere")
print(sink.records)
"""


def test_a_process_logging_at_warning_still_gives_a_task_its_info_records() -> None:
    done = subprocess.run([sys.executable, "-c", CAPTURE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["printed warning", "[('INFO', 'info'), ('WARNING', 'warning')]"]


def test_without_a_worker_chunks_are_kept_and_checked() -> None:
    from phibroker.errors import MessageTooLarge
    from phibroker.runtime.agent import Context

    ctx = Context(workflow_id="w", task="T", unit="T#1", attempt=1, agent="a", command="c")
    ctx.stream("hello")
    ctx.stream({"n": 1})
    with pytest.raises(MessageTooLarge, match="^a chunk streamed by T#1 is 70005 bytes, over the 65536-byte limit$"):
        ctx.stream(b"x" * 70_000)
    assert ctx.streamed == ["hello", {"n": 1}]


def test_a_runs_output_merges_its_agents_streams_in_order_across_pages(settings: Settings, client: Client) -> None:
    """Each agent of a run streams into its own output stream of it; a reader merges them with the run's
    events in one order, page after page, and starts on an agent's stream at the event that dispatched
    to it. Written here as a coordinator and two agents would, in more entries than a page holds."""
    wf_id = client.submit(flow("merge", {"Talk": {"command": "speak", "payload": {"words": ["a"]}}}))
    keys, redis = settings.keys, client.broker.redis
    streams = {"": keys.wf_output(wf_id), "alpha": keys.wf_agent_output(wf_id, "alpha")}
    streams["beta"] = keys.wf_agent_output(wf_id, "beta")
    written: list[tuple[tuple[int, int], str, Any]] = []

    def event(type_: str, **data: Any) -> None:
        blob = wire.encode_events([make_event(type_, wf_id, "Talk", data)])
        written.append((order(redis.xadd(streams[""], {"k": "event", "m": blob}).decode()), "", type_))

    def chunk(agent: str, n: int) -> None:
        blob = output_record("Talk", None, 1, n, f"{agent}-{n}", 0.0)
        written.append((order(redis.xadd(streams[agent], {"k": "chunk", "m": blob}).decode()), agent, n))

    event("task.dispatched", unit="Talk", agent="alpha")
    for n in range(1, 2501):
        chunk("alpha", n)
        if n == 1200:
            event("task.dispatched", unit="Talk", agent="beta")
        if n > 1200:
            chunk("beta", n)
        if n % 700 == 0:
            event("task.progress", n=n)
    chunk("beta", 2501)
    stray = output_record("Talk", None, 1, 1, "gamma-1", 0.0)  # nothing was dispatched to gamma: never read
    redis.xadd(keys.wf_agent_output(wf_id, "gamma"), {"k": "chunk", "m": stray})

    shown = list(client.stream(wf_id))
    # by millisecond, the run's events first (a dispatch before its output), then by agent and sequence
    expected = sorted(written, key=lambda w: (w[0][0], w[1] != "", w[1], w[0][1]))
    got = [
        (order(r["id"]), r["data"]["type"] if r["kind"] == "event" else str(r["data"]).partition("-")[0]) for r in shown
    ]
    assert got == [(at, kind if source == "" else source) for at, source, kind in expected]
    assert [r["seq"] for r in shown if r["kind"] == "chunk" and r["data"].startswith("beta")] == list(range(1201, 2502))


def test_a_reader_resumes_past_any_record_it_was_given_even_where_streams_share_ids(
    settings: Settings, client: Client
) -> None:
    """Entry ids repeat across a run's streams (each counts its own within a millisecond). A record's
    token names its place in the merged order, so a reader started past any token gets exactly the
    records that followed it: what the page's event stream sends as ids, for a browser that reconnects."""
    wf_id = client.submit(flow("ties", {"Talk": {"command": "speak", "payload": {"words": ["a"]}}}))
    keys, redis = settings.keys, client.broker.redis
    out, alpha, beta = (keys.wf_output(wf_id), *(keys.wf_agent_output(wf_id, a) for a in ("alpha", "beta")))

    def events(entry_id: str, *types: str, **data: Any) -> None:
        blob = wire.encode_events([make_event(t, wf_id, "Talk", {"unit": "Talk", **data}) for t in types])
        redis.xadd(out, {"k": "event", "m": blob}, id=entry_id)

    def chunk(stream: str, entry_id: str, text: str) -> None:
        redis.xadd(stream, {"k": "chunk", "m": output_record("Talk", None, 1, 1, text, 0.0)}, id=entry_id)

    events("1000-0", "task.dispatched", "task.waiting", agent="alpha")
    events("1000-1", "task.dispatched", agent="beta")
    chunk(alpha, "1000-0", "alpha 1000-0")
    chunk(beta, "1000-0", "beta 1000-0")
    chunk(alpha, "1000-1", "alpha 1000-1")
    events("1001-0", "task.succeeded", "workflow.succeeded")
    chunk(beta, "1001-0", "beta 1001-0")
    chunk(alpha, "1002-0", "alpha 1002-0")

    reader = client.output_reader(wf_id)
    whole = [(token, _said(record)) for token, record in client.read_on(reader)]
    assert [said for _, said in whole] == [
        "task.dispatched",
        "task.waiting",
        "task.dispatched",
        "alpha 1000-0",
        "alpha 1000-1",
        "beta 1000-0",
        "task.succeeded",
        "workflow.succeeded",
        "beta 1001-0",
        "alpha 1002-0",
    ]
    for n, (token, _) in enumerate(whole):
        resumed = [(t, _said(r)) for t, r in client.read_on(client.output_reader(wf_id, after=token))]
        assert resumed == whole[n + 1 :], token
    assert [_said(r) for r in client.stream(wf_id, after="1001-0")] == ["alpha 1002-0"]  # an entry id: past it in each


def test_a_reader_shows_of_an_agents_stream_only_what_the_runs_events_back(settings: Settings, client: Client) -> None:
    """An agent's user may write anything into its own output stream of a run. Readers show from it the
    chunks and log records of units dispatched to that agent, dated from the dispatch on, and its own
    workers' task starts; a start it made up with the id of a real event never hides that event; and
    an entry it dated ahead is not shown before its time and keeps no reader reading."""
    wf_id = client.submit(flow("forged", {"Talk": {"command": "speak", "payload": {"words": ["a"]}}}))
    keys, redis = settings.keys, client.broker.redis
    out, alpha = keys.wf_output(wf_id), keys.wf_agent_output(wf_id, "alpha")
    dispatched = make_event("task.dispatched", wf_id, "Talk", {"unit": "Talk", "agent": "alpha", "attempt": 1})
    failed = make_event("task.failed", wf_id, "Talk", {"unit": "Talk", "attempt": 1, "error": "boom"})
    ended = make_event("workflow.failed", wf_id, None, {})
    redis.xadd(out, {"k": "event", "m": wire.encode_events([dispatched])}, id="1000-0")

    def start(event_id: str, worker: str, unit: str = "Talk") -> dict[str, Any]:
        started = make_event("task.started", wf_id, unit, {"unit": unit, "attempt": 1, "worker": worker})
        return {**started, "id": event_id}

    own_start = start(wire.new_id(), "alpha@host:1:a")
    forged = [start(failed["id"], "alpha@host:1:a"), start(ended["id"], "alpha@host:1:a")]  # real events' ids
    forged += [start(wire.new_id(), "beta@host:1:b"), start(wire.new_id(), "alpha@host:1:a", unit="Other")]
    forged += [{**failed, "id": wire.new_id(), "data": {"unit": "Talk", "error": "forged"}}]
    backdated = output_record("Talk", None, 1, 1, "before its dispatch", 0.0)
    redis.xadd(alpha, {"k": "chunk", "m": backdated}, id="999-0")
    redis.xadd(alpha, {"k": "event", "m": wire.encode_events([own_start, *forged])}, id="1001-0")
    for n, (unit, text) in enumerate((("Talk", "its own"), ("Other", "not its unit")), 1):
        redis.xadd(alpha, {"k": "chunk", "m": output_record(unit, None, 1, 1, text, 0.0)}, id=f"1001-{n}")
    under_another_task = {"task": "Other", "unit": "Talk", "attempt": 1, "seq": 2, "data": "posing", "ts": 0.0}
    unhashable = {"task": "Talk", "unit": ["Talk"], "attempt": 1, "seq": 3, "data": "a list", "ts": 0.0}
    for n, record in enumerate((under_another_task, unhashable), 3):
        redis.xadd(alpha, {"k": "chunk", "m": wire.pack(record)}, id=f"1001-{n}")
    copy = start(own_start["id"], "alpha@host:1:a")  # the coordinators publish the start again
    relayed = {**make_event("note.x", wf_id, None, {}), "id": ended["id"]}  # an id an agent chose, relayed
    redis.xadd(out, {"k": "event", "m": wire.encode_events([copy, failed, relayed])}, id="1002-0")
    redis.xadd(out, {"k": "event", "m": wire.encode_events([ended])}, id="1003-0")
    future = f"{int(time.time() * 1000) + 600_000}-0"
    redis.xadd(alpha, {"k": "chunk", "m": output_record("Talk", None, 1, 2, "from the future", 0.0)}, id=future)

    reader = client.output_reader(wf_id)
    shown = [_said(record) for _, record in client.read_on(reader)]
    assert shown == ["task.dispatched", "task.started", "its own", "task.failed", "note.x", "workflow.failed"]
    assert reader.read() == [] and not reader.more  # the entry from the future waits for nobody


def test_a_follower_waits_on_the_streams_though_an_agent_dated_entries_ahead(
    settings: Settings, client: Client
) -> None:
    """Entries an agent dated ahead of the clock are never shown, and never wake a follower: it waits
    on the streams, it does not spin, while the run goes on."""
    wf_id = client.submit(flow("ahead", {"Talk": {"command": "speak", "payload": {"words": ["a"]}}}))
    keys, redis = settings.keys, client.broker.redis
    dispatched = make_event("task.dispatched", wf_id, "Talk", {"unit": "Talk", "agent": "alpha", "attempt": 1})
    redis.xadd(keys.wf_output(wf_id), {"k": "event", "m": wire.encode_events([dispatched])})
    ahead = int(time.time() * 1000) + 3_600_000
    pipe = redis.pipeline(transaction=False)
    for n in range(1, 1201):  # more than a page
        record = output_record("Talk", None, 1, n, "ahead", 0.0)
        pipe.xadd(keys.wf_agent_output(wf_id, "alpha"), {"k": "chunk", "m": record}, id=f"{ahead}-{n}")
    pipe.execute()
    before = redis.info("commandstats").get("cmdstat_xread", {}).get("calls", 0)
    shown: list[str] = []
    follower = threading.Thread(target=lambda: shown.extend(_said(r) for r in client.stream(wf_id, follow=True)))
    follower.start()
    time.sleep(1.5)  # while the run goes on, the follower waits (up to 1 s at a time) between passes
    redis.hset(keys.wf(wf_id), "state", "succeeded")
    follower.join()
    reads = redis.info("commandstats")["cmdstat_xread"]["calls"] - before
    assert shown == ["task.dispatched"]
    assert reads < 50, reads  # waits and passes, each a few reads: a follower that spins makes thousands


def _said(record: dict[str, Any]) -> str:
    return record["data"]["type"] if record["kind"] == "event" else str(record["data"])


def test_a_readers_pass_reads_what_was_there_as_it_began(settings: Settings, client: Client) -> None:
    """A reader's pass ends at what the streams held as it began: an agent that writes into its own
    output faster than readers read cannot keep `logs --follow` of a run that ended reading on."""
    wf_id = client.submit(flow("flooded", {"Talk": {"command": "speak", "payload": {"words": ["a"]}}}))
    keys, redis = settings.keys, client.broker.redis
    dispatched = make_event("task.dispatched", wf_id, "Talk", {"unit": "Talk", "agent": "alpha", "attempt": 1})
    redis.xadd(keys.wf_output(wf_id), {"k": "event", "m": wire.encode_events([dispatched])})
    chunk = {"k": "chunk", "m": output_record("Talk", None, 1, 1, "flood", 0.0)}

    def flood(count: int) -> None:
        pipe = redis.pipeline(transaction=False)
        for _ in range(count):
            pipe.xadd(keys.wf_agent_output(wf_id, "alpha"), chunk)
        pipe.execute()

    flood(3000)
    reader = client.output_reader(wf_id)
    first = reader.read()
    assert reader.more  # a page is not all of it
    time.sleep(0.01)  # the server's clock moves on: what comes now comes after the pass began
    flood(3000)
    rest = list(client.read_on(reader))
    assert len(first) + len(rest) == 3001
    assert len(list(client.read_on(reader))) == 3000  # the next pass
    redis.hset(keys.wf(wf_id), "state", "succeeded")
    assert len(list(client.stream(wf_id, follow=True))) == 6001  # ended: one pass, and it stops
