"""How every HTTP layer reads a JSON body and writes an error: `{"error": {"message", "type"}}`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from engine.sequence import InvalidRequestError


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
