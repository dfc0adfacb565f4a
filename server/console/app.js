// swapserve console: three pages over the server's own JSON routes; no framework, no build step, nothing
// loaded from elsewhere (ES modules from this server only). This module signs in, routes and wires the pages.
import { $, POLL_MS, api, keys, state } from "./common.js";
import { loadFromForm, pollAdapters, saveAdminKey, showAdminKeyState } from "./adapters.js";
import { addColumnSpec, runPlayground, stopRuns } from "./playground.js";
import { drawCharts, pollStats, recordStats } from "./server.js";

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
