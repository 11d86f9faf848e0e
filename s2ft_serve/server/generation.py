"""What the completions and chat routes share: choosing the adapter, building sampling parameters,
submitting the n engine requests of one HTTP request, and waiting for or streaming them.

A `Generation` owns its engine requests: if the client goes away, or anything fails half-way
(e.g. the queue fills after two of four submissions), every one of them is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from s2ft_serve.engine.engine import Engine, RequestHandle
from s2ft_serve.engine.request import Guide, RequestOutput, SamplingParams, StreamEvent
from s2ft_serve.errors import AdapterNotFoundError, InvalidRequestError, QueueFullError, S2FTError
from s2ft_serve.server.errors import ascii_json, domain_error_response
from s2ft_serve.server.metrics import UNKNOWN_ADAPTER_LABEL, Metrics
from s2ft_serve.server.protocol import ChatMessage, ChatTemplateFields, PromptTokensDetails, SamplingFields, Usage
from s2ft_serve.server.settings import ServerSettings

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED = 499  # nginx's status for "client closed request", used in metrics only


class ClientDisconnected(Exception):
    """The client of a non-streamed request went away: its engine requests are cancelled."""


def base_names(engine: Engine, settings: ServerSettings) -> set[str]:
    """Names under which clients may ask for the base model."""
    names = {engine.model_name}
    if settings.model:
        names.add(settings.model)
    return names


def choose_adapter(engine: Engine, settings: ServerSettings, model: str | None, adapter: str | None) -> str | None:
    """The adapter a request asks for (None = the base), by the `adapter` field or else by `model`."""
    bases = base_names(engine, settings)
    if adapter is not None and adapter != "":
        if adapter in bases:
            adapter = None
        if model is not None and model not in bases and model != adapter:
            raise InvalidRequestError(
                f"'model' ({model!r}) and 'adapter' ({adapter!r}) name different models; "
                "set one of them, or make them agree", param="adapter")
        return adapter
    if model is None or model in bases:
        return None
    return model


def check_adapter(engine: Engine, adapter: str | None) -> None:
    """404 for a name neither loaded nor loadable, before any other check: a bad request naming an
    unknown model learns that first, and no client-made name reaches a metric label."""
    if adapter is not None:
        engine.check_known(adapter)


def response_model(engine: Engine, adapter: str | None) -> str:
    return adapter if adapter is not None else engine.model_name


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise InvalidRequestError("at most 16 stop strings", param="stop")
    if any(not s for s in stops):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    return stops


MAX_ARGUMENT_DEPTH = 64  # an earlier tool call's arguments nested deeper reach the template as their text


def nested_deeper_than(value: object, limit: int) -> bool:
    """Whether JSON `value` holds lists or objects more than `limit` levels deep (without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def template_message(m: ChatMessage) -> dict:
    """A message as chat templates take it: text content; earlier tool calls with their arguments as
    objects where they parse (as vLLM passes them; templates print them with `tojson`)."""
    out = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            try:
                arguments = json.loads(call.function.arguments)
            except (ValueError, RecursionError):  # passed on as the string (QA: too deep a nesting was a 500)
                arguments = call.function.arguments
            if nested_deeper_than(arguments, MAX_ARGUMENT_DEPTH):  # as the string too: templates walk them
                arguments = call.function.arguments  # recursively (QA: 500 levels were a 400, 1,000 a 200)
            calls.append({"id": call.id, "type": call.type,
                          "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def chat_prompt(engine: Engine, body: ChatTemplateFields, messages: list[ChatMessage],
                tools: list[dict] | None = None) -> list[int]:
    """The token ids of a chat through the tokenizer's chat template (chat completions, /tokenize)."""
    if len(messages) > engine.max_model_len:  # QA: 300,000 empty messages rendered 1.5 M tokens to be refused
        raise InvalidRequestError(f"{len(messages)} messages: more than this model's maximum context length of "
                                  f"{engine.max_model_len} tokens can hold", param="messages")
    rendered = [template_message(m) for m in messages]
    engine.check_text_fits(sum(len(m["content"] or "") for m in rendered), "messages")
    return engine.apply_chat_template(rendered, tools, body.add_generation_prompt,
                                      body.continue_final_message, body.chat_template_kwargs,
                                      bool(body.add_special_tokens))


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's `{"token id": bias}` with the ids as integers."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidRequestError(f"logit_bias keys are token ids, got {key!r}", param="logit_bias") from None
    return out


def guide_of(fields: SamplingFields) -> tuple[Guide | None, str | None]:
    """The structured-output guide a request asks for, and the field that asked."""
    rf, so = fields.response_format, fields.structured_outputs
    if rf is not None and rf.type != "text" and so is not None:
        raise InvalidRequestError("set response_format or structured_outputs, not both", param="structured_outputs")
    if so is not None:
        guide = Guide(json=so.json_, json_object=bool(so.json_object), regex=so.regex, choice=so.choice,
                      grammar=so.grammar)
        try:
            guide.validate()
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param="structured_outputs") from None
        return guide, "structured_outputs"
    if rf is None or rf.type == "text":
        return None, None
    if rf.type == "json_object":
        return Guide(json_object=True), "response_format"
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise InvalidRequestError("response_format of type json_schema needs json_schema.schema",
                                  param="response_format")
    return Guide(json=rf.json_schema.schema_), "response_format"


class GuideChecks:
    """New guides compile in threads of their own: a schema can take seconds to compile or to be refused
    (QA: a 6,000-property one took 15 s), and in asyncio's default pool (6 threads on 2 cores) a handful
    of them left no thread for other requests' tokenizing and submission, stalling every user for over a
    minute. At most the engine's `max_queue` checks are pending, as for the engine's own queue; more
    requests get a 429 (a flood of new schemas queued without bound). A check counts until it ends in
    its thread, even if its request went away meanwhile; one whose request went away before it started
    is cancelled and stops counting."""

    def __init__(self, threads: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s2ft-guide-check")
        self.pending = 0
        self._lock = threading.Lock()  # apps on other event loops (threads) share the pool

    async def check(self, engine: Engine, guide: Guide, param: str) -> None:
        limit = engine.config.max_queue
        with self._lock:
            if self.pending >= limit:
                raise QueueFullError(f"too many requests wait for new schemas or grammars to compile ({limit});"
                                     " retry later")
            self.pending += 1
        try:
            job = self.pool.submit(check_guide, engine, guide, param)
        except BaseException:
            self._done()
            raise
        # once the job ends, or is cancelled before it starts (QA: a cancelled request cancels its queued
        # job, which then never runs: a count decremented inside the job leaked)
        job.add_done_callback(self._done)
        await asyncio.wrap_future(job)

    def _done(self, job=None) -> None:
        with self._lock:
            self.pending -= 1


GUIDE_CHECKS = GuideChecks()


async def request_guide(engine: Engine, fields: SamplingFields, tools: Guide | None = None) -> Guide | None:
    """The request's guide (or the one its `tools` need), compiled and checked against the tokenizer
    (400 if it does not compile); off the event loop, since a large schema can take a while."""
    guide, param = guide_of(fields)
    if tools is not None:
        if guide is not None:
            raise InvalidRequestError(f"a tool call cannot be combined with {param}", param="tool_choice")
        guide, param = tools, "tools"
    if guide is None:
        return None
    if not engine.check_guide_if_known(guide, param):  # (compiled or refused before: a look-up)
        await GUIDE_CHECKS.check(engine, guide, param)
    return guide


def check_guide(engine: Engine, guide: Guide, param: str) -> None:
    """In the pool: `engine.guided` is built on first use (~0.3 s), then compiles the guide."""
    engine.guided.check(guide, param)


def choice_seed(seed: int, choice: int) -> int:
    """Choice `choice`'s seed: `seed + choice`, wrapped into the signed 64-bit range the protocol takes
    (QA: seed 2**63 - 1 with n = 2 was refused as an invalid seed)."""
    return (seed + choice + 2**63) % 2**64 - 2**63


def sampling_params(fields: SamplingFields, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None, choice: int, guide: Guide | None = None,
                    skip_special_tokens: bool | None = None) -> SamplingParams:
    """The engine parameters of choice `choice` (0..n-1); seeded requests use seed + choice.
    `skip_special_tokens` overrides the request's."""
    top_k = fields.top_k if fields.top_k is not None and fields.top_k > 0 else 0
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if fields.temperature is None else fields.temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=top_k,
        min_p=fields.min_p or 0.0,
        seed=None if fields.seed is None else choice_seed(fields.seed, choice),
        stop=stop_list(fields.stop),
        stop_token_ids=list(fields.stop_token_ids or []),
        ignore_eos=fields.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repetition_penalty=1.0 if fields.repetition_penalty is None else fields.repetition_penalty,
        logit_bias=logit_bias(fields.logit_bias),
        min_tokens=fields.min_tokens,
        guide=guide,
        skip_special_tokens=fields.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
        include_stop_str_in_output=fields.include_stop_str_in_output,
    )
    params.validate()
    return params


@dataclass
class Choice:
    """One engine request: choice `index` of the response, for prompt `prompt_index`."""

    index: int
    prompt_index: int
    handle: RequestHandle
    submitted: float
    first_token: float | None = None
    finished: float | None = None
    generated: int = 0


@dataclass(eq=False)  # one per HTTP request, hashed by identity: the app keeps those in flight in a WeakSet
class Generation:
    """The engine requests behind one HTTP request, their metrics, and their cancellation."""

    engine: Engine
    metrics: Metrics
    adapter: str | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[Choice] = field(default_factory=list)
    accounted: bool = False
    stopped: S2FTError | None = None  # set by stop(): what the request ends with

    def stop(self, exc: S2FTError) -> None:
        """End every choice now with `exc` (the drain deadline): a stream sends it as an error event."""
        self.stopped = exc
        self.cancel()

    async def submit_many(self, requests: list[tuple[int, list[int], SamplingParams]]) -> list[Choice]:
        """Submit engine requests (prompt index, token ids, params) together, as choices in this order:
        queued all at once, so a request's `n` choices are admitted in one step and share the prefill."""
        submitted = time.perf_counter()  # before a lazy load, which the first token waits for too
        try:
            handles = await self.engine.asubmit_many([(ids, self.adapter, params) for _, ids, params in requests])
        except BaseException:
            self.cancel()
            raise
        choices = []
        for (prompt_index, _, _), handle in zip(requests, handles):
            choices.append(Choice(len(self.choices), prompt_index, handle, submitted))
            self.choices.append(choices[-1])
        return choices

    def usage(self, prompt_tokens: int) -> Usage:
        """Usage of the whole request; `prompt_tokens` counts each prompt once, as do cached tokens."""
        first = {}  # one choice per prompt: its n choices share the prompt
        for c in self.choices:
            first.setdefault(c.prompt_index, c)
        completion_tokens = sum(c.generated for c in self.choices)
        cached = sum(c.handle.cached_tokens for c in first.values())
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def cancel(self) -> None:
        for choice in self.choices:
            choice.handle.cancel()

    def _on_event(self, choice: Choice, event: StreamEvent) -> None:
        if event.token_id is not None:
            choice.generated += 1
            if choice.first_token is None:
                choice.first_token = time.perf_counter()
        if event.finished:
            choice.finished = time.perf_counter()

    def account(self) -> None:
        """Count the request once in the token counters and latency histograms, however it ended:
        each prompt once (its n choices share it, as `usage` says), every token generated (also by
        choices cancelled half-way), one time to first token and one latency per HTTP request."""
        if self.accounted or not self.choices:
            return
        self.accounted = True
        now = time.perf_counter()
        prompts = {c.prompt_index: len(c.handle.prompt_token_ids) for c in self.choices}
        submitted = min(c.submitted for c in self.choices)
        firsts = [c.first_token for c in self.choices if c.first_token is not None]
        per_token = [(c.finished - c.first_token) / (c.generated - 1) for c in self.choices
                     if c.finished is not None and c.first_token is not None and c.generated > 1]
        generated = sum(max(c.generated, c.handle.generated_tokens) for c in self.choices)  # QA: a client that
        # left had the tokens still queued for it uncounted
        self.metrics.observe_generation(self.adapter, sum(prompts.values()), generated,
                                        min(firsts) - submitted if firsts else None, now - submitted, per_token)

    async def _result(self, choice: Choice) -> RequestOutput:
        async for event in choice.handle.aevents():
            self._on_event(choice, event)
        return await choice.handle.aresult()

    async def results(self, request: Request) -> list[RequestOutput]:
        """Every choice's output, in choice order; cancels everything if the client disconnects."""
        tasks = [asyncio.ensure_future(self._result(c)) for c in self.choices]
        try:
            pending = set(tasks)
            while pending:
                if await request.is_disconnected():
                    raise ClientDisconnected()
                _, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S)
            if self.stopped is not None:
                raise self.stopped
            return [t.result() for t in tasks]
        finally:
            for task in tasks:
                task.cancel()
            if not all(t.done() and not t.cancelled() and t.exception() is None for t in tasks):
                self.cancel()

    async def events(self) -> AsyncIterator[tuple[Choice, StreamEvent]]:
        """Events of all choices as they come; closing the iterator cancels the unfinished ones."""
        queue: asyncio.Queue[tuple[Choice, StreamEvent] | BaseException] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for event in choice.handle.aevents():
                    self._on_event(choice, event)
                    await queue.put((choice, event))
            except Exception as exc:  # forwarded to the consumer, which decides
                await queue.put(exc)

        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
        finished = 0
        try:
            while finished < len(self.choices):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item[1].finished:
                    if self.stopped is not None:
                        raise self.stopped
                    finished += 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            if finished < len(self.choices):
                self.cancel()


def record_status(metrics: Metrics, adapter: str | None, exc: BaseException | None,
                  gen: Generation | None = None) -> None:
    """Count one HTTP generation request by adapter and status (and its tokens and latency)."""
    if gen is not None:
        gen.account()
    if isinstance(exc, AdapterNotFoundError):
        adapter = UNKNOWN_ADAPTER_LABEL
    if exc is None:
        status: int | str = 200
    elif isinstance(exc, S2FTError):
        status = exc.status_code
    elif isinstance(exc, (asyncio.CancelledError, ClientDisconnected)):
        status = CLIENT_CLOSED
    else:
        status = 500
    metrics.observe_request(adapter, status)


def sse(payload: BaseModel) -> str:
    try:
        return f"data: {payload.model_dump_json()}\n\n"
    except PydanticSerializationError:  # a lone surrogate (JSON's "\\udcff", in a tool call's arguments):
        # escaped, as SafeJSONResponse does (QA: the stream ended in an internal error)
        return f"data: {ascii_json(payload.model_dump())}\n\n"


def sse_error(exc: S2FTError) -> str:
    """An error met after the stream began (the status is already sent), as vLLM reports it."""
    return f"data: {domain_error_response(exc).body.decode()}\n\n"


async def sse_stream(chunks: AsyncIterator[str], done: Callable[[BaseException | None], None]) -> AsyncIterator[str]:
    """Wrap a route's chunks: `data: [DONE]` at the end, errors as an event, metrics, and cleanup."""
    try:
        async for chunk in chunks:
            yield chunk
        yield SSE_DONE
        done(None)
    except S2FTError as exc:
        done(exc)
        yield sse_error(exc)
        yield SSE_DONE
    except (asyncio.CancelledError, GeneratorExit):
        done(asyncio.CancelledError())
        raise
    except Exception as exc:  # never a 5xx mid-stream: the status line is long gone
        log.exception("stream failed")
        done(exc)
        yield sse_error(S2FTError(f"internal error: {type(exc).__name__}"))
        yield SSE_DONE
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def serve(request: Request, response: Response, engine: Engine, settings: ServerSettings, metrics: Metrics,
                fields: SamplingFields, start: Callable[[Generation], Awaitable[object]],
                stream: Callable[[Generation, str, object], AsyncIterator[str]],
                build: Callable[[Generation, str, object, list[RequestOutput]], BaseModel]) -> BaseModel | Response:
    """The life of one generation request, shared by completions and chat.

    `start(gen)` validates and submits (returning a context for the other two), `stream` makes the
    SSE chunks, `build` the JSON body. Metrics count the request once, whatever happens.
    """
    adapter, gen = UNKNOWN_ADAPTER_LABEL, None  # until the request names one (QA: a conflicting model and
    # adapter were counted as the base's)
    request.state.counted = True  # below, whatever happens; the error handlers count what never got here
    try:
        adapter = choose_adapter(engine, settings, fields.model, fields.adapter)
        check_adapter(engine, adapter)
        gen = Generation(engine, metrics, adapter)
        request.app.state.generations.add(gen)
        context = await start(gen)
    except BaseException as exc:
        record_status(metrics, adapter, exc, gen)
        raise
    model = response_model(engine, adapter)
    # a header holds printable Latin-1 only (QA: an adapter named 日本 made each of its requests a 500)
    headers = {"x-adapter-id": model if model.isascii() and model.isprintable() else quote(model, safe="")}
    if fields.stream:
        events = sse_stream(stream(gen, model, context), partial(record_status, metrics, adapter, gen=gen))
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    try:
        outputs = await gen.results(request)
    except ClientDisconnected as exc:  # nobody to answer: no traceback in the log for a client's choice
        record_status(metrics, adapter, exc, gen)
        return Response(status_code=CLIENT_CLOSED)
    except BaseException as exc:
        record_status(metrics, adapter, exc, gen)
        raise
    try:
        body = build(gen, model, context, outputs)
    except BaseException as exc:  # counted as what it is (QA: a 500 here was counted as a 200)
        record_status(metrics, adapter, exc, gen)
        raise
    record_status(metrics, adapter, None, gen)
    response.headers.update(headers)
    return body
