"""Incremental detokenization equals decoding the whole output at once."""

from __future__ import annotations

import random

import pytest

from s2ft_serve.engine.detokenizer import Detokenizer
from s2ft_serve.model.testing import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("seed", range(5))
def test_deltas_add_up_to_the_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(60)]  # random ids: split UTF-8 bytes included
    detok, parts = Detokenizer(tokenizer, []), []
    for n in range(1, len(ids) + 1):
        parts.append(detok.add(ids[:n]))
    parts.append(detok.flush())
    assert "".join(parts) == tokenizer.decode(ids, skip_special_tokens=True)


def test_text_stops_before_the_stop_string(tokenizer):
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    detok, parts = Detokenizer(tokenizer, ["fox", "lazy"]), []
    for n in range(1, len(ids) + 1):
        parts.append(detok.add(ids[:n]))
        if detok.stopped:
            break
    parts.append(detok.flush())
    assert "".join(parts) == "The quick brown " and detok.stopped


def test_the_stop_string_can_stay_in_the_text(tokenizer):
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    detok, parts = Detokenizer(tokenizer, ["lazy", "fox"], include_stop=True), []
    for n in range(1, len(ids) + 1):
        parts.append(detok.add(ids[:n]))
        if detok.stopped:
            break
    parts.append(detok.flush())
    assert "".join(parts) == "The quick brown fox" and detok.stopped


def test_a_token_that_ends_the_answer_is_not_text_unless_kept(tokenizer):
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    end = ids[-1]
    for include, expected in ((False, tokenizer.decode(ids[:-1])), (True, tokenizer.decode(ids))):
        detok = Detokenizer(tokenizer, [], end_ids=frozenset({end}), include_stop=include)
        parts = [detok.add(ids[:n]) for n in range(1, len(ids) + 1)] + [detok.flush()]
        assert "".join(parts) == expected
