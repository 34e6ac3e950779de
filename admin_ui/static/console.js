// loramux admin console: plain DOM, no framework, no build step.

import * as batches from "./batches.js";
import { refreshEngine } from "./engine.js";
import { $, KEY_STORAGE, api, el, fill, guarded, head, row, show, time } from "./lib.js";
import * as prices from "./prices.js";
import * as tenants from "./tenants.js";

const ENGINE_REFRESH_MS = 3000;
const SECTIONS = ["login", "tenants", "tenant", "batches", "engine", "prices", "audit"];

let engineTimer = null;

// --- sign in --------------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("admin-key").value.trim());
  try {
    await api("GET", "/admin/api/tenants");
  } catch (error) {
    sessionStorage.removeItem(KEY_STORAGE);
    show("login-error", error.message);
    return;
  }
  $("admin-key").value = "";
  show("login-error", "");
  if (!location.hash || location.hash === "#login") location.hash = "#tenants";
  else route();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  tenants.dismissSecret();
  show("login-error", message || "");
  route();
}

// --- audit log ------------------------------------------------------------------------------

function details(values) {
  if (!values) return "";
  return Object.entries(values).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join(", ");
}

async function renderAudit() {
  head("audit-head", ["Time", "Actor", "Action", "Target", "Tenant", "Details"]);
  await guarded("audit-error", async () => {
    const [{ data }, tenants] = await Promise.all([
      api("GET", `/admin/api/audit?limit=${$("audit-limit").value}`),
      api("GET", "/admin/api/tenants"),
    ]);
    const names = new Map(tenants.data.map((t) => [t.id, t.name]));
    const tenantLink = (id) => id == null ? ""
      : el("a", { href: `#tenant/${encodeURIComponent(id)}` }, names.get(id) ?? id);
    fill("audit-body", data.map((entry) => row(
      time(entry.created_at),
      entry.actor,
      el("code", { className: "nowrap" }, entry.action),
      entry.target_type ? el("span", {}, `${entry.target_type} `,
        el("code", {}, entry.target_id ?? "")) : "",
      tenantLink(entry.tenant_id),
      details(entry.details),
    )), "No entries yet.");
  });
}

// --- routing: #tenants, #tenant/<id>, #engine, #audit ---------------------------------------

function route() {
  clearInterval(engineTimer);
  engineTimer = null;
  const signedIn = Boolean(sessionStorage.getItem(KEY_STORAGE));
  const [section, arg] = (location.hash.slice(1) || "tenants").split("/");
  let current = SECTIONS.includes(section) ? section : "tenants";
  if (!signedIn) current = "login";
  else if (current === "login") current = "tenants";
  for (const name of SECTIONS) $(name).hidden = name !== current;
  $("nav").hidden = $("sign-out").hidden = !signedIn;
  for (const link of $("nav").querySelectorAll("a")) {
    const target = current === "tenant" ? "tenants" : current;
    const active = link.hash === `#${target}`;
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (current === "login") $("admin-key").focus();
  if (current === "tenants") tenants.renderTenants();
  if (current === "tenant") tenants.renderTenant(decodeURIComponent(arg || ""));
  if (current === "batches") batches.renderBatches();
  if (current === "prices") prices.renderPrices();
  if (current === "audit") renderAudit();
  if (current === "engine") {
    refreshEngine();
    engineTimer = setInterval(refreshEngine, ENGINE_REFRESH_MS);
  }
}

function init() {
  tenants.bindTenants();
  batches.bindBatches();
  prices.bindPrices();
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  window.addEventListener("loramux:unauthorized", (event) => signOut(event.detail));
  $("audit-refresh").addEventListener("click", renderAudit);
  $("audit-limit").addEventListener("change", renderAudit);
  window.addEventListener("hashchange", route);
  route();
}

// Module scripts run after the document is parsed.
init();