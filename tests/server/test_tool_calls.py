"""Hermes-format tool calls parsed from text, whole and streamed one character at a time: the
streamed content and argument pieces add up to what the whole parse finds."""

from __future__ import annotations

import json

import pytest

from server.api.tool_calls import ToolCallStream, parse_tool_calls

CALL_A = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"c": "x}"}}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    "text, content, names",
    [
        (CALL_A, None, ["add"]),
        ("Let me check. " + CALL_A + "\n" + CALL_B, "Let me check.", ["add", "get_weather"]),
        ("no tools <tool here", "no tools <tool here", []),
    ],
)
def test_whole_and_streamed_parses_agree(text, content, names):
    whole_content, calls = parse_tool_calls(text)
    assert whole_content == content and [c.function.name for c in calls] == names
    stream, streamed, deltas = ToolCallStream(), "", []
    for i, char in enumerate(text):
        piece, new_calls = stream.feed(char, finished=i == len(text) - 1)
        streamed, deltas = streamed + piece, deltas + new_calls
    arguments: dict[int, str] = {}
    for delta in deltas:
        arguments[delta["index"]] = arguments.get(delta["index"], "") + (
            delta["function"].get("arguments", "")
        )
    assert [d["function"]["name"] for d in deltas if "name" in d["function"]] == names
    assert all(d["id"].startswith("call_") for d in deltas if "id" in d)
    for index, call in enumerate(calls):
        assert json.loads(arguments[index]) == json.loads(call.function.arguments)
    if calls:
        assert streamed.strip() == (content or "")
    else:
        assert streamed == text


def test_a_cut_short_call_stays_content():
    text = '<tool_call>\n{"name": "add", "argum'
    assert parse_tool_calls(text) == (text, [])


def test_finish_reason_becomes_tool_calls_once_a_call_streamed():
    stream = ToolCallStream()
    assert stream.delta("Hi", False, None) == ({"content": "Hi"}, None)
    delta, reason = stream.delta(CALL_B, True, "stop")
    assert reason == "tool_calls" and delta["tool_calls"][0]["function"]["name"] == "get_weather"
