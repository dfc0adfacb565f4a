// swapserve console: three pages over the server's own JSON routes; no framework, no build step, nothing
// loaded from elsewhere. Keys live in sessionStorage (this tab only) and go out as Authorization headers.
"use strict";

const POLL_MS = 2000;
const HISTORY = 150; // chart points (5 minutes at POLL_MS)
const MAX_COLUMNS = 5; // the base model and up to 4 adapters or mixtures
const $ = (id) => document.getElementById(id);
const state = { model: null, page: null, adapters: [], history: [], runs: [], timers: [] };

// ---- keys and requests ----------------------------------------------------------------------------------
const keys = {
  get api() { return sessionStorage.getItem("swapserve.apiKey") || ""; },
  set api(v) { v ? sessionStorage.setItem("swapserve.apiKey", v) : sessionStorage.removeItem("swapserve.apiKey"); },
  get admin() { return sessionStorage.getItem("swapserve.adminKey") || ""; },
  set admin(v) { v ? sessionStorage.setItem("swapserve.adminKey", v) : sessionStorage.removeItem("swapserve.adminKey"); },
};

function headers(key, json) {
  const h = {};
  if (key) h.Authorization = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorOf(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || body.message || body.detail || message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new HttpError(response.status, message);
}

async function api(path, options = {}) {
  const key = options.admin ? (keys.admin || keys.api) : keys.api;
  const response = await fetch(path, {
    method: options.method || "GET", headers: headers(key, options.body !== undefined),
    body: options.body === undefined ? undefined : JSON.stringify(options.body), signal: options.signal,
  });
  if (!response.ok) throw await errorOf(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// ---- start, sign-in, navigation ------------------------------------------------------------------------
async function boot() {
  const config = await api("/console/config");
  $("boot").hidden = true;
  if (config.api_key_required && !keys.api) return showLogin("");
  try {
    const stats = await api("/v1/stats");
    enter(stats);
  } catch (e) {
    if (e.status === 401) { keys.api = ""; return showLogin("That key was refused."); }
    $("boot").hidden = false;
    $("boot").textContent = "The server did not answer: " + e.message;
    if (e.status === 503) setTimeout(boot, POLL_MS);  // the model is still loading: try again
  }
}

function showLogin(message) {
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  keys.api = $("login-key").value.trim();
  $("login-key").value = "";
  $("login").hidden = true;
  try {
    enter(await api("/v1/stats"));
  } catch (e) {
    keys.api = "";
    showLogin(e.status === 401 ? "That key was refused." : e.message);
  }
}

function enter(stats) {
  state.model = stats.model;
  $("model-name").textContent = "base model: " + stats.model;
  $("nav").hidden = false;
  $("sign-out").hidden = !keys.api;
  recordStats(stats);
  showAdminKeyState();
  addColumnSpec(stats.model);
  while ($("column-specs").children.length < 3) addColumnSpec("");
  state.timers.push(setInterval(pollStats, POLL_MS), setInterval(pollAdapters, POLL_MS));
  pollAdapters();
  window.addEventListener("hashchange", route);
  route();
}

function signOut() {
  keys.api = ""; keys.admin = "";
  location.hash = "";
  location.reload();
}

function route() {
  const page = (location.hash || "#adapters").slice(1);
  const known = ["adapters", "playground", "server"].includes(page) ? page : "adapters";
  for (const name of ["adapters", "playground", "server"]) $("page-" + name).hidden = name !== known;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === known) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  state.page = known;
  if (known === "server") drawCharts();
}

// ---- Adapters page -----------------------------------------------------------------------------------------
function formatBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function show(value) {
  if (value === null || value === undefined) return "";
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function tierOf(a) { return a.tier || (a.error ? "failed" : ""); }

async function pollAdapters() {
  try {
    const body = await api("/v1/stats/adapters");
    state.adapters = body.data;
    renderAdapters();
    $("adapter-names").replaceChildren(...[state.model, ...state.adapters.filter((a) => !a.error).map((a) => a.name)]
      .map((name) => Object.assign(document.createElement("option"), { value: name })));
  } catch (e) {
    $("admin-status").textContent = "Could not list adapters: " + e.message;
  }
}

const COLUMNS = [
  ["name", (a) => a.name],
  ["tier", null],
  ["type", (a) => show(a.type)],
  ["rank", (a) => show(a.rank), "num"],
  ["targets", (a) => show(a.target_modules), "targets"],
  ["size", (a) => formatBytes(a.size_bytes), "num"],
  ["version", (a) => show(a.version), "num"],
  ["pinned", (a) => (a.registered ? (a.pinned ? "yes" : "no") : "")],
  ["in_flight", (a) => show(a.in_flight), "num"],
  ["requests", (a) => show(a.requests), "num"],
  ["tokens", (a) => show(a.tokens_served), "num"],
  ["actions", null],
];

function renderAdapters() {
  const tbody = document.querySelector("#adapters-table tbody");
  const rows = new Map([...tbody.children].map((tr) => [tr.dataset.name, tr]));
  state.adapters.forEach((a, index) => {
    let tr = rows.get(a.name);
    if (!tr) tr = newAdapterRow(a.name);
    rows.delete(a.name);
    updateAdapterRow(tr, a);
    if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
  });
  for (const tr of rows.values()) tr.remove();
}

function newAdapterRow(name) {
  const tr = document.createElement("tr");
  tr.dataset.name = name;
  for (const [field, , cls] of COLUMNS) {
    const td = document.createElement(field === "name" ? "th" : "td");
    if (field === "name") td.scope = "row";
    td.dataset.field = field;
    if (cls) td.className = cls;
    tr.append(td);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  tr.querySelector('[data-field="actions"]').append(actions);
  const tier = document.createElement("span");
  tr.querySelector('[data-field="tier"]').append(tier);
  return tr;
}

function updateAdapterRow(tr, a) {
  for (const [field, render] of COLUMNS) {
    if (render) setText(tr.querySelector(`[data-field="${field}"]`), render(a));
  }
  const tier = tr.querySelector('[data-field="tier"] span');
  setText(tier, tierOf(a));
  tier.className = "tier tier-" + tierOf(a);
  tier.title = a.error || "";
  const wanted = !a.registered ? (a.error && !a.tier ? [] : ["load"]) : [a.pinned ? "unpin" : "pin", "unload"];
  const actions = tr.querySelector(".actions");
  const have = [...actions.children].map((b) => b.dataset.action);
  if (have.join() !== wanted.join()) {
    const focused = actions.contains(document.activeElement) ? document.activeElement.dataset.action : null;
    actions.replaceChildren(...wanted.map((action) => actionButton(action, a.name)));
    if (focused) (actions.querySelector(`[data-action="${focused}"]`) || actions.firstElementChild || $("load-name")).focus();
  }
}

function setText(el, text) { if (el.textContent !== text) el.textContent = text; }

function actionButton(action, name) {
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.action = action;
  button.textContent = action[0].toUpperCase() + action.slice(1);
  button.setAttribute("aria-label", `${button.textContent} ${name}`);
  button.addEventListener("click", () => adminAction(action, name));
  return button;
}

async function adminAction(action, name) {
  const status = $("admin-status");
  status.className = "";
  status.textContent = `${action} ${name}…`;
  try {
    if (action === "load") {
      await api("/v1/adapters", { method: "POST", admin: true, body: { name, source: name } });
    } else if (action === "unload") {
      await api("/v1/adapters/" + encodeURIComponent(name), { method: "DELETE", admin: true });
    } else {  // pin / unpin: re-register under the same name and source with the new pinned flag
      const info = await api("/v1/adapters/" + encodeURIComponent(name), { admin: true });
      await api("/v1/adapters", { method: "POST", admin: true,
        body: { name, source: info.source, pinned: action === "pin", replace: true } });
    }
    status.className = "ok";
    status.textContent = `${action} ${name}: done`;
  } catch (e) {
    status.className = "error";
    status.textContent = `${action} ${name} refused (${e.status || "network"}): ${e.message}`;
  }
  pollAdapters();
}

async function loadFromForm(event) {
  event.preventDefault();
  const name = $("load-name").value.trim();
  const status = $("admin-status");
  try {
    await api("/v1/adapters", { method: "POST", admin: true,
      body: { name, source: $("load-path").value.trim(), pinned: $("load-pinned").checked } });
    status.className = "ok";
    status.textContent = `load ${name}: done`;
  } catch (e) {
    status.className = "error";
    status.textContent = `load ${name} refused (${e.status || "network"}): ${e.message}`;
  }
  pollAdapters();
}

function saveAdminKey(event) {
  event.preventDefault();
  keys.admin = $("admin-key").value.trim();
  $("admin-key").value = "";
  showAdminKeyState();
}

function showAdminKeyState() {
  $("admin-key-state").textContent = keys.admin ? "admin key set for this tab" : "no admin key set";
}

// ---- Playground --------------------------------------------------------------------------------------------
function addColumnSpec(value) {
  const specs = $("column-specs");
  if (specs.children.length >= MAX_COLUMNS) return;
  const row = document.createElement("div");
  row.className = "column-spec";
  const input = document.createElement("input");
  input.id = "column-" + Math.random().toString(36).slice(2, 8);
  input.setAttribute("list", "adapter-names");
  input.value = value;
  input.placeholder = "adapter, or a*0.5 + b*0.5; empty: no column";
  const label = document.createElement("label");
  label.htmlFor = input.id;
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.addEventListener("click", () => { row.remove(); numberColumns(); });
  row.append(label, input, remove);
  specs.append(row);
  numberColumns();
}

function numberColumns() {
  [...$("column-specs").children].forEach((row, i) => {
    row.querySelector("label").textContent = `Column ${i + 1}`;
    row.querySelector("button").setAttribute("aria-label", `Remove column ${i + 1}`);
  });
  $("add-column").disabled = $("column-specs").children.length >= MAX_COLUMNS;
}

// "name" -> that model; "a*0.7 + b*-0.3" (or one "a*0.5") -> a mixture over the base model
function parseSpec(text) {
  const parts = text.split(/\s*\+\s*(?=[A-Za-z0-9])/).map((p) => p.trim()).filter(Boolean);
  if (parts.length === 1 && !parts[0].includes("*")) return { model: parts[0] };
  const adapters = parts.map((part) => {
    const m = part.match(/^(.+?)\s*\*\s*(-?[0-9.]+(?:e-?[0-9]+)?)$/);
    if (!m && part.includes("*")) throw new Error(`"${part}": write name*scale`);
    return m ? { name: m[1], scale: Number(m[2]) } : { name: part, scale: 1 };
  });
  return { model: state.model, adapters };
}

function requestFor(spec, mode, prompt, sampling) {
  const body = { ...spec, ...sampling, stream: true, stream_options: { include_usage: true } };
  if (mode === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return { path: mode === "chat" ? "/v1/chat/completions" : "/v1/completions", body };
}

function runPlayground(event) {
  event.preventDefault();
  stopRuns();
  const mode = document.querySelector('input[name="mode"]:checked').value;
  const prompt = $("prompt").value;
  const sampling = { max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
                     top_p: Number($("top-p").value) };
  if ($("seed").value !== "") sampling.seed = Number($("seed").value);
  const specs = [...$("column-specs").querySelectorAll("input")].map((i) => i.value.trim()).filter(Boolean);
  const container = $("columns");
  container.replaceChildren();
  // every column's request leaves in this same tick, so the engine batches them into the same steps
  state.runs = specs.map((text) => {
    const column = newColumn(text);
    container.append(column.el);
    const controller = new AbortController();
    let request;
    try { request = requestFor(parseSpec(text), mode, prompt, sampling); } catch (e) {
      column.fail(e.message); controller.finished = true; return controller;
    }
    streamInto(column, request, mode, controller);
    return controller;
  });
  $("stop").disabled = false;
}

function stopRuns() {
  for (const controller of state.runs) controller.abort();
  state.runs = [];
  $("stop").disabled = true;
}

function newColumn(title) {
  const el = document.createElement("article");
  el.className = "column";
  const h = document.createElement("h3");
  h.textContent = title;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = "waiting…";
  const out = document.createElement("pre");
  el.append(h, meta, out);
  el.dataset.state = "running";
  return {
    el, meta, out,
    fail(message) { el.dataset.state = "error"; meta.className = "meta error"; meta.textContent = message; },
  };
}

async function streamInto(column, request, mode, controller) {
  const sent = performance.now();
  let first = null, chunks = 0, usage = null;
  try {
    const response = await fetch(request.path, { method: "POST", headers: headers(keys.api, true),
      body: JSON.stringify(request.body), signal: controller.signal });
    if (!response.ok) throw await errorOf(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        const text = choice ? (mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "") : "";
        if (text) {
          if (first === null) first = performance.now();
          chunks++;
          column.out.textContent += text;
        }
        column.meta.textContent = columnMeta(sent, first, usage ? usage.completion_tokens : chunks, false);
      }
    }
    column.meta.textContent = columnMeta(sent, first, usage ? usage.completion_tokens : chunks, true);
    column.el.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") { column.el.dataset.state = "stopped"; column.meta.textContent += " (stopped)"; }
    else column.fail(e.message);
  }
  controller.finished = true;
  if (state.runs.every((c) => c.finished)) $("stop").disabled = true;
}

function columnMeta(sent, first, tokens, done) {
  if (first === null) return done ? "no text" : "waiting…";
  const now = performance.now();
  const rate = tokens > 1 && now > first ? ((tokens - 1) / ((now - first) / 1000)).toFixed(1) : "–";
  return `TTFT ${Math.round(first - sent)} ms · ${tokens} tokens · ${rate} tok/s${done ? "" : " …"}`;
}

// ---- Server page -------------------------------------------------------------------------------------------
async function pollStats() {
  try {
    recordStats(await api("/v1/stats"));
  } catch (_) { /* the next poll tries again; the charts keep their history */ }
}

function recordStats(stats) {
  state.history.push(stats);
  if (state.history.length > HISTORY) state.history.shift();
  renderFacts(stats);
  if (state.page === "server") drawCharts();
}

function renderFacts(s) {
  const e = s.engine || {};
  const pct = (v) => (v === null || v === undefined ? "" : (100 * v).toFixed(1) + " %");
  const facts = [
    ["model", s.model], ["device", `${show(e.device)} ${show(e.dtype)}`],
    ["KV cache", show(e.kv_cache)], ["KV in use", pct(s.kv_cache_usage)],
    ["adapter slots", `${s.slots_used} of ${show(s.max_loras)}`], ["adapters by tier", Object.entries(s.adapter_tiers || {}).map(([t, n]) => `${t} ${n}`).join(" · ")],
    ["requests running / waiting", `${s.num_running} / ${s.num_waiting}`],
    ["requests finished", show(s.totals && s.totals.requests)],
    ["tokens generated", show(s.totals && s.totals.generation_tokens)],
  ];
  $("server-facts").replaceChildren(...facts.flatMap(([k, v]) => [
    Object.assign(document.createElement("dt"), { textContent: k }),
    Object.assign(document.createElement("dd"), { textContent: v }),
  ]));
}

const PALETTE = ["#2458d6", "#d9822b", "#1f9e6e", "#b3261e"];
const ms = (v) => (v === null || v === undefined ? null : v * 1000);

function drawCharts() {
  const h = state.history;
  const w = (f) => h.map((s) => (s.window ? f(s.window) : null));
  drawChart("chart-throughput", [["generated", w((x) => x.generation_tokens_per_s)],
                                  ["prompt", w((x) => x.prompt_tokens_per_s)]]);
  drawChart("chart-ttft", ["p50", "p90", "p99"].map((p) => [p, w((x) => ms(x.ttft[p]))]));
  drawChart("chart-itl", ["p50", "p90", "p99"].map((p) => [p, w((x) => ms(x.itl[p]))]));
  drawChart("chart-requests", [["running", h.map((s) => s.num_running)], ["waiting", h.map((s) => s.num_waiting)]]);
  drawChart("chart-usage", [["KV cache", h.map((s) => (s.kv_cache_usage == null ? null : 100 * s.kv_cache_usage))],
                            ["slots", h.map((s) => (s.max_loras ? (100 * s.slots_used) / s.max_loras : null))]], 100);
}

function drawChart(id, series, fixedMax) {
  const canvas = $(id);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width) return;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  const values = series.flatMap(([, v]) => v).filter((v) => v !== null && v !== undefined);
  const max = fixedMax || niceMax(Math.max(1e-9, ...values));
  const left = 44, bottom = height - 18, top = 8, right = width - 8;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#5f6b7a";
  ctx.strokeStyle = "#d6dbe3";
  for (const frac of [0, 0.5, 1]) {
    const y = bottom - frac * (bottom - top);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
    ctx.fillText(formatTick(max * frac), 2, y + 4);
  }
  const step = (right - left) / (HISTORY - 1);
  const summary = [];
  series.forEach(([name, points], i) => {
    ctx.strokeStyle = ctx.fillStyle = PALETTE[i % PALETTE.length];
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    let pen = false;
    points.forEach((v, j) => {
      const x = right - (points.length - 1 - j) * step;
      if (v === null || v === undefined) { pen = false; return; }
      const y = bottom - (Math.min(v, max) / max) * (bottom - top);
      pen ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
    const last = points[points.length - 1];
    const label = `${name} ${last === null || last === undefined ? "–" : formatTick(last)}`;
    ctx.fillText(label, left + 6 + i * 110, height - 4);
    summary.push(label);
  });
  canvas.setAttribute("aria-label", summary.join(", "));
}

function niceMax(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  return [1, 2, 5, 10].map((m) => m * p).find((m) => m >= v);
}

function formatTick(v) {
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

// ---- wiring ------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("admin-key-form").addEventListener("submit", saveAdminKey);
  $("admin-key-forget").addEventListener("click", () => { keys.admin = ""; showAdminKeyState(); });
  $("load-form").addEventListener("submit", loadFromForm);
  $("play-form").addEventListener("submit", runPlayground);
  $("stop").addEventListener("click", stopRuns);
  $("add-column").addEventListener("click", () => addColumnSpec(""));
  window.addEventListener("resize", () => state.page === "server" && drawCharts());
  boot().catch((e) => { $("boot").textContent = "The console could not start: " + e.message; });
});
