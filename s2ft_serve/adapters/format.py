"""Adapter format v1: load, validate and save S²FT adapters.

A folder with `adapter_config.json` and `adapter_model.safetensors`. For each adapted Linear
module `M` (named as in the Hugging Face model's `named_modules()`), the safetensors file holds
`M.s2ft_index` (int64 `[k]`, distinct input-feature indices) and `M.s2ft_delta` (float
`[out_features, k]`); the adapted weight is `W` with `W[:, index] += delta`.

Everything is validated before an adapter is returned; a failure raises
`AdapterValidationError` naming the file, the tensor and the reason. Pickle is never loaded. The
value checks (index range, distinct indices, finite deltas) run in numpy, so validating in any thread
starts no torch parallel region (a server validates in its request threads; see engine/thread.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from s2ft_serve.errors import AdapterValidationError

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 16 << 20  # the trainer's configs, selection included, are tens of kilobytes
MAX_CONFIG_DEPTH = 32  # the trainer's are 3 deep
WEIGHTS_FILE = "adapter_model.safetensors"
INDEX_SUFFIX = ".s2ft_index"
DELTA_SUFFIX = ".s2ft_delta"
DEFAULT_TARGET_MODULES = ["o_proj", "down_proj"]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class ModuleDelta:
    """One adapted module: `W[:, index] += delta`."""

    index: torch.Tensor  # [k] int64, distinct
    delta: torch.Tensor  # [out_features, k]

    @property
    def k(self) -> int:
        return int(self.index.numel())


@dataclass
class Adapter:
    """An S²FT adapter in memory: its config (all keys kept) and per-module column deltas."""

    config: dict
    modules: dict[str, ModuleDelta]
    path: Path | None = None
    nbytes: int = 0
    digest: str | None = None  # read from a file: the sha256 of its safetensors bytes

    @property
    def base_model(self) -> str:
        return str(self.config.get("base_model", ""))

    @property
    def fingerprint(self) -> str | None:
        return self.config.get("base_model_fingerprint")

    def num_parameters(self) -> int:
        return sum(m.delta.numel() for m in self.modules.values())

    def summary(self, head_dim: int | None = None) -> dict:
        """Heads and channels per layer (heads from o_proj columns / head_dim)."""
        per_layer: dict[str, dict[str, int]] = {}
        for name, md in sorted(self.modules.items(), key=lambda kv: _layer_key(kv[0])):
            layer = _layer_of(name)
            entry = per_layer.setdefault(layer, {})
            if name.endswith("o_proj"):
                entry["o_proj_columns"] = md.k
                if head_dim:
                    entry["heads"] = len({int(i) // head_dim for i in md.index.tolist()})
            elif name.endswith("down_proj"):
                entry["channels"] = md.k
        return {
            "modules": len(self.modules),
            "parameters": self.num_parameters(),
            "bytes": self.nbytes,
            "per_layer": per_layer,
        }


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[parts.index("layers") + 1] if "layers" in parts else name


def _layer_key(name: str):
    layer = _layer_of(name)
    return (int(layer) if layer.isdigit() else 10**9, name)


def make_config(base_model: str, fingerprint: str | None = None, **extra) -> dict:
    config = {
        "adapter_type": "s2ft",
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "target_modules": list(DEFAULT_TARGET_MODULES),
    }
    if fingerprint:
        config["base_model_fingerprint"] = fingerprint
    config.update(extra)
    return config


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write an adapter folder in format v1 (tensors contiguous, on CPU)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, md in adapter.modules.items():
        tensors[name + INDEX_SUFFIX] = md.index.detach().to("cpu", torch.int64).contiguous()
        tensors[name + DELTA_SUFFIX] = md.delta.detach().to("cpu").contiguous()
    check_config(adapter.config, f"{path / CONFIG_FILE}")  # QA: a non-UTF-8 source path made a config nothing loads
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "s2ft", "format_version": "1"})
    (path / WEIGHTS_FILE).chmod(0o666 & ~umask())  # safetensors 0.8 writes 0600 whatever the umask (QA)
    (path / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=False) + "\n")
    return path


def umask() -> int:
    """This process's file-creation mask (from /proc: `os.umask` can only read it by changing it, which
    races with other threads creating files); 0o022 where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def need_file(path: Path, why: str) -> None:
    """Refuse `path` unless it is a regular file (following links), saying what it is instead."""
    if path.is_file():
        return
    if path.is_symlink() and not path.exists():
        raise AdapterValidationError(f"{path}: a broken symbolic link (or a loop of links); {why}")
    if path.exists():
        raise AdapterValidationError(f"{path}: not a regular file (a folder, a device or a pipe); {why}")
    raise AdapterValidationError(f"{path}: missing; {why}")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise AdapterValidationError(f"{path}: not a usable path ({exc})") from None
    if not is_dir:
        raise AdapterValidationError(f"{path}: not an adapter folder (no such directory)")
    try:
        need_file(cfg_path, f"an adapter folder needs {CONFIG_FILE}")
        if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterValidationError(f"{cfg_path}: larger than {MAX_CONFIG_BYTES} bytes; a config holds a few keys")
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as exc:  # the process may not read it, an I/O error
        raise AdapterValidationError(f"{cfg_path}: not readable ({exc})") from None
    except UnicodeDecodeError as exc:
        raise AdapterValidationError(f"{cfg_path}: not valid JSON (not UTF-8 text: {exc.reason})") from None
    try:  # NaN and Infinity are Python's, not JSON's: no other reader could read the config back
        config = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise AdapterValidationError(f"{cfg_path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise AdapterValidationError(f"{cfg_path}: not valid JSON (nested too deeply)") from None
    return check_config(config, str(cfg_path))


def _plain_json(value, source: str, where: str = "", depth: int = 0) -> None:
    """Only what JSON holds (valid Unicode text, finite numbers, integers of at most 1024 bits), at most
    MAX_CONFIG_DEPTH levels deep (QA: a config nested a few hundred levels, or holding a lone surrogate,
    loaded, then every listing of adapters failed to serialise it; 1e400 read as inf)."""
    if depth > MAX_CONFIG_DEPTH:
        raise AdapterValidationError(f"{source}: nested more than {MAX_CONFIG_DEPTH} levels deep (at {where})")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AdapterValidationError(f"{source}: keys must be strings, got {key!r} (at {where or 'top'})")
            _plain_json(key, source, f"{where}: a key" if where else "a key", depth)
            _plain_json(item, source, f"{where}.{key}" if where else key, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain_json(item, source, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise AdapterValidationError(f"{source}: {where}: numbers must be finite, got {value}")
    elif isinstance(value, str) and not is_utf8(value):  # JSON's "\ud800" escape: no UTF-8 reader takes it
        raise AdapterValidationError(f"{source}: {where}: not valid Unicode text (a lone surrogate)")
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1024:  # Python's str()
        # of one beyond ~4300 digits raises (QA: a listing of such an adapter was a 500)
        raise AdapterValidationError(f"{source}: {where}: an integer of {value.bit_length()} bits; at most 1024")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise AdapterValidationError(f"{source}: {where}: not a JSON value ({type(value).__name__})")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with what is not UTF-8 in it (a file name's undecodable bytes) as `\\xNN` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_config(config, source: str) -> dict:
    """Refuse a config that is not format v1's (`source` names it in the error)."""
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{source}: must hold a JSON object")
    _plain_json(config, source)
    if config.get("adapter_type") != "s2ft":
        raise AdapterValidationError(f"{source}: adapter_type must be \"s2ft\", got {config.get('adapter_type')!r}")
    version = config.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not true, not 1.0
        raise AdapterValidationError(
            f"{source}: format_version must be {FORMAT_VERSION}, got {version!r}"
        )
    if not isinstance(config.get("base_model"), str):
        raise AdapterValidationError(f"{source}: base_model must be a string")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterValidationError(f"{source}: target_modules must be a list of module names")
    fp = config.get("base_model_fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise AdapterValidationError(f"{source}: base_model_fingerprint must be a string")
    return config


def check_targets(modules: Mapping[str, "ModuleDelta"], config: dict, source: str, config_source: str) -> None:
    """Every module must be among the config's target_modules (by last name part, or whole)."""
    targets = set(config["target_modules"])
    for name in modules:
        if name.rsplit(".", 1)[-1] not in targets and name not in targets:
            raise AdapterValidationError(
                f"{source}: tensor '{name}{DELTA_SUFFIX}': module '{name}' is not among the config's "
                f"target_modules {sorted(targets)} ({config_source})")


@dataclass
class AdapterFile:
    """An adapter folder read from disk but not yet parsed: its checked config and the raw bytes of
    its safetensors file (reading is the slow, unpredictable part; parsing is in-memory)."""

    path: Path
    config: dict
    data: bytes


def read_adapter_file(path: str | Path, base_fingerprint: str | None = None,
                      max_bytes: int | None = None) -> AdapterFile:
    """Read an adapter folder's config (checked) and weights file (size-checked), without parsing it."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    try:
        need_file(weights, f"an adapter folder needs {WEIGHTS_FILE} (pickle files are never loaded)")
        nbytes = weights.stat().st_size
    except OSError as exc:
        raise AdapterValidationError(f"{weights}: not readable ({exc})") from None
    if max_bytes is not None and nbytes > max_bytes:
        raise AdapterValidationError(f"{weights}: {nbytes} bytes exceeds the limit of {max_bytes} bytes")
    fp = config.get("base_model_fingerprint")
    if base_fingerprint and fp and fp != base_fingerprint:
        raise AdapterValidationError(
            f"{path / CONFIG_FILE}: base_model_fingerprint {fp} does not match the loaded base model ({base_fingerprint}); "
            "this adapter was trained on different base weights"
        )
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise AdapterValidationError(f"{weights}: not readable ({exc})") from None
    if max_bytes is not None and len(data) > max_bytes:  # grew since the size check
        raise AdapterValidationError(f"{weights}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    return AdapterFile(path, config, data)


def parse_adapter(raw: AdapterFile, linears: Mapping[str, tuple[int, int]] | None = None,
                  dtype: torch.dtype | None = None) -> Adapter:
    """Parse and fully validate what `read_adapter_file` read (`dtype`: see `validate_tensors`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights = raw.path / WEIGHTS_FILE
    try:
        tensors = load(raw.data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterValidationError(f"{weights}: not a readable safetensors file ({exc})") from None
    modules = validate_tensors(tensors, linears, source=str(weights), dtype=dtype)
    check_targets(modules, raw.config, str(weights), str(raw.path / CONFIG_FILE))
    return Adapter(config=raw.config, modules=modules, path=raw.path, nbytes=len(raw.data),
                   digest=hashlib.sha256(raw.data).hexdigest())


def load_adapter(
    path: str | Path,
    linears: Mapping[str, tuple[int, int]] | None = None,
    base_fingerprint: str | None = None,
    max_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> Adapter:
    """Read and fully validate an adapter folder.

    `linears` maps each adaptable module name to `(out_features, in_features)`; when given,
    every tensor must name one of them with matching shapes. `base_fingerprint`, when given,
    must equal the adapter's `base_model_fingerprint` if the adapter records one. `dtype`: the
    deltas must stay finite in it (see `validate_tensors`).
    """
    return parse_adapter(read_adapter_file(path, base_fingerprint, max_bytes), linears, dtype)


def _values(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy view of `t` (bfloat16 as its int16 bits), for checks that run no torch op."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _all_finite(delta: torch.Tensor) -> bool:
    values = _values(delta)
    if delta.dtype == torch.bfloat16:  # exponent bits all ones: inf or NaN
        return not bool(np.any((values & 0x7F80) == 0x7F80))
    return bool(np.isfinite(values).all())


def _fits(delta: torch.Tensor, dtype: torch.dtype) -> bool:
    """The (finite) values stay finite once rounded to `dtype`, the dtype the engine serves the delta
    in: a float64 1e39 is finite, but inf in float32. Numpy only, as the other checks."""
    if torch.finfo(dtype).max >= torch.finfo(delta.dtype).max:
        return True
    values = _values(delta)
    if delta.dtype == torch.bfloat16:  # its bits are a float32's upper half
        values = (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore"):
        if dtype == torch.float16:
            return bool(np.isfinite(values.astype(np.float16)).all())
        narrow = values.astype(np.float32)
        if dtype == torch.bfloat16:  # rounds to inf from 0x7F7F8000 (bfloat16's largest + half a step) on
            return not bool(np.any((narrow.view(np.uint32) & 0x7FFFFFFF) >= 0x7F7F8000))
        return bool(np.isfinite(narrow).all())


def validate_tensors(
    tensors: Mapping[str, torch.Tensor],
    linears: Mapping[str, tuple[int, int]] | None = None,
    source: str = "adapter",
    dtype: torch.dtype | None = None,
) -> dict[str, ModuleDelta]:
    """Pair `.s2ft_index` / `.s2ft_delta` tensors per module and check every invariant; with `dtype`
    (the serving dtype), the deltas must also stay finite once rounded to it."""

    def fail(tensor: str, reason: str):
        raise AdapterValidationError(f"{source}: tensor '{tensor}': {reason}")

    names: set[str] = set()
    for key in tensors:
        if key.endswith(INDEX_SUFFIX):
            names.add(key[: -len(INDEX_SUFFIX)])
        elif key.endswith(DELTA_SUFFIX):
            names.add(key[: -len(DELTA_SUFFIX)])
        else:
            fail(key, f"unexpected tensor name; expected '<module>{INDEX_SUFFIX}' or '<module>{DELTA_SUFFIX}'")
    if not names:
        raise AdapterValidationError(f"{source}: holds no adapted modules")
    modules: dict[str, ModuleDelta] = {}
    for name in sorted(names):
        ikey, dkey = name + INDEX_SUFFIX, name + DELTA_SUFFIX
        if linears is not None and name not in linears:
            fail(ikey if ikey in tensors else dkey,
                 f"module '{name}' is not an adaptable linear module (o_proj / down_proj) of the base model")
        if ikey not in tensors:
            fail(dkey, f"has no matching '{ikey}'")
        if dkey not in tensors:
            fail(ikey, f"has no matching '{dkey}'")
        index, delta = tensors[ikey], tensors[dkey]
        for key, t in ((ikey, index), (dkey, delta)):
            if not isinstance(t, torch.Tensor):
                fail(key, f"must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type == "meta":
                fail(key, "holds no data (a meta tensor)")
        if index.dtype != torch.int64:
            fail(ikey, f"dtype must be int64, got {str(index.dtype).replace('torch.', '')}")
        if index.dim() != 1 or index.numel() == 0:
            fail(ikey, f"shape must be [k] with k >= 1, got {list(index.shape)}")
        if delta.dtype not in FLOAT_DTYPES:
            fail(dkey, f"dtype must be floating point, got {str(delta.dtype).replace('torch.', '')}")
        k = index.numel()
        if delta.dim() != 2 or delta.shape[1] != k:
            fail(dkey, f"shape must be [out_features, {k}], got {list(delta.shape)}")
        indices = _values(index)
        lo, hi = int(indices.min()), int(indices.max())
        if linears is not None:
            out_features, in_features = linears[name]
            if delta.shape[0] != out_features:
                fail(dkey, f"shape must be [{out_features}, {k}] (out_features of '{name}'), got {list(delta.shape)}")
            if lo < 0 or hi >= in_features:
                fail(ikey, f"indices must lie in [0, {in_features}), found {lo if lo < 0 else hi}")
        elif lo < 0:
            fail(ikey, "indices must be non-negative")
        if np.unique(indices).size != k:
            fail(ikey, "indices must be distinct")
        if not _all_finite(delta):
            fail(dkey, "values must be finite (found NaN or inf)")
        if dtype is not None and not _fits(delta, dtype):
            fail(dkey, f"values must be finite in {str(dtype).replace('torch.', '')}, the dtype the model is "
                       f"served in (found a value beyond its range, {torch.finfo(dtype).max:.4g})")
        modules[name] = ModuleDelta(index=index.contiguous(), delta=delta.contiguous())
    return modules


def linear_shapes(linears: Mapping[str, torch.nn.Linear]) -> dict[str, tuple[int, int]]:
    return {name: (m.out_features, m.in_features) for name, m in linears.items()}


def merge_into(model: torch.nn.Module, adapter: Adapter, weight: float = 1.0) -> None:
    """`W[:, index] += weight * delta` in place, summed in float32 and stored in W's dtype.

    The reference merge (tests) and the offline `fuse` to a full model."""
    named = dict(model.named_modules())
    with torch.no_grad():
        for name, md in adapter.modules.items():
            W = named[name].weight
            index = md.index.to(W.device)
            summed = W[:, index].float() + weight * md.delta.to(W.device, torch.float32)
            W[:, index] = summed.to(W.dtype)
