"""cmdc: run commands (without a shell), read and analyse logs, queue CI builds, and deploy releases by an atomic
symlink switch."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from phibroker.runtime.agent import Agent, Context
from workers._common import inputs_with, safe_name, short_hash, workspace_root

agent = Agent("cmdc")

TAIL_LINES = 40
TAIL_BYTES = 64 * 1024
POLL_SECONDS = 0.1
TOP_ERRORS = 20


# -- run_tests --------------------------------------------------------------------------------------


class CommandFailed(Exception):  # noqa: N818 - the error a workflow shows
    """The command exited non-zero; the message carries the exit code and the output's tail."""


def command_args(command: Any, suite: str | None) -> list[str]:
    """The args to run: the payload's list (or a string split like a shell would, but run without one)."""
    if isinstance(command, str):
        return shlex.split(command)
    if isinstance(command, list) and command:
        return [str(arg) for arg in command]
    label = f"suite {suite!r}" if suite else "run_tests"
    script = f"print({label!r} + ': no command given, nothing was run')"
    return [sys.executable, "-c", script]


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the command and its children (its own session), then kill what does not listen."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(output: IO[bytes], lines: int = TAIL_LINES) -> str:
    """The last lines of the captured output, reading only its end however much the command printed."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - TAIL_BYTES))
    return "\n".join(output.read().decode("utf-8", errors="replace").splitlines()[-lines:])


def supervise(ctx: Context, process: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Wait for the process; stop it and say why on cancellation or timeout."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if ctx.cancelled:
            stop(process)
            return "cancelled"
        if time.monotonic() >= deadline:
            stop(process)
            return f"timed out after {timeout:g}s"
        ctx.cancelled.wait(POLL_SECONDS)
    return None


@agent.command("run_tests")
def run_tests(
    ctx: Context,
    command: Any = None,
    suite: str | None = None,
    timeout: float = 60,
    cwd: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Run the command with a timeout; cancellation stops it; a non-zero exit fails the task."""
    args = command_args(command, suite)
    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            args, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        stopped = supervise(ctx, process, float(timeout))
        text = tail(output)
    duration = round(time.monotonic() - started, 3)
    if stopped == "cancelled":
        raise InterruptedError(f"{shlex.join(args)} was cancelled after {duration}s")
    if stopped:
        raise TimeoutError(f"{shlex.join(args)} {stopped}\n{text}")
    code = process.returncode
    if code != 0:
        raise CommandFailed(f"{shlex.join(args)} exited with code {code}\n{text}")
    return {"exit_code": code, "duration": duration, "output_tail": text, "passed": True}


# -- logs -------------------------------------------------------------------------------------------

LOG_START = datetime(2025, 3, 14, 9, 0, 0, tzinfo=UTC).timestamp()
LOG_SERVICES = ("api", "auth", "billing", "worker")
LOG_INFO = (
    "GET /orders/{n} 200 in {ms} ms",
    "POST /checkout 201 in {ms} ms",
    "user {n} signed in",
    "job sync-{n} done in {ms} ms",
)
LOG_WARN = ("slow query took {ms} ms", "retrying inventory call ({k}/3)", "disk {p}% full on /var")
LOG_ERROR = (
    "payment gateway timed out after {ms} ms",
    "db pool exhausted ({k} waiting)",
    "order {n} rejected: card declined",
    "TLS handshake failed for 10.0.{k}.{p}",
    "cache node {k} unreachable",
)


def synthetic_log(lines: int, seed: int) -> list[str]:
    """A deterministic application log: one line a second or so, about 85% INFO, 10% WARN, 5% ERROR,
    a handful of recurring messages whose numbers vary (lines stay near 60 bytes, results small)."""
    rng = random.Random(seed)
    stamp = LOG_START
    out = []
    for _ in range(lines):
        stamp += rng.uniform(0.05, 2.0)
        roll = rng.random()
        level, templates = (
            ("ERROR", LOG_ERROR) if roll < 0.05 else ("WARN", LOG_WARN) if roll < 0.15 else ("INFO", LOG_INFO)
        )
        numbers = {
            "n": rng.randint(1000, 99999),
            "ms": rng.randint(5, 9000),
            "k": rng.randint(1, 9),
            "p": rng.randint(1, 99),
        }
        when = datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        message = rng.choice(templates).format(**numbers)
        out.append(f"{when} {rng.choice(LOG_SERVICES):<7} {level:<5} {message}")
    return out


@agent.command("read_logs")
def read_logs(ctx: Context, path: str | None = None, lines: int = 10000, seed: int = 7, **_: Any) -> dict[str, Any]:
    """The first `lines` lines of the log file at `path` (on the worker's machine), else a synthetic
    application log of `lines` lines made from `seed` (the same seed, the same log)."""
    count = int(lines)
    if count < 0:
        raise ValueError(f"lines must be 0 or more, got {lines!r}")
    if path:
        found: list[str] = []
        with Path(path).expanduser().open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if len(found) >= count:
                    break
                found.append(line.rstrip("\r\n"))
        return {"lines": found, "count": len(found), "source": str(Path(path).expanduser().resolve())}
    found = synthetic_log(count, int(seed))
    return {"lines": found, "count": len(found), "source": f"synthetic (seed {int(seed)})"}


LEVEL = re.compile(r"\b(error|warn|warning)\b[\s:\]\-|]*(.*)", re.IGNORECASE)


def classify(line: str) -> tuple[str, str] | None:
    """("error"|"warning", normalised message) for a line with a level word, else None."""
    match = LEVEL.search(line)
    if not match:
        return None
    level = "error" if match.group(1).lower() == "error" else "warning"
    return level, re.sub(r"\d+", "N", match.group(2).strip()) or "(no message)"


def log_lines(items: list[Any] | None) -> list[str]:
    """The partition's items as lines; an item may hold several lines."""
    return [line for item in items or [] for line in str(item).splitlines()]


@agent.command("analyze_logs")
def analyze_logs(ctx: Context, items: list[Any] | None = None, **_: Any) -> dict[str, Any]:
    """Count error and warning lines and group errors by message (digits -> N): one scatter partition."""
    counts = {"error": 0, "warning": 0}
    messages: Counter[str] = Counter()
    lines = log_lines(items)
    for line in lines:
        found = classify(line)
        if found:
            counts[found[0]] += 1
            if found[0] == "error":
                messages[found[1]] += 1
    return {
        "lines": len(lines),
        "errors": counts["error"],
        "warnings": counts["warning"],
        "unique_errors": dict(messages.most_common(TOP_ERRORS)),
    }


def merge_log_counts(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The gather step: partition results added up; `unique_errors` stays the top 20 of the merge
    (a message outside every partition's top 20 is missed, the price of small results)."""
    messages: Counter[str] = Counter()
    totals = {"lines": 0, "errors": 0, "warnings": 0}
    for result in results:
        for key in totals:
            totals[key] += int(result.get(key, 0))
        messages.update({str(k): int(v) for k, v in dict(result.get("unique_errors", {})).items()})
    return {**totals, "unique_errors": dict(messages.most_common(TOP_ERRORS))}


@agent.command("merge_logs")
def merge_logs(ctx: Context, **_: Any) -> dict[str, Any]:
    """merge_log_counts over every analyze_logs result among the inputs (a mapped task gives a list)."""
    return merge_log_counts([r for r in inputs_with(ctx, "lines") if "unique_errors" in r])


# -- deploy -----------------------------------------------------------------------------------------


def deploy_dir(environment: str, target: str | None, workspace: str | None) -> Path:
    """The payload's target, else `<workspace>/deploy/<environment>` (shared by workflows, so a deploy
    knows what the previous one put live)."""
    if target:
        return Path(target).expanduser().resolve()
    return workspace_root(workspace) / "deploy" / safe_name(environment)


def live_release(current: Path) -> str | None:
    """The release `current` points at, or None without a `current` link."""
    return Path(os.readlink(current)).name if current.is_symlink() else None


def point(current: Path, release: str | None) -> None:
    """Make `current` point at releases/<release> with one rename (readers never see it missing),
    or remove it when release is None."""
    if release is None:
        current.unlink(missing_ok=True)
        return
    temporary = current.with_name(f".current-{os.getpid()}-{os.urandom(4).hex()}")
    os.symlink(Path("releases") / release, temporary)
    os.replace(temporary, current)


def pick_release(ctx: Context, release: str | None) -> str:
    if release:
        return safe_name(str(release))
    found = inputs_with(ctx, "release")
    if not found:
        raise ValueError("deploy needs a `release` (in the payload or in an input's result)")
    return safe_name(str(found[0]["release"]))


@agent.command("deploy")
def deploy(
    ctx: Context,
    release: str | None = None,
    environment: str = "staging",
    target: str | None = None,
    workspace: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Create releases/<release>/RELEASE and switch `current` to it atomically."""
    release = pick_release(ctx, release)
    base = deploy_dir(environment, target, workspace)
    folder = base / "releases" / release
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (folder / "RELEASE").write_text(f"{release}\ndeployed {stamp} by workflow {ctx.workflow_id}\n", encoding="utf-8")
    current = base / "current"
    previous = live_release(current)
    point(current, release)
    return {
        "release": release,
        "environment": environment,
        "path": str(folder),
        "current": str(current),
        "previous": previous,
    }


@agent.command("rollback")
def rollback(ctx: Context, **_: Any) -> dict[str, Any]:
    """Compensation of deploy: point `current` back at the previous release (or remove it if there was
    none), but only while it still points at the release this deploy put live."""
    result = ctx.result if isinstance(ctx.result, dict) else {}
    if not result.get("current"):
        return {"restored": None, "changed": False}
    current, previous = Path(str(result["current"])), result.get("previous")
    if live_release(current) != result.get("release"):
        return {"restored": previous, "changed": False, "live": live_release(current)}
    point(current, previous)
    return {"restored": previous, "changed": True}


# -- publish_report ---------------------------------------------------------------------------------


def report_source(ctx: Context, path: str | None) -> Path:
    """The payload's `path`, else the `path` of the first input that has one (dc's `report` result)."""
    chosen = path or next((str(r["path"]) for r in inputs_with(ctx, "path")), None)
    if not chosen:
        raise ValueError("publish_report needs a `path` (in the payload or in an input's result)")
    source = Path(chosen).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"report {chosen!r} does not exist or is not a file ({source})")
    return source


@agent.command("publish_report")
def publish_report(
    ctx: Context, path: str | None = None, name: str | None = None, workspace: str | None = None, **_: Any
) -> dict[str, Any]:
    """Copy a finished report to `<workspace>/reports/<workflow>-<name>` (atomically: readers of the folder
    never see half a report; a retry writes the same file) and point `latest-<name>` at it."""
    source = report_source(ctx, path)
    data = source.read_bytes()
    folder = workspace_root(workspace) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    filename = safe_name(name or source.name)
    published = folder / f"{safe_name(ctx.workflow_id)}-{filename}"
    temporary = folder / f".{published.name}.{os.getpid()}-{os.urandom(4).hex()}"
    temporary.write_bytes(data)
    os.replace(temporary, published)
    latest = folder / f"latest-{filename}"
    link = folder / f".{latest.name}.{os.getpid()}-{os.urandom(4).hex()}"
    os.symlink(published.name, link)
    os.replace(link, latest)
    return {
        "published": str(published),
        "latest": str(latest),
        "source": str(source),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


# -- start_ci ---------------------------------------------------------------------------------------


@agent.command("start_ci")
def start_ci(
    ctx: Context,
    release: str | None = None,
    pipeline: str = "ci",
    signal: str = "ci-done",
    workspace: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Queue a CI build of the release and return at once: the build is a request file in
    `<workspace>/ci/queue/` that a CI system (or a person) picks up, and its verdict comes back to the
    run as a signal, the command for which the result spells out (`notify`)."""
    chosen = release or next((str(r["release"]) for r in inputs_with(ctx, "release")), None)
    if not chosen:
        raise ValueError(
            "start_ci needs a `release` (in the payload or in an input's result, such as vssc's implement)"
        )
    release = safe_name(chosen)
    build = f"{safe_name(pipeline)}-{short_hash([ctx.workflow_id.encode(), release.encode()])}"
    verdict = json.dumps({"build": build, "passed": True})
    notify = f"phibroker signal {ctx.workflow_id} {signal} --data '{verdict}'"
    request = {"build": build, "release": release, "workflow": ctx.workflow_id, "signal": signal, "notify": notify}
    queue = workspace_root(workspace) / "ci" / "queue"
    queue.mkdir(parents=True, exist_ok=True)
    temporary = queue / f".{build}.{os.getpid()}-{os.urandom(4).hex()}"
    temporary.write_text(json.dumps(request, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, queue / f"{build}.json")
    return {**request, "status": "queued", "request": str(queue / f"{build}.json")}
