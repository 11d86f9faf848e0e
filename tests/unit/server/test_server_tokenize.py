"""`POST /tokenize` and `/detokenize` (vLLM's routes): the same ids generation uses, and back."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


async def test_tokenize_gives_the_ids_generation_counts(client, engine):
    prompt = "The quick brown fox"
    r = await client.post("/tokenize", json={"model": "a0", "prompt": prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == engine.tokenize(prompt) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.max_model_len
    usage = (await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]
    chat = (await client.post("/tokenize", json={"messages": MESSAGES})).json()
    assert chat["tokens"] == engine.apply_chat_template(MESSAGES)
    chat_usage = (await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})).json()
    assert chat_usage["usage"]["prompt_tokens"] == chat["count"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# a chat template that shows the tools, as Qwen's or Llama 3's do
TOOLS_TEMPLATE = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
                  "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")


async def test_tokenize_counts_the_tools_a_chat_shows(client, engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", TOOLS_TEMPLATE)
    plain = (await client.post("/tokenize", json={"messages": MESSAGES})).json()
    with_tools = (await client.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS})).json()
    assert with_tools["count"] > plain["count"]
    assert with_tools["tokens"] == engine.apply_chat_template(MESSAGES, TOOLS)
    usage = (await client.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS,
                                                              "tool_choice": "none", "max_tokens": 1})).json()["usage"]
    assert usage["prompt_tokens"] == with_tools["count"]


async def test_detokenize_inverts_tokenize(client):
    tokens = (await client.post("/tokenize", json={"prompt": "hello world"})).json()["tokens"]
    r = await client.post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 200 and r.json() == {"prompt": "hello world"}


@pytest.mark.parametrize("path, body, status", [
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": "x", "tools": TOOLS}, 400),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {"tokens": ["a"]}, 400),
])
async def test_bad_requests_are_refused(client, path, body, status):
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- how the chat is rendered: vLLM's add_generation_prompt, continue_final_message, chat_template_kwargs --
def rendered(engine, tokens: list[int]) -> str:
    return engine.tokenizer.decode(tokens)


async def test_generation_prompt_and_continuing_the_final_message(client, engine):
    opened = (await client.post("/tokenize", json={"messages": MESSAGES})).json()["tokens"]
    closed = (await client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False})).json()
    assert rendered(engine, opened).endswith("<|im_start|>assistant\n")
    assert rendered(engine, closed["tokens"]).endswith("What is 2 + 2?<|im_end|>\n")
    started = MESSAGES + [{"role": "assistant", "content": "The answer is"}]
    body = {"messages": started, "add_generation_prompt": False, "continue_final_message": True}
    cont = (await client.post("/tokenize", json=body)).json()["tokens"]
    assert rendered(engine, cont).endswith("<|im_start|>assistant\nThe answer is")
    assert cont[: len(opened)] == opened  # the same chat, then the answer's start, left open
    usage = (await client.post("/v1/chat/completions", json={**body, "max_tokens": 1})).json()["usage"]
    assert usage["prompt_tokens"] == len(cont)


THINKING_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
                     "{% if enable_thinking is defined and not enable_thinking %} <think></think>{% endif %}")


async def test_chat_template_kwargs_reach_the_template(client, engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", THINKING_TEMPLATE)
    plain = (await client.post("/tokenize", json={"messages": MESSAGES})).json()["tokens"]
    body = {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}}
    off = (await client.post("/tokenize", json=body)).json()["tokens"]
    assert rendered(engine, off) == rendered(engine, plain) + " <think></think>"
    usage = (await client.post("/v1/chat/completions", json={**body, "max_tokens": 1})).json()["usage"]
    assert usage["prompt_tokens"] == len(off)


RAISING_TEMPLATE = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the "
                    "user\\'s') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.mark.parametrize("body, param, message", [
    ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message", "add_generation_prompt"),
    ({"add_generation_prompt": False, "continue_final_message": True}, "continue_final_message", "assistant message"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "tools"),
    ({"chat_template_kwargs": {"messages": [], "add_generation_prompt": False}}, "chat_template_kwargs",
     "add_generation_prompt, messages"),
    ({"chat_template_kwargs": "x"}, "chat_template_kwargs", ""),
])
async def test_bad_rendering_options_are_400(client, body, param, message):
    for path in ("/tokenize", "/v1/chat/completions"):
        r = await client.post(path, json={"messages": MESSAGES, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and message in error["message"], error


async def test_a_chat_the_template_refuses_is_400(client, engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", RAISING_TEMPLATE)
    for path in ("/tokenize", "/v1/chat/completions"):
        r = await client.post(path, json={"messages": MESSAGES})  # a system message first
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "messages" and "the first message must be the user's" in error["message"]
    ok = await client.post("/tokenize", json={"messages": MESSAGES[1:]})
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def bos_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a tokenizer that adds BOS to what it encodes, as Llama 3's and Mistral's do."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bos-model")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                             special_tokens=[(bos, tok.bos_token_id)])
    tok.save_pretrained(path)
    return path


async def test_special_tokens_are_added_as_the_tokenizer_and_vllm_add_them(bos_model_dir, tmp_path):
    """Text prompts get the tokenizer's BOS (as `tokenizer(text)`, transformers' generate and vLLM's
    completions do), unless `add_special_tokens` is false; a rendered chat does not get another (vLLM's
    default), unless asked; /tokenize follows the same defaults for a prompt and for messages."""
    from server_helpers import client_for, make_server_engine

    from s2ft_serve.server.app import create_app
    from s2ft_serve.server.settings import ServerSettings

    engine = make_server_engine(bos_model_dir, tmp_path)
    bos = engine.tokenizer.bos_token_id
    try:
        settings = ServerSettings(model=str(bos_model_dir), dtype="float32", device="cpu")
        async with client_for(create_app(settings, engine)) as client:
            plain = engine.tokenize("The quick fox", add_special_tokens=False)
            assert engine.tokenize("The quick fox") == [bos] + plain
            r = (await client.post("/tokenize", json={"prompt": "The quick fox"})).json()
            assert r["tokens"] == [bos] + plain
            r = (await client.post("/tokenize", json={"prompt": "The quick fox", "add_special_tokens": False})).json()
            assert r["tokens"] == plain
            body = {"prompt": "The quick fox", "max_tokens": 1, "echo": True, "logprobs": 0}
            usage = (await client.post("/v1/completions", json=body)).json()["usage"]
            assert usage["prompt_tokens"] == len(plain) + 1
            usage = (await client.post("/v1/completions", json={**body, "add_special_tokens": False})).json()["usage"]
            assert usage["prompt_tokens"] == len(plain)
            chat = engine.apply_chat_template(MESSAGES)
            assert chat.count(bos) == engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False).count(
                engine.tokenizer.bos_token)  # only what the template writes
            assert (await client.post("/tokenize", json={"messages": MESSAGES})).json()["tokens"] == chat
            extra = (await client.post("/tokenize", json={"messages": MESSAGES, "add_special_tokens": True})).json()
            assert extra["tokens"] == [bos] + chat
            reply = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
            assert reply.json()["usage"]["prompt_tokens"] == len(chat)
    finally:
        engine.shutdown(timeout=5)
