"""Learning-rate schedule and per-process batches of the training loop."""

from __future__ import annotations

import pytest

from s2ft_serve.train.config import TrainConfig
from s2ft_serve.train.data import Example
from s2ft_serve.train.loop import World, lr_factor, rank_batch, total_steps


def test_warmup_then_cosine_linear_constant():
    assert [lr_factor(s, 10, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4, "cosine") == pytest.approx(1.0)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(7, 10, 4, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 10, 4, "constant") == 1.0


def test_processes_split_each_global_batch_without_overlap():
    rows = [Example([i, i + 1], [i, i + 1]) for i in range(10)]
    cfg = TrainConfig(data="x", output="y", batch_size=2, seed=3)
    seen = []
    for rank in range(2):
        batch = rank_batch(rows, cfg, World(rank=rank, size=2), micro=0, pad_id=0, device="cpu")
        seen += batch["input_ids"][:, 0].tolist()
    assert len(seen) == 4 and len(set(seen)) == 4
    assert total_steps(cfg, 10, World(size=2)) == 3  # ceil(10 / (2 * 2)) micro-batches per epoch
    cfg.max_steps = 7
    assert total_steps(cfg, 10, World(size=2)) == 7


def test_an_epoch_is_one_pass_whatever_the_accumulation():
    """QA: with --grad-accum not dividing an epoch's micro-batches, the last step took the next epoch's
    batches (a 1-epoch run trained 8 of 24 rows twice); it takes only what is left."""
    from s2ft_serve.train.loop import total_micro_batches

    cfg = TrainConfig(data="x", output="y", batch_size=4, grad_accum=4, epochs=1)
    assert total_micro_batches(cfg, 24, World()) == 6 and total_steps(cfg, 24, World()) == 2
    cfg.epochs = 2.5
    assert total_micro_batches(cfg, 24, World()) == 15 and total_steps(cfg, 24, World()) == 4


def test_options_that_would_overflow_are_refused_up_front_and_the_bounds_work():
    """QA: --epochs 1e308 --batch-size 1 passed the checks, then the step count overflowed (OverflowError:
    cannot convert float infinity to integer); --learning-rate 1e38 overflowed inside AdamW (RuntimeError).
    Both are flag errors that say why; the largest values allowed still give a step count and an AdamW step."""
    import math

    import torch

    from s2ft_serve.errors import InvalidRequestError

    for field, value in (("epochs", 1e308), ("epochs", math.inf), ("learning_rate", 1e38), ("learning_rate", math.inf)):
        cfg = TrainConfig(data="x", output="y", batch_size=1, **{field: value})
        with pytest.raises(InvalidRequestError, match=f"--{field.replace('_', '-')} must lie in .*got .* \\(.*\\w"):
            cfg.validate()
    cfg = TrainConfig(data="x", output="y", batch_size=1, epochs=1e6)  # the largest allowed
    cfg.validate()
    assert total_steps(cfg, 10**6, World()) == 10**12
    cfg = TrainConfig(data="x", output="y", learning_rate=100, adam_beta1=1 - 2**-53)  # the largest allowed
    cfg.validate()
    delta = torch.nn.Parameter(torch.zeros(4))
    delta.grad = torch.full((4,), 1e-3)
    torch.optim.AdamW([delta], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2)).step()
    assert bool(torch.isfinite(delta).all())
