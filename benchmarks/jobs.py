"""The no-op job RQ runs: a module-level function, as RQ imports jobs by dotted name."""

from __future__ import annotations


def noop() -> None:
    return None
