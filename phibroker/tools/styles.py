"""How states look on a terminal: one colour per workflow or task state, shared by every view.

Rich style strings; a plain dict so a command that only prints text imports nothing heavy for it."""

from __future__ import annotations

STATE_STYLES: dict[str, str] = {
    "succeeded": "green",
    "failed": "bold red",
    "timed_out": "red",
    "cancelled": "red",
    "running": "yellow",
    "retrying": "magenta",
    "compensating": "magenta",
    "waiting_approval": "cyan",
    "ready": "cyan",
    "compensated": "blue",
    "skipped": "dim",
    "pending": "dim",
}
