"""RFC 9457 problem+json: every error the API returns, bad input included, has this one shape."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from prunekit.core.db.async_reads import DatabaseUnavailable

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("prunekit.api")
DATABASE_RETRY_AFTER_S = 5

_TITLES = {
    400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
}


class Problem(Exception):
    def __init__(self, status: int, code: str, detail: str, param: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.param = status, code, detail, param
        self.headers = headers or {}
        self.extra = extra


def problem_response(status: int, code: str, detail: str, param: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://prunekit.dev/problems/{code.replace('_', '-')}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if param is not None:
        body["param"] = param
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Discriminated and function validators append their own tags to the location; keep the field path.
    parts = [p for p in parts if not p.startswith("function-") and "[" not in p]
    return ".".join(parts)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """Every method some route of this path answers (RFC 9110: a 405 lists them in `Allow`). Starlette's own header
    names only the first route that matched the path, so of `GET /v1/jobs` and `POST /v1/jobs`, two routes, each
    claimed to be the only method. Each method is asked of the routes as the router itself asks them (`matches`),
    so included routers answer for themselves. A mount matches any method: what it serves says so itself (the
    dashboard's files: `GET, HEAD`), so "" leaves its header as it is."""
    allowed = []
    for method in _METHODS:
        # A fresh scope: routing has already rewritten the request's (path parameters, a mount's root_path).
        scope = {"type": "http", "path": request.url.path, "root_path": "", "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes
               if not isinstance(route, Mount)):
            allowed.append(method)
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.code, exc.detail, exc.param, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            param = _loc_to_param(tuple(err.get("loc", ())))
            message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            errors.append({"param": param, "detail": message})
        first = errors[0] if errors else {"param": "", "detail": "invalid request"}
        detail = f"{first['param']}: {first['detail']}" if first["param"] else first["detail"]
        return problem_response(422, "invalid_request", detail, first["param"] or None, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
        return problem_response(exc.status_code, code, str(exc.detail), headers=headers or None)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(DatabaseUnavailable)
    async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # The database is down, restarting or out of connections: nothing the client sent is wrong, and the same
        # request may well succeed in a few seconds (writes are in one transaction, so none was half done).
        log.warning("database unavailable: %s", str(exc).splitlines()[0])
        return problem_response(503, "database_unavailable", "The database is unreachable for now; retry shortly.",
                                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem_response(500, "internal_error", "An unexpected error occurred; it has been logged.")
