"""Structured-output fields of the OpenAI routes: OpenAI's `response_format`, vLLM's `guided_*`
and its newer `structured_outputs` object, read into the one StructuredSpec a request's workers
compile. The router builds the grammar before dispatch, so a schema xgrammar cannot compile is
a 400 with its message and nothing is queued.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from engine.structured_output import build_grammar
from server.api.request_fields import request_config
from transport.messages import SamplingSpec, StructuredSpec


class JsonSchemaFormat(BaseModel):
    model_config = request_config(extra="ignore")

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # always enforced: the grammar admits only what the schema does


class ResponseFormat(BaseModel):
    model_config = request_config(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs` request object (the successor of its `guided_*` fields)."""

    model_config = request_config(extra="ignore")

    json_spec: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredOutputFields(BaseModel):
    """The request fields that constrain the output; at most one of them per request."""

    model_config = request_config(extra="ignore")

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM extensions from here on
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    _structured: StructuredSpec | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_structured_output(self) -> StructuredOutputFields:
        found = [
            *_response_format_specs(self.response_format),
            *_guided_specs(
                self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar
            ),
        ]
        if (so := self.structured_outputs) is not None:
            found += _guided_specs(so.json_spec, so.regex, so.choice, so.grammar)
            found += [StructuredSpec("json_object", "")] if so.json_object else []
        if len(found) > 1:
            raise ValueError(
                "give one structured output at most: response_format, one guided_* field "
                "or one structured_outputs field"
            )
        self._structured = found[0] if found else None
        return self

    @property
    def structured(self) -> StructuredSpec | None:
        return self._structured


def _response_format_specs(fmt: ResponseFormat | None) -> list[StructuredSpec]:
    if fmt is None or fmt.type == "text":
        return []
    if fmt.type == "json_object":
        return [StructuredSpec("json_object", "")]
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise ValueError("response_format json_schema needs json_schema.schema")
    return [StructuredSpec("json_schema", json.dumps(fmt.json_schema.json_schema))]


def _guided_specs(
    schema: dict[str, Any] | str | None,
    regex: str | None,
    choice: list[str] | None,
    grammar: str | None,
) -> list[StructuredSpec]:
    found = []
    if schema is not None:
        found.append(StructuredSpec("json_schema", _schema_text(schema)))
    if regex is not None:
        found.append(StructuredSpec("regex", regex))
    if choice is not None:
        if not choice:
            raise ValueError("guided_choice needs at least one choice")
        found.append(StructuredSpec("choice", json.dumps(choice)))
    if grammar is not None:
        found.append(StructuredSpec("grammar", grammar))
    return found


def _schema_text(schema: dict[str, Any] | str) -> str:
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        json.loads(schema)
    except ValueError as exc:
        raise ValueError(f"guided_json is not valid JSON: {exc}") from exc
    return schema


async def with_structured(
    sampling: SamplingSpec, spec_of: Callable[[], StructuredSpec | None]
) -> SamplingSpec:
    """`sampling` constrained by the request's structured output, which is built (xgrammar's
    first import takes seconds) and validated off the event loop. Raises InvalidGrammarError."""

    def checked() -> StructuredSpec | None:
        spec = spec_of()
        if spec is not None:
            build_grammar(spec.kind, spec.spec)
        return spec

    spec = await asyncio.to_thread(checked)
    return sampling if spec is None else msgspec.structs.replace(sampling, structured=spec)
