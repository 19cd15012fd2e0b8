"""``llave-ds bench`` / ``python -m llave_ds.bench``: the command line, and the launch.

``--ranks N`` > 1 re-launches under torchrun (N local processes); under an existing
launcher (RANK set) it runs as one of the ranks. ``--predict-only`` needs no model, no
process group and no device.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

import torch

import llave_ds.bench
from llave_ds.bench import report, shapes
from llave_ds.bench.predict import predict_only
from llave_ds.bench.runner import worker
from llave_ds.core.distributed import free_port


def _threshold(text: str):
    return "auto" if text == "auto" else int(float(text))


def _int_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if lo_i < 0 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"expected LO-HI with 0 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def _image_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--shape", default="tiny", choices=shapes.shape_names(),
                   help="architecture shape (llave_ds.bench.shapes); tiny / qwen3-tiny for CPU")
    g.add_argument("--llm-layers", type=int, default=None, help="override the LLM's layer count")
    g.add_argument("--vision-layers", type=int, default=None, help="override the vision tower's layer count")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    g.add_argument("--train-vision-tower", action="store_true", help="unfreeze the tower (paper: frozen)")

    g = p.add_argument_group("inputs (per rank)")
    g.add_argument("--pairs-per-rank", type=int, default=8, help="local batch (pairs) per rank")
    g.add_argument("--image-size", type=_image_size, default=None,
                   help="HxW of every image before the processor (default: LLaVA-OV one tile, e.g. 384x384 -> "
                        "1485 tokens; Qwen3-VL 384x384 -> 144 tokens, resized into the shape's 4..1280 tokens)")
    g.add_argument("--query-image-fraction", type=float, default=1.0)
    g.add_argument("--target-image-fraction", type=float, default=0.0)
    g.add_argument("--query-text-tokens", type=_int_range, default=(40, 120), help="LO-HI")
    g.add_argument("--target-text-tokens", type=_int_range, default=(10, 60), help="LO-HI")

    g = p.add_argument_group("what to run")
    g.add_argument("--ranks", type=int, default=1, help="local processes (torchrun re-launch when > 1)")
    g.add_argument("--stages", type=int, nargs="+", default=[3], choices=(0, 1, 2, 3))
    g.add_argument("--ckpt", nargs="+", default=["non_reentrant"], choices=("off", "non_reentrant", "auto"),
                   help="activation checkpointing modes to sweep (auto: the memory plan's choice for the largest "
                        "chunk size under --memory-budget-gib)")
    g.add_argument("--checkpoint-every", type=int, default=1,
                   help="model.checkpoint_every: checkpoint decoder layers 0, k, 2k, ... only")
    g.add_argument("--memory-budget-gib", type=float, default=None,
                   help="memory.budget_gib for --ckpt auto / --persistence-threshold auto (default: 0.9 x the "
                        "GPU's memory; a CPU run has none, and auto then means off / the config's threshold)")
    g.add_argument("--chunk-sizes", type=int, nargs="+", default=[4], help="query = target chunk size")
    g.add_argument("--chunk-tokens", type=int, default=None,
                   help="gradcache.chunk_tokens: token-budget chunks (longest rows first, at most this many padded "
                        "tokens and the chunk size of rows per chunk)")
    g.add_argument("--reduction", choices=("coalesced", "per_chunk"), default="coalesced")
    g.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    g.add_argument("--uncached-steps", type=int, default=None,
                   help="timed uncached steps per engine (default: --steps; 0 = skip)")
    g.add_argument("--no-skip-predicted-oom", dest="skip_predicted_oom", action="store_false",
                   help="try configurations the memory model says will not fit")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads per rank on CPU (more than the free cores slows a run down badly)")

    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--ds-config", default=None,
                   help="base DeepSpeed JSON (default: ds_configs/zero<stage>.json)")
    g.add_argument("--persistence-threshold", type=_threshold, default=None,
                   help="stage3_param_persistence_threshold override, or auto (deepspeed.param_persistence: auto)")
    g.add_argument("--prefetch-bucket", type=float, default=None, help="stage3_prefetch_bucket_size override")
    g.add_argument("--max-live", type=float, default=None, help="stage3_max_live_parameters override")
    g.add_argument("--max-reuse", type=float, default=None, help="stage3_max_reuse_distance override")
    g.add_argument("--no-fetch-units", action="store_true",
                   help="ZeRO-3: hook every submodule (no leaf decoder/vision blocks; the pre-#13 behaviour)")
    g.add_argument("--deepspeed-linear", action="store_true",
                   help="ZeRO-3: memory_efficient_linear true (DeepSpeed's default; llave-ds sets false)")
    g.add_argument("--padding-mask", choices=("auto", "always"), default="auto",
                   help="model.padding_mask: auto drops the redundant mask of right-padded chunks (all of the "
                        "bench's); always passes it (the behaviour before)")
    g.add_argument("--fused-kernels", choices=("off", "liger", "auto"), default="off",
                   help="model.fused_kernels: liger = Liger-Kernel's RMSNorm, RoPE and SwiGLU on the language model "
                        "(GPU only, pip install liger-kernel); auto = liger where it runs")
    g.add_argument("--no-vision-cache", action="store_true",
                   help="run the frozen tower again in pass 2 instead of reusing pass 1's features")
    g.add_argument("--profile", action="store_true",
                   help="after the timed steps, one more cached step under torch.profiler: top kernels, the "
                        "attention kernel, time in collectives (in the table and the JSON row)")
    g.add_argument("--count-comms", action="store_true",
                   help="DeepSpeed comms logger on: count collectives and bytes per step "
                        "(synchronises after every collective: do not read times from such a run)")

    g.add_argument("--predict-only", action="store_true",
                   help="print the FLOP and memory predictions for these settings (no model, no "
                        "process group, no device needed; --ranks is taken as the world size)")

    g = p.add_argument_group("reporting")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak of the device in the model dtype (default: measured with a matmul)")
    g.add_argument("--json-out", default=None, help="also write the JSON result here")
    g.add_argument("--label", default="", help="free text copied into the JSON")


def _relaunch(args, argv: list[str]) -> int:
    env = dict(os.environ)
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        env.setdefault("DS_ACCELERATOR", "cpu")
    if env.get("DS_ACCELERATOR") == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, args.cpu_threads)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "llave_ds.bench", *argv]
    return subprocess.call(cmd, env=env)


def run(args, argv: Optional[list[str]] = None) -> int:
    if args.predict_only:
        result = predict_only(args)
        report.emit(report.format_prediction(result), result, args.json_out)
        return 0
    if args.ranks > 1 and "RANK" not in os.environ:
        if argv is None:
            argv = sys.argv[1:]
            if argv and argv[0] == "bench":  # called as `llave-ds bench ...`
                argv = argv[1:]
        return _relaunch(args, argv)
    result = worker(args)
    if result:
        report.emit(report.format_table(result), result, args.json_out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llave-ds bench", description=llave_ds.bench.__doc__.split("\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run(args, argv)
