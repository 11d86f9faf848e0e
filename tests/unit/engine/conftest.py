"""Engine fixtures: an engine over a tiny model with three random adapters."""

from __future__ import annotations

import pytest
from engine_reference import make_engine

from s2ft_serve.model.testing import random_adapter


@pytest.fixture
def engine(tiny_model_dir):
    e = make_engine(tiny_model_dir, max_batch_size=8)
    yield e
    e.shutdown(timeout=5)


@pytest.fixture
def adapters(engine):
    """Three random adapters a0, a1, a2 added to the engine; returns {name: Adapter}."""
    made = {f"a{i}": random_adapter(engine.loaded.model, engine.model_name, seed=10 + i, channels=6 + 3 * i)
            for i in range(3)}
    for name, adapter in made.items():
        engine.add_adapter(name, adapter)
    return made
