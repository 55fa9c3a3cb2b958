"""`prunekit jobs submit | watch | download | list`: the HTTP API from a terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from prunekit.client import ApiError, Client
from prunekit.core.config import get_settings
from prunekit.core.transfer import sha256_of


def add_parser(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="submit, watch, download and list jobs over the HTTP API")
    jobs.add_argument("--api-url", default=os.environ.get("PRUNEKIT_API_URL", ""),
                      help="default: $PRUNEKIT_API_URL, else http://API_HOST:API_PORT")
    jobs.add_argument("--api-key", default=os.environ.get("PRUNEKIT_API_KEY", ""),
                      help="default: $PRUNEKIT_API_KEY, else the key in var/dev-api-key")
    cmds = jobs.add_subparsers(dest="jobs_command", required=True)

    submit = cmds.add_parser("submit", help="submit a job; prints its id")
    submit.add_argument("--model", required=True)
    submit.add_argument("--method", default="wanda")
    submit.add_argument("--sparsity", type=float, required=True)
    submit.add_argument("--pattern", default="unstructured")
    submit.add_argument("--calibration-samples", type=int, default=None)
    submit.add_argument("--calibration-seq-len", type=int, default=None)
    submit.add_argument("--eval-samples", type=int, default=None)
    submit.add_argument("--eval-seq-len", type=int, default=None)
    submit.add_argument("--no-eval", action="store_true", help="skip perplexity")
    submit.add_argument("--body", type=Path, default=None, help="a JSON file with the whole request body")
    submit.add_argument("--idempotency-key", default=None)
    submit.add_argument("--watch", action="store_true", help="follow the job until it ends")

    watch = cmds.add_parser("watch", help="follow a job with a progress bar until it ends")
    watch.add_argument("job_id")

    download = cmds.add_parser("download", help="download every artifact of a job, checking sha256")
    download.add_argument("job_id")
    download.add_argument("--to", type=Path, default=None, help="folder (default: ./<job id>)")

    listing = cmds.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--status", default=None)
    listing.add_argument("--limit", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    client = make_client(args.api_url, args.api_key)
    try:
        if args.jobs_command == "submit":
            return submit(client, args)
        if args.jobs_command == "watch":
            return watch(client, args.job_id)
        if args.jobs_command == "download":
            return download(client, args.job_id, args.to or Path(args.job_id))
        return list_jobs(client, args.status, args.limit)
    except ApiError as exc:
        problem = exc.problem
        field = f" ({problem['param']})" if problem.get("param") else ""
        print(f"error {problem.get('status')}{field}: {problem.get('detail')}", file=sys.stderr)
        return 2


def make_client(api_url: str, api_key: str) -> Client:
    settings = get_settings()
    url = api_url or f"http://{settings.api_host}:{settings.api_port}"
    key_file = settings.var_dir / "dev-api-key"
    key = api_key or (key_file.read_text().strip() if key_file.exists() else "")
    if not key:
        raise SystemExit("no API key: pass --api-key or set PRUNEKIT_API_KEY")
    return Client(url, key)


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.body is not None:
        return json.loads(args.body.read_text())
    body: dict[str, Any] = {"model": args.model, "method": args.method, "sparsity": args.sparsity,
                            "pattern": args.pattern}
    calibration = {"num_samples": args.calibration_samples, "seq_len": args.calibration_seq_len}
    evaluation = {"num_samples": args.eval_samples, "seq_len": args.eval_seq_len}
    if any(v is not None for v in calibration.values()):
        body["calibration"] = {k: v for k, v in calibration.items() if v is not None}
    body["evaluation"] = {"perplexity": not args.no_eval, **{k: v for k, v in evaluation.items() if v is not None}}
    return body


def submit(client: Client, args: argparse.Namespace) -> int:
    job = client.create_job(build_body(args), args.idempotency_key)
    print(job["id"])
    return watch(client, job["id"]) if args.watch else 0


def watch(client: Client, job_id: str) -> int:
    tty = sys.stderr.isatty()
    for event in client.follow(job_id):
        data = event.get("data") or {}
        if event["type"] == "progress":
            stage = f"{data.get('stage', ''):<18} {data.get('done')}/{data.get('total')}"
            line = f"{bar(data.get('fraction', 0.0))} {stage}"
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        elif event["level"] != "info" or "status" in data:
            print(("\n" if tty else "") + f"[{event['level']}] {event['message']}", file=sys.stderr, flush=True)
    job = client.get_job(job_id)
    print(json.dumps({"id": job["id"], "status": job["status"], "metrics": job["metrics"], "error": job["error"]},
                     indent=2))
    return 0 if job["status"] == "succeeded" else 1


def download(client: Client, job_id: str, dest: Path) -> int:
    artifacts = client.artifacts(job_id)
    if not artifacts:
        print(f"{job_id} has no artifacts", file=sys.stderr)
        return 1
    for artifact in artifacts:
        path = dest / artifact["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download(artifact["id"], path)
        if sha256_of(path) != artifact["sha256"]:  # one buffer at a time: artifacts run to several GB
            print(f"sha256 mismatch for {artifact['name']}", file=sys.stderr)
            return 1
        print(f"{path}  {artifact['size_bytes']} bytes  sha256 ok")
    return 0


def list_jobs(client: Client, status: str | None, limit: int) -> int:
    page = client.list_jobs(limit, status)
    print(f"{'id':<34} {'status':<17} {'model':<28} {'method':<10} {'sparsity':>8} {'progress':>8}")
    for job in page["data"]:
        fraction = (job.get("progress") or {}).get("fraction", 0.0)
        req = job["request"]
        # A budget job has no requested sparsity: the one it chose once it has, else "budget".
        sparsity = req.get("sparsity")
        if sparsity is None:
            sparsity = ((job.get("metrics") or {}).get("budget") or {}).get("chosen_sparsity")
        shown = f"{sparsity:>8.2f}" if sparsity is not None else f"{'budget':>8}"
        print(f"{job['id']:<34} {job['status']:<17} {req['model'][:28]:<28} {req['method']:<10} "
              f"{shown} {fraction:>8.0%}")
    return 0


def bar(fraction: float, width: int = 24) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction:4.0%}"
