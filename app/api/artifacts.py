"""Artifacts of a job: list and download (local files with Range support, or a presigned S3 URL)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from app.api.deps import PrincipalDep, SessionDep, SettingsDep
from app.api.jobs import JobId, load_job
from app.errors import Problem
from app.schemas import ARTIFACT_ID_PATTERN, ArtifactList, ArtifactOut, epoch, is_id
from prunekit.core.db import queries
from prunekit.core.db.models import Artifact
from prunekit.core.storage import LocalStore, S3Store

router = APIRouter(tags=["artifacts"])
ArtifactId = Annotated[str, Path(json_schema_extra={"pattern": ARTIFACT_ID_PATTERN})]


def artifact_out(a: Artifact) -> ArtifactOut:
    return ArtifactOut(id=a.id, name=a.name, size_bytes=a.size_bytes, sha256=a.sha256,
                       content_type=a.content_type, created_at=epoch(a.created_at) or 0)


@router.get("/v1/jobs/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: JobId, session: SessionDep, principal: PrincipalDep) -> ArtifactList:
    load_job(session, principal.tenant_id, job_id)
    return ArtifactList(data=[artifact_out(a) for a in queries.list_artifacts(session, job_id)])


@router.get("/v1/artifacts/{artifact_id}", response_model=ArtifactOut)
def get_artifact(artifact_id: ArtifactId, session: SessionDep, principal: PrincipalDep) -> ArtifactOut:
    return artifact_out(_load(session, principal.tenant_id, artifact_id))


# The content's type is the artifact's own (config.json is application/json); a Range request answers 206, an
# unsatisfiable one 416 (Content-Range names the size), a matching If-None-Match 304.
_BYTES = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the content", "content": _BYTES},
    206: {"description": "the ranges asked for", "content": _BYTES},
    304: {"description": "not modified since the ETag or date sent"},
    307: {"description": "a presigned URL (S3 store)"},
    416: {"description": "no range can be satisfied", "content": {"text/plain": {"schema": {"type": "string"}}}},
}


@router.get("/v1/artifacts/{artifact_id}/content", response_model=None, response_class=Response,
            responses=_DOWNLOAD_RESPONSES)
def download(artifact_id: ArtifactId, request: Request, session: SessionDep, principal: PrincipalDep,
             settings: SettingsDep) -> Response:
    artifact = _load(session, principal.tenant_id, artifact_id)
    store = request.app.state.store
    filename = artifact.name.rsplit("/", 1)[-1]
    if isinstance(store, S3Store):
        url = store.presigned_url(artifact.storage_key, filename, settings.presign_expiry_s)
        return RedirectResponse(url, status_code=307)
    assert isinstance(store, LocalStore)
    path = store.path_for(artifact.storage_key)
    if not path.is_file():
        raise Problem(404, "artifact_content_missing", f"The content of {artifact_id!r} is no longer stored.",
                      param="id")
    return FileResponse(path, media_type=artifact.content_type, filename=filename,
                        headers={"X-Content-SHA256": artifact.sha256})


def _load(session: SessionDep, tenant_id: str, artifact_id: str) -> Artifact:
    artifact = queries.get_artifact(session, tenant_id, artifact_id) if is_id("art", artifact_id) else None
    if artifact is None:
        raise Problem(404, "artifact_not_found", f"No artifact {artifact_id!r}.", param="id")
    return artifact
