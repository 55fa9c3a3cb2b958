// The dashboard's shell: sign-in, a hash router (#/jobs, #/jobs/<id>, #/new, #/demo) and the views.
import { api, ApiError, clearKey, getKey, onUnauthorized, setKey } from "./api.js";
import { demoView } from "./demo.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { submitView } from "./submit.js";
import { h } from "./ui.js";

const main = document.getElementById("main");
const session = document.getElementById("session");
let cleanup = null;
let signInNotice = "";

let capabilitiesPromise = null;
/** GET /v1/capabilities, asked once per sign-in. */
export function capabilities() {
  capabilitiesPromise ??= api("/v1/capabilities").catch((error) => {
    capabilitiesPromise = null;
    throw error;
  });
  return capabilitiesPromise;
}

function parseRoute() {
  const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(search) };
}

function setNav(name) {
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function render() {
  if (cleanup) cleanup();
  cleanup = null;
  main.replaceChildren();
  const { parts, params } = parseRoute();
  const key = getKey();
  session.hidden = !key;
  document.querySelector(".nav").hidden = !key;
  if (parts[0] === "demo") {
    setNav("");
    cleanup = demoView(main, params);
    return;
  }
  if (!key) {
    setNav("");
    signInView(main);
    return;
  }
  document.getElementById("key-hint").textContent = `key …${key.slice(-4)}`;
  if (parts[0] === "jobs" && parts[1]) {
    setNav("jobs");
    cleanup = jobView(main, parts[1]);
  } else if (parts[0] === "new") {
    setNav("new");
    cleanup = submitView(main, { capabilities });
  } else {
    setNav("jobs");
    cleanup = jobsView(main, params);
  }
  main.focus({ preventScroll: true });
}

function signInView(root) {
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off",
    spellcheck: "false", required: true, placeholder: "pk_…", "aria-describedby": "api-key-help" });
  const error = h("p", { class: "form-error", role: "alert", hidden: !signInNotice }, signInNotice);
  const button = h("button", { class: "btn btn-primary", type: "submit" }, "Sign in");
  const form = h("form", { class: "signin card", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in to prunekit"),
    h("p", { class: "muted" }, "The dashboard talks to the API with your API key. It is kept in this browser only."),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("p", { id: "api-key-help", class: "hint" },
      "Development servers write one to ", h("code", {}, "var/dev-api-key"), "; operators create keys with ",
      h("code", {}, "prunekit keys create --tenant NAME"), "."),
    error,
    button);
  signInNotice = "";
  input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    error.hidden = true;
    try {
      capabilitiesPromise = api("/v1/capabilities", { key });
      await capabilitiesPromise;
      setKey(key);
      if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
      else render();
    } catch (err) {
      capabilitiesPromise = null;
      error.textContent = err instanceof ApiError && err.status === 401
        ? "This key was not accepted: it is unknown or has been revoked."
        : `Could not check the key: ${err.message}`;
      error.hidden = false;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  root.append(form);
  input.focus();
}

function signOut(notice = "") {
  clearKey();
  capabilitiesPromise = null;
  signInNotice = notice;
  render();
}

document.getElementById("sign-out").addEventListener("click", () => signOut());
onUnauthorized(() => {
  if (getKey()) signOut("Your API key was rejected (unknown or revoked); sign in again.");
});
window.addEventListener("hashchange", render);
window.addEventListener("storage", (event) => {
  if (event.key === null || event.key === "prunekit.apiKey") render(); // signed in or out in another tab
});
render();
