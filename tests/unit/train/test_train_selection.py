"""Column selection: budgets, per-layer heads among query heads (GQA), and every strategy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.model.loading import target_linears
from s2ft_serve.train.selection import Budget, budget_from_ratio, select


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _calibration(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def test_budget_from_ratio_splits_half_and_half(model):
    total = sum(p.numel() for p in model.parameters())
    b = budget_from_ratio(model, 0.05)
    layers = model.config.num_hidden_layers
    heads_params = b.heads_per_layer * 16 * 64 * layers
    channel_params = b.channels_per_layer * 64 * layers
    assert abs(heads_params - 0.025 * total) <= 16 * 64 * layers / 2 + 1
    assert abs(channel_params - 0.025 * total) <= 64 * layers / 2 + 1
    with pytest.raises(InvalidRequestError):
        budget_from_ratio(model, 0.0)


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_attention_share_moves_the_budget_between_heads_and_channels(model, share):
    total = sum(p.numel() for p in model.parameters())
    layers = model.config.num_hidden_layers
    b = budget_from_ratio(model, 0.05, attention_share=share)
    assert (b.heads_per_layer == 0) == (share == 0) and (b.channels_per_layer == 0) == (share == 1)
    assert abs(b.heads_per_layer * 16 * 64 * layers - share * 0.05 * total) <= 16 * 64 * layers / 2 + 1
    assert abs(b.channels_per_layer * 64 * layers - (1 - share) * 0.05 * total) <= 64 * layers / 2 + 1
    assert budget_from_ratio(model, 0.05) == budget_from_ratio(model, 0.05, attention_share=0.5)
    with pytest.raises(InvalidRequestError, match="--attention-share"):
        budget_from_ratio(model, 0.05, attention_share=1.5)


@pytest.mark.parametrize("strategy", ["random", "weight", "activation", "gradient"])
def test_every_strategy_gives_whole_heads_and_channels_per_layer(model, strategy):
    sel = select(model, Budget(heads_per_layer=3, channels_per_layer=5), strategy, "largest", 0, _calibration(model))
    linears = target_linears(model)
    assert set(sel.indices) == set(linears)
    for name, idx in sel.indices.items():
        assert idx.dtype == torch.int64 and torch.unique(idx).numel() == idx.numel()
        if name.endswith("o_proj"):
            heads = idx.reshape(-1, 16)
            assert heads.shape[0] == 3  # 3 of the 4 *query* heads although there are only 2 KV heads
            assert torch.equal(heads - heads[:, :1], torch.arange(16).expand(3, 16))
            assert int(idx.max()) < 4 * 16
        else:
            assert idx.numel() == 5
    assert sel.describe()["chosen"]["model.layers.0.self_attn.o_proj"] == sorted(
        {i // 16 for i in sel.indices["model.layers.0.self_attn.o_proj"].tolist()})


def test_random_is_seeded(model):
    a = select(model, Budget(1, 4), "random", seed=1)
    b = select(model, Budget(1, 4), "random", seed=1)
    c = select(model, Budget(1, 4), "random", seed=2)
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)
    assert any(not torch.equal(a.indices[n], c.indices[n]) for n in a.indices)


def test_weight_strategy_picks_largest_or_smallest_norm_columns(model):
    name = "model.layers.1.mlp.down_proj"
    norms = target_linears(model)[name].weight.norm(dim=0)
    big = select(model, Budget(0, 3), "weight", "largest").indices[name]
    small = select(model, Budget(0, 3), "weight", "smallest").indices[name]
    assert set(big.tolist()) == set(torch.topk(norms, 3).indices.tolist())
    assert set(small.tolist()) == set(torch.topk(-norms, 3).indices.tolist())


def test_activation_and_gradient_need_calibration_and_differ_by_order(model):
    with pytest.raises(InvalidRequestError, match="calibration"):
        select(model, Budget(1, 2), "gradient")
    cal = _calibration(model)
    hi = select(model, Budget(1, 4), "activation", "largest", calibration=cal)
    lo = select(model, Budget(1, 4), "activation", "smallest", calibration=cal)
    name = "model.layers.0.mlp.down_proj"
    assert not set(hi.indices[name].tolist()) & set(lo.indices[name].tolist())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # gradient scoring cleans up


def test_zero_heads_leaves_o_proj_out_and_bad_budgets_refused(model):
    sel = select(model, Budget(0, 2), "random")
    assert all(n.endswith("down_proj") for n in sel.indices)
    with pytest.raises(InvalidRequestError, match="heads-per-layer"):
        select(model, Budget(5, 2), "random")
    with pytest.raises(InvalidRequestError, match="selects nothing"):
        select(model, Budget(0, 0), "random")
    with pytest.raises(InvalidRequestError, match="unknown selection strategy"):
        select(model, Budget(1, 1), "magic")
