"""Hot fusion, switching under traffic, and composition, against merged-weights references."""

from __future__ import annotations

import threading

import pytest
import torch

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.errors import ConflictError

from engine_reference import make_engine, reference, reference_greedy, reference_logits

PROMPTS = ["Hello world! The quick", "What is 2 + 2?", "fox", "Structured sparse"]


def base_weights(engine):
    return {n: l.base.weight.detach().cpu().clone() for n, l in engine.runner.layers.items()}


def mixed_batch_logits(engine, names, prompts, nxt):
    registry, runner = engine.registry, engine.runner
    versions = [registry.acquire(registry.get(n)) if n else None for n in names]
    for row, (ids, v) in enumerate(zip(prompts, versions)):
        runner.prefill(ids, row, registry.slots_for(v), all_logits=False)
    logits = runner.decode(nxt, [len(p) for p in prompts], [registry.slots_for(v) for v in versions])
    for v in versions:
        if v is not None:
            registry.release(v)
    return logits.cpu()


@pytest.mark.parametrize("gemm", ["exact", "onednn"])
@pytest.mark.parametrize("fused", [["a0"], ["a0", "a1"]])
def test_contract_holds_with_adapters_fused(tiny_model_dir, fused, gemm):
    engine = make_engine(tiny_model_dir, max_fused_adapters=2, gemm=gemm)
    from s2ft_serve.model.testing import random_adapter
    adapters = {f"a{i}": random_adapter(engine.loaded.model, engine.model_name, seed=20 + i, heads=2)
                for i in range(3)}  # two heads of four: the adapters overlap
    for n, a in adapters.items():
        engine.add_adapter(n, a)
    original = base_weights(engine)
    for n in fused:
        assert engine.fuse(n).fused
    names = ["a0", "a1", None, "a2"]
    prompts = [engine.tokenize(p) for p in PROMPTS]
    nxt = [5, 9, 12, 3]
    logits = mixed_batch_logits(engine, names, prompts, nxt)
    for row, name in enumerate(names):
        ref = reference(tiny_model_dir, *([(adapters[name], 1.0)] if name else []))
        expected = reference_logits(ref, prompts[row] + [nxt[row]])[-1]
        assert (logits[row] - expected).abs().max().item() <= 1e-4, (fused, name)
        prefill = engine.logits(prompts[row], name)
        assert (prefill - reference_logits(ref, prompts[row])).abs().max().item() <= 1e-4
    for n in fused:  # unfuse in fuse order: the other fused adapter is re-applied in between
        engine.unfuse(n)
    for n, w in base_weights(engine).items():
        assert torch.equal(w, original[n]), n  # bit-identical


def test_fusion_limits_and_errors(engine, adapters):
    engine.fuse("a0")
    with pytest.raises(ConflictError, match="already fused"):
        engine.fuse("a0")
    with pytest.raises(ConflictError, match="at most 1"):
        engine.fuse("a1")
    with pytest.raises(ConflictError, match="not fused"):
        engine.unfuse("a2")
    assert [a.name for a in engine.list_adapters() if a.fused] == ["a0"]


def test_a_refused_fuse_loads_and_evicts_nothing(tiny_llama_dir, tmp_path):
    """QA: a fuse refused with 409 had already loaded the adapter, evicting another."""
    from s2ft_serve.adapters.format import save_adapter
    from s2ft_serve.model.testing import random_adapter

    engine = make_engine(tiny_llama_dir, adapter_root=str(tmp_path), max_resident_adapters=2, max_fused_adapters=1)
    for i, name in enumerate("abx"):
        save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=60 + i), tmp_path / name)
    engine.load_adapter("a", "a")
    engine.load_adapter("b", "b")
    engine.fuse("a")
    before = [(i.name, i.resident, i.fused) for i in engine.list_adapters()]
    for name in ("x", "b", "a"):
        with pytest.raises(ConflictError):
            engine.fuse(name)
    assert [(i.name, i.resident, i.fused) for i in engine.list_adapters()] == before
    engine.shutdown()


def test_merged_adapters_must_fit_the_resident_limits(tiny_llama_dir, tmp_path):
    """QA: merged adapters (memory only, never evicted) piled up past max_resident_adapters until every
    load, merge and lazily loaded request got a 429 'retry later' that no retry could satisfy."""
    from s2ft_serve.adapters.format import save_adapter
    from s2ft_serve.model.testing import random_adapter

    engine = make_engine(tiny_llama_dir, adapter_root=str(tmp_path), max_resident_adapters=3).start()
    for i, name in enumerate("ab"):
        save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=70 + i), tmp_path / name)
    engine.load_adapter("a", "a")
    for i in range(3):
        engine.merge(f"m{i}", [("a", 0.5 + i)])
    with pytest.raises(ConflictError, match=r"3 adapter\(s\) are never evicted \(held only in memory"):
        engine.merge("m3", [("a", 2.0)])
    assert not engine.has_adapter("m3")
    params = SamplingParams(max_tokens=2, temperature=0)
    assert engine.generate("fox", "b", params).finish_reason == "length"  # lazily loaded: still works
    engine.remove_adapter("m0")
    engine.merge("m3", [("a", 2.0)])  # room again
    engine.shutdown()


def test_bfloat16_fusion_sums_in_float32_and_unfuse_restores_the_base(tiny_llama_dir):
    """The fused column is (W + delta) summed in float32 and rounded once, as `s2ft-adapter fuse`
    writes it (QA: it was W + delta rounded to bfloat16 first, rounded twice)."""
    from s2ft_serve.model.testing import random_adapter

    engine = make_engine(tiny_llama_dir, dtype="bfloat16")
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=80, scale=0.01)
    engine.add_adapter("a", adapter)
    original = base_weights(engine)
    engine.fuse("a")
    fused = base_weights(engine)
    for name, md in adapter.modules.items():
        expected = original[name].clone()
        expected[:, md.index] = (original[name][:, md.index].float() + md.delta.float()).to(torch.bfloat16)
        assert torch.equal(fused[name], expected), name
    engine.unfuse("a")
    assert all(torch.equal(w, original[n]) for n, w in base_weights(engine).items())
    engine.shutdown()


def test_removing_a_fused_adapter_restores_the_base(engine, adapters):
    original = base_weights(engine)
    engine.fuse("a1")
    engine.remove_adapter("a1")
    assert all(torch.equal(w, original[n]) for n, w in base_weights(engine).items())
    assert engine.stats().fused_adapters == []


def test_switching_under_concurrent_traffic(engine, adapters, tiny_model_dir):
    engine.start()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = {}
    for name in ["a0", "a1", "a2", None]:
        ref = reference(tiny_model_dir, *([(adapters[name], 1.0)] if name else []))
        expected[name] = reference_greedy(ref, engine.tokenize("fox"), 12)
    results, stop = [], threading.Event()

    def traffic():
        names = ["a0", "a1", None, "a2"]
        i = 0
        while not stop.is_set():
            handles = [engine.submit("fox", names[(i + j) % 4], params) for j in range(4)]
            results.extend((h.adapter, h.result(timeout=60).token_ids) for h in handles)
            i += 1

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(6):  # switch A -> B -> C while requests are in flight
        for name in ["a0", "a1", "a2"]:
            engine.fuse(name)
            engine.unfuse(name)
    engine.fuse("a1")
    stop.set()
    for t in threads:
        t.join()
    assert len(results) >= 8
    for name, tokens in results:
        assert tokens == expected[name], name


def test_merge_is_a_weighted_sum(engine, adapters, tiny_model_dir):
    info = engine.merge("m", [("a0", 0.5), ("a1", 2.0)])
    assert info.config["merged_from"] == [{"name": "a0", "weight": 0.5}, {"name": "a1", "weight": 2.0}]
    ids = engine.tokenize(PROMPTS[0])
    ref = reference(tiny_model_dir, (adapters["a0"], 0.5), (adapters["a1"], 2.0))
    assert (engine.logits(ids, "m") - reference_logits(ref, ids)).abs().max().item() <= 1e-4


def test_cached_corrections_stay_bounded_and_exact(engine, adapters, tiny_model_dir):
    ids = engine.tokenize(PROMPTS[1])
    for _ in range(3):  # A -> B -> C -> A ...: corrections are reused, never leaked
        for name in adapters:
            engine.fuse(name)
            engine.unfuse(name)
    assert len(engine.registry._corrections) <= engine.registry.max_fused + 2
    engine.fuse("a2")
    ref = reference(tiny_model_dir, (adapters["a0"], 1.0))
    assert (engine.logits(ids, "a0") - reference_logits(ref, ids)).abs().max().item() <= 1e-4
    engine.remove_adapter("a2")  # retiring a version frees its cached correction
    assert all(v.name != "a2" for v in engine.registry._corrections)
