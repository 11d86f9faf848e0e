"""How new requests are split into prefill passes (right-padding to the longest prompt)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from s2ft_serve.engine.stepper import prefill_groups


def seqs(*lengths):
    return [SimpleNamespace(prompt_ids=[0] * n, cached_tokens=0, twin_of=None) for n in lengths]


def lengths(groups):
    return [[len(s.prompt_ids) for s in g] for g in groups]


def test_similar_lengths_share_one_pass_and_an_outlier_gets_its_own():
    assert lengths(prefill_groups(seqs(12, 40, 10, 11, 12))) == [[10, 11, 12, 12], [40]]


def test_every_sequence_lands_in_exactly_one_pass():
    given = seqs(*range(1, 60, 7), 3, 3, 100)
    groups = prefill_groups(given)
    assert sorted(id(s) for g in groups for s in g) == sorted(id(s) for s in given)


@pytest.mark.parametrize("max_padding", [0.0, 0.25, 0.5])
def test_padding_stays_within_the_bound(max_padding):
    for group in prefill_groups(seqs(5, 6, 7, 9, 13, 20, 21, 22, 50, 51), max_padding):
        padded = len(group) * max(len(s.prompt_ids) for s in group)
        real = sum(len(s.prompt_ids) for s in group)
        assert padded - real <= max_padding * padded + 1e-9


def test_no_padding_allowed_groups_equal_lengths_only():
    assert lengths(prefill_groups(seqs(4, 4, 5, 4), max_padding=0.0)) == [[4, 4, 4], [5]]
