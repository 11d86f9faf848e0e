"""Every request and response body of the HTTP API (OpenAI and vLLM shapes); no torch here.

Requests refuse unknown fields and wrong types (OpenAI answers those with 400); the error
handler turns pydantic's complaints into OpenAI's error shape.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class RequestModel(BaseModel):
    """A request body: unknown fields and loose types are errors. An explicit `null` for an optional field
    means its default, as in OpenAI's API and vLLM (QA: `n: null`, `echo: null`, `stream: null`, which the
    openai client's types allow, were 400s)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data: Any) -> Any:
        """Drop `null` for optional fields whose type has no None (those that have keep their meaning of it)."""
        if not isinstance(data, dict):
            return data
        defaulted = _null_defaulted(cls)
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}


@functools.cache
def _null_defaulted(cls: type[BaseModel]) -> frozenset[str]:
    """The request keys (names and aliases) of `cls`'s optional fields whose type holds no None: worked out
    once per model class, not per request."""
    return frozenset(key for name, f in cls.model_fields.items()
                     if not f.is_required() and type(None) not in get_args(f.annotation)
                     for key in (name, f.alias) if key)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------- shared ----------

class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM extension: with include_usage, every chunk "
                                         "also carries the usage so far")

    def every_chunk(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class JsonSchemaFormat(RequestModel):
    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema the output follows")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(RequestModel):
    """vLLM's `structured_outputs`: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    json_object: bool | None = Field(None, description="any JSON object")
    regex: str | None = Field(None, description="a regular expression the whole output matches")
    choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    grammar: str | None = Field(None, description="a context-free grammar (Lark or llama.cpp GBNF syntax)")


class SamplingFields(RequestModel):
    """Fields the completions and chat requests share."""

    model: str | None = Field(None, description="the base model, or an adapter's name (vLLM convention)")
    adapter: str | None = Field(None, description="an adapter's name; overrides `model` (they must agree)")
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; -1 or 0 disables")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM extension: drop tokens less likely than "
                                "min_p times the most likely one")
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings; the text ends before them")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="subtracted once from each generated token")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="subtracted per time a token was generated")
    repetition_penalty: float | None = Field(None, gt=0, le=2, description="vLLM extension: prompt and generated "
                                             "tokens' positive logits divided by it, negative ones multiplied")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> -100..100 added to its logit")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: EOS and stop_token_ids are not sampled, and stop "
                            "strings not matched, before this many tokens")
    ignore_eos: bool = Field(False, description="vLLM extension: do not stop at the EOS token")
    include_stop_str_in_output: bool = Field(False, description="vLLM extension: keep the stop string (or stop "
                                             "token) that ended the answer in the text")
    skip_special_tokens: bool = Field(True, description="vLLM extension: leave special tokens out of the text "
                                      "(a tool-call or reasoning parser reads them in chat regardless)")
    stop_token_ids: list[int] | None = Field(None, description="vLLM extension")
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM extension: output constrained to a JSON schema, regex, choice or grammar")
    # OpenAI's bookkeeping fields, which some SDK wrappers always send: accepted, no effect on the answer
    store: bool | None = Field(None, description="accepted for OpenAI compatibility; nothing is stored")
    metadata: dict[str, str] | None = Field(None, description="accepted for OpenAI compatibility; ignored")
    service_tier: str | None = Field(None, description="accepted for OpenAI compatibility; ignored")

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, value: StreamOptions | None, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):  # as OpenAI and vLLM answer
            raise ValueError("stream_options is only allowed when stream is true")
        return value


# ---------- completions ----------

Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "my-adapter", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
        {"prompt": ["Hello", "World"], "adapter": "my-adapter", "max_tokens": 0, "echo": True, "logprobs": 1},
    ]})

    prompt: Prompt = Field(..., description="a string, strings, token ids, or lists of token ids")
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=64, description="only equal to n is supported")
    suffix: str | None = Field(None, description="not supported")
    add_special_tokens: bool = Field(True, description="vLLM extension: add the tokenizer's special tokens (e.g. "
                                     "BOS) to text prompts, as the tokenizer itself does")


class CompletionLogprobs(ResponseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------- chat ----------

class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str  # JSON text, as OpenAI sends and returns it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A chat message; fields beyond these are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins them (QA: same prompt, same cache)


class FunctionDefinition(RequestModel):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class ChatTemplateFields(RequestModel):
    """How a chat is rendered through the chat template (vLLM's extras; chat completions and /tokenize)."""

    add_generation_prompt: bool = Field(True, description="end the prompt with the template's opening of the "
                                        "assistant's answer")
    continue_final_message: bool = Field(False, description="leave the final (assistant) message open, so the "
                                         "answer continues it; needs add_generation_prompt false")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="more variables for the chat template, e.g. {\"enable_thinking\": false} for Qwen3")
    add_special_tokens: bool = Field(False, description="add the tokenizer's special tokens (e.g. BOS) on top of "
                                     "what the chat template writes")


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "my-adapter", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32},
    ]})

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=0, description="deprecated by OpenAI; same as max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'required' or a named function: the answer is a call, its arguments following the "
        "function's schema; 'none': text; 'auto' (the default with tools): the model chooses, read by the "
        "server's --tool-call-parser (refused without one)")
    parallel_tool_calls: bool | None = Field(None, description="False allows one call only")


class ChatMessageOut(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)  # with a --reasoning-parser
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda v: v is None)


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(ResponseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ResponseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class ChatDelta(ResponseModel):
    """What a streamed chunk adds; fields it does not set are left out, as OpenAI's and vLLM's chunks do
    (a client that reads `"role" in delta` as "the opening chunk" then counts every later one)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------- models ----------

class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "s2ft-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------- adapters (admin) ----------

# a name the server gives an adapter (admin routes, --adapter)
AdapterName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")]
# an adapter the server already holds: any name it accepted (a folder loaded on demand may hold a space)
AdapterRef = Annotated[str, Field(min_length=1, max_length=256)]


class LoadAdapterRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "math", "path": "math-v1", "replace": False}]})

    name: AdapterName
    path: str = Field(..., min_length=1, description="an adapter folder; relative paths are under --adapter-root")
    replace: bool = False


class MergeSource(RequestModel):
    name: AdapterRef
    weight: float = 1.0


class MergeRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "math+code", "sources": [{"name": "math", "weight": 0.5}, {"name": "code", "weight": 0.5}]},
    ]})

    name: AdapterName
    sources: list[MergeSource] = Field(..., min_length=1, max_length=64)


class VllmLoadLoraRequest(RequestModel):
    """vLLM's `/v1/load_lora_adapter` body."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"lora_name": "math", "lora_path": "math-v1"}]})

    lora_name: AdapterName
    lora_path: str = Field(..., min_length=1)
    load_inplace: bool = Field(False, description="replace an adapter of the same name")


class VllmUnloadLoraRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"lora_name": "math"}]})

    lora_name: AdapterRef
    lora_int_id: int | None = None


class AdapterCard(ResponseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    path: str | None
    nbytes: int
    parameters: int
    modules: int
    per_layer: dict[str, Any]
    config: dict[str, Any]
    resident: bool
    fused: bool
    requests_served: int
    base_model: str


class AdapterList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class AdapterDeleted(ResponseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


# ---------- operations ----------

class HealthResponse(ResponseModel):
    status: str


class ReadyResponse(ResponseModel):
    status: str
    model: str
