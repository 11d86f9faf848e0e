"""Checkpoints in the S²FT reference code's layout: permuted heads/channels are recovered and undone.

`_permute_like_reference` reproduces what the authors' `convert_mha_layer_to_s2` /
`convert_ffn_layer_to_s2` do before training (selected heads / channels moved to the front;
q/k/v reshaped by num_key_value_heads and gate/up rows, o/down columns reordered), and
`_train_front` plays the training of the front o_proj/down_proj columns; the merged model is
saved in that permuted order, as their `save_hf_format` does (here as safetensors).
"""

from __future__ import annotations

import json

import pytest
import torch

from s2ft_serve.adapters.extract import PERMUTATION_FILE, extract_adapter
from s2ft_serve.adapters.format import load_adapter, merge_into
from s2ft_serve.adapters.permutation import match_rows, unpermute
from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.model.testing import make_tiny_model

SELECTED_HEADS = {0: [2], 1: [3, 1]}
SELECTED_CHANNELS = {0: [100, 5, 64], 1: [7]}


def _order(selected: list[int], size: int) -> list[int]:
    return selected + [j for j in range(size) if j not in selected]


@pytest.fixture(scope="module")
def mha_base_dir(tmp_path_factory):
    """A tiny Llama with as many key/value heads as query heads (the reference code needs MHA)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-mha"), "llama", seed=3, kv_heads=4)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _permute_like_reference(model, heads: dict[int, list[int]], channels: dict[int, list[int]]) -> None:
    cfg = model.config
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if i in heads:
                order = _order(heads[i], cfg.num_attention_heads)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    w = proj.weight.data.reshape(cfg.num_key_value_heads, -1, proj.weight.shape[-1])
                    proj.weight.data = w[order, :, :].reshape(-1, w.shape[-1])
                o = attn.o_proj.weight.data.reshape(attn.o_proj.weight.shape[0], cfg.num_attention_heads, -1)
                attn.o_proj.weight.data = o[:, order, :].reshape(o.shape[0], -1)
            if i in channels:
                order = _order(channels[i], cfg.intermediate_size)
                mlp.up_proj.weight.data = mlp.up_proj.weight.data[order, :]
                mlp.gate_proj.weight.data = mlp.gate_proj.weight.data[order, :]
                mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, order]


def _train_front(model, heads: dict[int, list[int]], channels: dict[int, list[int]]) -> None:
    """What S2RowLinear.fuse_s2_weight leaves behind: the front columns changed."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for module, k in ((layer.self_attn.o_proj, len(heads.get(i, [])) * head_dim),
                              (layer.mlp.down_proj, len(channels.get(i, [])))):
                module.weight[:, :k] += 0.05 * torch.randn(module.weight.shape[0], k, generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_reference_checkpoint_round_trips_through_extract(mha_base_dir, tmp_path):
    tuned = _load(mha_base_dir)
    _permute_like_reference(tuned, SELECTED_HEADS, SELECTED_CHANNELS)
    _train_front(tuned, SELECTED_HEADS, SELECTED_CHANNELS)
    tuned.save_pretrained(tmp_path / "tuned")

    report = extract_adapter(mha_base_dir, tmp_path / "tuned", tmp_path / "adapter")

    heads = tuned.config.num_attention_heads
    assert sorted(report.permutations) == [0, 1]
    for layer in (0, 1):
        perm = report.permutations[layer]
        assert perm.heads == _order(SELECTED_HEADS[layer], heads)
        assert perm.kv_heads == perm.heads
        assert perm.channels == _order(SELECTED_CHANNELS[layer], tuned.config.intermediate_size)
    adapter = load_adapter(tmp_path / "adapter")
    head_dim = tuned.config.hidden_size // heads
    o_index = adapter.modules["model.layers.1.self_attn.o_proj"].index.tolist()
    assert o_index == sorted(h * head_dim + c for h in SELECTED_HEADS[1] for c in range(head_dim))
    assert adapter.modules["model.layers.0.mlp.down_proj"].index.tolist() == sorted(SELECTED_CHANNELS[0])
    assert adapter.config["extracted_from"]["permuted_layers"] == [0, 1]
    written = json.loads((tmp_path / "adapter" / PERMUTATION_FILE).read_text())
    assert written["layers"]["1"]["heads"] == _order(SELECTED_HEADS[1], heads)

    # behaviour: base + extracted adapter computes what the permuted fine-tuned checkpoint computes
    base = _load(mha_base_dir)
    merge_into(base, adapter)
    ids = torch.tensor([[5, 17, 3, 250, 41, 8, 77]])
    torch.testing.assert_close(_logits(base, ids), _logits(tuned, ids), atol=1e-5, rtol=0)


def test_ffn_only_permutation_on_a_gqa_model(tiny_llama_dir, tmp_path):
    """The reference Llama-3 recipe trains down_proj only: channels permuted, heads in place."""
    tuned = _load(tiny_llama_dir)
    _permute_like_reference(tuned, {}, SELECTED_CHANNELS)
    _train_front(tuned, {}, SELECTED_CHANNELS)
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract_adapter(tiny_llama_dir, tmp_path / "tuned", tmp_path / "adapter")
    assert all(p.heads is None and p.kv_heads is None for p in report.permutations.values())
    assert report.permutation_summary()["0"]["channels"]["moved"] > 0
    adapter = load_adapter(tmp_path / "adapter")
    assert set(adapter.modules) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    base = _load(tiny_llama_dir)
    merge_into(base, adapter)
    ids = torch.tensor([[9, 8, 7, 6, 5]])
    torch.testing.assert_close(_logits(base, ids), _logits(tuned, ids), atol=1e-5, rtol=0)


def test_permuted_checkpoint_with_a_trained_v_proj_is_refused(mha_base_dir, tmp_path):
    tuned = _load(mha_base_dir)
    _permute_like_reference(tuned, SELECTED_HEADS, {})
    with torch.no_grad():
        tuned.model.layers[0].self_attn.v_proj.weight[:4] += 0.05  # v_ratio > 0 in the reference code
    tuned.save_pretrained(tmp_path / "tuned")
    with pytest.raises(InvalidRequestError, match="model.layers.0.self_attn.v_proj.weight"):
        extract_adapter(mha_base_dir, tmp_path / "tuned", tmp_path / "adapter")


def test_inconsistent_query_and_key_value_head_orders_are_refused(tiny_llama_dir, tmp_path):
    tuned = _load(tiny_llama_dir)
    q = tuned.model.layers[0].self_attn.q_proj
    head_dim = tuned.config.head_dim
    with torch.no_grad():  # swap query heads 0 and 3 (different kv groups) but leave k/v alone
        blocks = q.weight.data.reshape(-1, head_dim, q.weight.shape[1])
        q.weight.data = blocks[[3, 1, 2, 0]].reshape(q.weight.shape)
    tuned.save_pretrained(tmp_path / "tuned")
    with pytest.raises(InvalidRequestError, match="inconsistently"):
        extract_adapter(tiny_llama_dir, tmp_path / "tuned", tmp_path / "adapter")


def test_match_rows_and_unpermute_are_inverse():
    base = torch.randn(50, 7)
    order = torch.randperm(50).tolist()
    tuned = base[order]
    assert match_rows(tuned, base, 0.0) == order
    assert torch.equal(unpermute(tuned, order, dim=0), base)
    assert match_rows(base, base, 0.0) == list(range(50))
    changed = tuned.clone()
    changed[4, 2] += 1.0
    assert match_rows(changed, base, 1e-6) is None
    columns = torch.randn(3, 6)  # [3, 6]: three column blocks of 2
    block_order = [2, 0, 1]
    permuted = columns.reshape(3, 3, 2)[:, block_order, :].reshape(3, 6)
    assert torch.equal(unpermute(permuted, block_order, dim=1, block=2), columns)


def test_cli_extract_reports_the_permutation(mha_base_dir, tmp_path, capsys):
    from s2ft_serve.adapters.cli import main

    tuned = _load(mha_base_dir)
    _permute_like_reference(tuned, SELECTED_HEADS, SELECTED_CHANNELS)
    _train_front(tuned, SELECTED_HEADS, SELECTED_CHANNELS)
    tuned.save_pretrained(tmp_path / "tuned")
    assert main(["extract", "--base", str(mha_base_dir), "--tuned", str(tmp_path / "tuned"),
                 "--out", str(tmp_path / "adapter")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "permuted" in lines[1] and "2 layer(s)" in lines[1]
    summary = json.loads(lines[-1])["permutation"]
    assert summary["1"]["heads"]["first_moved"][0] == [0, 3]  # position 0 holds base head 3


def test_channels_with_equal_gate_rows_are_matched_on_their_up_rows_too(tmp_path):
    """QA: channels were matched on gate_proj rows alone; where two channels' gate rows are equal (dead
    or pruned channels) a genuine reference checkpoint was refused as "fine-tuned in another way"."""
    base_dir = make_tiny_model(tmp_path / "base", "llama", seed=5)
    base = _load(base_dir)
    with torch.no_grad():
        for layer in base.model.layers:
            layer.mlp.gate_proj.weight[1] = layer.mlp.gate_proj.weight[0]  # channels 0 and 1: the same gate row
    base.save_pretrained(base_dir)
    tuned = _load(base_dir)
    channels = {0: [1, 9], 1: [1]}
    _permute_like_reference(tuned, {}, channels)
    _train_front(tuned, {}, channels)
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract_adapter(base_dir, tmp_path / "tuned", tmp_path / "adapter")
    assert report.permutations[1].channels == _order([1], tuned.config.intermediate_size)
    merge_into(base, load_adapter(tmp_path / "adapter"))
    ids = torch.tensor([[9, 8, 7, 6, 5]])
    torch.testing.assert_close(_logits(base, ids), _logits(tuned, ids), atol=1e-5, rtol=0)
