"""`s2ft-loadtest`: run, sweep, chaos and make-adapters, against any OpenAI-compatible server.

Every command prints a plain table and, with `--json PATH` (`-` for stdout), writes one JSON
document. The exit status is 0 on success, 1 when a chaos check fails, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import httpx

from loadtest.adapters import AdapterBudget, adapter_names, create_adapters
from loadtest.admin import AdminClient, process_rss_bytes, scrape_metric
from loadtest.chaos import ChaosPlan, run_chaos
from loadtest.client import Target, make_http_client
from loadtest.errors import LoadtestConfigError
from loadtest.runner import run_workload
from loadtest.stats import render_summary, render_table, summarize
from loadtest.sweep import Preload, parse_counts, run_sweep, sweep_table
from loadtest.workload import LengthDist, Popularity, WorkloadSpec

RSS_METRIC = "process_resident_memory_bytes"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2ft-loadtest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one load run: throughput, latency percentiles, errors")
    sweep = sub.add_parser("sweep", help="the same load at several adapter counts")
    chaos = sub.add_parser("chaos", help="adapter churn under traffic, then a solo re-send check")
    make = sub.add_parser("make-adapters", help="write N random adapters (format v1) for a base model")
    for p in (run, sweep, chaos):
        _add_target_args(p)
        _add_workload_args(p)
    for p in (sweep, chaos, make):
        _add_adapter_dir_args(p)
    run.add_argument("--adapters", default="", help="comma-separated adapter names (default: the base model)")
    run.add_argument("--num-adapters", type=int, default=0, help="use lt-0000 ... lt-<N-1> instead of --adapters")
    run.add_argument("--prefix", default="lt-", help="adapter name prefix for --num-adapters")
    run.add_argument("--server-memory", action="store_true",
                     help=f"report the server's resident memory before, after, and after --cooldown (from "
                          f"/proc/<--server-pid>/status when given, else {RSS_METRIC} on /metrics)")
    run.add_argument("--server-pid", type=int, default=None, help="the server's process id, when it runs here")
    run.add_argument("--cooldown", type=float, default=5.0, help="seconds to wait before the last memory reading")
    sweep.add_argument("--counts", default="1,8,64,512", help="adapter counts to sweep (0: the base model)")
    sweep.add_argument("--preload", default="warmup", choices=["admin", "warmup", "none"],
                       help="make adapters resident by the admin API, one tiny request each, or not at all")
    sweep.add_argument("--warmup-requests", type=int, default=8, help="unmeasured requests before each point")
    sweep.add_argument("--rounds", type=int, default=1,
                       help="measure every count this many times, interleaved; report the median round")
    chaos.add_argument("--num-adapters", type=int, default=4, help="adapters under traffic")
    chaos.add_argument("--interval", type=float, default=0.3, help="mean seconds between chaos operations")
    make.add_argument("--count", type=int, required=True, help="how many adapters (lt-0000 ...)")
    make.add_argument("--second-version", action="store_true", help="also write <name>--b with other weights")
    return parser


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL, without /v1")
    p.add_argument("--api-key", default=os.environ.get("S2FT_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--admin-key", default=os.environ.get("S2FT_ADMIN_KEY"))
    p.add_argument("--base-model", default=None, help="the base model's id (default: asked from /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--stream", action="store_true", help="stream (needed for TTFT and TPOT)")
    p.add_argument("--no-stream-usage", action="store_true", help="do not send stream_options.include_usage")
    p.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos (exact output lengths)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as a timeout")
    p.add_argument("--json", dest="json_path", default=None, help="write the JSON report here ('-': stdout)")


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--requests", type=int, default=None, help="total requests (default 100)")
    stop.add_argument("--duration", type=float, default=None, help="seconds to keep sending")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 4)")
    pace.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests per second")
    p.add_argument("--popularity", default="uniform", help="uniform, zipf:<alpha> or single")
    p.add_argument("--prompt-len", default="32", help="words per prompt: N, uniform:LO:HI or normal:MEAN:STD")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS",
                   help="start every prompt with the same WORDS words (a system prompt: exercises prefix caching)")
    p.add_argument("--output-len", default="32", help="max_tokens: N, uniform:LO:HI or normal:MEAN:STD")
    p.add_argument("--include-base", action="store_true", help="also send requests to the base model")
    p.add_argument("--seed", type=int, default=0)


def _add_adapter_dir_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-dir", default=None, help="local folder of the load test's adapters (--adapter-root)")
    p.add_argument("--server-adapter-dir", default=None,
                   help="the same folder as the server sees it (default: --adapter-dir; neither: send paths "
                        "relative to the server's --adapter-root)")
    p.add_argument("--create", action="store_true", help="write missing adapters into --adapter-dir first")
    p.add_argument("--model", default=None, help="base model folder for --create (default: the embedded one)")
    p.add_argument("--prefix", default="lt-", help="adapter name prefix")
    p.add_argument("--heads", type=int, default=1, help="o_proj heads per layer in created adapters")
    p.add_argument("--channels", type=int, default=16, help="down_proj channels per layer in created adapters")
    p.add_argument("--scale", type=float, default=0.02, help="std of the random deltas")
    p.add_argument("--delta-dtype", default="float32", help="float32, bfloat16 or float16")


def workload_from_args(args: argparse.Namespace, adapters: list[str | None]) -> WorkloadSpec:
    if args.include_base and None not in adapters:
        adapters = adapters + [None]
    spec = WorkloadSpec(
        adapters=adapters,
        popularity=Popularity.parse(args.popularity),
        prompt_len=LengthDist.parse(args.prompt_len),
        output_len=LengthDist.parse(args.output_len),
        num_requests=args.requests if args.duration is None else None,
        duration_s=args.duration,
        concurrency=args.concurrency if args.rate is None else None,
        rate=args.rate,
        shared_prefix=args.shared_prefix,
        seed=args.seed,
    )
    if spec.num_requests is None and spec.duration_s is None:
        spec.num_requests = 100
    if spec.concurrency is None and spec.rate is None:
        spec.concurrency = 4
    spec.validate()
    return spec


async def target_from_args(args: argparse.Namespace) -> tuple[Target, AdminClient, httpx.AsyncClient]:
    """The target, plus an admin client whose HTTP client the caller closes."""
    draft = Target(base_url=args.url.rstrip("/"), base_model=args.base_model or "", api_key=args.api_key)
    http = make_http_client(draft, 8)
    admin = AdminClient(http, admin_key=args.admin_key, api_key=args.api_key)
    try:
        base_model = args.base_model or await admin.base_model()
    except LoadtestConfigError:
        await http.aclose()
        raise
    target = Target(base_url=draft.base_url, base_model=base_model, api_key=args.api_key, endpoint=args.endpoint,
                    stream=args.stream, temperature=args.temperature, stream_usage=not args.no_stream_usage,
                    ignore_eos=args.ignore_eos, timeout_s=args.timeout)
    return target, admin, http


def _budget(args: argparse.Namespace) -> AdapterBudget:
    return AdapterBudget(heads=args.heads, channels=args.channels, scale=args.scale, dtype=args.delta_dtype)


def _adapter_dirs(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """The local adapter folder, and the path prefix to send (None: names relative to the server's root)."""
    local = Path(args.adapter_dir).resolve() if args.adapter_dir else None
    server = args.server_adapter_dir or (str(local) if local else None)
    if args.create and local is None:
        raise LoadtestConfigError("--create needs --adapter-dir")
    return local, server


async def cmd_run(args: argparse.Namespace) -> int:
    names: list[str | None] = [n.strip() for n in args.adapters.split(",") if n.strip()]
    if args.num_adapters:
        names = list(adapter_names(args.num_adapters, args.prefix))
    spec = workload_from_args(args, names or [None])
    target, admin, http = await target_from_args(args)
    try:
        extra = {}

        async def rss() -> float | None:
            if args.server_pid is not None:
                return _mb(process_rss_bytes(args.server_pid))
            return _mb(await scrape_metric(http, RSS_METRIC))

        if args.server_memory:
            extra["server_rss_mb_before"] = await rss()
        run = await run_workload(spec, target)
        if args.server_memory:
            extra["server_rss_mb_after"] = await rss()
            await asyncio.sleep(args.cooldown)
            extra["server_rss_mb_after_cooldown"] = await rss()
    finally:
        await http.aclose()
    labels = {"adapters": len([n for n in spec.adapters if n]), "popularity": args.popularity,
              "concurrency": spec.concurrency, "rate": spec.rate, "stream": args.stream}
    summary = summarize(run.results, run.wall_s, labels)
    summary.extra.update(extra)
    print(render_summary(summary))
    _write_json(args, summary.to_dict())
    return 0


async def cmd_sweep(args: argparse.Namespace) -> int:
    counts = parse_counts(args.counts)
    local, server = _adapter_dirs(args)
    if args.create:
        create_adapters(local, adapter_names(max(counts), args.prefix), args.model, _budget(args))
    spec = workload_from_args(args, [None])
    target, admin, http = await target_from_args(args)
    try:
        preload = Preload(mode=args.preload, server_dir=server, warmup_requests=args.warmup_requests)
        points = await run_sweep(counts, spec, target, admin, preload, args.prefix, args.rounds, args.include_base)
    finally:
        await http.aclose()
    print(sweep_table(points))
    _write_json(args, {"points": [{"count": p.count, "rounds_tok_s": p.rounds_tok_s,
                                             "summary": p.summary.to_dict()} for p in points]})
    return 0


async def cmd_chaos(args: argparse.Namespace) -> int:
    local, server = _adapter_dirs(args)
    if args.num_adapters < 1:
        raise LoadtestConfigError("chaos needs at least one adapter under traffic (--num-adapters)")
    names = adapter_names(args.num_adapters + 1, args.prefix)
    traffic, churn = names[:-1], names[-1]
    if args.create:
        create_adapters(local, names, args.model, _budget(args))
        create_adapters(local, [f"{n}--b" for n in traffic], args.model, _budget(args), seed_offset=1)
    spec = workload_from_args(args, list(traffic))
    target, admin, http = await target_from_args(args)
    plan = ChaosPlan(names=list(traffic), server_dir=server or "", churn_name=churn, interval_s=args.interval,
                     seed=args.seed)
    try:
        report = await run_chaos(spec, target, admin, plan)
    finally:
        await http.aclose()
    print(render_summary(report.traffic, "chaos traffic"))
    rows = [[k, str(v)] for k, v in report.admin_ops.items()]
    print(render_table("admin operations", ["operation status", "count"], rows))
    verdict = "PASS" if report.passed else "FAIL"
    print(f"chaos {verdict}: {report.verified} answers checked, {len(report.mismatches)} mismatches, "
          f"{report.server_errors} 5xx, {report.reference_failures} failed re-sends; "
          f"{report.distinguishing} adapter answers differ between the adapter's two versions")
    if report.compared_nothing:
        why = f"every answer was empty ({report.empty})" if report.verified else "no request was answered"
        print(f"  {why}: nothing was compared")
    elif report.empty:
        print(f"  {report.empty} of the answers were empty (equal to any other empty answer: not a check)")
    for m in report.mismatches[:5]:
        print(f"  mismatch #{m.index} ({m.adapter}): got {m.got!r}, solo {m.expected!r}")
    _write_json(args, report.to_dict())
    return 0 if report.passed else 1


def cmd_make_adapters(args: argparse.Namespace) -> int:
    local, _ = _adapter_dirs(args)
    if local is None:
        raise LoadtestConfigError("make-adapters needs --adapter-dir")
    names = adapter_names(args.count, args.prefix)
    folders = create_adapters(local, names, args.model, _budget(args))
    if args.second_version:
        folders += create_adapters(local, [f"{n}--b" for n in names], args.model, _budget(args), seed_offset=1)
    print(f"{len(folders)} adapters in {local}")
    return 0


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _write_json(args: argparse.Namespace, payload: dict) -> None:
    """The JSON report to `--json` (a file, or '-': the command's real stdout, the tables being on stderr)."""
    path = args.json_path
    if not path:
        return
    text = json.dumps(payload, sort_keys=True, indent=None)
    if path == "-":
        print(text, file=args.json_out)
    else:
        Path(path).write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "make-adapters":
            return cmd_make_adapters(args)
        command = {"run": cmd_run, "sweep": cmd_sweep, "chaos": cmd_chaos}[args.command]
        args.json_out = sys.stdout
        if args.json_path == "-":  # stdout holds the JSON report alone, so that it parses; tables go to stderr
            with contextlib.redirect_stdout(sys.stderr):
                return asyncio.run(command(args))
        return asyncio.run(command(args))
    except LoadtestConfigError as exc:
        print(f"s2ft-loadtest: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
