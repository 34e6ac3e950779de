// Tenants: the list, one tenant's quotas and status, and its API keys.

import {
  $, api, badge, bytes, compact, confirmAction, el, fill, guarded, head, number, of, row, show,
  time, usd,
} from "./lib.js";
import * as detail from "./tenant_detail.js";

const TENANT_SCOPES = ["inference", "adapters:read", "adapters:write", "batches"];
const QUOTAS = [
  ["requests_per_minute", "Requests / min"],
  ["tokens_per_minute", "Tokens / min"],
  ["max_concurrent_requests", "Concurrent requests"],
  ["monthly_token_quota", "Monthly tokens"],
  ["max_adapters", "Adapters"],
  ["max_storage_bytes", "Storage", "Storage (bytes)"],
];

// --- tenants --------------------------------------------------------------------------------

function limits(t) {
  const rate = (value, unit) => (value == null ? null : `${compact(value)} ${unit}`);
  const parts = [
    rate(t.requests_per_minute, "req/min"),
    rate(t.tokens_per_minute, "tok/min"),
    rate(t.max_concurrent_requests, "concurrent"),
  ].filter(Boolean);
  return parts.length ? parts.join(", ") : "unlimited";
}

export async function renderTenants() {
  head("tenants-head", [
    "Name", "Status", "Adapters", "Storage", "Tokens this month", "Cost this month",
    "Rate limits", "Created",
  ]);
  await guarded("tenants-error", async () => {
    const { data } = await api("GET", "/admin/api/tenants");
    fill("tenants-body", data.map((t) => row(
      el("a", { href: `#tenant/${encodeURIComponent(t.id)}` }, t.name),
      badge(t.status),
      of(t.usage.adapters_used, t.max_adapters),
      of(t.usage.storage_used_bytes, t.max_storage_bytes, bytes),
      of(t.usage.this_month.total_tokens, t.monthly_token_quota, compact),
      usd(t.usage.this_month.cost_usd),
      limits(t),
      time(t.created_at),
    )), "No tenants yet.");
  });
}

async function createTenant(event) {
  event.preventDefault();
  const name = $("new-tenant-name").value.trim();
  const tenant = await guarded("tenants-error", () => api("POST", "/admin/api/tenants", { name }));
  if (tenant) {
    $("new-tenant-name").value = "";
    location.hash = `#tenant/${encodeURIComponent(tenant.id)}`;
  }
}

// --- one tenant: quotas, status, keys ------------------------------------------------------

function tenantPath(id) {
  return `/admin/api/tenants/${encodeURIComponent(id)}`;
}

// Forms keep nothing typed for one tenant when another is opened.
function resetForms() {
  $("key-create").reset();
  $("usage-form").reset();
  $("statement-form").reset();
  $("statement-month").value = new Date().toISOString().slice(0, 7);
  $("quota-form").replaceChildren();
  for (const id of ["tenant-summary", "usage-chart", "usage-body", "adapters-body",
    "tenant-batches-body", "keys-body"]) $(id).replaceChildren();
  $("usage-total").textContent = "";
}

export async function renderTenant(id) {
  dismissSecret();
  show("tenant-notice", "");
  if ($("tenant").dataset.tenantId !== id) {
    resetForms();
    $("tenant").dataset.tenantId = id;
  }
  await guarded("tenant-error", async () => {
    const tenant = await api("GET", tenantPath(id));
    fillTenant(tenant);
    await Promise.all([
      refreshSummary(tenant), renderKeys(tenant.id), detail.renderDetail(tenant.id),
    ]);
  });
}

async function refreshSummary(tenant) {
  const { data } = await api("GET", "/admin/api/tenants");
  const listed = data.find((t) => t.id === tenant.id);
  fillSummary(tenant, listed ? listed.usage : null);
}

function fillSummary(tenant, usage) {
  if (!usage) return;
  const card = (label, value, id) => el("div", { className: "card" },
    el("dt", {}, label), el("dd", id ? { id } : {}, value));
  const month = usage.this_month;
  $("tenant-summary").replaceChildren(
    card("Adapters", of(usage.adapters_used, tenant.max_adapters), "summary-adapters"),
    card("Storage", of(usage.storage_used_bytes, tenant.max_storage_bytes, bytes),
      "summary-storage"),
    card("Tokens this month", of(month.total_tokens, tenant.monthly_token_quota, compact),
      "summary-tokens"),
    card("Requests this month", number(month.num_requests)),
    card("Cost this month", usd(month.cost_usd), "summary-cost"),
  );
}

function fillTenant(tenant) {
  const section = $("tenant");
  section.dataset.tenantId = tenant.id;
  section.dataset.status = tenant.status;
  $("tenant-title").textContent = tenant.name;
  $("tenant-status").className = `badge ${tenant.status}`;
  $("tenant-status").textContent = tenant.status;
  $("quota-form").replaceChildren(
    ...QUOTAS.map(([field, label, formLabel]) => el("div", { className: "field" },
      el("label", { htmlFor: `quota-${field}` }, formLabel ?? label),
      el("input", {
        id: `quota-${field}`, name: field, type: "number", min: "0", step: "1",
        placeholder: "unlimited", defaultValue: tenant[field] == null ? "" : String(tenant[field]),
      }),
    )),
    el("div", { className: "field end" }, el("button", { type: "submit" }, "Save quotas")),
  );
  const suspended = tenant.status === "suspended";
  $("status-help").textContent = suspended
    ? "Suspended: every request with this tenant's keys is refused."
    : "Active: this tenant's keys may call the API.";
  const toggle = $("toggle-status");
  toggle.textContent = suspended ? "Reactivate tenant" : "Suspend tenant";
  toggle.className = suspended ? "" : "danger";
}

async function saveQuotas(event) {
  event.preventDefault();
  const id = $("tenant").dataset.tenantId;
  // Only what was edited, so the audit log records the change and nothing else.
  const changes = {};
  for (const [field] of QUOTAS) {
    const input = $(`quota-${field}`);
    const raw = input.value.trim();
    if (raw !== input.defaultValue) changes[field] = raw === "" ? null : Number(raw);
  }
  if (!Object.keys(changes).length) {
    show("tenant-notice", "No quota was changed.");
    return;
  }
  const tenant = await guarded("tenant-error", () => api("PATCH", tenantPath(id), changes));
  if (tenant) {
    fillTenant(tenant);
    show("tenant-notice", "Quotas saved.");
    await guarded("tenant-error", () => refreshSummary(tenant));
  }
}

async function toggleStatus() {
  const { tenantId: id, status: current } = $("tenant").dataset;
  const suspend = current === "active";
  const name = $("tenant-title").textContent;
  if (suspend && !(await confirmAction(
    `Suspend ${name}? All of its requests will be refused until it is reactivated.`, "Suspend",
  ))) return;
  const status = suspend ? "suspended" : "active";
  const tenant = await guarded("tenant-error", () => api("PATCH", tenantPath(id), { status }));
  if (tenant) {
    fillTenant(tenant);
    show("tenant-notice", suspend ? "Tenant suspended." : "Tenant reactivated.");
  }
}

async function renderKeys(id) {
  head("keys-head", ["Name", "Prefix", "Scopes", "Created", "Last used", "Status", "Actions"]);
  const { data } = await api("GET", `${tenantPath(id)}/keys`);
  fill("keys-body", data.map((key) => row(
    key.name,
    el("code", {}, key.prefix),
    key.scopes.join(", "),
    time(key.created_at),
    time(key.last_used_at),
    key.revoked_at ? badge("revoked") : badge("active"),
    key.revoked_at ? "" : el("button", {
      type: "button", className: "danger small", onclick: () => revokeKey(key),
      ariaLabel: `Revoke key ${key.name} (${key.prefix})`,
    }, "Revoke"),
  )), "No keys yet.");
}

async function createKey(event) {
  event.preventDefault();
  const id = $("tenant").dataset.tenantId;
  const scopes = [...document.querySelectorAll("#scope-boxes input:checked")].map((b) => b.value);
  const name = $("new-key-name").value.trim();
  const key = await guarded("tenant-error",
    () => api("POST", `${tenantPath(id)}/keys`, { name, scopes }));
  if (!key) return;
  $("secret-value").value = key.key;
  $("secret-copied").textContent = "";
  $("secret-panel").hidden = false;
  $("secret-value").select();
  await guarded("tenant-error", () => renderKeys(id));
}

async function copySecret() {
  const input = $("secret-value");
  try {
    await navigator.clipboard.writeText(input.value);
  } catch {
    input.select();
    document.execCommand("copy");
  }
  $("secret-copied").textContent = "Copied to the clipboard.";
}

export function dismissSecret() {
  $("secret-value").value = "";
  $("secret-panel").hidden = true;
}

async function revokeKey(key) {
  const sure = await confirmAction(
    `Revoke key "${key.name}" (${key.prefix})? Requests using it will fail at once. ` +
    "This cannot be undone.", "Revoke key");
  if (!sure) return;
  const id = $("tenant").dataset.tenantId;
  const done = await guarded("tenant-error", async () => {
    await api("DELETE", `/admin/api/keys/${encodeURIComponent(key.id)}`);
    await renderKeys(id);
    return true;
  });
  if (done) show("tenant-notice", `Key ${key.prefix} revoked.`);
}

export function bindTenants() {
  const scopeBox = (scope) => el("label", { className: "check" },
    el("input", {
      type: "checkbox", name: "scopes", value: scope, checked: true, defaultChecked: true,
    }), ` ${scope}`);
  $("scope-boxes").replaceChildren(...TENANT_SCOPES.map(scopeBox));
  $("tenant-create").addEventListener("submit", createTenant);
  $("quota-form").addEventListener("submit", saveQuotas);
  $("toggle-status").addEventListener("click", toggleStatus);
  $("key-create").addEventListener("submit", createKey);
  $("secret-copy").addEventListener("click", copySecret);
  $("secret-done").addEventListener("click", dismissSecret);
  detail.bindDetail();
}
