// Batches: every tenant's on the Batches page, one tenant's on its page; cancel either.

import {
  $, api, badge, confirmAction, el, fill, guarded, head, number, row, show, time,
} from "./lib.js";

const CANCELLABLE = new Set(["validating", "in_progress"]);
const PAGE = 20;

function progress(batch) {
  const { total, completed, failed } = batch.request_counts;
  const done = completed + failed;
  return el("div", { className: "progress" },
    el("progress", { max: Math.max(total, 1), value: done, ariaLabel: `${done} of ${total}` }),
    el("span", {}, `${number(done)} / ${number(total)}` + (failed ? ` (${number(failed)} failed)` : "")));
}

export const BATCH_HEADINGS = ["Batch", "Created", "Endpoint", "Status", "Progress", "Actions"];

// One table row; `tenantLink` adds the tenant's column (Batches page); `after` runs once a
// cancel went through, to redraw the table it is in.
export function batchRow(batch, errorId, after, tenantLink = null) {
  const cancel = CANCELLABLE.has(batch.status) ? el("button", {
    type: "button", className: "danger small", ariaLabel: `Cancel batch ${batch.id}`,
    onclick: async () => {
      const sure = await confirmAction(
        `Cancel batch ${batch.id}? Lines not yet run are not run; finished ones are kept.`,
        "Cancel batch");
      if (!sure) return;
      const done = await guarded(errorId, () =>
        api("POST", `/admin/api/batches/${encodeURIComponent(batch.id)}/cancel`));
      if (done) await after();
    },
  }, "Cancel") : "";
  const cells = [
    el("code", {}, batch.id),
    time(batch.created_at),
    batch.endpoint,
    badge(batch.status),
    progress(batch),
    cancel,
  ];
  if (tenantLink) cells.splice(1, 0, tenantLink);
  const tr = row(...cells);
  tr.dataset.batchId = batch.id;
  return tr;
}

// --- the Batches page -----------------------------------------------------------------------

let loaded = [];
let lastId = null;

function query(after) {
  const params = new URLSearchParams({ limit: String(PAGE) });
  if ($("batches-tenant").value) params.set("tenant", $("batches-tenant").value);
  if ($("batches-status").value) params.set("status", $("batches-status").value);
  if (after) params.set("after", after);
  return `/admin/api/batches?${params}`;
}

function draw() {
  fill("batches-body", loaded.map((batch) => batchRow(batch, "batches-error", renderBatches,
    el("a", { href: `#tenant/${encodeURIComponent(batch.tenant_id)}` },
      batch.tenant ?? batch.tenant_id))), "No batches match.");
}

export async function renderBatches() {
  head("batches-head", ["Batch", "Tenant", ...BATCH_HEADINGS.slice(1)]);
  await guarded("batches-error", async () => {
    const [{ data: tenants }, page] = await Promise.all([
      api("GET", "/admin/api/tenants"), api("GET", query(null)),
    ]);
    const select = $("batches-tenant");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "" }, "All tenants"),
      ...tenants.map((t) => el("option", { value: t.id }, t.name)));
    select.value = tenants.some((t) => t.id === chosen) ? chosen : "";
    loaded = page.data;
    lastId = page.last_id;
    $("batches-more").hidden = !page.has_more;
    draw();
  });
}

async function more() {
  await guarded("batches-error", async () => {
    const page = await api("GET", query(lastId));
    loaded = loaded.concat(page.data);
    lastId = page.last_id;
    $("batches-more").hidden = !page.has_more;
    draw();
  });
}

export function bindBatches() {
  $("batches-tenant").addEventListener("change", renderBatches);
  $("batches-status").addEventListener("change", renderBatches);
  $("batches-more").addEventListener("click", more);
  $("batches-filter").addEventListener("submit", (event) => event.preventDefault());
  show("batches-error", "");
}
