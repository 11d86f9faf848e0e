"""Interop with engines that know nothing of S²FT: fuse an adapter into a full model folder.

`fuse_to_model` writes a complete Hugging Face model folder (safetensors weights with
`W[:, index] += delta` applied, config, tokenizer files copied) that any engine can load.
The sums are computed in float32 and stored in the base model's own dtype.

Also here: the small folder helpers shared with `extract` (reading a checkpoint's safetensors
tensors lazily, writing an output folder atomically). Pickle checkpoints are never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from s2ft_serve.adapters.format import linear_shapes, load_adapter, merge_into, need_file, umask
from s2ft_serve.errors import AdapterValidationError, InvalidRequestError, ModelNotSupportedError
from s2ft_serve.model.loading import load_model, target_linears

# weights in any format: the fused folder must hold only the fused ones (QA: a base's GGUF, TF, Flax or ONNX
# weights were copied beside them, stale and unfused, for a loader or converter to pick)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".onnx_data",
                   ".ot", ".tflite", ".npz", ".pb", ".mlmodel", ".pdparams")
WRITTEN_BY_SAVE_PRETRAINED = ("config.json", "generation_config.json", "model.safetensors.index.json")
PROVENANCE_FILE = "s2ft_fused.json"


@dataclass
class FuseReport:
    out_dir: Path
    base_model: str
    adapter: str
    modules: int  # adapted modules merged
    parameters: int  # delta values merged
    dtype: str  # dtype of the written weights (the base's own)


def fuse_to_model(model_path: str | os.PathLike | None, adapter_path: str | os.PathLike,
                  out_dir: str | os.PathLike) -> FuseReport:
    """Write base + adapter as a full Hugging Face model folder at `out_dir` (must not exist or be empty)."""
    out = Path(out_dir)
    check_output_dir(out)
    base = load_model(model_path, dtype=None)  # written back in the dtype it is stored in
    linears = target_linears(base.model)
    weight_dtype = next(iter(linears.values())).weight.dtype
    # QA: a float64 delta beyond float32's range passed and the model was written with inf weights
    adapter = load_adapter(adapter_path, linear_shapes(linears), base_fingerprint=base.fingerprint, dtype=weight_dtype)
    merge_into(base.model, adapter)
    for name, md in adapter.modules.items():  # W + delta may still overflow a half-precision W
        if not torch.isfinite(linears[name].weight[:, md.index]).all():
            raise AdapterValidationError(f"{adapter_path}: module '{name}': W + delta overflows "
                                         f"{str(weight_dtype).replace('torch.', '')}, the base's dtype")
    with atomic_dir(out) as tmp:
        base.model.save_pretrained(tmp)
        copy_side_files(base.path, tmp)
        provenance = {"base_model": base.name, "base_model_fingerprint": base.fingerprint,
                      "adapter": str(adapter_path), "adapter_config": adapter.config}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    dtype = str(weight_dtype).replace("torch.", "")
    return FuseReport(out_dir=out, base_model=base.name, adapter=str(adapter_path), modules=len(adapter.modules),
                      parameters=adapter.num_parameters(), dtype=dtype)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer (and other non-weight) files that `save_pretrained` does not write."""
    for item in sorted(src.iterdir()):
        if not item.is_file() or item.name.endswith(WEIGHT_SUFFIXES) or item.name in WRITTEN_BY_SAVE_PRETRAINED:
            continue
        if item.name.endswith(".index.json") or (dst / item.name).exists():
            continue
        shutil.copy2(item, dst / item.name)


def check_output_dir(out: Path) -> None:
    """Refuse to write over anything: the output folder must be new or empty; and the nearest existing
    folder above it must be one we can write in (checked before the slow part, e.g. loading a model,
    and without creating anything)."""
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InvalidRequestError(f"{out}: already exists and is not empty; choose a new output folder",
                                      param="out")
        if out.is_symlink() or out.is_dir() and (os.path.ismount(out) or out.resolve() == Path.cwd().resolve()):
            # the output replaces the folder, which cannot be done to a mount point (a container's volume)
            # or the current folder: QA, both failed only after the whole load and fuse
            raise InvalidRequestError(f"{out}: is a symbolic link, a mount point or the current folder, which the "
                                      f"output cannot replace; write to a new folder inside it", param="out")
        above = out.absolute().parent
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            raise InvalidRequestError(f"{out}: cannot be created there ({above} is not a folder)", param="out")
        with tempfile.TemporaryFile(dir=above):
            pass
    except OSError as exc:  # no permission, a read-only file system, a name too long
        raise InvalidRequestError(f"{out}: cannot be created there ({exc.strerror or exc})", param="out") from None


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out`, on failure it vanishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        mask = umask()  # mkdtemp's folder is 0700 whatever the umask (QA: other users, e.g. a server's, could
        tmp.chmod(0o777 & ~mask)  # not read the output)
        for item in tmp.rglob("*"):
            if not item.is_symlink():
                item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
        if out.exists():
            out.rmdir()  # empty, as check_output_dir made sure
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CheckpointTensors:
    """The tensors of a model folder's safetensors files, read one at a time (never pickle)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise InvalidRequestError(f"{self.path}: not a model folder (no such directory)")
        files = checkpoint_files(self.path)
        self._where: dict = {}
        for file in files:
            need_file(file, "a checkpoint's weights must be a regular safetensors file")  # QA: a FIFO hung
            try:
                handle = safe_open(str(file), framework="pt")
                keys = list(handle.keys())
            except Exception as exc:  # safetensors' own error type: a truncated or damaged file (QA: a traceback)
                raise InvalidRequestError(f"{file}: not a readable safetensors file ({exc})") from None
            for key in keys:
                if key in self._where:
                    raise InvalidRequestError(f"{self.path}: tensor '{key}' is in two of its files, "
                                              f"{self._where[key][1].name} and {file.name}")
                self._where[key] = (handle, file)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        return self._where[key][0].get_tensor(key)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files a model folder's weights are in, as transformers picks them:
    `model.safetensors`, else the files `model.safetensors.index.json` lists (QA: every `*.safetensors`
    was read, so a stale copy beside the checkpoint could be diffed instead of it)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists() or single.is_symlink():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequestError(f"{index}: not a readable weights index ({exc})") from None
        if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise InvalidRequestError(f"{index}: its weight_map must name files in the same folder")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise ModelNotSupportedError(no_safetensors_message(path) if not files else
                                     f"{path}: holds {len(files)} *.safetensors files and neither model.safetensors "
                                     f"nor model.safetensors.index.json says which hold the weights")
    return files


def no_safetensors_message(path: Path) -> str:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not pickles:
        return f"{path}: holds no *.safetensors weights"
    return (
        f"{path}: holds only pickle weights ({', '.join(pickles)}), which s2ft-serve never loads "
        "(loading pickle can run arbitrary code). If you trust the file, convert it once with: "
        "python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{pickles[0]}', weights_only=True); "
        "save_file({k: v.clone().contiguous() for k, v in sd.items()}, 'model.safetensors')\""
    )
