"""The paper's ablation on the offline synthetic task (tiny LLaVA-OneVision, 2 CPU ranks).

    python benchmarks/ablation.py [--seeds 0 1 2] [--steps 60] [--work DIR] [--results-md docs/RESULTS.md]

Four runs per seed, the same number of optimizer steps each:
  (a) InfoNCE (alpha = 0), negatives from the rank's own batch only (no gather)
  (b) hardness-weighted, alpha = 9, no gather
  (c) (b) with cross-device gathering over 2 ranks (exact mode)
  (d) (c) with the gradient cache at a 4x larger global batch
Each trained model is evaluated (P@1 and the positive / hardest-negative gap) on the
synthetic eval split, whose candidates include negatives that differ from the truth in
exactly one attribute. Prints a table (mean +- std over seeds), writes the histogram of
(a) vs (d) and, with --results-md, appends the table with command, machine and date.
One JSON line last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo_cpu.yaml"

VARIANTS = {
    "a": ("InfoNCE, local negatives", ["objective.alpha=0", "objective.gather_mode=local"], 1),
    "b": ("alpha=9, local negatives", ["objective.alpha=9", "objective.gather_mode=local"], 1),
    "c": ("alpha=9 + gather (2 ranks)", ["objective.alpha=9", "objective.gather_mode=exact"], 1),
    "d": ("alpha=9 + gather + GradCache, 4x batch", ["objective.alpha=9", "objective.gather_mode=exact"], 4),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64, help="global batch of (a)-(c); (d) uses 4x")
    p.add_argument("--chunk", type=int, default=32, help="gradient-cache chunk size")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--train-per-subset", type=int, default=512)
    p.add_argument("--eval-per-subset", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--work", default="ablation_out")
    p.add_argument("--results-md", help="append the results table to this markdown file")
    return p.parse_args(argv)


def train_variant(args, key: str, seed: int, data, model_dir: Path, run_dir: Path) -> float:
    from llave_ds.distributed import free_port
    _, overrides, scale = VARIANTS[key]
    batch = args.batch * scale
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
           "--master_port", str(free_port()), "-m", "llave_ds.train", "--config", str(CONFIG),
           f"model.path={model_dir}", f"data.source={data[0]}", f"data.image_root={data[1]}",
           f"run_dir={run_dir}", f"seed={seed}", f"global_batch_size={batch}",
           f"gradcache.query_chunk_size={args.chunk}", f"gradcache.target_chunk_size={args.chunk}",
           f"schedule.max_steps={args.steps}", "schedule.epochs=1000", "checkpoint.every_steps=0",
           "checkpoint.resume=none", "logging.progress=false", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training ({key}, seed {seed}) failed:\n{proc.stderr[-4000:]}")
    return time.time() - t0


def evaluate_export(export_dir: Path, data) -> dict:
    import numpy as np

    from llave_ds.embedder import LlaveEmbedder
    from llave_ds.eval import evaluate
    from llave_ds.eval_data import load_eval_subsets
    from llave_ds.metrics import positive_and_hardest_negative

    subsets = load_eval_subsets(str(Path(data[1]) / "eval"), image_root=str(data[1]))
    result = evaluate(LlaveEmbedder.from_pretrained(str(export_dir)), subsets, batch_size=64, progress=False)
    pos_all, neg_all = [], []
    for d in result["details"].values():
        pos, neg, has = positive_and_hardest_negative(d["scores"], candidate_ids=d["candidate_index"])
        pos_all.append(np.asarray(pos)[has])
        neg_all.append(np.asarray(neg)[has])
    pos, neg = np.concatenate(pos_all), np.concatenate(neg_all)
    return {"p_at_1": result["summary"]["overall"], "per_subset": result["summary"]["per_subset"],
            "gap": float(np.mean(pos - neg)), "pos": pos, "neg": neg}


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    from llave_ds.analysis import plot_similarity_histograms
    from llave_ds.synthetic import prepare_synthetic_mmeb
    from llave_ds.tiny import build_tiny_model_dir

    work = Path(args.work).resolve()
    data = prepare_synthetic_mmeb(work / "data", num_train_per_subset=args.train_per_subset,
                                  num_eval_per_subset=args.eval_per_subset, seed=1234)
    rows: dict[str, list[dict]] = {k: [] for k in args.variants}
    hist = {}
    for seed in args.seeds:
        model_dir = build_tiny_model_dir(work / f"tiny_seed{seed}", "llava_onevision", seed=seed)
        for key in args.variants:
            run_dir = work / f"run_{key}_seed{seed}"
            secs = train_variant(args, key, seed, data, model_dir, run_dir)
            res = evaluate_export(run_dir / "export", data)
            res["train_s"] = secs
            rows[key].append(res)
            print(f"seed {seed} ({key}) {VARIANTS[key][0]}: P@1 {res['p_at_1']:.3f} gap {res['gap']:+.4f} "
                  f"[{secs:.0f} s]", flush=True)
            if seed == args.seeds[0] and key in ("a", "d"):
                hist[f"({key}) {VARIANTS[key][0]}"] = (res["pos"], res["neg"])
    png = None
    if len(hist) == 2:
        png = Path(plot_similarity_histograms(hist, work / "ablation_histogram.png",
                                              title="positive vs hardest-negative similarity (synthetic eval)"))

    lines = ["| run | global batch | P@1 (mean ± std) | pos − hardest-neg gap (mean ± std) | train s/run |",
             "|---|---|---|---|---|"]
    summary = {}
    for key in args.variants:
        p = mean_std([r["p_at_1"] for r in rows[key]])
        g = mean_std([r["gap"] for r in rows[key]])
        t = statistics.mean(r["train_s"] for r in rows[key])
        batch = args.batch * VARIANTS[key][2]
        lines.append(f"| ({key}) {VARIANTS[key][0]} | {batch} | {p[0]:.3f} ± {p[1]:.3f} | "
                     f"{g[0]:+.4f} ± {g[1]:.4f} | {t:.0f} |")
        summary[key] = {"label": VARIANTS[key][0], "global_batch": batch, "p_at_1_mean": p[0], "p_at_1_std": p[1],
                        "gap_mean": g[0], "gap_std": g[1], "p_at_1": [r["p_at_1"] for r in rows[key]],
                        "gap": [r["gap"] for r in rows[key]]}
    table = "\n".join(lines)
    print()
    print(table)
    if png:
        print(f"histogram: {png}")
    if args.results_md:
        command = "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        machine = f"{platform.node() or 'CPU box'}: {os.cpu_count()} CPU cores, no GPU ({platform.processor() or platform.machine()})"
        section = [f"\n## Ablation on the synthetic task ({datetime.date.today().isoformat()})", "",
                   f"Command: `{command.strip()}`  ", f"Machine: {machine}  ",
                   f"Setup: tiny LLaVA-OneVision (random init, {len(args.seeds)} seeds: {args.seeds}), "
                   f"{args.ranks} CPU ranks, ZeRO-3, {args.steps} optimizer steps per run, "
                   f"tau 0.05, lr 3e-3 (configs/demo_cpu.yaml), 1 data hard negative per pair; "
                   "P@1 and gap on the synthetic eval split (ground truth + 2 one-attribute "
                   "hard negatives + random candidates).", "", table, ""]
        if png:
            section += [f"Histogram of (a) vs (d), seed {args.seeds[0]}: `{png.name}` (in the work directory).", ""]
        with open(args.results_md, "a") as f:
            f.write("\n".join(section))
    print(json.dumps({"benchmark": "ablation", "steps": args.steps, "seeds": args.seeds, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
