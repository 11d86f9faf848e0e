"""Shared by the training benchmarks: put a model in S²FT, LoRA or full fine-tuning mode.

The LoRA rank is chosen so that LoRA on the same modules (o_proj, down_proj) has the trainable
parameter count closest to S²FT's, as the issue asks ("equal trainable-parameter count").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s2ft_serve.model.loading import target_linears
from s2ft_serve.train.selection import Budget, Selection, budget_from_ratio, select
from s2ft_serve.train.sparse_linear import wrap_linears

METHODS = ("s2ft", "lora", "full")


@dataclass
class Prepared:
    name: str
    model: torch.nn.Module  # the module to call (a PEFT wrapper for LoRA)
    params: list[torch.nn.Parameter]  # what the optimizer updates
    detail: str  # e.g. "rank 18" or "1 head + 39 channels per layer"

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def s2ft_selection(model: torch.nn.Module, ratio: float, seed: int, strategy: str = "random",
                   calibration: list[dict] | None = None, budget: Budget | None = None) -> Selection:
    """S²FT's columns; `strategy` is `random` or `<weight|activation|gradient>-<largest|smallest>`;
    `budget` (heads and channels per layer) replaces the one `ratio` gives."""
    name, _, order = strategy.partition("-")
    return select(model, budget or budget_from_ratio(model, ratio), name, order=order or "largest", seed=seed,
                  calibration=calibration)


def matching_lora_rank(model: torch.nn.Module, params: int) -> int:
    per_rank = sum(m.in_features + m.out_features for m in target_linears(model).values())
    return max(1, round(params / per_rank))


def prepare(method: str, model: torch.nn.Module, ratio: float = 0.01, seed: int = 0, strategy: str = "random",
            calibration: list[dict] | None = None, budget: Budget | None = None) -> Prepared:
    """Freeze / wrap `model` for `method`; return what to call and what to optimize. `strategy`,
    `calibration` (batches for the activation / gradient strategies) and `budget` choose S²FT's
    columns (LoRA's rank always matches the parameter count of `ratio`'s S²FT budget)."""
    sel = (s2ft_selection(model, ratio, seed, strategy, calibration, budget) if method == "s2ft"
           else s2ft_selection(model, ratio, seed))
    outs = {n: m.out_features for n, m in target_linears(model).items()}
    s2ft_params = sel.num_parameters(outs)
    if method == "s2ft":
        layers = wrap_linears(model, sel.indices)
        detail = (f"{sel.budget.heads_per_layer} head(s) + {sel.budget.channels_per_layer} channels per layer, "
                  f"{strategy} selection")
        return Prepared(method, model, [layer.delta for layer in layers.values()], detail)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        rank = matching_lora_rank(model, s2ft_params)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["o_proj", "down_proj"])
        peft_model = get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return Prepared(method, peft_model, params, f"rank {rank} on o_proj + down_proj")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Prepared(method, model, list(model.parameters()), "all parameters")
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def train_step(prep: Prepared, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               max_grad_norm: float = 1.0) -> float:
    """One AdamW step on `batch`; returns the loss."""
    out = prep.model(**batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(prep.params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())
