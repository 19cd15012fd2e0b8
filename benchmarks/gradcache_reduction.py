"""Coalesced vs per-chunk gradient reduction in the gradient cache, on N local ranks.

    python benchmarks/gradcache_reduction.py [--ranks 2] [--stages 2 3] [--steps 6]

Re-launches itself under torchrun when started as a plain script. Encoder: an MLP
(``--width``, ``--depth``); each step encodes a global batch of ``--batch`` pairs in
chunks of ``--chunk`` on every rank. Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPEncoder(nn.Module):
    def __init__(self, width: int, depth: int, d_in: int = 64, d_out: int = 64):
        super().__init__()
        layers = [nn.Linear(d_in, width), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.body = nn.Sequential(*layers, nn.Linear(width, d_out))

    def forward(self, x):
        return F.normalize(self.body(x), dim=-1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--batch", type=int, default=64, help="global batch (pairs)")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    return p.parse_args(argv)


def worker(args) -> None:
    from llave_ds.core import distributed
    from llave_ds.core.gradcache import gradcache_step
    from llave_ds.core.objective import ObjectiveConfig
    from llave_ds.training.engine import DeepSpeedStepBackend, build_engine, complete_ds_config

    env = distributed.init_distributed(timeout_s=300)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // env.world_size))
    local = args.batch // env.world_size
    rows = []
    for stage in args.stages:
        for reduction in ("coalesced", "per_chunk"):
            torch.manual_seed(0)
            model = MLPEncoder(args.width, args.depth)
            n_params = sum(p.numel() for p in model.parameters())
            ds = complete_ds_config({"zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9},
                                    local_batch_size=local, world_size=env.world_size)
            engine = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-4), ds)
            backend = DeepSpeedStepBackend(engine, reduction=reduction)
            times = []
            for step in range(args.steps + 2):
                g = torch.Generator().manual_seed(step * 100 + env.rank)
                q, t = torch.randn(local, 64, generator=g), torch.randn(local, 64, generator=g)
                qc = [{"x": q[i:i + args.chunk]} for i in range(0, local, args.chunk)]
                tc = [{"x": t[i:i + args.chunk]} for i in range(0, local, args.chunk)]
                t0 = time.perf_counter()
                res = gradcache_step(backend, qc, tc, ObjectiveConfig(), [], 0)
                if step >= 2:
                    times.append((time.perf_counter() - t0, res.timings["reencode_backward"]))
            rows.append(dict(stage=stage, reduction=reduction, params=n_params,
                             step_s=statistics.median(t for t, _ in times),
                             backward_s=statistics.median(b for _, b in times)))
            del engine, backend, model
    if env.rank == 0:
        print(f"{'stage':>5} {'reduction':>10} {'params':>9} {'step s':>8} {'re-enc+bwd s':>13}")
        for r in rows:
            print(f"{r['stage']:>5} {r['reduction']:>10} {r['params']:>9} {r['step_s']:>8.4f} {r['backward_s']:>13.4f}")
        print(json.dumps(dict(benchmark="gradcache_reduction", ranks=env.world_size, batch=args.batch,
                              chunk=args.chunk, chunks_per_rank_per_role=-(-local // args.chunk), rows=rows)))
    distributed.shutdown_distributed()


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
               "--master_port", str(29400 + os.getpid() % 1000), __file__, *(argv or sys.argv[1:])]
        return subprocess.call(cmd)
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
