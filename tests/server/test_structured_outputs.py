"""Structured outputs and tool calls end to end, with the official `openai` client against a
SmolLM2 deployment, offloaded and local: json_schema answers to 20 prompts all validate;
`tool_choice: required` and a named choice give parsed tool calls, whole and streamed; a
schema xgrammar cannot compile is a 400 with its message, and nothing leaks."""

from __future__ import annotations

import asyncio
import json
import re

import openai
import pytest

from tests.server.deployment import Deployment

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "likes_tea"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Adds two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -999, "maximum": 999},
                    "b": {"type": "integer", "minimum": -999, "maximum": 999},
                },
                "required": ["a", "b"],
            },
        },
    },
]
# SmolLM2's own template ignores `tools`, so the tools are described in the system message.
SYSTEM = "You can call these tools, each as <tool_call>{...}</tool_call>:\n" + json.dumps(TOOLS)


@pytest.fixture(scope="module", params=["always", "none"])
def deployment(request):
    d = Deployment(
        "--offload-policy", request.param, "--num-kv-blocks", "256", "--offload-blocks", "256",
        model="smollm2",
    )  # fmt: skip
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(deployment):
    with openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def follows_schema(value) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"name", "age", "likes_tea"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 16
        and type(value["age"]) is int
        and 0 <= value["age"] <= 120
        and isinstance(value["likes_tea"], bool)
    )


def test_json_schema_answers_validate(deployment):
    async def ask_all():
        async with openai.AsyncOpenAI(
            base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0
        ) as aclient:
            return await asyncio.gather(*(ask(aclient, i) for i in range(20)))

    async def ask(aclient, i: int):
        return await aclient.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"Invent person number {i}, as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
            },
            max_tokens=48,
            temperature=0.7,
            seed=i,
        )

    for answer in asyncio.run(ask_all()):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert follows_schema(json.loads(choice.message.content)), choice.message.content
    deployment.wait_idle()


def test_guided_choice_and_regex(client):
    choices = ["sunny", "rainy", "cloudy"]
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather like?"}],
        max_tokens=8,
        temperature=0,
        extra_body={"guided_choice": choices},
    )
    assert answer.choices[0].message.content in choices
    answer = client.completions.create(
        model="smollm2",
        prompt="The year the war ended:",
        max_tokens=8,
        temperature=0,
        extra_body={"guided_regex": "[12][0-9]{3}"},
    )
    assert re.fullmatch("[12][0-9]{3}", answer.choices[0].text)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "add"}}]
)
def test_tool_call_is_parsed_whole_and_streamed(client, tool_choice):
    request = dict(
        model="smollm2",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is 12 plus 30? And the weather in Paris?"},
        ],
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    answer = client.chat.completions.create(**request)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    arguments = json.loads(call.function.arguments)
    if isinstance(tool_choice, dict):
        assert call.function.name == "add"
    if call.function.name == "add":
        assert set(arguments) == {"a", "b"} and all(type(v) is int for v in arguments.values())
    else:
        assert call.function.name == "get_weather" and isinstance(arguments["city"], str)

    names, pieces, finish = [], [], None
    for chunk in client.chat.completions.create(**request, stream=True):
        for delta_call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            assert delta_call.index == 0
            if delta_call.function.name:
                names.append(delta_call.function.name)
                assert delta_call.id.startswith("call_")
            pieces.append(delta_call.function.arguments or "")
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert names == [call.function.name] and finish == "tool_calls"
    assert json.loads("".join(pieces)) == arguments  # greedy: the same call


def test_bad_schema_and_tool_choice_are_400(client, deployment):
    bad_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
    cases = [
        (dict(response_format=bad_format), "Unsupported type"),
        (dict(extra_body={"guided_regex": "a(b"}), "parenthesis"),
        (dict(extra_body={"guided_json": SCHEMA, "guided_regex": "a"}), "one structured output"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
    ]
    for extra, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                **extra,
            )  # fmt: skip
    assert deployment.stats()["requests"]["active"] == 0
    deployment.wait_idle()
