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

// Fills a table body with rows, or with one full-width line saying there is nothing yet.
export function fill(bodyId, rows, emptyText) {
  const body = $(bodyId);
  if (rows.length) {
    body.replaceChildren(...rows);
    return;
  }
  const columns = body.closest("table").tHead.rows[0].cells.length;
  body.replaceChildren(el("tr", {}, el("td", { colSpan: columns, className: "empty" }, emptyText)));
}

export function head(id, names) {
  $(id).replaceChildren(...names.map((name) => el("th", { scope: "col" }, name)));
}

export function time(seconds) {
  if (seconds == null) return "never";
  const iso = new Date(seconds * 1000).toISOString();
  return el("time", { dateTime: iso }, `${iso.replace("T", " ").slice(0, 19)} UTC`);
}

export function bytes(value) {
  if (value == null) return "unlimited";
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

export async function api(method, path, body) {
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
  const payload = await response.json().catch(() => null);
  if (response.ok) return payload;
  const detail = payload && payload.error;
  let message = detail && detail.message ? detail.message : `HTTP ${response.status}`;
  if (detail && detail.param) message += ` (field: ${detail.param})`;
  // The key is no longer good (revoked, or the server's changed): back to the sign-in form.
  if (response.status === 401) {
    window.dispatchEvent(new CustomEvent("loramux:unauthorized", { detail: message }));
  }
  throw new ApiError(response.status, message);
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

