// The Prices page: the operator's price table, edited in place (PUT /admin/api/prices).

import { $, api, el, guarded, show, utc } from "./lib.js";

let rowCount = 0;

function priceRow(model = "", input = "0", output = "0") {
  rowCount += 1;
  const n = rowCount;
  const input_ = (id, label, value, mode) => [
    el("label", { htmlFor: id, className: "visually-hidden" }, label),
    el("input", { id, value, inputMode: mode, required: true, spellcheck: false }),
  ];
  const tr = el("tr", { className: "price-row" },
    el("td", {}, ...input_(`price-model-${n}`, `Base model ${n}`, model, "text")),
    el("td", {}, ...input_(`price-in-${n}`, `Input price ${n}`, input, "decimal")),
    el("td", {}, ...input_(`price-out-${n}`, `Output price ${n}`, output, "decimal")),
    el("td", {}, el("button", {
      type: "button", className: "secondary small", ariaLabel: `Remove base model ${n}`,
      onclick: () => tr.remove(),
    }, "Remove")));
  const labels = ["Base model", "Input, per million tokens", "Output, per million tokens",
    "Actions"];
  [...tr.cells].forEach((cell, i) => { cell.dataset.label = labels[i]; });
  return tr;
}

function trimmed(value) {
  // "0.150000" reads better as "0.15"; the server keeps six places either way.
  return value.includes(".") ? value.replace(/0+$/, "").replace(/\.$/, "") : value;
}

function fillForm(table) {
  rowCount = 0;
  const models = Object.entries(table.models);
  $("price-rows").replaceChildren(...(models.length ? models : [["*", {
    input_per_million_tokens: "0", output_per_million_tokens: "0",
  }]]).map(([model, p]) => priceRow(model, trimmed(p.input_per_million_tokens),
    trimmed(p.output_per_million_tokens))));
  $("price-storage").value = trimmed(table.storage_per_gb_month);
  $("price-discount").value = trimmed(table.batch_discount_percent);
  $("prices-effective").textContent = table.effective_at == null
    ? "No prices set yet: all usage is free."
    : `In force since ${utc(table.effective_at)}, set by ${table.created_by}.`;
}

export async function renderPrices() {
  show("prices-notice", "");
  await guarded("prices-error", async () => fillForm(await api("GET", "/admin/api/prices")));
}

async function save(event) {
  event.preventDefault();
  const models = {};
  for (const tr of $("price-rows").querySelectorAll("tr")) {
    const [model, input, output] = [...tr.querySelectorAll("input")].map((i) => i.value.trim());
    models[model] = { input_per_million_tokens: input, output_per_million_tokens: output };
  }
  const body = {
    models,
    storage_per_gb_month: $("price-storage").value.trim(),
    batch_discount_percent: $("price-discount").value.trim(),
  };
  const table = await guarded("prices-error", () => api("PUT", "/admin/api/prices", body));
  if (table) {
    fillForm(table);
    show("prices-notice", "Prices saved.");
  }
}

export function bindPrices() {
  $("prices-form").addEventListener("submit", save);
  $("price-add").addEventListener("click", () => $("price-rows").append(priceRow()));
}
