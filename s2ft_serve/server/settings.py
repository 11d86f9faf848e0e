"""Server settings: every `s2ft-serve` flag, also readable from an `S2FT_*` environment variable.

Built once (by the CLI, or by whoever calls `create_app`) and passed down; nothing reads the
environment after that.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from s2ft_serve.adapters.format import is_utf8
from s2ft_serve.config import EngineConfig
from s2ft_serve.server.protocol import AdapterName

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
_ADAPTER_NAME = TypeAdapter(AdapterName)  # the admin routes' rule for a name the server gives


class ServerSettings(BaseSettings):
    """What the server needs to start; field `x` is flag `--x` and variable `S2FT_X`."""

    model_config = SettingsConfigDict(env_prefix="S2FT_", extra="ignore", populate_by_name=True)

    model: str | None = Field(None, description="local Hugging Face model folder; empty = embedded SmolLM2-135M-Instruct")
    # NAME=PATH pairs preloaded at start; the variable takes them comma-separated.
    adapter: Annotated[list[str], NoDecode] = Field(default_factory=list)
    adapter_root: str | None = Field(None, description="the only folder adapters are loaded from (unset: any path)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    admin_key: str | None = None
    max_batch_size: int = Field(32, ge=1)
    max_tokens_per_step: int = Field(512, ge=1, description="prefill token budget per engine step (longer prompts: in chunks)")
    max_queue: int = Field(256, ge=1)
    max_request_bytes: int = Field(16 << 20, ge=0, description="largest request body accepted, in bytes (413 "
                                   "beyond; 0: no limit)")
    prefix_cache_bytes: int = Field(256 << 20, ge=0, description="bytes of cached prompt-prefix keys/values (0: off)")
    prefix_block_size: int = Field(16, ge=1, description="prefixes are cached and matched in blocks of this many tokens")
    max_resident_adapters: int = Field(64, ge=1)
    max_resident_bytes: int = Field(2 << 30, ge=1)
    max_adapter_bytes: int = Field(512 << 20, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: one per core)")
    gemm: Literal["exact", "onednn"] = Field(
        "exact", description="exact: MKL's summation order (transformers' bits), compiled where verified; onednn: "
        "oneDNN's packed GEMMs on CPU float32 (logits differ by rounding) and bfloat16 (with native bfloat16 arithmetic)")
    adapter_kernel: Literal["auto", "native", "torch"] = Field(
        "auto", description="mixed-adapter steps: auto = the compiled CPU float32/bfloat16 kernel where it builds (on CUDA "
        "its Triton twin), else torch's embedding_bag; native = the kernel or refuse to start; torch = embedding_bag")
    cuda_graphs: bool = Field(True, description="on a GPU, replay decode steps as captured CUDA graphs (off: "
                              "launch every kernel each step, as vLLM's --enforce-eager)")
    lazy_load: bool = True
    max_fused_adapters: int = Field(1, ge=1)
    auto_fuse: bool = Field(False, description="fuse the adapter that dominates recent traffic; unfuse when it fades")
    auto_fuse_share: float = Field(0.6, gt=0, le=1, description="fuse at this share of the window's requests")
    auto_unfuse_share: float = Field(0.4, gt=0, le=1, description="unfuse below this share (hysteresis)")
    auto_fuse_window_s: float = Field(30.0, gt=0, description="the auto-fuse traffic window in seconds")
    auto_fuse_min_requests: int = Field(20, ge=1, description="requests in the window before any decision")
    speculative_tokens: int = Field(0, ge=0, le=16, description="prompt-lookup speculative decoding: draft up to "
                                    "this many tokens per request and step (0: off)")
    speculative_ngram_min: int = Field(2, ge=1, description="shortest suffix looked up for a draft")
    speculative_ngram_max: int = Field(4, ge=1, description="longest suffix looked up for a draft")
    speculative_max_batch: int = Field(8, ge=1, description="draft only while at most this many requests run")
    tool_call_parser: Literal["hermes", "llama3_json"] | None = Field(
        None, description="parser for the model's own tool-call syntax; enables tool_choice 'auto' (hermes: "
        "<tool_call>JSON</tool_call>, as Hermes and Qwen 2.5/3 write calls; llama3_json: an answer that is "
        "JSON calls, as Llama 3.1-3.3 write them)")
    enable_auto_tool_choice: bool = Field(False, description="accepted as vLLM's command lines give it; "
                                          "tool_choice 'auto' is on whenever --tool-call-parser is set")
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = Field(
        None, description="return the model's <think> reasoning as reasoning_content, apart from the answer "
        "(qwen3: a <think> block at the start; deepseek_r1: everything up to </think>)")
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM: how long in-flight requests may finish")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"  # uvicorn's levels
    access_log: bool = Field(True, description="log every HTTP request (uvicorn's access log)")

    @field_validator("adapter", mode="before")
    @classmethod
    def _split_adapters(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("adapter")
    @classmethod
    def _check_adapters(cls, value: list[str]) -> list[str]:
        names = set()
        for spec in value:
            name, sep, path = spec.partition("=")
            name = name.strip()
            if not sep or not name or not path.strip():
                raise ValueError(f"adapter {spec!r} must be NAME=PATH")
            # the admin routes' rule, so that they can reach it (QA: a preloaded 'bad/name' could be
            # neither unloaded nor fused), and one adapter per name (QA: the last silently won)
            try:
                _ADAPTER_NAME.validate_python(name)
            except ValidationError:
                raise ValueError(f"adapter name {name!r} must start with a letter or digit and hold only letters, "
                                 "digits and . _ : @ + - (at most 128 characters)") from None
            if name in names:
                raise ValueError(f"adapter name {name!r} is given twice")
            names.add(name)
        return value

    @model_validator(mode="after")
    def _auto_tool_choice_needs_a_parser(self) -> "ServerSettings":
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
        return self

    @field_validator("api_key", "admin_key")
    @classmethod
    def _no_empty_key(cls, value: str | None, info) -> str | None:
        # An empty key (S2FT_API_KEY= in an .env file) would match no token and lock every route; a
        # key read from a file keeps its newline, which no bearer token (stripped) could match.
        if value is not None and not value.strip():
            raise ValueError(f"{info.field_name} is empty; unset S2FT_{info.field_name.upper()} (or drop "
                             f"--{info.field_name.replace('_', '-')}) to serve without one")
        if value is not None and not is_utf8(value):  # bytes that are not UTF-8 (QA: every bearer request a 500)
            raise ValueError(f"{info.field_name} is not valid UTF-8 text")
        return value.strip() if value is not None else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ValueError("dtype must be one of float32, bfloat16, float16")
        return value

    def adapter_specs(self) -> dict[str, str]:
        """The preloaded adapters, name -> path. A relative path names a folder from the working folder
        where one is there (`--adapter math=./adapters/math`), else one under the adapter root, as the
        admin API's paths are (`--adapter math=math`); either must lie inside the root."""
        specs = {}
        for name, _, path in (s.partition("=") for s in self.adapter):
            path = path.strip()
            here = Path(path).expanduser()
            specs[name.strip()] = str(here.absolute()) if not here.is_absolute() and here.is_dir() else path
        return specs

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self._engine_values())

    def _engine_values(self) -> dict:
        return dict(
            model=self.model or None,
            device=self.device,
            dtype=self.dtype,
            threads=self.threads,
            gemm=self.gemm,
            adapter_kernel=self.adapter_kernel,
            cuda_graphs=self.cuda_graphs,
            max_batch_size=self.max_batch_size,
            max_tokens_per_step=self.max_tokens_per_step,
            max_queue=self.max_queue,
            prefix_cache_bytes=self.prefix_cache_bytes,
            prefix_block_size=self.prefix_block_size,
            max_resident_adapters=self.max_resident_adapters,
            max_resident_bytes=self.max_resident_bytes,
            max_adapter_bytes=self.max_adapter_bytes,
            max_model_len=self.max_model_len,
            adapter_root=self.adapter_root,
            lazy_load=self.lazy_load,
            max_fused_adapters=self.max_fused_adapters,
            auto_fuse=self.auto_fuse,
            auto_fuse_share=self.auto_fuse_share,
            auto_unfuse_share=self.auto_unfuse_share,
            auto_fuse_window_s=self.auto_fuse_window_s,
            auto_fuse_min_requests=self.auto_fuse_min_requests,
            speculative_tokens=self.speculative_tokens,
            speculative_ngram_min=self.speculative_ngram_min,
            speculative_ngram_max=self.speculative_ngram_max,
            speculative_max_batch=self.speculative_max_batch,
        )


def is_loopback_host(host: str | None) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    if host is None:
        return False
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
