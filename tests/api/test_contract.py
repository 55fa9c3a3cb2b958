"""Contract test: schemathesis runs every phase and every check against the real app over real HTTP.

Phases: examples (the document's own, the rest filled in), coverage (boundaries, missing and wrong values, methods
the schema does not list), fuzzing, and stateful (ids flow along the document's links: a created job is read,
cancelled, its events listed and streamed; an uploaded dataset is read and deleted).

Checks: every one of schemathesis 4.32: not_a_server_error, status_code_conformance, content_type_conformance,
response_schema_conformance, response_headers_conformance, positive_data_acceptance, negative_data_rejection (but
for one field, see CONFIG), missing_required_header, unsupported_method, allow_header_conformance, use_after_free,
ensure_resource_availability, ignored_auth, object_level_authorization (two tenants), max_response_time; and one of
ours, refusal_is_documented (tests/api/contract_hooks.py). Still partial: the artifact routes. Only a worker makes
artifacts and none runs here, so those routes answer 404 to the fuzzer (their links are followed, never resolved).

Bounded in `make test` (a fixed seed, a few dozen examples per operation); `make fuzz` runs the same test for
PRUNEKIT_FUZZ_SECONDS with a random seed, which it prints (PRUNEKIT_FUZZ_SEED runs a given one again). Real
Postgres and Redis behind the app; jobs stay queued, which the contract allows.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.main import create_app
from prunekit.core.config import Settings
from tests.conftest import ROOT, free_port, wait_for

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
PHASES = "examples,coverage,fuzzing,stateful"
BOUNDED_SEED = 20260118
BOUNDED_EXAMPLES = 40
# The per-request ceiling; a stream is read for one event (max-stream-events) or STREAM_READ_S, never to its end.
REQUEST_TIMEOUT_S = 20
STREAM_READ_S = 2
MAX_RESPONSE_S = 10
# Positive data may meet a documented refusal (422) on the operations that have one (app/refusals.py); our check
# refusal_is_documented then requires the problem's code and param to be among them.
ACCEPTED_WITH_REFUSALS = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]

CONFIG = """
hooks = "tests.api.contract_hooks"
request-timeout = {timeout}
# A job's event stream ends only when the job does; one event shows the stream answers as documented.
max-stream-events = 1

[auth.wfc]
path = "{auth}"
user = "tenant-a"
# Two tenants: object_level_authorization replays one tenant's reads as the other, which must not see them.
peers = ["tenant-a", "tenant-b"]

# Nothing is kept between runs (no .schemathesis/ in the checkout): a run is its seed.
[cache]
enabled = false

[generation]
database = "none"

[checks]
# Every check this schemathesis has (listed in the module's docstring); given here and not as `--checks all`,
# which would override the per-operation settings below.
enabled = true
# No answer, a stream's first event included, may take this long.
max_response_time = {max_response_s}

[phases.examples]
# Operations without an example of their own still run in the examples phase, the missing parts generated.
fill-missing = true

[[operations]]
include-path = "/v1/jobs/{{job_id}}/events/stream"
# A stream is read until its first event or this long: a queued job, or an `after` beyond its last event, sends
# nothing until the job ends (no worker runs here), and the run need not wait the whole request timeout each time.
request-timeout = {stream_timeout}

[[operations]]
include-path = "/v1/jobs"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {accepted}

[[operations]]
include-path = "/v1/datasets"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {accepted}
# Not meaningful for a file part: schemathesis mutates the file's JSON type (to a boolean, say), yet a file part is
# bytes on the wire ("false" is a fine text file), so the server cannot tell and rightly accepts it. Everything
# else of this operation is checked; the `name` field's rules by tests/api/test_contract_fixes.py as well.
checks.negative_data_rejection.enabled = false

[[operations]]
include-path = "/v1/models"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {accepted}
# As for datasets: a file part is bytes on the wire, whatever JSON type the mutation gave it.
checks.negative_data_rejection.enabled = false
"""


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    """The app behind a real uvicorn server on loopback, so requests go over real HTTP. Rate limits are lifted:
    the run sends thousands of requests a minute, and a 429 would hide the answer under test."""
    settings = settings.model_copy(update={"rate_limit_per_minute": 10**9, "job_create_limit_per_minute": 10**9})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 30, "uvicorn")
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def test_every_phase_and_every_check(live_url: str, new_key: Callable[[str], str], tmp_path: Path) -> None:
    fuzz_seconds = int(os.environ.get("PRUNEKIT_FUZZ_SECONDS", "0"))
    # PRUNEKIT_FUZZ_SEED replays a run that found something.
    seed = int(os.environ.get("PRUNEKIT_FUZZ_SEED") or (secrets.randbelow(2**31) if fuzz_seconds else BOUNDED_SEED))
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auth": [
        {"name": name, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {new_key(name)}"}]}
        for name in ("tenant-a", "tenant-b")]}))
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(timeout=REQUEST_TIMEOUT_S, stream_timeout=STREAM_READ_S, auth=auth,
                                    max_response_s=MAX_RESPONSE_S, accepted=json.dumps(ACCEPTED_WITH_REFUSALS)))
    command = [SCHEMATHESIS, "--config-file", str(config), "run", f"{live_url}/openapi.json", "--phases", PHASES,
               "--seed", str(seed), "--workers", "1", "--no-color", "--max-failures", "50"]
    if fuzz_seconds:
        command += ["--max-time", str(fuzz_seconds), "--max-examples", "500"]
        limit_s = fuzz_seconds + 300
    else:
        command += ["--max-examples", str(BOUNDED_EXAMPLES)]
        limit_s = 420
    print(f"schemathesis seed {seed}" + (f", {fuzz_seconds} s" if fuzz_seconds else ", bounded"), flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit_s,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    output = result.stdout + result.stderr
    print(output)  # shown with -s (make fuzz) and in a failure's report
    cases = re.search(r"(\d+) generated", output)
    print(f"schemathesis seed {seed}: {cases[1] if cases else '?'} cases, exit code {result.returncode}")
    assert result.returncode == 0, f"schemathesis (seed {seed}) found failures:\n{output[-20000:]}"


def test_errors_are_documented_as_problem_json(settings: Settings) -> None:
    document = create_app(settings).openapi()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            default = operation["responses"]["default"]["content"]
            assert list(default) == ["application/problem+json"], (method, path)
