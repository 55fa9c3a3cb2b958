// A quality-budget job in the job-detail view: the probes of the sparsity search as a small
// inline SVG (sparsity across, the ratio or drop up, the bound as a dashed line, the chosen probe ringed) and
// a table of every probe. metrics.budget is documented in docs/api.md.
import { niceTicks } from "./charts.js";
import { card, fmtNum, fmtPct, h, s } from "./ui.js";

const pct = (v, digits = 0) => `${(v * 100).toFixed(digits)}%`;

/** What the y axis shows: the probes' ratio (perplexity) or drop (accuracy), and the bound's value on it. */
function measureOf(budget) {
  if (budget.metric === "accuracy") {
    return { key: "drop", label: "accuracy drop", limit: Number(budget.bound?.max_accuracy_drop),
      show: (v) => fmtNum(v, 3) };
  }
  return { key: "ratio", label: "perplexity ratio (pruned / dense)", limit: Number(budget.bound?.max_perplexity_ratio),
    show: (v) => `×${fmtNum(v, 3)}` };
}

/** The probes as an SVG: x sparsity, y ratio or drop; points within the bound filled, outside hollow. */
export function budgetChart(budget, { width = 640, height = 280 } = {}) {
  const measure = measureOf(budget);
  const probes = (budget.probes || [])
    .map((p) => ({ x: Number(p.sparsity), y: Number(p[measure.key]), within: Boolean(p.within) }))
    .filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y))
    .sort((a, b) => a.x - b.x);
  const chosen = Number(budget.chosen_sparsity);
  const id = `budget-${Math.random().toString(36).slice(2, 9)}`;
  const svg = s("svg", {
    class: ["chart", "budget-chart"], viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-labelledby": `${id}-t ${id}-d`, preserveAspectRatio: "xMidYMid meet",
    "data-probes": probes.length, "data-chosen": Number.isFinite(chosen) ? chosen : "",
  }, s("title", { id: `${id}-t` }, "Budget search: probes against the bound"),
  s("desc", { id: `${id}-d` }, probes.map((p) => `${pct(p.x, 1)}: ${measure.show(p.y)}${p.within ? " within" : " outside"}`)
    .join(", ") + `; bound ${measure.show(measure.limit)}`));
  if (!probes.length) return svg;

  const m = { top: 16, right: 20, bottom: 44, left: 64 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const range = budget.range || {};
  let x0 = Math.min(Number(range.min_sparsity ?? probes[0].x), probes[0].x);
  let x1 = Math.max(Number(range.max_sparsity ?? probes[probes.length - 1].x), probes[probes.length - 1].x);
  const xpad = x1 > x0 ? (x1 - x0) * 0.04 : 0.05;
  x0 = Math.max(0, x0 - xpad);
  x1 = Math.min(1, x1 + xpad);
  const ys = probes.map((p) => p.y).concat(Number.isFinite(measure.limit) ? [measure.limit] : []);
  const ymin = Math.min(...ys);
  const ymax = Math.max(...ys);
  const pad = ymax > ymin ? (ymax - ymin) * 0.12 : Math.max(Math.abs(ymax) * 0.05, 0.01);
  const yTicks = niceTicks(ymin - pad, ymax + pad, 5);
  const y0 = Math.min(yTicks[0], ymin - pad);
  const y1 = Math.max(yTicks[yTicks.length - 1], ymax + pad);
  const X = (v) => m.left + ((v - x0) / (x1 - x0)) * plotW;
  const Y = (v) => m.top + plotH * (1 - (v - y0) / (y1 - y0));

  const grid = s("g", { class: "grid", "aria-hidden": "true" });
  for (const t of yTicks) {
    if (t < y0 || t > y1) continue;
    grid.append(s("line", { x1: m.left, x2: width - m.right, y1: Y(t), y2: Y(t) }),
      s("text", { class: "tick", x: m.left - 8, y: Y(t), "text-anchor": "end", "dominant-baseline": "middle" },
        measure.show(t)));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    grid.append(s("line", { class: "vgrid", x1: X(t), x2: X(t), y1: m.top, y2: m.top + plotH }),
      s("text", { class: "tick", x: X(t), y: m.top + plotH + 18, "text-anchor": "middle" }, pct(t)));
  }
  svg.append(grid,
    s("line", { class: "axis", x1: m.left, x2: width - m.right, y1: m.top + plotH, y2: m.top + plotH }),
    s("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: m.top + plotH }),
    s("text", { class: "axis-label", x: m.left + plotW / 2, y: height - 6, "text-anchor": "middle" }, "sparsity"),
    s("text", { class: "axis-label", transform: `translate(14 ${m.top + plotH / 2}) rotate(-90)`,
      "text-anchor": "middle" }, measure.label));
  if (Number.isFinite(measure.limit)) {
    svg.append(s("g", { class: "baseline budget-bound", "data-bound": measure.limit },
      s("line", { x1: m.left, x2: width - m.right, y1: Y(measure.limit), y2: Y(measure.limit) }),
      s("text", { x: width - m.right - 4, y: Y(measure.limit) - 6, "text-anchor": "end" },
        `bound ${measure.show(measure.limit)}`)));
  }
  if (Number.isFinite(chosen)) {
    svg.append(s("line", { class: "budget-chosen-line", x1: X(chosen), x2: X(chosen), y1: m.top, y2: m.top + plotH }));
  }
  const dots = s("g", { class: "budget-points" });
  for (const p of probes) {
    const isChosen = Number.isFinite(chosen) && Math.abs(p.x - chosen) < 1e-9;
    dots.append(s("circle", {
      class: ["budget-point", p.within ? "within" : "outside", isChosen ? "chosen" : null],
      cx: X(p.x).toFixed(2), cy: Y(p.y).toFixed(2), r: isChosen ? 7 : 4.5,
      "data-sparsity": p.x, "data-value": p.y, "data-within": String(p.within),
    }, s("title", {}, `${pct(p.x, 1)} sparsity: ${measure.show(p.y)}, ${p.within ? "within" : "outside"} the bound`
      + (isChosen ? " (chosen)" : ""))));
  }
  svg.append(dots);
  return svg;
}

/** The request's budget in one line: "budget: perplexity ≤ ×1.5 in 10%–90% → chose 47.0%". */
export function budgetRequestText(request, result) {
  const bound = request.max_accuracy_drop != null ? `accuracy drop ≤ ${fmtNum(request.max_accuracy_drop, 3)}`
    : `perplexity ≤ ×${fmtNum(request.max_perplexity_ratio, 3)}`;
  const range = `${fmtPct(request.min_sparsity, 0)}–${fmtPct(request.max_sparsity, 0)}`;
  const chosen = result && Number.isFinite(Number(result.chosen_sparsity))
    ? ` → chose ${fmtPct(result.chosen_sparsity, 1)}` : "";
  return `budget: ${bound} in ${range}${chosen}`;
}

/** The budget card of the job-detail view; null for a job without a budget. */
export function budgetBlockEl(metrics) {
  const budget = metrics?.budget;
  if (!budget || !Array.isArray(budget.probes)) return null;
  const measure = measureOf(budget);
  const metric = budget.metric === "accuracy" ? "Accuracy" : "Perplexity";
  const value = budget.metric === "accuracy" ? "accuracy" : "perplexity";
  const rows = [...budget.probes].sort((a, b) => a.sparsity - b.sparsity);
  const chosen = Number(budget.chosen_sparsity);
  const summary = h("p", { class: "muted" },
    `Chosen sparsity ${fmtPct(chosen, 1)}: the highest of ${fmtPct(budget.range?.min_sparsity, 0)} to `
    + `${fmtPct(budget.range?.max_sparsity, 0)} (step ${fmtPct(budget.range?.step, 1)}) within `
    + `${measure.show(measure.limit)}, found in ${rows.length} probes (bisection, assuming quality worsens with sparsity).`);
  return card("Quality budget: probes", { id: "budget-chart" }, summary, h("div", { class: "sweep-layout" },
    h("div", { class: "chart-wrap" }, budgetChart(budget)),
    h("table", { class: "table compact" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "num" }, "Sparsity"),
        h("th", { scope: "col", class: "num" }, metric), h("th", { scope: "col", class: "num" }, measure.key === "ratio" ? "Ratio" : "Drop"),
        h("th", { scope: "col" }, "Within"))),
      h("tbody", {}, rows.map((p) => h("tr", { class: Math.abs(p.sparsity - chosen) < 1e-9 ? "chosen" : null },
        h("td", { class: "num" }, fmtPct(p.sparsity, 1)), h("td", { class: "num" }, fmtNum(p[value], 3)),
        h("td", { class: "num" }, measure.show(p[measure.key])), h("td", {}, p.within ? "yes" : "no")))))));
}
