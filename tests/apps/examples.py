"""Stand-ins for the reference agents, with the result keys the example workflows reference."""

from __future__ import annotations

import time
from typing import Any

from phibroker.runtime.agent import Agent, Context

webc = Agent("webc")
dc = Agent("dc")
vssc = Agent("vssc")
kalic = Agent("kalic")
cmdc = Agent("cmdc")


def _stamp(ctx: Context) -> dict[str, Any]:
    return {"task": ctx.task, "started": time.time(), "inputs": sorted(ctx.inputs)}


@webc.command()
def research(ctx: Context, topic: str, **extra: Any) -> dict[str, Any]:
    time.sleep(0.05)
    return {**_stamp(ctx), "topic": topic, "source_count": 3, "sources": [f"{topic} {i}" for i in range(3)]}


@dc.command()
def synthesize(ctx: Context, title: str = "", **extra: Any) -> dict[str, Any]:
    return {**_stamp(ctx), "title": title, "merged": sorted(ctx.inputs)}


@vssc.command()
def implement(ctx: Context, component: str = "x", **extra: Any) -> dict[str, Any]:
    time.sleep(0.05)
    return {**_stamp(ctx), "workspace": f"/tmp/{component}", "release": f"{component}-1"}


@vssc.command()
def fix_vulnerability(ctx: Context, findings: Any = None, **extra: Any) -> dict[str, Any]:
    return {**_stamp(ctx), "release": "fix-1", "fixed": findings}


@vssc.command()
def revert(ctx: Context, **extra: Any) -> dict[str, Any]:
    return {"reverted": ctx.result}


@kalic.command()
def security_audit(ctx: Context, target: str = ".", **extra: Any) -> dict[str, Any]:
    return {**_stamp(ctx), "vulnerabilities_found": 0, "target": target}


@kalic.command()
def static_scan(ctx: Context, target: str = ".", **extra: Any) -> dict[str, Any]:
    return {**_stamp(ctx), "findings": [{"file": "a.py", "line": 1, "rule": "eval"}]}


@kalic.command()
def verify_fix(ctx: Context, findings: Any = None, **extra: Any) -> dict[str, Any]:
    return {**_stamp(ctx), "fixed": True}


@cmdc.command()
def run_tests(ctx: Context, **extra: Any) -> dict[str, Any]:
    time.sleep(0.05)
    return {**_stamp(ctx), "passed": True}


@cmdc.command()
def deploy(ctx: Context, release: str = "", **extra: Any) -> dict[str, Any]:
    return {**_stamp(ctx), "release": release}


@cmdc.command()
def rollback(ctx: Context, **extra: Any) -> dict[str, Any]:
    return {"restored": None}
