"""The service's errors as the request path raises them, apart from HTTP: an :class:`ApiError`
carries the status, type, message and field the edge (:mod:`.http_errors`) answers with, never a
stack trace; :class:`ClientGone` says the client left. Nothing here imports FastAPI."""

from __future__ import annotations

from pydantic import ValidationError


class ApiError(Exception):
    """An error answered to the client. ``reason`` (if any) counts it in requests_rejected_total."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None, *,
                 headers: dict[str, str] | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.reason = reason


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def field_path(loc: tuple) -> str | None:
    """('candidates', 3, 'title') -> 'candidates[3].title'; union/validator tags are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part not in _TAGS and "[" not in part and part != "body":
            out += ("." if out else "") + part
    return out or None


def validation_message(err: dict) -> str:
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg


def from_validation(exc: ValidationError) -> ApiError:
    """The first validation error as a 422 naming its field (FastAPI's RequestValidationError reads the same)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = field_path(tuple(first.get("loc", ())))
    message = validation_message(first)
    if field:
        message = f"{field}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ApiError(422, "validation_error", message, field, reason="invalid")
