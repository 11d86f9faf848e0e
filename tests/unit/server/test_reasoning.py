"""Reasoning apart from the answer (`--reasoning-parser`): the splitter, whole or streamed, and the chat route."""

from __future__ import annotations

import json
import random

import pytest
from server_helpers import client_for

from s2ft_serve.server.app import create_app
from s2ft_serve.server.reasoning import ThinkSplitter, Thought


def split(parser: str, pieces: list[str]) -> tuple[str | None, str]:
    splitter = ThinkSplitter(parser)
    out = [p for piece in pieces for p in splitter.feed(piece)] + splitter.finish()
    thought = "".join(p.text for p in out if isinstance(p, Thought))
    return (thought if any(isinstance(p, Thought) for p in out) else None), "".join(p for p in out if isinstance(p, str))


@pytest.mark.parametrize("parser, text, thought, answer", [
    ("qwen3", "<think>\nLet me add.\n</think>\n\nIt is 4.", "\nLet me add.\n", "It is 4."),
    ("qwen3", "  <think>x</think>y", "x", "y"),
    ("qwen3", "It is 4.", None, "It is 4."),  # thinking disabled
    ("qwen3", "It is <think>4</think>", None, "It is <think>4</think>"),  # only a block at the start
    ("qwen3", "<think>cut short", "cut short", ""),
    ("qwen3", "<think></think>\n\nIt is 4.", None, "It is 4."),
    ("qwen3", "<thinking is fun", None, "<thinking is fun"),
    ("deepseek_r1", "Let me add.</think>It is 4.", "Let me add.", "It is 4."),  # opened by the template
    ("deepseek_r1", "<think>Let me add.</think>\nIt is 4.", "Let me add.", "It is 4."),
    ("deepseek_r1", "still thinking", "still thinking", ""),
    ("deepseek_r1", "", None, ""),
])
def test_whole_answers(parser, text, thought, answer):
    assert split(parser, [text]) == (thought, answer)


@pytest.mark.parametrize("seed", range(12))
def test_streamed_in_any_pieces_equals_whole(seed):
    rng = random.Random(seed)
    for parser in ("qwen3", "deepseek_r1"):
        text = rng.choice(["<think>\nhmm, 2 < 3 and </thin is not the end\n</think>\n\nYes: <b>4</b>.",
                           "  <think>a</think>", "no thoughts <think>here</think>", "x</think> y", "<thin", "<"])
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        assert split(parser, pieces) == split(parser, [text]), (parser, pieces)


def test_reasoning_is_passed_on_as_it_comes():
    splitter = ThinkSplitter("qwen3")
    assert splitter.feed("<thi") == [] and splitter.feed("nk>I") == [Thought("I")]
    assert splitter.feed(" see </th") == [Thought(" see ")]
    assert splitter.feed("ink>\n") == [] and splitter.feed("Four") == ["Four"] and splitter.finish() == []


# ---- the chat route -------------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
SAID = "<think>\nTwo and two.\n</think>\n\nIt is four."


@pytest.fixture
async def thinking_client(settings, engine):
    async with client_for(create_app(settings.model_copy(update={"reasoning_parser": "qwen3"}), engine)) as c:
        yield c


async def chat(client, **body):
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 200, "temperature": 0,
                                                         "structured_outputs": {"choice": [SAID]}, **body})
    assert r.status_code == 200, r.text
    return r


async def test_reasoning_comes_apart_from_the_answer_whole_and_streamed(thinking_client):
    whole = (await chat(thinking_client, logprobs=True)).json()["choices"][0]
    assert whole["message"]["reasoning_content"] == "\nTwo and two.\n"
    assert whole["message"]["content"] == "It is four." and whole["finish_reason"] == "stop"
    r = await chat(thinking_client, stream=True, logprobs=True)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "\nTwo and two.\n"
    assert "".join(d.get("content") or "" for d in deltas) == "It is four."
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert not any(d.get("reasoning_content") for d in deltas[first_content:])  # reasoning first, then the answer
    streamed = sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks
                   if c["choices"] and c["choices"][0].get("logprobs"))
    assert streamed == len(whole["logprobs"]["content"])  # every token's logprobs, reasoning included


async def test_without_a_parser_the_reasoning_stays_in_the_content(client):
    body = (await chat(client)).json()["choices"][0]
    assert body["message"]["content"] == SAID and "reasoning_content" not in body["message"]


async def test_reasoning_then_tool_calls(settings, engine):
    said = SAID.replace("It is four.", '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call>')
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    app = create_app(settings.model_copy(update={"reasoning_parser": "deepseek_r1", "tool_call_parser": "hermes"}),
                     engine)
    async with client_for(app) as c:
        body = (await chat(c, tools=tools, structured_outputs={"choice": [said]})).json()["choices"][0]
    assert body["message"]["reasoning_content"] == "\nTwo and two.\n" and body["message"]["content"] is None
    assert [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in body["message"]["tool_calls"]] \
        == [("add", {"a": 2, "b": 2})]
    assert body["finish_reason"] == "tool_calls"
