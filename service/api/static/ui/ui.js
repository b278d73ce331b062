// optserve's dashboard: plain JavaScript and SVG, no dependencies, no build step.
// Everything it shows comes from the server's own HTTP API, with the key typed above
// (kept in this browser's localStorage). Routes the server may not have (a step history)
// are looked up in its OpenAPI document first, so the page asks only for what exists.
"use strict";

const COLORS = ["#2f6fdf", "#e0662b", "#2a9d5b", "#a04ad6", "#c9302c", "#8a6d1f"];
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let routes = null; // the paths of the server's OpenAPI document

function headers() {
  const key = localStorage.getItem("optserve.apiKey");
  const h = { Accept: "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  const body = await response.json();
  if (!response.ok) throw new Error(`${response.status} ${body.title || ""}: ${body.detail || ""}`);
  return body;
}

async function pages(path, key) {
  const all = [];
  let after = null;
  for (let i = 0; i < 100; i++) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    all.push(...page[key]);
    if (!page.next) break;
    after = page.next;
  }
  return all;
}

function status(text) { $("status").textContent = text; }

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function show(value) {
  return typeof value === "number" ? String(Number(value.toPrecision(6))) : JSON.stringify(value);
}

// -- plots ---------------------------------------------------------------------------------

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

/** A line (or bar) chart of series [{name, points: [[x, y], ...]}] into the element `id`. */
function plot(id, series, { bars = false, stepped = false } = {}) {
  const box = $(id);
  box.textContent = "";
  const W = 340, H = 200, L = 52, R = 10, T = 10, B = 34;
  const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-plot": id }, box);
  const pts = series.flatMap((s) => s.points);
  if (pts.length === 0) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "no data yet";
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (bars) { y0 = Math.min(0, y0); x0 -= 0.5; x1 += 0.5; }
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }, svg);
  el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }, svg);
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    el("text", { x: L - 4, y: sy(y) + 3, "text-anchor": "end" }, svg).textContent = show(y);
  }
  for (const x of [x0, x1]) {
    const label = bars ? x + (x === x0 ? 0.5 : -0.5) : x;
    el("text", { x: sx(x), y: H - B + 13, "text-anchor": "middle" }, svg).textContent = show(label);
  }
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const values = JSON.stringify(s.points.map((p) => p[1]));
    if (bars) {
      const g = el("g", { "data-series": s.name, "data-values": values, fill: color }, svg);
      const w = Math.max(2, ((W - L - R) / (x1 - x0)) * 0.7);
      for (const [x, y] of s.points) {
        el("rect", { x: sx(x) - w / 2, y: sy(y), width: w, height: sy(y0) - sy(y) }, g);
      }
    } else {
      let d = "";
      s.points.forEach(([x, y], k) => {
        if (k === 0) d += `M${sx(x)},${sy(y)}`;
        else if (stepped) d += `H${sx(x)}V${sy(y)}`;
        else d += `L${sx(x)},${sy(y)}`;
      });
      el("path", { d, fill: "none", stroke: color, "stroke-width": 1.8, "data-series": s.name, "data-values": values }, svg);
      if (s.points.length < 60) {
        for (const [x, y] of s.points) el("circle", { cx: sx(x), cy: sy(y), r: 2.2, fill: color }, svg);
      }
    }
    el("text", { x: L + 6 + i * 78, y: H - 6, fill: color }, svg).textContent = s.name;
  });
}

// -- one session ---------------------------------------------------------------------------

/** lr per group from the change log: each edit of `lr` at its step, then today's value. */
function lrFromChanges(doc, changes) {
  return doc.lr.map((current, g) => {
    const edits = changes.filter((c) => c.group === g && c.field === "lr");
    const points = edits.length ? [[0, edits[0].old]] : [[0, current]];
    for (const c of edits) points.push([c.step, c.new]);
    points.push([doc.step, current]);
    return { name: `group ${g}`, points };
  });
}

async function stepHistory(id) {
  if (!routes || !routes["/v1/sessions/{session_id}/steps"]) return null;
  const body = await pages(`/v1/sessions/${id}/steps`, "steps");
  return body;
}

function render(doc, changes) {
  $("detail").hidden = false;
  $("title").textContent = `session ${doc.id}`;
  const sched = doc.schedule ? `, schedule ${doc.schedule.name}` : "";
  const agg = doc.aggregation ? `, federated (${doc.aggregation.mode})` : "";
  $("summary").textContent =
    `${doc.optimizer.name}${sched}${agg}; step ${doc.step}; ${doc.dtype}; lr ${doc.lr.map(show).join(", ")}; health ${doc.health}`;
  const groups = $("groups");
  groups.textContent = "";
  const names = [...new Set(doc.param_groups.flatMap((g) => Object.keys(g)).filter((k) => k !== "params"))];
  const head = groups.createTHead().insertRow();
  for (const h of ["group", "tensors", ...names]) cell(head, h);
  const body = groups.createTBody();
  doc.param_groups.forEach((g, i) => {
    const row = body.insertRow();
    cell(row, String(i));
    cell(row, g.params.join(", "));
    for (const n of names) cell(row, n in g ? show(g[n]) : "");
  });
  const config = { optimizer: doc.optimizer, schedule: doc.schedule, clip_grad_norm: doc.clip_grad_norm,
    clip_grad_value: doc.clip_grad_value, aggregation: doc.aggregation, labels: doc.labels };
  $("config").textContent = JSON.stringify(config, null, 2);
  const log = $("changes").tBodies[0];
  log.textContent = "";
  for (const c of changes) {
    const row = log.insertRow();
    for (const v of [c.step, c.group, c.field, show(c.old), show(c.new), c.reason || ""]) cell(row, String(v));
  }
  if (changes.length === 0) cell(log.insertRow(), "no changes").colSpan = 6;
}

function renderHistory(doc, history, changes) {
  const note = $("lr-note");
  if (history) {
    const groups = doc.lr.length;
    const lr = [...Array(groups).keys()].map((g) => ({
      name: `group ${g}`, points: history.filter((h) => h.lr).map((h) => [h.step, h.lr[g]]) }));
    plot("plot-lr", lr);
    note.textContent = "from the step history";
    const metric = (name) => history
      .filter((h) => h.applied && h.metrics && typeof h.metrics[name] === "number")
      .map((h) => [h.step, h.metrics[name]]);
    const loss = metric("loss");
    const grad = metric("grad_norm");
    $("fig-loss").hidden = false; plot("plot-loss", [{ name: "loss", points: loss }]);
    $("fig-grad").hidden = false; plot("plot-grad", [{ name: "grad norm", points: grad }]);
  } else {
    plot("plot-lr", lrFromChanges(doc, changes), { stepped: true });
    note.textContent = "from the change log and the current lr" +
      (doc.schedule ? ` (between them the lr follows ${doc.schedule.name}); this server keeps no step history, so loss and grad norm are not shown` : "; this server keeps no step history, so loss and grad norm are not shown");
    $("fig-loss").hidden = true; $("fig-grad").hidden = true;
  }
}

async function renderRounds(doc) {
  const show = Boolean(doc.aggregation);
  $("fig-participation").hidden = !show; $("fig-norms").hidden = !show;
  if (!show) return;
  const rounds = await pages(`/v1/sessions/${doc.id}/rounds`, "rounds");
  const x = (r) => (r.round ?? r.version);
  plot("plot-participation", [{ name: "participants", points: rounds.map((r) => [x(r), r.participants.length]) }], { bars: true });
  const mean = rounds.map((r) => [x(r), r.participants.reduce((a, p) => a + p.update_norm, 0) / Math.max(1, r.participants.length)]);
  plot("plot-norms", [
    { name: "server step", points: rounds.map((r) => [x(r), r.pseudo_gradient_norm]) },
    { name: "mean client", points: mean },
  ]);
}

async function select(id) {
  for (const row of $("sessions").tBodies[0].rows) row.classList.toggle("selected", row.dataset.id === id);
  status(`loading ${id}`);
  try {
    const [doc, changes] = await Promise.all([api(`/v1/sessions/${id}`), pages(`/v1/sessions/${id}/changes`, "changes")]);
    render(doc, changes);
    renderHistory(doc, await stepHistory(id), changes);
    await renderRounds(doc);
    status(`session ${id} at step ${doc.step}`);
  } catch (error) {
    status(String(error.message || error));
  }
}

// -- the list ------------------------------------------------------------------------------

async function load() {
  status("loading");
  try {
    routes = routes || (await api("/openapi.json")).paths;
    const sessions = await pages("/v1/sessions", "sessions");
    const body = $("sessions").tBodies[0];
    body.textContent = "";
    for (const s of sessions) {
      const row = body.insertRow();
      row.dataset.id = s.id;
      cell(row, s.id, "id");
      cell(row, String(s.step));
      cell(row, s.optimizer.name + (s.aggregation ? " (federated)" : ""));
      cell(row, Object.entries(s.labels || {}).map(([k, v]) => `${k}=${v}`).join(" "));
      row.addEventListener("click", () => { location.hash = s.id; });
    }
    if (sessions.length === 0) cell(body.insertRow(), "no sessions").colSpan = 4;
    status(`${sessions.length} sessions`);
    const wanted = location.hash.slice(1);
    if (wanted) await select(wanted);
  } catch (error) {
    status(String(error.message || error));
  }
}

$("key").value = localStorage.getItem("optserve.apiKey") || "";
$("key").addEventListener("change", (e) => { localStorage.setItem("optserve.apiKey", e.target.value); load(); });
$("refresh").addEventListener("click", load);
window.addEventListener("hashchange", () => select(location.hash.slice(1)));
load();
