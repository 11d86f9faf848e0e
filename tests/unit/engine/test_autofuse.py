"""Automatic fusion: the policy's decisions, and the engine acting on them."""

from __future__ import annotations

import pytest

from s2ft_serve.engine.autofuse import AutoFusePolicy
from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.model.testing import random_adapter

from engine_reference import make_engine


def auto_fuse_engine(model_dir, root=None, names=("hot",), load=True, **config):
    """An engine with --auto-fuse (4 requests in a 60 s window decide) and random adapters `names`:
    saved under `root` (the adapter root) and, if `load`, loaded from there; else added in memory."""
    from s2ft_serve.adapters.format import save_adapter

    if root is not None:
        config["adapter_root"] = str(root)
    engine = make_engine(model_dir, auto_fuse=True, auto_fuse_min_requests=4, auto_fuse_window_s=60, **config)
    for seed, name in enumerate(names, start=3):
        adapter = random_adapter(engine.loaded.model, engine.model_name, seed=seed)
        if root is None:
            engine.add_adapter(name, adapter)
        else:
            save_adapter(adapter, root / name)
            if load:
                engine.load_adapter(name, name)
    return engine


def auto_fused(engine, name: str) -> None:
    """Start `engine` and send `name` the traffic that makes the policy fuse it."""
    engine.start()
    [h.result(timeout=60) for h in [engine.submit("fox", name, PARAMS) for _ in range(5)]]
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == [name]


PARAMS = SamplingParams(max_tokens=2, temperature=0)


def test_policy_fuses_the_dominant_adapter_and_unfuses_when_it_fades():
    policy = AutoFusePolicy(fuse_share=0.6, unfuse_share=0.4, window_s=10, min_requests=10)
    for i in range(9):
        policy.record("hot", now=i * 0.1)
    assert policy.decide([], now=1.0) is None  # too few requests yet
    policy.record("cold", now=1.0)
    decision = policy.decide([], now=1.0)
    assert (decision.action, decision.adapter, decision.requests) == ("fuse", "hot", 10)
    assert policy.decide(["hot"], now=1.0) is None  # still hot: nothing to do
    assert policy.decide(["hot"], now=11.0) is None  # a quiet window: too few requests to unfuse on
    policy.record(None, now=11.5)
    assert policy.decide(["hot"], now=11.5) is None  # one request elsewhere is no reason either
    for i in range(20):
        policy.record(None, now=2.0)
    decision = policy.decide(["hot"], now=2.0)
    assert (decision.action, decision.adapter) == ("unfuse", "hot")
    assert policy.decide([], now=30.0) is None  # the window emptied


def test_policy_rejects_inverted_thresholds():
    with pytest.raises(ValueError):
        AutoFusePolicy(fuse_share=0.3, unfuse_share=0.5)


def test_engine_auto_fuses_and_results_stay_exact(tiny_llama_dir):
    engine = auto_fuse_engine(tiny_llama_dir)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.start()
    before = [engine.generate("fox", "hot", params).token_ids for _ in range(4)]
    base_before = engine.generate("fox", None, params).token_ids
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == ["hot"] and engine.stats().auto_fuse_decisions == 1
    assert engine.generate("fox", "hot", params).token_ids == before[0]
    assert engine.generate("fox", None, params).token_ids == base_before
    for _ in range(12):
        engine.generate("fox", None, params)
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == [] and engine.stats().auto_fuse_decisions == 2
    engine.shutdown()


def test_an_unloaded_adapter_is_not_fused_back(tiny_llama_dir, tmp_path):
    """QA: with --auto-fuse, DELETE of a hot adapter was undone a second later: its past requests
    still counted, and the fuse reloaded it from the adapter root."""
    engine = auto_fuse_engine(tiny_llama_dir, tmp_path)
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.start()
    for _ in range(4):
        engine.generate("fox", "hot", params)
    engine.remove_adapter("hot")
    engine.auto_fuse_tick()
    assert not engine.has_adapter("hot") and engine.stats().auto_fuse_decisions == 0
    # a decision for a name no longer loaded (its requests were recorded after the unload) loads nothing
    for _ in range(4):
        engine.autofuse.record("hot")
    engine.auto_fuse_tick()
    assert not engine.has_adapter("hot") and engine.stats().fused_adapters == []
    engine.shutdown()


def test_policy_fuses_only_with_room_and_unfuses_only_its_own():
    policy = AutoFusePolicy(fuse_share=0.6, unfuse_share=0.4, window_s=10, min_requests=10)
    for i in range(7):
        policy.record("b", now=0.0)
    for i in range(3):
        policy.record("a", now=0.0)
    assert policy.decide([], now=1.0, room=False) is None
    decision = policy.decide([], now=1.0)
    assert (decision.action, decision.adapter) == ("fuse", "b")


def test_auto_fusion_leaves_adapters_fused_by_hand_and_fuses_beside_them(tiny_llama_dir, tmp_path):
    """QA: with `a` fused through the admin API, a dominant `b` was never fused (even with room for two),
    and `a` was unfused by the policy once its share faded."""
    engine = auto_fuse_engine(tiny_llama_dir, tmp_path, "abc", max_fused_adapters=2)
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.start()
    engine.fuse("a")
    for _ in range(8):
        engine.generate("fox", "b", params)
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == ["a", "b"]
    for _ in range(40):
        engine.generate("fox", None, params)
    engine.auto_fuse_tick()  # both faded: only its own goes
    assert engine.stats().fused_adapters == ["a"]
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == ["a"] and engine.stats().auto_fuse_decisions == 2
    engine.shutdown()


def test_a_decision_does_not_read_an_evicted_adapter_back(tiny_llama_dir, tmp_path):
    """QA: an evicted adapter that dominated the window was read back from its folder to be fused
    (evicting another); the next request for it loads it, and the tick after that fuses it."""
    engine = auto_fuse_engine(tiny_llama_dir, tmp_path, "ab", load=False, max_resident_adapters=1)
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.start()
    for _ in range(5):
        engine.generate("fox", "a", params)
    engine.generate("fox", "b", params)  # evicts a
    assert [e.name for e in engine.registry.resident()] == ["b"]
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == [] and [e.name for e in engine.registry.resident()] == ["b"]
    engine.generate("fox", "a", params)
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == ["a"]
    engine.shutdown()


@pytest.mark.parametrize("by_hand", ["unfuse and fuse", "unload, load and fuse"])
def test_an_auto_fused_adapter_fused_again_by_hand_is_the_admins(tiny_llama_dir, tmp_path, by_hand):
    """QA: ownership went by name and was only dropped at the next tick, so fusing it again by hand
    before then left the policy to unfuse it."""
    engine = auto_fuse_engine(tiny_llama_dir, tmp_path, ["a"])
    params = PARAMS
    auto_fused(engine, "a")
    if by_hand == "unfuse and fuse":
        engine.unfuse("a")
    else:
        engine.remove_adapter("a")
        engine.load_adapter("a", "a")
    engine.fuse("a")
    for _ in range(40):
        engine.generate("fox", None, params)
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == ["a"] and engine.stats().auto_fuse_decisions == 1
    engine.shutdown()


def test_one_submission_is_one_request_to_the_policy(tiny_llama_dir):
    """QA: one HTTP request with n = 4 alone met --auto-fuse-min-requests 4 and fused its adapter."""
    engine = auto_fuse_engine(tiny_llama_dir)
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.start()
    [h.result(timeout=60) for h in engine.submit_many([("fox", "hot", params)] * 4)]
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == []
    for _ in range(3):
        engine.generate("fox", "hot", params)
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == ["hot"]
    engine.shutdown()


def test_a_refused_fuse_changes_nothing_and_an_admin_unfuse_holds(tiny_llama_dir):
    """QA: an admin fuse of an auto-fused adapter (409, already fused) took it from the policy for good;
    an admin unfuse was undone by the policy a second later."""
    from s2ft_serve.errors import ConflictError

    engine = auto_fuse_engine(tiny_llama_dir, names=["a"])
    params = PARAMS
    auto_fused(engine, "a")
    with pytest.raises(ConflictError):
        engine.fuse("a")
    for _ in range(40):
        engine.generate("fox", None, params)
    engine.auto_fuse_tick()  # still the policy's: unfused once faded
    assert engine.stats().fused_adapters == []
    [h.result(timeout=60) for h in [engine.submit("fox", "a", params) for _ in range(80)]]
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == ["a"]
    engine.unfuse("a")  # by hand, while its traffic dominates
    engine.auto_fuse_tick()
    assert engine.stats().fused_adapters == []
    engine.shutdown()


def test_the_policys_own_unfuse_keeps_the_window(tiny_llama_dir):
    """QA: its unfuse forgot the adapter's requests too, so another adapter was fused at a share below
    --auto-fuse-share (60 %)."""
    engine = auto_fuse_engine(tiny_llama_dir, names=["a", "b"])
    auto_fused(engine, "a")  # 5 requests for a
    for adapter, n in (("b", 6), (None, 3)):
        [h.result(timeout=60) for h in [engine.submit("fox", adapter, PARAMS) for _ in range(n)]]
    engine.auto_fuse_tick()  # a at 5/14 = 36 %: unfused
    assert engine.stats().fused_adapters == []
    engine.auto_fuse_tick()  # b at 6/14 = 43 %: not fused (a's 5 forgotten, it was 6/9 = 67 %)
    assert engine.stats().fused_adapters == []
    engine.shutdown()
