"""``llave-ds demo [--out DIR]``: the whole job offline, on CPU, in a few minutes.

1. generate the synthetic MMEB-format task (train + eval splits, images on disk);
2. the starting model: a tiny LLaVA-OneVision (``--backbone`` for another) warm-started by a short generative
   pre-training on the task's captions (llave_ds.toy.warm_start: image -> caption, LLaVA-style;
   trained once, then reused from its cache), or with ``--no-warm-start`` the random one;
3. evaluate P@1 of that model on the synthetic eval split;
4. train it contrastively with the gradient cache under DeepSpeed ZeRO-3 (2 CPU ranks when
   the machine has 2 cores, launched through torchrun; else one process);
5. evaluate the exported model again; write DIR/eval.json and print where everything is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from llave_ds.model.backbones import SUPPORTED_BACKBONES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    parser.add_argument("--ranks", type=int, default=min(2, os.cpu_count() or 1),
                        help="CPU ranks for training (default: 2 where there are 2 cores)")
    parser.add_argument("--train-per-subset", type=int, default=256)
    parser.add_argument("--eval-per-subset", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="llava_onevision", choices=SUPPORTED_BACKBONES,
                        help="the tiny model's architecture (default llava_onevision)")
    parser.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                        help="start from the random tiny model instead of the warm-started one")
    parser.add_argument("--warm-steps", type=int, default=None,
                        help="caption pre-training steps of the warm start (default: llave_ds.toy.warm_start's)")
    parser.add_argument("--cache-dir", default=None,
                        help="warm-start cache (default: $LLAVE_DS_CACHE/warm_start or ~/.cache/llave_ds/warm_start)")
    parser.add_argument("--config", default="demo_cpu",
                        help="training config: a YAML file or a shipped config's name (default: demo_cpu)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra training-config overrides")


def _eval(model_dir: Path, eval_dir: Path, image_root: Path, processing: dict) -> dict:
    from llave_ds.eval.mmeb import evaluate
    from llave_ds.eval.mmeb_data import load_eval_subsets
    from llave_ds.model.embedder import LlaveEmbedder

    subsets = load_eval_subsets(str(eval_dir), image_root=str(image_root))
    embedder = LlaveEmbedder.from_pretrained(str(model_dir), **processing)
    result = evaluate(embedder, subsets, batch_size=32, progress=False)
    s = result["summary"]
    return {"overall_p_at_1": s["overall"], "per_subset": s["per_subset"], "by_category": s["by_category"],
            "mean_gap": {k: v["mean_gap"] for k, v in s["gap"].items()}}


def run(args: argparse.Namespace) -> int:
    from llave_ds.config import load_config
    from llave_ds.toy.synthetic import prepare_synthetic_mmeb
    from llave_ds.toy.tiny import build_tiny_model_dir
    from llave_ds.train import TrainConfig, resolve_train_config_path

    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] 1/5 synthetic data -> {out / 'data'}", flush=True)
    train_dir, image_root = prepare_synthetic_mmeb(out / "data", num_train_per_subset=args.train_per_subset,
                                                   num_eval_per_subset=args.eval_per_subset, seed=args.seed)
    eval_dir = out / "data" / "eval"
    if args.warm_start:
        from llave_ds.toy.warm_start import WarmStartConfig, get_warm_start

        ws_cfg = WarmStartConfig(backbone=args.backbone, seed=args.seed,
                                 **({} if args.warm_steps is None else {"steps": args.warm_steps}))
        print(f"[demo] 2/5 tiny {args.backbone}, warm-started ({ws_cfg.steps} caption steps)", flush=True)
        warm = get_warm_start(ws_cfg, args.cache_dir, log=lambda m: print(f"[demo]     {m}", flush=True))
        # A copy beside the data (under 1 MB), where configs/demo_cpu.yaml's model.path points.
        model_dir = out / "tiny_model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(warm.path, model_dir)
        start = {"model": "warm_start", "path": str(warm.path), "model_dir": str(model_dir),
                 "cached": warm.cached, "seconds": round(warm.seconds, 1), "key_hash": warm.key_hash}
    else:
        print(f"[demo] 2/5 tiny {args.backbone} model (random weights) -> {out / 'tiny_model'}", flush=True)
        model_dir = build_tiny_model_dir(out / "tiny_model", args.backbone, seed=args.seed)
        start = {"model": "random", "path": str(model_dir)}

    run_dir = out / "run"
    if run_dir.exists():
        # The demo regenerates its data and model: an earlier demo run cannot be resumed, and
        # training refuses to start afresh over checkpoints it could resume.
        print(f"[demo] removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    overrides = [f"model.path={model_dir}", f"data.source={train_dir}", f"data.image_root={image_root}",
                 f"run_dir={run_dir}", f"seed={args.seed}", f"export.dir={out / 'export'}",
                 "checkpoint.resume=none"]
    if args.epochs is not None:
        overrides.append(f"schedule.epochs={args.epochs}")
    if args.max_steps is not None:
        overrides.append(f"schedule.max_steps={args.max_steps}")
    overrides += list(args.overrides)
    args.config = resolve_train_config_path(args.config)  # a shipped config's name -> its installed file
    cfg = load_config(TrainConfig, args.config, overrides)  # fail on a bad config before the long parts
    processing = {"max_length": cfg.processing.max_length, "system_prompt": cfg.processing.system_prompt}

    print("[demo] 3/5 P@1 of the starting model on the synthetic eval split", flush=True)
    before = _eval(model_dir, eval_dir, Path(image_root), processing)
    print(f"[demo]     before training: P@1 {before['overall_p_at_1']:.3f}", flush=True)

    print(f"[demo] 4/5 training on {args.ranks} CPU rank(s) (gradient cache, ZeRO-3) -> {run_dir}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if args.ranks > 1:
        from llave_ds.core.distributed import free_port
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                    "--master_port", str(free_port())]
    else:
        launcher = [sys.executable]
    cmd = launcher + ["-m", "llave_ds.train", "--config", args.config, *overrides]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        print(f"[demo] training failed (exit {proc.returncode}); command:\n  {' '.join(cmd)}", file=sys.stderr)
        return proc.returncode

    export_dir = out / "export"
    print(f"[demo] 5/5 P@1 of the trained model ({export_dir})", flush=True)
    after = _eval(export_dir, eval_dir, Path(image_root), {})
    result = {"before": before, "after": after, "wall_time_s": round(time.time() - t_start, 1),
              "ranks": args.ranks, "start": start, "train_command": cmd}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print("\n[demo] done in {:.0f} s".format(time.time() - t_start))
    print(f"  P@1 (synthetic eval, {len(after['per_subset'])} subsets): before {before['overall_p_at_1']:.3f}"
          f" -> after {after['overall_p_at_1']:.3f}")
    for name in sorted(after["per_subset"]):
        print(f"    {name:<14} {before['per_subset'][name]:.3f} -> {after['per_subset'][name]:.3f}")
    print(f"  metrics:  {run_dir / 'metrics.jsonl'}")
    print(f"  config:   {run_dir / 'config.yaml'}")
    print(f"  eval:     {out / 'eval.json'}")
    print(f"  export:   {export_dir}  (safetensors; loads with transformers.from_pretrained)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llave-ds demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
