"""The compiled CPU kernels, built once on first use: the mixed-adapter correction, the exact GEMM, three
calls of the serving forward that replace groups of small tensor ops, and greedy sampling's argmax.

`csrc/rotary.cpp` (`rotary_op`) applies the rotary position embedding to a layer's q and k in one call
with transformers' bits, where the eager form takes ~14 small ops (CPU float32). `csrc/rms_norm.cpp`
(`add_rms_norm_op`) adds a block's output to the residual stream and applies the RMSNorm after it with
transformers' bits (~7 ops; the forward probes which row-sum order gives them). `csrc/kv_write.cpp`
(`kv_write_op`) writes a pass's keys and values into a layer's cache (two `index_copy_` calls).
`csrc/argmax.cpp` (`argmax_op`) is greedy sampling's argmax, vectorised (ATen's walks each row).

`csrc/exact_gemm.cpp` (`exact_linear_op`) computes `F.linear` in MKL's own summation order, for
`model.gemm.ExactLinear`, which uses it only where a probe showed the very same bits.

`csrc/slot_delta.cpp` adds every token's S²FT correction straight into the base output, reading each
slot's block of the table in place: no per-call index tensors, no `[T, out]` temporary. On a 2-core
EPYC it takes 1.1-1.25x the time of a plain read of the same bytes (`torch.sum`), where
`embedding_bag` (the portable path in `ops.mixed_delta`) takes 1.5-1.8x ours (`benchmarks/adapter_kernel.py`).

It is built with `torch.utils.cpp_extension` (a C++ compiler and ninja are needed once, 10-60 s) into
`$S2FT_KERNEL_DIR`, else `<cache>/kernels`, in a folder named by a hash of the source and the torch
build, so a copy built elsewhere (a container image's build stage) loads with no compiler; each load
marks its folder used, and other builds there that nothing loaded for 30 days are removed. Where it
cannot be built or loaded, `slot_delta_op()` says why once and returns None, and the engine uses
`embedding_bag` (or refuses to start when the kernel was asked for by name).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import sysconfig
import time
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("slot_delta.cpp", "exact_gemm.cpp", "rotary.cpp", "rms_norm.cpp", "kv_write.cpp",
                                    "argmax.cpp")]
HEADERS = [CSRC / "cpu.h"]  # included by the sources: part of what a build is keyed on
NAME = "s2ft_serve_kernels"
CFLAGS = ["-O3", "-fopenmp"]  # no -march=native: the source picks its CPU-specific version at run time
KERNELS = ("auto", "native", "torch")  # EngineConfig.adapter_kernel
BUILD_TIMEOUT_S = 600.0  # the longest a start waits for another process's build before giving up
STALE_AFTER_S = 30 * 86400  # other builds (older sources, other torch builds) no process loaded for this long go


def build_dir() -> Path:
    from s2ft_serve.model.loading import cache_dir

    root = Path(os.environ["S2FT_KERNEL_DIR"]) if os.environ.get("S2FT_KERNEL_DIR") else cache_dir() / "kernels"
    key = [*(source.read_bytes() for source in SOURCES + HEADERS), *CFLAGS, torch.__version__,
           torch.version.git_version or "", platform.machine()]
    return root / hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def slot_delta_op():
    """`torch.ops.s2ft_serve.slot_delta_add`, building the kernels if needed; None (logged) where that fails."""
    return torch.ops.s2ft_serve.slot_delta_add if _library() else None


def columns_ops():
    """(`columns_add`, `columns_set`): fusion's column edits on a row-major weight, row by row; None where
    the kernels are unavailable."""
    return (torch.ops.s2ft_serve.columns_add, torch.ops.s2ft_serve.columns_set) if _library() else None


def exact_linear_op():
    """`torch.ops.s2ft_serve.exact_linear`, building the kernels if needed; None (logged) where that fails."""
    return torch.ops.s2ft_serve.exact_linear if _library() else None


def add_rms_norm_op():
    """`torch.ops.s2ft_serve.add_rms_norm` (h, delta or None, weight, eps -> h + delta, its RMSNorm with
    transformers' bits, CPU float32), building the kernels if needed; None where that fails."""
    return torch.ops.s2ft_serve.add_rms_norm if _library() else None


def kv_write_op():
    """`torch.ops.s2ft_serve.kv_write` (k cache, v cache, slots, k, v: a pass's keys and values into one
    layer's cache, CPU, any dtype), building the kernels if needed; None where that fails."""
    return torch.ops.s2ft_serve.kv_write if _library() else None


def argmax_op():
    """`torch.ops.s2ft_serve.argmax_rows` (float32 [R, V] -> int64 [R], torch.argmax's answer per row, CPU),
    building the kernels if needed; None where that fails."""
    return torch.ops.s2ft_serve.argmax_rows if _library() else None


def rotary_op():
    """`torch.ops.s2ft_serve.rotary` (q, k, cos, sin -> rotated q, k with transformers' bits, CPU float32),
    building the kernels if needed; None where that fails."""
    return torch.ops.s2ft_serve.rotary if _library() else None


@functools.cache
def _library() -> bool:
    try:
        _load()
        return True
    except Exception as e:  # no compiler, no ninja, a read-only cache, an unsupported platform...
        lines = str(e).strip().splitlines() or [""]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1])  # a compiler's first error
        log.warning("the compiled S²FT kernels are unavailable (%s: %s); mixed-adapter steps use embedding_bag, "
                    "GEMMs MKL's F.linear, rotary, norms and cache writes the eager ops", type(e).__name__,
                    reason.strip())
        return False


def _load() -> None:
    if hasattr(torch.ops.s2ft_serve, "slot_delta_add"):  # loaded earlier in this process
        return
    folder = build_dir()
    _build(folder)
    with contextlib.suppress(OSError):  # housekeeping only: a read-only folder keeps everything
        (folder / "last_used").touch()
        prune_stale(folder.parent, keep=folder)


def prune_stale(root: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the builds in `root` other than `keep` that no process has loaded for `STALE_AFTER_S`
    (each upgrade of the package or of torch builds a new folder); returns what was removed. Only our
    own folders (they hold our library or build lock), and none another process is building."""
    now = time.time() if now is None else now
    removed = []
    for other in root.iterdir():
        if other == keep or not other.is_dir() or not any((other / n).exists() for n in (f"{NAME}.so", "build.lock")):
            continue
        stamp = next((other / n for n in ("last_used", f"{NAME}.so") if (other / n).exists()), other)
        try:
            if now - stamp.stat().st_mtime < STALE_AFTER_S:
                continue
            with _exclusive(other / "build.lock", timeout_s=0.0):  # skip one being built right now
                shutil.rmtree(other)
            removed.append(other)
        except (OSError, TimeoutError):
            continue
    if removed:
        log.info("removed %d unused kernel build(s) from %s", len(removed), root)
    return removed


def _build(folder: Path) -> None:
    library = folder / f"{NAME}.so"
    if _try_load(library):
        return
    folder.mkdir(parents=True, exist_ok=True)
    # Processes starting together build it once: the others wait on this lock, then load the result.
    # It is an flock, which the OS releases when its holder dies, so a build killed midway (an OOM
    # kill, a health-check restart) leaves nothing that blocks later starts.
    with _exclusive(folder / "build.lock", BUILD_TIMEOUT_S):
        if _try_load(library):  # built by another process while this one waited
            return
        library.unlink(missing_ok=True)  # a damaged build (killed while linking): ninja would keep it
        (folder / "lock").unlink(missing_ok=True)  # cpp_extension's own lock file, left by a killed build
        from torch.utils.cpp_extension import load

        _find_ninja()
        log.info("building the compiled S²FT kernels (once, 10-60 s) in %s", folder)
        load(name=NAME, sources=[str(source) for source in SOURCES], build_directory=str(folder),
             is_python_module=False, extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)


def _try_load(library: Path) -> bool:
    if not library.exists():
        return False
    try:
        torch.ops.load_library(str(library))
        return True
    except OSError as e:
        log.warning("could not load %s (%s); building it again", library, e)
        return False


@contextlib.contextmanager
def _exclusive(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting at most `timeout_s` for another holder."""
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building the kernel in {path.parent} "
                                       f"for over {timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _find_ninja() -> None:
    """cpp_extension runs `ninja` from PATH; the `ninja` dependency installs it beside this interpreter,
    which is not on PATH when a virtual environment's python runs without activating it."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def resolve(kernel: str, weight: torch.Tensor):
    """The op an adapted module of `weight` uses for mixed steps under `EngineConfig.adapter_kernel`,
    or None for `embedding_bag`. "native" raises where the kernel cannot serve."""
    if kernel not in KERNELS:
        raise ValueError(f"adapter_kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    if kernel == "torch":
        return None
    if weight.device.type == "cuda":  # the same kernel in Triton (adapters/gpu.py), any floating dtype
        from s2ft_serve.adapters import gpu

        op = gpu.slot_delta_op()
        if op is None and kernel == "native":
            raise RuntimeError("adapter_kernel 'native' on a GPU needs Triton (see the warning above); use 'auto' "
                               "or 'torch'")
        return op
    fits = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
    if kernel == "auto" and not fits:
        return None
    if not fits:
        raise ValueError(f"adapter_kernel 'native' serves CPU float32 and bfloat16 models only (and CUDA models), "
                         f"not {weight.device.type} {str(weight.dtype).removeprefix('torch.')}")
    op = slot_delta_op()
    if op is None and kernel == "native":
        raise RuntimeError("adapter_kernel 'native': the compiled kernel could not be built or loaded (see the "
                           "warning above); use 'auto' or 'torch'")
    return op


if __name__ == "__main__":  # build ahead of time (a container image): python -m s2ft_serve.adapters.native
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(0 if slot_delta_op() is not None else 1)
