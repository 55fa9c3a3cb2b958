"""A small typed client of the HTTP API (used by `prunekit up`; the full client grows from here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from prunekit.vocabulary import ENDED


class ApiError(Exception):
    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(f"{problem.get('status')} {problem.get('code')}: {problem.get('detail')}")
        self.problem = problem


class Client:
    def __init__(self, base_url: str, api_key: str, timeout_s: float = 30.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, follow_redirects=True,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                raise ApiError(response.json())
            except ValueError:
                raise ApiError({"status": response.status_code, "detail": response.text}) from None
        return response.json()

    def list_jobs(self, limit: int = 20, status: str | None = None, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {}),
                                  **({"after": after} if after else {})}
        return self._call("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def create_job(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, after: int | None = None) -> list[dict[str, Any]]:
        params = {"after": after} if after is not None else {}
        return self._call("GET", f"/v1/jobs/{job_id}/events", params=params)["data"]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/artifacts")["data"]

    def download(self, artifact_id: str, dest: Path) -> None:
        with self.http.stream("GET", f"/v1/artifacts/{artifact_id}/content") as response:
            if response.status_code >= 400:
                raise ApiError({"status": response.status_code, "detail": response.read().decode()})
            with dest.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)

    def follow(self, job_id: str, poll_s: float = 1.0) -> Iterator[dict[str, Any]]:
        """Yields events as they arrive until the job ends."""
        import time

        after: int | None = None
        while True:
            for event in self.events(job_id, after):
                after = event["id"]
                yield event
            if self.get_job(job_id)["status"] in ENDED:
                for event in self.events(job_id, after):
                    yield event
                return
            time.sleep(poll_s)
