// The Playground: one prompt against up to MAX_COLUMNS models (the base, adapters, mixtures), every column's
// request sent in the same tick so they share the engine's batches, each streamed into its own column.
import { $, errorOf, headers, keys, state } from "./common.js";

const MAX_COLUMNS = 5; // the base model and up to 4 adapters or mixtures

export function addColumnSpec(value) {
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

export function runPlayground(event) {
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

export function stopRuns() {
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
