// The jobs table: newest first, a status filter, cursor pagination ("Load more") and a refresh every 3 s.
import { api, query } from "./api.js";
import { fmtPct, h, progressBar, STATUSES, statusBadge, timeEl } from "./ui.js";

const PAGE = 20;
const REFRESH_MS = 3000;

function rowSignature(job) {
  return JSON.stringify([job.status, job.progress, Math.floor(Date.now() / 60000)]);
}

function jobRow(job) {
  const req = job.request || {};
  const bar = progressBar({ compact: true, label: `Progress of ${job.id}` });
  bar.update(job.progress, job.status);
  const stage = job.status === "succeeded" ? "done"
    : job.progress ? `${job.progress.stage} ${job.progress.done}/${job.progress.total}` : "—";
  const link = h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id);
  const row = h("tr", { "data-job-id": job.id, "data-status": job.status },
    h("td", {}, link),
    h("td", { class: "truncate", title: req.model }, req.model || "—"),
    h("td", {}, req.method || "—"),
    h("td", { class: "num" }, fmtPct(req.sparsity, 0)),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, h("div", { class: "progress-cell" }, bar, h("span", { class: "stage" }, stage))),
    h("td", {}, timeEl(job.created_at)));
  // The whole row opens the job; the link inside stays the keyboard and screen-reader target.
  row.addEventListener("click", (event) => {
    if (event.target.closest("a, button") || getSelection().toString()) return;
    location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  });
  row.signature = rowSignature(job);
  return row;
}

export function jobsView(root, params) {
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const pageSize = Math.min(100, Math.max(1, Number.parseInt(params.get("limit"), 10) || PAGE));
  let jobs = [];
  let hasMore = false;
  let timer = null;
  let stopped = false;
  let inFlight = null;

  const filter = h("select", { id: "status-filter", name: "status" },
    h("option", { value: "" }, "All statuses"),
    STATUSES.map((st) => h("option", { value: st, selected: st === status }, st.replace("_", " "))));
  filter.addEventListener("change", () => {
    const next = new URLSearchParams(params);
    if (filter.value) next.set("status", filter.value);
    else next.delete("status");
    location.hash = next.toString() ? `#/jobs?${next}` : "#/jobs";
  });
  const auto = h("input", { id: "auto-refresh", type: "checkbox", checked: true });
  const updated = h("span", { class: "muted small", "aria-live": "off" });
  const tbody = h("tbody", {});
  const empty = h("div", { class: "empty", hidden: true },
    h("p", {}, status ? `No ${status.replace("_", " ")} jobs.` : "No jobs yet."),
    h("a", { class: "btn btn-primary", href: "#/new" }, "Submit a job"));
  const error = h("p", { class: "form-error", role: "alert", hidden: true });
  const more = h("button", { class: "btn", type: "button", hidden: true }, "Load more");

  root.append(
    h("div", { class: "page-head" },
      h("h1", {}, "Jobs"),
      h("div", { class: "toolbar" },
        h("label", { for: "status-filter", class: "inline-label" }, "Status"), filter,
        h("label", { class: "check" }, auto, "Auto-refresh"),
        updated,
        h("a", { class: "btn btn-primary", href: "#/new" }, "New job"))),
    error,
    h("div", { class: "card table-card" },
      h("table", { class: "table jobs-table" },
        h("caption", { class: "sr-only" }, "Pruning jobs, newest first"),
        h("thead", {}, h("tr", {},
          ["ID", "Model", "Method", "Sparsity", "Status", "Progress", "Created"].map((c) =>
            h("th", { scope: "col", class: c === "Sparsity" ? "num" : null }, c)))),
        tbody),
      empty,
      h("div", { class: "table-foot" }, more)));

  function draw() {
    const current = [...tbody.children];
    const sameOrder = current.length === jobs.length && current.every((tr, i) => tr.dataset.jobId === jobs[i].id);
    if (sameOrder) {
      jobs.forEach((job, i) => {
        if (current[i].signature !== rowSignature(job)) current[i].replaceWith(jobRow(job));
      });
    } else {
      tbody.replaceChildren(...jobs.map(jobRow));
    }
    empty.hidden = jobs.length > 0;
    more.hidden = !hasMore;
    updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  }

  async function load({ append = false } = {}) {
    // A refresh asks again for every row already shown (up to 100), so pages stay consistent.
    const limit = append ? pageSize : Math.min(100, Math.max(pageSize, jobs.length));
    const after = append && jobs.length ? jobs[jobs.length - 1].id : undefined;
    const controller = new AbortController();
    inFlight = controller;
    try {
      const page = await api(`/v1/jobs${query({ limit, after, status })}`, { signal: controller.signal });
      if (stopped) return;
      if (append) {
        const known = new Set(jobs.map((j) => j.id));
        jobs = jobs.concat(page.data.filter((j) => !known.has(j.id)));
        hasMore = page.has_more;
      } else if (jobs.length > limit) {
        // More rows loaded than one request returns: refresh the first ones, keep the rest.
        const fresh = new Set(page.data.map((j) => j.id));
        jobs = page.data.concat(jobs.slice(limit).filter((j) => !fresh.has(j.id)));
      } else {
        jobs = page.data;
        hasMore = page.has_more;
      }
      error.hidden = true;
      draw();
    } catch (err) {
      if (err.name === "AbortError" || stopped) return;
      error.textContent = `Could not load jobs: ${err.message}`;
      error.hidden = false;
    } finally {
      if (inFlight === controller) inFlight = null;
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      if (auto.checked && !document.hidden && !inFlight) await load();
      if (!stopped) schedule();
    }, REFRESH_MS);
  }

  more.addEventListener("click", async () => {
    more.disabled = true;
    await load({ append: true });
    more.disabled = false;
  });

  load().then(schedule);
  return () => {
    stopped = true;
    clearTimeout(timer);
    inFlight?.abort();
  };
}
