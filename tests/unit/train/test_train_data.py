"""Training data: the three JSONL formats, loss masks, packing, and line-numbered refusals."""

from __future__ import annotations

import json

import pytest

from s2ft_serve.errors import DataValidationError
from s2ft_serve.model.testing import make_tokenizer
from s2ft_serve.train.data import (IGNORE, Example, batch_order, collate, load_examples, pack, read_records,
                                   tokenize_record)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _labelled_text(tok, ex: Example) -> str:
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_prompt_completion_loss_only_on_completion(tok):
    ex = tokenize_record({"prompt": "What is 2 + 2?", "completion": " The answer is 4."}, tok, 512)
    assert _labelled_text(tok, ex) == " The answer is 4." + tok.eos_token
    assert ex.labels[0] == IGNORE and tok.decode(ex.input_ids).startswith("What is 2 + 2?")


@pytest.mark.parametrize("prompt, completion", [("Answer:", "\n4"), ("Hello", ", world"), ("The quick", " brown fox"),
                                                ("x = ", "2 + 2"), ("Q", " é€")])
def test_a_completion_is_learnt_as_the_tokens_that_continue_its_prompt(tok, prompt, completion):
    """QA: a completion was tokenized alone, and SentencePiece tokenizers (Llama 2, Mistral) put a word-start
    "▁" in front of any text they start: "Answer:" + "\n4" was learnt, and served, as " \n4"."""
    from s2ft_serve.model.testing import make_sentencepiece_tokenizer

    for tokenizer in (make_sentencepiece_tokenizer(), tok):
        ex = tokenize_record({"prompt": prompt, "completion": completion}, tokenizer, 512)
        n = ex.labels.count(IGNORE)
        learnt = ex.input_ids[n:-1]  # the completion's tokens, EOS after them
        served = tokenizer.decode(ex.input_ids[:n] + learnt, skip_special_tokens=True)
        assert served[len(tokenizer.decode(ex.input_ids[:n], skip_special_tokens=True)):] == completion
        assert ex.input_ids[-1] == tokenizer.eos_token_id


def test_messages_loss_only_on_assistant_turns(tok):
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "world"}, {"role": "user", "content": "again"},
                           {"role": "assistant", "content": "fox"}]}
    ex = tokenize_record(record, tok, 512)
    text = _labelled_text(tok, ex)
    assert text == "world<|im_end|>\nfox<|im_end|>\n"
    assert "hello" in tok.decode(ex.input_ids) and "hello" not in text


SYSTEM_INJECTING_TEMPLATE = (  # SmolLM2's: a default system prompt before a first message that is not one
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def injecting_tok():
    tok = make_tokenizer()
    tok.chat_template = SYSTEM_INJECTING_TEMPLATE
    return tok


@pytest.mark.parametrize("tokenizer", ["tok", "injecting_tok"])
def test_conversation_opened_by_assistant_learns_only_its_turns(tokenizer, request):
    """No loss on the turn header, nor on a system prompt the template injects before it."""
    tok = request.getfixturevalue(tokenizer)
    opened = tokenize_record({"messages": [{"role": "assistant", "content": "Hello world"}]}, tok, 512)
    assert _labelled_text(tok, opened) == "Hello world<|im_end|>\n"
    assert tok.decode(opened.input_ids).endswith("<|im_start|>assistant\nHello world<|im_end|>\n")
    longer = {"messages": [{"role": "assistant", "content": "Hello world"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "fox"}]}
    assert _labelled_text(tok, tokenize_record(longer, tok, 512)) == "Hello world<|im_end|>\nfox<|im_end|>\n"


@pytest.mark.slow
def test_default_tokenizer_skips_its_injected_system_prompt(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ex = tokenize_record({"messages": [{"role": "assistant", "content": "Hello there"}]}, tok, 512)
    assert "You are a helpful AI assistant" in tok.decode(ex.input_ids)
    assert _labelled_text(tok, ex) == "Hello there<|im_end|>\n"


def test_text_loss_on_every_token_and_truncation(tok):
    ex = tokenize_record({"text": "The quick brown fox jumps over the lazy dog."}, tok, 512)
    assert ex.labels == ex.input_ids
    short = tokenize_record({"text": "The quick brown fox jumps over the lazy dog."}, tok, 4)
    assert len(short.input_ids) == 4


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"prompt": "a"}', "'completion' must be a string"),
    ('{"prompt": 1, "completion": "b"}', "'prompt' must be a string"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role must be one of"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "content must be a string"),
    ('{"text": ""}', "non-empty string"),
    ('{"input": "x"}', "expected one of the keys"),
    # QA: these two were tracebacks, the first only after the model had loaded
    ('{"text": "abc \\ud800 def"}', "a lone surrogate"),
    ('{"prompt": "a", "completion": "b\\udfff"}', "a lone surrogate"),
    ('{"messages": [{"role": "assistant", "content": "\\ud800"}]}', "a lone surrogate"),
    ('{"text": ' + "[" * 100_000, "nested too deeply"),
    ('{"text": ' + "1" * 5000 + "}", "invalid JSON"),  # more digits than Python reads: was a ValueError traceback
])
def test_malformed_line_refused_with_its_number(tmp_path, tok, bad, reason):
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = _write(tmp_path, [good, "", good, bad, good])
    with pytest.raises(DataValidationError) as err:
        load_examples(path, tok, 64)
    assert "d.jsonl:4: " in err.value.message
    assert reason in err.value.message


@pytest.mark.parametrize("bad, where", [
    ('{"text": "abc \\ud800 def"}', "text"),
    ('{"prompt": "abc \\ud800", "completion": " def"}', "prompt"),
    ('{"prompt": "a", "completion": "b\\udfff"}', "completion"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udc80"}]}',
     "messages[1].content"),
    ('{"text": "x", "meta": ' + "[" * 100_000 + "}", "invalid JSON (nested too deeply)"),
])
def test_unusable_text_refused_by_validation_alone(tmp_path, bad, where):
    """QA: a lone surrogate passed the validation (no tokenizer is at hand there), then failed after the
    model had loaded, with a TypeError traceback ("the chat template refused this conversation" for
    messages); a line nested too deeply was a RecursionError traceback. The validation, before anything
    loads, names the line and the field."""
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = _write(tmp_path, [good, bad, good])
    with pytest.raises(DataValidationError) as err:
        read_records(path)
    assert err.value.message.startswith(f"{path}:2: {where}")
    assert "\n" not in err.value.message
    # a valid pair of surrogates (an escaped emoji) is text like any other, and so are fields left unread
    ok = _write(tmp_path, ['{"text": "\\ud83d\\ude00"}', '{"text": "x", "note": "\\ud800"}'])
    assert [r["text"] for _, r in read_records(ok)] == ["\U0001F600", "x"]


def test_missing_and_empty_files_refused(tmp_path, tok):
    with pytest.raises(DataValidationError, match="no such data file"):
        load_examples(tmp_path / "nope.jsonl", tok, 64)
    with pytest.raises(DataValidationError, match="no examples"):
        load_examples(_write(tmp_path, [""]), tok, 64)


def test_example_truncated_to_nothing_learnable_is_refused(tmp_path, tok):
    path = _write(tmp_path, [json.dumps({"prompt": "The quick brown fox jumps", "completion": " x"})])
    with pytest.raises(DataValidationError, match=r"d.jsonl:1: no completion"):
        load_examples(path, tok, 3)


def test_packing_fills_rows_and_masks_example_boundaries():
    examples = [Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5, 6, 7], [4, 5, 6, 7]), Example([8, 9], [8, 9])]
    rows = pack(examples, 4)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # a 1-token tail teaches nothing
    assert rows[0].labels == [IGNORE, 2, 3, IGNORE]  # 4 starts a new example: not predicted from 3
    assert rows[1].labels == [5, 6, 7, IGNORE]


def test_collate_pads_right_with_mask_and_ignored_labels():
    batch = collate([Example([1, 2, 3], [1, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE, IGNORE]]


def test_batch_order_is_a_seeded_permutation():
    a = batch_order(10, 3, epoch=0, seed=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert a == batch_order(10, 3, epoch=0, seed=1)
    assert a != batch_order(10, 3, epoch=1, seed=1)


def test_non_incremental_chat_template_refused_with_line_number(tmp_path, tok):
    class LastTurnOnly:  # a template that drops earlier turns: assistant tokens cannot be located
        eos_token_id = tok.eos_token_id

        def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
            return [len(messages)] + [ord(c) for c in messages[-1]["content"]] if messages else []

    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _write(tmp_path, [json.dumps(record)])
    with pytest.raises(DataValidationError, match=r"d.jsonl:1: the tokenizer's chat template"):
        load_examples(path, LastTurnOnly(), 64)


def test_a_conversation_the_chat_template_refuses_is_named_by_its_line(tmp_path):
    """QA: a template that raises (roles must alternate), or none at all, was a traceback without FILE:LINE."""
    strict = make_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                            "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    opened = {"messages": [{"role": "system", "content": "be brief"}, *chat["messages"]]}
    path = _write(tmp_path, [json.dumps(chat), json.dumps(opened)])
    with pytest.raises(DataValidationError, match=r"d.jsonl:2: the chat template refused this conversation: "
                                                  r"Conversation roles must alternate"):
        load_examples(path, strict, 64)
    broken = make_tokenizer()
    broken.chat_template = "{{ 1 // 0 }}"
    with pytest.raises(DataValidationError, match=r"d.jsonl:1: the chat template failed .*ZeroDivisionError"):
        load_examples(path, broken, 64)
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataValidationError, match=r"d.jsonl:1: the base model's tokenizer has no chat template"):
        load_examples(path, bare, 64)
