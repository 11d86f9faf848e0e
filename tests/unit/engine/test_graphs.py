"""Decode steps as CUDA graphs (engine.graphs): the padded, static-shape step they replay is checked
eagerly on the CPU against the reference; capture and replay on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import MistralConfig

from s2ft_serve.engine.graphs import DecodeGraphs, batch_buckets, span_buckets
from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.model.testing import device_under_test, random_adapter

from engine_reference import make_engine, reference, reference_greedy, reference_logits
from test_context_limits import COMMON, save

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]
    assert span_buckets(2048) == [256, 512, 1024, 2048]
    assert span_buckets(600) == [256, 512, 600]
    assert span_buckets(100) == [100]


def static(engine, capture: bool = False) -> DecodeGraphs:
    graphs = engine.runner.graphs = DecodeGraphs(engine.runner.model, engine.runner.batch,
                                                 engine.scheduler.max_batch_size, capture=capture)
    return graphs


def test_padded_steps_of_a_windowed_model_match_the_reference_and_keep_the_cache_finite(tmp_path):
    """Six requests decode as a bucket of 8 (two padding rows) beside a long prompt prefilled in chunks
    in the spare row; a padding row sees one key in every layer, so nothing it writes is NaN (the cache
    is read through additive masks: a NaN under -inf is still NaN)."""
    path = save(tmp_path / "m", MistralConfig(head_dim=16, sliding_window=8, **COMMON))
    engine = make_engine(path, max_batch_size=8, max_tokens_per_step=12, prefix_cache_bytes=0)
    graphs = static(engine)
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=5)
    engine.add_adapter("a", adapter)
    engine.start()
    prompts = [list(range(5, 35)), list(range(40, 51)), list(range(60, 66))]
    plan = [(ids, name) for ids in prompts for name in (None, "a")] + [(list(range(3, 60)), "a")]
    handles = [engine.submit(ids, name, GREEDY) for ids, name in plan]
    got = [h.result(timeout=120).token_ids for h in handles]
    refs = {None: reference(path), "a": reference(path, (adapter, 1.0))}
    assert got == [reference_greedy(refs[name], ids, 12) for ids, name in plan]
    assert {size for size, _, _ in graphs.steps} & {8}  # padded steps ran
    assert {span for _, span, _ in graphs.steps} == {256}
    assert torch.isfinite(engine.runner.model.cache.k).all() and torch.isfinite(engine.runner.model.cache.v).all()
    engine.shutdown()


def test_a_reallocated_slot_table_drops_every_adapter_step(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_batch_size=4)
    graphs = static(engine)
    small = random_adapter(engine.loaded.model, engine.model_name, seed=1, channels=4)
    engine.add_adapter("small", small)
    engine.start()
    ids = engine.tokenize("Hello world")
    engine.generate(ids, "small", GREEDY)
    engine.generate(ids, None, GREEDY)
    before = dict(graphs.steps)
    assert {width for _, _, width in before} == {0, 1}
    wide = random_adapter(engine.loaded.model, engine.model_name, seed=2, channels=40)  # more columns: tables grow
    engine.add_adapter("wide", wide)
    handles = [engine.submit(ids, name, GREEDY) for name in ("small", "wide")]
    outs = [h.result(timeout=60).token_ids for h in handles] + [engine.generate(ids, None, GREEDY).token_ids]
    assert graphs.tables == engine.runner.batch.tables
    for key, step in before.items():  # the base's steps read no table: kept
        assert (graphs.steps.get(key) is step) == (key[2] == 0), key
    for (name, adapter), out in zip((("small", small), ("wide", wide), (None, None)), outs):
        assert out == reference_greedy(reference(tiny_llama_dir, *([(adapter, 1.0)] if adapter else [])), ids, 12)
    engine.shutdown()


@pytest.mark.skipif(device_under_test() != "cpu", reason="capture fails only without a GPU")
def test_a_failed_capture_serves_eagerly_from_then_on(tiny_llama_dir, caplog):
    """Capture needs a GPU: on this CPU it fails, as it could on a GPU, and steps run as before."""
    engine = make_engine(tiny_llama_dir, max_batch_size=4)
    graphs = static(engine, capture=True)
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=1)
    engine.add_adapter("a", adapter)
    engine.start()
    ids = engine.tokenize("Hello world")
    with caplog.at_level(logging.WARNING, logger="s2ft_serve.engine.graphs"):
        out = engine.generate(ids, "a", GREEDY)
    assert graphs.failed and not graphs.steps and graphs.captured == 0
    assert "CUDA graph capture failed" in caplog.text and "Traceback" in caplog.text
    assert out.token_ids == reference_greedy(reference(tiny_llama_dir, (adapter, 1.0)), ids, 12)
    engine.shutdown()


@pytest.mark.skipif(device_under_test() != "cpu", reason="capture fails only without a GPU")
def test_strict_graphs_raise_what_failed(tiny_llama_dir, monkeypatch):
    """S2FT_CUDA_GRAPHS_STRICT=1 (tests, debugging on a GPU): a capture failure is raised, not served around."""
    monkeypatch.setenv("S2FT_CUDA_GRAPHS_STRICT", "1")
    engine = make_engine(tiny_llama_dir, max_batch_size=4)
    graphs = static(engine, capture=True)
    engine.runner.prefill([5, 6, 7], 0, (), all_logits=False)
    with pytest.raises(ValueError, match="cuda"):
        engine.runner.decode([8], [3], [()])
    assert not graphs.failed
    engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_replay_the_eager_steps(tiny_llama_dir, dtype):
    engines = [make_engine(tiny_llama_dir, device="cuda", dtype=dtype, max_batch_size=8, cuda_graphs=on)
               for on in (True, False)]
    assert engines[0].runner.graphs is not None and engines[1].runner.graphs is None
    adapters = {f"a{i}": random_adapter(engines[0].loaded.model, engines[0].model_name, seed=i, channels=4 + i)
                for i in range(3)}
    prompts = [engines[0].tokenize(p) for p in ("Hello world! The quick", "What is 2 + 2?", "fox")]
    plan = [(ids, name) for ids in prompts for name in (None, *adapters)]
    got = []
    for engine in engines:
        for name, adapter in adapters.items():
            engine.add_adapter(name, adapter)
        engine.start()
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
        got.append([h.result(timeout=120) for h in [engine.submit(ids, name, params) for ids, name in plan]])
    graphed, eager = got
    assert engines[0].runner.graphs.captured > 0 and not engines[0].runner.graphs.failed
    if dtype == "float32":
        assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
        for (ids, name), out in zip(plan, graphed):  # the contract, through the graphs
            ref = reference(tiny_llama_dir, *([(adapters[name], 1.0)] if name else []))
            assert out.token_ids == reference_greedy(ref, ids, 12)
            full = reference_logits(ref, ids + out.token_ids[:-1])[len(ids) - 1:]
            want = torch.log_softmax(full, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
            assert (torch.tensor([lp.logprob for lp in out.logprobs]) - want).abs().max().item() <= 1e-4
    else:
        same = sum(a.token_ids == b.token_ids for a, b in zip(graphed, eager))
        assert same >= len(plan) - 2
    # a wider adapter reallocates the slot tables: graphs are captured again, and read the new ones
    wide = random_adapter(engines[0].loaded.model, engines[0].model_name, seed=9, channels=40)
    engines[0].add_adapter("wide", wide)
    captured = engines[0].runner.graphs.captured
    out = engines[0].generate(prompts[0], "wide", GREEDY)
    assert engines[0].runner.graphs.captured > captured
    if dtype == "float32":
        assert out.token_ids == reference_greedy(reference(tiny_llama_dir, (wide, 1.0)), prompts[0], 12)
    for engine in engines:
        engine.shutdown()


def test_the_static_step_never_reads_a_tensor_on_the_host(tiny_llama_dir, monkeypatch):
    """A graph cannot wait for the GPU mid-step: the step, on the ops the GPU path runs (transformers'
    rotary and norms, index_copy_ cache writes, the mixed-step kernel), reads no tensor value on the
    host (item, int, bool, tolist) once warmed up (the CPU GEMMs' probes run at a first call)."""
    engine = make_engine(tiny_llama_dir, max_batch_size=4)
    model = engine.runner.model
    model.rotary = model.add_rms_norm = model.kv_write = None  # the CPU's compiled calls: not the GPU's ops
    graphs = static(engine)
    for i in range(2):
        engine.add_adapter(f"a{i}", random_adapter(engine.loaded.model, engine.model_name, seed=i))
    registry = engine.registry
    versions = [registry.acquire(registry.get(n)) for n in ("a0", "a1")] + [None]
    for row, v in enumerate(versions):
        engine.runner.prefill([5, 6, 7 + row], row, registry.slots_for(v), all_logits=False)
    slots = [registry.slots_for(v) for v in versions]
    for layout in (slots, [()] * 3):
        engine.runner.decode([8, 9, 10], [3, 3, 3], layout)  # warm up: the first call at these shapes
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        def refuse(self, *args, _name=name):
            raise AssertionError(f"the decode step read a tensor on the host ({_name})")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for layout in (slots, [()] * 3):
        logits = engine.runner.decode([8, 9, 10], [3, 3, 3], layout)
    monkeypatch.undo()
    assert logits.shape[0] == 3 and len(graphs.steps) == 2
    engine.shutdown()


def test_decode_attention_with_folded_query_groups_equals_grouped_attention(tiny_model_dir):
    """On a GPU a decode step folds each KV head's query heads into its queries (SDPA's fast kernels take
    no grouped heads with a mask); checked here, forced on, against the grouped attention the CPU runs."""
    engine = make_engine(tiny_model_dir, max_batch_size=4)
    model = engine.runner.model
    assert model.num_heads > model.num_kv_heads  # grouped-query attention
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=1)
    engine.add_adapter("a", adapter)
    slots = engine.registry.slots_for(engine.registry.acquire(engine.registry.get("a")))
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    engine.runner.prefill_batch(prompts, 0, [slots, (), slots], [False] * 3)
    step = ([15, 16, 17], [5, 2, 3], [slots, (), slots])
    grouped = engine.runner.decode(*step)
    model.fold_groups = True
    folded = engine.runner.decode(*step)
    assert (folded - grouped).abs().max().item() <= 1e-5
    engine.shutdown()
