"""Function calling in chat completions: a named function or `required` constrains the answer to calls
whose arguments follow the tools' schemas; it comes back as `tool_calls`, streamed or not."""

from __future__ import annotations

import json

import jsonschema
import pytest

from server_helpers import client_for

from s2ft_serve.server.app import create_app
from s2ft_serve.server.generation import template_message
from s2ft_serve.server.protocol import ChatMessage

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


async def chat(client, status: int = 200, **body):
    r = await client.post("/v1/chat/completions",
                          json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 160, "temperature": 0, **body})
    assert r.status_code == status, r.text
    return r


def check_calls(calls: list[dict]) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


async def test_named_function_answers_with_its_call(client):
    for adapter in (None, "a0"):
        body = (await chat(client, tool_choice=NAMED, **({"model": adapter} if adapter else {}))).json()
        choice = body["choices"][0]
        assert choice["message"]["content"] is None and choice["finish_reason"] == "stop"
        calls = choice["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        check_calls(calls)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
async def test_required_answers_with_calls_to_the_tools(client, seed):
    body = (await chat(client, tool_choice="required", temperature=1.0, seed=seed)).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    check_calls(choice["message"]["tool_calls"])


async def test_required_without_parallel_calls_is_one_call(client):
    for seed in range(3):
        body = (await chat(client, tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                           seed=seed)).json()
        calls = body["choices"][0]["message"].get("tool_calls")
        assert calls and len(calls) == 1 and body["choices"][0]["finish_reason"] == "tool_calls", body["choices"]
        check_calls(calls)


async def test_streamed_call_equals_the_whole_one(client):
    whole = (await chat(client, tool_choice="required", parallel_tool_calls=False)).json()["choices"][0]
    r = await chat(client, tool_choice="required", parallel_tool_calls=False, stream=True)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    with_calls = [d for d in deltas if d.get("tool_calls")]
    assert len(with_calls) == 1 and not any(d.get("content") for d in deltas)
    call = with_calls[0]["tool_calls"][0]
    assert call["index"] == 0 and call["function"] == whole["message"]["tool_calls"][0]["function"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["tool_calls"]


async def test_tool_choice_none_answers_in_text(client):
    text = (await chat(client, tool_choice="none")).json()["choices"][0]
    assert isinstance(text["message"]["content"], str) and "tool_calls" not in text["message"]


async def test_history_with_calls_and_results_is_accepted(client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    body = (await chat(client, messages=history, tool_choice="none")).json()
    assert isinstance(body["choices"][0]["message"]["content"], str)


def test_template_gets_arguments_as_objects_and_the_call_id():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, 2]}'}}
    m = template_message(ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call]}))
    assert m == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": [1, 2]}}}]}
    m = template_message(ChatMessage.model_validate({"role": "tool", "content": "sunny", "tool_call_id": "call_1"}))
    assert m == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("body, param, message", [
    ({}, "tool_choice", "--tool-call-parser"),
    ({"tool_choice": "auto"}, "tool_choice", "--tool-call-parser"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "tools", "distinct"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}],
      "tool_choice": "required"}, "tools", "invalid json schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"},
     "tools.0.function.name", ""),
])
async def test_bad_tool_requests_are_400(client, body, param, message):
    error = (await chat(client, 400, **body)).json()["error"]
    assert error["param"] == param and message in error["message"], error


# ---- tool_choice "auto", read by the server's --tool-call-parser ------------------------------------
SAID = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>')


@pytest.fixture
async def auto_client(settings, engine):
    async with client_for(create_app(settings.model_copy(update={"tool_call_parser": "hermes"}), engine)) as c:
        yield c


def say(text: str) -> dict:
    """The tiny random model writes `text`: structured output with one choice (free text under "auto")."""
    return {"structured_outputs": {"choice": [text]}, "max_tokens": 400}


async def test_auto_reads_the_calls_the_model_writes(auto_client):
    for tool_choice in ({}, {"tool_choice": "auto"}):
        body = (await chat(auto_client, **tool_choice, **say(SAID))).json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "I will check."
        calls = choice["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
        check_calls(calls)
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}


async def test_auto_without_calls_is_text(auto_client):
    body = (await chat(auto_client, max_tokens=12)).json()["choices"][0]
    assert isinstance(body["message"]["content"], str) and "tool_calls" not in body["message"]
    assert body["finish_reason"] in ("stop", "length")
    plain = (await chat(auto_client, max_tokens=12, tools=None)).json()["choices"][0]
    assert body["message"]["content"] == plain["message"]["content"]  # same prompt: SmolLM2-style templates ignore tools


async def test_auto_with_parallel_tool_calls_false_gives_one_call(auto_client):
    body = (await chat(auto_client, parallel_tool_calls=False, **say(SAID))).json()["choices"][0]
    assert [c["function"]["name"] for c in body["message"]["tool_calls"]] == ["get_weather"]


async def test_auto_streamed_equals_whole(auto_client):
    whole = (await chat(auto_client, logprobs=True, **say(SAID))).json()["choices"][0]
    r = await chat(auto_client, stream=True, logprobs=True, **say(SAID))
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == whole["message"]["content"]
    calls = [call for d in deltas for call in d.get("tool_calls") or []]
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"] for c in calls] == [c["function"] for c in whole["message"]["tool_calls"]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["tool_calls"]
    # the text before the first call streams before it; every token's logprobs come, as without tools
    first_call = next(i for i, d in enumerate(deltas) if d.get("tool_calls"))
    assert "".join(d.get("content") or "" for d in deltas[:first_call]) == "I will check."
    streamed = [lp for c in chunks if c["choices"] and (lp := c["choices"][0].get("logprobs"))]
    assert sum(len(lp["content"]) for lp in streamed) == len(whole["logprobs"]["content"])


async def test_auto_with_the_llama3_json_parser(settings, engine):
    said = '{"name": "get_time", "parameters": {"zone": -3}}; {"name": "get_weather", "parameters": ' \
           '{"city": "Paris", "unit": "fahrenheit"}}'
    async with client_for(create_app(settings.model_copy(update={"tool_call_parser": "llama3_json"}), engine)) as c:
        whole = (await chat(c, **say(said))).json()["choices"][0]
        assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
        assert [call["function"]["name"] for call in whole["message"]["tool_calls"]] == ["get_time", "get_weather"]
        check_calls(whole["message"]["tool_calls"])
        r = await chat(c, stream=True, **say(said))
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.text.splitlines()
                  if line.startswith("data: {") and json.loads(line[6:])["choices"]]
        calls = [call for d in deltas for call in d.get("tool_calls") or []]
        assert [call["function"] for call in calls] == [call["function"] for call in whole["message"]["tool_calls"]]
        text = (await chat(c, max_tokens=8)).json()["choices"][0]  # free text stays text
        assert "tool_calls" not in text["message"] and isinstance(text["message"]["content"], str)


async def test_a_tool_call_parser_sees_special_tokens(auto_client, engine):
    """Some tokenizers hold the tags a parser reads as special tokens, so with "auto" the text keeps them."""
    special = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    body = (await chat(auto_client, max_tokens=2, ignore_eos=True, logit_bias={str(special): 100})).json()
    assert body["choices"][0]["message"]["content"] == "<|im_start|>" * 2
    plain = (await chat(auto_client, max_tokens=2, ignore_eos=True, logit_bias={str(special): 100},
                        tool_choice="none")).json()
    assert plain["choices"][0]["message"]["content"] == ""


async def test_streamed_forced_calls_carry_the_logprobs_of_their_tokens(client):
    """QA: the same seeded request had every token's logprobs unstreamed, and none streamed."""
    body = dict(tool_choice="required", parallel_tool_calls=False, logprobs=True, top_logprobs=2)
    whole = (await chat(client, **body)).json()["choices"][0]["logprobs"]["content"]
    r = await chat(client, stream=True, **body)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    streamed = [entry for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                for entry in c["choices"][0]["logprobs"]["content"]]
    assert whole and streamed == whole


async def test_arguments_nested_too_deeply_are_passed_on_as_text(client):
    """QA: an earlier call's arguments nested 900 deep (a 2 KB body) were a 500, and a traceback in the log
    250 times the request's size."""
    for depth in (500, 900, 2000):  # QA: 500 levels were a 400, 2,000 a 200
        deep = "[" * depth + "]" * depth
        history = MESSAGES + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
        r = await client.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "max_tokens": 2,
                                                            "tool_choice": "none"})
        assert r.status_code == 200, r.text
    kwargs = {"x": json.loads("[" * 900 + "]" * 900)}
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                                        "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text


# a tool's own references: pydantic's "$defs" (openai.pydantic_function_tool of a nested model), draft-07's
# "definitions", and a recursive "#"
ADDRESS = {"$defs": {"Addr": {"type": "object", "additionalProperties": False, "required": ["zip"],
                              "properties": {"zip": {"type": "integer", "minimum": 0, "maximum": 99}}}},
           "type": "object", "additionalProperties": False, "required": ["addr"],
           "properties": {"addr": {"$ref": "#/$defs/Addr"}}}
LEVEL = {"definitions": {"L": {"enum": [1, 2]}}, "type": "object", "additionalProperties": False,
         "required": ["level"], "properties": {"level": {"$ref": "#/definitions/L"}}}
TREE = {"type": "object", "additionalProperties": False, "required": ["kids"],
        "properties": {"kids": {"type": "array", "maxItems": 1, "items": {"$ref": "#"}}}}
# QA (red team of the first fix): a schema with its own "$id", and "$anchor"s of the same name in two tools
OWN_ID = {"$id": "https://example.com/unit", "$defs": {"U": {"enum": ["c", "f"]}}, "type": "object",
          "additionalProperties": False, "required": ["unit"], "properties": {"unit": {"$ref": "#/$defs/U"}}}
ANCHORED = [{"$defs": {"v": {"$anchor": "v", "type": t}}, "type": "object", "additionalProperties": False,
             "required": [key], "properties": {key: {"$ref": "#v"}}} for key, t in (("n", "null"), ("s", "boolean"))]
REF_TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}}
             for name, schema in (("address", ADDRESS), ("level", LEVEL), ("tree", TREE), ("unit", OWN_ID),
                                  ("number", ANCHORED[0]), ("flag", ANCHORED[1]))]


@pytest.mark.parametrize("seed", [0, 1])
async def test_required_keeps_each_tools_own_references(client, seed):
    """QA: under "required" each tool's schema sat inside the list of calls, so its references resolved
    against that list: "$defs"/"definitions" were a 400, and "#" let through arguments that break the
    tool's schema while refusing ones that follow it."""
    body = (await chat(client, tools=REF_TOOLS, tool_choice="required", temperature=1.0, seed=seed)).json()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in REF_TOOLS}
    for call in body["choices"][0]["message"]["tool_calls"]:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_required_grammar_follows_each_tools_own_references(engine):
    from s2ft_serve.server.protocol import ChatCompletionRequest
    from s2ft_serve.server.tools import tool_mode

    body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": REF_TOOLS, "tool_choice": "required"})
    guide = tool_mode(body).guide

    def accepts(text: str) -> bool:
        matcher = engine.guided.matcher(guide)
        return all(matcher.consume_token(t) for t in engine.tokenizer.encode(text, add_special_tokens=False)) \
            and matcher.is_accepting()

    assert accepts('[{"name": "tree", "parameters": {"kids": [{"kids": []}]}}]')
    assert not accepts('[{"name": "tree", "parameters": {"kids": [[{"name": "tree", "parameters": {"kids": []}}]]}}]')
    assert accepts('[{"name": "address", "parameters": {"addr": {"zip": 7}}}, {"name": "level", "parameters": {"level": 2}}]')
    assert not accepts('[{"name": "address", "parameters": {"addr": {"zip": "7"}}}]')
    assert accepts('[{"name": "unit", "parameters": {"unit": "c"}}]')
    assert not accepts('[{"name": "unit", "parameters": {"unit": "k"}}]')
    assert accepts('[{"name": "number", "parameters": {"n": null}}, {"name": "flag", "parameters": {"s": true}}]')
    assert not accepts('[{"name": "number", "parameters": {"n": true}}]')
    assert not accepts('[{"name": "flag", "parameters": {"s": null}}]')
