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
  // allocation_options of the allocations that have one of their own; shown for that allocation only, each
  // starting at the server's default (GET /v1/capabilities). Left at "default", a field is not sent.
  const perturbation = h("select", {}, h("option", { value: "" }, "default"));
  const epsilon = num({ value: 0.3, min: 0, max: 0.99, step: 0.01 });
  const alpha = num({ value: 0.15, min: 0, max: 0.49, step: 0.01 });
  const optionFields = {
    "ecoflap-zeroth": field("allocation_options.perturbation", "Perturbation", perturbation,
      "one random direction per block (the default, 16 windows of 32 tokens) or per weight matrix (tensor)"),
    alphapruning: field("allocation_options.epsilon", "Epsilon", epsilon,
      "sparsities proportional to [1 - ε, 1 + ε], from each block's heavy-tail exponent"),
    dlp: field("allocation_options.alpha", "Alpha", alpha,
      "sparsities in [s - α, s + α], from each block's median Wanda score"),
  };
  const optionInputs = { "ecoflap-zeroth": perturbation, alphapruning: epsilon, dlp: alpha };
  const syncOptions = () => {
    for (const [name, wrap] of Object.entries(optionFields)) wrap.hidden = allocation.value !== name;
  };
  allocation.addEventListener("change", syncOptions);
  const sweep = h("input", { type: "text", value: "", placeholder: "e.g. 0.5, 0.6, 0.7", autocomplete: "off",
    inputmode: "decimal" });
  const dataset = h("select", {}, h("option", { value: "builtin:wiki-en" }, "builtin:wiki-en"));
  // The models the server has (GET /v1/models): suggestions for the model field, each with its towers; the
  // vision-language demo models are listed while `prunekit up` still builds them, as not ready.
  const modelInput = h("input", { type: "text", value: "local:tiny-llama", autocomplete: "off", spellcheck: "false",
    required: true, list: "f-model-list" });
  const modelList = h("datalist", { id: "f-model-list" });
  const modelState = h("p", { class: "hint model-state", "aria-live": "polite" });
  // Per-tower sparsity (`targets`) for models with more than one tower: one row per tower, pruned when ticked.
  const towerRows = h("div", { class: "towers" });
  const targetsField = h("div", { class: "field", "data-field": "targets", hidden: true },
    h("fieldset", { name: "targets", class: "towers-set", "aria-describedby": "f-targets-hint f-targets-error" },
      h("legend", {}, "Towers (targets)"), towerRows),
    h("p", { class: "hint", id: "f-targets-hint" },
      "prune each tower at its own sparsity; a tower left unticked stays dense. None ticked: the sparsity above "
      + "applies to the vision and language towers"),
    h("p", { class: "field-error", id: "f-targets-error", hidden: true }));
  let models = new Map();
  let datasetKinds = new Map();
  let datasetTouched = false;
  const evalOn = h("input", { type: "checkbox", checked: true, id: "f-evaluation-perplexity",
    name: "evaluation.perplexity" });
  const evalNum = num({ value: 64, min: 1, step: 1 });
  const evalLen = num({ value: 512, min: 16, step: 1 });
  const problem = h("div", { class: "problem", role: "alert", hidden: true });
  const submit = h("button", { class: "btn btn-primary", type: "submit" }, "Submit job");

  const form = h("form", { class: "card job-form", novalidate: true, "aria-labelledby": "new-title" },
    h("fieldset", {},
      h("legend", {}, "Model and method"),
      field("model", "Model", modelInput,
        "pick one of the server's models, or local:<name>, hf:<org>/<name>[@revision], s3://bucket/prefix"),
      modelList, modelState,
      h("div", { class: "row" },
        field("method", "Method", method, "what this server runs (GET /v1/capabilities)"),
        field("pattern", "Pattern", pattern, "which weights may be zeroed together"),
        field("sparsity", "Sparsity", num({ value: 0.5, min: 0.01, max: 0.99, step: 0.01, required: true }),
          "fraction of each layer's weights set to zero, between 0 and 1")),
      h("div", { class: "row" },
        field("allocation", "Allocation", allocation,
          "uniform: every layer at the target; ecoflap-*, owl, alphapruning (data-free), dlp: per-block sparsity from a global score"),
        field("sweep.sparsities", "Sweep (optional)", sweep,
          "several sparsities from one scoring pass: one model each, and a perplexity curve")),
      h("div", { class: "row allocation-options" }, ...Object.values(optionFields)),
      targetsField),
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
  syncOptions();

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
    const options = caps.allocation_options || {};
    fill(perturbation, ["", ...(options.perturbations || [])], "");
    perturbation.options[0].textContent = "default";
    if (options.defaults?.epsilon != null) epsilon.value = options.defaults.epsilon;
    if (options.defaults?.alpha != null) alpha.value = options.defaults.alpha;
    syncOptions();
    datasetKinds = new Map(caps.datasets.map((d) => [d.id, d.kind]));
    fill(dataset, caps.datasets.map((d) => d.id), "builtin:wiki-en");
    syncModel();
    form.dataset.ready = "true";
  }).catch((err) => {
    if (!controller.signal.aborted) showProblem({ title: "Could not load the server's capabilities", detail: err.message });
  });

  // Asked again while a model is still being built, so it turns ready in the list without a reload.
  let modelsTimer = null;
  function loadModels() {
    api("/v1/models", { signal: controller.signal }).then((page) => {
      if (controller.signal.aborted) return;
      models = new Map(page.data.map((m) => [m.ref, m]));
      modelList.replaceChildren(...page.data.map((m) => h("option", { value: m.ref },
        `${m.name}${m.family ? ` (${m.family}${m.towers.length > 1 ? `: ${m.towers.join(" + ")}` : ""})` : ""}`
        + (m.ready ? "" : ` (${m.status === "building" ? "building, not ready yet" : "failed"})`))));
      form.dataset.models = "loaded";
      syncModel();
      if (page.data.some((m) => m.status === "building")) modelsTimer = setTimeout(loadModels, 10000);
    }).catch(() => {
      // An older server without GET /v1/models: the field stays a plain text field.
    });
  }
  loadModels();
  controller.signal.addEventListener("abort", () => clearTimeout(modelsTimer));

  function syncModel() {
    const m = models.get(modelInput.value.trim());
    if (!m) {
      modelState.textContent = "";
    } else if (!m.ready) {
      modelState.textContent = m.status === "building"
        ? "Still being built on the server (a few minutes after start-up); a job can name it once it is ready."
        : `Not usable: ${m.error?.message || m.status}`;
    } else {
      modelState.textContent = `${m.family || m.model_type || "model"}${m.towers.length ? `, towers: ${m.towers.join(", ")}` : ""}`;
    }
    const towers = m && m.towers.length > 1 ? m.towers : [];
    const shown = towerRows.dataset.towers || "";
    if (towers.join(",") !== shown) {
      towerRows.dataset.towers = towers.join(",");
      towerRows.replaceChildren(...towers.map((tower) => {
        const on = h("input", { type: "checkbox", id: `f-targets-${tower}-on`, "data-tower": tower });
        const value = num({ value: 0.5, min: 0.01, max: 0.99, step: 0.01, id: `f-targets-${tower}`,
          name: `targets.${tower}`, "aria-label": `${tower} tower sparsity`, disabled: true });
        on.addEventListener("change", () => { value.disabled = !on.checked; });
        return h("div", { class: "tower-row" }, h("label", { class: "check", for: on.id }, on, tower), value);
      }));
    }
    targetsField.hidden = towers.length === 0;
    // An image-text dataset calibrates a vision tower; text calibrates a language model. Unless chosen by hand.
    if (!datasetTouched && m && datasetKinds.size) {
      const kind = m.towers.includes("vision") ? "image-text" : "text";
      const pick = [...datasetKinds].find(([, k]) => k === kind);
      if (pick) dataset.value = pick[0];
    }
  }
  modelInput.addEventListener("input", syncModel);
  modelInput.addEventListener("change", syncModel);
  dataset.addEventListener("change", () => { datasetTouched = true; });

  function targets() {
    const out = {};
    for (const on of towerRows.querySelectorAll("input[data-tower]")) {
      if (on.checked) out[on.dataset.tower] = number(`targets.${on.dataset.tower}`);
    }
    return targetsField.hidden || Object.keys(out).length === 0 ? undefined : out;
  }

  function allocationOptions() {
    const input = optionInputs[allocation.value];
    if (!input || input.value.trim() === "") return undefined;
    const name = input.name.split(".")[1];
    return { [name]: input.type === "number" ? Number(input.value) : input.value };
  }

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
      ...(allocationOptions() ? { allocation_options: allocationOptions() } : {}),
      ...(targets() ? { targets: targets() } : {}),
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
