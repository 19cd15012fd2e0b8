"""Throughput of the exact blocked search of `llave-ds mine` (`llave_ds.mine.search.topk_blocks`).

    python benchmarks/mine_search.py [--queries 4096] [--candidates 100000] [--dim 1536] [--k 100]

Random unit vectors, candidates in shards of ``--block`` rows (as the store reads them), one
query block; prints the time, the scored pairs per second and the GFLOP/s of the products,
then what one pass over a 1M-candidate pool would take for 1M queries at that rate; the JSON
line last. docs/MINING.md quotes the numbers with their machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from llave_ds.mine.search import topk_blocks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--candidates", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.standard_normal((n, args.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    q = unit(args.queries)
    blocks = [unit(min(args.block, args.candidates - i)) for i in range(0, args.candidates, args.block)]
    device = torch.device(args.device)
    topk_blocks(q[:64], blocks[:1], args.k, device=device)              # warm-up
    t0 = time.perf_counter()
    topk_blocks(q, blocks, args.k, query_block=args.queries, device=device)
    seconds = time.perf_counter() - t0
    pairs = args.queries * args.candidates
    gflops = 2 * pairs * args.dim / seconds / 1e9
    full = 1e6 * 1e6 / (pairs / seconds)
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, {device}"
    print("| queries | candidates | dim | k | device | seconds | pairs/s | GFLOP/s | 1M x 1M at this rate |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.queries} | {args.candidates} | {args.dim} | {args.k} | {device} | {seconds:.2f} | "
          f"{pairs / seconds:.3g} | {gflops:.1f} | {full / 3600:.1f} h |")
    print(json.dumps({"benchmark": "mine_search", "machine": machine, "queries": args.queries,
                      "candidates": args.candidates, "dim": args.dim, "k": args.k, "device": str(device),
                      "seconds": round(seconds, 3), "pairs_per_s": pairs / seconds, "gflops": gflops,
                      "hours_1m_by_1m": full / 3600}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
