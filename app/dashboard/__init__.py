"""The web dashboard: static files (HTML, CSS, ES modules) served by the API at /dashboard.

There is no build step: the folder `static/` is served as it is. The files are public; every call they make
to /v1 carries the API key the user typed in (kept in the browser's localStorage).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent / "static"
MOUNT_PATH = "/dashboard"


class DashboardFiles(StaticFiles):
    """StaticFiles with the headers a page that holds an API key should have."""

    def __init__(self, *, directory: Path, headers: dict[str, str]) -> None:
        super().__init__(directory=directory, html=True)
        self.extra_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.extra_headers]
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def security_headers(app: FastAPI) -> dict[str, str]:
    # Scripts and styles only from this origin: no inline code, so injected markup cannot run.
    # Downloads from an S3 store are redirects to presigned URLs: allow fetching from that origin too.
    connect = ["'self'"]
    settings = getattr(app.state, "settings", None)
    if settings is not None and settings.artifact_store.startswith("s3://"):
        origin = _origin(settings.s3_public_endpoint_url or settings.s3_endpoint_url)
        connect.append(origin or "https://*.amazonaws.com")
    csp = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
           f"connect-src {' '.join(connect)}; object-src 'none'; base-uri 'none'; form-action 'self'; "
           "frame-ancestors 'none'")
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",  # revalidate (ETag): a server upgrade never leaves stale modules behind
    }


def install_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at /dashboard/ and send / there; neither appears in the OpenAPI document."""

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse(f"{MOUNT_PATH}/", status_code=307)

    @app.get(MOUNT_PATH, include_in_schema=False)
    def _dashboard_slash() -> RedirectResponse:
        return RedirectResponse(f"{MOUNT_PATH}/", status_code=307)

    # Mounts never appear in the OpenAPI document.
    app.mount(MOUNT_PATH, DashboardFiles(directory=STATIC_DIR, headers=security_headers(app)), name="dashboard")
