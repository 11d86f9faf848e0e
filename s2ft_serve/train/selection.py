"""Which columns S²FT trains: per layer, a few attention heads and a few FFN channels.

A selected head contributes all `head_dim` columns of `o_proj` that belong to it. Heads are
chosen among the *query* heads (`num_attention_heads`), which is what `o_proj`'s input is made
of, so grouped-query attention needs no special case. A selected FFN channel is one column of
`down_proj`. The budget is uniform across layers, as the paper advises: either given directly
(heads / channels per layer) or derived from a trainable-parameter ratio split half to
attention and half to the FFN.

Strategies: `random` (seeded), `weight` (column norm), `activation` (mean input magnitude on a
calibration sample), `gradient` (weight-gradient column norm on that sample); the last three
take `largest` or `smallest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.model.loading import head_dim_of, target_linears
from s2ft_serve.train.data import label_tokens

STRATEGIES = ("random", "weight", "activation", "gradient")
ORDERS = ("largest", "smallest")


@dataclass
class Budget:
    """Heads of `o_proj` and channels of `down_proj` trained in every layer."""

    heads_per_layer: int
    channels_per_layer: int


@dataclass
class Selection:
    """The chosen columns: module name -> sorted original (unpermuted) column indices."""

    strategy: str
    order: str
    budget: Budget
    indices: dict[str, torch.Tensor]  # name -> [k] int64
    head_dim: int

    def num_parameters(self, out_features: dict[str, int]) -> int:
        return sum(out_features[name] * idx.numel() for name, idx in self.indices.items())

    def describe(self) -> dict:
        """What the adapter config records: strategy, budget, and the chosen heads / channels."""
        chosen: dict[str, list[int]] = {}
        for name, idx in sorted(self.indices.items()):
            values = idx.tolist()
            if name.endswith("o_proj"):
                values = sorted({i // self.head_dim for i in values})
            chosen[name] = values
        return {
            "strategy": self.strategy,
            "order": self.order if self.strategy != "random" else None,
            "heads_per_layer": self.budget.heads_per_layer,
            "channels_per_layer": self.budget.channels_per_layer,
            "head_dim": self.head_dim,
            "chosen": chosen,  # o_proj: head numbers; down_proj: channel numbers
        }


def budget_from_ratio(model: torch.nn.Module, ratio: float, attention_share: float = 0.5) -> Budget:
    """`ratio * total parameters`, `attention_share` of it to heads and the rest to channels, uniform
    across layers. A side with a non-zero share gets at least one head or channel per layer."""
    if not 0.0 < ratio <= 1.0:
        raise InvalidRequestError(f"--trainable-ratio must lie in (0, 1], got {ratio}")
    if not 0.0 <= attention_share <= 1.0:
        raise InvalidRequestError(f"--attention-share must lie in [0, 1], got {attention_share}")
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    linears = target_linears(model)
    o_projs = [m for n, m in linears.items() if n.endswith("o_proj")]
    downs = [m for n, m in linears.items() if n.endswith("down_proj")]
    per_head = sum(m.out_features for m in o_projs) * head_dim_of(cfg)  # one head in every layer
    per_channel = sum(m.out_features for m in downs)  # one channel in every layer

    def count(share: float, per_unit: int, most: int) -> int:
        return 0 if share == 0 else min(most, max(1, round(ratio * total * share / per_unit)))

    return Budget(heads_per_layer=count(attention_share, per_head, cfg.num_attention_heads),
                  channels_per_layer=count(1.0 - attention_share, per_channel, cfg.intermediate_size))


def check_budget(model: torch.nn.Module, budget: Budget) -> None:
    cfg = model.config
    if not 0 <= budget.heads_per_layer <= cfg.num_attention_heads:
        raise InvalidRequestError(
            f"--heads-per-layer must lie in [0, {cfg.num_attention_heads}] (query heads), got {budget.heads_per_layer}")
    if not 0 <= budget.channels_per_layer <= cfg.intermediate_size:
        raise InvalidRequestError(
            f"--channels-per-layer must lie in [0, {cfg.intermediate_size}], got {budget.channels_per_layer}")
    if budget.heads_per_layer + budget.channels_per_layer == 0:
        raise InvalidRequestError("the budget selects nothing: give at least one head or one channel per layer")


def select(model: torch.nn.Module, budget: Budget, strategy: str = "random", order: str = "largest",
           seed: int = 0, calibration: Iterable[dict] | None = None) -> Selection:
    """Choose the columns of every `o_proj` / `down_proj` for `budget` with `strategy`."""
    if strategy not in STRATEGIES:
        raise InvalidRequestError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if order not in ORDERS:
        raise InvalidRequestError(f"unknown selection order {order!r}; choose largest or smallest")
    check_budget(model, budget)
    head_dim = head_dim_of(model.config)
    linears = target_linears(model)
    if strategy == "random":
        scores = _random_scores(linears, seed)
    elif strategy == "weight":
        scores = {name: m.weight.detach().float().norm(dim=0) for name, m in linears.items()}
    elif strategy == "activation":
        scores = _activation_scores(model, linears, _need(calibration, strategy))
    else:
        scores = _gradient_scores(model, linears, _need(calibration, strategy))
    indices: dict[str, torch.Tensor] = {}
    for name, col_scores in scores.items():
        col_scores = col_scores if order == "largest" or strategy == "random" else -col_scores
        if name.endswith("o_proj"):
            index = _top_heads(col_scores, head_dim, budget.heads_per_layer)
        else:
            index = _top_columns(col_scores, budget.channels_per_layer)
        if index.numel():
            indices[name] = index
    return Selection(strategy=strategy, order=order, budget=budget, indices=indices, head_dim=head_dim)


def _need(calibration: Iterable[dict] | None, strategy: str) -> Iterable[dict]:
    if calibration is None:
        raise InvalidRequestError(f"selection strategy {strategy!r} needs calibration data")
    return calibration


def _top_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.topk(scores.float().cpu(), k).indices.sort().values.to(torch.int64)


def _top_heads(scores: torch.Tensor, head_dim: int, heads: int) -> torch.Tensor:
    """Rank heads by the mean score of their `head_dim` columns; return all their columns."""
    if heads == 0:
        return torch.empty(0, dtype=torch.int64)
    per_head = scores.float().cpu().reshape(-1, head_dim).mean(dim=1)  # [num_heads]
    chosen = torch.topk(per_head, heads).indices.sort().values
    return (chosen[:, None] * head_dim + torch.arange(head_dim)[None]).reshape(-1).to(torch.int64)


def _random_scores(linears: dict[str, torch.nn.Linear], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.in_features, generator=g) for name, m in sorted(linears.items())}


def _activation_scores(model: torch.nn.Module, linears: dict[str, torch.nn.Linear],
                       calibration: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Mean |input feature| of each target Linear over the calibration tokens (padding left out, so the
    scores do not depend on how the sample is batched)."""
    sums = {name: torch.zeros(m.in_features) for name, m in linears.items()}
    counts = {"tokens": 0}
    real: dict[str, torch.Tensor | None] = {"mask": None}  # the batch's real tokens, flat

    def hook_for(name: str) -> Callable:
        def hook(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            if real["mask"] is not None:
                x = x[real["mask"]]
            sums[name] += x.abs().sum(dim=0).cpu()
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in calibration:
                mask = batch.get("attention_mask")
                real["mask"] = None if mask is None else mask.reshape(-1).bool()
                model(input_ids=batch["input_ids"], attention_mask=mask)
                counts["tokens"] += batch["input_ids"].numel() if mask is None else int(real["mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return {name: s / max(1, counts["tokens"]) for name, s in sums.items()}


def _gradient_scores(model: torch.nn.Module, linears: dict[str, torch.nn.Linear],
                     calibration: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Column norms of the weight gradient of the training loss on the calibration sample: the mean over
    its label tokens, each batch's mean loss weighted by its share of them (so not how it is batched)."""
    was = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    calibration = list(calibration)
    labelled = [label_tokens(batch) for batch in calibration]
    try:
        for batch, n in zip(calibration, labelled):
            if not n:
                continue
            out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                        labels=batch["labels"])
            (out.loss * (n / sum(labelled))).backward()
        scores = {name: (m.weight.grad.float().norm(dim=0) if m.weight.grad is not None
                         else torch.zeros(m.in_features)) for name, m in linears.items()}
    finally:
        for m in linears.values():
            m.weight.grad = None
        for p in model.parameters():
            p.requires_grad_(was[id(p)])
    return scores
