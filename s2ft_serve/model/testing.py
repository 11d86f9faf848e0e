"""Tiny random Llama-family models and an offline byte-level BPE tokenizer, for tests and demos.

Built from a config (2 layers, hidden 64) and saved as a normal Hugging Face folder, so every
code path that loads a real model can run in seconds without any download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny tokenizer for tests of s2ft-serve.",
    "user assistant system: What is 2 + 2? The answer is 4.",
    "Structured sparse fine-tuning updates a few columns of o_proj and down_proj.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def device_under_test() -> str:
    """Where tests run the engines and trainers they build: `S2FT_TEST_DEVICE` (default cpu; `cuda`
    runs them on the GPU, their references staying on the CPU)."""
    return os.environ.get("S2FT_TEST_DEVICE", "cpu")


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained offline on a tiny corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
    )


def make_sentencepiece_tokenizer(vocab_size: int = 600):
    """A tokenizer as Llama 2's and Mistral's: SentencePiece-style BPE (words start with "▁", the first
    one's leading space stripped when decoding), unknown characters as byte tokens `<0xNN>`, BOS added."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    data = json.loads(tok.to_str())  # byte tokens are ordinary vocabulary entries, as in Llama 2's tokenizer.json
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        chat_template="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                      "{% if add_generation_prompt %}[assistant]{% endif %}",
    )


def make_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, layers: int = 2,
                    kv_heads: int = 2, tokenizer=None) -> Path:
    """Write a tiny random model of `arch` (llama, qwen2, qwen3, mistral) to `path`; return it.

    `kv_heads=4` (as many as query heads) gives multi-head rather than grouped-query attention;
    `tokenizer` defaults to `make_tokenizer()`.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = tokenizer or make_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), layers=layers)
    config.num_key_value_heads = kv_heads
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so different adapters give different tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(arch: str, vocab_size: int, layers: int = 2):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=arch != "mistral",
    )
    if arch == "llama":
        return LlamaConfig(head_dim=16, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "mistral":
        return MistralConfig(head_dim=16, sliding_window=None, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def random_adapter(model: torch.nn.Module, base_model: str, seed: int, heads: int = 1, channels: int = 8,
                   scale: float = 0.05, fingerprint: str | None = None, dtype: torch.dtype = torch.float32):
    """A random adapter: `heads` o_proj heads and `channels` down_proj columns per layer, deltas in
    `dtype` (as a file saved in that dtype holds them); a module given 0 columns has no entry."""
    from s2ft_serve.adapters.format import Adapter, ModuleDelta, make_config
    from s2ft_serve.model.loading import head_dim_of, target_linears

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    head_dim = head_dim_of(cfg)
    modules = {}
    for name, lin in target_linears(model).items():
        if name.endswith("o_proj"):
            chosen = torch.randperm(cfg.num_attention_heads, generator=g)[:heads]
            index = (chosen[:, None] * head_dim + torch.arange(head_dim)[None]).reshape(-1)
        else:
            index = torch.randperm(lin.in_features, generator=g)[:channels]
        if index.numel() == 0:
            continue
        delta = (torch.randn(lin.out_features, index.numel(), generator=g) * scale).to(dtype)
        modules[name] = ModuleDelta(index=index.to(torch.int64), delta=delta)
    config = make_config(base_model, fingerprint, selection={"strategy": "random", "seed": seed})
    return Adapter(config=config, modules=modules)
