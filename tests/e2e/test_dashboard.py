"""The dashboard in headless Chromium against a real API and worker: sign in, submit a job from the form,
watch it to the end over the event stream, check the charts, the artifacts and the jobs table; the sweep
chart is drawn from fixed data. Screenshots land in tests/artifacts/dashboard-*.png."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e.conftest import publish_docs_screenshot, screenshot
from tests.integration.conftest import Service

FIXED_SWEEP = [{"sparsity": 0.7, "perplexity": 61.3}, {"sparsity": 0.5, "perplexity": 17.9},
               {"sparsity": 0.6, "perplexity": 24.6}, {"sparsity": 0.8, "perplexity": 412.0}]


def natural_key(name: str) -> tuple[tuple[Any, ...], ...]:
    """The dashboard's natural order: digit runs as numbers (before text), the rest by code points."""
    return tuple((0, int(part), len(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", name))


def console(driver: Any) -> str:
    try:
        lines = [f"{e['level']}: {e['message']}" for e in driver.get_log("browser")]
    except Exception:  # the log is a Chromium extra
        return ""
    return "\nbrowser console:\n" + "\n".join(lines[-30:]) if lines else ""


def wait(driver: Any, timeout_s: float, what: str, condition: Callable[[Any], Any]) -> Any:
    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)
    except TimeoutException as exc:
        screenshot(driver, "failure")
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{console(driver)}") from exc


def css(selector: str) -> Callable[[Any], WebElement | bool]:
    def find(driver: Any) -> WebElement | bool:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found and found[0].is_displayed() else False

    return find


def set_value(driver: Any, name: str, value: str) -> None:
    field = driver.find_element(By.NAME, name)
    field.clear()
    field.send_keys(value)


def sign_in(driver: Any, service: Service) -> None:
    driver.get(f"{service.base_url}/dashboard/#/jobs")
    if driver.find_elements(By.CSS_SELECTOR, ".jobs-table"):
        return
    key = wait(driver, 10, "the sign-in form", css("#api-key"))
    key.clear()
    key.send_keys(service.api_key)
    driver.find_element(By.CSS_SELECTOR, "form.signin button[type=submit]").click()
    wait(driver, 10, "the jobs table after signing in", css(".jobs-table"))


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    return {}


def test_root_redirects_to_the_dashboard_and_the_schema_leaves_it_out(dashboard_service: Service) -> None:
    root = httpx.get(f"{dashboard_service.base_url}/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/dashboard/"
    page = httpx.get(f"{dashboard_service.base_url}/dashboard/")
    assert page.status_code == 200 and "<script type=\"module\" src=\"app.js\">" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline code can run
    paths = httpx.get(f"{dashboard_service.base_url}/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/dashboard")]


def test_charts_render_from_fixed_data(driver: Any, dashboard_service: Service) -> None:
    driver.get(f"{dashboard_service.base_url}/dashboard/#/demo")
    wait(driver, 10, "the chart preview", css("#demo-sweep svg.sweep-chart"))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#demo-sweep circle.sweep-point")) == 5
    assert len(driver.find_elements(By.CSS_SELECTOR, "#demo-layers rect.bar")) == 12 * 7
    screenshot(driver, "charts", full_page=True)

    # The exported component itself, with fixed rows given out of order.
    result = driver.execute_async_script(
        """
        const [rows, done] = [arguments[0], arguments[arguments.length - 1]];
        Promise.all([import("./charts.js"), import("./api.js")]).then(([charts, api]) => {
          const svg = charts.sweepChart(rows, {dense: 13.1});
          document.getElementById("main").append(svg);
          const dots = [...svg.querySelectorAll("circle.sweep-point")];
          const box = svg.getBoundingClientRect();
          const frame = api.parseSseBlock('id: 7\\nevent: progress\\ndata: {"a":\\ndata: 1}\\n: keep-alive');
          done({
            points: dots.length,
            line: svg.querySelector("polyline.sweep-line").getAttribute("points").trim().split(/\\s+/).length,
            xs: dots.map((d) => Number(d.getAttribute("cx"))),
            ys: dots.map((d) => Number(d.getAttribute("cy"))),
            sparsities: dots.map((d) => Number(d.dataset.sparsity)),
            scale: svg.dataset.scale, baseline: !!svg.querySelector(".baseline line"),
            label: svg.querySelector("title").textContent, drawn: box.width > 100 && box.height > 50,
            order: ["model.layers.10.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]
              .sort(charts.naturalCompare),
            frame,
          });
        }).catch((e) => done({error: String(e)}));
        """,
        FIXED_SWEEP,
    )
    assert "error" not in result, result
    assert result["points"] == result["line"] == len(FIXED_SWEEP)
    assert result["sparsities"] == sorted(r["sparsity"] for r in FIXED_SWEEP)
    assert result["xs"] == sorted(result["xs"]) and len(set(result["xs"])) == len(FIXED_SWEEP)
    assert result["ys"] == sorted(result["ys"], reverse=True)  # perplexity rises with sparsity: y goes up
    assert result["scale"] == "log" and result["baseline"] and result["drawn"]
    assert result["label"] == "Perplexity against sparsity"
    assert result["order"] == ["model.layers.2.mlp.down_proj", "model.layers.2.mlp.up_proj",
                               "model.layers.10.mlp.up_proj"]
    assert result["frame"]["id"] == "7" and result["frame"]["event"] == "progress"
    assert result["frame"]["data"] == '{"a":\n1}'


def test_sign_in_refuses_a_wrong_key(driver: Any, dashboard_service: Service) -> None:
    driver.get(f"{dashboard_service.base_url}/dashboard/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    key = wait(driver, 10, "the sign-in form", css("#api-key"))
    key.send_keys("pk_not-a-real-key")
    driver.find_element(By.CSS_SELECTOR, "form.signin button[type=submit]").click()
    error = wait(driver, 10, "the refusal", css("form.signin .form-error"))
    assert "not accepted" in error.text
    assert key.get_attribute("aria-invalid") == "true"
    assert driver.execute_script("return localStorage.getItem('prunekit.apiKey')") is None
    screenshot(driver, "sign-in")
    sign_in(driver, dashboard_service)
    assert driver.execute_script("return localStorage.getItem('prunekit.apiKey')") == dashboard_service.api_key


def test_a_422_highlights_the_field_it_names(driver: Any, dashboard_service: Service) -> None:
    sign_in(driver, dashboard_service)
    driver.get(f"{dashboard_service.base_url}/dashboard/#/new")
    wait(driver, 10, "the capabilities in the form", css("form.job-form[data-ready='true']"))
    set_value(driver, "sparsity", "1.5")
    driver.find_element(By.CSS_SELECTOR, "form.job-form button[type=submit]").click()
    field = wait(driver, 10, "the sparsity field marked invalid", css(".field.invalid[data-field='sparsity']"))
    assert field.find_element(By.NAME, "sparsity").get_attribute("aria-invalid") == "true"
    assert "less than 1" in field.find_element(By.CSS_SELECTOR, ".field-error").text
    problem = driver.find_element(By.CSS_SELECTOR, ".problem")
    assert "sparsity" in problem.text and "Unprocessable" in problem.text
    assert len(driver.find_elements(By.CSS_SELECTOR, ".field.invalid")) == 1
    screenshot(driver, "form-error", full_page=True)

    # A nested field (calibration.seq_len) and the server's own check (an unknown local model).
    set_value(driver, "sparsity", "0.5")
    set_value(driver, "calibration.seq_len", "4")
    driver.find_element(By.CSS_SELECTOR, "form.job-form button[type=submit]").click()
    wait(driver, 10, "calibration.seq_len marked invalid", css(".field.invalid[data-field='calibration.seq_len']"))
    assert not driver.find_elements(By.CSS_SELECTOR, ".field.invalid[data-field='sparsity']")
    set_value(driver, "calibration.seq_len", "64")
    set_value(driver, "model", "local:no-such-model")
    driver.find_element(By.CSS_SELECTOR, "form.job-form button[type=submit]").click()
    wait(driver, 10, "the model field marked invalid", css(".field.invalid[data-field='model']"))
    assert "no-such-model" in driver.find_element(By.CSS_SELECTOR, ".problem").text
    jobs = dashboard_service.http.get("/v1/jobs").json()["data"]
    assert jobs == [], "a refused form created a job"


def test_submit_a_job_and_watch_it_succeed(driver: Any, dashboard_service: Service, downloads: Path,
                                           shared: dict[str, Any]) -> None:
    sign_in(driver, dashboard_service)
    driver.get(f"{dashboard_service.base_url}/dashboard/#/new")
    wait(driver, 10, "the capabilities in the form", css("form.job-form[data-ready='true']"))
    set_value(driver, "model", "local:tiny-llama")
    Select(driver.find_element(By.NAME, "method")).select_by_value("wanda")
    set_value(driver, "sparsity", "0.5")
    set_value(driver, "calibration.num_samples", "8")
    set_value(driver, "calibration.seq_len", "64")
    assert driver.find_element(By.NAME, "evaluation.perplexity").is_selected()
    set_value(driver, "evaluation.num_samples", "4")
    set_value(driver, "evaluation.seq_len", "64")
    driver.find_element(By.CSS_SELECTOR, "form.job-form button[type=submit]").click()

    wait(driver, 10, "the job page", lambda d: re.search(r"#/jobs/(job_\w+)$", d.current_url))
    job_id = re.search(r"#/jobs/(job_\w+)$", driver.current_url).group(1)
    shared["job_id"] = job_id
    wait(driver, 10, "the job's status", css("main[data-status] .badge"))
    started = time.monotonic()
    try:
        wait(driver, 60, "the job to succeed", css("main[data-status='succeeded'] #artifacts table"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}{dashboard_service.log_tail()}") from exc
    wait(driver, 10, "the end of the live view", css(".live[data-mode='ended']"))
    wait(driver, 10, "the per-layer chart", css("#layer-chart svg.layer-chart"))
    elapsed = time.monotonic() - started

    job = dashboard_service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["request"]["calibration"]["num_samples"] == 8 and job["request"]["evaluation"]["seq_len"] == 64
    per_layer = job["metrics"]["sparsity"]["per_layer"]
    bars = driver.find_elements(By.CSS_SELECTOR, "#layer-chart svg.layer-chart rect.bar")
    assert len(bars) == len(per_layer) > 0, "one bar per pruned layer"
    assert [b.get_attribute("data-layer") for b in bars] == sorted(per_layer, key=natural_key)
    heights = {b.get_attribute("data-layer"): float(b.get_attribute("height")) for b in bars}
    assert all(h > 0 for h in heights.values())

    # Progress came live over the event stream (not the polling fallback) and reached the end.
    live = driver.find_element(By.CSS_SELECTOR, ".live")
    assert live.get_attribute("data-transport") == "sse"
    bar = driver.find_element(By.CSS_SELECTOR, "#progress [role=progressbar]")
    assert bar.get_attribute("aria-valuenow") == "100"
    events = driver.find_elements(By.CSS_SELECTOR, "#events li.event")
    api_events = dashboard_service.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert [int(e.get_attribute("data-event-id")) for e in events] == [e["id"] for e in api_events]
    assert driver.find_elements(By.CSS_SELECTOR, "#events li.event[data-type='progress']")

    # Metrics as the API reports them.
    sparsity = driver.find_element(By.CSS_SELECTOR, "#metrics [data-metric='sparsity']")
    assert float(sparsity.get_attribute("data-achieved")) == job["metrics"]["sparsity"]["achieved"]
    assert f"{job['metrics']['sparsity']['achieved'] * 100:.2f}%" in sparsity.text
    perplexity = driver.find_element(By.CSS_SELECTOR, "#metrics [data-metric='perplexity']")
    assert float(perplexity.get_attribute("data-dense")) == job["metrics"]["perplexity"]["dense"]
    assert float(perplexity.get_attribute("data-pruned")) == job["metrics"]["perplexity"]["pruned"]
    for stage in job["metrics"]["timings_s"]:
        assert stage in driver.find_element(By.CSS_SELECTOR, "#metrics table.timings").text
    assert not driver.find_elements(By.CSS_SELECTOR, "#sweep-chart"), "no sweep in this job"
    assert not driver.find_elements(By.CSS_SELECTOR, "#job-error")
    assert not driver.find_element(By.XPATH, "//button[normalize-space()='Cancel job']").is_displayed()

    # Artifacts: every file listed; one downloaded through the button (fetch with the key, then a blob).
    rows = driver.find_elements(By.CSS_SELECTOR, "#artifacts tr[data-artifact]")
    names = {r.get_attribute("data-artifact") for r in rows}
    artifacts = dashboard_service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert names == {a["name"] for a in artifacts} and "report.json" in names
    driver.find_element(By.CSS_SELECTOR, "#artifacts tr[data-artifact='config.json'] button").click()
    target = downloads / "config.json"
    wait(driver, 10, "the downloaded config.json", lambda _: target.is_file() and target.stat().st_size > 0)
    config = next(a for a in artifacts if a["name"] == "config.json")
    expected = dashboard_service.http.get(f"/v1/artifacts/{config['id']}/content").content
    wait(driver, 5, "the download to complete", lambda _: target.read_bytes() == expected)

    shot = screenshot(driver, "job", full_page=True)
    publish_docs_screenshot(shot)
    print(f"job {job_id} watched to success in {elapsed:.1f} s")


def test_jobs_table_lists_the_job_and_filters_by_status(driver: Any, dashboard_service: Service,
                                                        shared: dict[str, Any]) -> None:
    if "job_id" not in shared:
        pytest.skip("needs the job submitted by test_submit_a_job_and_watch_it_succeed")
    job_id = shared["job_id"]
    sign_in(driver, dashboard_service)
    driver.get(f"{dashboard_service.base_url}/dashboard/#/jobs")
    row = wait(driver, 10, "the job's row", css(f"tr[data-job-id='{job_id}']"))
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == job_id and cells[1] == "local:tiny-llama" and cells[2] == "wanda" and cells[3] == "50%"
    assert row.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-status") == "succeeded"
    assert not driver.find_element(By.XPATH, "//button[normalize-space()='Load more']").is_displayed()

    Select(driver.find_element(By.ID, "status-filter")).select_by_value("failed")
    wait(driver, 10, "the empty failed list", css(".empty"))
    assert driver.current_url.endswith("#/jobs?status=failed")
    assert not driver.find_elements(By.CSS_SELECTOR, f"tr[data-job-id='{job_id}']")
    Select(driver.find_element(By.ID, "status-filter")).select_by_value("succeeded")
    wait(driver, 10, "the job among the succeeded", css(f"tr[data-job-id='{job_id}']"))

    # A job submitted elsewhere appears by itself (the table refreshes every 3 s). The worker is paused
    # meanwhile, so that the job is still queued when its page cancels it.
    worker = dashboard_service.processes["worker"]
    os.killpg(worker.pid, signal.SIGSTOP)
    try:
        other = dashboard_service.http.post("/v1/jobs", json={
            "model": "local:tiny-llama", "method": "magnitude", "sparsity": 0.3,
            "evaluation": {"perplexity": False}}).json()
        Select(driver.find_element(By.ID, "status-filter")).select_by_value("")
        row = wait(driver, 10, "the job submitted over the API", css(f"tr[data-job-id='{other['id']}']"))
        assert row.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-status") == "queued"
        screenshot(driver, "jobs")

        # Its page, opened from the table, cancels it.
        row.click()
        cancel = wait(driver, 10, "the Cancel button", css("main[data-status='queued'] .btn-danger"))
        assert driver.current_url.endswith(f"#/jobs/{other['id']}")
        cancel.click()
        wait(driver, 10, "the cancelled job, followed to its end",
             css("main[data-status='cancelled'] .live[data-mode='ended']"))
        assert not cancel.is_displayed()
        assert dashboard_service.http.get(f"/v1/jobs/{other['id']}").json()["status"] == "cancelled"
    finally:
        os.killpg(worker.pid, signal.SIGCONT)

    # Cursor pagination, one job a page: "Load more" fetches the next page after the last id shown.
    driver.get(f"{dashboard_service.base_url}/dashboard/#/jobs?limit=1")
    wait(driver, 10, "the first page", css(f"tr[data-job-id='{other['id']}']"))
    more = wait(driver, 10, "the Load more button", css(".table-foot button"))
    assert len(driver.find_elements(By.CSS_SELECTOR, ".jobs-table tbody tr")) == 1
    more.click()
    wait(driver, 10, "the second page", css(f"tr[data-job-id='{job_id}']"))
    ids = [r.get_attribute("data-job-id") for r in driver.find_elements(By.CSS_SELECTOR, ".jobs-table tbody tr")]
    assert ids == [other["id"], job_id]
    wait(driver, 10, "the end of the list", lambda d: not d.find_element(By.CSS_SELECTOR, ".table-foot button")
         .is_displayed())


STREAM_PATCH = """
const [mode, done] = [arguments[0], arguments[arguments.length - 1]];
window.__realFetch ??= window.fetch.bind(window);
window.__streams = [];
window.fetch = async (input, init = {}) => {
  const url = String(input);
  if (!url.includes("/events/stream")) return window.__realFetch(input, init);
  window.__streams.push({url, lastEventId: (init.headers || {})["Last-Event-ID"] || null});
  if (mode === "fail") throw new TypeError("simulated network failure");
  const response = await window.__realFetch(input, init);
  if (window.__streams.length > 1) return response;
  // The first connection drops after the retry frame and two events.
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (text.split("\\n\\n").length <= 3) {
    const {value, done: finished} = await reader.read();
    if (finished) break;
    text += value;
  }
  reader.cancel();
  const cut = text.split("\\n\\n").slice(0, 3).join("\\n\\n") + "\\n\\n";
  return new Response(cut, {status: 200, headers: {"content-type": "text/event-stream"}});
};
done(true);
"""


def test_event_stream_resumes_after_a_drop_and_falls_back_to_polling(driver: Any, dashboard_service: Service,
                                                                     shared: dict[str, Any]) -> None:
    if "job_id" not in shared:
        pytest.skip("needs the job submitted by test_submit_a_job_and_watch_it_succeed")
    job_id = shared["job_id"]
    api_ids = [e["id"] for e in dashboard_service.http.get(f"/v1/jobs/{job_id}/events",
                                                           params={"limit": 1000}).json()["data"]]
    sign_in(driver, dashboard_service)
    driver.get(f"{dashboard_service.base_url}/dashboard/#/jobs")
    wait(driver, 10, "the jobs table", css(".jobs-table"))

    def shown_ids() -> list[int]:
        return [int(e.get_attribute("data-event-id")) for e in driver.find_elements(By.CSS_SELECTOR, "#events li")]

    # A connection that drops: the next one resumes after the last event received (Last-Event-ID).
    driver.execute_async_script(STREAM_PATCH, "cut")
    driver.execute_script("location.hash = arguments[0]", f"#/jobs/{job_id}")
    wait(driver, 15, "the job page after a reconnect", css("main[data-status='succeeded'] .live[data-mode='ended']"))
    streams = driver.execute_script("return window.__streams")
    assert len(streams) == 2, streams
    assert streams[0]["lastEventId"] is None and streams[1]["lastEventId"] == str(api_ids[1])
    assert f"after={api_ids[1]}" in streams[1]["url"]
    assert driver.find_element(By.CSS_SELECTOR, ".live").get_attribute("data-transport") == "sse"
    assert shown_ids() == api_ids, "events lost or repeated across the reconnect"

    # A stream that cannot be opened at all: after three tries the page polls GET /v1/jobs/{id} every 2 s.
    driver.execute_script("location.hash = '#/jobs'")
    wait(driver, 10, "the jobs table", css(".jobs-table"))
    driver.execute_async_script(STREAM_PATCH, "fail")
    driver.execute_script("location.hash = arguments[0]", f"#/jobs/{job_id}")
    wait(driver, 20, "the job page by polling", css(".live[data-transport='polling'][data-mode='ended']"))
    assert len(driver.execute_script("return window.__streams")) == 3
    assert shown_ids() == api_ids
    assert driver.find_elements(By.CSS_SELECTOR, "#layer-chart rect.bar")
    driver.execute_script("window.fetch = window.__realFetch")


def test_sign_out_forgets_the_key(driver: Any, dashboard_service: Service) -> None:
    sign_in(driver, dashboard_service)
    driver.find_element(By.ID, "sign-out").click()
    wait(driver, 10, "the sign-in form", css("#api-key"))
    assert driver.execute_script("return localStorage.getItem('prunekit.apiKey')") is None
    assert not driver.find_element(By.ID, "session").is_displayed()

    # A key revoked (or mistyped) while signed in: the first 401 signs out and says why.
    driver.execute_script("localStorage.setItem('prunekit.apiKey', 'pk_revoked')")
    driver.get(f"{dashboard_service.base_url}/dashboard/#/jobs")
    driver.refresh()
    notice = wait(driver, 10, "the sign-in form with a notice", css("form.signin .form-error"))
    assert "rejected" in notice.text
    assert driver.execute_script("return localStorage.getItem('prunekit.apiKey')") is None


def submit_small_job(driver: Any) -> str:
    """Small calibration and evaluation (seconds on a CPU), submitted; the id of the job page it lands on."""
    set_value(driver, "calibration.num_samples", "4")
    set_value(driver, "calibration.seq_len", "32")
    set_value(driver, "evaluation.num_samples", "2")
    set_value(driver, "evaluation.seq_len", "32")
    driver.find_element(By.CSS_SELECTOR, "form.job-form button[type=submit]").click()
    wait(driver, 10, "the job page", lambda d: re.search(r"#/jobs/(job_\w+)$", d.current_url))
    return re.search(r"#/jobs/(job_\w+)$", driver.current_url).group(1)


def test_a_sweep_with_an_allocation_from_the_form_draws_its_curve(driver: Any, dashboard_service: Service) -> None:
    sign_in(driver, dashboard_service)
    driver.get(f"{dashboard_service.base_url}/dashboard/#/new")
    wait(driver, 10, "the capabilities in the form", css("form.job-form[data-ready='true']"))
    allocations = [o.get_attribute("value") for o in Select(driver.find_element(By.NAME, "allocation")).options]
    assert allocations == dashboard_service.http.get("/v1/capabilities").json()["allocations"]
    set_value(driver, "model", "local:tiny-llama")
    Select(driver.find_element(By.NAME, "allocation")).select_by_value("owl")
    set_value(driver, "sweep.sparsities", "0.3, 0.6")
    job_id = submit_small_job(driver)
    try:
        wait(driver, 90, "the sweep chart", css("main[data-status='succeeded'] #sweep-chart svg.sweep-chart"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}{dashboard_service.log_tail()}") from exc
    job = dashboard_service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["request"]["sweep"] == {"sparsities": [0.3, 0.6]} and job["request"]["allocation"] == "owl"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#sweep-chart circle.sweep-point")) == 2
    summary = driver.find_element(By.CSS_SELECTOR, "main").text
    assert "owl (block)" in summary and "sweep: 30%, 60%" in summary

    # A sparsity the sweep leaves out of its range is refused, and the field is marked.
    driver.get(f"{dashboard_service.base_url}/dashboard/#/new")
    wait(driver, 10, "the capabilities in the form", css("form.job-form[data-ready='true']"))
    set_value(driver, "sweep.sparsities", "0.5, 1.5")
    driver.find_element(By.CSS_SELECTOR, "form.job-form button[type=submit]").click()
    wait(driver, 10, "the sweep field marked invalid", css(".field.invalid[data-field='sweep.sparsities']"))


def test_the_form_shows_each_allocations_own_options_and_sends_them(driver: Any,
                                                                     dashboard_service: Service) -> None:
    sign_in(driver, dashboard_service)
    driver.get(f"{dashboard_service.base_url}/dashboard/#/new")
    wait(driver, 10, "the capabilities in the form", css("form.job-form[data-ready='true']"))

    def shown() -> list[str]:
        fields = driver.find_elements(By.CSS_SELECTOR, ".allocation-options .field")
        return [f.get_attribute("data-field") for f in fields if f.is_displayed()]

    assert shown() == []  # uniform has no options
    defaults = dashboard_service.http.get("/v1/capabilities").json()["allocation_options"]["defaults"]
    Select(driver.find_element(By.NAME, "allocation")).select_by_value("alphapruning")
    assert shown() == ["allocation_options.epsilon"]
    assert float(driver.find_element(By.NAME, "allocation_options.epsilon").get_attribute("value")) == \
        defaults["epsilon"]
    Select(driver.find_element(By.NAME, "allocation")).select_by_value("dlp")
    assert shown() == ["allocation_options.alpha"]
    Select(driver.find_element(By.NAME, "allocation")).select_by_value("ecoflap-zeroth")
    assert shown() == ["allocation_options.perturbation"]
    perturbations = [o.get_attribute("value") for o in
                     Select(driver.find_element(By.NAME, "allocation_options.perturbation")).options]
    assert perturbations == ["", "tensor", "block"]

    # An option out of its range is refused and its field marked; in range, it reaches the job's request.
    Select(driver.find_element(By.NAME, "allocation")).select_by_value("alphapruning")
    set_value(driver, "allocation_options.epsilon", "1.5")
    driver.find_element(By.CSS_SELECTOR, "form.job-form button[type=submit]").click()
    wait(driver, 10, "epsilon marked invalid", css(".field.invalid[data-field='allocation_options.epsilon']"))
    set_value(driver, "allocation_options.epsilon", "0.2")
    job_id = submit_small_job(driver)
    job = dashboard_service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["request"]["allocation"] == "alphapruning"
    assert job["request"]["allocation_options"]["epsilon"] == 0.2


def test_a_vision_language_job_with_targets_and_a_budget_job_with_its_probes(driver: Any,
                                                                             dashboard_service: Service) -> None:
    """The form offers a two-tower model's towers from GET /v1/models and sends `targets`; a budget job's page
    draws every probe with the bound and the chosen sparsity."""
    from prunekit.fixtures.demo_models import build_tiny_clip

    name = "tiny-clip-e2e"
    if not (dashboard_service.models_root / name).exists():
        build_tiny_clip(dashboard_service.models_root / name)
    sign_in(driver, dashboard_service)
    driver.get(f"{dashboard_service.base_url}/dashboard/#/new")
    wait(driver, 10, "the capabilities in the form", css("form.job-form[data-ready='true']"))
    set_value(driver, "model", f"local:{name}")
    driver.find_element(By.NAME, "sparsity").click()  # leaves the model field: the form looks the model up
    vision = wait(driver, 15, "the vision tower's row", css("input[data-tower='vision']"))
    vision.click()
    set_value(driver, "targets.vision", "0.5")
    driver.find_element(By.CSS_SELECTOR, "input[data-tower='language']").click()
    set_value(driver, "targets.language", "0.3")
    set_value(driver, "calibration.num_samples", "4")
    set_value(driver, "evaluation.num_samples", "2")
    driver.find_element(By.CSS_SELECTOR, "form.job-form button[type=submit]").click()
    wait(driver, 10, "the job page", lambda d: re.search(r"#/jobs/(job_\w+)$", d.current_url))
    vlm_id = re.search(r"#/jobs/(job_\w+)$", driver.current_url).group(1)
    try:
        wait(driver, 120, "the VLM job to succeed", css("main[data-status='succeeded'] #artifacts table"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}{dashboard_service.log_tail()}") from exc
    vlm = dashboard_service.http.get(f"/v1/jobs/{vlm_id}").json()
    assert vlm["request"]["targets"] == {"vision": 0.5, "language": 0.3}
    per_tower = vlm["metrics"]["sparsity"]["per_tower"]
    assert per_tower["vision"] == pytest.approx(0.5, abs=1e-3) and per_tower["language"] == pytest.approx(0.3, abs=1e-3)

    submitted = dashboard_service.http.post("/v1/jobs", json={
        "model": "local:tiny-llama", "method": "wanda",
        "budget": {"max_perplexity_ratio": 1.005, "min_sparsity": 0.3, "max_sparsity": 0.8},
        "calibration": {"num_samples": 4, "seq_len": 32}, "evaluation": {"num_samples": 2, "seq_len": 32}})
    assert submitted.status_code == 201, submitted.text
    budget_id = submitted.json()["id"]
    driver.get(f"{dashboard_service.base_url}/dashboard/#/jobs/{budget_id}")
    try:
        wait(driver, 120, "the budget chart", css("main[data-status='succeeded'] #budget-chart svg.budget-chart"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}{dashboard_service.log_tail()}") from exc
    budget = dashboard_service.http.get(f"/v1/jobs/{budget_id}").json()["metrics"]["budget"]
    points = driver.find_elements(By.CSS_SELECTOR, "#budget-chart circle.budget-point")
    assert len(points) == len(budget["probes"]) >= 2
    assert len(driver.find_elements(By.CSS_SELECTOR, "#budget-chart circle.budget-point.chosen")) == 1
    publish_docs_screenshot(screenshot(driver, "budget", full_page=True), "dashboard-budget.png")

    driver.get(f"{dashboard_service.base_url}/dashboard/#/jobs")
    wait(driver, 10, "the jobs table", css(".jobs-table"))
    wait(driver, 10, "both jobs in the table", lambda d: all(
        d.find_elements(By.CSS_SELECTOR, f"[data-job-id='{job}']") for job in (vlm_id, budget_id)))
    publish_docs_screenshot(screenshot(driver, "jobs-vlm-budget"), "dashboard-jobs.png")
