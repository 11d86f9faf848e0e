"""One request against any OpenAI-compatible server (s2ft-serve, vLLM), timed.

`send` builds a `/v1/completions` or `/v1/chat/completions` body, sends it with httpx (streamed
as server-sent events or not) and returns a `RequestResult` with the HTTP status, the text, the
token counts, and the times to first token and to the end. It never raises for a server or
network failure: those become results with an `outcome` such as "429", "timeout" or "transport".
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from loadtest.workload import RequestSpec


@dataclass(frozen=True)
class Target:
    """Where and how to send requests."""

    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    base_model: str  # what `model` names for requests to the base model
    api_key: str | None = None
    endpoint: str = "completions"  # completions | chat
    stream: bool = False
    temperature: float = 0.0  # 0: greedy, reproducible
    stream_usage: bool = True  # ask for a final usage chunk (stream_options.include_usage)
    ignore_eos: bool = False  # vLLM's extension; exact output lengths where the server knows it
    timeout_s: float = 120.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


@dataclass
class RequestResult:
    """What happened to one request. Times are seconds; `start_s` is relative to the run start."""

    index: int
    adapter: str | None
    status: int  # HTTP status; 0 when no response came (timeout, refused connection)
    start_s: float
    e2e_s: float
    ttft_s: float | None = None  # streaming only: until the first chunk carrying a token
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server's prefix cache answered (usage.prompt_tokens_details)
    output_tokens: int = 0
    text: str = ""
    error: str | None = None  # the server's error message, or the transport failure
    error_kind: str | None = None  # timeout | transport | protocol (no HTTP status to report)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def outcome(self) -> str:
        """"ok", the HTTP status as text, or the kind of transport failure."""
        if self.ok:
            return "ok"
        return self.error_kind or str(self.status)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (streaming only)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def request_body(spec: RequestSpec, target: Target) -> dict:
    """The JSON body; the adapter goes in `model` (the vLLM convention, which s2ft-serve follows)."""
    body: dict = {
        "model": spec.adapter or target.base_model,
        "max_tokens": spec.max_tokens,
        "temperature": target.temperature,
        "seed": spec.seed,
        "stream": target.stream,
    }
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if target.stream and target.stream_usage:
        body["stream_options"] = {"include_usage": True}
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send(client: httpx.AsyncClient, spec: RequestSpec, target: Target, t0: float) -> RequestResult:
    """Send one request and time it; `t0` is the run's start on `time.perf_counter()`'s clock."""
    start = time.perf_counter()
    result = RequestResult(index=spec.index, adapter=spec.adapter, status=0, start_s=start - t0, e2e_s=0.0)
    body = request_body(spec, target)
    try:
        async with asyncio.timeout(target.timeout_s):  # the whole request: httpx's timeout is per read
            if target.stream:
                await _send_streaming(client, body, target, result, start)
            else:
                await _send_plain(client, body, target, result)
    except (httpx.TimeoutException, TimeoutError) as exc:
        result.error, result.error_kind = f"timeout after {target.timeout_s:g} s ({type(exc).__name__})", "timeout"
    except httpx.HTTPError as exc:
        result.error, result.error_kind = f"{type(exc).__name__}: {exc}", "transport"
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        result.error, result.error_kind = f"malformed response: {exc!r}", "protocol"
    result.e2e_s = time.perf_counter() - start
    return result


async def _send_plain(client: httpx.AsyncClient, body: dict, target: Target, result: RequestResult) -> None:
    response = await client.post(target.path(), json=body, headers=target.headers(), timeout=target.timeout_s)
    result.status = response.status_code
    if response.status_code != 200:
        result.error = error_message(response.text)
        return
    payload = response.json()
    result.text = choice_text(payload["choices"][0])
    _take_usage(payload.get("usage"), result)


async def _send_streaming(
    client: httpx.AsyncClient, body: dict, target: Target, result: RequestResult, start: float
) -> None:
    chunks: list[str] = []
    usage: dict | None = None
    async with client.stream(
        "POST", target.path(), json=body, headers=target.headers(), timeout=target.timeout_s
    ) as response:
        result.status = response.status_code
        if response.status_code != 200:
            result.error = error_message((await response.aread()).decode(errors="replace"))
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            payload = json.loads(data)
            if "error" in payload:
                result.error = error_message(data)
                result.error_kind = "stream_error"
                return
            usage = payload.get("usage") or usage
            for choice in payload.get("choices") or []:
                if is_token_chunk(choice):
                    if result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - start
                    chunks.append(choice_text(choice))
        if not done:  # the server closed the stream early: whatever came is not a whole answer
            result.error, result.error_kind = "the stream ended before data: [DONE]", "protocol"
    result.text = "".join(chunks)
    result.output_tokens = len(chunks)  # one chunk per token unless usage says otherwise
    _take_usage(usage, result)


def is_token_chunk(choice: dict) -> bool:
    """Whether a streamed choice carries a generated token (its text may be empty, e.g. a special
    token or half a character); chat's opening role chunk (a role, no text) and a bare finish chunk do
    not. Servers differ in what else a delta holds (`"role": null` in every chunk, or the role repeated),
    so only an empty delta content beside a role marks the opening chunk."""
    if "text" in choice:
        return bool(choice["text"]) or not choice.get("finish_reason")
    delta = choice.get("delta") or {}
    content = delta.get("content")
    return content is not None and not (content == "" and delta.get("role"))


def choice_text(choice: dict) -> str:
    """The text of a completions choice, a chat message, or a streamed chat delta."""
    if "text" in choice:
        return choice["text"] or ""
    message = choice.get("delta") or choice.get("message") or {}
    return message.get("content") or ""


def _take_usage(usage: dict | None, result: RequestResult) -> None:
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


def error_message(body: str) -> str:
    """OpenAI's `{"error": {"message": ...}}`, FastAPI's `{"detail": ...}`, or the raw body."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:300]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in payload:
            return str(payload["detail"])
    return body[:300]


def make_http_client(target: Target, max_connections: int) -> httpx.AsyncClient:
    """One pooled client per run; the pool is sized so the client never queues requests itself."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(base_url=target.base_url, limits=limits, timeout=target.timeout_s)
