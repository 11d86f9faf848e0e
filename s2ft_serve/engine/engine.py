"""The engine's public API: one base model, many adapters, sync and asyncio requests.

CONTRACT (implementation in progress): every method below keeps this signature.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Iterator

from s2ft_serve.adapters.format import Adapter
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.request import AdapterInfo, EngineStats, RequestOutput, SamplingParams, StreamEvent


class RequestHandle:
    """A submitted request. Iterate `events()` (sync) or `aevents()` (async); `cancel()` aborts it."""

    request_id: str
    adapter: str | None
    prompt_token_ids: list[int]

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]: ...
    def aevents(self) -> AsyncIterator[StreamEvent]: ...
    def result(self, timeout: float | None = None) -> RequestOutput: ...
    async def aresult(self) -> RequestOutput: ...
    def cancel(self) -> None: ...


class Engine:
    """Holds the base weights once and any number of adapters; a background thread runs steps.

    Errors raised (from s2ft_serve.errors): InvalidRequestError (bad params, prompt too long),
    AdapterNotFoundError (unknown adapter), QueueFullError (queue at max_queue),
    AdapterValidationError (bad adapter folder), ConflictError (name exists / fused state),
    PermissionDeniedError (path outside adapter_root).
    """

    model_name: str  # the base model's name as the API shows it
    tokenizer: object  # transformers tokenizer (has apply_chat_template, eos_token_id)
    max_model_len: int
    fingerprint: str
    config: EngineConfig

    def __init__(self, config: EngineConfig, loaded=None) -> None: ...
    def start(self) -> "Engine": ...  # starts the step thread; returns self
    def shutdown(self, timeout: float = 30.0) -> None: ...  # finishes in-flight requests (bounded), stops

    # requests
    def submit(self, prompt: str | list[int], adapter: str | None = None,
               params: SamplingParams | None = None) -> RequestHandle: ...
    def generate(self, prompt: str | list[int], adapter: str | None = None,
                 params: SamplingParams | None = None) -> RequestOutput: ...
    async def agenerate(self, prompt: str | list[int], adapter: str | None = None,
                        params: SamplingParams | None = None) -> RequestOutput: ...
    def tokenize(self, text: str) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict]) -> list[int]: ...

    # adapters
    def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo: ...
    def add_adapter(self, name: str, adapter: Adapter, replace: bool = False) -> AdapterInfo: ...
    def remove_adapter(self, name: str) -> None: ...
    def list_adapters(self) -> list[AdapterInfo]: ...
    def get_adapter(self, name: str) -> AdapterInfo: ...
    def has_adapter(self, name: str) -> bool: ...  # loaded or evicted-but-known; not lazy candidates
    def fuse(self, name: str) -> AdapterInfo: ...
    def unfuse(self, name: str) -> AdapterInfo: ...
    def merge(self, name: str, sources: list[tuple[str, float]]) -> AdapterInfo: ...

    # operations
    def stats(self) -> EngineStats: ...
    def add_step_listener(self, fn: Callable[[int, int], None]) -> None: ...  # fn(batch_size, num_tokens)
