"""Engine configuration: one dataclass, built once (CLI, `create_app`, tests) and passed down."""

from __future__ import annotations

from dataclasses import dataclass

# Fields that must be integers >= 1 (a batch of 0 admits nothing: every request would wait forever),
# and those that may be 0.
POSITIVE = ("max_batch_size", "max_tokens_per_step", "prefix_block_size", "max_queue", "max_resident_adapters",
            "max_resident_bytes", "max_adapter_bytes", "max_fused_adapters", "auto_fuse_min_requests",
            "speculative_ngram_min", "speculative_ngram_max", "speculative_max_batch")
NON_NEGATIVE = ("prefix_cache_bytes", "speculative_tokens")
OPTIONAL_POSITIVE = ("threads", "max_model_len")  # None: the default


@dataclass
class EngineConfig:
    model: str | None = None  # a local Hugging Face folder; None = the embedded SmolLM2-135M-Instruct
    device: str = "auto"  # auto picks cuda when available
    dtype: str = "float32"  # float32 | bfloat16 | float16
    threads: int | None = None  # CPU threads for torch; None = torch's default (one per core). On a
    # machine shared with other busy processes, 1 avoids OpenMP threads spinning against each other.
    gemm: str = "exact"  # exact: MKL's order (transformers' base logits bit for bit; AVX2: at 4, 8, 12+ rows)
    # | onednn: fused, prepacked oneDNN GEMMs on CPU float32 (about as fast here; logits differ by float rounding,
    # ~2e-4 on SmolLM2) and bfloat16 where the CPU has native bfloat16 arithmetic (faster than exact)
    adapter_kernel: str = "auto"  # mixed-adapter decode steps: auto = the compiled CPU kernel for CPU
    # float32 and bfloat16 where it builds (a C++ compiler, once), on CUDA its Triton twin, else embedding_bag
    # | native (required) | torch
    cuda_graphs: bool = True  # on a GPU, decode steps replay captured CUDA graphs (engine.graphs); False:
    # every step launches its kernels one by one (vLLM's enforce_eager). No effect on a CPU
    max_batch_size: int = 32  # requests decoded together per step
    max_tokens_per_step: int = 512  # prefill token budget per step; longer prompts are prefilled in chunks
    max_model_len: int | None = None  # prompt + output; None = min(model's max positions, 2048)
    prefix_cache_bytes: int = 256 << 20  # keys/values of recent prompt prefixes, reused by prompts that
    # start the same way (same adapter); 0 turns prefix caching off
    prefix_block_size: int = 16  # prefixes are cached and matched in blocks of this many tokens
    max_queue: int = 256  # waiting requests before submit raises QueueFullError (HTTP 429)
    max_resident_adapters: int = 64  # adapters with weights in memory; LRU eviction beyond
    max_resident_bytes: int = 2 << 30  # total adapter bytes in memory; LRU eviction beyond
    max_adapter_bytes: int = 512 << 20  # one adapter's safetensors file
    adapter_root: str | None = None  # the only folder adapters are loaded from by name (None: any path)
    lazy_load: bool = True  # a request naming an unloaded adapter under adapter_root loads it
    max_fused_adapters: int = 1
    auto_fuse: bool = False  # fuse the adapter that dominates recent traffic (opt-in)
    auto_fuse_share: float = 0.6  # fuse when one adapter has at least this share of the window's requests
    auto_unfuse_share: float = 0.4  # unfuse when its share falls below this (hysteresis)
    auto_fuse_window_s: float = 30.0  # the traffic window
    auto_fuse_min_requests: int = 20  # no decision on fewer requests than this in the window
    speculative_tokens: int = 0  # prompt-lookup speculative decoding: draft up to this many tokens per
    # request and step (0: off); see engine.speculative
    speculative_ngram_min: int = 2  # a draft follows an earlier occurrence of the last n tokens, n from
    speculative_ngram_max: int = 4  # max down to min (single-token matches are mostly chance in free text)
    speculative_max_batch: int = 8  # draft only while at most this many requests run: a larger batch is
    # bound by arithmetic, where verifying drafts costs more than it saves

    def __post_init__(self) -> None:
        """Refuse values the engine cannot run with, naming the field (the server's settings check the same)."""
        for names, least, none in ((POSITIVE, 1, False), (NON_NEGATIVE, 0, False), (OPTIONAL_POSITIVE, 1, True)):
            for name in names:
                value = getattr(self, name)
                if not (none and value is None) and (isinstance(value, bool) or not isinstance(value, int)
                                                     or value < least):
                    raise ValueError(f"{name} must be an integer >= {least}{' or None' if none else ''}, not {value!r}")
        for name in ("cuda_graphs", "lazy_load", "auto_fuse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        for name in ("auto_fuse_share", "auto_unfuse_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], not {getattr(self, name)!r}")
        if not self.auto_fuse_window_s > 0:
            raise ValueError(f"auto_fuse_window_s must be > 0, not {self.auto_fuse_window_s!r}")
