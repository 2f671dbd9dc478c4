"""Tool calling in the Hermes/Qwen format, `<tool_call>\n{"name": ..., "arguments": {...}}\n
</tool_call>`: `tool_choice` as a grammar, and the output parsed into OpenAI `tool_calls`, whole
or as streamed deltas (the first naming the call, then pieces of its arguments, as vLLM's
hermes parser sends them).

`required` and a named choice are enforced with xgrammar's builtin structural tag for this
format (its "qwen_3" template without the reasoning block): each tool is a tag whose begin
fixes the name and whose content is the JSON schema of its parameters, dispatched among the
tools, at least one call and nothing else around it. An EBNF would have to inline every
schema's grammar by hand; the structural tag composes xgrammar's own JSON-schema grammars.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from engine.sequence import InvalidRequestError
from server.api.openai_schemas import ChatCompletion, ChatCompletionRequest, FunctionCall, ToolCall
from transport.messages import StructuredSpec

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
STRUCTURAL_TAG_FORMAT = "qwen_3"  # xgrammar's name for the Hermes/Qwen <tool_call> format
# Runs of whitespace inside a call's JSON: a small model left free can fill its budget with them.
MAX_WHITESPACE = 1
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)$", re.DOTALL)


def parses_tool_calls(tools: list[dict[str, Any]] | None, tool_choice: Any) -> bool:
    return bool(tools) and tool_choice != "none"


def forces_tool_call(tool_choice: Any) -> bool:
    return tool_choice == "required" or isinstance(tool_choice, dict)


def tool_call_spec(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool
) -> StructuredSpec | None:
    """The grammar a `required` or named tool choice imposes; None for `auto` and `none`."""
    if tool_choice is not None and not tools:
        raise InvalidRequestError("tool_choice needs tools")
    for tool in tools or []:
        check_tool(tool)
    if not forces_tool_call(tool_choice):
        return None
    import xgrammar

    try:
        tag = xgrammar.get_model_structural_tag(
            STRUCTURAL_TAG_FORMAT,
            tools=tools,
            tool_choice=tool_choice,
            reasoning="disabled",
            parallel_tool_calls=parallel_tool_calls,
            max_whitespace_cnt=MAX_WHITESPACE,
        )
    except ValueError as exc:  # pydantic's ValidationError of a malformed tool is one too
        raise InvalidRequestError(f"invalid tools or tool_choice: {exc}") from exc
    return StructuredSpec("structural_tag", tag.model_dump_json())


def check_tool(tool: dict[str, Any]) -> None:
    function = tool.get("function")
    if (
        tool.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
        or not function["name"]
        or not isinstance(function.get("parameters", {}), dict | None)
    ):
        raise InvalidRequestError(
            "invalid tools: each is {'type': 'function', 'function': {'name': ..., "
            f"'parameters': {{JSON schema}}}}, got {json.dumps(tool)[:200]}"
        )


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content outside the tags, or None if there is none; the calls). Output whose tags do
    not hold a JSON call with a name is left as content, with no calls, as vLLM does."""
    calls = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1) if match.group(1) is not None else match.group(2))
        except ValueError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        function = FunctionCall(name=call["name"], arguments=json.dumps(arguments))
        calls.append(ToolCall(id=new_call_id(), function=function))
    if not calls:
        return text, []
    content = _CALL.sub("", text).strip()
    return content or None, calls


def with_tool_calls(answer: ChatCompletion) -> ChatCompletion:
    """The answer with its message's tool calls parsed out of its text."""
    for choice in answer.choices:
        content, calls = parse_tool_calls(choice.message.content or "")
        if calls:
            choice.message.content, choice.message.tool_calls = content, calls
            if choice.finish_reason == "stop":
                choice.finish_reason = "tool_calls"
    return answer


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')
_JSON = json.JSONDecoder()


class ToolCallStream:
    """Streamed output text split into content and tool-call deltas. Text that may still turn
    out to start a tag, or to close the arguments, is held back until it is known."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # self.text[:pos] is accounted for
        self.num_calls = 0  # calls whose name has been sent
        self.call_start = -1  # where the open call's JSON starts, -1 outside a call
        self.named = False
        self.args_sent = 0  # characters of the open call's arguments sent

    def delta(self, text: str, finished: bool, finish_reason: str | None):
        """The chunk delta for newly streamed `text` and its finish reason."""
        content, calls = self.feed(text, finished)
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        if finish_reason == "stop" and self.num_calls:
            finish_reason = "tool_calls"
        return delta, finish_reason

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        self.text += text
        content, calls = "", []
        while True:
            if self.call_start < 0:
                start = self.text.find(TOOL_CALL_START, self.pos)
                if start < 0:
                    end = len(self.text)
                    end -= 0 if finished else _partial_tail(self.text, TOOL_CALL_START)
                    content += self._content(max(self.pos, end))
                    return content, calls
                content += self._content(start)
                self.pos = self.call_start = start + len(TOOL_CALL_START)
                self.named, self.args_sent = False, 0
                continue
            body = self.text[self.call_start :]
            end = body.find(TOOL_CALL_END)
            calls += self._call_deltas(body if end < 0 else body[:end], closed=end >= 0)
            if end < 0:
                return content, calls
            self.pos = self.call_start + end + len(TOOL_CALL_END)
            self.call_start = -1

    def _content(self, end: int) -> str:
        piece, self.pos = self.text[self.pos : end], end
        # Between and after calls only whitespace is expected; it is no content.
        return "" if self.num_calls and not piece.strip() else piece

    def _call_deltas(self, body: str, closed: bool) -> list[dict[str, Any]]:
        deltas = []
        if not self.named:
            name = _NAME.search(body)
            if name is None:
                return []
            function = {"name": json.loads(f'"{name.group(1)}"')}
            deltas.append(
                {
                    "index": self.num_calls,
                    "id": new_call_id(),
                    "type": "function",
                    "function": function,
                }  # fmt: skip
            )
            self.named, self.num_calls = True, self.num_calls + 1
        arguments = _ARGUMENTS.search(body)
        if arguments is None:
            return deltas
        text = _arguments_text(body, arguments.end(), closed)
        if len(text) > self.args_sent:
            piece = text[self.args_sent :]
            deltas.append({"index": self.num_calls - 1, "function": {"arguments": piece}})
            self.args_sent = len(text)
        return deltas


def _arguments_text(body: str, start: int, closed: bool) -> str:
    """The arguments' JSON as far as it is certain: all of it once the call is closed; while it
    is open, less the braces and whitespace at the end, which may close the call instead."""
    if closed:
        try:
            return body[start : _JSON.raw_decode(body, start)[1]]
        except ValueError:
            return body[start:]
    text = body[start:]
    text = text[: len(text) - _partial_tail(text, TOOL_CALL_END)]
    return text.rstrip(" \t\r\n}")


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def chat_structured(body: ChatCompletionRequest) -> StructuredSpec | None:
    """The grammar of a chat request: its tool choice's, or its structured output's."""
    tool_spec = tool_call_spec(body.tools, body.tool_choice, body.parallel_tool_calls)
    if tool_spec is not None and body.structured is not None:
        raise InvalidRequestError(
            "a required or named tool_choice cannot be combined with response_format or "
            "guided decoding"
        )
    return tool_spec or body.structured
