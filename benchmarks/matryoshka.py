"""Matryoshka vs plain training on the offline synthetic task, from the ablation's warm start
(issue 27): what each small size scores, and what the full size pays for it.

    python benchmarks/matryoshka.py [--seeds 0 1 2 3 4] [--dims 8 16 32 full] [--work DIR]

Per seed, two runs from that seed's warm start (``llave_ds.toy.warm_start``, the tiny
LLaVA-OneVision, whose embeddings have 64 dimensions), identical but for the objective:

  plain       the ablation's arm (c): alpha = 9, cross-rank gather over 2 ranks, batch 64,
              150 steps (``benchmarks/ablation.py``'s defaults: lr 1e-3, ZeRO-2)
  matryoshka  the same with ``objective.matryoshka_dims`` = ``--dims`` (weights 1 each)

Both exports are scored at every size of ``--dims`` from one encoding each (``llave-ds eval
--dims``: the first d dimensions, re-normalised): hard P@1 (the mean P@1 of Synth_I2T_Hard and
Synth_T2I_Hard, chance 1/11) and P@1 over the six synthetic subsets. Printed: mean ± std over
the seeds per arm and size, the paired difference per size (t-test and exact sign-flip test
across seeds), a PNG of hard P@1 against the size, and one JSON line last. Runs are kept
under ``--work`` and reused (the ablation's machinery: one torchrun launch trains them all).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402  (benchmarks/ablation.py: runs, evaluation, paired tests)

METRICS = ("hard_p_at_1", "p_at_1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--dims", nargs="+", default=["8", "16", "32", "full"],
                   help="Matryoshka sizes trained (matryoshka arm) and scored (both arms)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--zero", choices=("zero2", "zero3"), default="zero2")
    p.add_argument("--train-per-subset", type=int, default=256)
    p.add_argument("--eval-per-subset", type=int, default=96)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--warm-steps", type=int, default=300)
    p.add_argument("--work", default="matryoshka_out")
    p.add_argument("--cache-dir", default=None, help="warm-start cache (default: llave_ds.toy.warm_start's)")
    p.add_argument("--figure", default=None, help="PNG of hard P@1 against the size (default: --work)")
    return p.parse_args(argv)


def plot(curves: dict, sizes: list, path: Path, seeds: int) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=120)
    for label, (means, stds) in curves.items():
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.axhline(1 / 11, color="grey", linestyle=":", linewidth=1, label="chance (1/11)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("embedding size (first d dimensions, re-normalised)")
    ax.set_ylabel(f"hard P@1 (mean ± std, {seeds} seed{'s' if seeds > 1 else ''})")
    ax.set_title("Matryoshka vs plain, synthetic hard subsets", fontsize=10)
    ax.legend(fontsize=8)
    return ablation.save_figure(fig, path)


def main(argv=None) -> int:
    from llave_ds.core.objective import check_matryoshka

    args = parse_args(argv)
    dims = check_matryoshka(args.dims, name="--dims")
    t_start = time.time()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, models = ablation.synthetic_data_and_warm_starts(args, work)

    arms = {"plain": None, "matryoshka": dims}
    keys = {arm: [ablation.run_key(args, s, 9.0, "exact", 1, 1, models[s], matryoshka=m) for s in args.seeds]
            for arm, m in arms.items()}
    results = ablation.run_phase(args, work, data, [k for ks in keys.values() for k in ks], eval_dims=dims)
    rows = {arm: [results[ablation.run_name(k)] for k in ks] for arm, ks in keys.items()}
    sizes = list(rows["plain"][0]["by_dim"])          # the resolved sizes, e.g. 8, 16, 32, 64
    table = {arm: {size: {m: ablation.mean_std([r["by_dim"][size][m] for r in rs]) for m in METRICS}
                   for size in sizes} for arm, rs in rows.items()}
    paired = [{"size": size, "metric": m,
               **ablation.paired_test(table["matryoshka"][size][m]["values"], table["plain"][size][m]["values"])}
              for size in sizes for m in METRICS]

    print(f"\nwarm start ({args.warm_steps} caption steps); seeds {args.seeds}; {args.steps} steps at batch "
          f"{args.batch}, alpha 9, gather over {args.ranks} ranks, lr {args.lr}, {args.zero}; "
          f"matryoshka_dims {dims}")
    print("\n| size | hard P@1 plain | hard P@1 Matryoshka | P@1 plain | P@1 Matryoshka |")
    print("|---|---|---|---|---|")
    for size in sizes:
        print(f"| {size} | " + " | ".join(ablation.fmt(table[arm][size][m]) for m in METRICS
                                           for arm in ("plain", "matryoshka")) + " |")
    print("\npaired across seeds (Matryoshka − plain; t-test and exact sign-flip test, two-sided):")
    print("| size | metric | mean diff ± sd | t | p (t) | p (sign-flip) | Matryoshka > plain in |")
    print("|---|---|---|---|---|---|---|")
    for p in paired:
        print(f"| {p['size']} | {p['metric']} | {p['mean_diff']:+.4f} ± {p['sd_diff']:.4f} | {p['t']:.2f} | "
              f"{p['p_t']:.3f} | {p['p_signflip']:.3f} | {p['wins']}/{p['n']} |")
    png = plot({arm: ([table[arm][s]["hard_p_at_1"]["mean"] for s in sizes],
                      [table[arm][s]["hard_p_at_1"]["std"] for s in sizes]) for arm in arms},
               [int(s) for s in sizes], Path(args.figure) if args.figure else work / "matryoshka_p_at_1.png",
               len(args.seeds))
    wall = time.time() - t_start
    print(f"\nfigure: {png}\nwall time {wall:.0f} s")
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores ({platform.machine()})"
    print(json.dumps(ablation.json_safe({
        "benchmark": "matryoshka", "date": datetime.date.today().isoformat(), "machine": machine,
        "seeds": args.seeds, "dims": dims, "sizes": sizes, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "zero": args.zero, "warm_steps": args.warm_steps, "table": table, "paired": paired,
        "train_s": {arm: [r["train_s"] for r in rs] for arm, rs in rows.items()}, "wall_s": round(wall, 1)}),
        allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
