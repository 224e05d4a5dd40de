"""The RQ bridge end to end: a real `rq worker`, a real `phibroker rq-bridge` and coordinator, real Redis."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from phibroker.errors import InvalidInput, MessageTooLarge, Retryable
from phibroker.interop.rq import (
    Bridge,
    JobStopped,
    job_error,
    job_id_for,
    on_job_success,
    parse_exc_string,
    parse_map,
)
from phibroker.runtime.agent import Context
from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import REPO, Processes, until

JOBS = "tests.apps.rqjobs"
MAPS = [f"{c}={JOBS}.{f}" for c, f in [("run_tests", "run_tests"), ("add", "add"), ("sum", "total")]]
MAPS += [f"{JOBS}.{f}" for f in ("flaky", "fail", "slow")]


def queue_of(settings: Settings) -> str:
    return f"{settings.namespace}-cmdc"


def rq_worker(procs: Processes, settings: Settings) -> subprocess.Popen[bytes]:
    log = open(procs.logs / f"rq-worker-{len(procs.started)}.log", "wb")  # noqa: SIM115 - closed with the process
    args = [sys.executable, "-m", "rq.cli", "worker", queue_of(settings), "--url", settings.redis_url]
    process = subprocess.Popen(args, env=procs.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    procs.started.append(process)
    return process


def bridge(procs: Processes, settings: Settings) -> subprocess.Popen[bytes]:
    maps = [arg for m in MAPS for arg in ("--map", m)]
    return procs.spawn("rq-bridge", "rq-bridge", "--agent", "cmdc", "--queue", queue_of(settings), *maps)


def start(procs: Processes, settings: Settings) -> subprocess.Popen[bytes]:
    procs.coordinator()
    rq_worker(procs, settings)
    return bridge(procs, settings)


def submit(client: Client, tmp_path: Path, text: str, **params: Any) -> str:
    path = tmp_path / f"flow-{time.monotonic_ns()}.yaml"
    path.write_text(text)
    return client.submit(path, params=params)


def job_of(client: Client, settings: Settings, wf_id: str, unit: str) -> Job:
    """The RQ job of the unit's current dispatch, by the id the bridge derives from the dispatch id."""
    dispatch = client.broker.read_workflow(wf_id)[1][unit]["dispatch"]
    return Job.fetch(job_id_for(settings.namespace, dispatch), connection=redis.Redis.from_url(settings.redis_url))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


FLOW = """
name: rq-flow
tasks:
  A: {agent: cmdc, command: add, payload: {a: 1, b: 2}}
  B: {agent: cmdc, command: add, depends_on: [A], payload: {a: "${tasks.A.result.sum}", b: 10}}
  C: {agent: cmdc, command: flaky, payload: {failures: 1}, retry: {max_attempts: 3, base_delay: 100ms}}
  D: {agent: cmdc, command: sum, map: {over: [1, 2, 3, 4, 5, 6], partitions: 2}}
"""


def test_cmdc_steps_run_as_rq_jobs(procs: Processes, client: Client, settings: Settings, tmp_path: Path) -> None:
    start(procs, settings)
    example = client.submit(REPO / "examples" / "rq-bridge.yaml")
    wf_id = submit(client, tmp_path, FLOW)
    status = client.wait(wf_id, timeout=120)
    assert status["state"] == "succeeded", procs.output()
    tasks = status["tasks"]
    assert tasks["A"]["result"]["sum"] == 3 and tasks["B"]["result"]["sum"] == 13
    assert [part["sum"] for part in tasks["D"]["result"]] == [6, 15]

    # the job id comes from the dispatch id; the phibroker ids ride in job.meta
    job = job_of(client, settings, wf_id, "B")
    assert tasks["B"]["result"]["rq"]["job"] == job.id
    meta = job.meta["phibroker"]
    assert (meta["workflow"], meta["unit"], meta["attempt"], meta["command"]) == (wf_id, "B", 1, "add")
    assert meta["token"] >= 1 and meta["inputs"] == {"A": tasks["A"]["result"]}
    assert job.kwargs == {"a": 3, "b": 10}

    # Retryable raised inside the job retries the phibroker task; each attempt is its own job
    assert tasks["C"]["attempts"] == 2 and tasks["C"]["result"]["attempt"] == 2
    assert tasks["C"]["history"][0]["error"] == "Retryable: attempt 1 fails on purpose"
    first, second = (h["applied"] for h in tasks["C"]["history"])
    assert first and second
    conn = redis.Redis.from_url(settings.redis_url)
    failed = FailedJobRegistry(queue_of(settings), connection=conn).get_job_ids()
    assert len(failed) == 1 and job_of(client, settings, wf_id, "C").id not in failed

    done = client.wait(example, timeout=120)
    assert done["state"] == "succeeded", procs.output()
    smoke = done["tasks"]["SmokeTest"]["result"]
    assert smoke["passed"] and smoke["output_tail"] == "smoke test of inventory-service passed"
    assert smoke["rq"]["job"] == job_of(client, settings, example, "SmokeTest").id


def test_a_failing_job_is_retried_by_phibroker_then_fails_with_rq_error_text(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    start(procs, settings)
    wf_id = submit(
        client,
        tmp_path,
        "name: rq-fails\ntasks:\n  A:\n    agent: cmdc\n    command: fail\n    payload: {message: disk full}\n"
        "    retry: {max_attempts: 3, base_delay: 100ms, max_delay: 100ms, retry_on: ['valueerror: disk']}\n",
    )
    status = client.wait(wf_id, timeout=120)
    assert status["state"] == "failed", procs.output()
    task = status["tasks"]["A"]
    assert task["attempts"] == 3 and task["error"] == "ValueError: disk full"
    assert [h["error"] for h in task["history"]] == ["ValueError: disk full"] * 3
    assert "rqjobs.py" in task["history"][0]["traceback"]  # RQ's traceback of the job, kept in the history
    assert "RQ job phi-" in task["history"][0]["traceback"]
    conn = redis.Redis.from_url(settings.redis_url)
    failed = FailedJobRegistry(queue_of(settings), connection=conn).get_job_ids()
    assert len(failed) == 3  # one job per phibroker attempt: RQ retried nothing
    for job_id in failed:
        job = Job.fetch(job_id, connection=conn)
        assert job.retries_left is None and job.meta["phibroker"]["error"]["type"] == "ValueError"
    assert sorted(Job.fetch(j, connection=conn).meta["phibroker"]["attempt"] for j in failed) == [1, 2, 3]


def test_a_bridge_killed_mid_job_loses_nothing_and_the_job_runs_once(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    ledger, marker = tmp_path / "ledger", tmp_path / "started"
    first = start(procs, settings)
    wf_id = submit(
        client,
        tmp_path,
        "name: rq-kill\nparams: {ledger: '', marker: ''}\ntasks:\n"
        "  A: {agent: cmdc, command: slow, retry: {max_attempts: 1},\n"
        "      payload: {seconds: 4, ledger: '${params.ledger}', marker: '${params.marker}'}}\n"
        "  B: {agent: cmdc, command: add, depends_on: [A], payload: {a: 1, b: 1}}\n",
        ledger=str(ledger),
        marker=str(marker),
    )
    until(lambda: lines(marker), procs)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    bridge(procs, settings)
    status = client.wait(wf_id, timeout=40)
    assert status["state"] == "succeeded", procs.output()
    task = status["tasks"]["A"]
    assert task["attempts"] == 2  # the reclaim is a run of its own (of the same dispatch, not a retry)
    lost, ran = task["history"]
    assert lost["applied"] is False and lost["error"].startswith("lost: worker cmdc@")
    assert ran["applied"] is True
    assert len(lines(marker)) == 1 and len(lines(ledger)) == 1  # the job ran once
    job = job_of(client, settings, wf_id, "A")
    assert task["result"]["rq"]["job"] == job.id and lines(ledger) == [f"{wf_id}:A {job.id}"]
    conn = redis.Redis.from_url(settings.redis_url)
    finished = FinishedJobRegistry(queue_of(settings), connection=conn).get_job_ids()
    assert len(finished) == 2  # A once, B once
    assert "found RQ job " + job.id in procs.output()


def test_cancelling_the_workflow_stops_the_running_job(
    procs: Processes, client: Client, settings: Settings, tmp_path: Path
) -> None:
    ledger, marker = tmp_path / "ledger", tmp_path / "started"
    start(procs, settings)
    wf_id = submit(
        client,
        tmp_path,
        "name: rq-cancel\nparams: {ledger: '', marker: ''}\ntasks:\n"
        "  A: {agent: cmdc, command: slow,\n"
        "      payload: {seconds: 5, ledger: '${params.ledger}', marker: '${params.marker}'}}\n",
        ledger=str(ledger),
        marker=str(marker),
    )
    deadline = time.monotonic() + 20
    while not lines(marker):
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    job = job_of(client, settings, wf_id, "A")
    client.cancel(wf_id)
    assert client.wait(wf_id, timeout=20)["state"] == "cancelled", procs.output()
    while job.get_status(refresh=True) != JobStatus.STOPPED:
        assert time.monotonic() < deadline, procs.output()
        time.sleep(0.05)
    assert "asked RQ to stop job " + job.id in procs.output()
    assert not lines(ledger)  # stopped before its effect


def in_process_bridge(settings: Settings) -> tuple[Bridge, Context]:
    """A bridge object without its loop (and no RQ worker): for the paths a live worker rarely takes."""
    bridge = Bridge("cmdc", queue_of(settings), {"add": f"{JOBS}.add"}, settings)
    ctx = Context(workflow_id="wf", task="A", unit="A", attempt=1, agent="cmdc", command="add", token=1)
    return bridge, ctx


def test_a_job_whose_rq_worker_died_fails_the_attempt_as_abandoned_and_retryable(settings: Settings) -> None:
    bridge, ctx = in_process_bridge(settings)
    job = bridge.submit(job_id_for(settings.namespace, "d1"), f"{JOBS}.add", ctx, "d1", {"a": 1, "b": 2})
    # what an RQ worker leaves when it dies running the job: STARTED, its heartbeat in the past
    conn = bridge.connection
    conn.lrem(bridge.queue.key, 0, job.id)
    job.set_status(JobStatus.STARTED)
    conn.zadd(StartedJobRegistry(queue_of(settings), connection=conn).key, {f"{job.id}:x1": time.time() - 1})
    began = time.monotonic()
    with pytest.raises(Retryable) as caught:
        bridge.wait(job, ctx)
    assert time.monotonic() - began < 5
    assert type(caught.value).__name__ == "AbandonedJobError"
    assert job.id in FailedJobRegistry(queue_of(settings), connection=conn).get_job_ids()
    assert job.get_meta(refresh=True)["phibroker"]["error"]["retryable"] is True
    # the same job id is found again, not enqueued twice
    assert bridge.submit(job.id, f"{JOBS}.add", ctx, "d1", {"a": 1, "b": 2}).id == job.id
    assert bridge.queue.count == 0


def test_a_cancelled_attempt_cancels_its_queued_job(settings: Settings) -> None:
    bridge, ctx = in_process_bridge(settings)
    job = bridge.submit(job_id_for(settings.namespace, "d2"), f"{JOBS}.add", ctx, "d2", {"a": 1, "b": 2})
    assert bridge.queue.count == 1
    ctx.cancelled.set()
    with pytest.raises(JobStopped):
        bridge.wait(job, ctx)
    assert job.get_status(refresh=True) == JobStatus.CANCELED and bridge.queue.count == 0


def test_the_success_callback_refuses_a_result_phibroker_cannot_carry() -> None:
    job: Any = SimpleNamespace(id="phi-x", meta={"phibroker": {"limit": 100}})
    on_job_success(job, None, {"ok": 1})
    with pytest.raises(MessageTooLarge):
        on_job_success(job, None, "x" * 200)
    with pytest.raises(TypeError):
        on_job_success(job, None, object())


# -- pure parts -------------------------------------------------------------------------------------


def test_job_ids_are_derived_from_the_dispatch_and_valid_for_rq() -> None:
    from rq.job import validate_job_id

    job_id = job_id_for("my.ns", "0123abcd0123abcd")
    assert job_id == job_id_for("my.ns", "0123abcd0123abcd") != job_id_for("my_ns2", "0123abcd0123abcd")
    validate_job_id(job_id)


def test_rq_error_text_is_parsed_into_type_and_message() -> None:
    text = (
        "Traceback (most recent call last):\n"
        '  File "/x/rq/job.py", line 1, in perform\n'
        "    return self.func()\n"
        "tests.apps.rqjobs.CommandFailed: make exited with code 2\nlast line of output\n"
    )
    assert parse_exc_string(text) == ("CommandFailed", "make exited with code 2\nlast line of output")
    assert parse_exc_string("Traceback (most recent call last):\n  File 'a'\nKeyError\n") == ("KeyError", "")
    abandoned = "Moved to FailedJobRegistry, due to AbandonedJobError, at 2025-01-01 00:00:00"
    assert parse_exc_string(abandoned) == ("AbandonedJobError", abandoned)
    assert parse_exc_string("")[0] == "RQJobError"


def test_job_errors_keep_the_type_name_and_retryable() -> None:
    from phibroker.engine.records import describe_exception

    error = job_error("ValueError", "boom", False, "Traceback ...\nValueError: boom", "phi-x")
    described = describe_exception(error)
    assert f"{described['type']}: {described['message']}" == "ValueError: boom"
    assert "RQ job phi-x" in described["traceback"] and not isinstance(error, Retryable)
    assert isinstance(job_error("AbandonedJobError", "died", True, "", "phi-x"), Retryable)


def test_map_pairs() -> None:
    assert parse_map(["build=app.jobs.build", "app.jobs.test"]) == {"build": "app.jobs.build", "test": "app.jobs.test"}
    for bad in (["build=notdotted"], ["bad name=a.b"], ["x=a.b", "x=a.c"], []):
        with pytest.raises(InvalidInput):
            parse_map(bad)


def test_without_rq_installed_the_bridge_says_which_extra_to_install() -> None:
    """RQ is an optional extra: a bridge started without it is one line and exit 2, not a traceback."""
    script = (
        "import sys; sys.modules['rq'] = None\n"  # what a missing package looks like to an import
        "from phibroker.cli import main\n"
        "main(['rq-bridge', '--agent', 'cmdc', '--queue', 'q'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "pip install 'phibroker[rq]'" in done.stderr
