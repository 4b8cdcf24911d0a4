"""The error shapes at the HTTP edge, never a stack trace: ``{"error": {"type", "message", "field"}}``
everywhere, except on the Cohere-compatible routes, which answer Cohere's ``{"message": ...}``
(the message names the field) so the Cohere SDKs' exceptions carry it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import ApiError, ClientGone, from_validation

log = logging.getLogger("instructrec.service")


def error_response(status: int, type: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "message": message, "field": field}}, status_code=status,
                        headers=headers)


def compat_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status, headers=headers)


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large",
               429: "rate_limited", 503: "unavailable"}


def install(app: FastAPI, on_reject, compat_paths: tuple[str, ...] = ()) -> None:
    """Register the handlers. ``on_reject(reason)`` counts refused requests; errors on
    ``compat_paths`` take Cohere's shape."""

    def respond(request: Request, status: int, type: str, message: str, field: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
        if request.url.path in compat_paths:
            return compat_response(status, message, headers)
        return error_response(status, type, message, field, headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.reason:
            on_reject(exc.reason)
        return respond(request, exc.status, exc.type, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        err = from_validation(exc)
        on_reject("invalid")
        return respond(request, err.status, err.type, err.message, err.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return respond(request, exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"), detail,
                       headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(_request: Request, _exc: ClientDisconnect):
        return Response(status_code=499)

    @app.exception_handler(ClientGone)
    async def _gone(_request: Request, _exc: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unexpected error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return respond(request, 500, "internal_error", "internal server error")
