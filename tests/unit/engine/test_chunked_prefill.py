"""Prompts longer than the step's prefill budget are prefilled in chunks while the batch decodes."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.engine.scheduler import Scheduler
from s2ft_serve.model.testing import random_adapter

from engine_reference import make_engine, reference, reference_greedy, reference_logits

LONG = "Structured sparse fine-tuning updates a few columns of two matrices in every block of the model"


def test_scheduler_chunks_the_prompt_that_does_not_fit_and_counts_it_in_the_batch():
    sched = Scheduler(max_batch_size=2, max_tokens_per_step=10, max_queue=8)
    seqs = [SimpleNamespace(prompt_ids=[0] * n, cancelled=False, row=-1) for n in (4, 30, 3, 2)]
    for s in seqs:
        sched.add_all([s])
    assert sched.admit() == [seqs[0]]  # 4 fit; 30 do not: it is chunked in the spare row, not returned
    assert sched.chunking is seqs[1] and seqs[1].row == 2
    sched.start_running(seqs[0])
    assert sched.admit() == []  # the batch (1 running + 1 chunking) is full
    sched.chunking = None
    assert sched.admit(budget=5) == [seqs[2]]  # room for one more: the 3-token prompt
    assert sched.has_work()


def test_long_prompts_in_chunks_give_reference_tokens_and_prompt_logprobs(tiny_model_dir):
    """Budget 5 tokens per step: the long prompts take several chunks each, interleaved with the decode
    steps of a short request that is already running; every output equals the merged reference."""
    engine = make_engine(tiny_model_dir, max_tokens_per_step=5, max_batch_size=4)
    try:
        adapter = random_adapter(engine.loaded.model, engine.model_name, seed=21, channels=5)
        engine.add_adapter("a", adapter)
        passes = []
        engine.add_step_listener(lambda batch, tokens: passes.append((batch, tokens)))
        ids = engine.tokenize(LONG)
        assert len(ids) > 12
        greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        short = engine.submit("fox", None, greedy)
        long_a = engine.submit(ids, "a", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                        prompt_logprobs=2))
        long_base = engine.submit(ids[:-3], None, greedy)
        scored = engine.submit(ids, "a", SamplingParams(max_tokens=0, prompt_logprobs=1))
        engine.start()
        ref_a, ref_base = reference(tiny_model_dir, (adapter, 1.0)), reference(tiny_model_dir)
        out = long_a.result(timeout=120)
        assert out.token_ids == reference_greedy(ref_a, ids, 8)
        lp = torch.log_softmax(reference_logits(ref_a, ids), -1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for i, x in enumerate(out.prompt_logprobs[1:]):
            assert x.token_id == ids[i + 1] and abs(x.logprob - lp[i, ids[i + 1]].item()) <= 1e-4, i
            assert [t for t, _ in x.top] == lp[i].topk(2).indices.tolist()
        assert long_base.result(timeout=120).token_ids == reference_greedy(ref_base, ids[:-3], 8)
        assert short.result(timeout=120).token_ids == reference_greedy(ref_base, engine.tokenize("fox"), 8)
        z = scored.result(timeout=120)
        assert z.token_ids == [] and z.finish_reason == "length" and len(z.prompt_logprobs) == len(ids)
        assert max(tokens for batch, tokens in passes) <= 5  # no pass went over the budget
    finally:
        engine.shutdown(timeout=5)


def test_a_request_cancelled_while_its_prompt_is_chunked_is_aborted(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_tokens_per_step=2)
    try:
        passes = []
        handle = engine.submit(engine.tokenize(LONG), None, SamplingParams(max_tokens=4))
        engine.add_step_listener(lambda batch, tokens: (passes.append(tokens), handle.cancel()))  # after chunk 1
        engine.start()
        out = handle.result(timeout=30)
        assert out.finish_reason == "abort" and out.token_ids == [] and passes == [2]
        after = engine.generate("fox", None, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert len(after.token_ids) == 3  # the engine goes on
        assert engine.stats().running == 0
    finally:
        engine.shutdown(timeout=5)


def test_any_budget_and_batch_size_give_the_same_tokens(tiny_model_dir):
    """Random prompt lengths, adapters and arrival order under small budgets and batch sizes (chunks,
    padded groups and a full batch all interleave): every request gets the tokens it gets alone."""
    g = torch.Generator().manual_seed(7)
    reference_engine = make_engine(tiny_model_dir, max_batch_size=1)
    adapter = random_adapter(reference_engine.loaded.model, reference_engine.model_name, seed=3, channels=4)
    reference_engine.add_adapter("a", adapter)
    reference_engine.start()
    requests = []
    for i in range(10):
        n = int(torch.randint(1, 30, (1,), generator=g))
        ids = torch.randint(5, 200, (n,), generator=g).tolist()
        requests.append((ids, "a" if i % 3 else None, int(torch.randint(1, 6, (1,), generator=g))))
    alone = [reference_engine.generate(ids, name, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
             .token_ids for ids, name, m in requests]
    reference_engine.shutdown(timeout=5)
    for budget, batch in [(1, 2), (4, 3), (7, 2), (16, 4)]:
        engine = make_engine(tiny_model_dir, max_tokens_per_step=budget, max_batch_size=batch)
        try:
            engine.add_adapter("a", adapter)
            handles = [engine.submit(ids, name, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
                       for ids, name, m in requests]
            engine.start()
            got = [h.result(timeout=120).token_ids for h in handles]
            assert got == alone, (budget, batch)
            assert engine.stats().running == 0 and engine.scheduler.chunking is None
        finally:
            engine.shutdown(timeout=5)
