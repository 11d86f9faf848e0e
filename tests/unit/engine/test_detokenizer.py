"""Incremental detokenization equals decoding the whole output at once."""

from __future__ import annotations

import itertools
import random

import pytest

from s2ft_serve.engine.detokenizer import Detokenizer
from s2ft_serve.model.testing import make_sentencepiece_tokenizer, make_tokenizer


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


@pytest.fixture(scope="module")
def sp_tokenizer():
    return make_sentencepiece_tokenizer()


WORDS = FOX.split() + ["é€", "😀", "tiny", "s2ft-serve.", "2", "+"]


@pytest.mark.parametrize("seed", range(5))
def test_the_answer_is_decoded_after_the_prompt(sp_tokenizer, seed):
    """QA: a SentencePiece decoder drops the leading space of a text's first word, and the answer was
    decoded alone, so every answer starting with a word lost its space ("The quick" + "brown", echo
    "The quickbrown"). Decoded after the prompt's last tokens, the answer is the whole text's rest."""
    rng = random.Random(seed)
    prompt = sp_tokenizer.encode(" ".join(rng.choices(WORDS, k=rng.randrange(1, 8))))  # BOS first
    answer = sp_tokenizer.encode(" ".join(rng.choices(WORDS, k=12)), add_special_tokens=False)
    whole, before = sp_tokenizer.decode(prompt + answer, skip_special_tokens=True), sp_tokenizer.decode(
        prompt, skip_special_tokens=True)
    text = streamed(Detokenizer(sp_tokenizer, [], prompt=prompt), answer)
    assert text == whole[len(before):] and text.startswith(" ")


def test_an_answer_after_a_word_keeps_its_space(sp_tokenizer, tokenizer):
    prompt, answer = sp_tokenizer.encode("The quick"), sp_tokenizer.encode("brown fox", add_special_tokens=False)
    assert sp_tokenizer.decode(answer) == "brown fox"  # alone, the first word has no space
    assert streamed(Detokenizer(sp_tokenizer, [], prompt=prompt), answer) == " brown fox"
    assert streamed(Detokenizer(sp_tokenizer, ["fox"], prompt=prompt), answer) == " brown "
    # byte-level: a prompt's last tokens change nothing
    prompt, answer = tokenizer.encode("The quick"), tokenizer.encode(" brown fox")
    assert streamed(Detokenizer(tokenizer, [], prompt=prompt), answer) == " brown fox"
    # token-id prompts cut inside a character: the character is the prompt's (QA: the answer began with U+FFFD)
    # (also short ones, where no position of the prompt's tail starts a character: the red team's third round)
    for tokenizer, text in itertools.product((sp_tokenizer, tokenizer), ("The price is 5 € — or café ok", "本 world",
                                                                          "🎉 yes", "日本 is 日本")):
        ids = tokenizer.encode(text, add_special_tokens=False)
        cuts = [n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
        assert cuts
        for n in cuts:
            prompt, answer = ids[:n], ids[n:]
            expected = tokenizer.decode(prompt + answer)[len(tokenizer.decode(prompt)):]
            assert streamed(Detokenizer(tokenizer, [], prompt=prompt), answer) == expected and "\ufffd" not in expected


def test_the_engines_answer_keeps_its_leading_space(tmp_path, sp_tokenizer):
    """End to end, as QA saw it over HTTP: an answer starting with a word on a SentencePiece model."""
    from engine_reference import make_engine

    from s2ft_serve.engine.request import SamplingParams
    from s2ft_serve.model.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "sp", tokenizer=sp_tokenizer)
    brown = sp_tokenizer.convert_tokens_to_ids("▁brown")
    with make_engine(path) as engine:
        for stream in (False, True):
            params = SamplingParams(max_tokens=1, temperature=0, logit_bias={brown: 100.0})
            if stream:
                text = "".join(event.text_delta for event in engine.stream("The quick", None, params))
            else:
                text = engine.generate("The quick", None, params).text
            assert text == " brown"


@pytest.mark.parametrize("prompt_text, answer_text", [("日本", "語の本 hello"), ("Party time! 🎉🎉", "🎉 Yes, let us go"),
                                                      ("Hi", "🎉🎉🎉🎉 fun")])
def test_windows_start_where_a_character_does(sp_tokenizer, tokenizer, prompt_text, answer_text):
    """QA: a window of the last 5 tokens could start inside a character (the prompt's last ones, or several
    tokens added at once, as speculative decoding does); SentencePiece's byte fallback then decodes the whole
    run of byte tokens as U+FFFD, the answer's valid characters included ("日本" answered with 9 of them)."""
    for tok in (sp_tokenizer, tokenizer):
        prompt, full = tok.encode(prompt_text), tok.encode(prompt_text + answer_text)
        assert full[:len(prompt)] == prompt
        answer = full[len(prompt):]
        expected = tok.decode(full, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
        for per_add in (1, 3, 6):
            detok = Detokenizer(tok, [], prompt=prompt)
            text = "".join(detok.add(answer[:n]) for n in range(per_add, len(answer) + per_add, per_add))
            assert text + detok.flush() == expected, (per_add, text)
