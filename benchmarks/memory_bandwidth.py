"""The memory bandwidth a mixed-adapter decode step's table read meets: per core, per chip, and from cache.

Goal 1 of the core engine (32 distinct adapters decode at >= 0.95x the base's speed) is bound by how
fast the adapters' columns can be read, since each step reads every adapter's tables once. This prints,
for a `torch.sum` over float32 buffers of several sizes (the compiled kernel reads as fast, see
adapter_kernel.py), the read bandwidth with 1 and with 2 threads (if one core's bandwidth were close to
the chip's, one core could read the tables while the other computed; on a core-bound machine it cannot),
and whether a buffer stays in the last-level cache across a step's other traffic: the read of a buffer
straight after reading it ("hot") against the read after streaming `--evict-mb` of other data (a step
reads ~540 MB of base weights), each the median over rounds that take both in turn.

    python benchmarks/memory_bandwidth.py --sizes-mb 16,32,64,128,256 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="16,32,64,128,256", help="buffer sizes (MiB), comma-separated")
    ap.add_argument("--evict-mb", type=int, default=512, help="data streamed between a buffer's reads")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    other = torch.ones(args.evict_mb * 2**18)
    print(f"torch.sum over float32 buffers; 'after' = read again after streaming {args.evict_mb} MiB of other data")
    print(f"{'threads':>7} {'MiB':>5} {'hot ms':>8} {'hot GB/s':>9} {'after ms':>9} {'after GB/s':>10} {'after/hot':>9}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for mb in sizes:
            buf = torch.ones(mb * 2**18)
            buf.sum()

            hot, after = [], []
            for _ in range(args.repeats):  # each round: a read straight after a read, then one after the stream
                buf.sum()
                hot.append(timed_ms(buf.sum))
                other.sum()
                after.append(timed_ms(buf.sum))
            hot_ms, after_ms = statistics.median(hot), statistics.median(after)
            gb = mb * 2**20 / 1e9
            print(f"{threads:>7} {mb:>5} {hot_ms:>8.2f} {gb / hot_ms * 1e3:>9.1f} {after_ms:>9.2f} "
                  f"{gb / after_ms * 1e3:>10.1f} {after_ms / hot_ms:>9.2f}")


if __name__ == "__main__":
    main()
