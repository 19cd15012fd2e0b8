"""The paper's ablation on the offline synthetic task, from a warm start (tiny LLaVA-OneVision, 2 CPU ranks).

    python benchmarks/ablation.py [--seeds 0 1 2 3 4] [--steps 150] [--work DIR] [--figures DIR]

Every seed gets its own warm start (llave_ds.toy.warm_start: the tiny model, initialised with
that seed, pre-trained to caption the synthetic scenes; cached), then these runs, all
with that seed, so they share the start and the order of the data and differ only in the
objective (and, for (d), the batch):

  (a) InfoNCE (alpha = 0), negatives from the rank's own batch only (no gather)
  (b) hardness-weighted, alpha = 9, no gather
  (c) (b) with cross-device gathering over 2 ranks (exact mode)
  (d) (c) with the gradient cache at a 4x larger global batch, for a quarter of the steps
      (the same pairs seen: the paper compares batch sizes at a fixed number of epochs)

then an alpha sweep (0, 3, 9, 15) at the best of (b)-(d) by mean hard P@1 (runs that
already exist are reused). Each trained model is evaluated on the synthetic eval split;
the primary metrics are on the hard-negative subsets (Synth_I2T_Hard, Synth_T2I_Hard:
candidates = the truth and all ten one-attribute neighbours): ``hard_p_at_1`` (their mean
P@1) and ``hard_gap`` (mean positive - hardest-negative cosine over their queries);
``p_at_1`` is the overall P@1 over all six synthetic subsets. Mean, standard deviation
over seeds and paired tests across seeds (t-test and exact sign-flip test on the per-seed
differences) are printed; the JSON line last holds everything.

All runs of a phase train in one torchrun launch (``--worker``): each rank calls
``llave_ds.train.train`` once per run, then both ranks evaluate the export (sharded).
Finished runs are kept under ``--work`` and reused when the same command is run again.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo_cpu.yaml"
HARD_SUBSETS = ("Synth_I2T_Hard", "Synth_T2I_Hard")
METRICS = ("hard_p_at_1", "hard_gap", "p_at_1")

# arm -> (label, alpha, gather mode, batch multiplier, step divisor)
ARMS = {
    "a": ("InfoNCE, local negatives", 0.0, "local", 1, 1),
    "b": ("alpha=9, local negatives", 9.0, "local", 1, 1),
    "c": ("alpha=9 + gather (2 ranks)", 9.0, "exact", 1, 1),
    "d": ("alpha=9 + gather + GradCache, 4x batch", 9.0, "exact", 4, 4),
    # Not run by default: (d) for as many steps as (a)-(c), so 4x the pairs.
    "e": ("(d) for the same steps (4x the pairs)", 9.0, "exact", 4, 1),
}
DEFAULT_ARMS = ["a", "b", "c", "d"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of (a)-(c); (d) runs steps/4 at 4x batch")
    p.add_argument("--batch", type=int, default=64, help="global batch of (a)-(c); (d) uses 4x")
    p.add_argument("--chunk", type=int, default=16, help="gradient-cache chunk size")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="optim.lr (default 1e-3: the best of 3e-3 / 1e-3 / 3e-4 for arm (a), docs/RESULTS.md)")
    p.add_argument("--zero", choices=("zero2", "zero3"), default="zero2",
                   help="DeepSpeed config (the objective's math is the same under both; ZeRO-2 is faster on CPU)")
    p.add_argument("--train-per-subset", type=int, default=256)
    p.add_argument("--eval-per-subset", type=int, default=96)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--warm-steps", type=int, default=300, help="caption pre-training steps of the warm start")
    p.add_argument("--no-warm-start", action="store_true", help="start from the random tiny model instead")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS),
                   help="default: a b c d; e = (d) for the full number of steps")
    p.add_argument("--sweep", type=float, nargs="*", default=[0.0, 3.0, 9.0, 15.0],
                   help="alphas of the sweep at the best setting (none: no sweep)")
    p.add_argument("--work", default="ablation_out")
    p.add_argument("--cache-dir", default=None, help="warm-start cache (default: llave_ds.toy.warm_start's)")
    p.add_argument("--figures", default=None, help="directory for the PNG histograms (default: --work)")
    p.add_argument("--no-spread", action="store_true", help="skip the before/after warm-start spread")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- statistics

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_test(x, y) -> dict:
    """Paired comparison of x - y over seeds: mean and sd of the differences, the paired
    t-test and the exact two-sided sign-flip (permutation) test, and how often x > y."""
    diffs = [a - b for a, b in zip(x, y)]
    n = len(diffs)
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    if n < 2:
        t, p_t = float("nan"), float("nan")
    elif sd == 0.0:
        t, p_t = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / (sd / math.sqrt(n))
        p_t = t_two_sided_p(t, n - 1)
    observed = abs(sum(diffs))
    count = sum(1 for signs in product((1, -1), repeat=n)
                if abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12)
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "t": t, "p_t": p_t, "p_signflip": count / 2 ** n,
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


# ------------------------------------------------------------------------------- evaluation

def evaluate_model(model_dir, data_root: Path, processing=None, dims=None) -> dict:
    """P@1 per subset, the hard-subset metrics, and the similarity arrays for histograms;
    with Matryoshka ``dims`` (``[8, 16, "full"]``) also ``by_dim``: P@1 and hard P@1 per size,
    from the same encoding."""
    import numpy as np

    from llave_ds.eval.mmeb import evaluate
    from llave_ds.eval.mmeb_data import load_eval_subsets
    from llave_ds.eval.mmeb_metrics import positive_and_hardest_negative
    from llave_ds.model.embedder import LlaveEmbedder

    subsets = load_eval_subsets(str(data_root / "eval"), image_root=str(data_root))
    embedder = LlaveEmbedder.from_pretrained(str(model_dir), **(processing or {}))
    result = evaluate(embedder, subsets, batch_size=64, progress=False, num_workers=0, dims=dims)
    per_subset = result["summary"]["per_subset"]
    arrays = {}
    for name, d in result["details"].items():
        pos, neg, has = positive_and_hardest_negative(d["scores"], candidate_ids=d["candidate_index"])
        negatives = np.concatenate([np.asarray(row, dtype=np.float64)[1:] for row in d["scores"]])
        arrays[name] = (pos[has], neg[has], negatives)
    hard = [n for n in HARD_SUBSETS if n in arrays]
    hard_pos = np.concatenate([arrays[n][0] for n in hard])
    hard_neg = np.concatenate([arrays[n][1] for n in hard])
    by_dim = {size: {"p_at_1": r["overall"], "hard_p_at_1": float(np.mean([r["per_subset"][n] for n in hard]))}
              for size, r in result["summary"].get("by_dim", {}).items()}
    return {"p_at_1": result["summary"]["overall"], "per_subset": per_subset, **({"by_dim": by_dim} if dims else {}),
            "hard_p_at_1": float(np.mean([per_subset[n] for n in hard])),
            "hard_gap": float(np.mean(hard_pos - hard_neg)),
            "gap": float(np.mean(np.concatenate([a[0] - a[1] for a in arrays.values()]))),
            "arrays": arrays}


def spread(res: dict) -> dict:
    """Summary of the cosine distributions over all subsets: positives, all negatives,
    hardest negatives (mean, std, 5th / 50th / 95th percentile)."""
    import numpy as np

    def describe(a):
        a = np.asarray(a, dtype=np.float64)
        q = np.percentile(a, [5, 50, 95])
        return {"mean": float(a.mean()), "std": float(a.std()), "p5": float(q[0]), "p50": float(q[1]),
                "p95": float(q[2])}

    arrays = res["arrays"].values()
    pos = np.concatenate([a[0] for a in arrays])
    hardest = np.concatenate([a[1] for a in arrays])
    negatives = np.concatenate([a[2] for a in arrays])
    return {"positive": describe(pos), "negative": describe(negatives), "hardest_negative": describe(hardest),
            "gap": float(np.mean(pos - hardest)), "p_at_1": res["p_at_1"], "hard_p_at_1": res["hard_p_at_1"]}


def _save_result(path: Path, res: dict, extra: dict) -> None:
    import numpy as np
    arrays = {f"{name}__{k}": a for name, trio in res["arrays"].items() for k, a in zip(("pos", "neg", "all"), trio)}
    np.savez_compressed(path.with_suffix(".npz"), **arrays)
    record = {k: v for k, v in res.items() if k != "arrays"}
    record.update(extra)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict:
    import numpy as np
    out: dict = {}
    with np.load(path.with_suffix(".npz")) as z:
        for key in z.files:
            name, kind = key.split("__")
            out.setdefault(name, {})[kind] = z[key]
    return {name: (d["pos"], d["neg"], d["all"]) for name, d in out.items()}


# ------------------------------------------------------------------------------- the worker

def worker(jobs_file: str) -> int:
    """Under torchrun: train and evaluate every job of ``jobs_file`` in this one process group."""
    import gc

    import torch.distributed as dist
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from llave_ds.config import load_config
    from llave_ds.core import distributed
    from llave_ds.train import TrainConfig, train

    spec = json.loads(Path(jobs_file).read_text())
    distributed.init_distributed(timeout_s=900)
    rank = distributed.rank()
    try:
        for job in spec["jobs"]:
            cfg = load_config(TrainConfig, spec["config"], job["overrides"])
            t0 = time.time()
            train(cfg)
            train_s = time.time() - t0
            # The training's ZeRO-3 config must not reach the evaluation's from_pretrained
            # (it would build partitioned parameters): drop transformers' global reference.
            unset_hf_deepspeed_config()
            gc.collect()
            dist.barrier()  # rank 0 wrote the export
            res = evaluate_model(Path(cfg.run_dir) / "export", Path(spec["data_root"]), dims=spec.get("eval_dims"))
            if rank == 0:
                _save_result(Path(job["result"]), res, {"key": job["key"], "train_s": train_s,
                                                        "eval_dims": spec.get("eval_dims")})
                print(f"[ablation] {job['name']}: hard P@1 {res['hard_p_at_1']:.3f} hard gap "
                      f"{res['hard_gap']:+.4f} P@1 {res['p_at_1']:.3f} [{train_s:.0f} s]", flush=True)
            dist.barrier()
    finally:
        distributed.shutdown_distributed()
    return 0


# ------------------------------------------------------------------------------- the driver

def run_key(args, seed: int, alpha: float, gather: str, mult: int, divisor: int, model_dir: str,
            matryoshka=None, negatives=None) -> dict:
    """What a run is (results are reused only for an equal key). Optional fields, absent from
    the ablation's own keys so that its run names and stored results stay valid:
    ``matryoshka`` (sizes) and ``negatives``, the run's own training data: ``{"arm": name,
    "source": train dir, "num": hard negatives per row, "digest": of its files}`` (the images
    stay under the synthetic data root)."""
    return {**({"matryoshka": list(matryoshka)} if matryoshka else {}), "seed": seed, "alpha": alpha,
            "gather_mode": gather, "global_batch": args.batch * mult,
            "steps": max(1, args.steps // divisor), "chunk": args.chunk, "ranks": args.ranks, "lr": args.lr,
            "zero": args.zero,
            "model": model_dir, "train_per_subset": args.train_per_subset,
            "eval_per_subset": args.eval_per_subset, "data_seed": args.data_seed,
            **({"negatives": dict(negatives)} if negatives else {})}


def run_name(key: dict) -> str:
    return (f"s{key['seed']}_a{key['alpha']:g}_{key['gather_mode']}_b{key['global_batch']}"
            f"_n{key['steps']}" + (f"_m{'-'.join(map(str, key['matryoshka']))}" if key.get("matryoshka") else "")
            + (f"_neg-{key['negatives']['arm']}" if key.get("negatives") else ""))


def job_overrides(key: dict, data, run_dir: Path) -> list:
    negatives = key.get("negatives")
    source = negatives["source"] if negatives else data[0]
    out = [f"model.path={key['model']}", f"data.source={source}", f"data.image_root={data[1]}",
           f"run_dir={run_dir}", f"seed={key['seed']}", f"global_batch_size={key['global_batch']}",
           f"gradcache.query_chunk_size={key['chunk']}", f"gradcache.target_chunk_size={key['chunk']}",
           f"schedule.max_steps={key['steps']}", "schedule.epochs=1000", "checkpoint.every_steps=0",
           "checkpoint.keep_last=1", "checkpoint.resume=none", "logging.progress=false",
           f"objective.alpha={key['alpha']}", f"objective.gather_mode={key['gather_mode']}",
           f"deepspeed.config={key['zero']}"]
    if key["lr"] is not None:
        out.append(f"optim.lr={key['lr']}")
    if key.get("matryoshka"):
        out.append(f"objective.matryoshka_dims=[{','.join(map(str, key['matryoshka']))}]")
    if negatives:
        out += ["data.use_hard_negatives=true", f"data.num_hard_negatives={negatives['num']}"]
    return out


def run_phase(args, work: Path, data, keys: list, eval_dims=None) -> dict:
    """Train + evaluate every key not already done (one torchrun launch); return name -> result.
    ``eval_dims``: Matryoshka sizes every export is also scored at (a stored result without
    them is redone)."""
    from llave_ds.core.distributed import free_port

    todo, results = [], {}
    for key in keys:
        name = run_name(key)
        path = work / "results" / f"{name}.json"
        if path.is_file():
            try:
                done = json.loads(path.read_text())
            except ValueError:
                done = None
            if done is not None and done.get("key") == key and path.with_suffix(".npz").is_file() \
                    and done.get("eval_dims") == eval_dims:
                results[name] = done
                continue
        run_dir = work / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        todo.append({"name": name, "key": key, "result": str(path), "overrides": job_overrides(key, data, run_dir)})
    if todo:
        (work / "results").mkdir(parents=True, exist_ok=True)
        jobs_file = work / f"jobs_{hashlib.sha256(json.dumps(todo).encode()).hexdigest()[:12]}.json"
        jobs_file.write_text(json.dumps({"config": str(CONFIG), "data_root": str(data[1]), "jobs": todo,
                                         "eval_dims": eval_dims}, indent=1))
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
               "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker", str(jobs_file)]
        print(f"[ablation] training {len(todo)} run(s) in one {args.ranks}-rank launch", flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("[ablation]")]
        print("\n".join(lines), flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the training launch failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}")
        for job in todo:
            results[job["name"]] = json.loads(Path(job["result"]).read_text())
    return results


def synthetic_data_and_warm_starts(args, work: Path):
    """The synthetic data under ``work/data`` and each seed's warm start (cached): what the
    benchmarks built on this script (matryoshka.py, mining.py) start from."""
    from llave_ds.toy.synthetic import prepare_synthetic_mmeb
    from llave_ds.toy.warm_start import WarmStartConfig, get_warm_start

    data = prepare_synthetic_mmeb(str(work / "data"), num_train_per_subset=args.train_per_subset,
                                  num_eval_per_subset=args.eval_per_subset, seed=args.data_seed)
    models = {}
    for seed in args.seeds:
        ws = get_warm_start(WarmStartConfig(seed=seed, steps=args.warm_steps), args.cache_dir,
                            log=lambda m: print(m, flush=True))
        models[seed] = str(ws.path)
    return data, models


def print_paired(paired: list) -> None:
    """The paired-test table of rows with ``x``, ``y``, ``metric`` and `paired_test`'s fields."""
    print("\npaired across seeds (x − y; t-test and exact sign-flip test, two-sided):")
    print("| x − y | metric | mean diff ± sd | t | p (t) | p (sign-flip) | x > y in |")
    print("|---|---|---|---|---|---|---|")
    for p in paired:
        print(f"| {p['x']} − {p['y']} | {p['metric']} | {p['mean_diff']:+.4f} ± {p['sd_diff']:.4f} | {p['t']:.2f} | "
              f"{p['p_t']:.3f} | {p['p_signflip']:.3f} | {p['wins']}/{p['n']} |")


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (its folder made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def fmt(ms: dict, digits: int = 3, signed: bool = False) -> str:
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(ms['mean'])} ± {ms['std']:.{digits}f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.ranks < 2 and "c" in args.arms:
        raise SystemExit("arm (c) gathers across ranks: --ranks must be >= 2")
    from llave_ds.eval.analysis import plot_similarity_histograms
    from llave_ds.toy.synthetic import prepare_synthetic_mmeb
    from llave_ds.toy.tiny import build_tiny_model_dir
    from llave_ds.toy.warm_start import WarmStartConfig, get_warm_start

    t_start = time.time()
    work = Path(args.work).resolve()
    figures = Path(args.figures).resolve() if args.figures else work
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_synthetic_mmeb(str(work / "data"), num_train_per_subset=args.train_per_subset,
                                  num_eval_per_subset=args.eval_per_subset, seed=args.data_seed)
    data_root = Path(data[1])

    # -- starting points: one per seed -------------------------------------------------------
    models, warm_info = {}, {}
    for seed in args.seeds:
        if args.no_warm_start:
            models[seed] = str(build_tiny_model_dir(work / f"tiny_seed{seed}", "llava_onevision", seed=seed))
            continue
        ws = get_warm_start(WarmStartConfig(seed=seed, steps=args.warm_steps), args.cache_dir,
                            log=lambda m: print(m, flush=True))
        models[seed] = str(ws.path)
        warm_info[seed] = {"path": str(ws.path), "hash": ws.key_hash, "cached": ws.cached,
                           "seconds": round(ws.seconds, 1), "loss_first": ws.metadata.get("loss_first"),
                           "loss_last": ws.metadata.get("loss_last")}

    # -- the similarity spread before / after the warm start (first seed) -------------------
    spreads = {}
    if not args.no_warm_start and not args.no_spread:
        seed = args.seeds[0]
        random_dir = build_tiny_model_dir(work / f"tiny_seed{seed}", "llava_onevision", seed=seed)
        import yaml
        shipped = yaml.safe_load(CONFIG.read_text())["processing"]  # what training formats with
        processing = {k: shipped[k] for k in ("max_length", "system_prompt") if k in shipped}
        before = evaluate_model(random_dir, data_root, processing)
        after = evaluate_model(models[seed], data_root, processing)
        spreads = {"random_init": spread(before), "warm_start": spread(after)}
        groups = {f"random init (seed {seed})": _all_pos_neg(before), f"warm start (seed {seed})": _all_pos_neg(after)}
        png = plot_similarity_histograms(groups, str(figures / "warm_start_spread.png"), value_range=(-0.2, 1.0),
                                         title="positive vs hardest-negative cosine, synthetic eval (all subsets)")
        spreads["histogram"] = str(png)

    # -- phase 1: arms (a)-(d) --------------------------------------------------------------
    def key_of(seed, alpha, gather, mult, divisor):
        return run_key(args, seed, alpha, gather, mult, divisor, models[seed])

    arm_keys = {arm: [key_of(s, *ARMS[arm][1:]) for s in args.seeds] for arm in args.arms}
    results = run_phase(args, work, data, [k for keys in arm_keys.values() for k in keys])
    arms = {}
    for arm, keys in arm_keys.items():
        rows = [results[run_name(k)] for k in keys]
        label, alpha, gather, mult, _ = ARMS[arm]
        arms[arm] = {"label": label, "alpha": alpha, "gather_mode": gather, "global_batch": args.batch * mult,
                     "steps": keys[0]["steps"], "train_s": statistics.mean(r["train_s"] for r in rows),
                     **{m: mean_std([r[m] for r in rows]) for m in METRICS}}

    # -- phase 2: the alpha sweep at the best setting ----------------------------------------
    candidates = [a for a in ("b", "c", "d") if a in arms]
    best = max(candidates, key=lambda a: arms[a]["hard_p_at_1"]["mean"]) if candidates else None
    sweep = {}
    if best is not None and args.sweep:
        _, _, gather, mult, divisor = ARMS[best]
        sweep_keys = {alpha: [key_of(s, alpha, gather, mult, divisor) for s in args.seeds] for alpha in args.sweep}
        results.update(run_phase(args, work, data, [k for keys in sweep_keys.values() for k in keys]))
        for alpha, keys in sweep_keys.items():
            rows = [results[run_name(k)] for k in keys]
            sweep[f"{alpha:g}"] = {"alpha": alpha, **{m: mean_std([r[m] for r in rows]) for m in METRICS}}

    # -- paired tests -------------------------------------------------------------------------
    pairs = [("b", "a"), ("c", "b"), ("d", "c"), ("c", "a"), ("d", "a"), ("e", "c")]
    paired = []
    for x, y in pairs:
        if x in arms and y in arms:
            for m in METRICS[:2]:
                paired.append({"x": x, "y": y, "metric": m,
                               **paired_test(arms[x][m]["values"], arms[y][m]["values"])})
    if sweep and "0" in sweep:
        for alpha in sweep:
            if alpha != "0":
                for m in METRICS[:2]:
                    paired.append({"x": f"alpha={alpha}", "y": "alpha=0", "metric": m,
                                   **paired_test(sweep[alpha][m]["values"], sweep["0"][m]["values"])})

    # -- histograms of the arms (first seed, hard subsets) -----------------------------------
    hist_png = None
    seed = args.seeds[0]
    groups = {}
    for arm in args.arms:
        arrays = load_arrays(work / "results" / f"{run_name(arm_keys[arm][0])}.json")
        groups[f"({arm}) {ARMS[arm][0]}"] = (
            _concat([arrays[n][0] for n in HARD_SUBSETS]), _concat([arrays[n][1] for n in HARD_SUBSETS]))
    if groups:
        title = f"positive vs hardest-negative cosine, hard-negative subsets, seed {seed}"
        hist_png = plot_similarity_histograms(groups, str(figures / "ablation_histogram.png"), title=title)

    # -- report -------------------------------------------------------------------------------
    start = "random init" if args.no_warm_start else f"warm start ({args.warm_steps} caption steps)"
    print()
    print(f"start: {start}; seeds {args.seeds}; {args.steps} steps at batch {args.batch} "
          f"((d): {max(1, args.steps // 4)} at {4 * args.batch}); lr {args.lr or 'config'}; {args.zero}")
    if spreads:
        print("\nsimilarity spread on the synthetic eval split (all subsets), cosine mean ± std [p5, p95]:")
        print("| model | positive | all negatives | hardest negative | pos − hardest gap | P@1 | hard P@1 |")
        print("|---|---|---|---|---|---|---|")
        for name, s in spreads.items():
            if name == "histogram":
                continue
            cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f} [{s[k]['p5']:.2f}, {s[k]['p95']:.2f}]"
                     for k in ("positive", "negative", "hardest_negative")]
            print(f"| {name} | {' | '.join(cells)} | {s['gap']:+.4f} | {s['p_at_1']:.3f} | {s['hard_p_at_1']:.3f} |")
    print("\n| run | global batch | steps | hard P@1 (mean ± std) | hard gap (mean ± std) | P@1 all subsets "
          "| train s/run |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in arms.items():
        print(f"| ({arm}) {r['label']} | {r['global_batch']} | {r['steps']} | {fmt(r['hard_p_at_1'])} | "
              f"{fmt(r['hard_gap'], 4, True)} | {fmt(r['p_at_1'])} | {r['train_s']:.0f} |")
    if sweep:
        print(f"\nalpha sweep at the setting of ({best}):")
        print("| alpha | hard P@1 | hard gap | P@1 all subsets |")
        print("|---|---|---|---|")
        for alpha, r in sweep.items():
            print(f"| {alpha} | {fmt(r['hard_p_at_1'])} | {fmt(r['hard_gap'], 4, True)} | {fmt(r['p_at_1'])} |")
    print_paired(paired)
    if spreads:
        print(f"\nhistograms: {spreads['histogram']}" + (f", {hist_png}" if hist_png else ""))
    elif hist_png:
        print(f"\nhistogram: {hist_png}")
    wall = time.time() - t_start
    print(f"wall time {wall:.0f} s")
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores ({platform.machine()})"
    print(json.dumps(json_safe({"benchmark": "ablation", "date": datetime.date.today().isoformat(), "machine": machine,
                      "start": "random" if args.no_warm_start else "warm_start", "warm_start": warm_info,
                      "warm_steps": args.warm_steps, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                      "zero": args.zero,
                      "seeds": args.seeds, "metrics": list(METRICS), "spread": spreads, "arms": arms,
                      "best_setting": best, "sweep": sweep, "paired": paired, "wall_s": round(wall, 1)}),
                     allow_nan=False))
    return 0


def json_safe(obj):
    """NaN / infinity -> None, so the JSON line is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _concat(parts):
    import numpy as np
    return np.concatenate(parts)


def _all_pos_neg(res: dict):
    arrays = res["arrays"].values()
    return _concat([a[0] for a in arrays]), _concat([a[1] for a in arrays])


if __name__ == "__main__":
    sys.exit(main())
