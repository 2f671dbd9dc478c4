"""How every HTTP layer reads a JSON body and writes an error: `{"error": {"message", "type"}}`,
with each exception type mapped to its status code here, in one place. A body is bounded in
size, valid JSON and valid Unicode before any model sees it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.sequence import InvalidRequestError
from server.router.generation import Overloaded, Unavailable


class UnknownModel(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


class RequestTooLarge(ValueError):
    """The request body is over the router's --max-request-bytes (HTTP 413)."""


_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (RequestValidationError, 400, "invalid_request_error"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (UnknownModel, 404, "not_found_error"),
    (RequestTooLarge, 413, "request_too_large"),
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
        # Strict UTF-8 first: json.loads on bytes would also read UTF-16 and encoded surrogates.
        text = raw.decode("utf-8-sig")
        data = json.loads(text)
    except RecursionError as exc:
        raise InvalidRequestError("malformed JSON body: nested too deeply") from exc
    except ValueError as exc:  # bad UTF-8, bad JSON, or an int of more than 4300 digits
        raise InvalidRequestError(f"malformed JSON body: {exc}") from exc
    if _SURROGATE_ESCAPE.search(text):
        _check_unicode(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


# The body decoded as strict UTF-8, so only a `\uD800`-`\uDFFF` escape can put a lone surrogate
# into a string; a body without one skips the walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _check_unicode(data: Any) -> None:
    """Every string and key in `data` can be encoded as UTF-8 (JSON allows escapes of lone
    surrogates, which no tokenizer takes); else a 400 naming the field."""
    pending: list[tuple[Any, str]] = [(data, "")]
    while pending:  # a loop, not recursion: `data` may nest as deep as json.loads allows
        value, path = pending.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                pending.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            pending.extend(
                (item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value)
            )


def _check_text(text: str, path: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{path or 'body'}: not valid Unicode (a lone surrogate escape such as \\ud800 at "
            f"character {exc.start}); send text that encodes as UTF-8"
        ) from exc


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413, refused from its
    Content-Length before any byte is read, or as soon as a chunked body grows past it. The
    app gets the body whole, read here, and the client's later messages (its disconnect)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(f"request body ({declared} bytes)", scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse("chunked request body", scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        # Raising from `receive` instead would reach the app through Starlette's middleware
        # task groups as an ExceptionGroup, a 500.
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, what: str, scope: Scope, receive: Receive, send: Send) -> None:
        exc = RequestTooLarge(
            f"the {what} is over this server's limit of {self.max_bytes} bytes "
            "(--max-request-bytes)"
        )
        await exception_response(exc)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
