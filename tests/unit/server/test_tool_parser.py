"""The `hermes` tool-call reader: `<tool_call>JSON</tool_call>` blocks out of free text, whole or streamed."""

from __future__ import annotations

import json
import random

import pytest

from s2ft_serve.server.protocol import ToolCall
from s2ft_serve.server.routes.chat import Context, answer
from s2ft_serve.server.tools import HermesReader, ToolMode


def read_answer(tools: ToolMode, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole answer's content and calls (content None when there are calls and no text), read by the
    chat route's own `answer`."""
    message, _ = answer(Context([], tools, None), text, None)
    return message.content, message.tool_calls or []


AUTO = ToolMode(None, None, "hermes")
ONE = ToolMode(None, None, "hermes", max_calls=1)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": [1, 2]}}\n</tool_call>'


def calls_of(calls: list[ToolCall]) -> list[tuple[str, object]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_text_without_calls_is_kept_exactly():
    for text in ["", "Hello", "  Hello, world!\n\n", "a < b and c <tool", "<tool_call", "x <b>bold</b>\n"]:
        assert read_answer(AUTO, text) == (text, [])


def test_one_call_with_text_before_it():
    content, calls = read_answer(AUTO, "Let me look that up.\n" + CALL)
    assert content == "Let me look that up."
    assert calls_of(calls) == [("get_weather", {"city": "Oslo", "days": [1, 2]})]
    assert calls[0].id.startswith("call_") and calls[0].type == "function"


def test_only_calls_give_null_content_and_several_blocks_several_calls():
    second = '<tool_call>{"name": "get_time", "arguments": {"zone": 2}}</tool_call>'
    content, calls = read_answer(AUTO, CALL + "\n" + second + "\n")
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Oslo", "days": [1, 2]}), ("get_time", {"zone": 2})]
    assert len({c.id for c in calls}) == 2


def test_a_list_in_one_block_and_other_spellings_of_arguments():
    text = ('<tool_call>[{"name": "a", "arguments": {"x": "é"}}, {"name": "b", "parameters": {"y": 1}}, '
            '{"name": "c"}, {"name": "d", "arguments": "{\\"z\\": 3}"}]</tool_call>')
    content, calls = read_answer(AUTO, text)
    assert content is None
    assert calls_of(calls) == [("a", {"x": "é"}), ("b", {"y": 1}), ("c", {}), ("d", {"z": 3})]
    assert calls[0].function.arguments == '{"x": "é"}'  # not escaped


def test_blocks_that_are_not_calls_stay_text():
    for block in ["<tool_call>not json</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                  "<tool_call>[1, 2]</tool_call>", '<tool_call>{"name": 3}</tool_call>']:
        text = f"Before \n{block} after"
        content, calls = read_answer(AUTO, text)
        assert calls == [] and content == text


def test_unclosed_last_block_is_a_call_if_its_json_is_complete():
    content, calls = read_answer(AUTO, 'Sure <tool_call>{"name": "f", "arguments": {"a": 1}}')
    assert content == "Sure" and calls_of(calls) == [("f", {"a": 1})]
    cut = 'Sure <tool_call>{"name": "f", "argu'
    assert read_answer(AUTO, cut) == (cut, [])


def test_parallel_tool_calls_false_keeps_the_first_call():
    content, calls = read_answer(ONE, CALL + CALL.replace("get_weather", "other"))
    assert content is None and [c.function.name for c in calls] == ["get_weather"]


def test_text_after_a_call_is_content():
    content, calls = read_answer(AUTO, "A\n" + CALL + "\n\nB and more")
    assert content == "AB and more" and len(calls) == 1


@pytest.mark.parametrize("seed", range(20))
def test_streamed_in_any_pieces_equals_whole(seed):
    """However the text is cut into deltas, the content is the same and every call comes whole, in order."""
    rng = random.Random(seed)
    pieces = ["Hi there", " <b>", "\n", CALL, " ok", "<tool_call>bad</tool_call>", "<", "tool", "\t",
              '<tool_call>[{"name": "g", "arguments": {"k": "<tool_call>"}}]</tool_call>', "end\n"]
    text = "".join(rng.sample(pieces, rng.randint(1, len(pieces))))
    whole = read_answer(AUTO, text)
    reader, parts, i = HermesReader(), [], 0
    while i < len(text):
        j = i + rng.randint(1, 7)
        parts += reader.feed(text[i:j])
        i = j
    parts += reader.finish()
    content = "".join(p for p in parts if isinstance(p, str))
    calls = [p for p in parts if isinstance(p, ToolCall)]
    assert (content or None if calls else content) == whole[0]
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole[1]]


def test_text_is_passed_on_before_the_answer_ends():
    reader = HermesReader()
    assert reader.feed("Hello") == ["Hello"]
    assert reader.feed(" wor") == [" wor"]
    assert reader.feed("ld <tool") == ["ld"]  # " <tool" may start a block
    assert reader.feed("box>") == [" <toolbox>"]
    assert reader.feed(" <tool_call>{\"name\": \"f\"") == []
    (call,) = reader.feed(", \"arguments\": {}}</tool_call>")
    assert call.function.name == "f" and call.function.arguments == "{}"
    assert reader.feed("\n") == [] and reader.feed("Bye") == ["Bye"] and reader.finish() == []


LLAMA = ToolMode(None, None, "llama3_json")


@pytest.mark.parametrize("text, calls", [
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    ('  <|python_tag|>{"name": "f", "arguments": {"a": [1, ";"]}}; {"name": "g", "parameters": {}}\n',
     [("f", {"a": [1, ";"]}), ("g", {})]),
    ('[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {"y": 2}}]', [("f", {"x": 1}), ("g", {"y": 2})]),
])
def test_llama3_json_answers_that_are_calls(text, calls):
    content, found = read_answer(LLAMA, text)
    assert content is None and calls_of(found) == calls


@pytest.mark.parametrize("text", ["The weather is fine.", "", "  \n", '{"city": "Oslo"}', '{"name": "f", "parameters": {',
                                  '{"name": "f", "parameters": {}} and some words', "<|python", " {not json}"])
def test_llama3_json_anything_else_is_text_as_written(text):
    assert read_answer(LLAMA, text) == (text, [])


def test_llama3_json_streams_text_at_once_and_reads_calls_at_the_end():
    reader = ToolMode(None, None, "llama3_json").reader()
    assert reader.feed(" ") == [] and reader.feed("Hello") == [" Hello"] and reader.feed(" there") == [" there"]
    reader = ToolMode(None, None, "llama3_json", max_calls=1).reader()
    assert reader.feed("<|python_") == [] and reader.feed('tag|>{"name": "f", ') == []
    assert reader.feed('"parameters": {}}; {"name": "g", "parameters": {}}') == []
    (call,) = reader.finish()
    assert call.function.name == "f" and call.function.arguments == "{}"


@pytest.mark.parametrize("tools", [AUTO, ToolMode(None, None, "llama3_json"), ToolMode(object(), None)],
                         ids=["hermes", "llama3_json", "required"])
def test_a_block_nested_too_deeply_to_read_stays_text(tools):
    """QA: a 2,000-deep block (the model's own answer, or one forced by structured outputs) was a 500."""
    deep = "[" * 2000 + "]" * 2000
    text = {"hermes": "<tool_call>" + deep + "</tool_call>", "llama3_json": deep}.get(tools.parser, deep)
    content, calls = read_answer(tools, text)
    assert calls == [] and content == text
