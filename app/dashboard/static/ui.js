// Small DOM helpers shared by the views. Text from the API always goes in as text nodes, never as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function applyAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
}

function appendChildren(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** h("a", {href: "#", class: "x"}, "text", otherNode) -> an HTML element. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  applyAttrs(el, attrs);
  appendChildren(el, children);
  return el;
}

/** s("rect", {x: 1}) -> an SVG element. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  applyAttrs(el, attrs);
  appendChildren(el, children);
  return el;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const STATUSES = ["queued", "running", "cancel_requested", "succeeded", "failed", "cancelled"];

const STATUS_LABELS = { cancel_requested: "cancelling" };

export function statusBadge(status) {
  return h("span", { class: ["badge", `badge-${status}`], "data-status": status },
    h("span", { class: "badge-dot", "aria-hidden": "true" }), STATUS_LABELS[status] || status);
}

export function fraction(progress) {
  if (!progress) return 0;
  if (typeof progress.fraction === "number") return Math.max(0, Math.min(1, progress.fraction));
  return progress.total ? Math.max(0, Math.min(1, progress.done / progress.total)) : 0;
}

/** A progress bar with the ARIA progressbar role; `update(progress, status)` changes it in place. */
export function progressBar({ compact = false, label = "Progress" } = {}) {
  const fill = h("div", { class: "progress-fill" });
  const bar = h("div", { class: ["progress", compact && "progress-compact"], role: "progressbar", "aria-label": label,
    "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0" }, fill);
  bar.update = (progress, status) => {
    const value = status === "succeeded" ? 1 : fraction(progress);
    fill.style.width = `${(value * 100).toFixed(1)}%`;
    bar.setAttribute("aria-valuenow", String(Math.round(value * 100)));
    bar.dataset.status = status || "";
    const text = progress ? `${progress.stage || ""} ${progress.done ?? ""}/${progress.total ?? ""}`.trim() : "";
    bar.setAttribute("aria-valuetext", text ? `${Math.round(value * 100)}% (${text})` : `${Math.round(value * 100)}%`);
  };
  return bar;
}

const rtf = new Intl.RelativeTimeFormat("en", { numeric: "auto" });

export function fmtTime(epochS) {
  if (!epochS) return "—";
  return new Date(epochS * 1000).toLocaleString(undefined, {
    year: "numeric", month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

export function fmtAgo(epochS, now = Date.now() / 1000) {
  if (!epochS) return "—";
  const d = epochS - now;
  const abs = Math.abs(d);
  if (abs < 45) return "just now";
  if (abs < 3600) return rtf.format(Math.round(d / 60), "minute");
  if (abs < 86400) return rtf.format(Math.round(d / 3600), "hour");
  return rtf.format(Math.round(d / 86400), "day");
}

/** A <time> with a relative label and the absolute time as a tooltip. */
export function timeEl(epochS) {
  if (!epochS) return h("span", { class: "muted" }, "—");
  return h("time", { datetime: new Date(epochS * 1000).toISOString(), title: fmtTime(epochS) }, fmtAgo(epochS));
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 1) return `${(seconds * 1000).toFixed(0)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const m = Math.floor(seconds / 60);
  const sec = Math.round(seconds % 60);
  if (m < 60) return `${m} min ${sec} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function fmtPct(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "—";
  return `${(Number(value) * 100).toFixed(digits)}%`;
}

export function fmtNum(value, digits = 2) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "—";
  return Number(value).toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export function fmtBytes(n) {
  if (!Number.isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/** A short-lived message in the corner (role=status, so screen readers announce it). */
export function toast(message, kind = "info") {
  let box = document.getElementById("toasts");
  if (!box) {
    box = h("div", { id: "toasts", class: "toasts", role: "status", "aria-live": "polite" });
    document.body.append(box);
  }
  const item = h("div", { class: ["toast", `toast-${kind}`] }, message);
  box.append(item);
  setTimeout(() => item.remove(), 6000);
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

export function card(title, attrs, ...children) {
  return h("section", { class: "card", ...attrs },
    title ? h("h2", { class: "card-title" }, title) : null, ...children);
}
