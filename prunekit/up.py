"""`prunekit up` (what `make run` calls): the whole service on embedded defaults, plus its main job once.

The terminal shows only this module's own lines: start-up, the main job's progress as one live bar, its result,
and where to go next. Everything the services and libraries write (JSON logs, Celery's banner, alembic's lines,
progress bars) goes to files under `var/log/`: `up.log` (this process), `api.log`, `worker.log`,
`webhooks.log` and `models.log` (the demo models built in the background).

The processes are supervised: one that dies (a worker killed for memory, most often) is started again after a
back-off, its jobs get an event, and the restarted worker takes them up from their last checkpoint; the API and
the other processes keep running.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from prunekit.client import ApiError, Client
from prunekit.core.config import Settings
from prunekit.jobs_cli import bar as progress_bar
from prunekit.keys import create_key
from prunekit.models_root import BACKGROUND_DEMO_MODELS, DEMO_MODELS, import_model
from prunekit.processes import QUIET_ENV, exit_description, spawn, stop

MAIN_JOB: dict[str, Any] = {
    "method": "wanda",
    "sparsity": 0.5,
    "pattern": "unstructured",
    "calibration": {"dataset": "builtin:wiki-en", "num_samples": 32, "seq_len": 512, "seed": 0},
    "evaluation": {"perplexity": True, "num_samples": 16, "seq_len": 512},
    "metadata": {"source": "make run"},
}
# The service's processes: name -> `prunekit` arguments. The webhook consumer runs beside the job worker, so a
# job's webhook is sent while the worker runs the next job.
SERVICES: dict[str, list[str]] = {"api": ["serve"], "worker": ["worker"], "webhooks": ["worker", "--webhooks"]}
# Job workers hold leases; their supervisor releases a dead one's jobs.
JOB_WORKERS = ("worker",)

# Restart back-off: 1 s, 2 s, 4 s ... up to BACKOFF_CAP_S; a process that ran STABLE_S starts again from 1 s.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
STABLE_S = 120.0


def run_up(settings: Settings, model: str, exit_after_demo: bool,
           demo_models: Sequence[str] = (*DEMO_MODELS, *BACKGROUND_DEMO_MODELS)) -> int:
    log_dir = settings.var_dir / "log"
    terminal = Terminal(sys.stdout)
    # SIGTERM (a process manager, `kill`) stops the service as Ctrl-C does: the children are in sessions of their
    # own, and without this they would outlive it.
    signal.signal(signal.SIGTERM, _interrupt)
    _quiet_this_process(log_dir / "up.log", settings.log_level)
    supervisor: Supervisor | None = None
    builds: DemoBuilds | None = None
    try:
        terminal.say(f"prunekit up: data in {_shown(settings.var_dir)}/, service logs in {_shown(log_dir)}/")
        from prunekit.core.db.session import migrate

        migrate(settings.database_url)
        terminal.say(f"database ready ({_database_name(settings)})")
        assert settings.models_root is not None
        now = [name for name in demo_models if name not in BACKGROUND_DEMO_MODELS]
        later = [name for name in demo_models if name in BACKGROUND_DEMO_MODELS]
        for name in now:
            if not (settings.models_root / name).exists():
                terminal.say(f"importing demo model local:{name} ...")
            import_model(settings, name, None)
        if now:
            terminal.say(f"demo models ready: {', '.join(f'local:{name}' for name in now)}")
        key = dev_api_key(settings)
        base_url = f"http://{settings.api_host}:{settings.api_port}"

        supervisor = Supervisor(settings, terminal, log_dir)
        supervisor.start()
        builds = DemoBuilds(settings, terminal, log_dir / "models.log", later)
        builds.start()
        wait_ready(base_url, supervisor)
        terminal.say(f"API ready on {base_url}")
        code, job_id = run_main_job(Client(base_url, key), model, terminal)
        where_to_go(terminal, settings, base_url, job_id, builds)
        if exit_after_demo:
            return code
        terminal.say("Serving. Press Ctrl-C to stop.")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        terminal.end_progress(keep=True)
        terminal.say("stopping ...")
        return 0
    except SystemExit as exc:
        terminal.end_progress(keep=True)
        if isinstance(exc.code, str):
            terminal.say(f"prunekit up: {exc.code} (details in {_shown(log_dir)}/)")
            return 1
        raise
    except Exception as exc:
        logging.getLogger("prunekit.up").exception("prunekit up failed")
        terminal.end_progress(keep=True)
        terminal.say(f"prunekit up failed: {exc} (details in {_shown(log_dir / 'up.log')})")
        return 1
    finally:
        if builds is not None:
            builds.stop()
        if supervisor is not None:
            supervisor.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _quiet_this_process(log_path: Path, level: str) -> None:
    """This process's own stderr (its JSON log lines, library warnings, progress bars, a traceback) goes to
    `up.log`; the terminal keeps stdout, where only Terminal writes. Libraries imported later (transformers, to
    import a model) are told to draw no progress bars at all."""
    from prunekit.core.logs import configure_logging

    os.environ.update(QUIET_ENV)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    configure_logging(level)


def _shown(path: Path) -> str:
    """A path as the person typed their way to it: relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _database_name(settings: Settings) -> str:
    if settings.is_sqlite:
        return f"SQLite, {_shown(Path(settings.database_url.removeprefix('sqlite:///')))}"
    return settings.database_url.split("://", 1)[0].split("+", 1)[0]


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


def wait_ready(base_url: str, supervisor: Supervisor, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if supervisor.failed_at_start():
            raise SystemExit("a service process keeps exiting during start-up; see its log")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the API did not become ready within {timeout_s:.0f} s")


# --- the terminal --------------------------------------------------------------------------------------------


class Terminal:
    """What the person who ran `prunekit up` sees: our lines, and at most one live progress bar under them.

    On a terminal the bar is redrawn in place (carriage return); other lines are written above it. When stdout is
    a file or a pipe (CI, a test) there is no redrawing: a progress line is written when a stage starts and then
    at each further tenth of it.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._lock = threading.Lock()
        self._bar = ""
        self._plain_step: tuple[str, int] | None = None

    def say(self, line: str) -> None:
        with self._lock:
            self._clear_bar()
            self.stream.write(line + "\n")
            self._draw_bar()
            self.stream.flush()

    def progress(self, stage: str, done: int, total: int, fraction: float, message: str) -> None:
        steps = f"{done}/{total}" if total > 1 else ""
        text = f"  {progress_bar(fraction)}  {stage:<18} {steps:>7}  {message}"
        with self._lock:
            if self.live:
                self._clear_bar()
                width = shutil.get_terminal_size((100, 24)).columns - 1
                self._bar = text[:width]  # a wrapped line could not be redrawn in place
                self._draw_bar()
            else:
                step = (stage, int(10 * done / total) if total else 0)
                if self._plain_step is None or step[0] != self._plain_step[0] or step[1] > self._plain_step[1]:
                    self._plain_step = step
                    self.stream.write(text + "\n")
            self.stream.flush()

    def end_progress(self, keep: bool = False) -> None:
        """The bar is erased (the job's last event says how it ended), or with `keep` left as it last was (an
        interrupted run), and the lines that follow go below it."""
        with self._lock:
            if self._bar:
                self.stream.write("\n" if keep else "\r\x1b[2K")
                self.stream.flush()
            self._bar = ""
            self._plain_step = None

    def _clear_bar(self) -> None:
        if self._bar:
            self.stream.write("\r\x1b[2K")

    def _draw_bar(self) -> None:
        if self._bar:
            self.stream.write(self._bar)


# --- the main job -----------------------------------------------------------------------------------------------


def run_main_job(client: Client, model: str, terminal: Terminal) -> tuple[int, str | None]:
    started = time.monotonic()
    try:
        job = client.create_job({"model": model, **MAIN_JOB})
    except ApiError as exc:
        terminal.say(f"could not submit the main job: {exc}")
        return 1, None
    terminal.say(f"main job {job['id']}: {MAIN_JOB['method']} at {MAIN_JOB['sparsity']:.0%} on {model}")
    overall = 0.0
    for event in follow(client, job["id"]):
        data = event.get("data") or {}
        if event["type"] == "progress":
            stage = str(data.get("stage", ""))
            fraction = job_fraction(stage, float(data.get("fraction") or 0.0))
            overall = overall if fraction is None else fraction
            terminal.progress(stage, int(data.get("done") or 0), int(data.get("total") or 0), overall,
                              event["message"])
        elif event["level"] != "info" or not event["message"].startswith(("Job created", "Job queued")):
            mark = "" if event["level"] == "info" else f"[{event['level']}] "
            terminal.say(f"  {mark}{event['message']}")
    terminal.end_progress()
    job = _retrying(lambda: client.get_job(job["id"]))
    elapsed = time.monotonic() - started
    if job["status"] != "succeeded":
        terminal.say(f"main job ended {job['status']}: {(job.get('error') or {}).get('message', '')}")
        return 1, job["id"]
    terminal.say("")
    for line in result_table(job, elapsed, [a["name"] for a in _retrying(lambda: client.artifacts(job["id"]))]):
        terminal.say(line)
    return 0, job["id"]


# The share of the main job's time each stage takes (SmolLM2-135M on a 2-core CPU: evaluation and pruning dominate),
# so that the one bar moves through the whole job at about the pace of the clock.
MAIN_JOB_STAGES = {"loading": 4, "calibration": 5, "evaluation_dense": 17, "pruning": 50, "evaluation_pruned": 15,
                   "saving": 5, "uploading": 4}


def job_fraction(stage: str, stage_fraction: float) -> float | None:
    """How far the whole job is, from how far its current stage is; None for a stage the main job has not."""
    if stage not in MAIN_JOB_STAGES:
        return None
    names = list(MAIN_JOB_STAGES)
    before = sum(MAIN_JOB_STAGES[name] for name in names[:names.index(stage)])
    current = MAIN_JOB_STAGES[stage] * max(0.0, min(1.0, stage_fraction))
    return min(1.0, (before + current) / sum(MAIN_JOB_STAGES.values()))


def result_table(job: dict[str, Any], elapsed_s: float, artifacts: list[str]) -> list[str]:
    metrics = job["metrics"]
    rows = [("achieved sparsity", f"{metrics['sparsity']['achieved']:.4f} (target {metrics['sparsity']['target']})")]
    if "perplexity" in metrics:
        ppl = metrics["perplexity"]
        rows.append(("perplexity", f"{ppl['dense']:.2f} dense -> {ppl['pruned']:.2f} pruned"))
    if "accuracy" in metrics:
        acc = metrics["accuracy"]
        rows.append(("zero-shot accuracy", f"{acc['dense']:.3f} dense -> {acc['pruned']:.3f} pruned"))
    timings = metrics.get("timings_s", {})
    rows.append(("stage times (s)", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())))
    rows.append(("artifacts", ", ".join(artifacts)))
    width = max(len(label) for label, _ in rows)
    return [f"main job {job['id']} succeeded in {elapsed_s:.1f} s",
            *(f"  {label:<{width}}  {value}" for label, value in rows)]


def follow(client: Client, job_id: str, poll_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """The job's events as they come, until it ends; an API that is being restarted is waited for."""
    after: int | None = None
    while True:
        events = _retrying(functools.partial(client.events, job_id, after))
        for event in events:
            after = event["id"]
            yield event
        if not events and _retrying(lambda: client.get_job(job_id))["status"] in _ENDED:
            yield from _retrying(functools.partial(client.events, job_id, after))
            return
        if not events:
            time.sleep(poll_s)


_ENDED = ("succeeded", "failed", "cancelled")


def _retrying(call: Callable[[], Any], timeout_s: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except (httpx.TransportError, ApiError) as exc:
            status = exc.problem.get("status") if isinstance(exc, ApiError) else None
            retriable = isinstance(exc, httpx.TransportError) or (isinstance(status, int) and status >= 500)
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(1)


def where_to_go(terminal: Terminal, settings: Settings, base_url: str, job_id: str | None,
                builds: DemoBuilds) -> None:
    key_file = _shown(settings.var_dir / "dev-api-key")
    auth = f'-H "Authorization: Bearer $(cat {key_file})"'
    rows = [("dashboard", f"{base_url}/dashboard/  (sign in with the key below)"),
            ("API key", key_file),
            ("API docs", f"{base_url}/docs"),
            ("try", f"curl -s {auth} {base_url}/v1/jobs/{job_id}" if job_id else f"curl -s {auth} {base_url}/v1/jobs"),
            ("logs", f"{_shown(settings.var_dir / 'log')}/  (api, worker, webhooks, models, up)")]
    terminal.say("")
    terminal.say("Where to go next:")
    for label, value in rows:
        terminal.say(f"  {label:<10} {value}")
    pending = builds.pending()
    if pending:
        terminal.say(f"  building   {', '.join(f'local:{n}' for n in pending)} (vision-language demo models, in the "
                     "background; listed as not ready until done)")
    if builds.requested:
        terminal.say(f"  VLMs       {', '.join(f'local:{n}' for n in builds.requested)}: prune each tower at its own "
                     "sparsity with \"targets\" (README walk-through), or from the dashboard's form")


# --- supervision ----------------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen[bytes]
    started_at: float
    failures: int = 0  # exits in a row, each after less than STABLE_S: the back-off grows with them
    restart_at: float | None = None  # it died; start it again at this time


def backoff_s(failures: int) -> float:
    """The wait before the `failures`-th restart in a row: 1, 2, 4, ... seconds, at most BACKOFF_CAP_S."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))


class Supervisor:
    """Starts the service's processes and keeps them running: one that exits is started again after a back-off,
    and the others (the API above all) go on. A job worker's death is written on the jobs it held, whose leases
    it releases at once: the restarted worker's reconciler, which runs as it starts, hands them on, and each
    resumes from its last checkpoint."""

    def __init__(self, settings: Settings, terminal: Terminal, log_dir: Path,
                 services: dict[str, list[str]] | None = None, poll_s: float = 0.25) -> None:
        self.settings, self.terminal, self.log_dir, self.poll_s = settings, terminal, log_dir, poll_s
        self.services = services or SERVICES
        self.children: dict[str, Child] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="prunekit-supervisor", daemon=True)

    def start(self) -> None:
        for name in self.services:
            self._spawn(name, failures=0)
        self._thread.start()

    def failed_at_start(self) -> bool:
        """A process that exited again and again at once: no use waiting for the API."""
        with self._lock:
            return any(child.failures >= 3 for child in self.children.values())

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)
        with self._lock:
            stop([child.proc for child in self.children.values()])

    def _spawn(self, name: str, failures: int) -> None:
        proc = spawn(self.services[name], self.log_dir / f"{name}.log")
        self._write_pid(name, proc.pid)
        with self._lock:
            self.children[name] = Child(name, self.services[name], proc, time.monotonic(), failures)

    def _write_pid(self, name: str, pid: int) -> None:
        """var/run/<name>.pid: which process is which, for a person (or a test) that wants to look or kill one."""
        run_dir = self.settings.var_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"{name}.pid").write_text(f"{pid}\n")

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            for child in list(self.children.values()):
                try:
                    self._check(child)
                except Exception:  # the supervisor itself must not die: log it and look again
                    logging.getLogger("prunekit.up").exception("supervising %s failed", child.name)

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at and not self._stopping.is_set():
                self._spawn(child.name, child.failures)
                self._tell(f"{child.name} started again (pid {self.children[child.name].proc.pid})")
            return
        code = child.proc.poll()
        if code is None or self._stopping.is_set():
            return
        how = exit_description(code)
        failures = 1 if now - child.started_at >= STABLE_S else child.failures + 1
        delay = backoff_s(failures)
        child.failures, child.restart_at = failures, now + delay
        jobs = self._release_jobs(child.proc.pid, how, delay) if child.name in JOB_WORKERS else []
        held = f"; its job {', '.join(jobs)} resumes from its last checkpoint" if jobs else ""
        self._tell(f"{child.name} (pid {child.proc.pid}) {how}; restarting it in {delay:.0f} s{held} "
                   f"(see {_shown(self.log_dir / (child.name + '.log'))})", logging.WARNING)

    def _tell(self, line: str, level: int = logging.INFO) -> None:
        logging.getLogger("prunekit.up").log(level, "%s", line)
        self.terminal.say(line)

    def _release_jobs(self, pid: int, how: str, delay: float) -> list[str]:
        """The dead worker's jobs, released; none when the database cannot be reached (their leases then run out
        by themselves, and the restarted worker's reconciler hands them on a lease later)."""
        from prunekit.core import lifecycle
        from prunekit.core.db.session import session_scope

        prefix = lifecycle.owner_prefix(socket.gethostname(), pid)
        try:
            with session_scope(self.settings) as session:
                return lifecycle.worker_died(session, prefix, how, delay)
        except Exception:
            logging.getLogger("prunekit.up").exception("could not release the jobs of worker %d", pid)
            return []


# --- the vision-language demo models, built in the background ---------------------------------------------------


class DemoBuilds:
    """Builds the slow demo models (digits-clip trains for minutes) one after another, each in a child process
    `prunekit models import NAME` at low priority, so the main job keeps the CPU. Until a model's folder is in
    place it has a marker (prunekit/core/model_builds.py), which the API reads to list it as not ready."""

    def __init__(self, settings: Settings, terminal: Terminal, log_path: Path, names: Sequence[str]) -> None:
        from prunekit.core import model_builds

        assert settings.models_root is not None
        self.root, self.terminal, self.log_path = settings.models_root, terminal, log_path
        self.requested = list(names)
        self.names = [name for name in names if not model_builds.is_ready(self.root, name)]
        for name in self.names:  # all listed as not ready from the start, stale markers of an earlier run replaced
            model_builds.mark_building(self.root, name)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prunekit-demo-builds", daemon=True)

    def start(self) -> None:
        if self.names:
            self.terminal.say(f"building {', '.join(f'local:{n}' for n in self.names)} in the background "
                              f"(a few minutes; {_shown(self.log_path)})")
            self._thread.start()

    def pending(self) -> list[str]:
        from prunekit.core import model_builds

        return [name for name in self.names if not model_builds.is_ready(self.root, name)]

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None:
            stop([proc], timeout_s=5)
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        from prunekit.core import model_builds

        for name in self.names:
            if self._stopping.is_set():
                return
            started = time.monotonic()
            self._proc = spawn(["models", "import", name], self.log_path)
            with contextlib.suppress(OSError):  # lower priority: the main job (and any job submitted) comes first
                os.setpriority(os.PRIO_PROCESS, self._proc.pid, 10)
            code = self._proc.wait()
            if self._stopping.is_set():
                return  # stopped by us: the marker stays, the next start builds it again
            if code == 0 and model_builds.is_ready(self.root, name):
                model_builds.clear_building(self.root, name)
                self.terminal.say(f"local:{name} is ready (built in {time.monotonic() - started:.0f} s)")
            else:
                how = exit_description(code)
                model_builds.mark_building(self.root, name, error=f"the build {how}; see {self.log_path}")
                self.terminal.say(f"building local:{name} failed ({how}); see {_shown(self.log_path)}")
