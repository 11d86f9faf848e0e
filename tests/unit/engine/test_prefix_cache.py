"""Prefix caching: a prompt that starts like an earlier one (same adapter, same fused state) reuses
its keys and values, and still gets exactly the tokens and logits it gets without the cache."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch

from s2ft_serve.engine.prefix_cache import PrefixCache
from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.model.forward import KVCache
from s2ft_serve.model.testing import random_adapter

from engine_reference import make_engine, reference, reference_greedy, reference_logits

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@contextmanager
def engine_with_adapter(path, seed: int, channels: int = 4, **config):
    """An engine with one random adapter "a"; yields (engine, adapter) and shuts the engine down."""
    engine = make_engine(path, **config)
    try:
        adapter = random_adapter(engine.loaded.model, engine.model_name, seed=seed, channels=channels)
        engine.add_adapter("a", adapter)
        yield engine, adapter
    finally:
        engine.shutdown(timeout=5)


def small_cache(max_blocks: int, block: int = 4) -> PrefixCache:
    kv = KVCache(layers=2, rows=3, kv_heads=2, max_len=64, head_dim=8, dtype=torch.float32, device="cpu")
    kv.k.normal_()
    kv.v.normal_()
    return PrefixCache(kv, block, max_blocks * 2 * 2 * 2 * block * 8 * 4)


def test_blocks_match_by_owner_and_exact_tokens_and_always_leave_one_token():
    cache = small_cache(max_blocks=16)
    ids = list(range(10, 20))  # 10 tokens: 2 full blocks of 4
    cache.insert(owner=0, ids=ids, row=0, epoch=0)
    assert len(cache.blocks) == 2
    assert len(cache.match(0, ids, 0)) == 2
    assert len(cache.match(0, ids[:8], 0)) == 1  # 8 tokens: the second block would leave none to compute
    assert len(cache.match(0, ids[:9], 0)) == 2
    assert len(cache.match(0, ids[:4] + [99] + ids[5:], 0)) == 1  # the second block differs in one token
    assert cache.match(1, ids, 0) == []  # another adapter version: its keys and values differ
    assert cache.match(0, [11] + ids[1:], 0) == []
    assert cache.match(0, ids, epoch=1) == [] and not cache.blocks  # the base weights changed: all stale


def test_restore_copies_the_cached_keys_and_values_into_another_row():
    cache = small_cache(max_blocks=16)
    ids = list(range(9))
    cache.insert(0, ids, row=0, epoch=0)
    expect_k, expect_v = cache.kv.k[:, 0, :, :8].clone(), cache.kv.v[:, 0, :, :8].clone()
    cache.kv.k[:, 0].zero_()  # the source row is reused by someone else: the blocks are copies
    assert cache.restore(cache.match(0, ids, 0), row=2) == 8
    assert torch.equal(cache.kv.k[:, 2, :, :8], expect_k) and torch.equal(cache.kv.v[:, 2, :, :8], expect_v)


def test_eviction_is_least_recently_used_and_never_orphans_a_block():
    cache = small_cache(max_blocks=5)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(0, 5, (12,), generator=g).tolist() for _ in range(6)]
    for step in range(60):
        ids = prefixes[int(torch.randint(0, 6, (1,), generator=g))] + [step]
        cache.match(0, ids, 0)
        cache.insert(0, ids, row=0, epoch=0)
        assert len(cache.blocks) <= 5
        live = {b.id for b in cache.blocks.values()}
        assert all(key[1] == 0 or key[1] in live for key in cache.blocks)  # every parent is still there
    ids = prefixes[0] + [1000]
    cache.insert(0, ids, 0, 0)
    assert len(cache.match(0, ids, 0)) == 3  # the most recent chain is whole


def test_a_zero_budget_turns_it_off(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, prefix_cache_bytes=0)
    try:
        assert engine.prefix_cache is None
        ids = list(range(5, 45))
        for _ in range(2):
            out = engine.generate(ids, None, GREEDY)
            assert out.cached_tokens == 0
        assert engine.stats().prefix_cache_hit_tokens == 0
    finally:
        engine.shutdown(timeout=5)


def test_hits_give_the_merged_reference_for_the_base_and_an_adapter(tiny_model_dir):
    """A prompt seen before (40 tokens, blocks of 16) reuses 32 tokens; one that extends it reuses them
    too. Outputs, logits of the first token included, equal the merged reference; an adapter never
    reuses the base's blocks, nor the base an adapter's."""
    with engine_with_adapter(tiny_model_dir, seed=5, channels=6, prefix_block_size=16) as (engine, adapter):
        ref_base, ref_a = reference(tiny_model_dir), reference(tiny_model_dir, (adapter, 1.0))
        ids = torch.randint(5, 200, (40,), generator=torch.Generator().manual_seed(1)).tolist()
        longer = ids + [7, 8, 9, 10, 11, 12, 13, 14, 15]
        lp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
        first = engine.generate(ids, None, lp)
        again = engine.generate(ids, None, lp)
        extended = engine.generate(longer, None, GREEDY)
        under_a = engine.generate(ids, "a", GREEDY)
        under_a_again = engine.generate(longer, "a", GREEDY)
        assert (first.cached_tokens, again.cached_tokens, extended.cached_tokens) == (0, 32, 32)
        assert (under_a.cached_tokens, under_a_again.cached_tokens) == (0, 32)
        assert again.token_ids == first.token_ids == reference_greedy(ref_base, ids, 4)
        logp = torch.log_softmax(reference_logits(ref_base, ids)[-1], -1)
        assert abs(again.logprobs[0].logprob - logp[again.token_ids[0]].item()) <= 1e-4
        assert [t for t, _ in again.logprobs[0].top] == logp.topk(3).indices.tolist()
        assert extended.token_ids == reference_greedy(ref_base, longer, 6)
        assert under_a.token_ids == reference_greedy(ref_a, ids, 6)
        assert under_a_again.token_ids == reference_greedy(ref_a, longer, 6)
        stats = engine.stats()
        assert stats.prefix_cache_hit_tokens == 96 and stats.prefix_cache_query_tokens == 2 * 40 + 2 * 49 + 40
        assert stats.prefix_cache_bytes > 0


def test_prompt_logprobs_are_computed_whole_and_replacing_an_adapter_drops_its_old_blocks(tiny_llama_dir):
    with engine_with_adapter(tiny_llama_dir, seed=1, prefix_block_size=8) as (engine, old):
        new = random_adapter(engine.loaded.model, engine.model_name, seed=2, channels=4)
        ids = list(range(30, 60))
        engine.generate(ids, "a", GREEDY)
        scored = engine.generate(ids, "a", SamplingParams(max_tokens=0, prompt_logprobs=1))
        assert scored.cached_tokens == 0 and len(scored.prompt_logprobs) == len(ids)
        lp = torch.log_softmax(reference_logits(reference(tiny_llama_dir, (old, 1.0)), ids), -1)
        assert abs(scored.prompt_logprobs[-1].logprob - lp[-2, ids[-1]].item()) <= 1e-4
        engine.generate(ids, None, GREEDY)  # the base's blocks, which must stay
        cache = engine.prefix_cache
        old_uid = engine.registry.get("a").version.uid
        owners = {key[0] for key in cache.blocks}
        assert owners == {0, old_uid}
        engine.add_adapter("a", new, replace=True)
        assert {key[0] for key in cache.blocks} == {0}  # the retired version's blocks are gone at once
        out = engine.generate(ids, "a", GREEDY)
        assert out.cached_tokens == 0  # the new version has no blocks yet
        assert out.token_ids == reference_greedy(reference(tiny_llama_dir, (new, 1.0)), ids, 6)
        assert engine.generate(ids, "a", GREEDY).cached_tokens == 24
        engine.remove_adapter("a")
        assert {key[0] for key in cache.blocks} == {0}
        assert engine.generate(ids, None, GREEDY).cached_tokens == 24


def test_fusing_or_unfusing_empties_the_cache(tiny_llama_dir):
    with engine_with_adapter(tiny_llama_dir, seed=3, prefix_block_size=8) as (engine, adapter):
        ids = list(range(70, 95))
        engine.generate(ids, None, GREEDY)
        assert engine.generate(ids, None, GREEDY).cached_tokens == 24
        engine.fuse("a")
        fused_base = engine.generate(ids, None, GREEDY)
        fused_a = engine.generate(ids, "a", GREEDY)
        assert fused_base.cached_tokens == 0 and fused_a.cached_tokens == 0
        assert engine.generate(ids, "a", GREEDY).cached_tokens == 24  # cached again, under the fused weights
        assert fused_a.token_ids == reference_greedy(reference(tiny_llama_dir, (adapter, 1.0)), ids, 6)
        engine.unfuse("a")
        base = engine.generate(ids, None, GREEDY)
        assert base.cached_tokens == 0
        assert base.token_ids == fused_base.token_ids == reference_greedy(reference(tiny_llama_dir), ids, 6)
        engine.generate(ids, None, GREEDY)
        engine.reset_prefix_cache()
        assert engine.generate(ids, None, GREEDY).cached_tokens == 0


def test_shared_prefixes_in_batches_and_chunks_give_the_tokens_each_request_gets_alone(tiny_model_dir):
    """Requests built from a few shared prefixes, with and without an adapter, under small budgets and
    batch sizes: hits of different lengths share prefill passes, long rests are chunked after a
    hit, and every request gets exactly the tokens it gets alone with no cache at all."""
    g = torch.Generator().manual_seed(11)
    prefixes = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (9, 20, 33)]
    requests = []
    for i in range(16):
        prefix = prefixes[int(torch.randint(0, 3, (1,), generator=g))]
        tail = torch.randint(5, 200, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        requests.append((prefix + tail, "a" if i % 3 == 1 else None, int(torch.randint(1, 5, (1,), generator=g))))
    alone_engine = make_engine(tiny_model_dir, max_batch_size=1, prefix_cache_bytes=0)
    adapter = random_adapter(alone_engine.loaded.model, alone_engine.model_name, seed=4, channels=4)
    alone_engine.add_adapter("a", adapter)
    alone = [alone_engine.generate(ids, name, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
             .token_ids for ids, name, m in requests]
    alone_engine.shutdown(timeout=5)
    for budget, batch in [(64, 4), (6, 3), (512, 8)]:
        engine = make_engine(tiny_model_dir, max_tokens_per_step=budget, max_batch_size=batch, prefix_block_size=4)
        try:
            engine.add_adapter("a", adapter)
            for ids, name, _ in requests[:3]:  # warm the cache with a few of them
                engine.generate(ids, name, SamplingParams(max_tokens=1))
            handles = [engine.submit(ids, name, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
                       for ids, name, m in requests]
            engine.start()
            outs = [h.result(timeout=120) for h in handles]
            assert [o.token_ids for o in outs] == alone, (budget, batch)
            assert sum(o.cached_tokens > 0 for o in outs) >= 10
            assert engine.stats().running == 0 and engine.scheduler.chunking is None
        finally:
            engine.shutdown(timeout=5)


def test_a_prompt_of_a_version_that_retired_while_it_waited_is_not_cached(tiny_llama_dir):
    """Replaced between admission and prefill: its blocks would outlive the drop, matched by nobody."""
    with engine_with_adapter(tiny_llama_dir, seed=1, prefix_block_size=8) as (engine, _):
        entry = engine.registry.get("a")
        version = engine.call(engine.registry.acquire, entry)  # pinned, as a waiting request's
        engine.add_adapter("a", random_adapter(engine.loaded.model, engine.model_name, seed=2, channels=4),
                           replace=True)
        assert version.retired
        seq = SimpleNamespace(version=version, prompt_ids=list(range(30, 60)), row=0)
        engine.call(engine.stepper._remember, seq)
        assert version.uid not in {key[0] for key in engine.prefix_cache.blocks}
        engine.call(engine.registry.release, version)


def test_a_prompt_prefilled_in_chunks_across_a_fuse_is_not_cached(tiny_llama_dir):
    """QA: its first chunks ran under the old weights, yet it was cached whole under the new ones."""
    with engine_with_adapter(tiny_llama_dir, seed=4, prefix_block_size=8, max_batch_size=2,
                             max_tokens_per_step=16) as (engine, _):
        ids = [(7 * i) % 300 + 3 for i in range(48)]
        one = SamplingParams(max_tokens=1, temperature=0)
        for fuse_midway in (False, True):
            engine.reset_prefix_cache()
            handle = engine.submit(ids, None, one)
            engine.call(engine.stepper.iteration)  # the first chunk
            assert engine.scheduler.chunking is not None and engine.scheduler.chunking.prefilled == 16
            if fuse_midway:
                engine.fuse("a")
            while engine.scheduler.has_work():
                engine.call(engine.stepper.iteration)
            assert handle.result().finish_reason == "length"
            assert len(engine.prefix_cache.blocks) == (0 if fuse_midway else 6)
        engine.unfuse("a")
