// hotwire dashboard: renders the master's JSON views and follows /events (Server-Sent
// Events). Every string from the master goes into the page as text, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const STATUSES = ["added", "removed", "changed", "renamed", "rescaled", "same"];
const ui = { snap: null, app: "", mode: "last", versionDiff: null, previewSeen: {} };

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "onclick") e.onclick = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function fill(tbody, rows) { tbody.replaceChildren(...rows); }

function ago(unix) {
  if (!unix) return "";
  const s = Math.max(0, Date.now() / 1000 - unix);
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
  return new Date(unix * 1000).toLocaleString();
}

async function getJSON(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

// ---------------------------------------------------------------- apps & workers
function renderApps(apps) {
  if (!ui.app && apps.length) ui.app = apps[0].app;
  fill($("apps").tBodies[0], apps.map((a) => {
    const tr = el("tr", { class: "clickable" + (a.app === ui.app ? " selected" : ""), "data-app": a.app,
      onclick: () => { ui.app = a.app; ui.mode = "last"; ui.versionDiff = null; render(); } },
      el("td", {}, a.app), el("td", {}, `v${a.version}`), el("td", {}, a.state),
      el("td", {}, a.pes), el("td", {}, a.instances), el("td", {}, a.recoveries));
    return tr;
  }));
}

function renderWorkers(workers) {
  fill($("workers").tBodies[0], workers.map((w) => el("tr", { "data-worker": w.name },
    el("td", {}, w.name),
    el("td", { class: w.alive ? "alive-yes" : "alive-no" }, w.alive ? "alive" : "dead"),
    el("td", {}, w.slots),
    el("td", {}, `${w.instances.length} / ${w.slots}`),
    el("td", {}, `${w.last_heartbeat_age_s.toFixed(1)} s`),
    el("td", {}, w.epoch + (w.fenced ? " (fenced)" : "")),
    el("td", { class: "muted" }, w.data_address))));
}

// ---------------------------------------------------------------- the graph
function drawGraph(graph, pes, preview) {
  const s = $("graph");
  const w = Math.max(graph.width, 300), h = Math.max(graph.height, 80);
  s.setAttribute("width", w); s.setAttribute("height", h); s.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
    markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8a94a6" }));
  defs.append(marker);
  const parts = [defs];
  const at = {};
  for (const n of graph.nodes) at[n.name] = n;
  const nw = graph.node_w, nh = graph.node_h;
  for (const e of graph.edges) {
    const a = at[e.src], b = at[e.dst];
    if (!a || !b) continue;
    const x1 = a.x + nw, y1 = a.y + nh / 2, x2 = b.x, y2 = b.y + nh / 2;
    const curve = (ax, ay, bx, by) => ` C${(ax + bx) / 2},${ay} ${(ax + bx) / 2},${by} ${bx},${by}`;
    let d = `M${x1},${y1}`, cx = x1, cy = y1;
    for (const [vx, vy] of e.via || []) {  // the slots it passes through in the layers between
      d += curve(cx, cy, vx, vy) + ` L${vx + nw},${vy}`;
      cx = vx + nw; cy = vy;
    }
    if (x2 > cx) d += curve(cx, cy, x2, y2);
    else d += ` C${cx + 60},${cy - 80} ${x2 - 60},${y2 - 80} ${x2},${y2}`;  // back to the left
    const mx = (cx + x2) / 2;
    const g = svg("g", { class: `stream status-${e.status}`, "data-stream": `${e.src}->${e.dst}` });
    g.append(svg("path", { d, class: `edge status-${e.status}`, "marker-end": "url(#arrow)" }));
    if (e.partition && e.partition !== "shuffle") {
      g.append(svg("text", { x: mx, y: (cy + y2) / 2 - 4, "text-anchor": "middle", class: "edge-label" }, e.partition));
    }
    parts.push(g);
  }
  for (const n of graph.nodes) {
    const live = pes[n.name];
    const cls = ["pe", `status-${n.status}`, ...n.tags.map((t) => `tag-${t}`)];
    if (live && live.failed) cls.push("failed");
    const g = svg("g", { class: cls.join(" "), "data-pe": n.name, "data-status": n.status,
      transform: `translate(${n.x},${n.y})` });
    const title = [`${n.name} (${n.kind})`, `status: ${n.tags.join(", ") || "unchanged"}`];
    if (n.renamed_from) title.push(`renamed from ${n.renamed_from}`);
    g.append(svg("title", {}, title.join("\n")));
    g.append(svg("rect", { width: nw, height: nh, rx: 6 }));
    g.append(svg("text", { x: 8, y: 16, class: "name" }, n.name + (n.renamed_from ? ` \u2190 ${n.renamed_from}` : "")));
    let sub = `${n.kind} \u00d7${n.parallelism}`;
    let where = "";
    if (live && !preview && n.status !== "removed") {
      sub += ` \u00b7 ${live.rate.toFixed(0)} rec/s`;
      where = Object.entries(live.workers).sort().map(([wk, k]) => `${wk}:${k}`).join(" ");
      if (live.errors) where += ` \u00b7 ${live.errors} err`;
    } else if (n.status === "removed") {
      where = "removed";
    } else if (preview) {
      where = n.in_new ? "after the upgrade" : "";
    }
    g.append(svg("text", { x: 8, y: 33, class: "sub rate" }, sub));
    g.append(svg("text", { x: 8, y: 49, class: "sub workers" }, where));
    parts.push(g);
  }
  s.replaceChildren(...parts);
  const labels = { added: "added", removed: "removed", changed: "changed (code, config)", renamed: "renamed",
    rescaled: "rescaled", same: "unchanged" };
  $("legend").replaceChildren(...STATUSES.map((k) => el("span", { class: k }, labels[k])));
}

// ---------------------------------------------------------------- app detail
function planBlock(plan) {
  const out = [];
  for (const phase of Object.keys(plan || {})) {
    const lines = plan[phase];
    out.push(el("div", { class: "phase-block", "data-phase": phase },
      el("h4", {}, `${phase} (${lines.length})`),
      el("ul", { class: "lines" }, ...lines.map((l) => el("li", {}, l)))));
  }
  return out;
}

function planCounts(p) {
  if (!p) return [el("p", { class: "muted" }, "no plan recorded")];
  const types = Object.entries(p.by_type || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  return [el("p", {}, `${p.instructions} instructions on ${p.workers} worker(s): ` +
    `${p.prepare} in prepare, ${p.switch} in switch (${types})`)];
}

function renderProgress(p) {
  const box = $("progress");
  if (!p) { box.replaceChildren(el("p", { class: "muted" }, "no transition since the master started")); return; }
  const chips = p.phases.map((ph, i) => {
    const current = p.running && i === p.phases.length - 1;
    const ms = ph.ms === null ? "\u2026" : `${ph.ms.toFixed(1)} ms`;
    return el("span", { class: "phase" + (current ? " current" : " done"), "data-phase": ph.phase }, `${ph.phase} ${ms}`);
  });
  const head = `${p.action} to version ${p.version} (transition ${p.epoch}), started ${ago(p.started)}`;
  box.replaceChildren(el("div", {}, head),
    el("div", { class: "phases", id: "phases", "data-running": p.running ? "1" : "0" }, ...chips,
      el("span", { class: "outcome", id: "outcome" }, p.running ? `in ${p.phase}` : p.outcome)));
}

function renderHistory(d) {
  fill($("history").tBodies[0], d.history.slice().reverse().map((v) => {
    const c = v.changes || {};
    const bits = [];
    for (const k of ["pes_added", "pes_removed", "pes_changed", "pes_rescaled"]) {
      if ((c[k] || []).length) bits.push(`${k.slice(4)}: ${c[k].join(", ")}`);
    }
    if ((c.pes_renamed || []).length) bits.push(`renamed: ${c.pes_renamed.map((p) => p.join("\u2192")).join(", ")}`);
    const action = v.action + (v.rolled_back_to ? ` to v${v.rolled_back_to}` : "");
    return el("tr", { class: "clickable" + (ui.mode === `v${v.version}` ? " selected" : ""), "data-version": v.version,
      onclick: () => showVersion(d.app, v.version) },
      el("td", {}, `v${v.version}` + (v.version === d.version ? " (running)" : "")), el("td", {}, action),
      el("td", {}, ago(v.created_unix)), el("td", {}, `${v.latency_ms.toFixed(1)} ms`),
      el("td", {}, bits.join("; ") || "\u2014"));
  }));
}

async function showVersion(app, version) {
  if (version <= 1) { ui.mode = "last"; ui.versionDiff = null; render(); return; }
  try {
    ui.versionDiff = await getJSON(`/api/apps/${encodeURIComponent(app)}/diff?from=${version - 1}&to=${version}`);
    ui.mode = `v${version}`;
  } catch (e) { console.error(e); }
  render();
}

function modeButton(key, label) {
  return el("button", { class: ui.mode === key ? "active" : "", "data-mode": key,
    onclick: () => { ui.mode = key; render(); } }, label);
}

function renderApp(d) {
  $("app-section").hidden = false;
  $("app-name").textContent = d.app;
  $("app-version").textContent = `v${d.version}`;
  $("app-state").textContent = d.state;
  // A new dry run shows itself; a preview that went (the app moved on) falls back.
  if (d.preview && ui.previewSeen[d.app] !== d.preview.created) {
    ui.previewSeen[d.app] = d.preview.created;
    ui.mode = "preview";
  }
  if (ui.mode === "preview" && !d.preview) ui.mode = "last";
  if (ui.mode.startsWith("v") && (!ui.versionDiff || ui.versionDiff.app !== d.app)) ui.mode = "last";
  const modes = [modeButton("last", d.diff.from_version ? `last upgrade v${d.diff.from_version} \u2192 v${d.version}` : `v${d.version}`)];
  if (d.preview) modes.push(modeButton("preview", `preview (dry run) v${d.preview.from_version} \u2192 v${d.preview.to_version}`));
  if (ui.mode.startsWith("v")) modes.push(modeButton(ui.mode, `v${ui.versionDiff.from_version} \u2192 v${ui.versionDiff.to_version}`));
  $("modes").replaceChildren(...modes);
  let view, title, plan, preview = false;
  if (ui.mode === "preview") {
    view = d.preview; preview = true;
    title = `PREVIEW of a dry run (not applied): version ${view.from_version} \u2192 ${view.to_version}` +
      (view.state_check ? ` \u00b7 ${view.state_check}` : "");
    plan = planBlock(view.plan);
  } else if (ui.mode.startsWith("v")) {
    view = ui.versionDiff;
    title = `version ${view.from_version} \u2192 ${view.to_version}`;
    const rec = d.history.find((h) => h.version === view.to_version);
    plan = planCounts(rec && rec.changes && rec.changes.plan);
  } else {
    view = d.diff;
    title = view.from_version ? `running version ${d.version}; last upgrade version ${view.from_version} \u2192 ${view.to_version}`
      : `running version ${d.version}`;
    const p = d.progress;
    plan = p && p.version === d.version && p.action !== "placement" ? planBlock(p.plan) : planCounts(d.plan);
  }
  $("mode-title").textContent = title;
  $("mode-title").className = "mode-title" + (preview ? " preview" : "");
  $("mode-title").dataset.mode = preview ? "preview" : ui.mode;
  document.querySelector(".graph-wrap").className = "graph-wrap" + (preview ? " preview" : "");
  drawGraph(view.graph, d.pes, preview);
  const lines = view.change_lines || [];
  $("changes").replaceChildren(...(lines.length ? lines.map((l) => el("li", {}, l)) : [el("li", { class: "muted" }, "no change")]));
  $("plan").replaceChildren(...plan);
  renderProgress(d.progress);
  renderHistory(d);
}

function render() {
  const s = ui.snap;
  if (!s) return;
  renderApps(s.apps);
  renderWorkers(s.workers);
  if (ui.app && !s.details[ui.app]) ui.app = s.apps.length ? s.apps[0].app : "";
  if (ui.app) renderApp(s.details[ui.app]); else $("app-section").hidden = true;
}

// ---------------------------------------------------------------- start
async function start() {
  try {
    const [apps, workers] = await Promise.all([getJSON("/api/apps"), getJSON("/api/workers")]);
    const details = {};
    for (const a of apps.apps) details[a.app] = await getJSON(`/api/apps/${encodeURIComponent(a.app)}`);
    ui.snap = { apps: apps.apps, workers: workers.workers, details };
    render();
  } catch (e) { console.error(e); }
  const live = $("live");
  const es = new EventSource("/events");
  es.addEventListener("state", (ev) => {
    ui.snap = JSON.parse(ev.data);
    live.textContent = "live"; live.className = "live";
    render();
  });
  es.onerror = () => { live.textContent = "reconnecting"; live.className = "live off"; };
}

start();
