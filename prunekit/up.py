"""`prunekit up` (what `make run` calls): the whole service on embedded defaults, plus its main job once."""

from __future__ import annotations

import stat
import sys
import time
from typing import Any

import httpx

from prunekit.client import ApiError, Client
from prunekit.core.config import Settings
from prunekit.jobs_cli import bar as progress_bar
from prunekit.keys import create_key
from prunekit.models_root import DEMO_MODELS, import_model
from prunekit.processes import spawn, stop

MAIN_JOB: dict[str, Any] = {
    "method": "wanda",
    "sparsity": 0.5,
    "pattern": "unstructured",
    "calibration": {"dataset": "builtin:wiki-en", "num_samples": 32, "seq_len": 512, "seed": 0},
    "evaluation": {"perplexity": True, "num_samples": 16, "seq_len": 512},
    "metadata": {"source": "make run"},
}


def run_up(settings: Settings, model: str, exit_after_demo: bool) -> int:
    from prunekit.core.db.session import migrate

    migrate(settings.database_url)
    for name in DEMO_MODELS:
        if not (settings.models_root and (settings.models_root / name).exists()):
            say(f"importing demo model local:{name} ...")
        import_model(settings, name, None)
    key = dev_api_key(settings)
    base_url = f"http://{settings.api_host}:{settings.api_port}"
    # The webhook consumer beside the job worker: a job's webhook is sent while the worker runs the next job.
    processes = [spawn(["serve"]), spawn(["worker"]), spawn(["worker", "--webhooks"])]
    try:
        wait_ready(base_url, processes)
        say(f"API on {base_url} (OpenAPI: {base_url}/docs); API key in {settings.var_dir / 'dev-api-key'}")
        code = run_main_job(Client(base_url, key), model)
        if exit_after_demo:
            return code
        say("Serving. Press Ctrl-C to stop.")
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        say("a service process stopped; shutting down")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(processes)


def dev_api_key(settings: Settings) -> str:
    """Created on first start, then reused, so that scripts and curl commands keep working."""
    from app.auth import authenticate
    from prunekit.core.db.session import session_scope

    path = settings.var_dir / "dev-api-key"
    if path.exists():
        key = path.read_text().strip()
        with session_scope(settings) as session:
            if authenticate(session, key) is not None:
                return key
    key = create_key(settings, "dev", "development key written by prunekit up")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return key


def wait_ready(base_url: str, processes: list[Any], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit("the API, the worker or the webhook consumer exited during start-up; see the log above")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the API did not become ready within {timeout_s:.0f} s")


def run_main_job(client: Client, model: str) -> int:
    started = time.monotonic()
    try:
        job = client.create_job({"model": model, **MAIN_JOB})
    except ApiError as exc:
        say(f"could not submit the main job: {exc}")
        return 1
    say(f"submitted {job['id']}: {MAIN_JOB['method']} at {MAIN_JOB['sparsity']:.0%} on {model}")
    for event in client.follow(job["id"]):
        data = event.get("data") or {}
        if event["type"] == "progress":
            bar = progress_bar(data.get("fraction", 0.0))
            say(f"  {bar} {data.get('stage', ''):<18} {data.get('done')}/{data.get('total')}  {event['message']}")
        else:
            say(f"  [{event['level']}] {event['message']}")
    job = client.get_job(job["id"])
    elapsed = time.monotonic() - started
    if job["status"] != "succeeded":
        say(f"main job ended {job['status']}: {(job.get('error') or {}).get('message', '')}")
        return 1
    metrics = job["metrics"]
    say("")
    say(f"main job {job['id']} succeeded in {elapsed:.1f} s")
    say(f"  achieved sparsity : {metrics['sparsity']['achieved']:.4f} (target {metrics['sparsity']['target']})")
    if "perplexity" in metrics:
        ppl = metrics["perplexity"]
        say(f"  perplexity        : {ppl['dense']:.2f} dense -> {ppl['pruned']:.2f} pruned")
    say(f"  stage times (s)   : {', '.join(f'{k} {v:.1f}' for k, v in metrics.get('timings_s', {}).items())}")
    say(f"  artifacts         : {', '.join(a['name'] for a in client.artifacts(job['id']))}")
    return 0


def say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


