"""Function calling in chat completions.

`tool_choice` naming a function constrains the answer to a JSON object following that function's
`parameters` schema: the answer is the call's arguments. `tool_choice: "required"` constrains it to a
JSON array of one or more `{"name", "parameters"}` objects, each naming one of the tools with
arguments following its schema (vLLM's layout). Both are written as `json.dumps` writes JSON
(unless the schema sets llguidance's `x-guidance` options itself). `"none"` answers in text.

`"auto"` (OpenAI's default when tools are given) lets the model choose: its answer is free text, read
by a parser for the model's own tool-call syntax, as vLLM does with `--tool-call-parser`. Without a
parser it is refused. `hermes` reads `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks (Hermes, Qwen 2.5 and 3; a JSON list in one block is several calls).

Every mode reads the answer through a *reader* that takes text as it streams and gives back parts:
text for `content`, or whole `ToolCall`s. The non-streamed answer feeds the reader the whole text,
so both ways give the same content and calls. The tools are passed to the chat template, which shows
them to the model if it knows how.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from s2ft_serve.engine.request import Guide
from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.server.protocol import ChatCompletionRequest, FunctionCall, Tool, ToolCall
from s2ft_serve.server.reasoning import partial_tag

ANY_OBJECT = {"type": "object"}
# tool calls are laid out as json.dumps lays JSON out: no run of whitespace for a model to loop in
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Part = str | ToolCall  # a piece of an answer: text for `content`, or one whole call


def new_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def calls_of(value: object) -> list[ToolCall] | None:
    """The calls a parsed JSON value holds: a `{"name", "arguments" or "parameters"}` object or a list of
    them (arguments an object, or already JSON text); None if it is anything else."""
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        calls.append(new_call(item["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return calls


class ForcedReader:
    """A constrained answer (a named function or "required"): held whole, read as calls at the end;
    text if it is not a complete list of calls (cut short by max_tokens)."""

    streams = False  # nothing to show before the end

    def __init__(self, function: str | None):
        self.function, self.text = function, ""

    def feed(self, text: str) -> list[Part]:
        self.text += text
        return []

    def finish(self) -> list[Part]:
        if self.function is not None:
            return [new_call(self.function, self.text)]
        try:
            calls = calls_of(json.loads(self.text))  # {"name", "parameters"} items, as the guide writes them
        except (ValueError, RecursionError):  # nested too deeply to read is no call either (QA: a 500)
            calls = None
        return calls if calls is not None else [self.text]


class HermesReader:
    """Free text with `<tool_call>JSON</tool_call>` blocks, read as it streams.

    Text outside the blocks is content, passed on as soon as it cannot be the start of a block (a
    held-back tail: a prefix of `<tool_call>` and the whitespace before it). Whitespace between text
    and a call is dropped. A block whose JSON is not a call (or a list of calls) stays text, as
    written. An unclosed block at the end is a call if its JSON is complete (as vLLM reads it)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    streams = True

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls  # parallel_tool_calls false: 1 (later calls are dropped)
        self.held = ""  # text not passed on yet: a block's body (inside) or a tail that may start one
        self.inside = False
        self.gap = ""  # the whitespace dropped before the open block (given back if it is not a call)
        self.after_call = False  # drop the whitespace that follows a call
        self.calls = 0

    def feed(self, text: str) -> list[Part]:
        self.held += text
        out: list[Part] = []
        while True:
            if self.inside:
                end = self.held.find(self.CLOSE)
                if end < 0:
                    return out
                out += self._block(self.held[:end], closed=True)
                self.held, self.inside = self.held[end + len(self.CLOSE):], False
                continue
            if self.after_call:
                self.held = self.held.lstrip()
                if not self.held:
                    return out
                self.after_call = False
            start = self.held.find(self.OPEN)
            if start >= 0:
                before = self.held[:start]
                text = before.rstrip()
                self.gap = before[len(text):]
                out += [text] if text else []
                self.held, self.inside = self.held[start + len(self.OPEN):], True
                continue
            cut = len(self.held) - self._tail(self.held)
            if cut:
                out.append(self.held[:cut])
                self.held = self.held[cut:]
            return out

    def finish(self) -> list[Part]:
        if self.inside:
            self.inside = False
            return self._block(self.held, closed=False)
        held, self.held = self.held, ""
        return [held] if held else []

    def _tail(self, text: str) -> int:
        """Length of the tail of `text` that may begin a block: a prefix of `<tool_call>` and the
        whitespace before it."""
        i = len(text) - partial_tag(text, self.OPEN)
        while i > 0 and text[i - 1].isspace():
            i -= 1
        return len(text) - i

    def _block(self, body: str, closed: bool) -> list[Part]:
        as_text = [self.gap + self.OPEN + body + (self.CLOSE if closed else "")]
        try:
            calls = calls_of(json.loads(body))
        except (ValueError, RecursionError):
            return as_text
        if calls is None:
            return as_text
        if self.max_calls is not None:
            calls = calls[: max(self.max_calls - self.calls, 0)]
        self.calls += len(calls)
        self.after_call = True
        return calls


class Llama3JsonReader:
    """An answer that is one or more JSON calls separated by `;` (optionally after `<|python_tag|>`):
    held from its first `{` and read at the end; any other answer is text, streamed as it comes (all
    of it, if its JSON turns out not to be calls)."""

    TAG = "<|python_tag|>"
    streams = True

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.held = ""
        self.mode: str | None = None  # None: undecided (only whitespace or a prefix of the tag so far)

    def feed(self, text: str) -> list[Part]:
        if self.mode == "text":
            return [text] if text else []
        self.held += text
        if self.mode is None:
            head = self.held.lstrip()
            if head.startswith(("{", "[", self.TAG)):
                self.mode = "json"
            elif head and not self.TAG.startswith(head):
                self.mode, held, self.held = "text", self.held, ""
                return [held]
        return []

    def finish(self) -> list[Part]:
        held, self.held = self.held, ""
        if self.mode != "json":
            return [held] if held else []
        body = held.strip().removeprefix(self.TAG)
        decoder, calls, pos = json.JSONDecoder(), [], 0
        try:
            while pos < len(body):
                value, pos = decoder.raw_decode(body, pos)
                found = calls_of(value)
                if found is None:
                    return [held]
                calls += found
                while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
                    pos += 1
        except (ValueError, RecursionError):
            return [held]
        return calls[: self.max_calls] if calls else [held]


PARSERS = {"hermes": HermesReader, "llama3_json": Llama3JsonReader}  # --tool-call-parser


@dataclass
class ToolMode:
    """How the answer of a chat with tools is constrained and read back."""

    guide: Guide | None  # None: "auto", free text read by the parser
    function: str | None  # the named function; None: "required" or "auto"
    parser: str | None = None  # "auto": the tool-call parser
    max_calls: int | None = None  # "auto" with parallel_tool_calls false: 1

    def reader(self) -> ForcedReader | HermesReader | Llama3JsonReader:
        """A reader for one answer (one per choice)."""
        if self.parser is None:
            return ForcedReader(self.function)
        return PARSERS[self.parser](self.max_calls)

    def finish_reason(self, called: bool, reason: str | None) -> str | None:
        """An answer with calls that stopped by itself: "tool_calls", or "stop" for a forced named call
        (as OpenAI's); otherwise the engine's reason."""
        if not called or reason != "stop":
            return reason
        return "stop" if self.function else "tool_calls"


def tool_mode(body: ChatCompletionRequest, parser: str | None = None) -> ToolMode | None:
    """The request's tool mode (None: a text answer); 400 for choices that cannot be served."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    schemas = {t.function.name: t.function.parameters or ANY_OBJECT for t in body.tools}
    if len(schemas) != len(body.tools):
        raise InvalidRequestError("tool function names must be distinct", param="tools")
    if choice is None or choice == "auto":
        if parser is None:
            raise InvalidRequestError(
                "tool_choice 'auto' (the default when tools are given) needs a parser for the model's own "
                "tool-call syntax: start the server with --tool-call-parser (hermes, llama3_json), or set tool_choice to "
                "'required', 'none' or a named function", param="tool_choice")
        return ToolMode(None, None, parser, 1 if body.parallel_tool_calls is False else None)
    if choice == "required":
        # each tool's schema under the list's $defs as a resource of its own ("$id"), so that its references
        # ("#", "#/$defs/...", "#anchor") resolve against it: inside the list they resolved against the list
        # (QA: pydantic's $defs were a 400, "#" a wrong grammar; rebased by hand, $id and anchors broke)
        defs = {f"tool_{i}": schema if "$id" in schema else {"$id": f"urn:s2ft-serve:tool:{i}", **schema}
                for i, schema in enumerate(schemas.values())}
        items = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                  "properties": {"name": {"const": name}, "parameters": {"$ref": f"#/$defs/tool_{i}"}}}
                 for i, name in enumerate(schemas)]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": items}, "$defs": defs, "x-guidance": LAYOUT}
        if body.parallel_tool_calls is False:
            array["maxItems"] = 1
        return ToolMode(Guide(json=array), None)
    name = choice.function.name
    if name not in schemas:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ToolMode(Guide(json={"x-guidance": LAYOUT, **schemas[name]}), name)  # the schema's own options win


def template_tools(tools: list[Tool] | None) -> list[dict] | None:
    """The tools as chat templates take them (OpenAI's shape, as plain dicts)."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None
