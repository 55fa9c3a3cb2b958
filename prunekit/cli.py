"""The `prunekit` command: serve, worker, keys, models, and `up` (everything at once, for `make run`)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from prunekit.core.config import Settings, get_settings
from prunekit.keys import create_key
from prunekit.models_root import BACKGROUND_DEMO_MODELS, BUILT_IN_MODELS, import_model, synth_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (migrates the database first)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)

    worker = sub.add_parser("worker", help="run a Celery worker that executes pruning jobs (or, with --webhooks, "
                                           "one that delivers webhooks)")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="jobs at once (default 1), or deliveries at once with --webhooks (WEBHOOK_CONCURRENCY)")
    worker.add_argument("--webhooks", action="store_true",
                        help="consume the webhook queue (WEBHOOK_QUEUE_NAME) instead of the job queue")

    sub.add_parser("migrate", help="bring the database schema up to date")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create an API key for a tenant (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    revoke = keys.add_parser("revoke", help="revoke a key (give the key, or the 10-character prefix it starts with)")
    revoke.add_argument("key")

    models = sub.add_parser("models", help="manage the models root").add_subparsers(dest="models_command",
                                                                                     required=True)
    imp = models.add_parser("import",
                            help=f"import a model as local:<name> ({', '.join(BUILT_IN_MODELS)} are built in)")
    imp.add_argument("name")
    imp.add_argument("--from", dest="source", type=Path, default=None,
                     help="a .gguf file or an HF folder (safetensors) to import under NAME")
    imp.add_argument("--force", action="store_true", help="replace an existing model of that name")
    synth = models.add_parser("synth", help="write a seeded random-init Llama of about --params parameters as "
                                            "local:<name>, shard by shard (for tests and benchmarks)")
    synth.add_argument("name")
    synth.add_argument("--params", type=float, required=True, help="parameters wanted, e.g. 3e9")
    synth.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-size-mb", type=int, default=None,
                       help="largest shard in MB (default OUTPUT_SHARD_MB)")
    synth.add_argument("--force", action="store_true", help="replace an existing model of that name")
    models.add_parser("list", help="list the models under the models root")

    up = sub.add_parser("up", help="migrate, import demo models, start API + worker, run the main job, keep serving")
    up.add_argument("--model", default="local:smollm2-135m")
    up.add_argument("--exit-after-demo", action="store_true", help="stop everything once the main job ends")
    up.add_argument("--demo-models", default=",".join(BUILT_IN_MODELS),
                    help="built-in models to make available, comma-separated (default: all; "
                         f"{', '.join(BACKGROUND_DEMO_MODELS)} are built in the background)")

    from prunekit import jobs_cli

    jobs_cli.add_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "jobs":
        return jobs_cli.run(args)
    settings = get_settings()
    if args.command == "serve":
        return cmd_serve(settings, args.host, args.port)
    if args.command == "worker":
        if args.webhooks:
            return cmd_webhook_worker(settings, args.concurrency or settings.webhook_concurrency)
        return cmd_worker(settings, args.concurrency or 1)
    if args.command == "migrate":
        from prunekit.core.db.session import migrate

        migrate(settings.database_url)
        return 0
    if args.command == "keys" and args.keys_command == "create":
        print(create_key(settings, args.tenant, args.name))
        return 0
    if args.command == "keys":
        from app.auth import revoke_key
        from prunekit.core.db.session import session_scope

        with session_scope(settings) as session:
            count = revoke_key(session, args.key)
        print(f"revoked {count} key(s)")
        return 0 if count else 1
    if args.command == "models" and args.models_command == "import":
        dest = import_model(settings, args.name, args.source, args.force)
        print(f"local:{args.name} -> {dest}")
        return 0
    if args.command == "models" and args.models_command == "synth":
        dest, made = synth_model(settings, args.name, args.params, args.dtype, args.seed, args.shard_size_mb,
                                 args.force)
        if made is None:
            print(f"local:{args.name} -> {dest} (already there)")
        else:
            print(f"local:{args.name} -> {dest}\nparameters: {made.num_parameters:,}\nbytes: {made.num_bytes:,} "
                  f"in {sum(p.suffix == '.safetensors' for p in made.files)} shard(s)")
        return 0
    if args.command == "models":
        root = settings.models_root
        assert root is not None
        from prunekit.core.model_builds import building

        pending = building(root)
        names = {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.exists() else set()
        for name in sorted(names | set(pending)):  # hidden names are temporary folders and the build markers
            state = pending[name].get("error", "building") if name in pending else ""
            print(f"local:{name}" + (f"  (not ready: {state})" if state else ""))
        return 0
    from prunekit.up import run_up

    demo_models = [name.strip() for name in args.demo_models.split(",") if name.strip()]
    unknown = sorted(set(demo_models) - set(BUILT_IN_MODELS))
    if unknown:
        parser.error(f"--demo-models: {', '.join(unknown)} not built in (choose from {', '.join(BUILT_IN_MODELS)})")
    return run_up(settings, args.model, args.exit_after_demo, demo_models)


def cmd_serve(settings: Settings, host: str | None, port: int | None) -> int:
    from prunekit.core.db.session import migrate
    from prunekit.core.logs import configure_logging
    from prunekit.serve import serve

    configure_logging(settings.log_level)
    workers = settings.api_workers
    if workers > 1 and not settings.rate_limit_url.startswith(("redis://", "rediss://")):
        raise SystemExit("API_WORKERS > 1 needs the rate-limit counters in Redis (a redis:// BROKER_URL or "
                         "RATE_LIMIT_URL): in memory, each process would allow the whole limit on its own.")
    migrate(settings.database_url)
    metrics_dir = None
    if workers > 1:
        # Each process writes its HTTP latency samples here; /metrics, whichever process answers, sums them all.
        metrics_dir = tempfile.mkdtemp(prefix="prunekit-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        serve(workers, host or settings.api_host, port or settings.api_port, settings.log_level)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def cmd_worker(settings: Settings, concurrency: int) -> int:
    from prunekit.core.logs import configure_logging
    from workers.celery_app import celery

    configure_logging(settings.log_level)

    # One job per process: torch does its own threading, and fork after torch import is fragile.
    pool = "solo" if concurrency == 1 else "prefork"
    celery.worker_main(["worker", f"--loglevel={settings.log_level.upper()}", f"--concurrency={concurrency}",
                        f"--pool={pool}", "-Q", settings.queue_name, "-E",
                        f"--hostname=prunekit-{os.getpid()}@%h"])
    return 0


def cmd_webhook_worker(settings: Settings, concurrency: int) -> int:
    """The webhook queue's consumer: deliveries wait on the network, so threads, many at once, and no torch."""
    from prunekit.core.logs import configure_logging
    from workers.celery_app import celery

    configure_logging(settings.log_level)
    celery.worker_main(["worker", f"--loglevel={settings.log_level.upper()}", f"--concurrency={concurrency}",
                        "--pool=threads", "-Q", settings.webhook_queue_name, "-E",
                        f"--hostname=prunekit-webhooks-{os.getpid()}@%h"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
