"""Models: what a tenant can prune (the server's `local:` models and its own), and the tenant's own models brought
as an archive of an HF folder or registered as an `s3://` prefix. A job names a model of the tenant's by its id.

Every check that needs no torch runs here, before anything is stored (prunekit/core/model_archives.py), so a bad
model is refused at once with the file and the problem named; the worker's loader is the last word, and a model it
cannot load is marked `failed` with its message (workers/inputs.py).
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam

from app.api.deps import PrincipalDep, SessionDep, SettingsDep
from app.api.upload_files import CHUNK, copy_capped
from app.errors import Problem
from app.schemas import MODEL_ID_PATTERN, S3_URL_PATTERN, ModelError, ModelList, ModelOut, is_id
from prunekit.core import layout
from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.models import TenantModel
from prunekit.core.documents import epoch
from prunekit.core.ids import new_id
from prunekit.core.model_archives import (
    FolderFiles,
    InvalidUpload,
    ModelSummary,
    S3ModelFiles,
    check_model,
    describe_folder,
    extract_model_archive,
    is_model_archive,
)
from prunekit.core.model_builds import building
from prunekit.core.storage import parse_s3_url

router = APIRouter(prefix="/v1/models", tags=["models"])
log = logging.getLogger("prunekit.api")

NAME_CHARS = 255
NO_NUL_PATTERN = "^[^\\u0000]*$"
SOURCE_CHARS = 1024
ModelId = Annotated[str, PathParam(json_schema_extra={"pattern": MODEL_ID_PATTERN})]
_S3_URL = re.compile(S3_URL_PATTERN)


# --- upload or register ----------------------------------------------------------------------------------------


@router.post("", status_code=201, response_model=ModelOut)
def create_model(request: Request, session: SessionDep, principal: PrincipalDep, settings: SettingsDep,
                 file: Annotated[UploadFile | None, File(description="an archive (.zip, .tar, .tar.gz) of an HF "
                                                         "model folder: config.json, *.safetensors, tokenizer files")
                                 ] = None,
                 source: Annotated[str | None, Form(max_length=SOURCE_CHARS, description="instead of a file: an "
                                                    "s3://bucket/prefix holding an HF model folder, read in place")
                                   ] = None,
                 name: Annotated[str | None, Form(max_length=NAME_CHARS, pattern=NO_NUL_PATTERN)] = None,
                 ) -> ModelOut:
    if (file is None) == (source is None):
        raise Problem(422, "invalid_request", "Send either a model archive as `file` or an s3:// prefix as `source`.",
                      param="file" if file is None else "source")
    if file is not None:
        model = _from_archive(request, principal.tenant_id, settings, file, name)
    else:
        assert source is not None
        model = _from_s3(principal.tenant_id, settings, source, name)
    queries.add_model(session, model)
    session.commit()  # visible to the very next request, which may be a job naming it
    return tenant_model_out(model)


def _from_archive(request: Request, tenant_id: str, settings: Settings, file: UploadFile,
                  name: str | None) -> TenantModel:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_model_upload_bytes + CHUNK:  # + the multipart envelope
        raise _too_large(settings)
    filename = PurePosixPath((file.filename or "").replace("\\", "/")).name
    if not filename or "\x00" in filename:
        raise Problem(422, "invalid_upload", "The uploaded file needs a name ending in .zip, .tar or .tar.gz.",
                      param="file")
    if not is_model_archive(filename):
        raise Problem(422, "invalid_upload", f"{filename}: a model is uploaded as a .zip, .tar or .tar.gz archive of "
                      "an HF model folder.", param="file")
    model_id = new_id("mdl")
    with tempfile.TemporaryDirectory(prefix="prunekit-model-") as scratch:
        archive, folder = Path(scratch) / "upload", Path(scratch) / "model"
        folder.mkdir()
        size, digest = copy_capped(file, archive, settings.max_model_upload_bytes, _too_large(settings))
        try:
            extract_model_archive(archive, filename, folder, settings.model_archive_limits())
            archive.unlink()
            summary = check_model(FolderFiles(folder))
        except InvalidUpload as exc:
            raise Problem(422, "invalid_upload", f"{filename}: {exc}", param="file") from exc
        prefix = layout.model_prefix(tenant_id, model_id)
        store = request.app.state.store
        try:
            for file_name in summary.files:
                store.put_file(f"{prefix}/{file_name}", folder / file_name, "application/octet-stream")
        except BaseException:
            store.delete_prefix(prefix)  # no files without their row
            raise
    return _row(model_id, tenant_id, name or _stem(filename), "upload", prefix, summary, digest)


def _from_s3(tenant_id: str, settings: Settings, source: str, name: str | None) -> TenantModel:
    if not _S3_URL.fullmatch(source) or ".." in source:
        raise Problem(422, "invalid_request", "source: must be s3://bucket/prefix (a valid bucket name, no ..)",
                      param="source")
    bucket, prefix = parse_s3_url(source)
    files = S3ModelFiles(bucket, prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    try:
        if not files.sizes():
            raise InvalidUpload("there are no files under this prefix.")
        summary = check_model(files)
    except InvalidUpload as exc:
        raise Problem(422, "invalid_model", f"{source}: {exc}", param="source") from exc
    except Exception as exc:  # the bucket cannot be reached or read with the server's credentials
        log.info("could not read %s: %s", source, exc)
        raise Problem(422, "invalid_model", f"{source} could not be read with the server's credentials "
                      f"({type(exc).__name__}: {str(exc)[:300]}).", param="source") from exc
    return _row(new_id("mdl"), tenant_id, name or (prefix.rsplit("/", 1)[-1] or bucket), source, None, summary, None)


def _row(model_id: str, tenant_id: str, name: str, source: str, prefix: str | None, summary: ModelSummary,
         digest: str | None) -> TenantModel:
    assert summary.family is not None and summary.model_type is not None and summary.parameters is not None
    return TenantModel(id=model_id, tenant_id=tenant_id, name=name[:NAME_CHARS], source=source,
                       storage_prefix=prefix, status="ready", error=None, family=summary.family,
                       model_type=summary.model_type, parameters=summary.parameters,
                       towers={"names": summary.towers}, dtype=summary.dtype, size_bytes=summary.size_bytes,
                       sha256=digest, files={"names": summary.files})


def _stem(filename: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)] or filename
    return filename


def _too_large(settings: Settings) -> Problem:
    return Problem(413, "upload_too_large", f"Model archives are limited to {settings.max_model_upload_bytes} bytes; "
                   "register a larger model as an s3:// prefix (`source`).", param="file")


# --- read, list, delete ----------------------------------------------------------------------------------------


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, principal: PrincipalDep, settings: SettingsDep,
                limit: Annotated[int, Query(ge=1, le=100)] = 100,
                after: Annotated[str | None, Query(pattern=MODEL_ID_PATTERN, description="a model id (mdl_...)")
                                 ] = None) -> ModelList:
    """The server's models first (on the first page), then the tenant's, newest first."""
    server = [] if after else server_models(settings)
    rows, has_more = queries.list_models(session, principal.tenant_id, min(limit, settings.max_page_size), after)
    return ModelList(data=[*server, *(tenant_model_out(m) for m in rows)], has_more=has_more)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: ModelId, session: SessionDep, principal: PrincipalDep) -> ModelOut:
    return tenant_model_out(load_model(session, principal.tenant_id, model_id))


@router.delete("/{model_id}", status_code=204, response_class=Response)
def delete_model(model_id: ModelId, request: Request, session: SessionDep, principal: PrincipalDep) -> Response:
    model = load_model(session, principal.tenant_id, model_id)
    users = queries.active_jobs_using_model(session, principal.tenant_id, model_id)
    if users:
        raise Problem(409, "model_in_use", f"Jobs that have not ended use this model: {', '.join(users)}.",
                      param="id")
    prefix = model.storage_prefix
    session.delete(model)
    session.commit()  # before the files go: a failed commit must not leave a row whose files are gone
    if prefix:
        request.app.state.store.delete_prefix(prefix)
    return Response(status_code=204)


def load_model(session: SessionDep, tenant_id: str, model_id: str) -> TenantModel:
    model = queries.get_model(session, tenant_id, model_id) if is_id("mdl", model_id) else None
    if model is None:
        # Another tenant's model answers exactly like a missing one.
        raise Problem(404, "model_not_found", f"No model {model_id!r}.", param="id")
    return model


def tenant_model_out(model: TenantModel) -> ModelOut:
    error = ModelError(**model.error) if model.error else None
    return ModelOut(id=model.id, ref=model.id, name=model.name, owner="tenant",
                    source="upload" if model.storage_prefix else model.source,
                    status=model.status,  # type: ignore[arg-type]
                    ready=model.status == "ready", family=model.family, model_type=model.model_type,
                    parameters=model.parameters, towers=list(model.towers.get("names", [])), dtype=model.dtype,
                    size_bytes=model.size_bytes, error=error, created_at=epoch(model.created_at))


# --- the server's models ---------------------------------------------------------------------------------------

# A folder is described once per change of its contents (its and its config's modification times).
_DESCRIBED: dict[str, tuple[tuple[int, int], ModelSummary | str]] = {}


def server_models(settings: Settings) -> list[ModelOut]:
    root = settings.models_root
    assert root is not None
    out: dict[str, ModelOut] = {}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    for folder in folders:
        out[folder.name] = _server_model(folder)
    for name, marker in building(root).items() if root.is_dir() else ():
        if name in out:
            continue
        failed = marker.get("error")
        out[name] = ModelOut(id=None, ref=f"local:{name}", name=name, owner="server", source="server",
                             status="failed" if failed else "building", ready=False, family=None, model_type=None,
                             parameters=None, towers=[], dtype=None, size_bytes=None,
                             error=ModelError(code="build_failed", message=str(failed)) if failed else None,
                             created_at=None)
    return [out[name] for name in sorted(out)]


def _server_model(folder: Path) -> ModelOut:
    summary = _describe(folder)
    ref = f"local:{folder.name}"
    if isinstance(summary, str):
        return ModelOut(id=None, ref=ref, name=folder.name, owner="server", source="server", status="failed",
                        ready=False, family=None, model_type=None, parameters=None, towers=[], dtype=None,
                        size_bytes=None, error=ModelError(code="invalid_model", message=summary), created_at=None)
    has_weights = any(f.endswith((".safetensors", ".gguf")) for f in summary.files)
    return ModelOut(id=None, ref=ref, name=folder.name, owner="server", source="server",
                    status="ready" if has_weights else "failed", ready=has_weights, family=summary.family,
                    model_type=summary.model_type, parameters=summary.parameters, towers=summary.towers,
                    dtype=summary.dtype, size_bytes=summary.size_bytes,
                    error=None if has_weights else ModelError(code="invalid_model", message="no weights"),
                    created_at=None)


def _describe(folder: Path) -> ModelSummary | str:
    try:
        config = folder / "config.json"
        stamp = (folder.stat().st_mtime_ns, config.stat().st_mtime_ns if config.exists() else 0)
    except OSError as exc:
        return f"unreadable: {exc}"
    cached = _DESCRIBED.get(str(folder))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        summary: ModelSummary | str = describe_folder(folder)
    except (InvalidUpload, OSError) as exc:
        summary = str(exc)
    _DESCRIBED[str(folder)] = (stamp, summary)
    return summary
