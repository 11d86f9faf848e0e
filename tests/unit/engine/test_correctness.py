"""The correctness contract: every request's logits equal a merged-weights transformers model's."""

from __future__ import annotations

import pytest
import torch

from s2ft_serve.adapters.format import merge_into
from s2ft_serve.engine.graphs import DecodeGraphs
from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.model.testing import device_under_test, make_tiny_model, random_adapter

from engine_reference import make_engine, reference, reference_greedy, reference_logits

PROMPTS = ["Hello world! The quick", "What is 2 + 2?", "fox", "Structured sparse fine-tuning updates a few"]


@pytest.fixture(params=[("exact", "native"), ("onednn", "native"), ("exact", "torch"), ("exact", "native", "static")],
                ids="-".join)
def engine(tiny_model_dir, request):
    """The contract holds with either GEMM backend (on these tiny models oneDNN's rounding stays far below it)
    and either mixed-step kernel: the compiled one and the portable embedding_bag; and through the padded,
    static-shape decode step that CUDA graphs replay (run eagerly here)."""
    gemm, kernel, *graphs = request.param
    e = make_engine(tiny_model_dir, max_batch_size=8, gemm=gemm, adapter_kernel=kernel)
    if graphs and e.runner.graphs is None:
        e.runner.graphs = DecodeGraphs(e.runner.model, e.runner.batch, 8, capture=False)
    yield e
    e.shutdown(timeout=5)


def test_logits_alone_match_merged_reference(engine, adapters, tiny_model_dir):
    ids = engine.tokenize(PROMPTS[0])
    for name, adapter in list(adapters.items()) + [(None, None)]:
        ref = reference(tiny_model_dir, *([(adapter, 1.0)] if adapter else []))
        diff = (engine.logits(ids, adapter=name) - reference_logits(ref, ids)).abs().max().item()
        assert diff <= 1e-4, (name, diff)


def test_adapters_change_the_output(engine, adapters):
    ids = engine.tokenize(PROMPTS[0])
    base = engine.logits(ids)
    for name in adapters:
        assert (engine.logits(ids, adapter=name) - base).abs().max() > 1e-3


@pytest.mark.parametrize("order", [0, 1, 2])
def test_mixed_decode_batch_logits_match_reference_in_any_position(engine, adapters, tiny_model_dir, order):
    """Prefill four sequences (three adapters and the base) into rows, decode them together."""
    names = [["a0", "a1", None, "a2"], [None, "a2", "a0", "a1"], ["a1", "a1", None, "a0"]][order]
    runner, registry = engine.runner, engine.registry
    prompts = [engine.tokenize(p) for p in PROMPTS]
    nxt = [7, 11, 13, 17]
    versions = [registry.acquire(registry.get(n)) if n else None for n in names]
    for row, (ids, v) in enumerate(zip(prompts, versions)):
        runner.prefill(ids, row, registry.slots_for(v), all_logits=False)
    logits = runner.decode(nxt, [len(p) for p in prompts], [registry.slots_for(v) for v in versions]).cpu()
    for row, (name, ids) in enumerate(zip(names, prompts)):
        ref = reference(tiny_model_dir, *([(adapters[name], 1.0)] if name else []))
        expected = reference_logits(ref, ids + [nxt[row]])[-1]
        assert (logits[row] - expected).abs().max().item() <= 1e-4, (order, row, name)


def test_concurrent_mixed_requests_give_reference_greedy_tokens(engine, adapters, tiny_model_dir):
    engine.start()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    plan = [("a0", 0), ("a1", 1), (None, 2), ("a2", 3), ("a0", 1), (None, 0), ("a1", 3)]
    handles = [engine.submit(PROMPTS[p], adapter=n, params=params) for n, p in plan]
    for (name, p), handle in zip(plan, handles):
        out = handle.result(timeout=60)
        ref = reference(tiny_model_dir, *([(adapters[name], 1.0)] if name else []))
        ids = engine.tokenize(PROMPTS[p])
        assert out.token_ids == reference_greedy(ref, ids, 10), (name, p)
        # the chosen tokens' logprobs equal the reference distribution's
        full = reference_logits(ref, ids + out.token_ids[:-1])[len(ids) - 1:]
        expected = torch.log_softmax(full, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        assert (got - expected).abs().max().item() <= 1e-4
        assert out.finish_reason == "length" and out.adapter == name


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_other_architectures(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch, seed=3)
    engine = make_engine(path)
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=5)
    engine.add_adapter("x", adapter)
    ids = engine.tokenize(PROMPTS[1])
    diff = (engine.logits(ids, "x") - reference_logits(reference(path, (adapter, 1.0)), ids)).abs().max()
    assert diff <= 1e-4


def test_prompt_logprobs_match_reference(engine, adapters, tiny_model_dir):
    engine.start()
    ids = engine.tokenize(PROMPTS[3])
    out = engine.generate(ids, "a1", SamplingParams(max_tokens=0, prompt_logprobs=3))
    assert out.token_ids == [] and out.prompt_logprobs[0] is None
    ref = torch.log_softmax(reference_logits(reference(tiny_model_dir, (adapters["a1"], 1.0)), ids), -1)
    for i, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_id == ids[i]
        assert abs(lp.logprob - ref[i - 1, ids[i]].item()) <= 1e-4
        assert [t for t, _ in lp.top] == ref[i - 1].topk(3).indices.tolist()


def test_unknown_gemm_backend_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="gemm must be one of exact, onednn"):
        make_engine(tiny_llama_dir, gemm="blas")


@pytest.mark.parametrize("names", [["a0", None, "a2", "a0"], ["a1", "a1", "a1", "a1"], [None, None, "a2", None]])
def test_batched_prefill_matches_reference_per_prompt_then_decodes(engine, adapters, tiny_model_dir, names):
    """Prompts of different lengths and adapters prefilled in one pass (right-padded): every asked position
    equals the merged reference, and decoding over the padded cache rows stays exact."""
    runner, registry = engine.runner, engine.registry
    prompts = [engine.tokenize(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # the padding is exercised
    versions = [registry.acquire(registry.get(n)) if n else None for n in names]
    all_logits = [True, False, True, False]
    got = [g.cpu() for g in runner.prefill_batch(prompts, 0, [registry.slots_for(v) for v in versions], all_logits)]
    nxt = [5, 9, 3, 21]
    step = runner.decode(nxt, [len(p) for p in prompts], [registry.slots_for(v) for v in versions]).cpu()
    for row, (name, ids) in enumerate(zip(names, prompts)):
        ref = reference(tiny_model_dir, *([(adapters[name], 1.0)] if name else []))
        expected = reference_logits(ref, ids + [nxt[row]])
        want = expected[: len(ids)] if all_logits[row] else expected[len(ids) - 1: len(ids)]
        assert got[row].shape == want.shape
        assert (got[row] - want).abs().max().item() <= 1e-4, (row, name)
        assert (step[row] - expected[-1]).abs().max().item() <= 1e-4, (row, name)


def test_requests_waiting_together_share_one_prefill_pass(engine, adapters, tiny_model_dir):
    """Submitted before the engine starts, the requests are admitted together: prefilled in one pass
    (the step listener sees it), each still gets its reference tokens and prompt logprobs."""
    passes = []
    engine.add_step_listener(lambda batch, tokens: passes.append((batch, tokens)))
    plan = [("a0", 0), (None, 1), ("a2", 3), ("a1", 0)]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=1 if i == 2 else None)
              for i in range(len(plan))]
    handles = [engine.submit(PROMPTS[p], adapter=n, params=pp) for (n, p), pp in zip(plan, params)]
    zero = engine.submit(PROMPTS[2], adapter="a1", params=SamplingParams(max_tokens=0, prompt_logprobs=1))
    engine.start()
    prompt_tokens = sum(len(engine.tokenize(PROMPTS[p])) for _, p in plan) + len(engine.tokenize(PROMPTS[2]))
    for (name, p), handle in zip(plan, handles):
        out = handle.result(timeout=60)
        ref = reference(tiny_model_dir, *([(adapters[name], 1.0)] if name else []))
        ids = engine.tokenize(PROMPTS[p])
        assert out.token_ids == reference_greedy(ref, ids, 6), (name, p)
        if out.prompt_logprobs is not None:
            lp = torch.log_softmax(reference_logits(ref, ids), -1)
            assert all(abs(x.logprob - lp[i, ids[i + 1]].item()) <= 1e-4 for i, x in enumerate(out.prompt_logprobs[1:]))
    assert zero.result(timeout=60).token_ids == [] and zero.result().finish_reason == "length"
    prefill_batches = [b for b, t in passes if t > b]  # decode steps have one token per sequence
    assert sum(prefill_batches) == len(plan) + 1 and len(prefill_batches) < len(plan) + 1
    assert sum(t for b, t in passes if t > b) == prompt_tokens


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 12, 13, 16, 32])
def test_exact_decode_equals_transformers_cached_decode(tiny_model_dir, rows):
    """`exact` GEMMs: a decode step's base logits equal transformers' own decode (with its KV cache, same
    batch) bit for bit for 4, 8 and 12+ rows (the compiled GEMM, gemm.ExactLinear, where a probe showed
    MKL's bits); for the few-row counts MKL computes in another order they stay inside the contract."""
    from transformers import AutoModelForCausalLM

    engine = make_engine(tiny_model_dir, max_batch_size=32)
    try:
        ids = engine.tokenize(PROMPTS[3])
        runner = engine.runner
        engine.call(lambda: runner.prefill_batch([ids] * rows, 0, [()] * rows, [False] * rows))
        ours = engine.call(lambda: runner.decode([7] * rows, [len(ids)] * rows, [()] * rows)).cpu()
    finally:
        engine.shutdown(timeout=5)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        prefix = hf(torch.tensor([ids] * rows), use_cache=True)
        cache = {"cache": prefix.cache} if "cache" in prefix else {"past_key_values": prefix.past_key_values}
        theirs = hf(torch.tensor([[7]] * rows), **cache).logits[:, -1]  # transformers 5.x renamed it
    if device_under_test() == "cpu" and (rows in (4, 8) or rows >= 12):  # bits: MKL's order, on the CPU
        assert torch.equal(ours, theirs)
    else:
        assert (ours - theirs).abs().max().item() <= 1e-4



def test_one_adapters_passes_give_the_merged_models_bits(tiny_model_dir):
    """`exact` GEMMs with the compiled kernel: a pass whose tokens all use one adapter (its prompts'
    prefill, a decode step of its requests) reads the adapter's columns patched into the base GEMM, each
    `w + delta` rounded as merging stores it, so its logits equal the merged transformers model's bit for
    bit wherever the kernel gives the base pass MKL's bits (mixed passes add corrections instead)."""
    from transformers import AutoModelForCausalLM

    from s2ft_serve.adapters import native

    if native.exact_linear_op() is None or device_under_test() != "cpu":
        pytest.skip("no compiled kernel here (the CPU's)")
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = make_engine(tiny_model_dir, max_batch_size=32)
    identical = 0
    try:
        adapter = random_adapter(engine.loaded.model, engine.model_name, seed=3, channels=9)
        engine.add_adapter("a", adapter)
        merge_into(hf, adapter)
        ids = engine.tokenize(PROMPTS[2])  # short: the prefill passes stay within the kernel's rows
        runner, registry = engine.runner, engine.registry
        slots = registry.slots_for(registry.get("a").version)
        served = [layer.exact for layer in runner.layers.values()]
        for rows in (4, 8, 16):
            prefill = engine.call(lambda: runner.prefill_batch([ids] * rows, 0, [slots] * rows, [True] * rows))
            ours = engine.call(lambda: runner.decode([7] * rows, [len(ids)] * rows, [slots] * rows))
            with torch.no_grad():
                prefix = hf(torch.tensor([ids] * rows), use_cache=True)
                cache = {"cache": prefix.cache} if "cache" in prefix else {"past_key_values": prefix.past_key_values}
                theirs = hf(torch.tensor([[7]] * rows), **cache).logits[:, -1]
            for n, got, want in ((rows * len(ids), torch.stack(prefill), prefix.logits), (rows, ours, theirs)):
                if all(e.caps[n] and e.same_bits[n] for e in served):  # the kernel's order is MKL's
                    assert torch.equal(got, want), n
                    identical += 1
                else:
                    assert (got - want).abs().max().item() <= 1e-4, n
    finally:
        engine.shutdown(timeout=5)
    assert identical  # the kernel gives MKL's bits at some of these row counts (x86 MKL, AVX2 or AVX-512)


def test_adapters_saved_in_bfloat16_are_served_from_bfloat16_tables_with_unchanged_logits(tiny_model_dir, tmp_path):
    """A float32 engine keeps an adapter saved in bfloat16 (read back from its file) in bfloat16 tables;
    a mixed step's logits meet the contract, and are the same bits once a float32 adapter widens the
    tables and again once it is removed."""
    from s2ft_serve.adapters.format import load_adapter, save_adapter

    engine = make_engine(tiny_model_dir, max_batch_size=8)
    if engine.mixed_kernel != "compiled":
        engine.shutdown()
        pytest.skip("no compiled kernel here")
    try:
        made = random_adapter(engine.loaded.model, engine.model_name, seed=21, channels=7, dtype=torch.bfloat16)
        save_adapter(made, tmp_path / "b16")
        engine.add_adapter("b16", load_adapter(tmp_path / "b16"))
        layers = engine.runner.layers.values()
        runner, registry = engine.runner, engine.registry
        prompts = [engine.tokenize(p) for p in PROMPTS[:3]]
        names = ["b16", None, "b16"]

        def step():
            versions = [registry.acquire(registry.get(n)) if n else None for n in names]
            slots = [registry.slots_for(v) for v in versions]
            for row, ids in enumerate(prompts):
                runner.prefill(ids, row, slots[row], all_logits=False)
            logits = runner.decode([7, 11, 13], [len(p) for p in prompts], slots)
            for v in versions:
                if v is not None:
                    registry.release(v)
            return logits.cpu()

        assert all(layer.slots.table.dtype == torch.bfloat16 for layer in layers)
        narrow = engine.call(step)
        for row, (name, ids) in enumerate(zip(names, prompts)):
            ref = reference(tiny_model_dir, *([(made, 1.0)] if name else []))
            expected = reference_logits(ref, ids + [[7, 11, 13][row]])[-1]
            assert (narrow[row] - expected).abs().max().item() <= 1e-4, row
        engine.add_adapter("f32", random_adapter(engine.loaded.model, engine.model_name, seed=22, channels=7))
        assert all(layer.slots.table.dtype == torch.float32 for layer in layers)
        # the CPU kernel sums in one order whatever the table's dtype; Triton's reductions (a GPU) may not
        same = torch.equal if device_under_test() == "cpu" else lambda a, b: (a - b).abs().max().item() <= 1e-5
        assert same(engine.call(step), narrow)
        engine.remove_adapter("f32")
        assert all(layer.slots.table.dtype == torch.bfloat16 for layer in layers)
        assert same(engine.call(step), narrow)
    finally:
        engine.shutdown(timeout=5)
