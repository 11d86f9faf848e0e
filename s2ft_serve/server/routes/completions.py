"""`POST /v1/completions`: OpenAI's text completions, with n, stop, streaming, logprobs and echo.

`echo` with `max_tokens: 0` and `logprobs` returns the prompt tokens' log-probabilities, which is
how lm-evaluation-harness's `local-completions` client scores continuations.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response

from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import RequestOutput
from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.server.deps import EngineDep, MetricsDep, SettingsDep, require_api_key
from s2ft_serve.server.generation import (
    Generation, request_guide, sampling_params, serve, sse,
)
from s2ft_serve.server.logprobs import TextOffsets, TokenStrings, completion_logprobs, extend, token_strings
from s2ft_serve.server.protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ErrorResponse,
)

router = APIRouter(tags=["OpenAI"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


def prompt_token_ids(engine: Engine, prompt: str | list, add_special_tokens: bool = True,
                     max_tokens: int = 0) -> list[list[int]]:
    """The request's prompts as token ids (a string, strings, token ids, or lists of token ids). Each
    is refused as soon as it cannot fit the context with `max_tokens`, before the next is tokenized
    (QA: 60 prompts each too long, 14 MB in all, were all tokenized, 6-9 s, before the first was refused)."""
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    for text in texts:  # every text checked before any is tokenized
        engine.check_text_fits(len(text))
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be an empty list", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    prompts = []
    for p in prompt:
        prompts.append(engine.tokenize(p, add_special_tokens=add_special_tokens) if isinstance(p, str) else list(p))
        engine.check_length(len(prompts[-1]), max_tokens)
    return prompts


def prompt_texts(engine: Engine, prompt: str | list, ids: list[list[int]]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], list) or isinstance(prompt[0], str):
        return [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompt]
    return [engine.tokenizer.decode(ids[0])]


def check_request(body: CompletionRequest) -> None:
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of is supported only equal to n", param="best_of")


async def start(body: CompletionRequest, engine: Engine, gen: Generation) -> list[list[int]]:
    check_request(body)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    prompts = await asyncio.to_thread(prompt_token_ids, engine, body.prompt, body.add_special_tokens,  # a long prompt
                                      max_tokens)  # never stalls the loop
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    guide = await request_guide(engine, body)
    params = [sampling_params(body, max_tokens, body.logprobs, prompt_logprobs, i, guide) for i in range(body.n)]
    await gen.submit_many([(p, ids, params[i]) for p, ids in enumerate(prompts) for i in range(body.n)])
    return [c.handle.prompt_token_ids for c in gen.choices[::body.n]]


def echo_logprobs(text: TokenStrings, prompt_ids: list[int], prompt_logprobs: list | None,
                  offsets: TextOffsets) -> CompletionLogprobs:
    """The echoed prompt's logprobs (the first token has none; none at all when they were not computed)."""
    return completion_logprobs(text, prompt_ids, prompt_logprobs or [None] * len(prompt_ids), offsets)


def choice_logprobs(text: TokenStrings, out: RequestOutput, echo: bool) -> CompletionLogprobs:
    result, offsets = CompletionLogprobs(), TextOffsets()
    if echo:
        extend(result, echo_logprobs(text, out.prompt_token_ids, out.prompt_logprobs, offsets))
    return extend(result, completion_logprobs(text, out.token_ids, out.logprobs or [], offsets))


def build_response(body: CompletionRequest, gen: Generation, model: str, outputs: list[RequestOutput],
                   prompts: list[list[int]], texts: list[str], text: TokenStrings) -> CompletionResponse:
    choices = []
    for choice, out in zip(gen.choices, outputs):
        shown = texts[choice.prompt_index] + out.text if body.echo else out.text
        logprobs = choice_logprobs(text, out, body.echo) if body.logprobs is not None else None
        choices.append(CompletionChoice(index=choice.index, text=shown, logprobs=logprobs,
                                        finish_reason=out.finish_reason))
    return CompletionResponse(id=f"cmpl-{gen.id}", created=gen.created, model=model, choices=choices,
                              usage=gen.usage(sum(len(ids) for ids in prompts)))


async def stream(body: CompletionRequest, gen: Generation, model: str, prompts: list[list[int]],
                 texts: list[str], text: TokenStrings) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new text (or logprob), then usage if asked."""

    prompt_tokens = sum(len(ids) for ids in prompts)
    every = body.stream_options is not None and body.stream_options.every_chunk()

    def chunk(index: int, piece: str, logprobs=None, finish: str | None = None) -> str:
        choice = CompletionChoice(index=index, text=piece, logprobs=logprobs, finish_reason=finish)
        return sse(CompletionResponse(id=f"cmpl-{gen.id}", created=gen.created, model=model, choices=[choice],
                                      usage=gen.usage(prompt_tokens) if every else None))

    offsets = [TextOffsets() for _ in gen.choices]
    echo_scored = body.echo and body.logprobs is not None
    if body.echo and not echo_scored:
        for choice in gen.choices:
            yield chunk(choice.index, texts[choice.prompt_index])
    echoed: set[int] = set()
    async for choice, event in gen.events():
        if echo_scored and choice.index not in echoed:  # the prompt, with its logprobs, once they exist (as vLLM)
            echoed.add(choice.index)
            yield chunk(choice.index, texts[choice.prompt_index],
                        echo_logprobs(text, choice.handle.prompt_token_ids, choice.handle.prompt_logprobs,
                                      offsets[choice.index]))
        logprobs = None
        if body.logprobs is not None and event.logprob is not None and event.token_id is not None:
            logprobs = completion_logprobs(text, [event.token_id], [event.logprob], offsets[choice.index])
        if event.token_id is not None or event.text_delta or event.finished:  # one chunk per token, as vLLM
            yield chunk(choice.index, event.text_delta, logprobs, event.finish_reason if event.finished else None)
    if body.stream_options and body.stream_options.include_usage:
        yield sse(CompletionResponse(id=f"cmpl-{gen.id}", created=gen.created, model=model, choices=[],
                                     usage=gen.usage(prompt_tokens)))


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS,
             summary="Create a completion (OpenAI); `stream: true` answers with server-sent events")
async def create_completion(body: CompletionRequest, request: Request, response: Response,
                            engine: EngineDep, settings: SettingsDep, metrics: MetricsDep):
    text = token_strings(engine.tokenizer)

    async def begin(gen: Generation) -> tuple[list[list[int]], list[str]]:
        prompts = await start(body, engine, gen)
        texts = prompt_texts(engine, body.prompt, prompts) if body.echo else [""] * len(prompts)
        return prompts, texts

    return await serve(
        request, response, engine, settings, metrics, body, start=begin,
        stream=lambda gen, model, ctx: stream(body, gen, model, ctx[0], ctx[1], text),
        build=lambda gen, model, ctx, outputs: build_response(body, gen, model, outputs, ctx[0], ctx[1], text),
    )
