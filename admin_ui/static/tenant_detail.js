// One tenant's page, below its name: usage per day (chart and table), its statement, its
// adapters with every version, its batches. Quotas, status and keys are in tenants.js.

import { BATCH_HEADINGS, batchRow } from "./batches.js";
import { legend, pairedStackedBars } from "./chart.js";
import {
  $, api, badge, bytes, confirmAction, download, el, fill, guarded, head, number, row, show,
  time, usd,
} from "./lib.js";

const BASE = "base model";

function tenantId() {
  return $("tenant").dataset.tenantId;
}

function isoDay(d) {
  return d.toISOString().slice(0, 10);
}

function period() {
  const today = new Date();
  const end = isoDay(today);
  const choice = $("usage-range").value;
  if (choice === "month") return [`${end.slice(0, 8)}01`, end];
  const start = new Date(today.getTime() - (Number(choice) - 1) * 86_400_000);
  return [isoDay(start), end];
}

function days(start, end) {
  const out = [];
  for (let t = Date.parse(`${start}T00:00:00Z`); t <= Date.parse(`${end}T00:00:00Z`);
    t += 86_400_000) out.push(isoDay(new Date(t)));
  return out;
}

const seriesName = (r) => (r.adapter == null ? BASE : `${r.adapter} v${r.adapter_version}`);

async function renderUsage(id) {
  head("usage-head", ["Adapter", "Requests", "Tokens in", "Tokens out", "Cost"]);
  const [start, end] = period();
  const params = new URLSearchParams({ tenant: id, start_date: start, end_date: end, limit: "10000" });
  const usage = await api("GET", `/admin/api/usage?${params}`);
  const names = [];
  const values = new Map();
  const totals = new Map();
  for (const r of usage.data) {
    const name = seriesName(r);
    if (!values.has(name)) {
      names.push(name);
      values.set(name, new Map());
      totals.set(name, { requests: 0, in: 0, out: 0, cost: 0 });
    }
    values.get(name).set(r.date, { in: r.prompt_tokens, out: r.completion_tokens });
    const total = totals.get(name);
    total.requests += r.num_requests;
    total.in += r.prompt_tokens;
    total.out += r.completion_tokens;
    total.cost += r.cost_micro_usd;
  }
  names.sort((a, b) => (a === BASE ? -1 : b === BASE ? 1 : a.localeCompare(b)));
  const chart = pairedStackedBars(
    `Tokens per day from ${start} to ${end}, in and out, per adapter`,
    days(start, end), (day) => day.slice(5), names, values);
  $("usage-chart").replaceChildren(chart,
    legend(names, ["left bar: tokens in", "right bar (lighter): tokens out", "days in UTC"]));
  const microUsd = (micro) => usd((micro / 1e6).toFixed(6));
  fill("usage-body", names.map((name) => {
    const t = totals.get(name);
    return row(name, number(t.requests), number(t.in), number(t.out), microUsd(t.cost));
  }), "No requests in this period.");
  $("usage-total").textContent =
    `${number(usage.totals.num_requests)} requests, ${usd(usage.totals.cost_usd)} in this period`;
}

// "model.layers.3.self_attn.q_proj", ... as "q_proj, v_proj in 4 layers"; all in a tooltip.
function targets(modules) {
  const kinds = [...new Set(modules.map((name) => name.split(".").pop()))];
  const layers = new Set(modules.map((name) => /\.layers\.(\d+)\./.exec(name)?.[1])
    .filter((n) => n != null));
  const text = layers.size
    ? `${kinds.join(", ")} in ${layers.size} layer${layers.size === 1 ? "" : "s"}`
    : kinds.join(", ");
  return el("span", { title: modules.join("\n") }, text);
}

async function deleteAdapter(id, adapter) {
  const sure = await confirmAction(
    `Delete adapter "${adapter.name}" with its ${adapter.versions.length} version(s)? ` +
    "Requests naming it fail at once. This cannot be undone.", "Delete adapter");
  if (!sure) return;
  const done = await guarded("tenant-error", async () => {
    await api("DELETE",
      `/admin/api/tenants/${encodeURIComponent(id)}/adapters/${encodeURIComponent(adapter.name)}`);
    await renderAdapters(id);
    return true;
  });
  if (done) show("tenant-notice", `Adapter ${adapter.name} deleted.`);
}

async function renderAdapters(id) {
  head("adapters-head", ["Adapter", "Version", "Status", "Reason", "Size", "Rank", "Targets",
    "Created", "Last used", "Actions"]);
  const { data } = await api("GET", `/admin/api/tenants/${encodeURIComponent(id)}/adapters`);
  const rows = [];
  for (const adapter of data) {
    const newest = [...adapter.versions].reverse();
    newest.forEach((v, i) => {
      const tr = row(
        adapter.name,
        `v${v.version}`,
        badge(v.status),
        v.reason ?? "",
        el("span", { className: "nowrap" }, bytes(v.size_bytes)),
        `${v.rank} (alpha ${Math.abs(v.alpha) < 1e6 ? number(v.alpha, 2) : v.alpha.toExponential(2)})`,
        targets(v.target_modules),
        time(v.created_at),
        v.last_used_at == null ? "never" : time(v.last_used_at),
        i === 0 ? el("button", {
          type: "button", className: "danger small", ariaLabel: `Delete adapter ${adapter.name}`,
          onclick: () => deleteAdapter(id, adapter),
        }, "Delete") : "",
      );
      tr.dataset.adapter = adapter.name;
      rows.push(tr);
    });
  }
  fill("adapters-body", rows, "No adapters.");
}

async function renderTenantBatches(id) {
  head("tenant-batches-head", BATCH_HEADINGS);
  const { data } = await api("GET",
    `/admin/api/batches?tenant=${encodeURIComponent(id)}&limit=20`);
  fill("tenant-batches-body",
    data.map((batch) => batchRow(batch, "tenant-error", () => renderTenantBatches(id))),
    "No batches.");
}

export async function renderDetail(id) {
  await Promise.all([renderUsage(id), renderAdapters(id), renderTenantBatches(id)]);
}

async function saveStatement(event) {
  event.preventDefault();
  const id = tenantId();
  const month = $("statement-month").value;
  const name = $("tenant-title").textContent;
  const done = await guarded("tenant-error", () => download(
    `/admin/api/tenants/${encodeURIComponent(id)}/statement?month=${encodeURIComponent(month)}`,
    `statement-${name}-${month}.csv`));
  if (done) show("tenant-notice", `Statement for ${month} downloaded.`);
}

export function bindDetail() {
  $("usage-range").addEventListener("change",
    () => guarded("tenant-error", () => renderUsage(tenantId())));
  $("usage-form").addEventListener("submit", (event) => event.preventDefault());
  $("statement-form").addEventListener("submit", saveStatement);
}
