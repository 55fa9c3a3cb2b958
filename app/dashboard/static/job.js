// One job: status, live progress (SSE read with fetch, polling as a fallback), metrics, charts,
// events, artifacts and a cancel button.
import { api, ApiError, downloadArtifact, query, readEventStream } from "./api.js";
import { layerSparsityChart, naturalCompare, sweepChart } from "./charts.js";
import { budgetBlockEl, budgetRequestText } from "./budget.js";
import {
  card, fmtBytes, fmtDuration, fmtNum, fmtPct, fmtTime, h, progressBar, sleep, statusBadge, TERMINAL, toast,
} from "./ui.js";

const POLL_MS = 2000;
const MAX_STREAM_FAILURES = 3;

function kv(rows) {
  return h("dl", { class: "kv" }, rows.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

/** "owl (block)", then what it chose per tower and whether the scores came from the cache. */
function allocationSummary(request, chosen) {
  const name = request.allocation || "uniform";
  if (name === "uniform") return name;
  const parts = [`${name} (${request.allocation_options?.granularity || "block"})`];
  if (chosen?.per_tower) {
    parts.push(Object.entries(chosen.per_tower).map(([tower, v]) => `${tower} ${fmtPct(v, 1)}`).join(", "));
  }
  if (chosen?.cache === "hit") parts.push("cached scores");
  return parts.join(" · ");
}

function requestSummary(job) {
  const r = job.request || {};
  const cal = r.calibration || {};
  const ev = r.evaluation || {};
  const meta = Object.entries(job.metadata || {});
  return kv([
    ["Model", h("span", { class: "mono" }, r.model || "—")],
    ["Method", r.method || "—"],
    ["Target sparsity", r.budget ? budgetRequestText(r.budget, job.metrics?.budget)
      : r.sweep ? `sweep: ${r.sweep.sparsities.map((v) => fmtPct(v, 0)).join(", ")}`
      : fmtPct(r.sparsity, 1)],
    ["Pattern", r.pattern || "unstructured"],
    ["Allocation", allocationSummary(r, job.metrics?.allocation)],
    ["Calibration", `${cal.dataset || "—"}, ${cal.num_samples ?? "?"} × ${cal.seq_len ?? "?"} tokens, seed ${cal.seed ?? 0}`],
    ["Evaluation", ev.perplexity === false ? "off" : `perplexity, ${ev.num_samples ?? "?"} × ${ev.seq_len ?? "?"} tokens`],
    ["Created", fmtTime(job.created_at)],
    ["Started", fmtTime(job.started_at)],
    ["Finished", fmtTime(job.finished_at)],
    job.started_at && job.finished_at ? ["Duration", fmtDuration(job.finished_at - job.started_at)] : null,
    meta.length ? ["Metadata", h("span", { class: "tags" }, meta.map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`)))]
      : null,
  ]);
}

/** Perplexity with as many decimals as are useful: 13.02, 131.4, 1,062. */
function fmtPpl(value) {
  const v = Number(value);
  return fmtNum(v, Math.abs(v) >= 1000 ? 0 : Math.abs(v) >= 100 ? 1 : 2);
}

function metricTile(label, value, sub, attrs = {}) {
  return h("div", { class: "tile", ...attrs }, h("div", { class: "tile-label" }, label),
    h("div", { class: "tile-value" }, value), sub ? h("div", { class: "tile-sub" }, sub) : null);
}

function metricsBlock(metrics) {
  const sp = metrics.sparsity || {};
  const ppl = metrics.perplexity;
  const timings = Object.entries(metrics.timings_s || {}).filter(([, v]) => Number.isFinite(Number(v)));
  const total = timings.reduce((sum, [, v]) => sum + Number(v), 0);
  const tiles = h("div", { class: "tiles" },
    metricTile("Achieved sparsity", fmtPct(sp.achieved, 2), `target ${fmtPct(sp.target, 1)}`,
      { "data-metric": "sparsity", "data-achieved": sp.achieved, "data-target": sp.target }),
    ppl ? metricTile("Perplexity", h("span", {}, fmtPpl(ppl.dense), h("span", { class: "arrow" }, " → "),
      fmtPpl(ppl.pruned)), Number(ppl.dense) > 0 ? `dense → pruned, ×${(ppl.pruned / ppl.dense).toFixed(2)}` : "dense → pruned",
    { "data-metric": "perplexity", "data-dense": ppl.dense, "data-pruned": ppl.pruned,
      title: `dense ${ppl.dense}, pruned ${ppl.pruned}` }) : metricTile("Perplexity", "—", "not measured"),
    metricTile("Total time", fmtDuration(total), `${timings.length} stages`),
    Number.isFinite(Number(metrics.peak_memory_mb))
      ? metricTile("Peak memory", `${fmtNum(metrics.peak_memory_mb, 0)} MB`, null) : null);
  const timingRows = timings.map(([stage, seconds]) => {
    const fill = h("div", { class: "timing-fill" });
    fill.style.width = `${total > 0 ? (100 * seconds) / total : 0}%`;
    return h("tr", {}, h("th", { scope: "row" }, stage), h("td", { class: "timing-bar" }, fill),
      h("td", { class: "num" }, fmtDuration(Number(seconds))));
  });
  return h("div", {}, tiles, timingRows.length
    ? h("table", { class: "timings" }, h("caption", { class: "sub-title" }, "Stage timings"), h("tbody", {}, timingRows))
    : null);
}

function layerBlockEl(metrics) {
  const perLayer = metrics.sparsity?.per_layer;
  if (!perLayer || !Object.keys(perLayer).length) return null;
  const { svg, kinds } = layerSparsityChart(perLayer, { target: metrics.sparsity.target });
  const legend = h("ul", { class: "legend", "aria-label": "Module kinds" },
    kinds.map((kind, i) => h("li", {}, h("span", { class: ["swatch", `c${i % 8}`], "aria-hidden": "true" }), kind)));
  const rows = Object.entries(perLayer).sort(([a], [b]) => naturalCompare(a, b));
  const table = h("details", { class: "as-table" }, h("summary", {}, `Show as a table (${rows.length} layers)`),
    h("table", { class: "table compact" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Layer"), h("th", { scope: "col", class: "num" }, "Sparsity"))),
      h("tbody", {}, rows.map(([name, v]) => h("tr", {}, h("td", { class: "mono" }, name),
        h("td", { class: "num" }, fmtPct(v, 2)))))));
  return card(`Sparsity per layer (${rows.length})`, { id: "layer-chart" }, h("div", { class: "chart-wrap" }, svg),
    legend, table);
}

function sweepBlockEl(metrics) {
  if (!Array.isArray(metrics.sweep) || !metrics.sweep.length) return null;
  const rows = [...metrics.sweep].sort((a, b) => a.sparsity - b.sparsity);
  return card("Perplexity against sparsity", { id: "sweep-chart" }, h("div", { class: "sweep-layout" },
    h("div", { class: "chart-wrap" }, sweepChart(rows, { dense: metrics.perplexity?.dense })),
    h("table", { class: "table compact" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "num" }, "Sparsity"),
        h("th", { scope: "col", class: "num" }, "Perplexity"))),
      h("tbody", {}, rows.map((r) => h("tr", {}, h("td", { class: "num" }, fmtPct(r.sparsity, 1)),
        h("td", { class: "num" }, fmtPpl(r.perplexity))))))));
}

function eventItem(event) {
  const time = new Date(event.created_at * 1000).toLocaleTimeString();
  return h("li", { class: ["event", `level-${event.level}`], "data-event-id": event.id, "data-type": event.type },
    h("time", { datetime: new Date(event.created_at * 1000).toISOString() }, time),
    h("span", { class: "level" }, event.level), h("span", { class: "message" }, event.message));
}

export function jobView(root, jobId) {
  const controller = new AbortController();
  const { signal } = controller;
  let job = null;
  let lastEventId = 0;
  let artifactsLoaded = false;
  const stages = []; // in the order the worker reported them

  const title = h("h1", { class: "mono job-id" }, jobId);
  const badgeSlot = h("span", {});
  const cancel = h("button", { class: "btn btn-danger", type: "button", hidden: true }, "Cancel job");
  const liveState = h("span", { class: "live", "data-mode": "connecting" }, "connecting…");
  const bar = progressBar({ label: "Job progress" });
  const stageText = h("span", { class: "stage-text" });
  const countText = h("span", { class: "count-text mono" });
  const stageSteps = h("ol", { class: "steps", "aria-label": "Stages" });
  const summarySlot = h("div", {});
  const errorSlot = h("div", {});
  const metricsSlot = h("div", {});
  const chartsSlot = h("div", { class: "charts" });
  const eventsList = h("ol", { class: "events", role: "log", "aria-label": "Job events" });
  const eventsCount = h("span", { class: "muted small" });
  const artifactsBody = h("div", {}, h("p", { class: "muted" }, "Artifacts appear when the job succeeds."));
  const notice = h("p", { class: "form-error", role: "alert", hidden: true });

  root.append(
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/jobs" }, "Jobs"), " / ",
      h("span", { class: "mono" }, jobId)),
    h("div", { class: "page-head" },
      h("div", { class: "title-row" }, title, badgeSlot),
      h("div", { class: "toolbar" }, liveState, cancel)),
    notice,
    h("div", { class: "grid-2" },
      h("div", { class: "stack" },
        card("Progress", { id: "progress" },
          h("div", { class: "progress-head" }, stageText, countText), bar, stageSteps),
        errorSlot,
        h("div", { id: "metrics-slot" }, metricsSlot)),
      card("Request", { id: "request" }, summarySlot)),
    chartsSlot,
    h("div", { class: "grid-2 even" },
      card("Events", { id: "events" }, eventsCount, h("div", { class: "events-scroll" }, eventsList)),
      card("Artifacts", { id: "artifacts" }, artifactsBody)));

  function renderStatus() {
    badgeSlot.replaceChildren(statusBadge(job.status));
    root.dataset.status = job.status;
    cancel.hidden = !["queued", "running"].includes(job.status);
    bar.update(job.progress, job.status);
    const p = job.progress;
    if (p?.stage && p.stage !== "done" && !stages.includes(p.stage)) stages.push(p.stage);
    stageText.textContent = job.status === "succeeded" ? "Done"
      : job.status === "queued" ? "Waiting for a worker"
        : p?.stage ? `${p.stage[0].toUpperCase()}${p.stage.slice(1)}` : job.status === "running" ? "Starting" : job.status;
    countText.textContent = job.status === "succeeded" ? "100%"
      : p && p.total ? `${p.done}/${p.total} · ${fmtPct(p.fraction, 0)}` : "";
    const current = job.status === "succeeded" ? stages.length : stages.indexOf(p?.stage);
    const active = (i) => i === current && !TERMINAL.has(job.status);
    stageSteps.replaceChildren(...stages.map((stage, i) => h("li", {
      class: i < current ? "done" : active(i) ? "current" : null, "aria-current": active(i) ? "step" : null,
    }, stage)));
  }

  // Sections are redrawn only when what they show changed (no flicker, no lost focus or open <details>).
  const drawn = {};
  function redraw(name, value, draw) {
    const key = JSON.stringify(value ?? null);
    if (drawn[name] === key) return;
    drawn[name] = key;
    draw();
  }

  function renderAll() {
    renderStatus();
    redraw("summary", [job.request, job.metadata, job.started_at, job.finished_at],
      () => summarySlot.replaceChildren(requestSummary(job)));
    redraw("error", job.error, () => errorSlot.replaceChildren(job.error ? card("Error",
      { id: "job-error", class: "card card-error" }, h("p", { class: "mono small" }, job.error.code),
      h("p", {}, job.error.message)) : ""));
    const m = job.metrics;
    redraw("metrics", m, () => {
      metricsSlot.replaceChildren(m ? card("Metrics", { id: "metrics" }, metricsBlock(m)) : "");
      chartsSlot.replaceChildren(...(m ? [budgetBlockEl(m), layerBlockEl(m), sweepBlockEl(m)].filter(Boolean) : []));
    });
  }

  function addEvent(event) {
    if (event.id <= lastEventId) return;
    lastEventId = event.id;
    const scroller = eventsList.parentElement;
    const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 24;
    eventsList.append(eventItem(event));
    eventsCount.textContent = `${eventsList.children.length} events`;
    if (atBottom) scroller.scrollTop = scroller.scrollHeight;
  }

  function setLive(mode, text) {
    if (mode === "live" || mode === "polling") liveState.dataset.transport = mode === "live" ? "sse" : "polling";
    liveState.dataset.mode = mode;
    liveState.textContent = text;
  }

  async function refreshJob() {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
    renderAll();
    if (job.status === "succeeded" && !artifactsLoaded) await loadArtifacts();
  }

  async function loadArtifacts() {
    const list = await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`, { signal });
    artifactsLoaded = true;
    if (!list.data.length) {
      artifactsBody.replaceChildren(h("p", { class: "muted" }, "No artifacts."));
      return;
    }
    const files = [...list.data].sort((a, b) => naturalCompare(a.name, b.name));
    const total = files.reduce((sum, a) => sum + a.size_bytes, 0);
    artifactsBody.replaceChildren(h("div", { class: "table-scroll" },
      h("table", { class: "table compact artifacts" },
        h("caption", { class: "sr-only" }, "Artifacts"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Name"), h("th", { scope: "col", class: "num" }, "Size"),
          h("th", { scope: "col" }, "SHA-256"), h("th", { scope: "col" }, h("span", { class: "sr-only" }, "Download")))),
        h("tbody", {}, files.map((a) => {
          const button = h("button", { class: "btn btn-small", type: "button", "aria-label": `Download ${a.name}` },
            "Download");
          button.addEventListener("click", async () => {
            button.disabled = true;
            button.textContent = "Downloading…";
            try {
              await downloadArtifact(a);
            } catch (err) {
              toast(`Download of ${a.name} failed: ${err.message}`, "error");
            } finally {
              button.disabled = false;
              button.textContent = "Download";
            }
          });
          return h("tr", { "data-artifact": a.name }, h("td", { class: "mono" }, a.name),
            h("td", { class: "num" }, fmtBytes(a.size_bytes)),
            h("td", { class: "mono muted", title: a.sha256 }, `${a.sha256.slice(0, 8)}…`), h("td", {}, button));
        })))),
      h("p", { class: "muted small" }, `${files.length} files, ${fmtBytes(total)}`));
  }

  function onEvent(event) {
    addEvent(event);
    const data = event.data || {};
    if (event.type === "progress" && data.stage) {
      job.progress = data;
      if (job.status === "queued") job.status = "running";
      renderStatus();
    }
    if (data.status && data.status !== job.status) {
      job.status = data.status;
      renderStatus();
      // The job row holds what events do not (metrics, error, times): fetch it once things change.
      refreshJob().catch(() => {});
    }
  }

  async function poll() {
    setLive("polling", "polling every 2 s");
    while (!signal.aborted) {
      try {
        const page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events${query({ after: lastEventId, limit: 1000 })}`,
          { signal });
        page.data.forEach(onEvent);
        await refreshJob();
        if (TERMINAL.has(job.status) && !page.has_more) return;
      } catch (err) {
        if (signal.aborted) return;
        setLive("error", `retrying: ${err.message}`);
      }
      await sleep(POLL_MS, signal);
    }
  }

  async function follow() {
    let failures = 0;
    let retryMs = 2000;
    while (!signal.aborted) {
      setLive("connecting", "connecting…");
      try {
        const { ended } = await readEventStream(jobId, {
          after: lastEventId, signal,
          onRetry: (ms) => { retryMs = ms; setLive("live", "live"); },
          onFrame: (frame) => {
            failures = 0;
            setLive("live", "live");
            try { onEvent(JSON.parse(frame.data)); } catch (err) { console.warn("bad event", err); }
          },
        });
        if (ended) return;
        failures += 1; // the connection closed before the end of the job: resume after the last id
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof ApiError && (err.status === 401 || err.status === 404)) throw err;
        failures += 1;
      }
      if (failures >= MAX_STREAM_FAILURES) {
        await poll();
        return;
      }
      setLive("connecting", "reconnecting…");
      await sleep(retryMs * failures, signal);
    }
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      job = await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", signal });
      renderAll();
      toast(job.status === "cancelled" ? "Job cancelled." : "Cancellation requested; the worker is winding down.");
    } catch (err) {
      if (!signal.aborted) toast(`Could not cancel: ${err.message}`, "error");
    } finally {
      cancel.disabled = false;
    }
  });

  (async () => {
    try {
      await refreshJob();
      await follow();
      if (signal.aborted) return;
      await refreshJob();
      setLive("ended", TERMINAL.has(job.status) ? "ended" : "stopped");
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status === 404) {
        root.replaceChildren(h("div", { class: "empty card" }, h("h1", {}, "Job not found"),
          h("p", { class: "muted" }, `No job ${jobId} for this API key.`), h("a", { class: "btn", href: "#/jobs" },
            "Back to jobs")));
        return;
      }
      notice.textContent = `Could not load the job: ${err.message}`;
      notice.hidden = false;
      setLive("error", "error");
    }
  })();

  return () => controller.abort();
}
