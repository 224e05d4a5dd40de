"""`phibroker ui`, end to end: a real redis-server, a coordinator and a worker, and real `phibroker ui`
processes (one read-only, one with --allow-actions) answering real HTTP; the page itself in headless
Chromium (Debian's `chromium`, driven by Playwright through `executable_path`: nothing is downloaded).

Browser tests skip where chromium is missing, and fail in CI (`CI` set), where `.ci/run` installs it.
The screenshots of the README are taken here: `SCREENSHOTS=docs pytest tests/test_web.py` writes them
to docs/ (elsewhere they go to a temporary folder, so taking them is tested on every run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phibroker.runtime.client import Client
from phibroker.settings import Settings
from tests.conftest import REPO, Processes, RedisServer, free_port, short_settings, until

APPROVER = "webui"
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


# -- the stack: broker, coordinator, worker, two ui processes ---------------------------------------------


class Stack:
    def __init__(self, settings: Settings, procs: Processes, folder: Path):
        self.settings = settings
        self.procs = procs
        self.folder = folder
        self.client = Client(settings)
        self.acting = ""  # the ui with --allow-actions
        self.reading = ""  # the read-only ui

    def ui(self, *args: str) -> str:
        port = free_port()
        self.procs.spawn("ui", "ui", "--port", str(port), *args, PHIBROKER_APPROVER=APPROVER)
        base = f"http://127.0.0.1:{port}"
        until(lambda: answers(base + "/"), self.procs, timeout=30)
        return base

    def flow(self, text: str) -> Path:
        path = Path(tempfile.mkstemp(suffix=".yaml", dir=self.folder)[1])
        path.write_text(text)
        return path

    def submit(self, text: str, **params: Any) -> str:
        return self.client.submit(self.flow(text), params)

    def cli(self, *args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "phibroker", *args],
            env=self.procs.env(),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def ended(self, wf_id: str) -> dict[str, Any]:
        return until(lambda: (s := self.client.status(wf_id))["state"] in TERMINAL and s, self.procs, timeout=60)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except (OSError, urllib.error.URLError):
        return False


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read().decode()
            return answer.status, json.loads(body) if "json" in answer.headers.get("content-type", "") else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def post(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    data = json.dumps(body if body is not None else {}).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def token_of(base: str) -> str:
    _, page = get(base + "/")
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert found, page
    return found.group(1)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("web")
    (folder / "logs").mkdir()
    settings = short_settings(redis_server.url, folder / "home")
    procs = Processes(settings, folder / "logs")
    stack = Stack(settings, procs, folder)
    try:
        procs.coordinator()
        procs.worker("probe", app="tests.apps.probe", concurrency=8)
        stack.acting = stack.ui("--allow-actions")
        stack.reading = stack.ui()
        until(lambda: "probe" in stack.client.live_agents(), procs, timeout=30)
        yield stack
    finally:
        procs.close()
        stack.client.close()


GATED = """
name: gated
tasks:
  Build: {agent: probe, command: work}
  Gate: {approval: {message: "ship ${params.what}?"}, depends_on: [Build]}
  Ship: {agent: probe, command: work, depends_on: [Gate]}
params: {what: it}
"""

HOLD = """
name: hold
tasks:
  First: {agent: probe, command: work}
  Hold: {agent: probe, command: hold, payload: {sleep: "${params.sleep}"}, depends_on: [First]}
params: {sleep: 5}
"""

SHOWCASE = """
name: release
tasks:
  Fetch: {agent: probe, command: work, payload: {value: "${params.version}"}}
  Parts: {agent: probe, command: part, map: {over: "${params.items}", partitions: 3}, depends_on: [Fetch]}
  Draft: {agent: probe, command: work, depends_on: [Fetch], loop: {until: "iteration >= 2", max_iterations: 3}}
  Plan: {agent: probe, command: spawner, payload: {children: 2, chain: true}, depends_on: [Fetch]}
  Test: {agent: probe, command: hold, payload: {sleep: 60}, depends_on: [Parts]}
  CI: {signal: {name: ci-done, timeout: 1h}, depends_on: [Draft]}
  Approve: {approval: {message: "release ${params.version}?"}, depends_on: [Test, CI, Plan]}
  Deploy: {agent: probe, command: work, depends_on: [Approve]}
params: {version: "1.4.0", items: [1, 2, 3, 4, 5, 6]}
"""


def open_request(stack: Stack, wf_id: str) -> dict[str, Any]:
    return until(lambda: next((r for r in stack.client.approvals() if r["workflow"] == wf_id), None), stack.procs)


# -- pure parts ----------------------------------------------------------------------------------------


def test_the_drawing_has_one_node_per_task_of_the_status() -> None:
    import yaml

    from phibroker import workflow as workflows
    from phibroker.web import graph

    workflow = workflows.check(yaml.safe_load(SHOWCASE))
    tasks = {name: {"state": "succeeded", "agent": "probe", "attempts": 1, "history": []} for name in workflow.tasks}
    tasks["Draft"].update(iterations=2, attempts=2)
    tasks["Plan/c0"] = tasks["Plan/c1"] = {"state": "running", "agent": "probe", "attempts": 1, "history": []}
    drawing = graph.svg(workflow, {"id": "r1", "tasks": tasks})
    nodes = re.findall(r'<g class="node ([a-z]+)" data-task="([^"]+)" data-state="([^"]+)"', drawing)
    assert [name for _, name, _ in nodes] == list(tasks)
    kinds = {name: kind for kind, name, _ in nodes}
    assert kinds["CI"] == "signal" and kinds["Approve"] == "approval" and kinds["Parts"] == "map"
    assert drawing.count('class="edge spawned"') == 2 and drawing.count('class="loop"') == 1
    assert "succeeded · iteration 2" in drawing


def test_an_sse_message_names_its_event_and_carries_the_record() -> None:
    from phibroker.web import sse

    event = {"id": "17-0", "kind": "event", "task": "A", "data": {"type": "task.started", "id": "x"}}
    assert sse.frame("17-0", event) == f"id: 17-0\nevent: task.started\ndata: {json.dumps(event)}\n\n"
    chunk = {"id": "17-1", "kind": "chunk", "task": "A", "data": "hello\nworld"}
    assert sse.frame("17-1", chunk).splitlines()[:2] == ["id: 17-1", "event: chunk"]
    assert sse.frame(None, chunk).startswith("event: chunk\n")


# -- plain HTTP ----------------------------------------------------------------------------------------


def test_the_json_routes_answer_what_the_cli_prints(stack: Stack) -> None:
    done = stack.ended(stack.submit(HOLD, sleep=0))
    failed = stack.ended(stack.submit("name: broken\ntasks:\n  A: {agent: probe, command: fail}\n"))
    gated = stack.submit(GATED)
    open_request(stack, gated)
    until(lambda: stack.client.status(gated)["state"] == "waiting_approval", stack.procs)
    base = stack.reading

    def same(route: str, *command: str) -> bool:  # read twice, a moment apart: allow for a late write
        return bool(get(base + route)[1] == stack.cli(*command, "--json"))

    until(lambda: same("/api/runs", "list"), stack.procs)
    newest = ("list", "--limit", "1", "--state", "succeeded")
    until(lambda: same("/api/runs?limit=1&state=succeeded", *newest), stack.procs)
    assert [r["id"] for r in get(base + "/api/runs?name=brok")[1]] == [failed["id"]]
    for wf_id in (done["id"], failed["id"], gated):
        until(lambda: same(f"/api/runs/{wf_id}", "status", wf_id), stack.procs)  # noqa: B023 - called at once
    until(lambda: same("/api/approvals", "approvals"), stack.procs)
    moving = ("last_heartbeat", "since_heartbeat", "expires", "handled", "in_flight")
    steady = [[{k: v for k, v in row.items() if k not in moving} for row in rows] for rows in
              (get(base + "/api/agents")[1], stack.cli("agents", "--json"))]  # fmt: skip
    assert steady[0] == steady[1] and steady[0]

    assert get(base + "/api/runs/no-such-run")[0] == 404
    assert get(base + "/api/runs", {"Host": "rebound.example:8265"})[0] == 400  # DNS rebinding reads nothing
    assert get(base + "/api/runs", {"Host": "localhost"})[0] == 200
    assert get(base + "/api/runs?limit=0")[0] == 400
    assert get(base + "/api/runs?state=sleeping")[0] == 400
    status, page = get(f"{base}/runs/{gated}")
    drawn = re.findall(r'<g class="node [a-z]+" data-task="([^"]+)" data-state="([^"]+)"', page)
    assert status == 200 and dict(drawn) == {n: t["state"] for n, t in stack.client.status(gated)["tasks"].items()}
    assert 'name="csrf-token"' not in page and 'name="csrf_token"' not in page  # no actions: no token
    stack.client.cancel(gated)


def test_actions_do_not_exist_without_allow_actions(stack: Stack) -> None:
    wf_id = stack.submit(GATED)
    request = open_request(stack, wf_id)
    base = stack.reading
    for path in (f"runs/{wf_id}/cancel", f"runs/{wf_id}/retry", f"runs/{wf_id}/signal/go",
                 f"approvals/{request['id']}/approve", f"approvals/{request['id']}/reject"):  # fmt: skip
        assert post(f"{base}/api/{path}", {"reason": "no"}, {"X-CSRF-Token": "anything"})[0] == 404, path
    assert stack.client.status(wf_id)["state"] == "waiting_approval"
    assert [r["id"] for r in stack.client.approvals() if r["workflow"] == wf_id] == [request["id"]]
    stack.client.cancel(wf_id)


def test_actions_need_the_pages_token_and_its_origin(stack: Stack) -> None:
    base, token = stack.acting, token_of(stack.acting)
    wf_id = stack.submit(GATED)
    request = open_request(stack, wf_id)
    approve = f"{base}/api/approvals/{request['id']}/approve"
    cancel = f"{base}/api/runs/{wf_id}/cancel"
    for url in (approve, cancel):
        assert post(url)[0] == 403
        assert post(url, headers={"X-CSRF-Token": token[:-1] + "x"})[0] == 403
        assert post(url, headers={"X-CSRF-Token": token, "Origin": "http://evil.example"})[0] == 403
        assert post(url, {"csrf_token": "wrong"})[0] == 403
    assert stack.client.status(wf_id)["state"] == "waiting_approval"
    assert [r["id"] for r in stack.client.approvals() if r["workflow"] == wf_id] == [request["id"]]

    assert post(approve, {"comment": "fine"}, {"X-CSRF-Token": token, "Origin": base}) == (200, '{"ok": true}')
    status = stack.ended(wf_id)
    decision = status["tasks"]["Gate"]["result"]
    assert status["state"] == "succeeded" and decision["approver"] == APPROVER and decision["comment"] == "fine"

    rejected = stack.submit(GATED)
    request = open_request(stack, rejected)
    form = urllib.parse.urlencode({"csrf_token": token, "reason": "not today"}).encode()
    answer = urllib.request.urlopen(
        urllib.request.Request(f"{base}/api/approvals/{request['id']}/reject", form, method="POST"), timeout=30
    )
    assert answer.status == 200 and json.loads(answer.read()) == {"ok": True}
    status = stack.ended(rejected)
    assert status["state"] == "failed" and "not today" in str(status["tasks"]["Gate"]["error"])

    held = stack.submit(HOLD, sleep=60)
    until(lambda: stack.client.status(held)["tasks"]["Hold"]["state"] == "running", stack.procs)
    behind_a_proxy = {"X-CSRF-Token": token, "Origin": "https://ui.example", "X-Forwarded-Host": "ui.example"}
    assert post(f"{base}/api/runs/{held}/cancel", {}, behind_a_proxy) == (200, '{"ok": true}')
    assert stack.ended(held)["state"] == "cancelled"
    code, body = post(f"{base}/api/runs/{held}/cancel", {}, {"X-CSRF-Token": token})
    assert code == 400 and "has already ended" in json.loads(body)["error"]
    assert post(f"{base}/api/runs/{held}/retry", {"from": "Hold"}, {"X-CSRF-Token": token})[0] == 200
    until(lambda: stack.client.status(held)["state"] not in TERMINAL, stack.procs)
    stack.client.cancel(held)
    stack.ended(held)


def read_stream(url: str, headers: dict[str, str] | None = None, stop_after: int | None = None) -> list[dict[str, str]]:
    """The SSE messages of a stream (comments and the `retry:` line left out), until it closes or
    `stop_after` messages were read (then the connection is dropped)."""
    messages: list[dict[str, str]] = []
    current: dict[str, str] = {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        for raw in answer:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in current:
                    messages.append(current)
                    if stop_after is not None and len(messages) >= stop_after:
                        return messages
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return messages


def test_the_event_stream_resumes_after_last_event_id(stack: Stack) -> None:
    wf_id = stack.submit(HOLD, sleep=2)
    url = f"{stack.reading}/api/runs/{wf_id}/stream"
    first = read_stream(url, stop_after=3)  # dropped while the run goes on
    rest = read_stream(url, {"Last-Event-ID": first[-1]["id"]})  # closes after the run's end
    whole = read_stream(url)
    assert stack.client.status(wf_id)["state"] == "succeeded"
    assert [m["id"] for m in first + rest] == [m["id"] for m in whole]
    assert whole[0]["event"] == "workflow.submitted" and whole[-1]["event"] == "workflow.succeeded"
    record = json.loads(whole[-1]["data"])
    assert record["kind"] == "event" and record["data"]["type"] == "workflow.succeeded"
    assert read_stream(url, {"Last-Event-ID": whole[-1]["id"]}) == []
    ids = [m["id"] for m in whole]
    second = next(i for i in ids if i.endswith(":1"))  # a state change's several events share an entry
    first_of_them = second.removesuffix(":1") + ":0"
    assert [m["id"] for m in read_stream(url, {"Last-Event-ID": first_of_them})] == ids[ids.index(second) :]
    for garbage in ("garbage", "99999999999999999999-0", "1-99999999999999999999:webc:0"):
        assert [m["id"] for m in read_stream(url, {"Last-Event-ID": garbage})] == ids  # from the start
    assert get(f"{stack.reading}/api/runs/nope/stream")[0] == 404


# -- in the browser ------------------------------------------------------------------------------------


def _chromium() -> str | None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        binary = None
    if binary is None and os.environ.get("CI"):
        pytest.fail("chromium and playwright are required in CI (.ci/run installs chromium)")
    return binary


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium (or the playwright package) is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield launched
        finally:
            launched.close()


class Page:
    """A fresh page of the shared browser, noting every console error and uncaught exception."""

    def __init__(self, browser: Any, base: str):
        self.context = browser.new_context(viewport={"width": 1440, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.base = base
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, path: str) -> Any:
        self.page.goto(self.base + path)
        self.page.evaluate("window.notReloaded = true")
        return self.page

    def still_the_same_page(self) -> bool:
        return bool(self.page.evaluate("window.notReloaded === true"))


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Page]:
    opened = Page(browser, stack.acting)
    yield opened
    opened.context.close()
    assert opened.errors == [], "the page logged errors"


def test_a_node_turns_from_running_to_succeeded_live(stack: Stack, page: Page) -> None:
    wf_id = stack.submit(HOLD, sleep=6)
    tab = page.open(f"/runs/{wf_id}")
    tab.wait_for_selector('g[data-task="Hold"][data-state="running"]')
    tab.wait_for_selector('g[data-task="Hold"][data-state="succeeded"]')
    tab.wait_for_selector('#run-state[data-state="succeeded"]')
    assert page.still_the_same_page()
    assert tab.locator("g[data-task]").count() == 2
    tab.click('g[data-task="Hold"]')
    assert "Hold" in tab.locator("#p-result").inner_text()
    assert tab.locator(".tl-row").count() == 2


def test_approve_in_the_inbox_releases_the_gate(stack: Stack, page: Page) -> None:
    wf_id = stack.submit(GATED, what="v2")
    request = open_request(stack, wf_id)
    tab = page.open("/approvals")
    item = tab.locator(f'[data-approval="{request["id"]}"]')
    item.wait_for()
    assert "ship v2?" in item.inner_text()
    item.get_by_role("textbox").fill("looks good")
    item.get_by_role("button", name="Approve").click()
    item.wait_for(state="detached")
    status = stack.ended(wf_id)
    decision = status["tasks"]["Gate"]["result"]
    assert status["state"] == "succeeded"
    assert decision["approved"] is True and decision["approver"] == APPROVER and decision["comment"] == "looks good"


def test_reject_in_the_inbox_fails_the_run(stack: Stack, page: Page) -> None:
    wf_id = stack.submit(GATED)
    request = open_request(stack, wf_id)
    tab = page.open("/approvals")
    item = tab.locator(f'[data-approval="{request["id"]}"]')
    item.get_by_role("textbox").fill("not this week")
    item.get_by_role("button", name="Reject").click()
    status = stack.ended(wf_id)
    assert status["state"] == "failed" and "not this week" in str(status["tasks"]["Gate"]["error"])


def test_the_cancel_button_cancels(stack: Stack, page: Page) -> None:
    wf_id = stack.submit(HOLD, sleep=60)
    tab = page.open(f"/runs/{wf_id}")
    tab.wait_for_selector('g[data-task="Hold"][data-state="running"]')
    tab.get_by_role("button", name="Cancel").click()
    assert stack.ended(wf_id)["state"] == "cancelled"
    tab.wait_for_selector('#run-state[data-state="cancelled"]')
    assert tab.get_by_role("button", name="Retry").is_visible()


def test_read_only_pages_show_no_action_controls(browser: Any, stack: Stack) -> None:
    wf_id = stack.submit(GATED)
    open_request(stack, wf_id)
    reader = Page(browser, stack.reading)
    try:
        tab = reader.open("/approvals")
        tab.locator("[data-approval]").first.wait_for()
        tab.goto(f"{stack.reading}/runs/{wf_id}")
        tab.wait_for_selector('g[data-task="Gate"][data-state="running"]')
        tab.click('g[data-task="Gate"]')
        assert tab.get_by_role("button", name=re.compile("Approve|Reject|Cancel")).count() == 0
        assert reader.errors == []
    finally:
        reader.context.close()
        stack.client.cancel(wf_id)


def test_screenshots(stack: Stack, page: Page, tmp_path: Path) -> None:
    """The README's pictures: the runs list, a run's page with a task open, the approvals inbox."""
    folder = REPO / os.environ["SCREENSHOTS"] if os.environ.get("SCREENSHOTS") else tmp_path
    wf_id = stack.submit(SHOWCASE)
    stack.submit(GATED, what="the docs")
    until(lambda: stack.client.status(wf_id)["tasks"]["Test"]["state"] == "running", stack.procs)
    until(lambda: stack.client.status(wf_id)["tasks"].get("Plan/c1", {}).get("state") == "succeeded", stack.procs)
    tab = page.open("/")
    tab.wait_for_selector(f'[data-run="{wf_id}"] .bar')
    tab.set_viewport_size({"width": 1280, "height": 400})
    tab.screenshot(path=str(folder / "ui-runs.png"), full_page=True)
    tab.set_viewport_size({"width": 1440, "height": 900})
    tab.goto(f"{stack.acting}/runs/{wf_id}")
    tab.wait_for_selector('g[data-task="Plan/c1"][data-state="succeeded"]')
    tab.click('g[data-task="Fetch"]')
    tab.wait_for_selector("#p-payload:not([hidden])")
    tab.screenshot(path=str(folder / "ui-run.png"), full_page=True)
    tab.goto(f"{stack.acting}/approvals")
    tab.locator("[data-approval]").first.wait_for()
    tab.set_viewport_size({"width": 1280, "height": 300})
    tab.screenshot(path=str(folder / "ui-approvals.png"), full_page=True)
    for name in ("ui-runs.png", "ui-run.png", "ui-approvals.png"):
        assert (folder / name).read_bytes().startswith(b"\x89PNG")
    stack.client.cancel(wf_id)
