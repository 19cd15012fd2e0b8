"""The benchmark run on one rank: per configuration build the model and its DeepSpeed
engine, time the cached step at every chunk size and the uncached step once, and return
the measured rows (with the cost model's predictions beside them).

Configurations: every ZeRO stage of ``--stages`` x activation checkpointing mode of
``--ckpt`` (one engine each) x chunk size of ``--chunk-sizes``. Per engine the uncached step
(one forward with autograd over the whole local batch per role, loss, backward, step) is
timed at the same local batch where it fits.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import transformers
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from llave_ds.bench import report, shapes
from llave_ds.bench.inputs import Workload, build_chunk, build_workload, chunked, describe, to_device
from llave_ds.bench.profile import profile_step
from llave_ds.bench.timing import MemoryProbe, TimedBackend, measure_peak_tflops, plain_step
from llave_ds.config import shipped_file
from llave_ds.core import distributed
from llave_ds.core.gradcache import gradcache_step
from llave_ds.core.objective import ObjectiveConfig
from llave_ds.model.checkpointing import apply_gradient_checkpointing
from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config, trainable_parameters
from llave_ds.model.fused_kernels import patched_kernels
from llave_ds.training.cost import (GIB, checkpointed_share, chunk_forward_flops, predict_chunks_memory, step_flops,
                                    sum_parts, utilization)
from llave_ds.training.engine import (DeepSpeedStepBackend, attach_deepspeed_comm, build_engine, build_optimizer,
                                      comms_reset, comms_snapshot, complete_ds_config, count_zero3_fetches,
                                      load_ds_config, silence_deprecated_collective_warnings)
from llave_ds.training.memory_plan import MemoryConfig, build_time_ds_config, plan_for_model

logger = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """What every engine of one benchmark run on this rank shares."""
    args: argparse.Namespace   # the command line: what to sweep, DeepSpeed overrides, step counts
    work: Workload             # model config, parameter counts, geometry, this rank's sides
    rank: int
    world: int
    device: torch.device
    dtype_name: str            # bfloat16 | float32
    peak_tflops: float
    probe: MemoryProbe

    @property
    def param_bytes(self) -> int:
        return 2 if self.dtype_name == "bfloat16" else 4


# ---------------------------------------------------------------------------------------
# Building one engine
# ---------------------------------------------------------------------------------------

def ds_config_for(args, stage: int, local_batch: int, world: int, ckpt: str, bf16: bool) -> dict:
    """The completed DeepSpeed config of one configuration (``--ds-config`` or the shipped
    one for the stage, with the command line's ZeRO-3 overrides)."""
    path = args.ds_config or shipped_file("deepspeed", f"zero{stage if stage in (2, 3) else 2}")
    cfg = load_ds_config(path)
    zo = cfg.setdefault("zero_optimization", {})
    zo["stage"] = stage
    threshold = None if args.persistence_threshold == "auto" else args.persistence_threshold  # auto: the plan's
    overrides = {"stage3_param_persistence_threshold": threshold,
                 "stage3_prefetch_bucket_size": args.prefetch_bucket,
                 "stage3_max_live_parameters": args.max_live,
                 "stage3_max_reuse_distance": args.max_reuse}
    if stage == 3:
        for key, value in overrides.items():
            if value is not None:
                zo[key] = int(value)
        if args.no_fetch_units:
            zo["leaf_module"] = {"classes": []}  # a config of its own: llave-ds adds no fetch units
        if args.deepspeed_linear:
            zo["memory_efficient_linear"] = True
    else:
        for key in list(zo):
            if key.startswith("stage3_"):
                zo.pop(key)
    if args.count_comms:
        cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    cfg["steps_per_print"] = 10 ** 9
    cfg["wall_clock_breakdown"] = False
    return complete_ds_config(cfg, local_batch_size=local_batch, world_size=world, gradient_clipping=1.0,
                              activation_checkpointing=ckpt, bf16=bf16)


def build_model(hf_config, args, dtype_name: str, ckpt: str, ds_cfg: dict, device: torch.device):
    mcfg = ModelConfig(backbone=hf_config.model_type, dtype=dtype_name, attn_implementation=args.attn,
                       freeze_vision_tower=not args.train_vision_tower, gradient_checkpointing=ckpt,
                       checkpoint_every=args.checkpoint_every,
                       cache_frozen_vision=not args.no_vision_cache, padding_mask=args.padding_mask,
                       fused_kernels=getattr(args, "fused_kernels", "off"))
    stage3 = int(ds_cfg.get("zero_optimization", {}).get("stage", 0)) == 3
    if device.type == "cuda" and not stage3:
        # Initialise on the GPU (seconds instead of a minute of CPU init for 2B+ shapes).
        try:
            with torch.device(device):
                model = build_embedding_model_from_config(hf_config, mcfg, deepspeed_config=ds_cfg)
            if any(p.is_meta for p in model.parameters()):
                raise RuntimeError("parameters left on the meta device")
            return model
        except Exception as exc:  # noqa: BLE001 - fall back to the ordinary CPU build
            logger.warning("building on %s failed (%r); building on the CPU", device, exc)
            free(device)
    return build_embedding_model_from_config(hf_config, mcfg, deepspeed_config=ds_cfg)


def padding_mask_kept(args) -> bool:
    """Whether the language model gets a padding mask: the bench's chunks are right-padded, so
    only ``--padding-mask always`` keeps it (``ModelConfig.padding_mask``)."""
    return getattr(args, "padding_mask", "auto") == "always"


def _persistent_numel(module) -> int:
    return sum(p.ds_numel for p in module.parameters() if getattr(p, "ds_persist", False))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _Engine:
    """One engine of the sweep and what its rows share."""
    stage: int
    ckpt: str
    ds_config: dict
    backend: Any                # DeepSpeedStepBackend
    build_s: float
    optimizations: dict
    vision_cached: bool
    persistent: int             # ZeRO-3 persistent parameters (whole on every rank)
    capacity: Optional[int]     # CUDA device memory, for the predicted-OOM skip
    gen: torch.Generator        # the synthesised tensors of this engine's chunks
    objective: ObjectiveConfig
    config: Any                 # the transformers config (for the checkpointed share)

    checkpoint_every: int = 1

    @property
    def checkpointing(self) -> float:
        """The share of decoder layers checkpointed (what `step_flops` recomputes)."""
        return 0.0 if self.ckpt == "off" else checkpointed_share(self.config, self.checkpoint_every)


def _predicted(s: RunSettings, e: _Engine, chunks, together: bool = False) -> dict:
    return predict_chunks_memory(
        s.work.config, s.work.counts, chunks, s.work.geo, together=together, vision_cached=e.vision_cached,
        stage=e.stage, world=s.world, param_bytes=s.param_bytes, reduction=s.args.reduction,
        checkpointing=e.ckpt != "off", checkpoint_every=e.checkpoint_every, ds_config=e.ds_config,
        persistent_params=e.persistent,
        padding_mask=padding_mask_kept(s.args))


def _over_capacity(s: RunSettings, e: _Engine, pred: dict) -> Optional[str]:
    if s.args.skip_predicted_oom and e.capacity and pred["total"] > 0.95 * e.capacity:
        return f"predicted {pred['total'] / GIB:.1f} GiB > 95% of {e.capacity / GIB:.1f} GiB"
    return None


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------

def _time_cached(s: RunSettings, e: _Engine, chunk: int) -> tuple[dict, str]:
    """The row of the cached step at chunk size ``chunk``, and why the engine is no longer
    trusted ("" unless this configuration ran out of memory inside a step)."""
    args, w = s.args, s.work
    q_lists = chunked(w.sides_q, chunk, w.geo, args.chunk_tokens)
    t_lists = chunked(w.sides_t, chunk, w.geo, args.chunk_tokens)
    pred = _predicted(s, e, q_lists + t_lists)
    row = {"stage": e.stage, "ckpt": e.ckpt, "checkpoint_every": e.checkpoint_every if e.ckpt != "off" else None,
           "chunk": chunk, "chunk_tokens": args.chunk_tokens,
           "reduction": args.reduction,
           "build_s": e.build_s, "predicted_memory": pred}
    too_big = _over_capacity(s, e, pred)
    if too_big:
        row["skipped"] = too_big
        return row, ""
    q_chunks = [to_device(build_chunk(c, w.geo, e.gen), s.device) for c in q_lists]
    t_chunks = [to_device(build_chunk(c, w.geo, e.gen), s.device) for c in t_lists]
    fwd = sum_parts([chunk_forward_flops(w.config, c, w.geo) for c in q_lists + t_lists])
    timed = TimedBackend(e.backend, no_grad_encodes=len(q_chunks) + len(t_chunks))
    times, phases, comms, skipped_steps = [], [], [], 0
    broken = ""
    try:
        # Fetches are counted over every step, warm-up included: each step runs the same chunks.
        with (count_zero3_fetches() if e.stage == 3 else contextlib.nullcontext({})) as fetches:
            for i in range(args.warmup + args.steps):
                if i == args.warmup:
                    s.probe.reset()
                    comms_reset()
                timed.begin()
                res = gradcache_step(timed, q_chunks, t_chunks, e.objective)
                end = time.perf_counter()
                if i >= args.warmup:
                    skipped_steps += int(bool(getattr(res, "skipped", False)))
                    times.append(end - timed.marks["start"])
                    phases.append({**timed.cached_phases(end),
                                   **{f"gc_{k}": v for k, v in res.timings.items()}})
        loss = float(res.output.loss.detach())
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
        row["skipped"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
        broken = f"an earlier configuration of this engine ran out of memory (chunk {chunk})"
    if broken:
        res = timed = q_chunks = t_chunks = None
        free(s.device)
        return row, broken
    mem = s.probe.peak()
    if args.count_comms and args.steps:
        snap = comms_snapshot()
        comms = {k: {key: val / args.steps for key, val in v.items()} for k, v in snap.items()}
    if getattr(args, "profile", False):  # one more step, under torch.profiler (not timed)
        timed.begin()
        row["profile"] = profile_step(lambda: gradcache_step(timed, q_chunks, t_chunks, e.objective), s.device)
    step_s = statistics.median(times)
    median_phases = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    flops = step_flops(fwd, cached=True, checkpointing=e.checkpointing,
                       vision_trained=args.train_vision_tower, vision_cached=e.vision_cached)
    bookkeeping = median_phases["loss"] + median_phases["rest"]
    B, world, steps = args.pairs_per_rank, s.world, args.warmup + args.steps
    row.update({
        "step_s": step_s, "step_s_all": times, "loss": loss,
        "samples_per_s": B * world / step_s, "samples_per_s_per_rank": B / step_s,
        "tokens_per_step_per_rank": fwd["tokens"], "padded_tokens_per_step_per_rank": fwd["padded_tokens"],
        "tokens_per_s": fwd["tokens"] * world / step_s, "tokens_per_s_per_rank": fwd["tokens"] / step_s,
        "model_tflop_per_step_per_rank": flops["model"] / 1e12,
        "hardware_tflop_per_step_per_rank": flops["hardware"] / 1e12,
        "flops_split_tflop": {k: v / 1e12 for k, v in flops.items()},
        "forward_split_tflop": {k: v / 1e12 for k, v in fwd.items() if k not in ("tokens", "padded_tokens")},
        "mfu": utilization(flops["model"], step_s, s.peak_tflops),
        "hfu": utilization(flops["hardware"], step_s, s.peak_tflops),
        "phases_s": median_phases,
        "bookkeeping_frac": bookkeeping / step_s,
        "memory": mem, "peak_memory_gib": mem["peak_allocated"] / GIB,
        "predicted_memory_gib": pred["total"] / GIB,
        "memory_rel_err": (mem["peak_allocated"] - pred["total"]) / pred["total"],
        "chunks_per_role": len(q_chunks), "skipped_steps": skipped_steps,
        "comms_per_step": comms, "optimizations": e.optimizations,
        "zero3_fetches_per_step": {k: v / steps for k, v in fetches.items()},
        "zero3_fetches_per_chunk_pass": (sum(fetches.values()) / steps
                                         / (3 * (len(q_chunks) + len(t_chunks)))) if fetches else None,
    })
    return row, ""


def _time_uncached(s: RunSettings, e: _Engine, broken: str) -> Optional[dict]:
    """The uncached step at the same local batch (one chunk per role); None when
    ``--uncached-steps`` is 0."""
    args, w = s.args, s.work
    n_unc = args.steps if args.uncached_steps is None else args.uncached_steps
    if n_unc <= 0:
        return None
    pred_u = _predicted(s, e, [w.sides_q, w.sides_t], together=True)
    uncached = {"predicted_memory_gib": pred_u["total"] / GIB}
    too_big = _over_capacity(s, e, pred_u)
    if broken:
        uncached["skipped"] = f"not run: {broken}"
        return uncached
    if too_big:
        uncached["skipped"] = too_big
        return uncached
    q_all = to_device(build_chunk(w.sides_q, w.geo, e.gen), s.device)
    t_all = to_device(build_chunk(w.sides_t, w.geo, e.gen), s.device)
    timed = TimedBackend(e.backend)
    try:
        results = []
        for i in range(args.warmup + n_unc):
            if i == args.warmup:
                s.probe.reset()
            r = plain_step(timed, q_all, t_all, e.objective)
            if i >= args.warmup:
                results.append(r)
        mem = s.probe.peak()
        fwd_u = sum_parts([chunk_forward_flops(w.config, w.sides_q, w.geo),
                           chunk_forward_flops(w.config, w.sides_t, w.geo)])
        fl_u = step_flops(fwd_u, cached=False, checkpointing=e.checkpointing,
                          vision_trained=args.train_vision_tower)
        uncached.update({
            "step_s": statistics.median(r["total"] for r in results),
            "phases_s": {k: statistics.median(r[k] for r in results) for k in results[0]},
            "peak_memory_gib": mem["peak_allocated"] / GIB,
            "hardware_tflop_per_step_per_rank": fl_u["hardware"] / 1e12,
            "mfu": utilization(fl_u["model"], statistics.median(r["total"] for r in results), s.peak_tflops),
        })
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
        uncached["skipped"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
    return uncached


def _attach_uncached(rows: list[dict], uncached: Optional[dict]) -> None:
    for row in rows:
        if uncached is None or "step_s" not in row:
            continue
        row["uncached"] = uncached
        if "step_s" in uncached:
            row["cached_over_uncached"] = row["step_s"] / uncached["step_s"]
            row["cached_over_uncached_flops"] = (row["hardware_tflop_per_step_per_rank"]
                                                 / uncached["hardware_tflop_per_step_per_rank"])


def run_engine(s: RunSettings, stage: int, ckpt: str,
               on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """The rows of one engine (ZeRO ``stage``, checkpointing ``ckpt``): one per chunk size,
    each with the uncached step's numbers beside it; ``on_row`` sees each row as it ends."""
    args, w = s.args, s.work
    bf16 = s.dtype_name == "bfloat16"
    ds_cfg = ds_config_for(args, stage, args.pairs_per_rank, s.world, ckpt, bf16)
    gen = torch.Generator().manual_seed(args.seed * 7919 + s.rank)
    capacity = torch.cuda.get_device_properties(s.device).total_memory if s.device.type == "cuda" else None

    rows_out: list[dict] = []
    t_build = time.perf_counter()
    persistence = "auto" if args.persistence_threshold == "auto" else "config"
    model = build_model(w.config, args, s.dtype_name, ckpt, build_time_ds_config(ds_cfg, persistence), s.device)
    every = args.checkpoint_every
    plan = plan_for_model(model, memory=MemoryConfig(budget_gib=args.memory_budget_gib), checkpointing=ckpt,
                          checkpoint_every=every, persistence=persistence, ds_config=ds_cfg, world=s.world,
                          reduction=args.reduction, chunk_rows=max(args.chunk_sizes),
                          max_length=max(side.length(w.geo) for side in w.sides_q + w.sides_t),
                          step_rows=2 * args.pairs_per_rank, chunk_tokens=args.chunk_tokens,
                          padding_mask=padding_mask_kept(args), device=s.device)
    if plan is not None:  # what training does with "auto" (llave_ds/train.py)
        if ckpt == "auto":
            ckpt, every = plan.checkpointing, plan.checkpoint_every
            apply_gradient_checkpointing(model.base_hf_model, ckpt, every)
        ds_cfg = plan.apply_to(ds_cfg)
    optimizer = build_optimizer(trainable_parameters(model), ds_cfg, lr=1e-5, weight_decay=0.0)
    engine = build_engine(model, optimizer, ds_cfg)
    build_s = time.perf_counter() - t_build
    fetch_units = model.zero3_fetch_units() if stage == 3 and not args.no_fetch_units else []
    optimizations = {"fetch_units": fetch_units, "vision_cache": model.vision_cache is not None,
                     "padding_mask_dropped": not padding_mask_kept(args),
                     "fused_kernels": patched_kernels(model.base_hf_model),
                     "memory_efficient_linear": bool(ds_cfg["zero_optimization"].get("memory_efficient_linear", True))
                     if stage == 3 else None,
                     "checkpoint_every": every if ckpt != "off" else None,
                     "memory_plan": plan.as_dict() if plan is not None else None}
    backend = DeepSpeedStepBackend(engine, reduction=args.reduction)
    e = _Engine(stage=stage, ckpt=ckpt, ds_config=ds_cfg, backend=backend, build_s=build_s,
                optimizations=optimizations, vision_cached=model.vision_cache is not None,
                persistent=_persistent_numel(engine.module) if stage == 3 else 0,
                capacity=capacity, gen=gen, objective=ObjectiveConfig(), config=w.config, checkpoint_every=every)
    broken = ""  # after an out-of-memory inside a step the engine's state is not trusted
    try:
        for chunk in args.chunk_sizes:
            if broken:
                rows_out.append({"stage": stage, "ckpt": ckpt, "chunk": chunk, "reduction": args.reduction,
                                 "skipped": f"not run: {broken}"})
                continue
            row, broken = _time_cached(s, e, chunk)
            rows_out.append(row)
            if on_row:
                on_row(row)
        _attach_uncached(rows_out, _time_uncached(s, e, broken))
    finally:
        with contextlib.suppress(Exception):
            engine.destroy()
        del e, backend, engine, optimizer, model
        free(s.device)
        with contextlib.suppress(Exception):
            unset_hf_deepspeed_config()
    return rows_out


# ---------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------

def quiet_logs(rank: int) -> None:
    silence_deprecated_collective_warnings()  # exactly DeepSpeed's per-step ones, nothing broader
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR if rank else logging.WARNING)
    transformers.logging.set_verbosity_error()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return torch.device(name)


def versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("transformers", "deepspeed", "liger-kernel"):
        with contextlib.suppress(Exception):
            out[name] = importlib.metadata.version(name)
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def worker(args) -> dict:
    """This rank's part of the run; the result (rank 0) or {} (other ranks)."""
    device_kind = resolve_device(args.device)
    if device_kind.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if device_kind.type == "cuda" else "gloo"
    env = distributed.init_distributed(timeout_s=900, backend=backend)
    quiet_logs(env.rank)
    if device_kind.type == "cuda":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, args.cpu_threads))
        device_name = f"cpu ({os.cpu_count()} cores visible, {torch.get_num_threads()} threads/rank)"
    attach_deepspeed_comm()
    quiet_logs(env.rank)  # again: importing DeepSpeed (just now) sets its logger's level
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    torch.manual_seed(args.seed)

    work = build_workload(args, env.rank)
    if args.peak_tflops:
        peak, peak_source = float(args.peak_tflops), "given"
    else:
        peak, peak_source = measure_peak_tflops(device, dtype), f"measured {dtype_name} matmul"
    settings = RunSettings(args=args, work=work, rank=env.rank, world=env.world_size, device=device,
                           dtype_name=dtype_name, peak_tflops=peak, probe=MemoryProbe(device))

    rows: list[dict] = []      # rows of finished engines
    pending: list[dict] = []   # every row so far (the uncached numbers join at each engine's end)
    result: dict = {}

    def dump_partial() -> None:
        """The rows so far in --json-out, marked partial: a run killed by a time limit still
        leaves what it measured (the final write replaces it)."""
        if env.rank == 0 and args.json_out:
            report.write_json(args.json_out, dict(result, rows=pending, partial=True))

    def collect(row: dict) -> None:
        pending.append(row)
        if env.rank != 0:
            return
        print(report.progress_line(row), file=sys.stderr, flush=True)
        dump_partial()

    result.update({
        "benchmark": "throughput", "label": args.label, "shape": args.shape,
        "shape_source": shapes.resolve_shape(args.shape).source,
        "llm_layers": work.config.text_config.num_hidden_layers,
        "vision_layers": work.config.vision_config.num_hidden_layers,
        "deepstack_taps": list(getattr(work.config.vision_config, "deepstack_visual_indexes", []) or []),
        "deepstack_taps_dropped": shapes.dropped_deepstack_taps(args.shape, args.llm_layers, args.vision_layers),
        "params": work.counts, "device": device.type, "device_name": device_name,
        "world_size": env.world_size, "dtype": dtype_name, "attn": args.attn,
        "fused_kernels_requested": getattr(args, "fused_kernels", "off"),
        "pairs_per_rank": args.pairs_per_rank, "global_batch": args.pairs_per_rank * env.world_size,
        "steps": args.steps, "warmup": args.warmup,
        "peak_tflops": peak, "peak_source": peak_source,
        "inputs": describe(args, work.geo),
        "versions": versions(),
    })
    for stage in args.stages:
        for ckpt in args.ckpt:
            rows += run_engine(settings, stage, ckpt, on_row=collect)
            dump_partial()
    result["rows"] = rows
    result["targets"] = report.evaluate_targets(result)
    distributed.shutdown_distributed()
    return result if env.rank == 0 else {}
