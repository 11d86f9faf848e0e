"""Structured output: JSON schemas, regexes, choices and grammars constrain what the engine samples,
in a batch whose other requests stay exactly as they are alone; bad guides are refused up front."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

from s2ft_serve.engine.request import Guide, SamplingParams
from s2ft_serve.errors import InvalidRequestError

# a finite language with rigid whitespace (llguidance's "x-guidance" options), so that even a random
# model must finish it within a few tokens
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "s"],
          "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}, "s": {"type": "string", "maxLength": 5}},
          "x-guidance": {"whitespace_flexible": False}}
GRAMMAR = 'start: "x" yz yz? yz? "!"\nyz: "y" | "z"'  # Lark


def run(engine, guide: Guide, seed: int | None, adapter=None, **params):
    temperature = 0.0 if seed is None else 1.0
    return engine.generate("hello", adapter, SamplingParams(max_tokens=48, temperature=temperature, seed=seed,
                                                            guide=guide, **params))


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_every_kind_of_guide_is_followed_to_the_end(engine, seed):
    out = run(engine, Guide(json=SCHEMA), seed)
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)
    out = run(engine, Guide(regex=r"[a-c]{3}-[0-9]{2}"), seed)
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", out.text) and out.finish_reason == "stop"
    out = run(engine, Guide(choice=["alpha", "beta gamma"]), seed)
    assert out.text in ("alpha", "beta gamma") and out.finish_reason == "stop"
    out = run(engine, Guide(grammar=GRAMMAR), seed)
    assert re.fullmatch(r"x[yz]{1,3}!", out.text) and out.finish_reason == "stop"


def test_a_guide_broken_by_a_special_token_ends_as_an_error_not_a_stop(engine, caplog):
    """QA: a regex spelling a special token (`<|im_start|>x`) let llguidance's mask allow that token,
    the matcher then refused it, and the request ended "stop" with text that breaks the regex."""
    with caplog.at_level("ERROR", logger="s2ft_serve.engine.stepper"):
        out = run(engine, Guide(regex=r"<\|im_start\|>x"), None, skip_special_tokens=False)
    assert not re.fullmatch(r"<\|im_start\|>x", out.text)
    assert out.finish_reason == "error"
    refusals = [r.getMessage() for r in caplog.records if "refused token" in r.getMessage()]
    # QA: each such sequence logged llguidance's whole state, the grammar with its newlines included
    assert refusals and all("<state>" not in m and "\n" not in m and len(m) < 500 for m in refusals)
    alongside = run(engine, Guide(regex=r"[a-c]{3}-[0-9]{2}"), None)  # the engine goes on serving guides
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", alongside.text) and alongside.finish_reason == "stop"


def test_an_ambiguous_grammars_steps_are_bounded(default_model_dir):
    """QA: `e: e e | e e e | "a" | "aa" | "b"` passed the first-step check, then each mask grew (0.8 s per
    token and sequence by token 500, on SmolLM2's vocabulary), stalling every user: llguidance's per-step
    item limit (guided.LIMITS) now ends such a sequence in error within ~100 tokens, each mask cheap."""
    from transformers import AutoTokenizer

    from s2ft_serve.engine.guided import GuidedDecoding

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    guided = GuidedDecoding(tok, len(tok), {tok.eos_token_id})
    m = guided.matcher(Guide(grammar='start: e\ne: e e | e e e | "a" | "aa" | "b"'))
    b = tok.convert_tokens_to_ids("b")
    for step in range(400):  # with llguidance's default limits the first error came near token 800
        guided.allowed([m])
        if m.is_error() or not m.consume_token(b):
            break
    assert m.is_error() and "Too many items" in m.get_error() and step < 200


def test_unguided_model_does_not_follow_by_itself(engine):
    """The constraint is what makes the outputs above valid: free greedy text is not JSON."""
    free = engine.generate("hello", None, SamplingParams(max_tokens=48, temperature=0)).text
    with pytest.raises(ValueError):
        json.loads(free)


def test_json_schema_as_text_equals_the_dict(engine):
    a = run(engine, Guide(json=SCHEMA), 5)
    b = run(engine, Guide(json=json.dumps(SCHEMA)), 5)
    assert a.token_ids == b.token_ids


def test_json_object_accepts_objects_only(engine):
    """`json_object` (OpenAI's json mode) is any JSON object: the grammar takes one, refuses an array."""
    ok = engine.tokenizer.encode('{"a": [1, {"b": null}], "c": "d"}', add_special_tokens=False)
    m = engine.guided.matcher(Guide(json_object=True))
    assert m.consume_tokens(ok) and m.is_accepting()
    m = engine.guided.matcher(Guide(json_object=True))
    assert not m.consume_tokens(engine.tokenizer.encode("[1]", add_special_tokens=False))


def test_guided_and_free_requests_in_one_batch(engine, adapters):
    """Guided rows are masked, the others untouched: each free request equals its solo run."""
    free = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, temperature=0.8, seed=3)]
    solo = [engine.generate("abc", "a0", p).token_ids for p in free]
    engine.start()
    handles = []
    for i in range(3):
        handles.append(engine.submit("hello", f"a{i}", SamplingParams(max_tokens=48, temperature=1.0, seed=i,
                                                                      guide=Guide(json=SCHEMA))))
        handles.append(engine.submit("abc", "a0", free[i % 2]))
    outs = [h.result() for h in handles]
    for i in range(3):
        jsonschema.validate(json.loads(outs[2 * i].text), SCHEMA)
        assert outs[2 * i + 1].token_ids == solo[i % 2]


def test_grammar_end_stops_even_with_ignore_eos(engine):
    out = run(engine, Guide(choice=["yes", "no"]), 0, ignore_eos=True)
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    assert len(out.token_ids) < 48


def test_logprobs_stay_the_models_own(engine):
    out = run(engine, Guide(regex="[0-9]{4}"), None, logprobs=0)
    logits = engine.logits(out.prompt_token_ids + out.token_ids)
    n = len(out.prompt_token_ids)
    expected = torch.log_softmax(logits[n - 1: n - 1 + len(out.token_ids)], dim=-1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(expected[i, tok]), abs=1e-4)


def test_mask_falls_back_to_the_raw_logits_when_other_rules_left_nothing(engine):
    """min_tokens may ban the only tokens the grammar allows (EOS, stop ids): the grammar wins."""
    guided = engine.guided
    m = guided.matcher(Guide(choice=["yes", "no"]))
    allowed = guided.allowed([m])[0]
    raw = torch.randn(2, engine.vocab_size)
    adjusted = raw.clone()
    adjusted[0, allowed] = -math.inf  # row 0: every allowed token banned by the other rules
    adjusted[1, 5] = 7.0  # row 1: not guided
    before = adjusted[1].clone()
    guided.mask(adjusted, raw, [0], [m])
    assert torch.equal(adjusted[0, allowed], raw[0, allowed])
    assert torch.isneginf(adjusted[0, ~allowed]).all()
    assert torch.equal(adjusted[1], before)


def test_choice_with_min_tokens_banning_its_only_token(engine):
    """End to end: the first token of the only choice is also a stop id that min_tokens bans."""
    first = engine.tokenizer.encode("zz", add_special_tokens=False)[0]
    out = run(engine, Guide(choice=["zz"]), None, min_tokens=2, stop_token_ids=[first])
    assert out.token_ids[0] == first and out.finish_reason == "stop"


@pytest.mark.parametrize("guide, match", [
    (Guide(regex="a("), "invalid regex.*unclosed group"),
    (Guide(json={"type": "frobnicate"}), "invalid json schema.*frobnicate"),
    (Guide(json="{not json"), "invalid json schema"),
    (Guide(grammar="start: undefined_rule"), "invalid grammar"),
    (Guide(choice=[]), "non-empty list of strings"),
    (Guide(regex="a", choice=["a"]), "exactly one of"),
    (Guide(), "exactly one of"),
    # QA: compiled, then each sequence's lexer blew up on the engine thread (~1 s each, every user waited)
    (Guide(regex="(a{1000}){997}"), "regex cannot be served: lexer error: too many expressions"),
])
def test_bad_guides_are_refused_before_anything_is_queued(engine, guide, match):
    with pytest.raises(InvalidRequestError, match="(?s)" + match) as refused:
        engine.submit("x", None, SamplingParams(guide=guide))
    assert "<state>" not in str(refused.value) and len(str(refused.value)) < 400  # not llguidance's whole dump
    assert engine.stats().waiting == 0 and engine.stats().running == 0
    # the engine goes on serving
    assert run(engine, Guide(choice=["ok"]), None).text == "ok"


def test_an_end_id_outside_the_vocabulary_is_ignored(tiny_llama_dir, tmp_path, caplog):
    """QA: an id past the vocabulary in generation_config's eos_token_id made every structured-output
    request fail (llguidance refused the tokenizer); it is left out, with a warning."""
    import shutil

    from engine_reference import make_engine

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    gen_path = model / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    config = json.loads((model / "config.json").read_text())
    gen["eos_token_id"] = [config["eos_token_id"], config["vocab_size"] + 10]
    gen_path.write_text(json.dumps(gen))
    with caplog.at_level("WARNING"):
        engine = make_engine(model)
    try:
        assert engine.stepper.eos_ids == {config["eos_token_id"]}
        assert "outside the vocabulary" in caplog.text
        out = engine.generate("fox", None, SamplingParams(max_tokens=5, temperature=0, guide=Guide(choice=["yes", "no"])))
        assert out.text in ("yes", "no")
    finally:
        engine.shutdown()


def test_a_choice_of_thousands_of_strings_is_served(engine):
    """QA: llguidance's `choice` grammar holds at most 2,000 strings (2,001 were refused as a
    "left-recursion" problem); the engine compiles a choice as one regex of its escaped strings."""
    strings = [f"w{i}" for i in range(5000)] + ["a.b", "x|y", "(z)", "tab\there", "é€"]
    guide = Guide(choice=strings)
    for seed in (None, 0, 1):
        assert run(engine, guide, seed).text in strings
    # regex characters in a string are plain characters: "a.b" is not "axb", "x|y" is not "x"
    for text, ok in (("a.b", True), ("axb", False), ("x|y", True), ("x", False), ("é€", True)):
        matcher = engine.guided.matcher(guide)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        assert (all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()) is ok, text


@pytest.mark.parametrize("guide", [Guide(json={"$ref": "#"}), Guide(regex=r"[^\s\S]")])
def test_a_guide_that_matches_no_text_says_so(engine, guide):
    """QA: the 400 said only "NoExtensionBias", llguidance's name for it."""
    with pytest.raises(InvalidRequestError, match="cannot be served: it matches no text at all"):
        engine.guided.check(guide)


def test_a_new_guide_compiles_once_however_many_threads_check_it(engine, monkeypatch):
    """Concurrent checks of one new guide wait for one compile, and a refusal is cached as a compile is
    (QA: a refusal can take as long as a compile; identical slow schemas compiled once each)."""
    import threading

    from s2ft_serve.engine.guided import GuidedDecoding

    calls, gate = [], threading.Event()
    compile_uncached = GuidedDecoding._compile_uncached

    def slow(self, fmt, text):
        calls.append(text)
        gate.wait(10)
        return compile_uncached(self, fmt, text)

    monkeypatch.setattr(GuidedDecoding, "_compile_uncached", slow)
    guided = engine.guided
    good, bad = Guide(regex="[ab]{2}"), Guide(regex="a(")
    results = []

    def check(guide):
        try:
            results.append(guided.check(guide, "p"))
        except InvalidRequestError as exc:
            results.append(exc)

    threads = [threading.Thread(target=check, args=(g,)) for g in (good, good, good, bad, bad)]
    for t in threads:
        t.start()
    assert not engine.check_guide_if_known(good)
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(calls) == ["[ab]{2}", "a("]
    assert sum(isinstance(r, InvalidRequestError) and r.param == "p" for r in results) == 2
    assert engine.check_guide_if_known(good)
    with pytest.raises(InvalidRequestError, match="invalid regex"):  # the refusal, known too
        engine.check_guide_if_known(bad)
    with pytest.raises(InvalidRequestError, match="invalid regex") as again:
        guided.check(bad, "q")
    assert again.value.param == "q" and len(calls) == 2
