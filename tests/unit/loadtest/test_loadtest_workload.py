"""Popularity sampling, length distributions and request generation of the load tester."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loadtest.errors import LoadtestConfigError
from loadtest.workload import (
    AdapterSampler,
    LengthDist,
    Popularity,
    WorkloadSpec,
    generate_requests,
    poisson_gaps,
)

NAMES = [f"a{i}" for i in range(8)]


def draw(popularity: str, n: int = 40_000, names: list = NAMES) -> Counter:
    sampler = AdapterSampler(names, Popularity.parse(popularity))
    rng = random.Random(1)
    return Counter(sampler.sample(rng) for _ in range(n))


def test_uniform_spreads_evenly():
    counts = draw("uniform")
    assert set(counts) == set(NAMES)
    for name in NAMES:
        assert abs(counts[name] / 40_000 - 1 / 8) < 0.01


def test_single_sends_everything_to_the_first():
    assert draw("single") == Counter({"a0": 40_000})


@pytest.mark.parametrize("alpha", [0.8, 1.2, 2.0])
def test_zipf_matches_its_law(alpha):
    counts = draw(f"zipf:{alpha}")
    norm = sum(1 / r**alpha for r in range(1, 9))
    for rank, name in enumerate(NAMES, start=1):
        expected = (1 / rank**alpha) / norm
        assert abs(counts[name] / 40_000 - expected) < 0.01, (name, counts[name], expected)
    assert counts["a0"] > counts["a1"] > counts["a3"]


def test_the_base_model_is_a_name_like_any_other():
    counts = draw("uniform", n=4000, names=[None, "x"])
    assert set(counts) == {None, "x"}


@pytest.mark.parametrize("bad", ["zipf:abc", "zipf:-1", "zipf:0", "pareto", "zipf:inf"])
def test_bad_popularity_is_refused_clearly(bad):
    with pytest.raises(LoadtestConfigError, match="popularity"):
        Popularity.parse(bad)


def test_zipf_default_alpha_is_one():
    assert Popularity.parse("ZIPF") == Popularity("zipf", 1.0)


def test_lengths():
    rng = random.Random(0)
    assert LengthDist.parse("17").sample(rng) == 17
    values = [LengthDist.parse("uniform:4:9").sample(rng) for _ in range(2000)]
    assert min(values) == 4 and max(values) == 9
    normal = [LengthDist.parse("normal:50:10").sample(rng) for _ in range(4000)]
    assert abs(sum(normal) / len(normal) - 50) < 1.5
    assert LengthDist.parse("normal:0:50").sample(random.Random(3), minimum=1) >= 1


@pytest.mark.parametrize("bad", ["x", "uniform:9:4", "uniform:3", "normal:-5:1", "gamma:1:2", "-3"])
def test_bad_lengths_are_refused(bad):
    with pytest.raises(LoadtestConfigError, match="length"):
        LengthDist.parse(bad)


def test_requests_are_reproducible_and_follow_the_spec():
    spec = WorkloadSpec(adapters=["a", "b"], prompt_len=LengthDist.parse("5"), output_len=LengthDist.parse("uniform:2:3"),
                        num_requests=50, seed=7)
    first, second = list(generate_requests(spec)), list(generate_requests(spec))
    assert first == second and len(first) == 50
    assert [r.index for r in first] == list(range(50))
    assert all(len(r.prompt.split()) == 5 and r.max_tokens in (2, 3) for r in first)
    other = list(generate_requests(WorkloadSpec(adapters=["a", "b"], num_requests=50, seed=8)))
    assert [r.prompt for r in other] != [r.prompt for r in first]


def test_a_shared_prefix_starts_every_prompt_and_changes_nothing_else():
    plain = WorkloadSpec(adapters=["a", "b"], prompt_len=LengthDist.parse("uniform:2:6"), num_requests=30, seed=3)
    prefixed = WorkloadSpec(**{**plain.__dict__, "shared_prefix": 12})
    first, second = list(generate_requests(plain)), list(generate_requests(prefixed))
    prefix = second[0].prompt.split()[:12]
    for a, b in zip(first, second):
        assert b.prompt.split() == prefix + a.prompt.split()
        assert (a.adapter, a.max_tokens, a.seed) == (b.adapter, b.max_tokens, b.seed)
    reseeded = list(generate_requests(WorkloadSpec(**{**prefixed.__dict__, "seed": 4})))
    assert reseeded[0].prompt.split()[:12] != prefix


@pytest.mark.parametrize("kwargs", [
    dict(shared_prefix=-1),
    dict(num_requests=None, duration_s=None),
    dict(num_requests=10, duration_s=5.0),
    dict(concurrency=None, rate=None),
    dict(concurrency=2, rate=3.0),
    dict(concurrency=0),
    dict(rate=-1.0, concurrency=None),
    dict(num_requests=0),
    dict(adapters=[]),
])
def test_inconsistent_workloads_are_refused(kwargs):
    with pytest.raises(LoadtestConfigError):
        WorkloadSpec(**kwargs).validate()


def test_poisson_gaps_have_the_right_mean():
    gaps = poisson_gaps(rate=4.0, seed=0)
    sample = [next(gaps) for _ in range(20_000)]
    assert abs(sum(sample) / len(sample) - 0.25) < 0.01
    assert min(sample) >= 0
