// Shared helpers of the admin console: DOM building, formatting, the API client, dialogs.
// API data only ever reaches the page through textContent and element properties.

export const KEY_STORAGE = "loramux.adminKey";

export const $ = (id) => document.getElementById(id);

// --- DOM and formatting helpers -------------------------------------------------------------

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "onclick") node.addEventListener("click", value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

export function row(...cells) {
  return el("tr", {}, ...cells.map((cell) => el("td", {}, cell)));
}

// SVG elements (charts are plain inline SVG built here: no library, nothing inline for the CSP).
const SVG_NS = "http://www.w3.org/2000/svg";
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

// Fills a table body with rows, or with one full-width line saying there is nothing yet.
// Each cell is labelled with its column's heading: narrow screens show tables as stacked
// label/value lines (console.css), never wider than their card.
export function fill(bodyId, rows, emptyText) {
  const body = $(bodyId);
  const headings = [...body.closest("table").tHead.rows[0].cells].map((cell) => cell.textContent);
  if (rows.length) {
    for (const tr of rows) {
      [...tr.cells].forEach((cell, i) => { cell.dataset.label = headings[i] ?? ""; });
    }
    body.replaceChildren(...rows);
    return;
  }
  body.replaceChildren(el("tr", {},
    el("td", { colSpan: headings.length, className: "empty" }, emptyText)));
}

export function head(id, names) {
  $(id).replaceChildren(...names.map((name) => el("th", { scope: "col" }, name)));
}

// Every time the console shows is UTC, written the same way.
export function utc(seconds) {
  return `${new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19)} UTC`;
}

export function time(seconds) {
  if (seconds == null) return "never";
  return el("time", { dateTime: new Date(seconds * 1000).toISOString() }, utc(seconds));
}

export function usd(value) {
  // value: the API's decimal string (six places); shown to the cent, or more when tiny.
  const n = Number(value ?? 0);
  if (n !== 0 && Math.abs(n) < 0.01) return `$${n.toFixed(6).replace(/0+$/, "")}`;
  return `$${n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
}

export function compact(value) {
  return Number(value ?? 0).toLocaleString("en-US", { notation: "compact", maximumFractionDigits: 1 });
}

export function of(used, limit, format = number) {
  return `${format(used)} / ${limit == null ? "unlimited" : format(limit)}`;
}

export function bytes(value) {
  if (value == null) return "unlimited";
  value = Number(value);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let n = value;
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) { n /= 1024; unit += 1; }
  return `${unit ? n.toFixed(1) : n} ${units[unit]}`;
}

export function number(value, digits = 0) {
  return Number(value ?? 0).toLocaleString("en-US", { maximumFractionDigits: digits });
}

export function badge(status) {
  return el("span", { className: `badge ${status}` }, status);
}

export function show(id, message) {
  const node = $(id);
  node.textContent = message || "";
  node.hidden = !message;
}

// --- API ------------------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORAGE) || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit", cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(0, `Could not reach the server (${error.message}).`);
  }
  if (response.ok) return response;
  const payload = await response.json().catch(() => null);
  const detail = payload && payload.error;
  let message = detail && detail.message ? detail.message : `HTTP ${response.status}`;
  if (detail && detail.param) message += ` (field: ${detail.param})`;
  // The key is no longer good (revoked, or the server's changed): back to the sign-in form.
  if (response.status === 401) {
    window.dispatchEvent(new CustomEvent("loramux:unauthorized", { detail: message }));
  }
  throw new ApiError(response.status, message);
}

export async function api(method, path, body) {
  const response = await call(method, path, body);
  return response.json().catch(() => null);
}

// A file from the API (it needs the Bearer header, so no plain link), saved by the browser.
export async function download(path, filename) {
  const blob = await (await call("GET", path)).blob();
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
  return blob;
}

// Runs an action, shows its error in the section's alert region, and never throws.
export async function guarded(errorId, action) {
  show(errorId, "");
  try {
    return await action();
  } catch (error) {
    show(errorId, error instanceof ApiError ? error.message : String(error));
    return undefined;
  }
}

export function confirmAction(message, label) {
  const dialog = $("confirm");
  $("confirm-message").textContent = message;
  $("confirm-ok").textContent = label;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

