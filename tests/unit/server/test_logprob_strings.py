"""Token strings, bytes and text offsets of logprobs: a character split across tokens (an emoji)
keeps its bytes, its parts stay distinct, and offsets index the decoded text."""

from __future__ import annotations

from tokenizers import SentencePieceBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from s2ft_serve.engine.request import TokenLogprob
from s2ft_serve.server.logprobs import TextOffsets, TokenStrings, chat_logprobs, completion_logprobs

TEXT = "Emoji: 😀👍🏽🎉 café 中文 <|im_start|> the end\n"


def test_byte_level_tokens_keep_their_bytes_and_offsets_index_the_text(tiny_llama_dir):
    """QA: every token holding part of a character showed as '\\ufffd' with the bytes of U+FFFD, so
    `bytes` could not rebuild an emoji, `top_logprobs` keys collided and `text_offset` ran past the text."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    strings = TokenStrings(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert strings.kind == "byte_level"
    assert b"".join(strings.bytes_of(i) for i in ids).decode("utf-8") == TEXT
    shown = [strings(i) for i in ids]
    assert "\ufffd" not in "".join(shown) and "\\xf0" in "".join(shown)  # parts of a character: escaped bytes
    assert strings(tokenizer.convert_tokens_to_ids("<|im_start|>")) == "<|im_start|>"

    logprobs = completion_logprobs(strings, ids, [None] * len(ids))
    offsets = logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[-1] < len(TEXT)
    whole = [i for i, s in enumerate(shown) if "\\x" not in s]
    for i in whole:  # a token of whole characters sits where its text is
        assert TEXT[offsets[i]:offsets[i] + len(shown[i])] == shown[i]

    parts = [i for i in ids if "\\x" in strings(i)][:3]
    entry = TokenLogprob(parts[0], -0.1, top=[(t, -0.1 - k) for k, t in enumerate(parts)])
    assert len(completion_logprobs(strings, [parts[0]], [entry]).top_logprobs[0]) == len(set(parts))
    content = chat_logprobs(strings, ids, [TokenLogprob(i, -1.0, top=[]) for i in ids], 0).content
    assert bytes(b for c in content for b in c.bytes).decode("utf-8") == TEXT


def test_sentencepiece_tokens_show_their_spaces():
    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(["the cat sat on the mat"] * 20, vocab_size=40, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained)
    strings = TokenStrings(tokenizer)
    ids = tokenizer.encode("the cat sat", add_special_tokens=False)
    assert strings.kind == "sentencepiece"
    assert b"".join(strings.bytes_of(i) for i in ids).decode().strip() == "the cat sat"
    assert any(strings(i).startswith(" ") for i in ids[1:])


def test_offsets_carry_a_split_character_across_calls():
    offsets = TextOffsets()
    assert [offsets.advance(b) for b in (b"a", b"\xf0\x9f", b"\x98\x80", b"b")] == [0, 1, 1, 2]


def test_offsets_after_bytes_that_were_no_character():
    """QA: a held-back lead byte that the next token shows to be invalid decodes as U+FFFD before that
    token's text; the U+FFFD is the earlier token's, so the next token starts after it."""
    offsets = TextOffsets()
    assert [offsets.advance(b) for b in (b"\xe4", b"ju", b"mp")] == [0, 1, 3]  # text "\ufffdjump"
    offsets = TextOffsets()  # a real U+FFFD, split: one character, both parts at its start
    assert [offsets.advance(b) for b in (b"a", b"\xef\xbf", b"\xbd", b"b")] == [0, 1, 1, 2]
    offsets = TextOffsets()  # two lead bytes in a row: the first is broken by the second, which goes on
    assert [offsets.advance(b) for b in (b"\xc3", b"\xc3", b"\xa9!")] == [0, 1, 1]  # text "\ufffdé!"
