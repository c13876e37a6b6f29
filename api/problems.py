"""Errors as RFC 9457 problem details (``application/problem+json``), each with its reason."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM = "application/problem+json"


class Problem(Exception):
    """An error a route answers with: the HTTP ``status``, a short ``title`` and the ``detail`` saying why, sent as
    problem+json (``install``); ``headers`` go with it (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers


def _response(status: int, title: str, detail: str, instance: str, headers: dict[str, str] | None = None):
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def install(app: FastAPI) -> None:
    """Answer ``Problem``, the HTTP errors of FastAPI and Starlette, and invalid requests (422, every reason on one
    line) as problem+json naming the path."""
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):  # type: ignore[no-untyped-def]
        return _response(exc.status, exc.title, exc.detail, request.url.path, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # type: ignore[no-untyped-def]
        return _response(exc.status_code, str(exc.detail), str(exc.detail), request.url.path,
                         getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):  # type: ignore[no-untyped-def]
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _response(422, "invalid request", reasons, request.url.path)
