"""Function calling in chat completions, through structured output (as vLLM does without a tool parser).

`tool_choice` naming a function constrains the answer to a JSON object following that function's
`parameters` schema: the answer is the call's arguments. `tool_choice: "required"` constrains it to a
JSON array of one or more `{"name", "parameters"}` objects, each naming one of the tools with
arguments following its schema (vLLM's layout). Both are written as `json.dumps` writes JSON
(unless the schema sets llguidance's `x-guidance` options itself). Either way the answer comes back as `message.tool_calls` (content
null). `"none"` answers in text. `"auto"` would need a parser for the model's own tool-call syntax,
which differs from model to model, so it is refused, as vLLM refuses it unless a parser is set.
The tools are passed to the chat template, which shows them to the model if it knows how.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from s2ft_serve.engine.request import Guide
from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.server.protocol import ChatCompletionRequest, FunctionCall, Tool, ToolCall

ANY_OBJECT = {"type": "object"}
# tool calls are laid out as json.dumps lays JSON out: no run of whitespace for a model to loop in
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ToolMode:
    """How the answer of a chat with tools is constrained and read back."""

    guide: Guide
    function: str | None  # the named function; None: "required" (a list of calls)

    @property
    def finish_reason(self) -> str:
        """A forced named call finishes with "stop" (as OpenAI's), the required list with "tool_calls"."""
        return "stop" if self.function else "tool_calls"

    def calls(self, text: str) -> list[ToolCall] | None:
        """The tool calls an answer holds; None if it is not a complete list of calls (cut short)."""
        if self.function is not None:
            return [new_call(self.function, text)]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        return [new_call(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items]


def new_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def tool_mode(body: ChatCompletionRequest) -> ToolMode | None:
    """The request's tool mode (None: a text answer); 400 for choices that cannot be served."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        raise InvalidRequestError(
            "tool_choice 'auto' (the default when tools are given) is not supported: it needs a parser for the "
            "model's own tool-call syntax; set tool_choice to 'required', 'none' or a named function",
            param="tool_choice")
    schemas = {t.function.name: t.function.parameters or ANY_OBJECT for t in body.tools}
    if len(schemas) != len(body.tools):
        raise InvalidRequestError("tool function names must be distinct", param="tools")
    if choice == "required":
        items = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                  "properties": {"name": {"const": name}, "parameters": schema}} for name, schema in schemas.items()]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": items}, "x-guidance": LAYOUT}
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
