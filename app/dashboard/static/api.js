// The HTTP client: every /v1 call carries `Authorization: Bearer <key>`; errors are RFC 9457 problems.

const KEY_STORAGE = "prunekit.apiKey";

// The dashboard lives at <base>/dashboard/; the API at <base>/v1 (works behind a path-prefix proxy too).
export const API_BASE = location.pathname.replace(/\/dashboard(\/.*)?$/, "");

export function getKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setKey(key) { localStorage.setItem(KEY_STORAGE, key); }

export function clearKey() {
  try { localStorage.removeItem(KEY_STORAGE); } catch { /* storage disabled */ }
}

/** An error answered by the API (status, problem body) or by the network (status 0). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.problem = problem || {};
  }
}

const unauthorizedListeners = new Set();

/** Called with the error whenever the API answers 401 (a missing, wrong or revoked key). */
export function onUnauthorized(fn) {
  unauthorizedListeners.add(fn);
  return () => unauthorizedListeners.delete(fn);
}

async function toError(response) {
  let problem = null;
  try {
    const type = response.headers.get("content-type") || "";
    problem = type.includes("json") ? await response.json() : { detail: (await response.text()).slice(0, 500) };
  } catch { /* an empty or broken body */ }
  const error = new ApiError(response.status, problem || { title: response.statusText });
  if (response.status === 401) unauthorizedListeners.forEach((fn) => fn(error));
  return error;
}

function authHeaders(extra, key) {
  return { Authorization: `Bearer ${key ?? getKey()}`, ...extra };
}

/** Raw fetch to the API with the key; throws ApiError unless the answer is 2xx. */
export async function request(path, { method = "GET", body, headers, signal, key } = {}) {
  let response;
  try {
    response = await fetch(API_BASE + path, {
      method,
      headers: authHeaders({ Accept: "application/json",
        ...(body !== undefined ? { "Content-Type": "application/json" } : {}), ...headers }, key),
      body: body !== undefined ? JSON.stringify(body) : undefined,
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { title: "Network error", detail: "The API could not be reached." });
  }
  if (!response.ok) throw await toError(response);
  return response;
}

export async function api(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const text = q.toString();
  return text ? `?${text}` : "";
}

export function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Parses one Server-Sent Events block (the lines between two blank lines). */
export function parseSseBlock(block) {
  const frame = { id: null, event: "message", data: [], retry: null };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments are keep-alives
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") frame.data.push(value);
    else if (field === "event") frame.event = value || "message";
    else if (field === "id" && !value.includes("\0")) frame.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) frame.retry = Number(value);
  }
  return { ...frame, data: frame.data.join("\n"), hasData: frame.data.length > 0 };
}

/**
 * Reads GET /v1/jobs/{id}/events/stream with fetch (EventSource cannot send the Authorization header).
 * Calls onFrame({id, event, data}) for every dispatched frame, and resolves with {ended: true} at the
 * server's `end` frame or {ended: false} if the connection closed before it. `after` resumes after an id.
 */
export async function readEventStream(jobId, { after = 0, signal, onFrame, onRetry } = {}) {
  const headers = { Accept: "text/event-stream" };
  if (after) headers["Last-Event-ID"] = String(after);
  const response = await request(`/v1/jobs/${encodeURIComponent(jobId)}/events/stream${query({ after })}`,
    { headers, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return { ended: false };
      // Normalise line ends; a \r at the chunk's end waits: it may be the first half of \r\n.
      buffer += value;
      const held = buffer.endsWith("\r") ? "\r" : "";
      buffer = buffer.slice(0, buffer.length - held.length).replace(/\r\n?/g, "\n") + held;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = parseSseBlock(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (frame.retry !== null) onRetry?.(frame.retry);
        if (frame.event === "end") return { ended: true };
        if (frame.hasData) onFrame(frame);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** Downloads an artifact: fetched with the key as a blob, then saved through an object URL. */
export async function downloadArtifact(artifact) {
  const response = await request(`/v1/artifacts/${encodeURIComponent(artifact.id)}/content`,
    { headers: { Accept: "*/*" } });
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = artifact.name.split("/").pop();
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob.size;
}
