// The Engine page: load, requests per tenant, the last minutes, KV and adapter cache tiers,
// and which tenant's adapter sits in which device slot. Polled while the page is open.

import { legend, lines } from "./chart.js";
import { $, api, bytes, compact, el, fill, guarded, head, number, row, utc } from "./lib.js";

const card = (label, value, id) => el("div", { className: "card" },
  el("dt", {}, label), el("dd", id ? { id } : {}, value));

const percent = (fraction) => `${number(fraction * 100, 1)} %`;

function loadCards(engine) {
  const s = engine.stats;
  $("engine-stats").replaceChildren(
    card("Base model", engine.base_model_id, "stat-base_model_id"),
    card("Running requests", number(s.num_running), "stat-num_running"),
    card("Waiting requests", number(s.num_waiting), "stat-num_waiting"),
    card("Generated tokens / s", number(s.generation_tokens_per_s, 1),
      "stat-generation_tokens_per_s"),
    card("Prompt tokens / s", number(s.prompt_tokens_per_s, 1), "stat-prompt_tokens_per_s"),
    card("Finished requests", number(s.num_finished_total), "stat-num_finished_total"),
    card("Tokens generated", number(s.num_generation_tokens_total),
      "stat-num_generation_tokens_total"),
    card("Context length", `${number(engine.max_model_len)} tokens`, "stat-max_model_len"),
  );
}

function kvCards(s) {
  const hits = s.prefix_cache_queries_tokens_total
    ? s.prefix_cache_hits_tokens_total / s.prefix_cache_queries_tokens_total : 0;
  const bytesPerBlock = s.kv_blocks_total ? s.kv_cache_bytes / s.kv_blocks_total : 0;
  $("kv-stats").replaceChildren(
    card("In use", percent(s.kv_cache_usage), "stat-kv_cache_usage"),
    card("Memory", `${bytes(s.kv_blocks_used * bytesPerBlock)} of ${bytes(s.kv_cache_bytes)}`,
      "stat-kv_cache_bytes"),
    card("Blocks", `${number(s.kv_blocks_used)} of ${number(s.kv_blocks_total)}`),
    card("Block size", `${number(s.kv_block_size)} tokens`),
    card("Tokens held", `${number(s.kv_tokens_stored)} of ${number(s.kv_cache_tokens_total)}`),
    card("Prefix cache hits", percent(hits), "stat-prefix_hits"),
    card("Preemptions", number(s.num_preemptions_total)),
  );
}

function tiers(engine) {
  head("tiers-head", ["Tier", "Holds", "Hits", "Misses", "Loads", "Evictions", "Load time"]);
  const t = engine.adapter_cache_tiers;
  const loadTime = (tier) => (tier.loads
    ? `${number((tier.load_seconds / tier.loads) * 1000, 1)} ms avg` : "");
  const device = t.device;
  const rows = [
    row("Device slots",
      `${number(device.resident ?? 0)} of ${number(device.num_slots ?? 0)} slots` +
      ` (${number(device.pinned ?? 0)} pinned)`,
      number(device.hits), number(device.misses), number(device.loads),
      number(device.evictions), loadTime(device)),
    ...["host", "disk"].map((name) => {
      const tier = t[name];
      return row(name === "host" ? "Host memory" : "Local disk",
        `${bytes(tier.bytes ?? 0)} of ${bytes(tier.budget_bytes ?? 0)}`,
        number(tier.hits), number(tier.misses), number(tier.loads), number(tier.evictions),
        loadTime(tier));
    }),
  ];
  fill("tiers-body", engine.adapter_cache_tiers.device.num_slots == null ? [] : rows,
    "This engine serves no adapters.");
}

function resident(engine) {
  head("resident-head", ["Slot", "Tenant", "Adapter", "In use"]);
  fill("resident-body", engine.resident_adapters.map((r) => row(
    number(r.slot),
    r.tenant == null ? r.tenant_id : el("a", { href: `#tenant/${encodeURIComponent(r.tenant_id)}` },
      r.tenant),
    r.adapter == null ? r.adapter_version_id : `${r.adapter} v${r.version}`,
    r.pinned ? "yes (pinned)" : "no",
  )), "No adapter is resident.");
}

function perTenant(engine) {
  fill("engine-tenants-body", engine.tenants.map((t) => row(
    t.tenant == null ? t.tenant_id || "(none)"
      : el("a", { href: `#tenant/${encodeURIComponent(t.tenant_id)}` }, t.tenant),
    number(t.num_running), number(t.num_waiting),
  )), "No request is running or waiting.");
}

function recent(engine) {
  const buckets = engine.recent.buckets;
  const labels = buckets.map((b) => utc(b.start).slice(11, 16));
  $("throughput-chart").replaceChildren(
    lines("Generated tokens per second, per minute, UTC", labels,
      [{ name: "tokens / s", values: buckets.map((b) => b.completion_tokens_per_s) }],
      (v) => number(v, 1)),
    legend(["generated tokens / s"], ["minutes in UTC"]),
  );
  $("latency-chart").replaceChildren(
    lines("Request latency per minute, p50 and p95, UTC", labels, [
      { name: "p50", values: buckets.map((b) => b.latency_p50_ms) },
      { name: "p95", values: buckets.map((b) => b.latency_p95_ms) },
    ], (v) => `${number(v)} ms`, (v) => `${compact(v)} ms`),
    legend(["p50", "p95"], [`${number(buckets.reduce((n, b) => n + b.num_requests, 0))} requests`]),
  );
}

export async function refreshEngine() {
  await guarded("engine-error", async () => {
    const engine = await api("GET", "/admin/api/engine");
    loadCards(engine);
    perTenant(engine);
    recent(engine);
    kvCards(engine.stats);
    tiers(engine);
    resident(engine);
    $("engine-updated").textContent = `Updated ${utc(engine.updated_at)}.`;
  });
}
