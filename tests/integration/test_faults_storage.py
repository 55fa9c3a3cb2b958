"""Faults of a worker's storage (issue #18): S3 down while a job uploads, the scratch disk full while it saves, and
the modes of what it stores, against a real service (API and worker processes, moto's S3 server, a real tmpfs)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import boto3
import pytest

from prunekit.core.db import queries
from prunekit.core.db.session import session_scope
from tests.conftest import REDIS_URL, free_port
from tests.integration.conftest import Service, fresh_database, kill_process, start_process, start_service
from tests.integration.test_reliability import (
    FAST_RECOVERY,
    QUICK,
    SLOW,
    assert_one_set_of_artifacts,
    ended,
    settings_of,
    stopping,
    submit,
    wait_for_status,
)

# --- S3 down during the upload -------------------------------------------------------------------------------------


class S3Relay:
    """A TCP relay in front of moto that a test takes down and brings back on the same port: the worker finds S3
    refusing connections, as when the service is down, while moto keeps what it had stored.

    With `trip`, the relay goes down by itself on the first request that matches it (that request is dropped, not
    forwarded), so the outage starts exactly when the worker uploads, and comes back `down_s` later (never if None).
    """

    def __init__(self, upstream_port: int, trip: re.Pattern[bytes] | None, down_s: float | None) -> None:
        self.port, self.upstream = free_port(), ("127.0.0.1", upstream_port)
        self.trip, self.down_s = trip, down_s
        self.tripped_at: float | None = None
        self.back_at: float | None = None
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._timer: threading.Timer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        for sock in ([listener] if listener else []) + list(conns):
            with suppress(OSError):  # wakes the accept loop; resets the worker's open connections
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # taken down
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        tail = b""
        try:
            while data := src.recv(1 << 16):
                if watch and self.trip is not None and self.tripped_at is None and self.trip.search(tail + data):
                    self._trip()
                    return
                tail = (tail + data)[-2048:]  # a request line split over two reads is still found
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _trip(self) -> None:
        with self._lock:
            if self.tripped_at is not None:
                return
            self.tripped_at = time.monotonic()
        self.down()
        if self.down_s is not None:
            self._timer = threading.Timer(self.down_s, self._back)
            self._timer.start()

    def _back(self) -> None:
        self.up()
        self.back_at = time.monotonic()


@pytest.fixture
def s3_relay_service(request: pytest.FixtureRequest, tmp_path: Path,
                     models_root: Path) -> Iterator[Callable[..., tuple[S3Relay, Service]]]:
    """make(down_s, **env): a Postgres + Redis + S3 service whose S3 is reached through an S3Relay that goes down
    when the worker first uploads an attempt's file. Relay and service are always stopped at the end."""
    s3 = request.getfixturevalue("s3_endpoint")
    with ExitStack() as stack:

        def make(down_s: float | None, **env: str) -> tuple[S3Relay, Service]:
            bucket = f"prunekit-faults-{secrets.token_hex(4)}"
            boto3.client("s3", endpoint_url=s3, region_name="us-east-1").create_bucket(Bucket=bucket)
            # Path-style requests: `PUT /<bucket>/artifacts/<tenant>/<job>/attempt-<n>/<file>`.
            trip = re.compile(rb"PUT /" + bucket.encode() + rb"/artifacts/[^ ]+/attempt-\d+/")
            relay = S3Relay(int(s3.rsplit(":", 1)[1]), trip, down_s)
            relay.up()
            stack.callback(relay.close)
            queue = f"prunekit-faults-{secrets.token_hex(4)}"
            # The default lease: an attempt that waits on S3 keeps its job (the heartbeat goes on meanwhile).
            overrides = {"QUEUE_NAME": queue, "DATABASE_URL": stack.enter_context(fresh_database()),
                         "BROKER_URL": REDIS_URL, "ARTIFACT_STORE": f"s3://{bucket}/artifacts",
                         "S3_ENDPOINT_URL": relay.url, **env}
            tmp = tmp_path / f"svc-{queue}"
            tmp.mkdir()
            service = start_service(overrides, tmp, models_root)
            stack.enter_context(stopping(service, queue))
            return relay, service

        yield make


def events_of(service: Service, job_id: str) -> list[dict[str, Any]]:
    return service.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def artifact_rows(service: Service, job_id: str) -> int:
    with session_scope(settings_of(service)) as session:
        return len(queries.list_artifacts(session, job_id))


def test_an_upload_waits_out_an_s3_outage_and_goes_on(s3_relay_service: Callable[..., tuple[S3Relay, Service]]
                                                      ) -> None:
    """S3 goes down at the first upload and comes back 6 s later (botocore's own retries give up in under a
    second): the upload is retried, carries on, and the job has one set of artifacts, all of them in the store."""
    relay, service = s3_relay_service(down_s=6, STORAGE_RETRY_S="60")
    job_id = submit(service, QUICK)
    [job] = wait_for_status(service, [job_id], ended, 120, "the end of the job")
    assert relay.tripped_at is not None, "S3 never went down during the upload"
    assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
    assert relay.back_at is not None and relay.back_at - relay.tripped_at >= 6
    assert_one_set_of_artifacts(service, job_id)
    messages = [e["message"] for e in events_of(service, job_id)]
    [went] = [m for m in messages if m.startswith("The artifact store cannot be reached while uploading")]
    [back] = [m for m in messages if m.startswith("The artifact store is back after")]
    assert "retrying for up to 60 s" in went and "the upload goes on" in back


def test_an_upload_to_an_s3_that_stays_down_fails_readably_and_the_worker_goes_on(
        s3_relay_service: Callable[..., tuple[S3Relay, Service]]) -> None:
    relay, service = s3_relay_service(down_s=None, STORAGE_RETRY_S="5")
    job_id = submit(service, QUICK)
    [job] = wait_for_status(service, [job_id], ended, 120, "the end of the job")
    assert relay.tripped_at is not None, "S3 never went down during the upload"
    assert job["status"] == "failed", f"{job}{service.log_tail()}"
    assert job["error"]["code"] == "storage_unavailable", job["error"]
    assert "could not be reached for 5 s while uploading" in job["error"]["message"]
    assert service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
    assert artifact_rows(service, job_id) == 0

    relay.trip = None  # S3 is back for good
    relay.up()
    again = submit(service, QUICK)
    [job] = wait_for_status(service, [again], ended, 120, "the end of the next job")
    assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
    assert_one_set_of_artifacts(service, again)
    assert service.processes["worker"].poll() is None


# --- the scratch disk full while saving ----------------------------------------------------------------------------


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on path (root only), always unmounted."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, timeout=30)
        if os.path.ismount(path):  # a process still holds a file there: detach it now, freed when released
            subprocess.run(["umount", "-l", str(path)], check=True, timeout=30)


def fill(disk: Path, leave_bytes: int) -> Path:
    """A file taking all the room of `disk` but leave_bytes: somebody else's files that filled the disk."""
    vfs = os.statvfs(disk)
    ballast = disk / "ballast"
    with ballast.open("wb") as fh:
        fh.write(b"\0" * (vfs.f_bavail * vfs.f_frsize - leave_bytes))
    return ballast


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def worker_of(service: Service, job_id: str) -> str:
    [started] = [e for e in events_of(service, job_id) if e["message"].startswith("Job started")]
    return started["message"]


def test_a_full_scratch_disk_fails_the_save_readably_and_the_worker_serves_the_next_job(
        tmp_path: Path, models_root: Path) -> None:
    with ExitStack() as stack:
        work = stack.enter_context(small_disk(tmp_path / "work", "8m"))
        # The tiny Llama loads from the models root and its safetensors (890 kB) is the scratch's first big file:
        # with 400 kB left it is the save that finds the disk full (no checkpoints, which would write first).
        ballast = fill(work, 400 * 1024)
        service = start_service({"QUEUE_NAME": f"prunekit-faults-{secrets.token_hex(4)}", "WORK_DIR": str(work),
                                 "CHECKPOINT_EVERY_BLOCKS": "0"}, tmp_path, models_root)
        stack.enter_context(stopping(service, None))

        job_id = submit(service, QUICK)
        [job] = wait_for_status(service, [job_id], ended, 120, "the end of the job")
        assert job["status"] == "failed", f"{job}{service.log_tail()}"
        assert job["error"]["code"] == "disk_full", job["error"]
        # The writer checks the room its shards need before writing any: the message says how much is missing.
        message = job["error"]["message"]
        assert "ran out of disk space" in message and "No space left" in message and "MB free" in message, message
        assert job["progress"]["stage"] == "saving"
        assert files_under(work) == ["ballast"]  # the half-saved model went with the job
        assert service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []

        ballast.unlink()  # the operator frees the disk; the same worker process takes the next job
        again = submit(service, QUICK)
        [job] = wait_for_status(service, [again], ended, 120, "the end of the next job")
        assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
        assert worker_of(service, again).split(":")[1] == worker_of(service, job_id).split(":")[1]  # its pid
        assert service.processes["worker"].poll() is None
        assert files_under(work) == []


# --- modes: another user reads what the worker stored ---------------------------------------------------------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Processes started inside inherit this umask (a service manager's UMask=0077)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def read_as_nobody(path: Path) -> bytes:
    done = subprocess.run(["cat", str(path)], user=65534, group=65534, extra_groups=[], capture_output=True,
                          timeout=30)
    assert done.returncode == 0, f"nobody cannot read {path}: {done.stderr.decode(errors='replace')}"
    return done.stdout


def assert_open_to_readers(root: Path, under: Path) -> None:
    """Every folder from root down to each file is 0755 and every file 0644, and nobody reads each file."""
    files = [p for p in under.rglob("*") if p.is_file()]
    assert files, f"nothing under {under}"
    for path in [under, *under.rglob("*")]:
        want = 0o644 if path.is_file() else 0o755
        assert stat.S_IMODE(path.stat().st_mode) == want, f"{path.relative_to(root)} is {oct(path.stat().st_mode)}"
    for path in files:
        assert read_as_nobody(path) == path.read_bytes()


@pytest.fixture
def tiny_llama_8(models_root: Path) -> str:
    """An 8-block tiny Llama: enough blocks to be stopped after a few, with checkpoints stored."""
    from prunekit.fixtures.demo_models import build_tiny_llama

    if not (models_root / "tiny-llama-8").exists():
        build_tiny_llama(models_root / "tiny-llama-8", layers=8)
    return "local:tiny-llama-8"


def test_checkpoints_and_artifacts_are_readable_by_another_user_whatever_the_workers_umask(
        tmp_path: Path, models_root: Path, tiny_llama_8: str) -> None:
    # The store in a folder every user may traverse (pytest's own are private to root); its root is the operator's.
    root = Path(tempfile.mkdtemp(prefix="prunekit-modes-"))
    root.chmod(0o755)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        with umask(0o077):
            service = start_service({"QUEUE_NAME": f"prunekit-faults-{secrets.token_hex(4)}", **FAST_RECOVERY,
                                     "ARTIFACT_STORE": str(root / "artifacts")}, tmp_path, models_root)
        stack.enter_context(stopping(service, None))

        job_id = submit(service, SLOW | {"model": tiny_llama_8, "calibration": {"num_samples": 64, "seq_len": 256},
                                         "evaluation": {"num_samples": 8, "seq_len": 128}})
        [job] = wait_for_status(service, [job_id], lambda j: ended(j) or (j["progress"] or {}).get("stage") ==
                                "pruning" and j["progress"]["done"] >= 2, 180, "two blocks pruned")
        kill_process(service, "worker")  # what it stored stays as it was: its checkpoints
        assert job["status"] == "running", f"the job ended before its worker could be stopped: {job}"
        [checkpoints] = list((root / "artifacts").glob(f"*/{job_id}/checkpoints"))
        assert (checkpoints / "state.json").is_file()
        assert_open_to_readers(root, root / "artifacts")

        with umask(0o077):
            start_process(service, "worker2", "worker")
        [job] = wait_for_status(service, [job_id], ended, 240, "the end of the resumed job")
        assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
        assert not checkpoints.exists() or files_under(checkpoints) == []
        [attempt] = list(checkpoints.parent.glob("attempt-*"))
        assert_open_to_readers(root, root / "artifacts")
        for artifact in service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]:
            content = read_as_nobody(attempt / artifact["name"])
            assert hashlib.sha256(content).hexdigest() == artifact["sha256"], artifact["name"]
