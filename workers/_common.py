"""What the reference agents share: where their files go, names safe for paths, results kept small."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phibroker.runtime.agent import Context

WORKSPACE_ENV = "PHIBROKER_WORKSPACE"
MAX_ITEMS = 50  # results travel through Redis: every list in them is capped
SEVERITY_RANK = {"none": 0, "low": 1, "medium": 2, "high": 3}
SKIP_DIRS = frozenset(
    {".git", ".hg", ".venv", "venv", "env", "__pycache__", "node_modules", ".tox", ".nox", ".eggs"}
    | {".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
)  # VCS data, virtualenvs and tool caches: never the project's own files


def workspace_root(workspace: str | None = None) -> Path:
    """The payload's `workspace`, else $PHIBROKER_WORKSPACE, else `workspace` in the phibroker home."""
    home = os.environ.get("PHIBROKER_HOME") or "~/.phibroker"
    chosen = workspace or os.environ.get(WORKSPACE_ENV) or str(Path(home) / "workspace")
    return Path(chosen).expanduser().resolve()


def workflow_dir(ctx: Context, workspace: str | None = None) -> Path:
    """`<workspace>/<workflow id>/`: one folder per workflow, so runs never share files."""
    return workspace_root(workspace) / safe_name(ctx.workflow_id)


def safe_name(text: str) -> str:
    """A single path component: ids come from users and must not climb out of the workspace."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned or "_"


def slugify(text: str, max_len: int = 40) -> str:
    """`OAuth2 best practices` -> `oauth2-best-practices`: readable folder and file names."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "item"


def short_hash(chunks: Iterable[bytes], length: int = 8) -> str:
    """A content hash prefix: the same content always gets the same release id."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(hashlib.sha256(chunk).digest())
    return digest.hexdigest()[:length]


def input_results(ctx: Context) -> list[dict[str, Any]]:
    """The dict results of the direct dependencies; a mapped task's list of partition results is flattened."""
    found: list[dict[str, Any]] = []
    for value in ctx.inputs.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                found.append(item)
    return found


def inputs_with(ctx: Context, key: str) -> list[dict[str, Any]]:
    """Input results that carry `key` (e.g. `sources`, `workspace`), in dependency order."""
    return [result for result in input_results(ctx) if result.get(key)]


def walk_files(root: Path, suffixes: tuple[str, ...], limit: int = 5000) -> list[Path]:
    """Files under root (or root itself) with these suffixes (any file if none), skipping VCS and virtualenv
    folders and tool caches; at most `limit` of them."""
    if root.is_file():
        return [root] if not suffixes or root.name.endswith(suffixes) else []
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            if not suffixes or name.endswith(suffixes):
                found.append(Path(folder) / name)
                if len(found) >= limit:
                    return found
    return found


def severity_counts(findings: Iterable[dict[str, Any]]) -> dict[str, int]:
    """`{"high": n, "medium": n, "low": n}` (always those three keys, worst first), plus any other severity seen."""
    counts = Counter(str(f.get("severity", "low")) for f in findings)
    ranked = sorted(SEVERITY_RANK, key=lambda s: -SEVERITY_RANK[s])
    known = {level: counts.pop(level, 0) for level in ranked if level != "none"}
    return {**known, **dict(sorted(counts.items()))}


def worst_severity(counts: dict[str, int]) -> str:
    """The highest severity with a non-zero count, else `none`."""
    present = [level for level, count in counts.items() if count]
    return max(present, key=lambda level: SEVERITY_RANK.get(level, 0), default="none")
