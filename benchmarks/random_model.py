"""A model folder with another folder's architecture and tokenizer but random weights.

Decode speed does not depend on the weights' values, so a speed benchmark can run where the real
weights are not at hand (a GPU machine with no network and no room to carry them), on exactly the
default model's shapes: copy the default model's config and tokenizer files (a few MB), then

    python benchmarks/random_model.py --source ~/.cache/s2ft_serve/models/SmolLM2-135M-Instruct --out /tmp/smol-random
    python benchmarks/engine_throughput.py --device cuda --model /tmp/smol-random ...

`--source` needs `config.json` and the tokenizer files only; a `model.safetensors` there is ignored.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "generation_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="a folder with config.json and tokenizer files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    source, out = Path(args.source), Path(args.out)
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(source)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # the config's own init (std 0.02)
    model.save_pretrained(out)
    for name in COPIED:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    print(f"{out}: {config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random parameters")


if __name__ == "__main__":
    main()
