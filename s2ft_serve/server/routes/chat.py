"""`POST /v1/chat/completions`: OpenAI's chat completions through the tokenizer's chat template."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
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
from s2ft_serve.server.logprobs import TokenStrings, chat_logprobs, token_strings
from s2ft_serve.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatMessageOut, ErrorResponse, ToolCall, ToolCallDelta,
)
from s2ft_serve.server.reasoning import Thought, ThinkSplitter
from s2ft_serve.server.settings import ServerSettings
from s2ft_serve.server.tools import ToolMode, template_tools, tool_mode

router = APIRouter(tags=["OpenAI"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


def check_request(body: ChatCompletionRequest) -> int | None:
    """Refuse what we do not support; return how many top logprobs to show (None: no logprobs)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


@dataclass
class Context:
    """What the response needs from the request: the prompt, the tool mode, the reasoning parser."""

    prompt: list[int]
    tools: ToolMode | None
    reasoning: str | None  # the reasoning parser (see server.reasoning)


async def start(body: ChatCompletionRequest, engine: Engine, settings: ServerSettings, gen: Generation) -> Context:
    """Validate and submit the n choices."""
    logprobs = check_request(body)
    tools = tool_mode(body, settings.tool_call_parser)
    prompt = await asyncio.to_thread(chat_prompt, engine, body, body.messages, template_tools(body.tools))
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = asked if asked is not None else max(engine.max_model_len - len(prompt), 1)  # full: 400
    guide = await request_guide(engine, body, tools.guide if tools else None)  # "auto" may take a user's guide
    reasoning = settings.reasoning_parser
    if guide is not None and reasoning is not None:  # a guided answer thinks only if its grammar writes <think>
        reasoning = "qwen3"
    # a parser must see the tags it reads, which some tokenizers hold as special tokens (as vLLM's hermes)
    skip_special = False if reasoning or (tools is not None and tools.parser) else None  # None: the request's
    await gen.submit_many([(0, prompt, sampling_params(body, max_tokens, logprobs, None, i, guide, skip_special))
                           for i in range(body.n)])
    return Context(prompt, tools, reasoning)


class AnswerReader:
    """One choice's answer, as it streams: its reasoning apart (with a reasoning parser), then the tool
    calls the rest holds (with tools)."""

    def __init__(self, context: Context):
        self.splitter = ThinkSplitter(context.reasoning) if context.reasoning else None
        self.tools = context.tools.reader() if context.tools else None
        self.streams = self.tools is None or self.tools.streams  # a forced call shows nothing before the end

    def read(self, text: str, finished: bool) -> tuple[str, str, list[ToolCall]]:
        """Take the answer's next `text` (the end of it when `finished`); give the (reasoning, content,
        calls) that can be passed on now."""
        pieces = self.splitter.feed(text) if self.splitter else [text]
        if finished and self.splitter:
            pieces += self.splitter.finish()
        thought, parts = "", []
        for piece in pieces:
            if isinstance(piece, Thought):
                thought += piece.text
            else:
                parts += self.tools.feed(piece) if self.tools else [piece]
        if finished and self.tools:
            parts += self.tools.finish()
        return thought, "".join(p for p in parts if isinstance(p, str)), [p for p in parts if isinstance(p, ToolCall)]


def answer(context: Context, text: str, finish_reason: str | None) -> tuple[ChatMessageOut, str | None]:
    """The assistant message of a finished answer: its reasoning, its text and the tool calls it holds."""
    thought, content, calls = AnswerReader(context).read(text, finished=True)
    message = ChatMessageOut(content=(content or None) if calls else content, tool_calls=calls or None,
                             reasoning_content=thought or None)
    if context.tools is not None:
        finish_reason = context.tools.finish_reason(bool(calls), finish_reason)
    return message, finish_reason


def build_response(body: ChatCompletionRequest, gen: Generation, model: str, context: Context,
                   outputs: list[RequestOutput], text: TokenStrings) -> ChatCompletionResponse:
    choices = []
    for choice, out in zip(gen.choices, outputs):
        logprobs = None
        if body.logprobs:
            logprobs = chat_logprobs(text, out.token_ids, out.logprobs or [], body.top_logprobs or 0)
        message, finish_reason = answer(context, out.text, out.finish_reason)
        choices.append(ChatChoice(index=choice.index, message=message, logprobs=logprobs, finish_reason=finish_reason))
    return ChatCompletionResponse(id=f"chatcmpl-{gen.id}", created=gen.created, model=model, choices=choices,
                                  usage=gen.usage(len(context.prompt)))


async def stream(body: ChatCompletionRequest, gen: Generation, model: str, context: Context,
                 text: TokenStrings) -> AsyncIterator[str]:
    """Server-sent events: the role first, then reasoning and content deltas, a finish chunk, and usage if
    asked. With tools, each call comes whole in one delta: a forced answer's at the end, an "auto"
    answer's as soon as its block closes, between the content deltas around it."""

    every = body.stream_options is not None and body.stream_options.every_chunk()

    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        if every and usage is None:
            usage = gen.usage(len(context.prompt))
        return sse(ChatCompletionChunk(id=f"chatcmpl-{gen.id}", created=gen.created, model=model, choices=choices,
                                       usage=usage))

    for choice in gen.choices:
        yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])
    readers = {choice.index: AnswerReader(context) for choice in gen.choices}
    called = dict.fromkeys(readers, 0)  # calls sent, per choice
    async for choice, event in gen.events():
        reader = readers[choice.index]
        thought, content, calls = reader.read(event.text_delta, event.finished)
        logprobs = None
        if body.logprobs and event.logprob is not None and event.token_id is not None:
            logprobs = chat_logprobs(text, [event.token_id], [event.logprob], body.top_logprobs or 0)
        if reader.streams and (event.token_id is not None or content or thought):  # a chunk per token, as vLLM
            delta = ChatDelta(content=None if thought and not content else content, reasoning_content=thought or None)
            yield chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs)])
        elif content or logprobs:  # a forced answer that is not a call (cut short), or a held-back token's
            # logprobs (QA: a streamed forced call had none, the same request unstreamed all of them)
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=content or None),
                                         logprobs=logprobs)])
        if calls:
            first = called[choice.index]
            called[choice.index] += len(calls)
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(tool_calls=[
                ToolCallDelta(index=first + i, id=c.id, type=c.type, function=c.function)
                for i, c in enumerate(calls)]))])
        if event.finished:
            reason = event.finish_reason
            if context.tools is not None:
                reason = context.tools.finish_reason(called[choice.index] > 0, reason)
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=reason)])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=gen.usage(len(context.prompt)))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS,
             summary="Create a chat completion (OpenAI); `stream: true` answers with server-sent events")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, response: Response,
                                 engine: EngineDep, settings: SettingsDep, metrics: MetricsDep):
    text = token_strings(engine.tokenizer)
    return await serve(
        request, response, engine, settings, metrics, body,
        start=partial(start, body, engine, settings),
        stream=lambda gen, model, context: stream(body, gen, model, context, text),
        build=lambda gen, model, context, outputs: build_response(body, gen, model, context, outputs, text),
    )
