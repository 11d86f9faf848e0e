"""bfloat16 / float16 serving stays close to float32; the CUDA path (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.model.testing import random_adapter

from engine_reference import make_engine, reference, reference_logits

PROMPTS = ["Hello world! The quick", "fox", "What is 2 + 2?"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_float32(tiny_llama_dir, dtype):
    engine = make_engine(tiny_llama_dir, dtype=dtype)
    assert engine.dtype == getattr(torch, dtype)
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=2)
    engine.add_adapter("a", adapter)
    ids = engine.tokenize("Hello world! The quick")
    expected = reference_logits(reference(tiny_llama_dir, (adapter, 1.0)), ids)
    got = engine.logits(ids, "a")
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_bfloat16_mixed_steps_through_the_compiled_kernel_track_float32(tiny_llama_dir):
    """A bfloat16 model's mixed decode step through the compiled kernel (one float32 sum per token,
    rounded once) stays as close to the float32 reference as embedding_bag's, greedy tokens the same."""
    from s2ft_serve.adapters import native

    if native.slot_delta_op() is None:
        pytest.skip("no compiled kernel here")
    steps = {}
    for kernel in ("native", "torch"):
        engine = make_engine(tiny_llama_dir, dtype="bfloat16", adapter_kernel=kernel)
        try:
            assert engine.mixed_kernel == ("compiled" if kernel == "native" else "embedding_bag")
            made = [random_adapter(engine.loaded.model, engine.model_name, seed=s) for s in (3, 4)]
            for i, adapter in enumerate(made):
                engine.add_adapter(f"a{i}", adapter)
            names = ["a0", None, "a1"]
            runner, registry = engine.runner, engine.registry
            prompts = [engine.tokenize(p) for p in PROMPTS]

            def step():
                versions = [registry.acquire(registry.get(n)) if n else None for n in names]
                slots = [registry.slots_for(v) for v in versions]
                for row, ids in enumerate(prompts):
                    runner.prefill(ids, row, slots[row], all_logits=False)
                return runner.decode([7, 11, 13], [len(p) for p in prompts], slots).cpu()

            steps[kernel] = engine.call(step)
        finally:
            engine.shutdown(timeout=5)
    for row, (name, ids) in enumerate(zip(names, prompts)):
        ref = reference(tiny_llama_dir, *([(made[int(name[1])], 1.0)] if name else []))
        expected = reference_logits(ref, ids + [[7, 11, 13][row]])[-1]
        errors = {k: (v[row].float() - expected).abs().max().item() for k, v in steps.items()}
        assert errors["native"] < 0.1 * expected.abs().max().item(), (row, errors)
        assert errors["native"] <= 2 * errors["torch"] + 1e-3, (row, errors)
        assert steps["native"][row].argmax() == expected.argmax()


def test_bfloat16_onednn_gemms_pack_where_the_cpu_has_bfloat16_and_serve_as_exact_does(tiny_llama_dir):
    """gemm="onednn" on a bfloat16 model prepacks q/k/v, gate/up and the LM head for oneDNN where the CPU
    has native bfloat16 arithmetic (else it runs the Linears, as "exact" does); either way a mixed batch
    of adapters and the base decodes as the "exact" engine does, logits within bfloat16 rounding."""
    from s2ft_serve.model import gemm

    logits, tokens = {}, {}
    made = None
    for mode in ("exact", "onednn"):
        engine = make_engine(tiny_llama_dir, dtype="bfloat16", gemm=mode)
        try:
            model = engine.runner.model
            packs = mode == "onednn" and gemm.onednn_usable(model.hf.model.embed_tokens.weight)
            assert [d.packed for d in model.qkv + model.gate_up] == [packs] * 4
            assert isinstance(model.lm_head, gemm.DenseGemm) == (mode == "onednn")
            made = made or [random_adapter(engine.loaded.model, engine.model_name, seed=s) for s in (5, 6)]
            for i, adapter in enumerate(made):
                engine.add_adapter(f"a{i}", adapter)
            logits[mode] = [engine.logits(engine.tokenize(p), n) for p, n in zip(PROMPTS, ["a0", None, "a1"])]
            tokens[mode] = engine.generate(engine.tokenize(PROMPTS[0]), adapter="a1",
                                            params=SamplingParams(max_tokens=6, temperature=0)).token_ids
        finally:
            engine.shutdown(timeout=5)
    for exact, onednn in zip(logits["exact"], logits["onednn"]):
        assert (exact - onednn).abs().max().item() <= 0.02 * exact.abs().max().item()
        assert torch.equal(exact.argmax(-1), onednn.argmax(-1))
    assert tokens["exact"] == tokens["onednn"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_mixed_batch_matches_reference(tiny_llama_dir, dtype):
    from s2ft_serve.engine.request import SamplingParams

    engine = make_engine(tiny_llama_dir, device="cuda", dtype=dtype).start()
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=2)
    engine.add_adapter("a", adapter)
    ids = engine.tokenize("Hello world! The quick")
    expected = reference_logits(reference(tiny_llama_dir, (adapter, 1.0)), ids)
    tol = 1e-4 if dtype == "float32" else 0.1 * expected.abs().max().item()
    assert (engine.logits(ids, "a").cpu() - expected).abs().max().item() <= tol
    outs = [h.result(timeout=60) for h in
            [engine.submit(ids, a, SamplingParams(max_tokens=5, temperature=0)) for a in ["a", None, "a"]]]
    assert outs[0].token_ids == outs[2].token_ids
    engine.shutdown()


def test_a_kv_cache_that_cannot_fit_is_refused_at_start(tiny_llama_dir):
    """An oversized cache is refused up front with its figures and the settings to lower (not an allocator
    error, or an OOM kill while it is zeroed); a cache that fits has the size its shape says."""
    from s2ft_serve.errors import InsufficientMemoryError

    with pytest.raises(InsufficientMemoryError, match=r"KV cache needs [\d.]+ GiB \(9 rows of 100000000 tokens"):
        make_engine(tiny_llama_dir, max_batch_size=8, max_model_len=10**8)
    engine = make_engine(tiny_llama_dir, max_batch_size=8, max_model_len=64)
    try:
        cfg = engine.loaded.model.config
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * engine.head_dim * 4  # float32 k and v
        assert engine.kv_cache_bytes == 9 * 64 * per_token
    finally:
        engine.shutdown(timeout=5)


@pytest.mark.parametrize("files, expected", [
    ({"/proc/meminfo": "MemTotal: 100 kB\nMemAvailable: 50 kB\n"}, 50 * 1024),
    ({"/proc/meminfo": "MemAvailable: 50 kB\n", "/sys/fs/cgroup/memory.max": "30000\n",
      "/sys/fs/cgroup/memory.current": "10000\n"}, 20000),  # a container's limit allows less
    ({"/proc/meminfo": "MemAvailable: 50 kB\n", "/sys/fs/cgroup/memory.max": "max\n",
      "/sys/fs/cgroup/memory.current": "10000\n"}, 50 * 1024),  # no limit
    ({"/proc/meminfo": "MemAvailable: 50 kB\n", "/sys/fs/cgroup/memory/memory.limit_in_bytes": "40000\n",
      "/sys/fs/cgroup/memory/memory.usage_in_bytes": "45000\n"}, 0),  # cgroup v1, over its limit already
    ({}, None),
])
def test_free_cpu_memory_counts_a_containers_limit(monkeypatch, files, expected):
    import io

    import s2ft_serve.model.forward as forward

    def fake_open(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(forward, "open", fake_open, raising=False)
    assert forward.available_memory(torch.device("cpu")) == expected
