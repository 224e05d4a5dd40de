"""The coordinator's memory of runs and checked workflow files, so a round rarely reads or parses them.

Only a cache: Redis holds every run, and each commit checks the run's version, so a stale entry costs
one retry, never a wrong transition. Runs are kept most recently used first up to `cache_size`; specs
are cached by their text, so a thousand runs of one file are checked once.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any

from phibroker import workflow as workflows
from phibroker.engine import state
from phibroker.runtime.telemetry import workflow_agents
from phibroker.settings import Settings
from phibroker.store.coordinator import CoordinatorStore
from phibroker.workflow.spec import is_name

log = logging.getLogger("phibroker.coordinator")

SPEC_CACHE_SIZE = 256  # checked workflow files kept, by their text


class RunCache:
    """The runs a coordinator has loaded, and the workflow files they were started from."""

    def __init__(self, settings: Settings, broker: CoordinatorStore, cache_size: int = 2000, signed_only: bool = False):
        self.settings = settings
        self.broker = broker
        self.signed_only = signed_only  # `--require-signed`: what runs is what signed files say
        self.runs: OrderedDict[str, state.Run] = OrderedDict()
        self.specs: OrderedDict[str, workflows.Workflow] = OrderedDict()
        self.agents: set[str] = set()  # that the specs read name: whose inbox lanes their results come back on
        self.cache_size = cache_size

    def load(self, wf_ids: list[str]) -> dict[str, state.Run]:
        """Cached runs, and the missing ones loaded in one round trip."""
        missing = [w for w in wf_ids if w not in self.runs]
        if missing:
            self.runs.update(self._read(missing))
        found = {}
        for wf_id in wf_ids:
            if wf_id in self.runs:
                self.runs.move_to_end(wf_id)
                found[wf_id] = self.runs[wf_id]
        while len(self.runs) > self.cache_size:
            self.runs.popitem(last=False)
        return found

    def peek(self, wf_id: str) -> state.Run | None:
        """A run read from Redis and not kept: a look at another run than the one whose inputs are applied
        (kept, it would be taken for one read after inputs of its own came)."""
        return self._read([wf_id]).get(wf_id)

    def _read(self, wf_ids: list[str]) -> dict[str, state.Run]:
        """The runs as Redis holds them now, in one round trip (and one for their workers' marks)."""
        read = {}
        for wf_id, (meta, units, results, lost) in zip(wf_ids, self.broker.load_runs(wf_ids), strict=True):
            if not meta.get("spec"):
                continue
            try:
                read[wf_id] = run = self._run(wf_id, meta, units, results)
                run.lost = lost
            except Exception:  # noqa: BLE001 - one unreadable run must not stop the coordinator
                log.exception("cannot read run %s; its inputs are treated as a missing run's", wf_id)
        return read

    def _run(
        self, wf_id: str, meta: dict[str, Any], units: dict[str, dict[str, Any]], results: dict[bytes, bytes]
    ) -> state.Run:
        return state.Run(
            wf_id,
            self.workflow(meta["spec"]),
            meta,
            units,
            {k.decode(): v for k, v in results.items()},
            limit=self.settings.max_message_bytes,
            max_release=self.settings.max_release,
            cancel_grace=self.settings.cancel_grace,
            max_children=self.settings.max_children,
            signed_only=self.signed_only,
            max_depth=self.settings.max_depth,
        )

    def workflow(self, spec_text: str) -> workflows.Workflow:
        """Checked specs, cached by their text: a thousand runs of one file are checked once."""
        workflow = self.specs.get(spec_text)
        if workflow is None:
            workflow = workflows.check(json.loads(spec_text))
            self.specs[spec_text] = workflow
            self.agents |= {agent for agent in workflow_agents(workflow) if is_name(agent)}
            if len(self.specs) > SPEC_CACHE_SIZE:
                self.specs.popitem(last=False)
        return workflow

    def stale(self, quiet: list[str], runs: dict[str, state.Run]) -> list[str]:
        """Of the runs where nothing happened, those whose cache lags Redis: a no-op must be a real one."""
        if not quiet:
            return []
        current = self.broker.versions(quiet)
        return [wf_id for wf_id, version in zip(quiet, current, strict=True) if version != runs[wf_id].version]

    def forget(self, wf_id: str) -> None:
        """Drop a run that finished, lags Redis, or could not take its inputs: the next use reloads it."""
        self.runs.pop(wf_id, None)

    def clear(self) -> None:
        """Drop every run (Redis was unreachable: any of them may have moved on meanwhile)."""
        self.runs.clear()
