"""The engine's public API: one base model, many adapters, sync and asyncio requests.

One engine thread (see `thread`) does all of an engine's torch work: it loads the model, runs
every adapter change and scoring call that other threads hand it, and, once started, the steps
(admit + prefill new requests, then one decode step for every running request). Everything that
changes weights or adapter slots also holds the step lock, so each forward pass sees one
consistent set of weights, also when tests drive the runner directly.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import itertools
import logging
import math
import numbers
import threading
import time
import weakref
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

import torch
from transformers import PreTrainedTokenizerBase

from s2ft_serve.adapters.format import (
    CONFIG_FILE, WEIGHTS_FILE, Adapter, ModuleDelta, check_config, check_targets, is_utf8, linear_shapes,
    parse_adapter, read_adapter_file, validate_tensors,
)
from s2ft_serve.adapters.native import KERNELS
from s2ft_serve.adapters.registry import AdapterRegistry, Entry
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.autofuse import AutoFusePolicy
from s2ft_serve.engine.detokenizer import Detokenizer
from s2ft_serve.engine.guided import GuidedDecoding, LazyGuidedDecoding
from s2ft_serve.engine.handle import RequestHandle
from s2ft_serve.engine.prefix_cache import PrefixCache
from s2ft_serve.engine.request import AdapterInfo, EngineStats, Guide, RequestOutput, SamplingParams, StreamEvent
from s2ft_serve.engine.runner import ModelRunner
from s2ft_serve.engine.scheduler import Scheduler, Sequence
from s2ft_serve.engine.stepper import Stepper
from s2ft_serve.engine.thread import EngineThread
from s2ft_serve.model.gemm import GEMMS
from s2ft_serve.errors import (
    AdapterNotFoundError,
    AdapterValidationError,
    ConflictError,
    EngineNotReadyError,
    InvalidRequestError,
    PermissionDeniedError,
    QueueFullError,
    S2FTError,
)
from s2ft_serve.model.loading import (TEMPLATE_FAILURES, TEMPLATE_REFUSALS, LoadedModel, exact_context_limit, head_dim_of,
                                      load_model, target_linears)

log = logging.getLogger(__name__)

__all__ = ["Engine", "RequestHandle"]


# apply_chat_template's own parameters, which chat_template_kwargs may not set
TEMPLATE_ARGUMENTS = (frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
                      - {"self", "kwargs"} | {"messages"})


def _on_engine_thread(method):
    """Run the method on the engine thread (inline when already there)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self._thread.call(method, self, *args, **kwargs)

    return wrapper


def _cancel_submitted(submitted: asyncio.Future) -> None:
    """Cancel what a submission whose caller went away queued."""
    if not submitted.cancelled() and submitted.exception() is None:
        for handle in submitted.result():
            handle.cancel()


def _stepping(stepper: "weakref.ref[Stepper]", idle: Callable[[], None]) -> Callable[[], bool]:
    """One pass of the step loop as the engine thread runs it; False once the engine is gone (the
    thread holds it weakly: its users and their requests' handles hold it). With nothing to step it
    waits in `idle`, which holds no reference to the engine."""

    def body() -> bool:
        s = stepper()
        if s is None:
            return False
        if not s.iteration():
            del s
            idle()
        return True

    return body


def merge_source(source) -> tuple[str, float]:
    """A merge source `(adapter name, weight)` checked, its weight as a float: any real number but a bool
    (numpy's and torch's scalars too), finite as a float."""
    try:
        name, weight = source
    except (TypeError, ValueError):
        raise InvalidRequestError(f"merge: a source must be (adapter name, weight), got {source!r}",
                                  param="sources") from None
    if not isinstance(name, str):
        raise InvalidRequestError(f"merge: a source must be an adapter name, got {name!r}", param="sources")
    real = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
    real = real or (isinstance(weight, torch.Tensor) and weight.numel() == 1 and weight.dtype != torch.bool
                    and not weight.is_complex())
    try:
        value = float(weight) if real else None
    except Exception:  # too large for a float, a tensor without data, a number type of its own
        value = None
    if value is None or not math.isfinite(value):
        raise InvalidRequestError(f"merge: the weight of '{name}' must be a finite number, got {weight!r}",
                                  param="sources")
    return name, value


class Engine:
    """Holds the base weights once and any number of adapters; its engine thread does the torch work."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        """Load the model (unless `loaded` is given) on a new engine thread; `start()` begins stepping."""
        self.config = config
        if config.gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {', '.join(GEMMS)}, not {config.gemm!r}")
        if config.adapter_kernel not in KERNELS:
            raise ValueError(f"adapter_kernel must be one of {', '.join(KERNELS)}, not {config.adapter_kernel!r}")
        if not 1 <= config.speculative_ngram_min <= config.speculative_ngram_max:
            raise ValueError("speculative decoding needs 1 <= speculative_ngram_min <= speculative_ngram_max")
        self.scheduler = Scheduler(config.max_batch_size, config.max_tokens_per_step, config.max_queue)
        self._thread = EngineThread(self.scheduler.cond)
        # an engine dropped without shutdown(): its thread ends once the engine is collected (see start);
        # at exit the engine thread stops on its own (engine.thread)
        self._finalizer = weakref.finalize(self, self._thread.stop, final=lambda: None, timeout=0)
        self._finalizer.atexit = False
        try:
            self._thread.call(self._build, config, loaded)
        except BaseException:
            self._thread.stop(final=lambda: None)
            raise
        self.lock = threading.RLock()
        self.stepper = Stepper(self)
        self._guided = LazyGuidedDecoding(self.tokenizer, self.vocab_size, self.stepper.eos_ids)
        self._ids = itertools.count()
        self.autofuse = AutoFusePolicy(config.auto_fuse_share, config.auto_unfuse_share, config.auto_fuse_window_s,
                                       config.auto_fuse_min_requests) if config.auto_fuse else None
        self.auto_fuse_decisions = 0
        self._auto_fused: set[str] = set()  # the fused adapters the policy fused (it unfuses no others)
        self._accepting = True

    def _build(self, config: EngineConfig, loaded: LoadedModel | None) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        loaded = loaded or load_model(config.model, dtype=config.dtype, device=config.device)
        self.loaded = loaded
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        hf_config = loaded.model.config
        limit, why = exact_context_limit(hf_config)
        if config.max_model_len and limit and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} is beyond what this engine serves exactly for "
                             f"this model: it uses {why}, which the engine does not implement; at most {limit}")
        default = min(getattr(hf_config, "max_position_embeddings", 2048), 2048, limit or 2048)
        self.max_model_len = config.max_model_len or default
        self.vocab_size = hf_config.vocab_size
        self.head_dim = head_dim_of(hf_config)
        self._shapes = linear_shapes(target_linears(loaded.model))
        self.runner = ModelRunner(loaded.model, config.max_batch_size, self.max_model_len, config.gemm,
                                  config.adapter_kernel, config.cuda_graphs)
        self.device = self.runner.device
        if self.device.type == "cuda":  # this thread's current GPU is the model's: the Triton kernel launches there
            torch.cuda.set_device(self.device)
        self.dtype = loaded.model.dtype
        self.registry = AdapterRegistry(
            self.runner.layers, config.max_resident_adapters, config.max_resident_bytes, self.head_dim,
            max_fused=config.max_fused_adapters)
        cache = PrefixCache(self.runner.model.cache, config.prefix_block_size, config.prefix_cache_bytes)
        self.prefix_cache = cache if cache.enabled else None
        if self.prefix_cache is not None:
            self.registry.on_retire = lambda version: cache.drop_owner(version.uid)

    @property
    def mixed_kernel(self) -> str:
        """What computes mixed-adapter steps: "compiled" (the C++ kernel; on a GPU, its Triton twin) or
        "embedding_bag" (where the kernel does not serve this model, was not asked for, or could not be built)."""
        return "compiled" if any(layer.native is not None for layer in self.runner.layers.values()) else "embedding_bag"

    @property
    def cuda_graphs(self) -> str:
        """Decode steps as CUDA graphs: "on", "failed" (a capture failed; eager since, see the log) or "off"
        (not on a GPU, turned off, or a model whose rotary angles depend on the length)."""
        graphs = self.runner.graphs
        return "off" if graphs is None or not graphs.capture else "failed" if graphs.failed else "on"

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the preallocated KV cache (one row per batch slot, plus one, of max_model_len tokens)."""
        return self.runner.model.cache.nbytes

    # ---- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:  # `with Engine(config) as engine:` shuts it down at the end
        self.shutdown()

    def start(self) -> "Engine":
        """Begin stepping on the engine thread (idempotent). The thread holds the engine weakly: an
        engine dropped without `shutdown()` lives while a handle of one of its requests does, then is
        collected and its thread ends (it held the model for the life of the process)."""
        if not self._thread.running:
            # a request or a call wakes it (the scheduler holds no engine while it has no request)
            idle = partial(self._thread.wait, self.scheduler.has_work, 0.05)
            self._thread.run_body(_stepping(weakref.ref(self.stepper), idle))
        return self

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run `fn(*args, **kwargs)` on the engine thread between steps and return its result
        (benchmarks and tools that drive `runner` / `registry` directly)."""
        return self._thread.call(fn, *args, **kwargs)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish within `timeout`, abort the rest, stop. Called on
        the engine thread (a step listener), it aborts them at once: only that thread could finish them."""
        with self.scheduler.cond:  # see _enqueue
            self._accepting = False
        deadline = time.monotonic() + (0 if self._thread.current else timeout)
        while self.scheduler.has_work() and time.monotonic() < deadline and self._thread.running:
            time.sleep(0.02)
        self._thread.stop(final=self.stepper.abort_all)
        self._finalizer.detach()  # nothing left for it to stop (it held the engine thread, and so the engine)

    # ---- requests ------------------------------------------------------------------------
    def tokenize(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Text as token ids, with the tokenizer's special tokens (the BOS of Llama 3's or Mistral's
        tokenizers; SmolLM2's adds none) as `tokenizer(text)`, transformers' generate and vLLM's
        completions add them, unless `add_special_tokens` is false (a rendered chat has them already)."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except TypeError:  # the tokenizer's answer to a lone surrogate ("\ud800"); say what is wrong
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequestError(f"{param} is not valid Unicode text: {exc.reason} at position "
                                          f"{exc.start}", param=param) from None
            raise

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            template_kwargs: dict | None = None, add_special_tokens: bool = False) -> list[int]:
        """The token ids of a chat (with the tools, for templates that show them), ready for the answer:
        after the template's opening of the assistant's turn (`add_generation_prompt`), or inside the
        final assistant message, left open (`continue_final_message`). `template_kwargs` are more
        variables for the template; `add_special_tokens` adds the tokenizer's special tokens on top of
        what the template writes (vLLM's option; off by default, as there). A chat the template refuses
        raises InvalidRequestError."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("the base model's tokenizer has no chat template", param="messages")
        if add_generation_prompt and continue_final_message:
            raise InvalidRequestError("continue_final_message needs add_generation_prompt false",
                                      param="continue_final_message")
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise InvalidRequestError("continue_final_message needs an assistant message last",
                                      param="continue_final_message")
        clash = sorted(set(template_kwargs or {}) & TEMPLATE_ARGUMENTS)
        if clash:
            raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(clash)}",
                                      param="chat_template_kwargs")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **(template_kwargs or {}))
        except TEMPLATE_REFUSALS as exc:
            raise InvalidRequestError(f"the chat template refused these messages: {exc}", param="messages") from None
        except RecursionError:  # QA: a 500 (transformers walks the template's data recursively)
            raise InvalidRequestError("the chat (messages, tools or template arguments) is nested too deeply",
                                      param="messages") from None
        except TEMPLATE_FAILURES as exc:
            raise InvalidRequestError(f"the chat template failed on these messages: {type(exc).__name__}: {exc}",
                                      param="messages") from None
        self.check_text_fits(len(text), "messages")  # the template's text too, before tokenizing it
        return self.tokenize(text, param="messages", add_special_tokens=add_special_tokens)

    def submit(self, prompt: str | list[int], adapter: str | None = None,
               params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request (may load a lazily-loaded or evicted adapter first)."""
        return self.submit_many([(prompt, adapter, params)])[0]

    def submit_many(self, requests: list[tuple[str | list[int], str | None, SamplingParams | None]]
                    ) -> list[RequestHandle]:
        """Queue several requests (prompt, adapter, params) together, all or none: each is checked and its
        adapter pinned first, then all enter the queue at once, so they are admitted in the same step if
        the batch has room; identical prompts among them are then prefilled once (the `n` choices of
        one HTTP request)."""
        if not self._accepting or self._thread.stopping:  # shut down, or its thread stopped (at exit)
            raise EngineNotReadyError("the engine is shutting down")
        if len(requests) > self.config.max_queue:  # would be refused as "queue full" however long one waited
            raise InvalidRequestError(f"{len(requests)} sequences at once (prompts x n) is more than the request "
                                      f"queue holds ({self.config.max_queue})")
        prepared: list[tuple[Sequence, RequestHandle]] = []
        try:
            for prompt, adapter, params in requests:
                prepared.append(self._prepare(prompt, adapter, params))
            seqs = [seq for seq, _ in prepared]
            # before queueing: a sequence that finishes at once gives its version up (QA: uncounted)
            served = {id(seq.version): seq.version for seq in seqs if seq.version is not None}
            if not self._enqueue(seqs):
                with self.lock:
                    for dropped in self.scheduler.take_cancelled():  # they free their places now
                        self.stepper.abort_waiting(dropped)
                if not self._enqueue(seqs):
                    raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting); retry later")
        except BaseException:
            with self.lock:
                for seq, _ in prepared:
                    if seq.version is not None:
                        self.registry.release(seq.version)
            raise
        # one request per adapter per call, however many sequences (QA: one HTTP request with n = 4 alone
        # met --auto-fuse-min-requests 4 and fused its adapter, and counted as 4 requests served)
        for version in served.values():
            self.registry.count_served(version)
        if self.autofuse is not None:
            for adapter in dict.fromkeys(adapter for _, adapter, _ in requests):
                self.autofuse.record(adapter)
        return [handle for _, handle in prepared]

    def _enqueue(self, seqs: list[Sequence]) -> bool:
        """Queue `seqs` (False: the queue is full), under the lock that a shutdown and the thread's stop take
        to stop accepting: a request prepared while the engine shut down was queued after its last step
        and never answered (QA)."""
        with self.scheduler.cond:
            if not self._accepting or self._thread.stopping:
                raise EngineNotReadyError("the engine is shutting down")
            return self.scheduler.add_all(seqs)

    def _detokenizer(self, params: SamplingParams, prompt_ids: list[int]) -> Detokenizer:
        """The request's detokenizer: a token that ends the answer (EOS unless ignored, a stop token id)
        is not part of its text, nor is a stop string, unless `include_stop_str_in_output` (as in vLLM);
        special tokens are left out unless asked for; the answer's text is decoded after the prompt's."""
        return Detokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                           params.end_ids(self.stepper.eos_ids), params.include_stop_str_in_output, params.min_tokens,
                           prompt=prompt_ids)

    def _prepare(self, prompt: str | list[int], adapter: str | None,
                 params: SamplingParams | None) -> tuple[Sequence, RequestHandle]:
        """Check a request and pin its adapter; its sequence and handle, not queued yet."""
        params = params or SamplingParams()
        params.validate()
        prompt_ids = self._prompt_ids(prompt)
        self.check_length(len(prompt_ids), params.max_tokens)
        self.check_token_ids(params.logit_bias, "logit_bias")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")  # QA: one out of range banned tokens in
        # another request's logits (min_tokens), or failed the whole step
        matcher = self.guided.matcher(params.guide) if params.guide is not None else None
        detokenizer, generator = self._detokenizer(params, prompt_ids), self._generator(params.seed)
        version = self._pin(adapter)  # last: nothing after it can fail and leave the adapter pinned
        handle = RequestHandle(f"req-{next(self._ids)}", adapter, prompt_ids)
        seq = Sequence(
            request_id=handle.request_id, adapter_name=adapter, prompt_ids=prompt_ids, params=params,
            version=version, sink=handle, detokenizer=detokenizer, generator=generator, matcher=matcher)
        handle.bind(seq, self)
        return seq, handle

    def generate(self, prompt: str | list[int], adapter: str | None = None,
                 params: SamplingParams | None = None) -> RequestOutput:
        self.start()
        return self.submit(prompt, adapter, params).result()

    async def asubmit(self, prompt: str | list[int], adapter: str | None = None,
                      params: SamplingParams | None = None) -> RequestHandle:
        """Like `submit`, from asyncio: file loads run in a thread; events arrive on this loop."""
        return (await self.asubmit_many([(prompt, adapter, params)]))[0]

    async def asubmit_many(self, requests: list[tuple[str | list[int], str | None, SamplingParams | None]]
                           ) -> list[RequestHandle]:
        """Like `submit_many`, from asyncio. Cancelled while the submission runs in its thread, the
        requests it queues are cancelled as soon as it returns (QA: they ran to max_tokens, unreachable)."""
        submitting = asyncio.ensure_future(asyncio.to_thread(self.submit_many, requests))
        try:
            handles = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            submitting.add_done_callback(_cancel_submitted)
            raise
        loop = asyncio.get_running_loop()
        for handle in handles:
            handle.attach_loop(loop)
        return handles

    async def agenerate(self, prompt: str | list[int], adapter: str | None = None,
                        params: SamplingParams | None = None) -> RequestOutput:
        self.start()
        handle = await self.asubmit(prompt, adapter, params)
        return await handle.aresult()

    def stream(self, prompt: str | list[int], adapter: str | None = None,
               params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        self.start()
        return self.submit(prompt, adapter, params).events()

    async def astream(self, prompt: str | list[int], adapter: str | None = None,
                      params: SamplingParams | None = None) -> AsyncIterator[StreamEvent]:
        self.start()
        handle = await self.asubmit(prompt, adapter, params)
        async for event in handle.aevents():
            yield event

    @_on_engine_thread
    def logits(self, token_ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Full-sequence logits [len, vocab] float32, on the CPU, through the serving path (tests, scoring)."""
        ids = self._prompt_ids(list(token_ids))
        self.check_length(len(ids), 0)
        version = self._pin(adapter)
        try:
            with self.lock:
                row = len(self.scheduler.running)  # a free row; the next admitted request overwrites it
                logits = self.runner.prefill(ids, row, self.registry.slots_for(version), all_logits=True)
                logits = logits.to("cpu", torch.float32, copy=True)  # a copy of its own, on the CPU
            if version is not None:
                self.registry.count_served(version)
            return logits
        finally:
            if version is not None:
                with self.lock:
                    self.registry.release(version)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            self.check_token_ids(prompt, "prompt")
            ids = list(prompt)
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids", param="prompt")
        if not ids:  # an empty prompt starts from BOS (or EOS), like other servers
            start = self.tokenizer.bos_token_id
            start = start if start is not None else self.tokenizer.eos_token_id
            if start is None:
                raise InvalidRequestError("the prompt is empty, and the tokenizer has no BOS or EOS token to "
                                          "start from", param="prompt")
            ids = [start]
            self.check_token_ids(ids, "prompt")  # a tokenizer's id may lie beyond the model's vocabulary (QA)
        return ids

    @property
    def guided(self) -> GuidedDecoding:
        """Structured output for this engine's tokenizer (built on first use)."""
        return self._guided.get()

    def check_guide_if_known(self, guide: Guide, param: str | None = None) -> bool:
        """`guided.check(guide, param)` where it answers at once (the compiler is built and compiled or refused
        this guide before): True, or its InvalidRequestError; False where it would have to compile (the
        server then checks it in its pool, not on the event loop)."""
        built = self._guided.built
        return built is not None and built.check(guide, param, compile_new=False) is not None

    def check_token_ids(self, ids, param: str) -> None:
        """Refuse token ids outside the vocabulary, naming the request field `param`."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"{param} token id {bad[0]} is out of range [0, {self.vocab_size})",
                                      param=param)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's string in the vocabulary (byte-level tokens: one character per byte)."""
        return max(map(len, self.tokenizer.get_vocab()), default=1)

    def check_text_fits(self, chars: int, param: str = "prompt") -> None:
        """Refuse, before tokenizing, a text too long for the context whatever its tokens: it holds at
        least chars / max_token_chars of them (halved again for normalisers). A 6 MB prompt took 8 s
        of tokenizing to be refused."""
        if chars > 2 * self.max_model_len * self.max_token_chars:
            raise InvalidRequestError(
                f"{param} is {chars} characters long: more than this model's maximum context length of "
                f"{self.max_model_len} tokens can hold. Please reduce the length of the prompt.", param=param)

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_model_len:  # a full-length prompt with max_tokens 0 is scoring
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens.", param="max_tokens" if prompt_len < self.max_model_len else "prompt")

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        if seed is None:
            gen.seed()  # a non-deterministic seed for this generator only (torch.seed() would reseed the global one)
        else:
            gen.manual_seed(seed)
        return gen

    # ---- adapters ------------------------------------------------------------------------
    def _check_path(self, path: str | Path) -> Path:
        """The folder `path` names, symlinks followed; refused unless it lies inside `adapter_root`.

        Relative paths are taken under `adapter_root` (or the working folder when none is set).
        """
        root = self.config.adapter_root
        try:
            candidate = Path(path).expanduser()
            root_resolved = None if root is None else Path(root).expanduser().resolve()
            resolved = (candidate if root is None or candidate.is_absolute() else root_resolved / candidate).resolve()
        except (ValueError, OSError, RuntimeError) as exc:  # NUL bytes, unknown ~user, symlink loops
            raise InvalidRequestError(f"adapter path {str(path)!r} is not a usable path: {exc}", param="path") from None
        if not is_utf8(str(resolved)):  # a folder name that is not UTF-8: no listing could show it
            raise InvalidRequestError(f"adapter path {str(path)!r} is not valid Unicode text (a file name that is "
                                      "not UTF-8?)", param="path")
        if root_resolved is None:
            return resolved
        if not resolved.is_relative_to(root_resolved):
            raise PermissionDeniedError(f"adapter path {str(path)!r} is outside the adapter root", param="path",
                                        code="path_outside_root")
        for name in (CONFIG_FILE, WEIGHTS_FILE):  # QA: a file linked out of the root was read
            try:
                inside = (resolved / name).resolve().is_relative_to(root_resolved)
            except (OSError, RuntimeError):  # a link loop: the read reports the file
                continue
            if not inside:
                raise PermissionDeniedError(f"adapter path {str(path)!r}: {name} links outside the adapter root",
                                            param="path", code="path_outside_root")
        return resolved

    def _read(self, path: Path) -> Adapter:
        """A load's file reading, parsing and validation, in the calling thread: a slow disk or a large
        adapter never stalls the engine's steps (the checks run in numpy: no torch parallel region)."""
        return parse_adapter(read_adapter_file(path, self.fingerprint, self.config.max_adapter_bytes), self._shapes,
                             self.dtype)

    def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        """Validate an adapter folder, then make it visible under `name` (atomically). The files are
        read and validated in the calling thread; only installing runs on the engine thread."""
        self._check_name(name)
        resolved = self._check_path(path)
        return self._install_file(name, self._read(resolved), resolved, replace)

    @_on_engine_thread
    def _install_file(self, name: str, adapter: Adapter, resolved: Path, replace: bool) -> AdapterInfo:
        with self.lock:
            entry = self.registry.install(name, adapter, resolved, replace)
            return self._info(entry)

    @_on_engine_thread
    def add_adapter(self, name: str, adapter: Adapter, replace: bool = False) -> AdapterInfo:
        """Add an adapter held in memory (validated like a file, its tensors copied; never evicted)."""
        self._check_name(name)
        source = f"adapter '{name}'"
        if not isinstance(adapter, Adapter) or not isinstance(adapter.modules, dict):
            raise AdapterValidationError(f"{source}: must be an Adapter whose modules are a dict of ModuleDelta")
        if not all(isinstance(d, ModuleDelta) for d in adapter.modules.values()):
            raise AdapterValidationError(f"{source}: every module must be a ModuleDelta")
        config = check_config(adapter.config, f"{source}: config")
        modules = validate_tensors(
            {**{f"{m}.s2ft_index": d.index for m, d in adapter.modules.items()},
             **{f"{m}.s2ft_delta": d.delta for m, d in adapter.modules.items()}},
            self._shapes, source=source, dtype=self.dtype)
        check_targets(modules, config, source, f"{source}: config")
        fp = config.get("base_model_fingerprint")
        if fp and fp != self.fingerprint:
            raise AdapterValidationError(f"{source}: base_model_fingerprint {fp} does not match the base model")
        # QA: the caller's own tensors were kept (fusion later read whatever the caller had put in them since)
        # and its nbytes believed (nbytes=1 passed the memory limits)
        modules = {m: ModuleDelta(d.index.detach().clone(), d.delta.detach().clone()) for m, d in modules.items()}
        nbytes = sum(d.index.nbytes + d.delta.nbytes for d in modules.values())
        if nbytes > self.config.max_adapter_bytes:
            raise AdapterValidationError(f"{source}: {nbytes} bytes exceeds the limit of "
                                         f"{self.config.max_adapter_bytes} bytes (max_adapter_bytes)")
        adapter = Adapter(config=copy.deepcopy(config), modules=modules, path=adapter.path, nbytes=nbytes)
        with self.lock:
            return self._info(self.registry.install(name, adapter, None, replace))

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise InvalidRequestError("adapter name must be a non-empty string of at most 256 characters", param="name")
        if not is_utf8(name):  # a lone surrogate: no response could name it
            raise InvalidRequestError("adapter name must be valid Unicode text", param="name")
        if not name.isprintable():  # a newline or another control character: no log line or header holds it
            raise InvalidRequestError("adapter name must not hold control characters", param="name")
        if name == self.model_name:
            raise ConflictError(f"'{name}' is the base model's name", param="name")

    @_on_engine_thread
    def remove_adapter(self, name: str) -> None:
        self._not_the_base(name, "unloaded")
        self._auto_fused.discard(name)
        with self.lock:
            self.registry.remove(name)
        if self.autofuse is not None:
            self.autofuse.forget(name)  # else its past traffic would fuse it again (reloading it)

    def _not_the_base(self, name: str, done: str) -> None:
        """An admin action naming the base model gets a clear refusal, not "does not exist"."""
        if name == self.model_name:
            raise InvalidRequestError(f"'{name}' is the base model, not an adapter: it cannot be {done}", param="name")

    def _pin(self, name: str | None):
        """Resolve a request's adapter to a resident, pinned version (loading it if needed)."""
        if name is None:
            return None
        with self.registry.lock:  # not the step lock: pinning a resident adapter never waits for a step
            entry = self.registry.entries.get(name)
            if entry is not None and entry.version is not None:
                return self.registry.acquire(entry)
        path = self._lazy_path(name, entry)
        try:
            adapter = self._read(path)
        except AdapterValidationError as exc:  # a request's answer names the adapter, not the server's folders
            raise AdapterValidationError(str(exc).replace(str(path), f"adapter '{name}'"), param="model",
                                         code=exc.code) from None
        return self._install_and_pin(name, adapter, path, entry)

    @_on_engine_thread
    def _install_and_pin(self, name: str, adapter: Adapter, path: Path, was: Entry | None):
        """Install what `_pin` read (lazily, or again after eviction) and pin it. `was` is the entry the
        read began from. If it was unloaded meanwhile, the request gets 404 (QA: a DELETE during the
        reload of an evicted adapter was undone, even without lazy loading) unless lazy loading would
        load the same folder for a request arriving now (QA: such requests got a 404 that a retry
        did not); if it was replaced by one evicted since, the request is asked to retry."""
        with self.lock:
            entry = self.registry.entries.get(name)
            if entry is None:
                if was is not None and not self._lazily_from(name, path):
                    raise AdapterNotFoundError(name)  # unloaded while its files were read
                entry = self.registry.install(name, adapter, path, replace=False)
            elif entry.version is None:
                if entry.path != path:
                    raise ConflictError(f"adapter '{name}' was replaced while this request loaded it; retry",
                                        param="model")
                self.registry.reload(entry, adapter)
            return self.registry.acquire(entry)

    def _lazily_from(self, name: str, path: Path) -> bool:
        """Whether a request naming `name` now would lazily load it from `path` (as it was read)."""
        try:
            return self.lazy_folder(name) == path
        except AdapterNotFoundError:
            return False

    def _lazy_path(self, name: str, entry: Entry | None) -> Path:
        return entry.path if entry is not None else self.lazy_folder(name)

    def lazy_folder(self, name: str) -> Path:
        """The folder under `adapter_root` that a request naming `name` loads on demand."""
        root = self.config.adapter_root
        # not printable: a lone surrogate, or a newline or another control character (QA: a folder named
        # with a newline was served, its x-adapter-id header then broke)
        if not self.config.lazy_load or root is None or "/" in name or name in (".", "..") or not name.isprintable():
            raise AdapterNotFoundError(name)
        try:
            found = (Path(root).expanduser() / name / CONFIG_FILE).is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            found = False
        if not found:
            raise AdapterNotFoundError(name)
        return self._check_path(name)  # taken under the root (a relative root too: not joined twice)

    def list_adapters(self) -> list[AdapterInfo]:
        with self.lock:
            return [self._info(e) for e in self.registry.entries.values()]

    def get_adapter(self, name: str) -> AdapterInfo:
        with self.lock:
            return self._info(self.registry.get(name))

    def has_adapter(self, name: str) -> bool:
        return name in self.registry.entries

    def check_known(self, name: str) -> None:
        """AdapterNotFoundError unless `name` is loaded or a request could load it from `adapter_root`."""
        if not self.has_adapter(name):
            self.lazy_folder(name)

    @_on_engine_thread
    def fuse(self, name: str) -> AdapterInfo:
        """Add the adapter into the base columns in place; other requests stay exact (float32; below it
        they move by the dtype's rounding, see the README)."""
        self._not_the_base(name, "fused")
        self.check_known(name)  # 404 for a name no one could load, before "already fused" (QA: a 409)
        # a refused fuse loads nothing and evicts nothing (but for the room check of a folder never
        # loaded, whose size is known once loaded: registry.fuse checks again)
        self.registry.check_fusable(name)
        self._pin(name)  # makes it resident; the pin is released below
        with self.lock:
            entry = self.registry.get(name)
            try:
                self.registry.fuse(name)
            finally:
                self.registry.release(entry.version)
            self._auto_fused.discard(name)  # fused by hand: not the auto-fuse policy's (it re-adds its own);
            # after the fuse, as a refused one changes nothing (QA)
            return self._info(entry)

    @_on_engine_thread
    def unfuse(self, name: str) -> AdapterInfo:
        info = self._unfuse(name)
        if self.autofuse is not None:  # by hand: its traffic so far no longer argues for fusing it (QA: an
            self.autofuse.forget(name)  # admin's unfuse was undone a second later by the policy)
        return info

    def _unfuse(self, name: str) -> AdapterInfo:
        self._not_the_base(name, "unfused")
        with self.lock:
            entry = self.registry.get(name)
            self.registry.unfuse(name)
        self._auto_fused.discard(name)
        return self._info(entry)

    @_on_engine_thread
    def merge(self, name: str, sources: list[tuple[str, float]]) -> AdapterInfo:
        """A new adapter: the weighted sum of `sources` over the union of their indices."""
        from s2ft_serve.adapters.compose import merge_adapters

        # every check that needs no source before any is read (QA: a merge refused for its weight or its
        # name had already loaded its sources, evicting others)
        if isinstance(sources, (str, bytes, dict)) or not isinstance(sources, Iterable):
            raise InvalidRequestError("merge: sources must be a list of (adapter name, weight)", param="sources")
        sources = [merge_source(source) for source in sources]
        if not sources:
            raise InvalidRequestError("merge needs at least one source adapter", param="sources")
        self._check_name(name)
        if self.has_adapter(name):
            raise ConflictError(f"adapter '{name}' is already loaded", param="name")
        try:
            self.lazy_folder(name)
        except AdapterNotFoundError:
            pass
        else:  # QA: the merge would hide that folder from every request naming it
            raise ConflictError(f"'{name}' names an adapter folder under the adapter root", param="name")
        for src, _ in sources:
            self.check_known(src)  # 404 before any other source is read
        with self.lock:
            self.registry.check_memory_room(name, 0)  # its size is known once merged: checked again then
        parts = []
        for src, weight in sources:
            version = self._pin(src)
            with self.lock:
                self.registry.release(version)
            parts.append((version.adapter, weight))
        merged = merge_adapters(parts, base_model=self.model_name, fingerprint=self.fingerprint)
        merged.config["merged_from"] = [{"name": s, "weight": w} for s, w in sources]
        return self.add_adapter(name, merged)

    def auto_fuse_tick(self) -> None:
        """Apply the auto-fuse policy once (the step loop calls this about every second). It unfuses only
        what it fused itself (QA: it unfused adapters fused through the admin API), fuses only while
        `max_fused_adapters` leaves room (QA: one adapter fused by hand kept it from fusing any) and only an
        adapter already in memory (the next request for an evicted one loads it; a decision loads nothing)."""
        if self.autofuse is None:
            return
        fused = [f.version.name for f in self.registry.fused]
        self._auto_fused &= set(fused)  # (fuse, unfuse and remove_adapter also drop their adapter at once)
        decision = self.autofuse.decide([name for name in fused if name in self._auto_fused],
                                        room=len(fused) < self.config.max_fused_adapters)
        if decision is None:
            return
        if decision.action == "fuse":
            entry = self.registry.entries.get(decision.adapter)
            if entry is None or entry.version is None or decision.adapter in fused:
                return
        try:
            (self.fuse if decision.action == "fuse" else self._unfuse)(decision.adapter)  # its own unfuse keeps
            # the window (QA: forgetting it let another adapter be fused below --auto-fuse-share)
        except S2FTError as exc:
            log.warning("auto-fuse: could not %s '%s': %s", decision.action, decision.adapter, exc)
            return
        (self._auto_fused.add if decision.action == "fuse" else self._auto_fused.discard)(decision.adapter)
        self.auto_fuse_decisions += 1
        log.info("auto-fuse: %s '%s' (%.0f%% of %d requests in the last %.0f s)", decision.action,
                 decision.adapter, 100 * decision.share, decision.requests, self.config.auto_fuse_window_s)

    def _info(self, entry: Entry) -> AdapterInfo:
        s = entry.summary
        return AdapterInfo(
            name=entry.name, path=str(entry.path) if entry.path else None, nbytes=entry.nbytes,
            parameters=s["parameters"], modules=s["modules"], per_layer=s["per_layer"], config=entry.config,
            resident=entry.version is not None, fused=self.registry.is_fused(entry.name),
            requests_served=entry.requests_served, base_model=self.model_name)

    # ---- operations ----------------------------------------------------------------------
    @_on_engine_thread
    def reset_prefix_cache(self) -> None:
        """Drop every cached prompt prefix (they are rebuilt by later requests)."""
        if self.prefix_cache is not None:
            with self.lock:
                self.prefix_cache.clear()

    def stats(self) -> EngineStats:
        with self.scheduler.cond:
            waiting = list(self.scheduler.waiting)
            running = self.scheduler.in_flight()
        resident = self.registry.resident()
        cache, graphs = self.prefix_cache, self.runner.graphs
        return EngineStats(
            waiting=len(waiting), running=len(running),
            running_adapters=sorted({s.adapter_name for s in running if s.adapter_name}),
            waiting_adapters=sorted({s.adapter_name for s in waiting if s.adapter_name}),
            resident_adapters=len(resident), resident_bytes=sum(e.nbytes for e in resident),
            fused_adapters=[f.version.name for f in self.registry.fused],
            max_resident_adapters=self.config.max_resident_adapters, steps=self.stepper.steps,
            auto_fuse_decisions=self.auto_fuse_decisions,
            prefix_cache_hit_tokens=cache.hit_tokens if cache else 0,
            prefix_cache_query_tokens=cache.query_tokens if cache else 0,
            prefix_cache_bytes=cache.nbytes if cache else 0,
            spec_draft_tokens=self.stepper.draft_tokens, spec_accepted_tokens=self.stepper.accepted_tokens,
            cuda_graphs=self.cuda_graphs, cuda_graphs_captured=graphs.captured if graphs is not None else 0)

    def add_step_listener(self, fn: Callable[[int, int], None]) -> None:
        """`fn(batch_size, num_tokens)` after every forward pass (metrics)."""
        self.stepper.listeners.append(fn)
