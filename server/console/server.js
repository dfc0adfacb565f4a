// The Server page: facts and small live charts (hand-drawn on canvas) from GET /v1/stats, polled every POLL_MS.
import { $, api, show, state } from "./common.js";

const HISTORY = 150; // chart points (5 minutes at POLL_MS)

export async function pollStats() {
  try {
    recordStats(await api("/v1/stats"));
  } catch (_) { /* the next poll tries again; the charts keep their history */ }
}

export function recordStats(stats) {
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

export function drawCharts() {
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
