"""Incremental detokenization equals decoding the whole output at once."""

from __future__ import annotations

import random

import pytest

from s2ft_serve.engine.detokenizer import Detokenizer
from s2ft_serve.model.testing import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def streamed(detok: Detokenizer, ids: list[int]) -> str:
    """Feed `ids` one more at a time, as the engine does, until the detokenizer stops; the text released."""
    parts = []
    for n in range(1, len(ids) + 1):
        parts.append(detok.add(ids[:n]))
        if detok.stopped:
            break
    return "".join(parts) + detok.flush()


@pytest.mark.parametrize("seed", range(5))
def test_deltas_add_up_to_the_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(60)]  # random ids: split UTF-8 bytes included
    assert streamed(Detokenizer(tokenizer, []), ids) == tokenizer.decode(ids, skip_special_tokens=True)


FOX = "The quick brown fox jumps over the lazy dog."


def test_text_stops_before_the_stop_string(tokenizer):
    detok = Detokenizer(tokenizer, ["fox", "lazy"])
    assert streamed(detok, tokenizer.encode(FOX, add_special_tokens=False)) == "The quick brown " and detok.stopped


def test_stop_strings_match_only_from_min_tokens_on(tokenizer):
    """vLLM's rule (QA: `stop: [" city"], min_tokens: 20` ended after 3 tokens here): a stop string in the
    first min_tokens tokens does not end the text; one after them does."""
    ids = tokenizer.encode(FOX + " The fox again.", add_special_tokens=False)
    first_fox = next(n for n in range(1, len(ids) + 1) if "fox" in tokenizer.decode(ids[:n]))
    assert streamed(Detokenizer(tokenizer, ["fox"], min_tokens=first_fox - 1), ids) == "The quick brown "
    for after in (1, 2):  # QA: one completed just before min_tokens, still held back, stopped the text then
        late = Detokenizer(tokenizer, ["fox"], min_tokens=first_fox + after)
        assert streamed(late, ids) == FOX + " The " and late.stopped
    kept = Detokenizer(tokenizer, ["fox"], min_tokens=first_fox + 1, include_stop=True)
    assert streamed(kept, ids) == FOX + " The fox" and kept.stopped
    never = Detokenizer(tokenizer, ["fox"], min_tokens=len(ids) + 1)
    assert streamed(never, ids) == tokenizer.decode(ids) and not never.stopped


def test_the_stop_string_can_stay_in_the_text(tokenizer):
    detok = Detokenizer(tokenizer, ["lazy", "fox"], include_stop=True)
    assert streamed(detok, tokenizer.encode(FOX, add_special_tokens=False)) == "The quick brown fox" and detok.stopped


def test_a_token_that_ends_the_answer_is_not_text_unless_kept(tokenizer):
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    end = ids[-1]
    for include, expected in ((False, tokenizer.decode(ids[:-1])), (True, tokenizer.decode(ids))):
        assert streamed(Detokenizer(tokenizer, [], end_ids=frozenset({end}), include_stop=include), ids) == expected
