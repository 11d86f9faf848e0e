"""`POST /v1/chat/completions`: OpenAI's chat completions through the tokenizer's chat template."""

from __future__ import annotations

from functools import partial
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response

from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import RequestOutput
from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.server.deps import EngineDep, MetricsDep, SettingsDep, require_api_key
from s2ft_serve.server.generation import (
    Generation, chat_prompt, request_guide, sampling_params, serve, sse,
)
from s2ft_serve.server.logprobs import TokenText, chat_logprobs, token_text_decoder
from s2ft_serve.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatMessageOut, ErrorResponse, ToolCall, ToolCallDelta,
)
from s2ft_serve.server.tools import ToolMode, read_answer, template_tools, tool_mode

router = APIRouter(tags=["OpenAI"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


def check_request(body: ChatCompletionRequest) -> int | None:
    """Refuse what we do not support; return how many top logprobs to show (None: no logprobs)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


async def start(body: ChatCompletionRequest, engine: Engine, parser: str | None,
                gen: Generation) -> tuple[list[int], ToolMode | None]:
    """Validate and submit the n choices; the context for the response: the prompt and the tool mode."""
    logprobs = check_request(body)
    tools = tool_mode(body, parser)
    prompt = chat_prompt(engine, body, body.messages, template_tools(body.tools))
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = asked if asked is not None else max(engine.max_model_len - len(prompt), 0)
    guide = await request_guide(engine, body, tools.guide if tools else None)  # "auto" may take a user's guide
    for i in range(body.n):
        await gen.submit(0, prompt, sampling_params(body, max_tokens, logprobs, None, i, guide))
    return prompt, tools


def answer(tools: ToolMode | None, text: str, finish_reason: str | None) -> tuple[ChatMessageOut, str | None]:
    """The assistant message of a finished answer: its text, and the tool calls it holds."""
    if tools is None:
        return ChatMessageOut(content=text), finish_reason
    content, calls = read_answer(tools, text)
    return ChatMessageOut(content=content, tool_calls=calls or None), tools.finish_reason(bool(calls), finish_reason)


def build_response(body: ChatCompletionRequest, gen: Generation, model: str, prompt: list[int], tools: ToolMode | None,
                   outputs: list[RequestOutput], text: TokenText) -> ChatCompletionResponse:
    choices = []
    for choice, out in zip(gen.choices, outputs):
        logprobs = None
        if body.logprobs:
            logprobs = chat_logprobs(text, out.token_ids, out.logprobs or [], body.top_logprobs or 0)
        message, finish_reason = answer(tools, out.text, out.finish_reason)
        choices.append(ChatChoice(index=choice.index, message=message, logprobs=logprobs, finish_reason=finish_reason))
    return ChatCompletionResponse(id=f"chatcmpl-{gen.id}", created=gen.created, model=model, choices=choices,
                                  usage=gen.usage(len(prompt)))


async def stream(body: ChatCompletionRequest, gen: Generation, model: str, prompt: list[int], tools: ToolMode | None,
                 text: TokenText) -> AsyncIterator[str]:
    """Server-sent events: the role first, then content deltas, a finish chunk, and usage if asked.
    With tools, each call comes whole in one delta: a forced answer's at the end, an "auto" answer's
    as soon as its block closes, between the content deltas around it."""

    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        return sse(ChatCompletionChunk(id=f"chatcmpl-{gen.id}", created=gen.created, model=model, choices=choices,
                                       usage=usage))

    for choice in gen.choices:
        yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])
    readers = {choice.index: tools.reader() for choice in gen.choices} if tools else {}
    called = dict.fromkeys(readers, 0)  # calls sent, per choice
    async for choice, event in gen.events():
        reader = readers.get(choice.index)
        parts = [event.text_delta] if reader is None else reader.feed(event.text_delta)
        if reader is not None and event.finished:
            parts += reader.finish()
        content = "".join(p for p in parts if isinstance(p, str))
        streamed = reader is None or reader.streams
        if streamed and (event.token_id is not None or content):  # one chunk per token, as vLLM
            logprobs = None
            if body.logprobs and event.logprob is not None and event.token_id is not None:
                logprobs = chat_logprobs(text, [event.token_id], [event.logprob], body.top_logprobs or 0)
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=content), logprobs=logprobs)])
        elif content:  # a forced answer that is not a call (cut short)
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=content))])
        calls = [p for p in parts if isinstance(p, ToolCall)]
        if calls:
            first = called[choice.index]
            called[choice.index] += len(calls)
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(tool_calls=[
                ToolCallDelta(index=first + i, id=c.id, type=c.type, function=c.function)
                for i, c in enumerate(calls)]))])
        if event.finished:
            reason = event.finish_reason
            if tools is not None:
                reason = tools.finish_reason(called[choice.index] > 0, reason)
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=reason)])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=gen.usage(len(prompt)))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS,
             summary="Create a chat completion (OpenAI); `stream: true` answers with server-sent events")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, response: Response,
                                 engine: EngineDep, settings: SettingsDep, metrics: MetricsDep):
    text = token_text_decoder(engine.tokenizer)
    return await serve(
        request, response, engine, settings, metrics, body,
        start=partial(start, body, engine, settings.tool_call_parser),
        stream=lambda gen, model, context: stream(body, gen, model, *context, text),
        build=lambda gen, model, context, outputs: build_response(body, gen, model, *context, outputs, text),
    )
