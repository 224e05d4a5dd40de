// phibroker ui: reads the JSON API and keeps each page current; acts only when the page was served
// with actions on (the token is in <meta name="csrf-token">). No framework, no build step.
"use strict";
(() => {
  const page = document.body.dataset.page;
  const actions = document.body.dataset.actions === "1";
  const token = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);
  const RETRYABLE = new Set(["failed", "cancelled", "timed_out"]);
  const EVENTS = ["chunk", "log", "workflow.submitted", "workflow.waiting_approval", "workflow.cancelling",
    "workflow.compensating", "workflow.retried", "workflow.refused", "workflow.succeeded", "workflow.failed",
    "workflow.cancelled", "workflow.timed_out", "task.dispatched", "task.started", "task.succeeded",
    "task.failed", "task.retrying", "task.skipped", "task.cancelled", "task.upstream_failed",
    "task.compensated", "task.compensation_failed", "task.spawned", "task.iterated", "task.waiting",
    "task.child_started", "approval.requested", "approval.granted", "approval.rejected",
    "signal.received", "signal.kept"];

  // -- small helpers ----------------------------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const kid of kids.flat()) if (kid !== null && kid !== undefined) node.append(kid);
    return node;
  }
  const byId = (id) => document.getElementById(id);
  const path = (id) => encodeURIComponent(id).replace(/%40/g, "@");
  const now = () => Date.now() / 1000;
  const json = (value) => (value === undefined ? "" : JSON.stringify(value, null, 2));

  function span(s) {
    s = Math.max(0, s);
    if (s < 1) return `${Math.round(s * 1000)}ms`;
    if (s < 9.95) return `${s.toFixed(1)}s`;
    if (s < 59.5) return `${Math.round(s)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d`;
  }
  const ago = (ts) => (ts ? `${span(now() - ts)} ago` : "");
  const took = (start, end) => (start ? span((end || now()) - start) : "");

  let noticeTimer;
  function notice(text, bad) {
    const box = byId("notice");
    box.textContent = text;
    box.className = bad ? "bad" : "";
    box.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { box.hidden = true; }, bad ? 8000 : 3000);
  }

  async function getJSON(url) {
    const answer = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
    const value = await answer.json().catch(() => null);
    if (!answer.ok) throw new Error((value && value.error) || `${answer.status} ${answer.statusText}`);
    return value;
  }

  async function act(url, fields) {
    const answer = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
      body: JSON.stringify(fields || {}),
    });
    const value = await answer.json().catch(() => ({}));
    if (!answer.ok || !value.ok) throw new Error(value.error || `${answer.status} ${answer.statusText}`);
  }

  // Run `fn` now and then every `ms` after it finished; a failure is shown, the loop goes on.
  function every(ms, fn) {
    const tick = async () => {
      try { await fn(); } catch (error) { notice(error.message, true); }
      setTimeout(tick, typeof ms === "function" ? ms() : ms);
    };
    tick();
  }

  // Keep `box`'s children one per item, keyed: an item seen before keeps its element (and what is typed
  // in it); `update` refreshes it. Elements move only when the order changed.
  function sync(box, items, key, make, update) {
    const old = new Map([...box.children].map((node) => [node.dataset.key, node]));
    const nodes = items.map((item) => {
      const node = old.get(key(item));
      if (node) { update(node, item); return node; }
      const made = make(item);
      made.dataset.key = key(item);
      return made;
    });
    const same = nodes.length === box.children.length && nodes.every((node, i) => box.children[i] === node);
    if (!same) box.replaceChildren(...nodes);
  }

  function button(text, kind, onclick) {
    return h("button", { type: "button", class: kind, onclick: async (event) => {
      const target = event.currentTarget;
      target.disabled = true;
      try { await onclick(); } catch (error) { notice(error.message, true); } finally { target.disabled = false; }
    } }, text);
  }

  function approvalCount(n) { byId("approval-count").textContent = n ? String(n) : ""; }

  // -- /: runs ------------------------------------------------------------------------------------------
  function runsPage() {
    const form = byId("filters");
    const asked = new URLSearchParams(location.search);
    for (const name of ["state", "name", "limit"]) if (asked.get(name)) form.elements[name].value = asked.get(name);
    const query = () => {
      const q = new URLSearchParams();
      for (const name of ["state", "name", "limit"]) {
        const value = form.elements[name].value.trim();
        if (value) q.set(name, value);
      }
      return q;
    };
    let seq = 0;
    const refresh = async () => {
      const mine = ++seq;
      const rows = await getJSON(`/api/runs?${query()}`);
      const going = rows.filter((r) => !TERMINAL.has(r.state)).map((r) => `id=${encodeURIComponent(r.id)}`);
      const progress = going.length ? await getJSON(`/api/progress?${going.join("&")}`) : {};
      if (mine !== seq) return; // a newer filter answered first
      const row = (r) => h("tr", { "data-run": r.id, "data-state": r.state, class: r.parent ? "child" : null },
        h("td", { class: "mono" }, h("a", { href: `/runs/${path(r.id)}` }, r.id)),
        h("td", {}, r.name || "", r.parent ? h("small", { class: "meta" }, ` · ${r.parent.task} of ${r.parent.id}`) : null),
        h("td", {}, h("span", { class: "badge", "data-state": r.state }, r.state || "?")),
        h("td", {}, bar(progress[r.id])),
        h("td", { title: r.created_at ? new Date(r.created_at * 1000).toLocaleString() : "" }, ago(r.created_at)),
        h("td", {}, took(r.created_at, r.finished_at)));
      sync(byId("runs"), rows, (r) => r.id, row, (node, r) => {
        const fresh = row(r);
        node.replaceChildren(...fresh.childNodes);
        node.dataset.state = r.state;
      });
      byId("runs-empty").hidden = rows.length > 0;
      const counts = {};
      for (const r of rows) counts[r.state] = (counts[r.state] || 0) + 1;
      byId("counts").textContent = rows.length
        ? `${rows.length} shown: ` + Object.entries(counts).map(([state, n]) => `${n} ${state}`).join(", ") : "";
    };
    form.addEventListener("submit", (event) => event.preventDefault());
    form.addEventListener("input", () => { history.replaceState(null, "", `?${query()}`); refresh().catch((e) => notice(e.message, true)); });
    every(1000, refresh);
  }

  function bar(progress) {
    if (!progress || !progress.total) return "";
    const fill = h("span");
    fill.style.width = `${Math.round((100 * progress.done) / progress.total)}%`;
    return [h("span", { class: "bar" }, fill), h("small", {}, `${progress.done}/${progress.total}`)];
  }

  // -- /runs/ID: the DAG, the attempts, a task's details ---------------------------------------------------
  function runPage() {
    const wfId = byId("run").dataset.runId;
    const api = `/api/runs/${path(wfId)}`;
    const graph = byId("graph");
    const output = new Map(); // task -> its chunks and log records, as the stream sent them
    let status = null;
    let selected = null;
    let details = { key: null, value: null };
    let source = null;
    let lastId = "";
    let sawEnd = false;
    let busy = false;
    let again = false;

    async function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      try {
        do { again = false; status = await getJSON(api); await paint(); } while (again);
      } finally { busy = false; }
    }

    async function paint() {
      const drawn = graph.querySelectorAll("g[data-task]");
      const names = Object.keys(status.tasks);
      if (drawn.length !== names.length || [...drawn].some((g) => !(g.dataset.task in status.tasks))) {
        const answer = await fetch(`${location.pathname}?part=graph`, { cache: "no-store" });
        if (answer.ok) graph.innerHTML = await answer.text(); // drawn by the server, escaped there
      }
      for (const g of graph.querySelectorAll("g[data-task]")) {
        const row = status.tasks[g.dataset.task];
        if (!row) continue;
        if (g.dataset.state !== row.state) g.dataset.state = row.state;
        const line = g.querySelector("text.st");
        if (line && line.textContent !== note(row)) line.textContent = note(row);
        g.classList.toggle("selected", g.dataset.task === selected);
      }
      fit();
      header();
      timeline();
      if (selected) panel();
      follow();
    }

    // A drawing wider than its box is shrunk to fit, down to a size where its text still reads.
    function fit() {
      const drawing = graph.querySelector("svg");
      if (!drawing) return;
      const width = Number(drawing.getAttribute("width"));
      const scale = Math.min(1, (graph.clientWidth - 2) / width);
      const shrink = scale >= 0.6 && scale < 1;
      drawing.style.width = shrink ? `${width * scale}px` : "";
      drawing.style.height = shrink ? `${Number(drawing.getAttribute("height")) * scale}px` : "";
    }

    function note(row) {
      const bits = [row.state];
      if (row.iterations > 1) bits.push(`iteration ${row.iterations}`);
      else if (row.attempts > 1) bits.push(`try ${row.attempts}`);
      if (row.partitions && row.partitions.length) {
        const done = row.partitions.filter((p) => p.state === "succeeded").length;
        bits.push(`${done}/${row.partitions.length} parts`);
      }
      return bits.join(" · ");
    }

    function header() {
      const state = byId("run-state");
      state.textContent = status.state;
      state.dataset.state = status.state;
      const tasks = Object.values(status.tasks);
      const done = tasks.filter((t) => ["succeeded", "failed", "skipped", "cancelled", "compensated", "upstream_failed"].includes(t.state)).length;
      const time = status.finished_at ? `took ${took(status.created_at, status.finished_at)}` : `running for ${took(status.created_at)}`;
      const spend = status.spend && (status.spend.tokens || status.spend.cost) ? ` · spent ${status.spend.tokens} tokens, ${status.spend.cost}` : "";
      byId("run-meta").textContent = `submitted ${ago(status.created_at)} · ${time} · ${done}/${tasks.length} tasks done${spend}`;
      const error = byId("run-error");
      error.hidden = !status.error;
      error.textContent = status.error || "";
      if (!actions) return;
      const want = TERMINAL.has(status.state) ? (RETRYABLE.has(status.state) ? "retry" : "") : "cancel";
      const box = byId("run-actions");
      if (box.dataset.showing === want) return;
      box.dataset.showing = want;
      box.replaceChildren();
      if (want === "cancel") {
        box.append(button("Cancel", "stop", async () => { await act(`${api}/cancel`, {}); notice(`cancelling ${wfId}`); refresh(); }));
      } else if (want === "retry") {
        box.append(button("Retry", "go", async () => { await act(`${api}/retry`, {}); notice(`re-opened ${wfId}`); refresh(); }));
      }
    }

    function timeline() {
      const box = byId("timeline");
      const start = status.created_at || now();
      const end = status.finished_at || now();
      const width = Math.max(end - start, 0.001);
      const rows = [];
      for (const [name, row] of Object.entries(status.tasks)) {
        const attempts = [...row.history];
        if (row.state === "running" && row.started_at && !attempts.some((a) => !a.finished_at)) {
          attempts.push({ attempt: row.attempts, started_at: row.started_at, finished_at: null }); // not settled yet
        }
        if (!attempts.length) continue;
        const track = h("div", { class: "tl-track" });
        for (const attempt of attempts) {
          if (!attempt.started_at) continue;
          const kind = attempt.compensation ? "undo" : attempt.applied === false ? "ignored"
            : !attempt.finished_at ? "running" : attempt.error ? "failed" : "";
          const piece = h("span", { class: `tl-bar ${kind}`, title: `${name} attempt ${attempt.attempt}` +
            `${attempt.partition !== undefined ? ` (part ${attempt.partition})` : ""} · ${attempt.worker || ""}` +
            ` · ${took(attempt.started_at, attempt.finished_at)}${attempt.error ? ` · ${attempt.error}` : ""}` });
          piece.style.left = `${(100 * (attempt.started_at - start)) / width}%`;
          piece.style.width = `${(100 * ((attempt.finished_at || end) - attempt.started_at)) / width}%`;
          track.append(piece);
        }
        rows.push(h("div", { class: "tl-row", onclick: () => select(name) }, h("span", { class: "tl-name", title: name }, name), track));
      }
      if (!rows.length) { box.replaceChildren(h("p", { class: "empty" }, "No attempt has started yet.")); return; }
      box.replaceChildren(...rows, h("div", { class: "tl-axis" }, h("span", {}, "0"), h("span", {}, span(end - start))));
    }

    function select(name) {
      selected = name;
      details = { key: null, value: null };
      byId("panel").hidden = false;
      byId("panel-title").textContent = name;
      const body = byId("panel-body");
      body.replaceChildren();
      const section = (id, title, kind) => body.append(h("h3", { id: `${id}-title`, hidden: true }, title), h(kind || "pre", { id, hidden: true }));
      body.append(h("p", { id: "p-summary" }), h("div", { id: "p-acts" }));
      for (const [id, title] of [["p-payload", "Payload"], ["p-inputs", "Inputs"], ["p-result", "Result"],
        ["p-error", "Error"], ["p-traceback", "Traceback"], ["p-spend", "Spend"]]) section(id, title);
      section("p-attempts", "Attempts", "div");
      section("p-output", "Output");
      byId("p-output").className = "output";
      if (status) paint();
      showOutput();
    }

    function fill(id, text) {
      const box = byId(id);
      const empty = text === "" || text === undefined || text === null;
      box.hidden = empty;
      byId(`${id}-title`).hidden = empty;
      if (!empty && box.textContent !== text) box.textContent = text;
    }

    function panel() {
      const row = status.tasks[selected];
      if (!row) return;
      const bits = [row.agent ? `agent ${row.agent}` : null, `${row.attempts} attempt${row.attempts === 1 ? "" : "s"}`,
        row.iterations ? `iteration ${row.iterations}` : null, row.waiting_for ? `waiting for ${row.waiting_for}` : null,
        row.stopping ? `stopping: ${row.stopping}` : null, row.started_at ? `took ${took(row.started_at, row.finished_at)}` : null];
      const summary = byId("p-summary");
      summary.replaceChildren(h("span", { class: "badge", "data-state": row.state }, row.state), " ", bits.filter(Boolean).join(" · "));
      if (row.child) summary.append(" · child run ", h("a", { href: `/runs/${path(row.child)}` }, row.child));
      fill("p-result", row.result === null || row.result === undefined ? "" : json(row.result));
      fill("p-error", row.error || "");
      const traced = row.history.filter((a) => a.traceback);
      fill("p-traceback", traced.length ? traced[traced.length - 1].traceback : "");
      fill("p-spend", row.spend && (row.spend.tokens || row.spend.cost) ? json(row.spend) : "");
      attempts(row);
      gates(row);
      const key = `${selected}|${row.attempts}|${row.state}`;
      if (details.key !== key) {
        details.key = key;
        getJSON(`${api}/tasks/${path(selected)}`).then((value) => {
          if (details.key !== key) return;
          fill("p-payload", value.payload && Object.keys(value.payload).length ? json(value.payload) : "");
          fill("p-inputs", value.inputs && Object.keys(value.inputs).length ? json(value.inputs) : "");
        }).catch((error) => notice(error.message, true));
      }
    }

    function attempts(row) {
      const box = byId("p-attempts");
      const shown = !!row.history.length;
      box.hidden = !shown;
      byId("p-attempts-title").hidden = !shown;
      if (!shown) return;
      const text = JSON.stringify(row.history.map((a) => [a.attempt, a.finished_at, a.error]));
      if (box.dataset.text === text) return;
      box.dataset.text = text;
      box.replaceChildren(h("table", {}, h("tr", {}, ["#", "worker", "started", "took", "outcome"].map((c) => h("th", {}, c))),
        row.history.map((a) => h("tr", {},
          h("td", {}, `${a.attempt}${a.partition !== undefined ? ` · part ${a.partition}` : ""}${a.compensation ? " · undo" : ""}`),
          h("td", { class: "mono" }, a.worker || ""),
          h("td", {}, a.started_at ? new Date(a.started_at * 1000).toLocaleTimeString() : ""),
          h("td", {}, took(a.started_at, a.finished_at)),
          h("td", {}, a.applied === false ? "not applied" : !a.finished_at ? "running" : a.error || "ok")))));
    }

    function gates(row) {
      const box = byId("p-acts");
      const request = row.approval && row.state === "running" ? row.approval.request : null;
      const signal = row.waiting_for && row.waiting_for.startsWith("signal ") ? row.waiting_for.slice(7) : null;
      const want = !actions ? "" : request ? `approval ${request}` : signal ? `signal ${signal}` : "";
      if (!actions || box.dataset.showing === want) return;
      box.dataset.showing = want;
      box.replaceChildren();
      if (request) {
        const note = h("input", { type: "text", placeholder: "comment or reason" });
        const decide = (decision, field) => async () => {
          await act(`/api/approvals/${encodeURIComponent(request)}/${decision}`, { [field]: note.value });
          notice(`${decision === "approve" ? "approved" : "rejected"} ${request}`);
          refresh();
        };
        box.append(h("form", { onsubmit: (e) => e.preventDefault() }, note,
          button("Approve", "go", decide("approve", "comment")), button("Reject", "stop", decide("reject", "reason"))));
      } else if (signal) {
        const data = h("input", { type: "text", placeholder: "data as JSON (optional)" });
        box.append(h("form", { onsubmit: (e) => e.preventDefault() }, data, button(`Send ${signal}`, "go", async () => {
          let value = null;
          if (data.value.trim()) {
            try { value = JSON.parse(data.value); } catch { throw new Error("the data is not JSON"); }
          }
          await act(`${api}/signal/${path(signal)}`, { data: value });
          notice(`sent ${signal}`);
          refresh();
        })));
      }
    }

    function line(record) {
      if (record.kind === "log") {
        const data = record.data || {};
        return `${data.level || ""} ${data.logger || ""}: ${data.message || ""}\n`;
      }
      return typeof record.data === "string" ? record.data : `${JSON.stringify(record.data)}\n`;
    }

    function showOutput() {
      const records = output.get(selected) || [];
      fill("p-output", records.map(line).join(""));
    }

    // Server-Sent Events: output as it comes, and a refresh on every event; closed once the run ended
    // and the server ended the stream (it would only reconnect to hear nothing).
    function follow() {
      if (!window.EventSource || source || (sawEnd && TERMINAL.has(status.state))) return;
      if (!TERMINAL.has(status.state)) sawEnd = false;
      source = new EventSource(`${api}/stream${lastId ? `?after=${encodeURIComponent(lastId)}` : ""}`);
      const take = (event) => {
        lastId = event.lastEventId || lastId;
        const record = JSON.parse(event.data);
        if (record.kind === "chunk" || record.kind === "log") {
          const list = output.get(record.task) || [];
          list.push(record);
          if (list.length > 5000) list.shift();
          output.set(record.task, list);
          if (record.task === selected) showOutput();
          return;
        }
        if (/^workflow\.(succeeded|failed|cancelled|timed_out)$/.test(event.type)) sawEnd = true;
        refresh();
      };
      for (const type of EVENTS) source.addEventListener(type, take);
      source.onmessage = take;
      source.onerror = () => {
        if (sawEnd && status && TERMINAL.has(status.state)) { source.close(); source = null; }
      };
    }
    const connected = () => source && source.readyState === EventSource.OPEN;

    graph.addEventListener("click", (event) => {
      const node = event.target.closest("g[data-task]");
      if (node) select(node.dataset.task);
    });
    graph.addEventListener("keydown", (event) => {
      const node = event.target.closest("g[data-task]");
      if (node && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); select(node.dataset.task); }
    });
    byId("panel-close").addEventListener("click", () => { selected = null; byId("panel").hidden = true; paint(); });
    window.addEventListener("resize", fit);
    every(() => (status && TERMINAL.has(status.state) ? 5000 : connected() ? 3000 : 1000), refresh);
  }

  // -- /approvals ----------------------------------------------------------------------------------------
  function approvalsPage() {
    const list = byId("approvals");
    const decided = new Set(); // gone from the list at once, whatever a poll already in flight says
    byId("approvals-note").textContent = actions
      ? "Decisions are signed with the key of whoever runs phibroker ui."
      : "Read-only: start phibroker ui with --allow-actions to decide here, or use the commands shown.";
    const deadline = (r) => (r.deadline ? ` · times out in ${span(r.deadline - now())}` : "");
    const make = (r) => {
      const item = h("li", { "data-approval": r.id },
        h("p", { class: "message" }, r.message || "(no message)"),
        h("p", { class: "meta" }, "run ", h("a", { href: `/runs/${path(r.workflow)}` }, r.workflow), `, task ${r.task} · `,
          h("code", {}, r.id), h("span", { class: "deadline" }, deadline(r))));
      if (!actions) {
        item.append(h("p", { class: "meta" }, h("code", {}, `phibroker approve ${r.id}`), " or ",
          h("code", {}, `phibroker reject ${r.id} --reason ...`)));
        return item;
      }
      const words = h("input", { type: "text", name: "note", placeholder: "comment (approve) or reason (reject)" });
      const decide = (decision, field) => async () => {
        await act(`/api/approvals/${encodeURIComponent(r.id)}/${decision}`, { [field]: words.value });
        notice(`${decision === "approve" ? "approved" : "rejected"}: ${r.message || r.id}`);
        decided.add(r.id);
        item.remove();
      };
      item.append(h("form", { onsubmit: (e) => e.preventDefault() }, words,
        button("Approve", "go", decide("approve", "comment")), button("Reject", "stop", decide("reject", "reason"))));
      return item;
    };
    every(1500, async () => {
      const requests = (await getJSON("/api/approvals")).filter((r) => !decided.has(r.id));
      approvalCount(requests.length);
      sync(list, requests, (r) => r.id, make, (node, r) => { node.querySelector(".deadline").textContent = deadline(r); });
      byId("approvals-empty").hidden = requests.length > 0;
    });
  }

  // -- /agents -------------------------------------------------------------------------------------------
  function agentsPage() {
    every(2000, async () => {
      const [workers, lanes] = await Promise.all([getJSON("/api/agents"), getJSON("/api/streams")]);
      const rows = Object.entries(lanes).map(([agent, lane]) => {
        const mine = workers.filter((w) => w.agent === agent && w.alive);
        const busy = mine.reduce((n, w) => n + (w.in_flight || 0), 0);
        const slots = mine.reduce((n, w) => n + (w.concurrency || 0), 0);
        return h("tr", { "data-agent": agent }, h("td", {}, agent), h("td", {}, String(mine.length)),
          h("td", {}, `${busy}/${slots}`), h("td", {}, lane.lag === null ? "?" : String(lane.lag)),
          h("td", {}, String(lane.pending)), h("td", {}, String(lane.length)));
      });
      byId("lanes").replaceChildren(...rows);
      byId("workers").replaceChildren(...workers.map((w) => h("tr", { "data-worker": w.consumer },
        h("td", {}, w.agent || "?"), h("td", { class: "mono" }, w.consumer), h("td", {}, `${w.host || "?"} · ${w.pid || "?"}`),
        h("td", {}, `${w.in_flight || 0}/${w.concurrency || 0}`), h("td", {}, String(w.handled || 0)),
        h("td", {}, w.since_heartbeat === null ? "never" : `${span(w.since_heartbeat)} ago`),
        h("td", { class: w.alive ? "alive" : "dead" }, w.alive ? (w.stopping ? "alive, stopping" : "alive") : "lapsed"))));
      byId("workers-empty").hidden = workers.length > 0;
    });
  }

  for (const link of document.querySelectorAll("nav a[data-nav]")) link.classList.toggle("here", link.dataset.nav === page);
  if (page !== "approvals") every(5000, async () => approvalCount((await getJSON("/api/approvals")).length));
  ({ runs: runsPage, run: runPage, approvals: approvalsPage, agents: agentsPage }[page] || (() => {}))();
})();
