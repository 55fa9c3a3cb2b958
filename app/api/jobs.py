"""Jobs: create, read, list, cancel, events."""

from __future__ import annotations

import json
import logging
from types import EllipsisType
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response

from app import capabilities as caps
from app.api.datasets import load_dataset
from app.api.deps import PrincipalDep, SessionDep, SettingsDep
from app.errors import Problem
from app.schemas import (
    JOB_ID_PATTERN,
    EventList,
    JobCreate,
    JobList,
    JobOut,
    JobStatusName,
    event_out,
    is_id,
    job_out,
)
from prunekit.core import lifecycle
from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.models import Job, TenantModel
from prunekit.core.model_builds import building
from prunekit.core.webhooks import unreachable_destination
from prunekit.queue import QueueOutbox, enqueue_job
from prunekit.vocabulary import TASK, JobStatus, parse_job_model_ref, same_sparsity, sweep_folder

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("prunekit.api")

# Event ids are a bigint column; a larger cursor is refused (it answered 500 before).
EVENT_ID_MAX = 2**63 - 1
# The id's shape is published; any other id answers 404, like an unknown one, as it always has.
JobId = Annotated[str, Path(json_schema_extra={"pattern": JOB_ID_PATTERN})]


def load_job(session: SessionDep, tenant_id: str, job_id: str) -> Job:
    job = queries.get_job(session, tenant_id, job_id) if is_id("job", job_id) else None
    if job is None:
        raise job_not_found(job_id)
    return job


def job_not_found(job_id: str) -> Problem:
    # Another tenant's job answers exactly like a missing one: existence is not revealed.
    return Problem(404, "job_not_found", f"No job {job_id!r}.", param="id")


def check_local_model(settings: SettingsDep, model: str) -> None:
    if not model.startswith("local:"):
        return
    name = model.removeprefix("local:")
    root = settings.models_root
    assert root is not None
    folder = (root / name).resolve()
    if not folder.is_relative_to(root) or not folder.is_dir():
        marker = building(root).get(name) if root.is_dir() else None
        if marker is not None and not marker.get("error"):
            raise Problem(422, "model_not_ready", f"The server is still building {name!r}; GET /v1/models says when "
                          "it is ready.", param="model")
        raise Problem(422, "unknown_model", f"No model {name!r} under the server's models root; "
                      "import it with 'prunekit models import'.", param="model")


# --- a tenant's model (mdl_...) and a finished job's model (job:<id>[/sparsity-<s>]) ----------------------


def check_model(session: SessionDep, tenant_id: str, settings: Settings, model: str) -> str | None:
    """The job's model exists for this tenant and can be used now; returns its config's model_type where known
    (local, tenant and job models), for the checks of datasets against the model."""
    check_local_model(settings, model)
    if is_id("mdl", model):
        return tenant_model(session, tenant_id, model).model_type
    parent = parse_job_model_ref(model)
    if parent is not None:
        job, _ = parent_job(session, tenant_id, model, *parent)
        return check_model_type(session, tenant_id, settings, job.request["model"], depth=1)
    return local_model_type(settings, model)


def tenant_model(session: SessionDep, tenant_id: str, model_id: str) -> TenantModel:
    row = queries.get_model(session, tenant_id, model_id)
    if row is None:
        raise Problem(422, "unknown_model", f"No model {model_id!r} of yours (GET /v1/models lists them).",
                      param="model")
    if row.status != "ready":
        reason = f": {row.error['message']}" if row.error else ""
        raise Problem(422, "model_not_ready", f"Model {model_id} is {row.status}{reason}.", param="model")
    return row


def parent_job(session: SessionDep, tenant_id: str, ref: str, job_id: str,
               sparsity: str | None) -> tuple[Job, str | None]:
    """A finished job of this tenant whose pruned model `ref` names, and the folder of its artifacts it lies in
    (None: the job's top level; `sparsity-<s>` for one model of a sweep)."""
    job = queries.get_job(session, tenant_id, job_id) if is_id("job", job_id) else None
    if job is None:
        raise Problem(422, "unknown_model", f"No job {job_id!r} of yours to take the model from.", param="model")
    if job.status != JobStatus.SUCCEEDED:
        raise Problem(422, "model_not_ready", f"Job {job_id} has not succeeded ({job.status}); only a succeeded "
                      "job's pruned model can be the input of another.", param="model")
    swept = [float(s) for s in (job.request.get("sweep") or {}).get("sparsities", ())]
    folders = [sweep_folder(s) for s in swept]
    if sparsity is None:
        if swept:
            raise Problem(422, "unknown_model", f"Job {job_id} is a sweep with one pruned model per sparsity: name "
                          f"one, {', '.join(f'job:{job_id}/{f}' for f in folders)}.", param="model")
        return job, None
    try:
        wanted = float(sparsity)
    except ValueError:
        wanted = -1.0
    folder = next((sweep_folder(s) for s in swept if same_sparsity(s, wanted)), None)
    if folder is None:
        held = f"its models: {', '.join(f'job:{job_id}/{f}' for f in folders)}" if swept else \
            f"it is not a sweep: name it job:{job_id}"
        raise Problem(422, "unknown_model", f"Job {job_id} has no model at sparsity {sparsity} ({held}).",
                      param="model")
    return job, folder


def check_model_type(session: SessionDep, tenant_id: str, settings: Settings, model: str, depth: int) -> str | None:
    """The model_type of a chained job's first model (a job's model is the model it pruned, pruned)."""
    if is_id("mdl", model):
        row = queries.get_model(session, tenant_id, model)
        return row.model_type if row is not None else None
    parent = parse_job_model_ref(model)
    if parent is not None and depth < 32:
        job = queries.get_job(session, tenant_id, parent[0]) if is_id("job", parent[0]) else None
        return check_model_type(session, tenant_id, settings, job.request["model"], depth + 1) if job else None
    return local_model_type(settings, model)


def local_model_type(settings: Settings, model: str) -> str | None:
    """config.json's model_type of a local model ("gguf" for a GGUF folder); None where it cannot be told."""
    if not model.startswith("local:"):
        return None
    assert settings.models_root is not None
    folder = settings.models_root / model.removeprefix("local:")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):  # a GGUF folder, or a config the worker will refuse itself
        model_type = "gguf" if any(folder.glob("*.gguf")) else None
    return model_type if isinstance(model_type, str) else None


def check_restore(session: SessionDep, tenant_id: str, settings: Settings, body: JobCreate,
                  model_type: str | None | EllipsisType = ...) -> None:
    """The restore dataset exists for this tenant and fits the model; a local CLIP model trains on image-text
    pairs in batches of at least two (its loss is contrastive). Other mismatches fail the job on the worker."""
    restore = body.restore
    if restore is None:
        return
    kind = caps.BUILTIN_DATASETS.get(restore.dataset) if restore.dataset is not None else None
    if restore.dataset is not None and restore.dataset.startswith("ds_"):
        kind = load_dataset(session, tenant_id, restore.dataset, param="restore.dataset").kind
    if isinstance(model_type, EllipsisType):
        model_type = local_model_type(settings, body.model)
    check_dataset_fits_model(settings, body.model, kind, param="restore.dataset", model_type=model_type)
    if model_type != "clip":
        return
    if restore.batch_size < 2:
        raise Problem(422, "invalid_request", "restore.batch_size: a CLIP model is restored with a contrastive "
                      "loss, which needs at least two image-text pairs per batch", param="restore.batch_size")
    if kind == "text":
        raise Problem(422, "incompatible_dataset", "A CLIP model is restored on image-text pairs; "
                      f"{restore.dataset} is text only.", param="restore.dataset")


def check_dataset_fits_model(settings: Settings, model: str, dataset_kind: str | None,
                             param: str = "calibration.dataset",
                             model_type: str | None | EllipsisType = ...) -> None:
    """An image-text dataset needs a model with a vision tower. Only a local model can be told apart here, from
    its config.json (plain JSON); for other models the worker finds out and fails the job (dataset_error)."""
    if dataset_kind == TASK:  # a task file holds multiple-choice items, no text to calibrate on
        raise Problem(422, "incompatible_dataset", f"The {param.split('.')[0]} dataset is a task file (multiple-"
                      "choice items); name it in evaluation.tasks, and use a text dataset here.", param=param)
    if dataset_kind != "image-text":
        return
    if isinstance(model_type, EllipsisType):  # not resolved by the caller: a local model's config tells
        model_type = local_model_type(settings, model)
    if model_type is not None and model_type not in caps.VISION_MODEL_TYPES:
        what = "restore" if param.startswith("restore") else "calibration"
        raise Problem(422, "incompatible_dataset", f"The {what} dataset is image-text, but {model} is a "
                      f"text-only model ({model_type}) without a vision tower; use a text dataset such as "
                      "builtin:wiki-en.", param=param)


def check_webhook(settings: Settings, body: JobCreate) -> None:
    if body.webhook is None or settings.webhook_allow_private_hosts:
        return
    # Names are resolved only when the webhook is sent (they may change meanwhile); an address is refused here.
    refusal = unreachable_destination(str(body.webhook.url), lookup=None)
    if refusal is not None:
        raise Problem(422, "invalid_request", f"webhook.url: {refusal}; webhooks go to public addresses only "
                      "(WEBHOOK_ALLOW_PRIVATE_HOSTS allows others).", param="webhook.url")


# --- quality-budget jobs ---------------------------------------------------------------------------


def check_budget(body: JobCreate, model_type: str | None) -> None:
    """A budget's bound is one the model measures: zero-shot accuracy for CLIP-style models, perplexity for the
    others (language models, and LLaVA's and BLIP-2's language model). Where the model type cannot be told here,
    the worker finds out and fails the job (invalid_spec)."""
    if body.budget is None or model_type is None:
        return
    clip = model_type == "clip"
    if body.budget.max_accuracy_drop is not None and not clip:
        raise Problem(422, "invalid_request", f"budget.max_accuracy_drop: {body.model} ({model_type}) has no "
                      "zero-shot accuracy to measure, which only CLIP-style models have; use "
                      "budget.max_perplexity_ratio.", param="budget.max_accuracy_drop")
    if body.budget.max_perplexity_ratio is not None and clip:
        raise Problem(422, "invalid_request", f"budget.max_perplexity_ratio: {body.model} is a CLIP model, which has "
                      "no perplexity; use budget.max_accuracy_drop (zero-shot accuracy).",
                      param="budget.max_perplexity_ratio")


# --- evaluation.tasks ----------------------------------------------------------------------------


def check_tasks(session: SessionDep, tenant_id: str, body: JobCreate, model_type: str | None | EllipsisType) -> None:
    """Each uploaded task is a task file of this tenant's; a CLIP model has no log-likelihood to score them with
    (told here for a model whose config the server reads; the worker refuses the others)."""
    tasks = body.evaluation.tasks
    if not tasks:
        return
    if model_type == "clip":
        raise Problem(422, "invalid_request", "evaluation.tasks: multiple-choice tasks are scored by a language "
                      f"model's log-likelihood; {body.model} is a CLIP model.", param="evaluation.tasks")
    for ref in tasks:
        if not ref.startswith("ds_"):
            continue
        dataset = load_dataset(session, tenant_id, ref, param="evaluation.tasks")
        if dataset.kind != TASK:
            raise Problem(422, "incompatible_dataset", f"{ref} is a {dataset.kind} dataset, not a task file (a "
                          ".jsonl of {\"context\", \"choices\", \"answer\"} items).", param="evaluation.tasks")


@router.post("", status_code=201, response_model=JobOut)
def create_job(body: JobCreate, session: SessionDep, principal: PrincipalDep, settings: SettingsDep,
               response: Response,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    if body.sparsity is None and body.budget is None:  # a budget job's sparsity stays null: the search chooses it
        if body.sweep is None:
            raise Problem(422, "invalid_request", "sparsity: Field required (unless a sweep gives the sparsities "
                          "or a budget searches for one)", param="sparsity")
        body.sparsity = body.sweep.sparsities[0]
    model_type = check_model(session, principal.tenant_id, settings, body.model)
    check_webhook(settings, body)
    dataset_kind = caps.BUILTIN_DATASETS.get(body.calibration.dataset)
    if body.calibration.dataset.startswith("ds_"):
        dataset_kind = load_dataset(session, principal.tenant_id, body.calibration.dataset,
                                    param="calibration.dataset").kind
    check_dataset_fits_model(settings, body.model, dataset_kind, model_type=model_type)
    check_restore(session, principal.tenant_id, settings, body, model_type=model_type)
    check_budget(body, model_type)
    check_tasks(session, principal.tenant_id, body, model_type)
    request = body.model_dump(mode="json", exclude={"metadata"})
    try:
        job, created = queries.create_job(session, principal.tenant_id, request, body.metadata, idempotency_key)
    except queries.IdempotencyConflict as exc:
        raise Problem(409, "idempotency_key_reused", "This Idempotency-Key was used with a different body "
                      f"(job {exc}).", param="Idempotency-Key") from exc
    session.commit()  # the row must exist before a worker can pick the message up
    if created:
        try:
            enqueue_job(settings, job.id, sent_at=job.enqueued_at)
        except Exception as exc:  # the database row is the truth; a reconciler can re-send it
            log.warning("could not enqueue %s: %s", job.id, exc)
            queries.add_event(session, job.id, "The queue is unreachable; the job waits to be re-sent.",
                              level="warning")
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


@router.get("", response_model=JobList)
def list_jobs(session: SessionDep, principal: PrincipalDep, settings: SettingsDep,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(pattern=JOB_ID_PATTERN, description="a job id")] = None,
              status: JobStatusName | None = None) -> JobList:
    jobs, has_more = queries.list_jobs(session, principal.tenant_id, min(limit, settings.max_page_size), after,
                                       status)
    return JobList(data=[job_out(j) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: JobId, request: Request, principal: PrincipalDep) -> JobOut:
    # Clients poll this route: on Postgres it reads on the event loop, one autocommit round trip and no thread
    # (prunekit/core/db/async_reads.py). The response is checked and serialised here on the event loop, where a
    # sync route would make two more trips to the threadpool.
    view = await request.app.state.job_reads.job_view(principal.tenant_id, job_id) if is_id("job", job_id) else None
    if view is None:
        raise job_not_found(job_id)
    return job_out(view)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: JobId, session: SessionDep, principal: PrincipalDep, settings: SettingsDep) -> JobOut:
    job = load_job(session, principal.tenant_id, job_id)
    try:
        ended = lifecycle.cancel(session, job)
    except queries.StateConflict as exc:
        raise Problem(409, "job_already_ended", str(exc), param="id") from exc
    session.commit()
    lifecycle.announce(QueueOutbox(settings), ended)
    return job_out(job)


@router.get("/{job_id}/events", response_model=EventList)
def list_events(job_id: JobId, session: SessionDep, principal: PrincipalDep,
                after: Annotated[int | None, Query(ge=0, le=EVENT_ID_MAX)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EventList:
    load_job(session, principal.tenant_id, job_id)
    events, has_more = queries.list_events(session, job_id, after, limit)
    return EventList(data=[event_out(e) for e in events], has_more=has_more)
