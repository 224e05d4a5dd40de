"""What every benchmark stands on: a private redis-server (and Redis Cluster), subprocesses, RSS, and
median (min–max) figures.

The Redis is our own (free ports, no persistence) so no other process's load lands in our figures, and it
is stopped at the end whatever happens.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from phibroker import testing

REPO = Path(__file__).resolve().parent.parent


class RedisServer(testing.RedisServer):
    """The benchmark's private server: missing redis-server ends the run with a clear line."""

    def start(self, timeout: float = 10.0) -> None:
        try:
            super().start(timeout)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None

    def stop(self, kill: bool = False) -> None:
        super().stop(kill)
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisCluster(testing.RedisCluster):
    """The benchmark's private Redis Cluster (3 masters, 3 replicas): every node stopped and its files
    removed when it stops, or when it could not start."""

    def start(self, timeout: float = 60.0) -> None:
        try:
            super().start(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def wait_for(condition: Any, timeout: float, what: str, every: float = 0.02) -> None:
    """Poll `condition()` until true; raise naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


# -- processes --------------------------------------------------------------------------------------
class Logs:
    """One directory of subprocess logs for the whole run, so a failing workload can show its tail."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="phibroker-bench-logs-"))
        self.count = 0

    def open(self, name: str) -> tuple[Path, IO[bytes]]:
        self.count += 1
        path = self.directory / f"{self.count:03d}-{name}.log"
        return path, open(path, "wb")  # noqa: SIM115 - closed by the caller with its process

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def tail(self, path: Path, lines: int = 15) -> str:
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    | {line}" for line in text)


def spawn(
    args: Sequence[str], logs: Logs, name: str, env: dict[str, str] | None = None, pipe_stdout: bool = False
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `python ARGS...` from the repository root; stderr (and stdout unless piped) go to a log."""
    path, log = logs.open(name)
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": _python_path(), **(env or {})},
        stdout=subprocess.PIPE if pipe_stdout else log,
        stderr=log,
    )
    log.close()
    return process, path


def _python_path() -> str:
    """The repository first (for `tests.apps.probe` and `benchmarks`), then whatever the caller had."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def stop(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def rss_mib(pid: int) -> float:
    """Resident memory from /proc/PID/status (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


# -- statistics -------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was measured, not an interpolation."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Figure:
    """One measured quantity over the runs; printed as median (min–max)."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "unit": self.unit, "values": self.values, "note": self.note}
        if self.values:
            out.update(median=self.median, min=min(self.values), max=max(self.values))
        return out


def fmt(value: float, unit: str) -> str:
    """Numbers the way a reader compares them: tasks/s as integers, ms with two or three digits."""
    if unit in ("ms", "×"):
        return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if unit in ("s",):
        return f"{value:.3f}"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def spread(figure: Figure) -> str:
    if not figure.values:
        return "—"
    text = fmt(figure.median, figure.unit)
    if len(figure.values) > 1:
        text += f" ({fmt(min(figure.values), figure.unit)}–{fmt(max(figure.values), figure.unit)})"
    return text
