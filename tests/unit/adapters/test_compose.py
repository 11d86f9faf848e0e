"""Merge semantics: weighted sum over the union of indices, valid format v1, refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from s2ft_serve.adapters.compose import merge_adapters
from s2ft_serve.adapters.format import (
    Adapter,
    ModuleDelta,
    linear_shapes,
    load_adapter,
    make_config,
    merge_into,
    save_adapter,
)
from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.model.loading import load_model, target_linears
from s2ft_serve.model.testing import random_adapter

O = "model.layers.0.self_attn.o_proj"
D = "model.layers.0.mlp.down_proj"


def _adapter(modules: dict[str, tuple[list[int], torch.Tensor]], fingerprint: str | None = None) -> Adapter:
    mods = {n: ModuleDelta(index=torch.tensor(i, dtype=torch.int64), delta=d) for n, (i, d) in modules.items()}
    return Adapter(config=make_config("base", fingerprint), modules=mods)


def test_overlapping_indices_sum_and_disjoint_ones_concatenate():
    da, db = torch.randn(3, 2), torch.randn(3, 2)
    a = _adapter({O: ([5, 1], da)})
    b = _adapter({O: ([1, 7], db)})
    merged = merge_adapters([(a, 2.0), (b, -0.5)], "base", None)
    md = merged.modules[O]
    assert md.index.tolist() == [1, 5, 7]
    torch.testing.assert_close(md.delta[:, 0], 2.0 * da[:, 1] - 0.5 * db[:, 0])  # column 1: both
    torch.testing.assert_close(md.delta[:, 1], 2.0 * da[:, 0])  # column 5: only a
    torch.testing.assert_close(md.delta[:, 2], -0.5 * db[:, 1])  # column 7: only b


def test_modules_of_only_one_source_are_kept_scaled():
    da, db = torch.randn(4, 1), torch.randn(4, 3)
    merged = merge_adapters([(_adapter({O: ([2], da)}), 1.0), (_adapter({D: ([0, 9, 4], db)}), 3.0)], "base", None)
    assert set(merged.modules) == {O, D}
    assert merged.modules[D].index.tolist() == [0, 4, 9]
    torch.testing.assert_close(merged.modules[D].delta, 3.0 * db[:, [0, 2, 1]])
    torch.testing.assert_close(merged.modules[O].delta, da)


def test_merged_adapter_equals_applying_each_source(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    fp = loaded.fingerprint
    a = random_adapter(loaded.model, "tiny", seed=1, heads=2, channels=9, fingerprint=fp)
    b = random_adapter(loaded.model, "tiny", seed=2, heads=1, channels=20, fingerprint=fp)
    merged = merge_adapters([(a, 0.7), (b, 1.3)], "tiny", fp, names=["a", "b"])
    one, both = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    merge_into(one, merged)
    merge_into(both, a, 0.7)
    merge_into(both, b, 1.3)
    for (name, p1), (_, p2) in zip(one.named_parameters(), both.named_parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0, msg=name)
    # valid format v1: saves and loads back against the base's shapes and fingerprint
    save_adapter(merged, tmp_path / "m")
    back = load_adapter(tmp_path / "m", linear_shapes(target_linears(loaded.model)), base_fingerprint=fp)
    assert back.config["merged_from"] == [
        {"adapter": "a", "weight": 0.7, "base_model": "tiny"},
        {"adapter": "b", "weight": 1.3, "base_model": "tiny"},
    ]
    assert back.fingerprint == fp


def test_half_precision_sources_stay_half_precision_where_it_holds_the_sums():
    """QA: weighted sums of bfloat16 sources were rounded to bfloat16 (served 2e-3 to 7e-2 in logits from the
    summed deltas); a sum bfloat16 cannot hold keeps float32 (the engine then serves that module from a
    float32 table), one it holds stays bfloat16."""
    a = _adapter({O: ([0, 1], torch.randn(2, 2).to(torch.bfloat16))})
    b = _adapter({O: ([2], torch.randn(2, 1).to(torch.bfloat16))})
    assert merge_adapters([(a, 1.0), (b, -1.0)], "base", None).modules[O].delta.dtype == torch.bfloat16
    b = _adapter({O: ([1], torch.randn(2, 1).to(torch.bfloat16))})
    merged = merge_adapters([(a, 0.3), (b, 0.7)], "base", None).modules[O]
    expected = a.modules[O].delta.float() * 0.3
    expected[:, 1] += b.modules[O].delta[:, 0].float() * 0.7
    assert merged.delta.dtype == torch.float32 and torch.equal(merged.delta, expected)


def test_fingerprint_is_inherited_and_conflicts_are_refused():
    a = _adapter({O: ([0], torch.ones(2, 1))}, fingerprint="sha256:aaa")
    b = _adapter({O: ([1], torch.ones(2, 1))})
    assert merge_adapters([(a, 1.0), (b, 1.0)], "base", None).fingerprint == "sha256:aaa"
    c = _adapter({O: ([1], torch.ones(2, 1))}, fingerprint="sha256:ccc")
    with pytest.raises(InvalidRequestError, match="different base weights"):
        merge_adapters([(a, 1.0), (c, 1.0)], "base", None)
    with pytest.raises(InvalidRequestError, match="other base weights"):
        merge_adapters([(a, 1.0)], "base", "sha256:bbb")


@pytest.mark.parametrize(
    "sources, message",
    [
        ([], "at least one"),
        ([(_adapter({O: ([0], torch.ones(2, 1))}), float("nan"))], "finite"),
        ([(_adapter({O: ([0], torch.ones(2, 1))}), 1.0), (_adapter({O: ([1], torch.ones(3, 1))}), 1.0)],
         "different out_features"),
    ],
)
def test_bad_merges_are_refused(sources, message):
    with pytest.raises(InvalidRequestError, match=message):
        merge_adapters(sources, "base", None)
