"""`s2ft-train` under torchrun: 2 CPU processes (gloo) train one adapter in format v1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from s2ft_serve.adapters.format import linear_shapes, load_adapter
from s2ft_serve.model.loading import load_model, target_linears
from s2ft_serve.train.config import TrainConfig
from s2ft_serve.train.trainer import train


@pytest.mark.parametrize("length", [{"max_steps": 4}, {"epochs": 1.5, "grad_accum": 4}],
                         ids=["steps", "epochs-with-a-short-last-step"])
def test_two_process_torchrun_produces_a_valid_adapter(tiny_llama_dir, tmp_path, length):
    """(QA: a last step shorter than --grad-accum never synced the processes' gradients.)"""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w} ->", "completion": f" {w[::-1]}"}) + "\n"
                            for w in ["fox", "dog", "world", "tiny", "test", "sparse", "column"] * 4))
    out = tmp_path / "adapter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "s2ft_serve.train.cli", "--model", str(tiny_llama_dir), "--data", str(data),
           "--output", str(out), "--batch-size", "4", "--device", "cpu", "--no-progress", "--save-every", "2",
           *[arg for key, value in length.items() for arg in (f"--{key.replace('_', '-')}", str(value))]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = summary["steps"]
    assert steps == (4 if "max_steps" in length else 2)  # 28 rows, 8 a global batch: 6 micro-batches in 1.5 epochs
    loaded = load_model(tiny_llama_dir)
    adapter = load_adapter(out, linear_shapes(target_linears(loaded.model)), loaded.fingerprint)
    assert adapter.config["training"]["world_size"] == 2
    assert all(bool((md.delta != 0).any()) for md in adapter.modules.values())
    assert (out / "checkpoints" / f"step-{steps}" / "state.json").is_file()
    # the same global batches in one process: the same adapter (every label token weighs the same, on
    # whichever process; QA: rows of different lengths gave another adapter when each process's mean did)
    one = train(TrainConfig(model=str(tiny_llama_dir), data=str(data), output=str(tmp_path / "one"), batch_size=8,
                            device="cpu", progress=False, **length))
    for name, md in load_adapter(one.path).modules.items():
        assert torch.equal(md.index, adapter.modules[name].index)
        torch.testing.assert_close(md.delta, adapter.modules[name].delta, rtol=0, atol=1e-6)
