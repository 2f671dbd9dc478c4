"""How every HTTP layer reads a JSON body and writes an error: `{"error": {"message", "type"}}`,
with each exception type mapped to its status code here, in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from engine.sequence import InvalidRequestError
from server.generation import Overloaded, Unavailable


class UnknownModel(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (RequestValidationError, 400, "invalid_request_error"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (UnknownModel, 404, "not_found_error"),
    (Overloaded, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable"),
)
# The failures a client caused or can retry; anything else is our bug, a 500.
MAPPED_ERRORS: tuple[type[Exception], ...] = tuple(t for t, _, _ in _STATUS)


def error_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and error type for `exc`; 500 `internal_error` if it is not mapped."""
    for exc_type, status, kind in _STATUS:
        if isinstance(exc, exc_type):
            return status, kind
    return 500, "internal_error"


def error_message(exc: BaseException) -> str:
    if isinstance(exc, RequestValidationError):
        return validation_message(exc.errors())
    return str(exc) or type(exc).__name__


def error_payload(exc: BaseException) -> dict:
    _, kind = error_status(exc)
    return {"error": {"message": error_message(exc), "type": kind}}


def exception_response(exc: BaseException) -> JSONResponse:
    """The error response for `exc`; a 429 says when to retry."""
    status, kind = error_status(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
    return error_response(status, error_message(exc), kind, headers)


def error_response(
    status: int, message: str, kind: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind}},
        headers=dict(headers) if headers else None,
    )


def validation_message(errors: Sequence[Any]) -> str:
    """One line naming each bad field, e.g. `max_tokens: Input should be a valid integer`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: "
        f"{e['msg'].removeprefix('Value error, ')}"
        for e in errors
    )


async def parse_body(request: Request, model: type[BaseModel]):
    """Validates a JSON body whatever its content type (curl -d sends a form type)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"malformed JSON body: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
