"""Loading and checking big workflow files, in-process: `phibroker.workflow.load(path)`, timed whole.

`load` is what `validate`, `submit` and every coordinator run on a file, so a 100,000-task file must
pass every check (schema, names, dependencies, cycle, references) in under a second.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from phibroker import workflow as workflows

DEPS = 3  # dependencies per task, each on an earlier task


def generate(n: int, seed: int = 7) -> dict[str, Any]:
    """`n` tasks, each (but the first few) depending on ~3 random earlier ones: a wide, deep DAG."""
    rand = random.Random(seed)
    names = [f"task-{i:06d}" for i in range(n)]
    tasks: dict[str, Any] = {}
    for i, name in enumerate(names):
        task: dict[str, Any] = {"agent": "probe", "command": "noop"}
        if i:
            task["depends_on"] = sorted({names[rand.randrange(i)] for _ in range(min(DEPS, i))})
        tasks[name] = task
    return {"name": f"generated-{n}", "description": "a generated benchmark workflow", "tasks": tasks}


class Files:
    """The generated files, written once per benchmark run into a directory removed at the end."""

    def __init__(self, json_tasks: int, yaml_tasks: int):
        self._dir = tempfile.TemporaryDirectory(prefix="phibroker-bench-files-")
        root = Path(self._dir.name)
        self.json = root / f"generated-{json_tasks}.json"
        self.json.write_text(json.dumps(generate(json_tasks)))
        self.yaml = root / f"generated-{yaml_tasks}.yaml"
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        self.yaml.write_text(yaml.dump(generate(yaml_tasks), Dumper=dumper, sort_keys=False))

    def close(self) -> None:
        self._dir.cleanup()


def load_seconds(path: Path) -> float:
    """Read, decode and check the whole file; fails loudly if the generated file were ever rejected."""
    started = time.perf_counter()
    workflow = workflows.load(path)
    took = time.perf_counter() - started
    assert workflow.tasks, path
    return took
