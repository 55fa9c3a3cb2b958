"""A first run that reads well: `prunekit up` (what `make run` calls) shows our own lines, the main job's progress as
one live bar, the result and where to go; the services' logs go to var/log/. Also the pieces: the terminal's two
modes, the supervisor's back-off, and the markers of models still being built."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from prunekit.core import model_builds
from prunekit.up import BACKOFF_CAP_S, Terminal, backoff_s
from tests.conftest import ROOT, free_port


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: a carriage return goes back to the line's start, ESC[2K clears it."""
    lines = [""]
    for part in re.split(r"(\r|\n|\x1b\[2K)", raw):
        if part == "\n":
            lines.append("")
        elif part == "\x1b[2K":
            lines[-1] = ""
        elif part != "\r":
            lines[-1] += part
    return lines[:-1] if lines[-1] == "" else lines


def test_the_live_bar_is_one_line_redrawn_in_place_with_other_lines_above_it() -> None:
    out = TtyBuffer()
    terminal = Terminal(out)
    terminal.say("starting")
    for done in range(4):
        terminal.progress("pruning", done, 3, done / 3, f"Pruned block {done} of 3.")
        if done == 1:
            terminal.say("  Job started again.")
    shown = screen(out.getvalue())
    assert shown[:2] == ["starting", "  Job started again."]
    assert re.fullmatch(r"  \[#{24}\] 100%  pruning +3/3  Pruned block 3 of 3\.", shown[2]), shown
    assert len(shown) == 3 and out.getvalue().count("\r") >= 4  # redrawn in place, not written again below
    terminal.end_progress()  # the job ended: the bar goes, its last event said how
    terminal.say("done")
    assert screen(out.getvalue()) == ["starting", "  Job started again.", "done"]


def test_without_a_terminal_progress_is_a_line_per_stage_and_per_tenth() -> None:
    out = io.StringIO()
    terminal = Terminal(out)
    terminal.progress("loading", 0, 1, 0.0, "Loading the model.")
    for done in range(31):
        terminal.progress("pruning", done, 30, done / 30, f"Pruned block {done} of 30.")
    terminal.end_progress()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].endswith("Loading the model.")
    assert [line.rsplit("Pruned block ", 1)[1] for line in lines[1:]] == [f"{n} of 30." for n in range(0, 31, 3)]


def test_restarts_back_off_exponentially_up_to_a_cap() -> None:
    assert [backoff_s(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, BACKOFF_CAP_S, BACKOFF_CAP_S]


def test_a_model_being_built_is_marked_until_its_folder_is_in_place(tmp_path: Path) -> None:
    root = tmp_path / "models"
    model_builds.mark_building(root, "digits-clip")
    [(name, marker)] = model_builds.building(root).items()
    assert name == "digits-clip" and marker["pid"] == os.getpid() and "error" not in marker
    assert not model_builds.is_ready(root, "digits-clip")
    listed = _models_list(root)
    assert listed == ["local:digits-clip  (not ready: building)"], listed

    (root / ".digits-clip.tmp123").mkdir()  # a builder's temporary folder is no model
    (root / "digits-clip").mkdir()
    (root / "digits-clip" / "config.json").write_text("{}")  # renamed into place: complete
    assert model_builds.is_ready(root, "digits-clip") and model_builds.building(root) == {}
    model_builds.clear_building(root, "digits-clip")
    assert not model_builds.marker_path(root, "digits-clip").exists()

    model_builds.mark_building(root, "llava-smollm2", error="the build killed by SIGKILL")
    assert json.loads(model_builds.marker_path(root, "llava-smollm2").read_text())["error"].endswith("SIGKILL")
    assert _models_list(root) == ["local:digits-clip", "local:llava-smollm2  (not ready: the build killed by SIGKILL)"]


def _models_list(root: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "prunekit", "models", "list"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "MODELS_ROOT": str(root),
                                            "PRUNEKIT_VAR_DIR": str(root.parent / "var")}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_a_first_run_shows_our_lines_and_logs_the_rest_to_var_log(tmp_path: Path, models_root: Path) -> None:
    """`prunekit up` on a terminal (a pty, stdout and stderr both, as `make run` has them), embedded as `make run`
    runs it, with the tiny Llama as the main job's model."""
    env = {**os.environ, "PRUNEKIT_VAR_DIR": str(tmp_path / "var"), "MODELS_ROOT": str(models_root),
           "API_PORT": str(free_port()), "API_HOST": "127.0.0.1", "DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "QUEUE_NAME": f"prunekit-first-run-{os.getpid()}", "COLUMNS": "160", "LINES": "40"}
    for name in ("DATABASE_URL", "BROKER_URL", "ARTIFACT_STORE"):
        env.pop(name, None)
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "prunekit", "up", "--model", "local:tiny-llama", "--demo-models",
                             "tiny-llama", "--exit-after-demo"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=child, stderr=child, start_new_session=True)
    os.close(child)
    raw = b""
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the pty closes once the process and its children are gone
                    break
                if not chunk:
                    break
                raw += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")  # the pty's own newline translation
    shown = screen(text)
    logs = tmp_path / "var" / "log"
    assert code == 0, "\n".join(shown) + "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.glob("*"))

    # Our lines, in order: start-up, the job, its result, where to go.
    expected = ["prunekit up: data in var/, service logs in var/log/", "database ready (SQLite, var/prunekit.db)",
                "API ready on http://127.0.0.1:", "main job job_", "succeeded in", "achieved sparsity", "perplexity",
                "Where to go next:", "dashboard  http://127.0.0.1:", "API key    var/dev-api-key", "curl -s -H"]
    at = 0
    for wanted in expected:
        at = next((i for i in range(at, len(shown)) if wanted in shown[i]), -1)
        assert at >= 0, f"{wanted!r} missing or out of order:\n" + "\n".join(shown)
    # One live bar: redrawn in place, so the job's many progress events are a handful of lines on the screen.
    assert text.count("\r\x1b[2K") >= 5
    assert sum(1 for line in shown if re.match(r"\s+\[[#.]+\]", line)) <= 2, "\n".join(shown)
    # Nothing of the services or the libraries: no JSON, access log, Celery banner, warnings, alembic, progress bars.
    for line in shown:
        assert not line.lstrip().startswith(("{", "[20", "-------------- ", "INFO", "WARNING")), line
        for noise in ("GET /v1", "celery", "SecurityWarning", "alembic", "it/s]", "Traceback"):
            assert noise not in line, line
    # ... which is in var/log, as JSON lines.
    api = (logs / "api.log").read_text()
    assert "GET /v1/jobs/" in api and "uvicorn" in api
    assert "celery" in (logs / "worker.log").read_text() and (logs / "webhooks.log").exists()
    up_log = [json.loads(line) for line in (logs / "up.log").read_text().splitlines() if line.startswith("{")]
    assert any(entry["logger"].startswith("alembic") for entry in up_log)
    assert all(json.loads(line)["logger"] for line in api.splitlines() if line.startswith("{"))
