// Shared by the console's pages: the DOM lookup, the page state, keys (sessionStorage: this tab only) and the
// request helper that sends them as Authorization headers.
export const POLL_MS = 2000;
export const $ = (id) => document.getElementById(id);
export const state = { model: null, page: null, adapters: [], history: [], runs: [], timers: [] };

export const keys = {
  get api() { return sessionStorage.getItem("swapserve.apiKey") || ""; },
  set api(v) { v ? sessionStorage.setItem("swapserve.apiKey", v) : sessionStorage.removeItem("swapserve.apiKey"); },
  get admin() { return sessionStorage.getItem("swapserve.adminKey") || ""; },
  set admin(v) { v ? sessionStorage.setItem("swapserve.adminKey", v) : sessionStorage.removeItem("swapserve.adminKey"); },
};

export function headers(key, json) {
  const h = {};
  if (key) h.Authorization = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

export class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function errorOf(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || body.message || body.detail || message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new HttpError(response.status, message);
}

export async function api(path, options = {}) {
  const key = options.admin ? (keys.admin || keys.api) : keys.api;
  const response = await fetch(path, {
    method: options.method || "GET", headers: headers(key, options.body !== undefined),
    body: options.body === undefined ? undefined : JSON.stringify(options.body), signal: options.signal,
  });
  if (!response.ok) throw await errorOf(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export function show(value) {
  if (value === null || value === undefined) return "";
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}
