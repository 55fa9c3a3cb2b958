// Charts drawn as inline SVG by hand: no library, no network. Colours come from style.css classes.
import { s } from "./ui.js";

/** Natural order: runs of digits compare as numbers ("layers.2" before "layers.10"), the rest as code units. */
export function naturalCompare(a, b) {
  const pa = String(a).match(/\d+|\D+/g) || [];
  const pb = String(b).match(/\d+|\D+/g) || [];
  for (let i = 0; i < Math.min(pa.length, pb.length); i += 1) {
    const x = pa[i];
    const y = pb[i];
    if (x === y) continue;
    const nx = /^\d/.test(x);
    const ny = /^\d/.test(y);
    if (nx && ny) {
      const d = Number(x) - Number(y);
      if (d !== 0) return d;
      return x.length - y.length; // "01" after "1"
    }
    if (nx !== ny) return nx ? -1 : 1; // a number before text, as in "layers.2" vs "layers.x"
    return x < y ? -1 : 1;
  }
  return pa.length - pb.length;
}

const compact = new Intl.NumberFormat("en", { notation: "compact", maximumSignificantDigits: 3 });
const pct = (v, digits = 0) => `${(v * 100).toFixed(digits)}%`;

/** "Nice" ticks (1, 2, 5 x 10^k steps) covering [lo, hi]. */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const err = raw / mag;
  const step = mag * (err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1);
  const ticks = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  return ticks;
}

/** Ticks for a log axis: 1-2-5 per decade, or 1 per decade when that would be too many. */
export function logTicks(lo, hi) {
  const ticks = [];
  for (let k = Math.floor(Math.log10(lo)); k <= Math.ceil(Math.log10(hi)); k += 1) {
    for (const d of [1, 2, 5]) {
      const v = d * 10 ** k;
      if (v >= lo && v <= hi) ticks.push(Number(v.toPrecision(12)));
    }
  }
  return ticks.length > 8 ? ticks.filter((v) => Math.abs(Math.log10(v) % 1) < 1e-9) : ticks;
}

function frame({ width, height, title, desc, className }) {
  const id = `chart-${Math.random().toString(36).slice(2, 9)}`;
  return s("svg", {
    class: ["chart", className], viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-labelledby": `${id}-t ${id}-d`, preserveAspectRatio: "xMidYMid meet",
  }, s("title", { id: `${id}-t` }, title), s("desc", { id: `${id}-d` }, desc));
}

/** The module kind of a layer name: "model.layers.3.mlp.up_proj" -> "up_proj". */
export function layerKind(name) {
  return name.split(".").pop();
}

/** The block a layer belongs to: "model.layers.3.mlp.up_proj" -> "3" (null when there is no number). */
export function layerBlock(name) {
  const match = /(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)/.exec(name) || /\.(\d+)\./.exec(name);
  return match ? match[1] : null;
}

/**
 * One bar per layer (`metrics.sparsity.per_layer`: {name: fraction}), in natural order of the names,
 * coloured by module kind (q_proj, up_proj, ...) and grouped by block; a dashed line marks the target.
 * Returns {svg, kinds}: kinds (in order of first appearance) lets the caller draw a legend.
 */
export function layerSparsityChart(perLayer, { target = null, width = 960, height = 280 } = {}) {
  const entries = Object.entries(perLayer || {})
    .filter(([, v]) => Number.isFinite(Number(v)))
    .sort(([a], [b]) => naturalCompare(a, b));
  const values = entries.map(([, v]) => Number(v));
  const n = entries.length;
  const min = n ? Math.min(...values) : 0;
  const max = n ? Math.max(...values) : 0;
  const svg = frame({
    width, height, className: "layer-chart",
    title: "Sparsity per layer",
    desc: n ? `${n} layers; sparsity from ${pct(min, 2)} to ${pct(max, 2)}` +
      (target !== null ? `; target ${pct(target, 1)}` : "") : "No per-layer data",
  });
  svg.dataset.bars = String(n);
  const m = { top: 14, right: 14, bottom: 40, left: 48 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const y = (v) => m.top + plotH * (1 - Math.max(0, Math.min(1, v)));

  const grid = s("g", { class: "grid", "aria-hidden": "true" });
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    grid.append(s("line", { x1: m.left, x2: width - m.right, y1: y(t), y2: y(t) }),
      s("text", { class: "tick", x: m.left - 8, y: y(t), "text-anchor": "end", "dominant-baseline": "middle" },
        pct(t)));
  }
  svg.append(grid);
  svg.append(s("text", { class: "axis-label", transform: `translate(12 ${m.top + plotH / 2}) rotate(-90)`,
    "text-anchor": "middle" }, "sparsity"));

  const kinds = [];
  const band = n ? plotW / n : plotW;
  const barW = Math.max(1, Math.min(28, band * (band < 4 ? 1 : 0.78)));
  const bars = s("g", { class: "bars" });
  const groups = [];
  entries.forEach(([name, v], i) => {
    const value = Number(v);
    const kind = layerKind(name);
    if (!kinds.includes(kind)) kinds.push(kind);
    const x = m.left + band * i + (band - barW) / 2;
    const top = y(value);
    bars.append(s("rect", {
      class: ["bar", `c${kinds.indexOf(kind) % 8}`], x: x.toFixed(2), y: top.toFixed(2), width: barW.toFixed(2),
      height: Math.max(0, m.top + plotH - top).toFixed(2), "data-layer": name, "data-sparsity": value,
    }, s("title", {}, `${name}: ${pct(value, 2)}`)));
    const block = layerBlock(name);
    const last = groups[groups.length - 1];
    if (last && last.block === block) last.end = i;
    else groups.push({ block, start: i, end: i });
  });
  svg.append(bars);

  // Block separators and labels, thinned out so labels never overlap.
  const labels = s("g", { class: "groups", "aria-hidden": "true" });
  const every = Math.max(1, Math.ceil(groups.length / Math.max(1, Math.floor(plotW / 28))));
  groups.forEach((g, gi) => {
    if (gi > 0) {
      const x = m.left + band * g.start;
      labels.append(s("line", { class: "sep", x1: x, x2: x, y1: m.top, y2: m.top + plotH + 6 }));
    }
    if (g.block !== null && gi % every === 0) {
      labels.append(s("text", { class: "tick", x: m.left + band * ((g.start + g.end + 1) / 2), y: m.top + plotH + 18,
        "text-anchor": "middle" }, g.block));
    }
  });
  if (groups.some((g) => g.block !== null)) {
    labels.append(s("text", { class: "axis-label", x: m.left + plotW / 2, y: height - 4, "text-anchor": "middle" },
      "block"));
  }
  svg.append(labels);

  if (target !== null && Number.isFinite(Number(target))) {
    svg.append(s("g", { class: "target" },
      s("line", { x1: m.left, x2: width - m.right, y1: y(target), y2: y(target) }),
      s("text", { x: width - m.right - 4, y: y(target) - 5, "text-anchor": "end" }, `target ${pct(target, 1)}`)));
  }
  svg.append(s("line", { class: "axis", x1: m.left, x2: width - m.right, y1: m.top + plotH, y2: m.top + plotH }));
  return { svg, kinds };
}

/**
 * Perplexity against sparsity for a sweep (`metrics.sweep`: [{sparsity, perplexity}, ...]), one point per
 * row joined by a line, sorted by sparsity. A log y axis when perplexity spans more than a factor 8;
 * `dense` (the unpruned perplexity) is drawn as a dashed baseline.
 */
export function sweepChart(rows, { dense = null, width = 640, height = 300 } = {}) {
  const points = (rows || [])
    .map((r) => ({ x: Number(r.sparsity), y: Number(r.perplexity) }))
    .filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y) && p.y > 0)
    .sort((a, b) => a.x - b.x);
  const baseline = Number.isFinite(Number(dense)) && Number(dense) > 0 ? Number(dense) : null;
  const svg = frame({
    width, height, className: "sweep-chart", title: "Perplexity against sparsity",
    desc: points.length
      ? points.map((p) => `${pct(p.x, 1)}: ${compact.format(p.y)}`).join(", ") +
        (baseline !== null ? `; dense ${compact.format(baseline)}` : "")
      : "No sweep data",
  });
  svg.dataset.points = String(points.length);
  if (!points.length) return svg;

  const m = { top: 16, right: 20, bottom: 44, left: 58 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const xs = points.map((p) => p.x);
  let x0 = Math.min(...xs);
  let x1 = Math.max(...xs);
  const xpad = x1 > x0 ? (x1 - x0) * 0.06 : 0.05;
  x0 = Math.max(0, x0 - xpad);
  x1 = Math.min(1, x1 + xpad);
  const ys = points.map((p) => p.y).concat(baseline !== null ? [baseline] : []);
  const ymin = Math.min(...ys);
  const ymax = Math.max(...ys);
  const log = ymax / ymin > 8;
  svg.dataset.scale = log ? "log" : "linear";
  let y0;
  let y1;
  let yTicks;
  if (log) {
    y0 = ymin / 1.2;
    y1 = ymax * 1.2;
    yTicks = logTicks(y0, y1);
  } else {
    const pad = ymax > ymin ? (ymax - ymin) * 0.1 : Math.max(1, ymax * 0.1);
    yTicks = niceTicks(Math.max(0, ymin - pad), ymax + pad, 5);
    y0 = Math.min(yTicks[0], Math.max(0, ymin - pad));
    y1 = Math.max(yTicks[yTicks.length - 1], ymax + pad);
  }
  const X = (v) => m.left + ((v - x0) / (x1 - x0)) * plotW;
  const Y = log
    ? (v) => m.top + plotH * (1 - (Math.log(v) - Math.log(y0)) / (Math.log(y1) - Math.log(y0)))
    : (v) => m.top + plotH * (1 - (v - y0) / (y1 - y0));

  const grid = s("g", { class: "grid", "aria-hidden": "true" });
  for (const t of yTicks) {
    if (t < y0 || t > y1) continue;
    grid.append(s("line", { x1: m.left, x2: width - m.right, y1: Y(t), y2: Y(t) }),
      s("text", { class: "tick", x: m.left - 8, y: Y(t), "text-anchor": "end", "dominant-baseline": "middle" },
        compact.format(t)));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    grid.append(s("line", { class: "vgrid", x1: X(t), x2: X(t), y1: m.top, y2: m.top + plotH }),
      s("text", { class: "tick", x: X(t), y: m.top + plotH + 18, "text-anchor": "middle" }, pct(t)));
  }
  svg.append(grid);
  svg.append(
    s("line", { class: "axis", x1: m.left, x2: width - m.right, y1: m.top + plotH, y2: m.top + plotH }),
    s("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: m.top + plotH }),
    s("text", { class: "axis-label", x: m.left + plotW / 2, y: height - 6, "text-anchor": "middle" }, "sparsity"),
    s("text", { class: "axis-label", transform: `translate(14 ${m.top + plotH / 2}) rotate(-90)`,
      "text-anchor": "middle" }, log ? "perplexity (log scale)" : "perplexity"),
  );
  if (baseline !== null) {
    svg.append(s("g", { class: "baseline" },
      s("line", { x1: m.left, x2: width - m.right, y1: Y(baseline), y2: Y(baseline) }),
      s("text", { x: width - m.right - 4, y: Y(baseline) - 6, "text-anchor": "end" },
        `dense ${compact.format(baseline)}`)));
  }
  svg.append(s("polyline", { class: "sweep-line",
    points: points.map((p) => `${X(p.x).toFixed(2)},${Y(p.y).toFixed(2)}`).join(" ") }));
  const dots = s("g", { class: "sweep-points" });
  for (const p of points) {
    dots.append(s("circle", { class: "sweep-point", cx: X(p.x).toFixed(2), cy: Y(p.y).toFixed(2), r: 4.5,
      "data-sparsity": p.x, "data-perplexity": p.y }, s("title", {}, `${pct(p.x, 1)} sparsity: perplexity ${p.y}`)));
  }
  svg.append(dots);
  return svg;
}
