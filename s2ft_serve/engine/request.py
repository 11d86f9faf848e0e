"""Requests, sampling parameters and outputs: the engine's public data types (no torch here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from s2ft_serve.errors import InvalidRequestError


@dataclass(frozen=True)
class Guide:
    """Structured output: the generated text must match exactly one of these (vLLM's
    `StructuredOutputsParams`). Compiled and checked against the tokenizer at submission."""

    json: dict | str | None = None  # a JSON schema, as a dict or as its JSON text
    json_object: bool = False  # any JSON object (OpenAI's `response_format: {"type": "json_object"}`)
    regex: str | None = None  # a regular expression the whole output matches
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a context-free grammar, in Lark or llama.cpp's GBNF syntax

    def validate(self) -> None:
        given = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(given) != 1:
            raise InvalidRequestError("structured output takes exactly one of json, json_object, regex, choice "
                                      "and grammar", param="guide")
        if self.choice is not None and (not self.choice or any(not isinstance(c, str) for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of strings", param="guide")


GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0 disables)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before them
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # False: stop on the tokenizer's EOS token
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's logprob and the top k
    # logit processing before sampling (OpenAI's and vLLM's meanings); logprobs stay the model's own
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # prompt and generated tokens: positive logits / it, negative * it
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled, nor stop strings match, before this many tokens
    guide: Guide | None = None  # structured output (see engine.guided); None: free text
    skip_special_tokens: bool = True  # False: special tokens (tags some models write) appear in the text
    include_stop_str_in_output: bool = False  # True: the stop string (or stop token) that ended it stays in the text

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW pick the most likely token, as 0 does (vLLM's rule): dividing
        logits by them would overflow."""
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    def end_ids(self, eos_ids: set[int] | frozenset[int]) -> frozenset[int]:
        """The tokens that end an answer: the stop token ids, and the model's EOS unless `ignore_eos`."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(eos_ids))

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string (QA: "ver" was taken as the stops "v", "e", "r")
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []

    def validate(self) -> None:
        """Refuse, naming the field, any value the engine could not serve (QA: `logprobs=True` or a float
        top_k passed and then failed the whole batch's step)."""
        for name in ("max_tokens", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be an integer", param=name)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be a number", param=name)
        if self.max_tokens < 0:
            raise InvalidRequestError("max_tokens must be a non-negative integer", param="max_tokens")
        if not 0 <= self.temperature < math.inf:  # NaN too
            raise InvalidRequestError("temperature must be a finite number >= 0", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be >= 0", param="top_k")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError("min_p must be in [0, 1]", param="min_p")
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**63):
            raise InvalidRequestError("seed must be a 64-bit integer", param="seed")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= 20):
                raise InvalidRequestError(f"{name} must be an integer between 0 and 20", param=name)
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a string or a list of non-empty strings", param="stop")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be a list of token ids", param="stop_token_ids")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequestError(f"{name} must be between -2 and 2", param=name)
        if not 0 < self.repetition_penalty <= 2:
            raise InvalidRequestError("repetition_penalty must be in (0, 2]", param="repetition_penalty")
        if not isinstance(self.logit_bias, dict) or any(
                not _is_int(t) or not _is_number(b) or not -100 <= b <= 100 for t, b in self.logit_bias.items()):
            raise InvalidRequestError("logit_bias maps token ids to values between -100 and 100", param="logit_bias")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens must be between 0 and max_tokens", param="min_tokens")
        if self.guide is not None:
            self.guide.validate()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class StreamEvent:
    """One step of one request: a new token (or the end)."""

    request_id: str
    token_id: int | None  # None on a final event that carries no new token
    text_delta: str  # text that became final with this token (stop strings never appear)
    logprob: TokenLogprob | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"


@dataclass
class RequestOutput:
    request_id: str
    adapter: str | None  # the adapter's name, None for the base model
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first prompt token has none
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class AdapterInfo:
    """What the engine tells about one adapter (admin API, `/v1/models`)."""

    name: str
    path: str | None
    nbytes: int
    parameters: int
    modules: int
    per_layer: dict  # layer -> {"heads", "o_proj_columns", "channels"}
    config: dict
    resident: bool  # weights in memory (False: evicted, reloads on its next request)
    fused: bool
    requests_served: int
    base_model: str


@dataclass
class EngineStats:
    """A snapshot for metrics (`/metrics`, `vllm:lora_requests_info`)."""

    waiting: int
    running: int
    running_adapters: list[str]
    waiting_adapters: list[str]
    resident_adapters: int
    resident_bytes: int
    fused_adapters: list[str]
    max_resident_adapters: int
    steps: int
    auto_fuse_decisions: int = 0  # fuse/unfuse decisions taken by --auto-fuse so far
    prefix_cache_hit_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache, so far
    prefix_cache_query_tokens: int = 0  # prompt tokens of the requests that looked in it, so far
    prefix_cache_bytes: int = 0  # bytes the cached prefixes hold now
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens proposed, so far
    spec_accepted_tokens: int = 0  # ... and accepted, so far
    cuda_graphs: str = "off"  # decode steps as CUDA graphs: "on", "failed" (a capture failed: eager since), "off"
    cuda_graphs_captured: int = 0  # graphs captured so far


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
