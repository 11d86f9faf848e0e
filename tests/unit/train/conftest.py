"""Fixtures for the trainer tests: a tiny learnable task in JSONL."""

from __future__ import annotations

import json
import random

import pytest


def write_task(path, n: int = 48, seed: int = 0):
    """Prompt/completion pairs with a deterministic answer ("<word> ->" maps to a fixed word)."""
    words = ["fox", "dog", "world", "answer", "tiny", "test", "sparse", "column"]
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = r.choice(words)
            f.write(json.dumps({"prompt": f"{w} ->", "completion": f" {words[(words.index(w) + 3) % 8]}"}) + "\n")
    return path


@pytest.fixture
def task_file(tmp_path):
    return write_task(tmp_path / "train.jsonl")


@pytest.fixture
def val_file(tmp_path):
    return write_task(tmp_path / "val.jsonl", n=16, seed=1)
