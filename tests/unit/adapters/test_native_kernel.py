"""The compiled mixed-step kernel: equal to the reference, checked before it writes, optional."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from s2ft_serve.adapters import native
from s2ft_serve.adapters.layers import AdapterBatch, S2FTLinear
from s2ft_serve.adapters.ops import mixed_delta_reference


@pytest.fixture(scope="module")
def op():
    op = native.slot_delta_op()
    if op is None:
        pytest.fail("the compiled kernel did not build here (a C++ compiler and ninja are test requirements)")
    return op


def slot_layout(g, n_slots: int, k_cap: int, inp: int, out: int):
    """A slot table as `S2FTLinear` lays it out: slot s owns rows (s-1)*k_cap.., k[s] <= k_cap used."""
    ks = torch.randint(0, k_cap + 1, (n_slots,), generator=g)
    ks[0] = 0
    table = torch.randn((n_slots - 1) * k_cap + 1, out, generator=g)
    table[-1] = 0
    cols = torch.zeros(n_slots, k_cap, dtype=torch.int64)
    rows = torch.full((n_slots, k_cap), table.shape[0] - 1)
    for s in range(1, n_slots):
        k = int(ks[s])
        cols[s, :k] = torch.randperm(inp, generator=g)[:k]
        rows[s, :k] = torch.arange((s - 1) * k_cap, (s - 1) * k_cap + k)
        table[(s - 1) * k_cap + k: s * k_cap] = float("nan")  # padding rows: the kernel must not read them
    return table, ks, cols, rows


@pytest.mark.parametrize("seed,T,m,inp,out,k_cap", [(0, 9, 1, 40, 24, 6), (1, 32, 2, 70, 37, 19),
                                                    (2, 5, 3, 64, 576, 64), (3, 1, 1, 16, 9, 1)])
def test_kernel_adds_the_reference_correction(op, seed, T, m, inp, out, k_cap):
    """Slots of random k from 0 to k_cap (mostly not multiples of the kernel's 8-row passes), several
    slots per token, the null slot, one slot on several tokens; the correction is added to what y holds."""
    g = torch.Generator().manual_seed(seed)
    n_slots = 7
    table, ks, cols, rows = slot_layout(g, n_slots, k_cap, inp, out)
    x = torch.randn(T, inp, generator=g)
    token_slots = torch.randint(0, n_slots, (T, m), generator=g)
    y0 = torch.randn(T, out, generator=g)
    y = y0.clone()
    op(y, x, table, token_slots, ks, cols)
    tr, tc = rows[token_slots].view(T, -1), cols[token_slots].view(T, -1)
    expected = y0 + mixed_delta_reference(x, table, tr, tc)
    assert torch.allclose(y, expected, atol=1e-5)


BAD_INPUTS = ["slot", "negative slot", "column", "k over k_cap", "negative k", "k on the null slot", "short table",
              "dtype", "shape", "not contiguous", "y is x", "y overlaps cols", "autograd"]


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_kernel_refuses_bad_input_before_writing(op, bad):
    g = torch.Generator().manual_seed(5)
    table, ks, cols, _ = slot_layout(g, 4, 5, 8, 8)
    ks[1:] = 5
    table = torch.nan_to_num(table)
    x, y = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    token_slots = torch.tensor([[1], [2], [3]])
    if bad == "slot":
        token_slots[2, 0] = 4  # a slot past the table
    elif bad == "negative slot":
        token_slots[1, 0] = -1
    elif bad == "column":
        cols[3, 4] = 8  # a feature past x, in the last token's slot
    elif bad == "k over k_cap":
        ks[3] = 6
    elif bad == "negative k":
        ks[2] = -1
    elif bad == "k on the null slot":
        ks[0], token_slots[0, 0] = 1, 0
    elif bad == "short table":
        table = table[:-2]
    elif bad == "dtype":
        x = x.double()
    elif bad == "shape":
        token_slots = torch.tensor([[1], [2]])
    elif bad == "not contiguous":
        x = torch.randn(8, 3, generator=g).t()
    elif bad == "y is x":
        x = y
    elif bad == "y overlaps cols":
        y = cols.view(-1).view(torch.float32)[:24].view(3, 8)  # contiguous, on cols' memory
    else:
        x.requires_grad_(True)
    before = y.clone()
    with pytest.raises(RuntimeError, match="slot_delta_add|single memory location"):
        op(y, x, table, token_slots, ks, cols)
    assert torch.equal(y, before)


def test_kernel_takes_empty_batches_and_empty_slots(op):
    table, cols = torch.ones(3, 4), torch.zeros(2, 3, dtype=torch.int64)
    op(torch.zeros(0, 4), torch.zeros(0, 5), table, torch.zeros(0, 1, dtype=torch.int64), torch.tensor([0, 3]), cols)
    y = torch.ones(2, 4)
    op(y, torch.ones(2, 5), table, torch.zeros(2, 0, dtype=torch.int64), torch.tensor([0, 3]), cols)  # no slots
    op(y, torch.ones(2, 5), table, torch.tensor([[1], [1]]), torch.tensor([0, 0]), cols)  # a cleared slot
    assert torch.equal(y, torch.ones(2, 4))
    with torch.no_grad():  # autograd is refused only where it would record
        op(y, torch.ones(2, 5, requires_grad=True), table, torch.tensor([[1], [1]]), torch.tensor([0, 3]), cols)
    assert torch.equal(y, torch.full((2, 4), 4.0))


def test_layer_stays_differentiable_outside_inference(op):
    """With autograd recording, the layer takes the differentiable embedding_bag path, not the kernel."""
    g = torch.Generator().manual_seed(8)
    base = torch.nn.Linear(12, 6, bias=False)
    batch = AdapterBatch()
    layer = S2FTLinear(base, batch, kernel="native")
    layer.reserve(2, 1)
    layer.set_slot(1, torch.tensor([0, 5]), torch.randn(6, 2, generator=g))
    batch.set_mixed(torch.tensor([[1], [0]]))
    x = torch.randn(2, 12, generator=g, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    with torch.inference_mode():
        assert torch.allclose(layer(x.detach()), y.detach(), atol=1e-6)
    assert x.grad is not None and x.grad[0, 5] != x.grad[1, 5]  # the adapter's column reaches the gradient
    # a base weight that needs a gradient (where it is not stored column-major, it keeps requires_grad):
    # the same path, not the kernel (which refuses outputs that record)
    layer.base.weight.requires_grad_(True)
    layer.base.weight.grad = None
    y = layer(x.detach())
    y.sum().backward()
    with torch.inference_mode():
        assert torch.allclose(layer(x.detach()), y.detach(), atol=1e-6)
    assert layer.base.weight.grad is not None


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_layer_mixed_step_equals_merged_weights_with_either_kernel(kernel):
    g = torch.Generator().manual_seed(6)
    base = torch.nn.Linear(48, 20, bias=False)
    batch = AdapterBatch()
    layer = S2FTLinear(base, batch, kernel=kernel)
    assert (layer.native is not None) == (kernel == "native")
    adapters = {}
    for slot, k in [(1, 3), (2, 11), (3, 1)]:
        index, delta = torch.randperm(48, generator=g)[:k], torch.randn(20, k, generator=g)
        layer.reserve(4, 1)
        layer.set_slot(slot, index, delta)
        adapters[slot] = (index, delta)
    layer.reset_slot(3)  # a cleared slot adds nothing
    x = torch.randn(6, 48, generator=g)
    plan = [(1, 2), (2, 0), (0, 0), (3, 1), (1, 0), (2, 1)]
    batch.set_mixed(torch.tensor(plan))
    y = layer(x)
    for row, slots in enumerate(plan):
        w = base.weight.detach().clone()
        for slot in slots:
            if slot in (1, 2):
                index, delta = adapters[slot]
                w[:, index] += delta
        assert torch.allclose(y[row], x[row] @ w.t(), atol=1e-5), (row, slots)


def test_resolve_picks_the_kernel_by_setting_device_and_dtype(monkeypatch):
    w32, w16 = torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.float16)
    assert native.resolve("auto", w32) is not None
    assert native.resolve("auto", w32.bfloat16()) is not None
    assert native.resolve("torch", w32) is None
    assert native.resolve("auto", w16) is None  # float32 and bfloat16 only: embedding_bag serves float16
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        native.resolve("native", w16)
    with pytest.raises(ValueError, match="adapter_kernel must be one of"):
        native.resolve("fast", w32)
    monkeypatch.setattr(native, "slot_delta_op", lambda: None)  # as where no compiler is installed
    assert native.resolve("auto", w32) is None
    with pytest.raises(RuntimeError, match="could not be built"):
        native.resolve("native", w32)


def test_a_failed_build_is_logged_once_and_falls_back(monkeypatch, caplog):
    def fail():
        raise RuntimeError("Error building extension 's2ft_serve_kernels'\nslot_delta.cpp:1: error: no compiler")

    monkeypatch.setattr(native, "_load", fail)
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert native.slot_delta_op() is None
            assert native.exact_linear_op() is None
            assert native.slot_delta_op() is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "Error building extension" in warnings[0] and "embedding_bag" in warnings[0]
    finally:
        native._library.cache_clear()


def test_a_prebuilt_kernel_loads_without_a_compiler(op, tmp_path):
    """A kernel folder built once (a container image's build stage) is loaded as it is in a fresh process,
    even with the compiler step made to fail; an edited source would get a new folder."""
    folder = native.build_dir()
    assert (folder / f"{native.NAME}.so").exists()
    script = ("import torch.utils.cpp_extension as c\n"
              "def no(*a, **k): raise RuntimeError('no compiler here')\n"
              "c.load = no\n"
              "from s2ft_serve.adapters import native\n"
              "assert native.slot_delta_op() is not None\n")
    env = {**os.environ, "S2FT_KERNEL_DIR": str(folder.parent)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    env["S2FT_KERNEL_DIR"] = str(tmp_path)  # nothing built there, and no compiler: the fallback
    done = subprocess.run([sys.executable, "-c", script.replace("is not None", "is None")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no compiler here" in done.stderr


def test_the_kernel_source_ships_in_the_wheel(tmp_path):
    """A non-editable install (the container image) builds the kernel from the installed package."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"s2ft_serve/adapters/csrc/{source.name}" in names for source in native.SOURCES + native.HEADERS)


def test_the_engine_refuses_an_unknown_or_unservable_kernel_at_start(tiny_llama_dir):
    from s2ft_serve.config import EngineConfig
    from s2ft_serve.engine.engine import Engine

    with pytest.raises(ValueError, match="adapter_kernel must be one of"):
        Engine(EngineConfig(model=str(tiny_llama_dir), device="cpu", adapter_kernel="fast"))
    with pytest.raises(ValueError, match="CPU float32 and bfloat16 models only"):
        Engine(EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float16", adapter_kernel="native"))
    # auto: the kernel for float32 and bfloat16
    for dtype, compiled in (("float16", False), ("bfloat16", True), ("float32", True)):
        engine = Engine(EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype=dtype))
        try:
            assert all((layer.native is not None) == compiled for layer in engine.runner.layers.values())
            assert engine.mixed_kernel == ("compiled" if compiled else "embedding_bag")
        finally:
            engine.shutdown(timeout=5)


def test_processes_starting_together_over_a_damaged_build_rebuild_it_once(tmp_path, monkeypatch):
    """A half-written library and a stale lock file (a build killed midway) do not block a start: the
    library is built again, once, by one of two processes starting together; the other waits on the
    build lock (an flock, gone with its holder) and loads it."""
    monkeypatch.setenv("S2FT_KERNEL_DIR", str(tmp_path))
    folder = native.build_dir()
    folder.mkdir(parents=True)
    (folder / f"{native.NAME}.so").write_bytes(b"\x7fELF not really")
    (folder / "lock").write_text("")  # cpp_extension's lock file, as a build killed midway leaves it
    script = ("import logging, torch\n"
              "logging.basicConfig(level=logging.INFO)\n"
              "from s2ft_serve.adapters import native\n"
              "op = native.slot_delta_op()\n"
              "y = torch.zeros(1, 2)\n"
              "op(y, torch.ones(1, 3), torch.ones(2, 2), torch.tensor([[1]]), torch.tensor([0, 2]), "
              "torch.tensor([[0, 0], [0, 2]]))\n"
              "assert y.tolist() == [[2.0, 2.0]], y\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    assert any("building it again" in err for _, err in outputs)
    assert sum(err.count("building the compiled S²FT kernel") for _, err in outputs) == 1  # one build
    assert (folder / f"{native.NAME}.so").stat().st_size > 1000


def test_the_ninja_dependency_is_found_without_an_activated_environment(tmp_path, monkeypatch):
    """`.venv/bin/python` run directly (as `make test` does) has no `.venv/bin` on PATH."""
    import shutil

    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    native._find_ninja()
    assert shutil.which("ninja") is not None


def test_the_ahead_of_time_build_command_succeeds_where_the_kernel_loads(op):
    """`python -m s2ft_serve.adapters.native` is the container image's build step: exit 0 when loaded."""
    env = {**os.environ, "S2FT_KERNEL_DIR": str(native.build_dir().parent)}
    done = subprocess.run([sys.executable, "-m", "s2ft_serve.adapters.native"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_column_edits_on_a_row_major_weight_match_index_add_and_restore_exactly(dtype):
    """Fusion's row-by-row column edits (where W stays row-major): the same values as index_add_ along
    dim 1, the original columns returned, restored bit for bit; a bad index raises before any write."""
    ops = native.columns_ops()
    if ops is None:
        pytest.skip("no compiled kernel here")
    add, set_ = ops
    torch.manual_seed(0)
    w = torch.randn(72, 200).to(dtype)
    original = w.clone()
    index = torch.tensor([3, 150, 7, 199, 0])
    delta = (torch.randn(72, 5) * 0.1).to(dtype)
    want = original.clone().index_add_(1, index, delta)
    saved = add(w, index, delta)
    assert torch.equal(w, want) and torch.equal(saved, original[:, index])
    set_(w, index, saved)
    assert torch.equal(w, original)
    for bad in (torch.tensor([0, 200]), torch.tensor([-1])):
        with pytest.raises(RuntimeError, match="out of range"):
            add(w, bad, torch.zeros(72, bad.numel(), dtype=dtype))
        assert torch.equal(w, original)
    with pytest.raises(RuntimeError, match="row-major"):
        add(w.t(), index, torch.zeros(200, 5, dtype=dtype))
    with pytest.raises(RuntimeError, match=r"values \[N, k\]"):
        set_(w, index, torch.zeros(72, 4, dtype=dtype))


@pytest.mark.parametrize("out", [576, 40])  # AVX-512 vectors where the CPU has them and out comes in 16s
def test_kernel_reads_a_bfloat16_table_as_the_float32_one_bit_for_bit(op, out):
    """A bfloat16 table (deltas saved in bfloat16) gives the float32 table of the same values' sums exactly."""
    g = torch.Generator().manual_seed(11)
    table, ks, cols, _ = slot_layout(g, 9, 21, 300, out)
    table = table.bfloat16().float()  # bfloat16 values (the NaN padding stays NaN and stays unread)
    x = torch.randn(17, 300, generator=g)
    token_slots = torch.randint(0, 9, (17, 2), generator=g)
    y0 = torch.randn(17, out, generator=g)
    wide, narrow = y0.clone(), y0.clone()
    op(wide, x, table, token_slots, ks, cols)
    op(narrow, x, table.bfloat16(), token_slots, ks, cols)
    assert torch.equal(wide, narrow) and not torch.equal(wide, y0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 table"):
        op(y0, x, table.half(), token_slots, ks, cols)


def _pair(inp: int = 40, out: int = 24):
    """Two native layers on one base: `narrow` may keep a bfloat16 table, `wide` always float32."""
    base = torch.nn.Linear(inp, out, bias=False)
    layers = []
    for compact in (True, False):
        batch = AdapterBatch()
        layer = S2FTLinear(torch.nn.Linear(inp, out, bias=False), batch, kernel="native")
        layer.base.weight.data.copy_(base.weight.data)
        layer.compact = compact
        layer.slots = layer._empty(0, 1, torch.bfloat16 if compact else torch.float32)
        layers.append(layer)
    return layers


@torch.inference_mode()
def test_adapted_layer_keeps_bfloat16_deltas_in_a_bfloat16_table_with_the_same_results(op):
    """Deltas that are bfloat16 values stay in a bfloat16 table (half the bytes a mixed step reads); every
    path (mixed step, rows, one adapter, corrections) gives the float32 table's results bit for bit."""
    g = torch.Generator().manual_seed(12)
    narrow, wide = _pair()
    for slot, k in [(1, 5), (2, 9), (3, 16)]:
        index = torch.randperm(40, generator=g)[:k]
        delta = (torch.randn(24, k, generator=g) * 0.1).bfloat16()  # as saved in bfloat16
        for layer in (narrow, wide):
            layer.reserve(4, 1)
            layer.set_slot(slot, index, delta)
    assert narrow.slots.table.dtype == torch.bfloat16 and wide.slots.table.dtype == torch.float32
    x = torch.randn(6, 40, generator=g)
    cases = [("mixed", torch.tensor([[1, 2], [3, 0], [0, 0], [2, 3], [1, 0], [3, 1]])),
             ("rows", torch.tensor([[1], [3]])), ("single", (2,)), ("single", (1, 3))]
    for mode, slots in cases:
        outs = []
        for layer in (narrow, wide):
            getattr(layer.batch, f"set_{mode}")(slots)
            outs.append(layer(x.view(2, 3, 40) if mode == "rows" else x))
        assert torch.equal(*outs), mode
    # rows longer than the kernel takes go through row_delta: the bfloat16 rows widened first
    long = torch.randn(2, 20, 40, generator=g)
    for layer in (narrow, wide):
        layer.batch.set_rows(torch.tensor([[1], [3]]))
    assert torch.allclose(narrow(long), wide(long), atol=1e-6)


@torch.inference_mode()
def test_a_delta_bfloat16_cannot_hold_widens_the_table_and_its_removal_narrows_it(op):
    g = torch.Generator().manual_seed(13)
    narrow, wide = _pair()
    held = {1: (torch.tensor([0, 7, 9]), (torch.randn(24, 3, generator=g) * 0.1).bfloat16().float()),
            2: (torch.tensor([3, 4]), torch.randn(24, 2, generator=g) * 0.1)}  # float32 values: not bfloat16
    for layer in (narrow, wide):
        layer.reserve(3, 1)
        layer.set_slot(1, *held[1])
    assert narrow.slots.table.dtype == torch.bfloat16
    narrow.set_slot(2, *held[2])
    wide.set_slot(2, *held[2])
    assert narrow.slots.table.dtype == torch.float32  # widened, slot 1 carried over exactly
    x = torch.randn(4, 40, generator=g)
    for layer in (narrow, wide):
        layer.batch.set_mixed(torch.tensor([[1], [2], [0], [1]]))
    assert torch.equal(narrow(x), wide(x))
    for slot in (1, 2):
        index, delta = held[slot]
        got_index, got_delta_t = narrow.slots.columns(slot)
        assert torch.equal(got_index, index) and torch.equal(got_delta_t, delta.t())
    narrow.reset_slot(2)
    assert narrow.slots.table.dtype == torch.bfloat16  # no float32 delta left
    narrow.reserve(6, 8)  # growing keeps the dtype and the slot
    assert narrow.slots.table.dtype == torch.bfloat16 and torch.equal(narrow.slots.columns(1)[1], held[1][1].t())
    for layer in (narrow, wide):
        layer.batch.set_mixed(torch.tensor([[1], [0]]))
    assert torch.equal(narrow(x[:2]), wide(x[:2]))


def test_only_the_compiled_kernel_gets_a_bfloat16_table():
    base = torch.nn.Linear(8, 4, bias=False)
    layer = S2FTLinear(base, AdapterBatch(), kernel="torch")
    layer.reserve(1, 1)
    layer.set_slot(1, torch.tensor([2]), torch.ones(4, 1))  # 1.0 is a bfloat16 value
    assert not layer.compact and layer.slots.table.dtype == torch.float32


def test_unused_builds_of_other_versions_are_pruned(tmp_path):
    """Every upgrade builds a new folder; the ones no process loaded for STALE_AFTER_S go, and only ours,
    and none that another process is building."""
    import fcntl
    import time as time_mod

    def folder(name, files, age_s):
        f = tmp_path / name
        f.mkdir()
        for n in files:
            (f / n).write_text("x")
            os.utime(f / n, (time_mod.time() - age_s,) * 2)
        return f

    month = native.STALE_AFTER_S
    current = folder("current", [f"{native.NAME}.so"], 2 * month)
    old = folder("old", [f"{native.NAME}.so", "build.lock"], 2 * month)
    used = folder("used", [f"{native.NAME}.so", "last_used"], 0)  # an old build, loaded yesterday
    (used / f"{native.NAME}.so").touch()
    os.utime(used / f"{native.NAME}.so", (time_mod.time() - 2 * month,) * 2)
    os.utime(used / "last_used", (time_mod.time() - 86400,) * 2)
    foreign = folder("foreign", ["notes.txt"], 2 * month)
    building = folder("building", ["build.lock"], 2 * month)
    with open(building / "build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = native.prune_stale(tmp_path, keep=current)
    assert removed == [old]
    assert not old.exists() and all(f.exists() for f in (current, used, foreign, building))


@pytest.mark.parametrize("out", [37, 64])
def test_kernel_on_a_bfloat16_model_sums_in_float32_and_rounds_once(op, out):
    """bfloat16 y, x and table: each token's correction is the float32 sum of the widened values (the
    float32 kernel's own), added to y and rounded to bfloat16 once."""
    g = torch.Generator().manual_seed(14)
    table, ks, cols, _ = slot_layout(g, 7, 19, 70, out)
    table = table.bfloat16()
    x = torch.randn(12, 70, generator=g).bfloat16()
    token_slots = torch.randint(0, 7, (12, 2), generator=g)
    y0 = torch.randn(12, out, generator=g).bfloat16()
    correction = torch.zeros(12, out)
    op(correction, x.float(), table, token_slots, ks, cols)
    y = y0.clone()
    op(y, x, table, token_slots, ks, cols)
    assert torch.equal(y, (y0.float() + correction).bfloat16()) and not torch.equal(y, y0)
    with pytest.raises(RuntimeError, match="bfloat16 y, x and table"):
        op(y, x, table.float(), token_slots, ks, cols)


def rotary_inputs(g, B: int, L: int, heads: int = 9, kv_heads: int = 3, D: int = 64):
    """q and k as the serving forward has them (views of one fused projection output, transposed to
    [B, H, L, D]) and cos/sin as a Llama rotary embedding makes them, at positions up to 4k."""
    qkv = torch.randn(B, L, (heads + 2 * kv_heads) * D, generator=g) * 3
    q, k, _ = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    q, k = (t.reshape(B, L, -1, D).transpose(1, 2) for t in (q, k))
    positions = torch.randint(0, 4096, (B, L), generator=g).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)
    return q, k, emb.cos(), emb.sin()


@pytest.mark.parametrize("B,L", [(32, 1), (3, 37), (2, 700)])  # a decode step, a prefill, a long one (in parallel)
def test_rotary_gives_transformers_bits(op, B, L):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = rotary_inputs(torch.Generator().manual_seed(B), B, L)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = native.rotary_op()(q, k, cos, sin)
    assert got_q.shape == want_q.shape and got_k.shape == want_k.shape
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)  # no fused multiply-add: each product rounded


@pytest.mark.parametrize("bad", ["float64", "odd_dim", "batch", "length", "cos_layout"])
def test_rotary_refuses_bad_input(op, bad):
    q, k, cos, sin = rotary_inputs(torch.Generator().manual_seed(0), 2, 3)
    if bad == "float64":
        q = q.double()
    elif bad == "odd_dim":
        q, k, cos, sin = q[..., :63], k[..., :63], cos[..., :63].contiguous(), sin[..., :63].contiguous()
    elif bad == "batch":
        q = q[:1]
    elif bad == "length":
        k = k[:, :, :2]
    else:
        cos = cos.transpose(0, 1)
    with pytest.raises(RuntimeError, match="rotary"):
        native.rotary_op()(q, k, cos, sin)


def test_the_serving_forward_rotates_and_norms_with_the_compiled_calls_on_cpu_float32(op, tiny_llama_dir):
    """Every layer of a float32 pass rotates q/k through the compiled call and takes each residual add
    with its RMSNorm through the other (the same bits as transformers' ops, so only a count of calls
    tells them apart); a bfloat16 engine calls neither. Both write each decode step's keys and values
    into the cache with one compiled call per layer."""
    from s2ft_serve.config import EngineConfig
    from s2ft_serve.engine.engine import Engine
    from s2ft_serve.engine.request import SamplingParams

    for dtype, compiled in (("float32", True), ("bfloat16", False)):
        engine = Engine(EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype=dtype)).start()
        try:
            model = engine.runner.model
            assert (model.rotary is not None) == compiled and (model.add_rms_norm is not None) == compiled
            calls, norms, writes = [], [], []
            if compiled:
                real, real_norm = model.rotary, model.add_rms_norm
                model.rotary = lambda *a: calls.append(1) or real(*a)
                model.add_rms_norm = lambda *a: norms.append(1) or real_norm(*a)
            real_write = model.kv_write
            model.kv_write = lambda *a: writes.append(1) or real_write(*a)
            engine.submit("Hello world", None, SamplingParams(max_tokens=3, temperature=0)).result()
            # a prefill and two decode steps, each through every layer (two norms each) and the final norm
            assert len(calls) == (3 * len(model.layers) if compiled else 0)
            assert len(norms) == (3 * (2 * len(model.layers) + 1) if compiled else 0)
            assert len(writes) == 2 * len(model.layers)  # the decode steps (a fresh prefill writes its rows whole)
        finally:
            engine.shutdown()


@pytest.mark.parametrize("H", [576, 64, 100, 7])  # SmolLM2's hidden size, the tiny models', odd ones
@pytest.mark.parametrize("B,L", [(32, 1), (3, 37), (2, 700)])  # a decode step, a prefill, a long one (in parallel)
def test_add_rms_norm_gives_transformers_bits(op, H, B, L):
    """h + delta and LlamaRMSNorm(h + delta) bit for bit: with ATen's own mean (lanes 0), and summed in
    ATen's order for vectors of 8 lanes; a plain left-to-right sum would not give these bits."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(H * B)
    norm = LlamaRMSNorm(H, eps=1e-5)
    norm.weight.data = torch.randn(H, generator=g)
    h, d = torch.randn(B, L, H, generator=g) * 4, torch.randn(B, L, H, generator=g)
    add_rms_norm = native.add_rms_norm_op()
    with torch.inference_mode():
        want = norm(h + d)
        for lanes in (0, 8):
            total, got = add_rms_norm(h, d, norm.weight, norm.variance_epsilon, lanes)
            assert torch.equal(total, h + d) and torch.equal(got, want)
            same, alone = add_rms_norm(h, None, norm.weight, norm.variance_epsilon, lanes)  # no residual
            assert same.data_ptr() == h.data_ptr() and torch.equal(alone, norm(h))
        if H >= 64:  # the order matters for these rows: summed one value after another, the bits differ
            sq = ((h + d) * (h + d)).reshape(-1, H)[:64]
            sequential = torch.zeros(len(sq))
            for j in range(H):
                sequential += sq[:, j]
            assert not torch.equal(sequential, sq.sum(-1))


@pytest.mark.parametrize("bad", ["float64", "delta_shape", "strided", "weight", "lanes"])
def test_add_rms_norm_refuses_bad_input(op, bad):
    h, d, w = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8)
    lanes = 8
    if bad == "float64":
        h = h.double()
    elif bad == "delta_shape":
        d = d[:1]
    elif bad == "strided":
        h = torch.randn(2, 8, 3).transpose(1, 2)
    elif bad == "weight":
        w = torch.randn(9)
    else:
        lanes = 4
    with pytest.raises(RuntimeError, match="add_rms_norm"):
        native.add_rms_norm_op()(h, d, w, 1e-5, lanes)


def test_norms_the_compiled_call_does_not_reproduce_stay_the_models_own(op, tiny_llama_dir):
    """A model whose norms compute something else (here each adds 1, as Gemma-style norms differ) fails
    the probe: the forward then calls the modules, and its logits stay the model's own."""
    from s2ft_serve.model.forward import Transformer
    from s2ft_serve.model.loading import load_model

    def shifted(model):
        base = type(model.model.norm)

        class Shifted(base):
            def forward(self, x):
                return super().forward(x) + 1.0

        for layer in model.model.layers:
            layer.input_layernorm.__class__ = layer.post_attention_layernorm.__class__ = Shifted
        model.model.norm.__class__ = Shifted
        return model

    plain = Transformer(load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model, 2, 32)
    assert plain.norm_lanes == 8  # ATen's order, found by the probe
    reference = shifted(load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model)
    model = Transformer(shifted(load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model), 2, 32)
    assert model.norm_lanes is None and model.add_rms_norm is None
    tokens = torch.tensor([[5, 9, 13, 2, 7], [3, 3, 8, 1, 4]])
    positions = torch.arange(5).expand(2, 5)
    with torch.inference_mode():
        got = model(tokens, positions, slice(0, 2), cached=False)
        want = reference(tokens).logits.reshape(-1, got.shape[-1])
        unshifted = plain(tokens, positions, slice(0, 2), cached=False)
    assert (got - want).abs().max().item() <= 1e-4 and not torch.allclose(got, unshifted, atol=1e-2)


def kv_inputs(g, dtype, B: int = 4, L: int = 3, heads: int = 3, D: int = 16, rows: int = 6, max_len: int = 20):
    """A layer's caches [rows, heads, max_len, D], k contiguous and v a transposed view (as the forward
    has them), and distinct slots of (row, head, position) in (b, h, l) order."""
    ck, cv = (torch.randn(rows, heads, max_len, D, generator=g).to(dtype) for _ in range(2))
    k = torch.randn(B, heads, L, D, generator=g).to(dtype)
    v = torch.randn(B, L, heads, D, generator=g).to(dtype).transpose(1, 2)
    row_ids, pos = torch.randperm(rows, generator=g)[:B], torch.randint(0, max_len - L, (B,), generator=g)
    slots = ((row_ids[:, None, None] * heads + torch.arange(heads)[None, :, None]) * max_len
             + pos[:, None, None] + torch.arange(L)[None, None, :])
    return ck, cv, slots.reshape(-1), k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 3])  # a decode step, a chunk continuing the cache
def test_kv_write_equals_index_copy(op, dtype, L):
    ck, cv, slots, k, v = kv_inputs(torch.Generator().manual_seed(L), dtype, L=L)
    want_k, want_v = ck.clone(), cv.clone()
    want_k.view(-1, k.shape[-1]).index_copy_(0, slots, k.reshape(-1, k.shape[-1]))
    want_v.view(-1, v.shape[-1]).index_copy_(0, slots, v.reshape(-1, v.shape[-1]))
    native.kv_write_op()(ck, cv, slots, k, v)
    assert torch.equal(ck, want_k) and torch.equal(cv, want_v)


@pytest.mark.parametrize("bad", ["slot", "negative", "dtype", "shape", "head_dim", "overlap"])
def test_kv_write_refuses_bad_input_before_writing(op, bad):
    ck, cv, slots, k, v = kv_inputs(torch.Generator().manual_seed(0), torch.float32)
    if bad == "slot":
        slots[-1] = ck.numel() // ck.shape[-1]
    elif bad == "negative":
        slots[3] = -1
    elif bad == "dtype":
        v = v.double()
    elif bad == "shape":
        v = v[:, :, :2]
    elif bad == "head_dim":
        k, v = k[..., :8], v[..., :8]
    else:  # k is the cache it would write (every slot valid)
        k, v = ck, torch.randn(ck.shape)
        slots = torch.arange(ck.numel() // ck.shape[-1])
    before = ck.clone(), cv.clone()
    with pytest.raises(RuntimeError, match="kv_write|unsupported operation"):
        native.kv_write_op()(ck, cv, slots, k, v)
    assert torch.equal(ck, before[0]) and torch.equal(cv, before[1])


def test_argmax_rows_is_torch_argmax(op):
    """The first largest value of each row, a NaN counting as largest, as torch.argmax answers: on a
    vocabulary-sized batch, on ties, NaNs, infinities, signed zeros and one-value rows."""
    g = torch.Generator().manual_seed(0)
    nan, inf = float("nan"), float("inf")
    cases = [torch.randn(32, 49152, generator=g), torch.randn(7, 1000, generator=g).round(),  # many ties
             torch.randn(1, 1, generator=g), torch.full((2, 70), -inf),
             torch.tensor([[1.0, nan, 3.0, nan], [0.0, -0.0, 0.0, 1.0], [-0.0, 0.0, -1.0, -2.0], [inf, 1.0, inf, nan],
                           [-inf, -inf, 5.0, 5.0]])]
    late = torch.zeros(5, 600)  # around the 256-value chunks the call scans
    late[0, 599], late[1, 256], late[2, 255] = 1.0, nan, 2.0
    late[3, 300] = late[3, 10] = 3.0  # a tie across chunks: the first
    late[4, 3], late[4, 500] = 4.0, nan  # a NaN after the maximum still wins
    cases.append(late)
    for x in cases:
        assert torch.equal(native.argmax_op()(x), x.argmax(dim=-1)), x


@pytest.mark.parametrize("bad", ["float64", "one_dim", "empty_rows", "strided"])
def test_argmax_rows_refuses_bad_input(op, bad):
    x = {"float64": torch.randn(2, 5, dtype=torch.float64), "one_dim": torch.randn(5),
         "empty_rows": torch.randn(2, 0), "strided": torch.randn(5, 2).t()}[bad]
    with pytest.raises(RuntimeError, match="argmax_rows"):
        native.argmax_op()(x)


def test_greedy_sampling_takes_the_compiled_argmax(op, monkeypatch):
    from s2ft_serve.engine.request import SamplingParams
    from s2ft_serve.engine.sampler import sample

    calls = []
    real = native.argmax_op()
    monkeypatch.setattr(native, "argmax_op", lambda: lambda x: calls.append(x.shape) or real(x))
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0)]
    out = sample(logits, params, [None, torch.Generator().manual_seed(3), None, None])
    assert calls == [(4, 300)]
    assert [out[i] for i in (0, 2, 3)] == logits.argmax(dim=-1)[[0, 2, 3]].tolist()


def test_decode_logits_are_the_same_with_each_compiled_call_off(op, tiny_llama_dir):
    """Switching a compiled call off (the forward then runs the eager ops it replaces, as on other
    devices or under autograd) gives the very same decode logits: each call is exact, and so is each
    fallback path (the cache is cleared between runs, so a fallback that wrote nothing would show)."""
    from s2ft_serve.config import EngineConfig
    from s2ft_serve.engine.engine import Engine

    engine = Engine(EngineConfig(model=str(tiny_llama_dir), device="cpu", dtype="float32"))
    try:
        runner, model = engine.runner, engine.runner.model
        ids = engine.tokenize("Hello world, how are you")
        compiled = {name: getattr(model, name) for name in ("rotary", "add_rms_norm", "kv_write")}
        assert all(op is not None for op in compiled.values())

        def decode(off: str | None) -> torch.Tensor:
            for name, call in compiled.items():
                setattr(model, name, None if name == off else call)
            model.cache.k.zero_()
            model.cache.v.zero_()
            runner.prefill_batch([ids] * 3, 0, [()] * 3, [False] * 3)
            first = runner.decode([7] * 3, [len(ids)] * 3, [()] * 3)
            return torch.cat([first, runner.decode([9] * 3, [len(ids) + 1] * 3, [()] * 3)])

        want = engine.call(decode, None)
        for off in compiled:
            assert torch.equal(engine.call(decode, off), want), off
    finally:
        engine.shutdown(timeout=5)
