// The Adapters page: every adapter the server knows, by tier, refreshed in place (rows keep their focus), and
// the admin actions (load, unload, pin, unpin) through the admin routes with the admin key.
import { $, api, keys, show, state } from "./common.js";

function formatBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function tierOf(a) { return a.tier || (a.error ? "failed" : ""); }

export async function pollAdapters() {
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

export async function loadFromForm(event) {
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

export function saveAdminKey(event) {
  event.preventDefault();
  keys.admin = $("admin-key").value.trim();
  $("admin-key").value = "";
  showAdminKeyState();
}

export function showAdminKeyState() {
  $("admin-key-state").textContent = keys.admin ? "admin key set for this tab" : "no admin key set";
}
