// The form that submits a job (POST /v1/jobs). The server validates; a 422 names the field (`param`),
// which is highlighted with the problem's `detail` next to it.
import { api, ApiError, randomId } from "./api.js";
import { h } from "./ui.js";

function field(name, label, input, hint) {
  const id = `f-${name.replace(/\./g, "-")}`;
  input.id = id;
  input.name = name;
  const hintId = `${id}-hint`;
  const errId = `${id}-error`;
  input.setAttribute("aria-describedby", `${hintId} ${errId}`);
  return h("div", { class: "field", "data-field": name },
    h("label", { for: id }, label), input,
    h("p", { class: "hint", id: hintId }, hint || ""),
    h("p", { class: "field-error", id: errId, hidden: true }));
}

const num = (attrs) => h("input", { type: "number", inputmode: "decimal", ...attrs });

export function submitView(root, { capabilities }) {
  const controller = new AbortController();
  const method = h("select", {}, h("option", { value: "wanda" }, "wanda"));
  const pattern = h("select", {}, h("option", { value: "unstructured" }, "unstructured"));
  const allocation = h("select", {}, h("option", { value: "uniform" }, "uniform"));
  const sweep = h("input", { type: "text", value: "", placeholder: "e.g. 0.5, 0.6, 0.7", autocomplete: "off",
    inputmode: "decimal" });
  const dataset = h("select", {}, h("option", { value: "builtin:wiki-en" }, "builtin:wiki-en"));
  const evalOn = h("input", { type: "checkbox", checked: true, id: "f-evaluation-perplexity",
    name: "evaluation.perplexity" });
  const evalNum = num({ value: 64, min: 1, step: 1 });
  const evalLen = num({ value: 512, min: 16, step: 1 });
  const problem = h("div", { class: "problem", role: "alert", hidden: true });
  const submit = h("button", { class: "btn btn-primary", type: "submit" }, "Submit job");

  const form = h("form", { class: "card job-form", novalidate: true, "aria-labelledby": "new-title" },
    h("fieldset", {},
      h("legend", {}, "Model and method"),
      field("model", "Model", h("input", { type: "text", value: "local:tiny-llama", autocomplete: "off",
        spellcheck: "false", required: true }),
      "local:<name> (under the server's models root), hf:<org>/<name>[@revision] or s3://bucket/prefix"),
      h("div", { class: "row" },
        field("method", "Method", method, "what this server runs (GET /v1/capabilities)"),
        field("pattern", "Pattern", pattern, "which weights may be zeroed together"),
        field("sparsity", "Sparsity", num({ value: 0.5, min: 0.01, max: 0.99, step: 0.01, required: true }),
          "fraction of each layer's weights set to zero, between 0 and 1")),
      h("div", { class: "row" },
        field("allocation", "Allocation", allocation,
          "uniform: every layer at the target; ecoflap-*, owl: per-block sparsity from a global score"),
        field("sweep.sparsities", "Sweep (optional)", sweep,
          "several sparsities from one scoring pass: one model each, and a perplexity curve"))),
    h("fieldset", {},
      h("legend", {}, "Calibration"),
      h("div", { class: "row" },
        field("calibration.dataset", "Dataset", dataset, "text the activations are measured on"),
        field("calibration.num_samples", "Samples", num({ value: 64, min: 1, step: 1 }), "sequences"),
        field("calibration.seq_len", "Sequence length", num({ value: 512, min: 16, step: 1 }), "tokens each"))),
    h("fieldset", {},
      h("legend", {}, "Evaluation"),
      h("label", { class: "check", for: "f-evaluation-perplexity" }, evalOn,
        "Measure perplexity before and after pruning"),
      h("div", { class: "row" },
        field("evaluation.num_samples", "Samples", evalNum, "sequences"),
        field("evaluation.seq_len", "Sequence length", evalLen, "tokens each"))),
    problem,
    h("div", { class: "form-actions" }, submit, h("a", { class: "btn btn-ghost", href: "#/jobs" }, "Cancel")));

  root.append(h("div", { class: "page-head" }, h("h1", { id: "new-title" }, "New pruning job")), form);

  const syncEval = () => {
    evalNum.disabled = !evalOn.checked;
    evalLen.disabled = !evalOn.checked;
  };
  evalOn.addEventListener("change", syncEval);
  syncEval();

  capabilities().then((caps) => {
    if (controller.signal.aborted) return;
    const fill = (select, values, fallback) => {
      const keep = select.value;
      select.replaceChildren(...values.map((v) => h("option", { value: v }, v)));
      select.value = values.includes(keep) ? keep : fallback ?? values[0];
    };
    fill(method, caps.methods, caps.methods.includes("wanda") ? "wanda" : caps.methods[0]);
    fill(pattern, caps.patterns);
    fill(allocation, caps.allocations, "uniform");
    fill(dataset, caps.datasets.filter((d) => d.kind === "text").map((d) => d.id));
    form.dataset.ready = "true";
  }).catch((err) => {
    if (!controller.signal.aborted) showProblem({ title: "Could not load the server's capabilities", detail: err.message });
  });

  function clearErrors() {
    problem.hidden = true;
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    for (const el of form.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
    for (const el of form.querySelectorAll(".field-error")) { el.hidden = true; el.textContent = ""; }
  }

  function markField(param, detail) {
    const input = param && form.elements.namedItem(param);
    if (!input || !(input instanceof Element)) return null;
    input.setAttribute("aria-invalid", "true");
    const wrap = input.closest(".field");
    if (wrap) {
      wrap.classList.add("invalid");
      const msg = wrap.querySelector(".field-error");
      msg.textContent = detail;
      msg.hidden = false;
    }
    return input;
  }

  function showProblem(p) {
    problem.replaceChildren(h("strong", {}, p.title || "The job was not accepted"), " ",
      h("span", { class: "problem-detail" }, p.detail || ""),
      p.code ? h("span", { class: "mono muted small" }, ` (${p.code})`) : null);
    problem.hidden = false;
  }

  const value = (name) => form.elements.namedItem(name).value.trim();
  const number = (name) => (value(name) === "" ? undefined : Number(value(name)));

  function body() {
    const evaluation = evalOn.checked
      ? { perplexity: true, num_samples: number("evaluation.num_samples"), seq_len: number("evaluation.seq_len") }
      : { perplexity: false };
    // A sweep names its own sparsities; the single sparsity is then left to the server (the sweep's lowest).
    const sweepValues = sweep.value.split(/[\s,;]+/).filter(Boolean).map(Number);
    return {
      model: value("model"),
      method: method.value,
      pattern: pattern.value,
      ...(sweepValues.length ? { sweep: { sparsities: sweepValues } } : { sparsity: number("sparsity") }),
      allocation: allocation.value,
      calibration: { dataset: dataset.value, num_samples: number("calibration.num_samples"),
        seq_len: number("calibration.seq_len") },
      evaluation,
      metadata: { source: "dashboard" },
    };
  }

  form.addEventListener("input", (event) => {
    const wrap = event.target.closest(".field");
    if (!wrap?.classList.contains("invalid")) return;
    wrap.classList.remove("invalid");
    event.target.removeAttribute("aria-invalid");
    wrap.querySelector(".field-error").hidden = true;
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    submit.disabled = true;
    submit.textContent = "Submitting…";
    try {
      // One Idempotency-Key per click: a retried request can never create a second job.
      const job = await api("/v1/jobs", { method: "POST", body: body(), headers: { "Idempotency-Key": randomId() },
        signal: controller.signal });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (controller.signal.aborted) return;
      const p = err instanceof ApiError ? err.problem : { detail: String(err) };
      showProblem(p);
      if (err instanceof ApiError && err.status === 422) {
        const fields = [{ param: p.param, detail: p.detail }, ...(p.errors || [])];
        let first = null;
        for (const f of fields) {
          const detail = f.detail || "";
          const input = markField(f.param, detail.startsWith(`${f.param}: `) ? detail.slice(f.param.length + 2) : detail);
          first ??= input;
        }
        (first || problem).focus?.();
      }
    } finally {
      submit.disabled = false;
      submit.textContent = "Submit job";
    }
  });

  return () => controller.abort();
}
