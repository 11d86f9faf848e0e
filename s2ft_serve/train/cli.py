"""`s2ft-train`: the command line of the trainer, generated from `TrainConfig`'s fields.

Every `TrainConfig` field is one option (`learning_rate` -> `--learning-rate`), with the help
text, default and choices the field declares, so the CLI and `train(TrainConfig(...))` accept
exactly the same options. Booleans get `--flag` / `--no-flag`.
"""

from __future__ import annotations

import argparse
import json
import sys
import os
from dataclasses import MISSING, fields

from s2ft_serve.errors import S2FTError
from s2ft_serve.train.config import TrainConfig

EXAMPLES = """examples:
  s2ft-train --data train.jsonl --output adapters/mine
  s2ft-train --data chat.jsonl --val-data val.jsonl --output out --strategy activation \\
             --heads-per-layer 1 --channels-per-layer 32 --max-steps 500 --save-every 100
  torchrun --nproc_per_node=2 -m s2ft_serve.train.cli --data train.jsonl --output out
"""


def _base_type(annotation) -> type:
    """`"int | None"` -> int, `"str"` -> str (annotations are strings under `from __future__`)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.split("|")[0].strip() == name:
            return kind
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2ft-train",
        description="Train an S²FT adapter (format v1) on a base model: only a few o_proj head columns and "
                    "down_proj channel columns per layer are updated.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(TrainConfig):
        kind = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        help_text = f.metadata["help"] + ("" if default in ("", None) else f" (default: {default})")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text,
                            choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else f.name.upper())
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    from s2ft_serve.train.trainer import train

    try:
        result = train(cfg)
    except S2FTError as exc:
        print(f"s2ft-train: error: {exc.message}", file=sys.stderr)
        return 2
    summary = {"adapter": str(result.path), "steps": result.steps, "final_train_loss": result.final_train_loss,
               "final_val_loss": result.final_val_loss,
               "trainable_parameters": result.adapter.num_parameters()}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
