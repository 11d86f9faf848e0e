"""`s2ft-adapter`: offline tools for S²FT adapter folders.

    s2ft-adapter inspect DIR [--json] [--head-dim N]
    s2ft-adapter merge --out DIR A[:weight] B[:weight] ...
    s2ft-adapter fuse --model M --adapter A --out DIR
    s2ft-adapter extract --base B --tuned T --out DIR [--tolerance T]

Every command refuses to write into an existing non-empty folder, writes its output atomically,
and reports errors as one clear line on stderr (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from s2ft_serve.adapters.format import Adapter, is_utf8, load_adapter, printable
from s2ft_serve.errors import S2FTError

EXIT_ERROR = 2


def say(text: str, file=None) -> None:
    """Print `text`, a file name that is not UTF-8 in it as `\\xNN` escapes (print would raise)."""
    print(printable(text), file=file or sys.stdout)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2ft-adapter",
                                     description="Inspect, merge, fuse and extract S²FT adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show an adapter's config, modules, heads/channels per layer, size")
    p.add_argument("dir", help="adapter folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--head-dim", type=positive_int, default=None,
                   help="attention head size, to count heads (default: read from the base model's config if found)")

    p = sub.add_parser("merge", help="weighted sum of adapters over the union of their indices")
    p.add_argument("sources", nargs="+", metavar="ADAPTER[:WEIGHT]", help="adapter folder, optional :weight (default 1)")
    p.add_argument("--out", required=True, help="new folder for the merged adapter")
    p.add_argument("--base-model", default=None, help="base_model to record (default: the first source's)")

    p = sub.add_parser("fuse", help="write base + adapter as a full Hugging Face model folder")
    p.add_argument("--model", default="default", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="new folder for the fused model")

    p = sub.add_parser("extract", help="diff a fully fine-tuned checkpoint against its base into an adapter")
    p.add_argument("--base", default="default", help="base model folder (default: the embedded model)")
    p.add_argument("--tuned", required=True, help="fine-tuned model folder (safetensors)")
    p.add_argument("--out", required=True, help="new folder for the adapter")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest absolute difference treated as unchanged (default 1e-6)")
    return parser


# paths an output's config records, and the output's own (the engine and safetensors read only UTF-8 paths)
RECORDED_ARGS = ("out", "model", "adapter", "base", "tuned", "base_model")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):  # exit as Python does: a half-written output is removed (QA:
            previous[sig] = signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))  # `timeout`, a cancel)
    try:
        return _run(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    commands = {"inspect": cmd_inspect, "merge": cmd_merge, "fuse": cmd_fuse, "extract": cmd_extract}
    try:
        for value in [getattr(args, name, None) for name in RECORDED_ARGS] + list(getattr(args, "sources", [])):
            if value is not None and not is_utf8(value):  # QA: merge wrote a config nothing could load
                say(f"s2ft-adapter {args.command}: error: {value}: "
                    f"not valid UTF-8; adapter configs record paths as text", file=sys.stderr)
                return EXIT_ERROR
        return commands[args.command](args)
    except BrokenPipeError:  # `inspect ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except S2FTError as exc:
        say(f"s2ft-adapter {args.command}: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the file system refused a read or write the checks could not foresee
        where = f"{exc.filename}: " if exc.filename else ""
        say(f"s2ft-adapter {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except SafetensorError as exc:  # a base model's damaged weights file (QA: a traceback, exit 1)
        model = getattr(args, "model", None) or getattr(args, "base", None)
        say(f"s2ft-adapter {args.command}: error: {model}: its weights are not readable safetensors ({exc})",
            file=sys.stderr)
        return EXIT_ERROR


def cmd_inspect(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.dir)
    head_dim = args.head_dim or recorded_head_dim(adapter.config) or base_head_dim(adapter.config.get("base_model", ""))
    report = inspect_report(adapter, head_dim)
    if args.json:
        say(json.dumps(report))
    else:
        say(format_inspect(report))
    return 0


def inspect_report(adapter: Adapter, head_dim: int | None) -> dict:
    """Everything `inspect` shows, as one JSON-ready dict."""
    summary = adapter.summary(head_dim)
    dtypes = sorted({str(md.delta.dtype).replace("torch.", "") for md in adapter.modules.values()})
    return {
        "path": str(adapter.path),
        "base_model": adapter.base_model,
        "base_model_fingerprint": adapter.fingerprint,
        "target_modules": adapter.config.get("target_modules"),
        "modules": summary["modules"],
        "layers": len(summary["per_layer"]),
        "parameters": summary["parameters"],
        "bytes": summary["bytes"],
        "dtypes": dtypes,
        "head_dim": head_dim,
        "per_layer": summary["per_layer"],
        "config": adapter.config,
    }


def format_inspect(report: dict) -> str:
    lines = [
        f"adapter      {report['path']}",
        f"base model   {report['base_model']}",
        f"fingerprint  {report['base_model_fingerprint'] or '(none recorded)'}",
        f"targets      {', '.join(report['target_modules'] or [])}",
        f"modules      {report['modules']} in {report['layers']} layers",
        f"parameters   {report['parameters']:,}",
        f"size         {_human_bytes(report['bytes'])} ({report['bytes']:,} bytes, {', '.join(report['dtypes'])})",
        "",
        f"{'layer':>6} {'heads':>6} {'o_proj cols':>12} {'channels':>9}",
    ]
    for layer, entry in report["per_layer"].items():
        heads = entry.get("heads", "?") if "o_proj_columns" in entry else 0
        lines.append(f"{layer:>6} {heads:>6} {entry.get('o_proj_columns', 0):>12} {entry.get('channels', 0):>9}")
    if not report["head_dim"]:
        lines.append("(heads unknown: base model config not found; pass --head-dim)")
    lines += ["", "config:", json.dumps(report["config"], indent=2)]
    return "\n".join(lines)


def recorded_head_dim(config: dict) -> int | None:
    """The head size s2ft-train recorded with its selection (the base model's path may not resolve from here)."""
    selection = config.get("selection")
    value = selection.get("head_dim") if isinstance(selection, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def base_head_dim(base_model: str) -> int | None:
    """The head size from the base model's config.json, when the base is a local folder we can find."""
    from s2ft_serve.model.loading import DEFAULT_MODEL_NAME, default_model_dir_if_exists

    if not isinstance(base_model, str) or not base_model:
        return None
    try:  # informational: any failure means "heads unknown" (QA: a long name or a list config.json failed inspect)
        candidate = default_model_dir_if_exists() if base_model == DEFAULT_MODEL_NAME else Path(base_model)
        config_path = candidate / "config.json" if candidate else None
        if config_path is None or not config_path.is_file():
            return None
        config = json.loads(config_path.read_text())
        value = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def parse_source(spec: str) -> tuple[str, float]:
    """`path[:weight]`; a path may itself hold colons, so only a numeric last part is a weight."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def cmd_merge(args: argparse.Namespace) -> int:
    from s2ft_serve.adapters.compose import merge_adapters
    from s2ft_serve.adapters.format import save_adapter
    from s2ft_serve.adapters.interop import atomic_dir, check_output_dir

    out = Path(args.out)
    check_output_dir(out)
    specs = [parse_source(s) for s in args.sources]
    sources = [(load_adapter(path), weight) for path, weight in specs]
    base_model = args.base_model or sources[0][0].base_model
    merged = merge_adapters(sources, base_model=base_model, fingerprint=None, names=[p for p, _ in specs])
    with atomic_dir(out) as tmp:
        save_adapter(merged, tmp)
    parts = " + ".join(f"{w:g}*{p}" for p, w in specs)
    say(f"merged {parts} -> {out} ({len(merged.modules)} modules, {merged.num_parameters():,} parameters)")
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from s2ft_serve.adapters.interop import fuse_to_model

    report = fuse_to_model(None if args.model == "default" else args.model, args.adapter, args.out)
    say(f"fused {report.adapter} into {report.base_model} -> {report.out_dir} "
        f"({report.modules} modules, {report.parameters:,} parameters, weights in {report.dtype})")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from s2ft_serve.adapters.extract import DEFAULT_TOLERANCE, PERMUTATION_FILE, extract_adapter

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    base = None if args.base == "default" else args.base
    report = extract_adapter(base, args.tuned, args.out, tolerance=tolerance)
    say(f"extracted {report.tuned} (diffed against {report.base_model}) -> {report.out_dir} "
        f"({report.modules} modules, {report.parameters:,} parameters; other weights within "
        f"{report.max_unchanged_diff:.3g} of the base)")
    if report.permuted:
        say(f"the checkpoint's heads/FFN channels were permuted (S²FT reference-code layout) in "
            f"{len(report.permutations)} layer(s); undone. Full permutation: {report.out_dir / PERMUTATION_FILE}")
        say(json.dumps({"permutation": report.permutation_summary()}))
    else:
        say("no permutation: the checkpoint is in the base model's order")
    return 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
