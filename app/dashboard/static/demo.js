// #/demo: both charts drawn from fixed data, without the API. A visual check of the chart components,
// used by the browser test, and a preview of the sweep curve before sweeps land on the server.
import { layerSparsityChart, sweepChart } from "./charts.js";
import { card, h } from "./ui.js";

export const DEMO_SWEEP = [
  { sparsity: 0.5, perplexity: 17.9 },
  { sparsity: 0.3, perplexity: 14.2 },
  { sparsity: 0.6, perplexity: 24.6 },
  { sparsity: 0.7, perplexity: 61.3 },
  { sparsity: 0.8, perplexity: 412.0 },
];
export const DEMO_DENSE = 13.1;

export function demoPerLayer(blocks = 4) {
  const kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
  const out = {};
  // Inserted out of order on purpose: the chart sorts naturally (2 before 10).
  for (let b = blocks - 1; b >= 0; b -= 1) {
    kinds.forEach((k, i) => { out[`model.layers.${b}.${k}`] = 0.45 + 0.1 * (((b * 7 + i) * 37) % 11) / 10; });
  }
  return out;
}

export function demoView(root) {
  const { svg, kinds } = layerSparsityChart(demoPerLayer(12), { target: 0.5 });
  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Chart preview"),
      h("p", { class: "muted" }, "Fixed data, no API calls.")),
    card("Perplexity against sparsity (fixed data)", { id: "demo-sweep" },
      h("div", { class: "chart-wrap narrow" }, sweepChart(DEMO_SWEEP, { dense: DEMO_DENSE }))),
    card("Sparsity per layer (fixed data)", { id: "demo-layers" }, h("div", { class: "chart-wrap" }, svg),
      h("ul", { class: "legend" }, kinds.map((kind, i) => h("li", {}, h("span", { class: ["swatch", `c${i % 8}`] }),
        kind)))));
  return () => {};
}
