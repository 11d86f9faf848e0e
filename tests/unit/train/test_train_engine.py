"""A trained adapter served through the engine reproduces the trainer's own logits (fp32)."""

from __future__ import annotations

import torch

from s2ft_serve.adapters.format import load_adapter
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.model.testing import device_under_test
from s2ft_serve.train.config import TrainConfig
from s2ft_serve.train.trainer import train


def test_engine_serves_trained_adapter_with_trainer_logits(tiny_model_dir, task_file, tmp_path):
    res = train(TrainConfig(model=str(tiny_model_dir), data=str(task_file), output=str(tmp_path / "a"),
                            device=device_under_test(), max_steps=10, learning_rate=2e-2, heads_per_layer=2,
                            channels_per_layer=8, strategy="gradient", progress=False))
    ids = [5, 17, 33, 2, 90, 41, 7, 12]
    with torch.no_grad():
        want = res.model(input_ids=torch.tensor([ids], device=res.model.device)).logits[0].float().cpu()
    engine = Engine(EngineConfig(model=str(tiny_model_dir), dtype="float32", device=device_under_test())).start()
    try:
        engine.add_adapter("a", load_adapter(res.path))
        got = engine.logits(ids, adapter="a")
        base = engine.logits(ids)
    finally:
        engine.shutdown()
    assert (got - want).abs().max() <= 1e-4
    assert (base - want).abs().max() > 1e-3  # the adapter really changes the output
