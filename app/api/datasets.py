"""Datasets: upload (multipart), list, get, delete. Uploaded text or image-text data for calibration."""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam

from app.api.deps import PrincipalDep, SessionDep, SettingsDep
from app.api.upload_files import CHUNK, copy_capped
from app.errors import Problem
from app.schemas import DATASET_ID_PATTERN, DatasetList, DatasetOut, dataset_out, is_id
from prunekit.core import layout
from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.models import Dataset
from prunekit.core.ids import new_id
from prunekit.core.uploads import CheckedUpload, InvalidUpload, check_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# A dataset's name (the column's width); the file's name stands in, cut to it, when none is given.
NAME_CHARS = 255
NO_NUL_PATTERN = "^[^\\u0000]*$"
DatasetId = Annotated[str, PathParam(json_schema_extra={"pattern": DATASET_ID_PATTERN})]
_CONTENT_TYPES = {"data.txt": "text/plain", "data.jsonl": "application/jsonl", "data.zip": "application/zip"}


def reject_oversized(request: Request, settings: Settings) -> None:
    """Refuses before the body is read when the client announces its size honestly."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes + CHUNK:  # + the multipart envelope
        raise _too_large(settings)


def _too_large(settings: Settings) -> Problem:
    return Problem(413, "upload_too_large", f"Uploads are limited to {settings.max_upload_bytes} bytes.",
                   param="file")


@router.post("", status_code=201, response_model=DatasetOut)
def upload_dataset(request: Request, session: SessionDep, principal: PrincipalDep, settings: SettingsDep,
                   file: Annotated[UploadFile, File(description=".txt, .jsonl (a \"text\" field per line; or a "
                                                                "task file: \"context\", \"choices\", \"answer\") "
                                                                "or an image-text .zip with data.jsonl and images")],
                   name: Annotated[str | None, Form(max_length=NAME_CHARS, pattern=NO_NUL_PATTERN)] = None,
                   ) -> DatasetOut:
    reject_oversized(request, settings)
    filename = PurePosixPath((file.filename or "").replace("\\", "/")).name
    if not filename:
        raise Problem(422, "invalid_upload", "The uploaded file has no name; its extension tells its kind.",
                      param="file")
    if "\x00" in filename:  # the database stores no NUL character, and no file system names one
        raise Problem(422, "invalid_upload", "The uploaded file's name holds a NUL character.", param="file")
    with tempfile.TemporaryDirectory(prefix="prunekit-upload-") as scratch:
        path = Path(scratch) / "upload"
        size, digest = copy_capped(file, path, settings.max_upload_bytes, _too_large(settings))
        checked = _check(path, filename, settings)
        dataset = Dataset(id=new_id("ds"), tenant_id=principal.tenant_id, name=name or filename[:NAME_CHARS],
                          kind=checked.kind,
                          num_records=checked.num_records, size_bytes=size, sha256=digest, storage_key="")
        dataset.storage_key = layout.dataset_key(principal.tenant_id, dataset.id, checked.stored_name)
        request.app.state.store.put_file(dataset.storage_key, path, _CONTENT_TYPES[checked.stored_name])
    queries.add_dataset(session, dataset)
    session.commit()  # visible to the very next request, which may be a job naming it
    return dataset_out(dataset)


def _check(path: Path, filename: str, settings: Settings) -> CheckedUpload:
    try:
        # The limits the worker reads the dataset with: what is stored here, every job can use.
        return check_upload(path, filename, settings.archive_limits())
    except InvalidUpload as exc:
        raise Problem(422, "invalid_upload", f"{filename}: {exc}", param="file") from exc


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep, principal: PrincipalDep, settings: SettingsDep,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  after: Annotated[str | None, Query(pattern=DATASET_ID_PATTERN, description="a dataset id")] = None,
                  ) -> DatasetList:
    rows, has_more = queries.list_datasets(session, principal.tenant_id, min(limit, settings.max_page_size), after)
    return DatasetList(data=[dataset_out(d) for d in rows], has_more=has_more)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: DatasetId, session: SessionDep, principal: PrincipalDep) -> DatasetOut:
    return dataset_out(load_dataset(session, principal.tenant_id, dataset_id))


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(dataset_id: DatasetId, request: Request, session: SessionDep, principal: PrincipalDep) -> Response:
    dataset = load_dataset(session, principal.tenant_id, dataset_id)
    users = queries.active_jobs_using_dataset(session, principal.tenant_id, dataset_id)
    if users:
        raise Problem(409, "dataset_in_use", f"Jobs that have not ended use this dataset: {', '.join(users)}.",
                      param="id")
    prefix = layout.dataset_prefix(principal.tenant_id, dataset.id)
    session.delete(dataset)
    # Committed before answering (the session dependency would commit only after the response is sent),
    # and before the files go: a failed commit must not leave a row whose content is gone.
    session.commit()
    request.app.state.store.delete_prefix(prefix)
    return Response(status_code=204)


def load_dataset(session: SessionDep, tenant_id: str, dataset_id: str, param: str = "id") -> Dataset:
    dataset = queries.get_dataset(session, tenant_id, dataset_id) if is_id("ds", dataset_id) else None
    if dataset is None:
        raise Problem(404 if param == "id" else 422, "dataset_not_found", f"No dataset {dataset_id!r}.",
                      param=param)
    return dataset


