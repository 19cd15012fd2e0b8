"""Training entry point: ``llave-ds train --config FILE.yaml key.sub=value ...``
(also ``python -m llave_ds.train``), under the deepspeed launcher, torchrun, srun or as
a single process. Reads top to bottom: config -> distributed -> model -> data ->
engine -> resume -> loop (gradient-cache step, metrics, checkpoints) -> export.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from llave_ds import checkpoint as ckpt
from llave_ds import distributed
from llave_ds.config import ConfigError, config_to_dict, dump_config, load_config
from llave_ds.data import GlobalBatchSampler, MMEBTrainDataset, PairCollator, TrainDataConfig
from llave_ds.gather import all_reduce_max, all_reduce_sum
from llave_ds.gradcache import GradCacheConfig, gradcache_step
from llave_ds.model import ModelConfig
from llave_ds.objective import ObjectiveConfig

logger = logging.getLogger("llave_ds.train")

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


# ------------------------------------------------------------------------------ config

@dataclass
class ProcessingConfig:
    max_length: int = 1024
    max_image_tokens: Optional[int] = None
    query_instruction: Optional[str] = None
    target_instruction: Optional[str] = None
    system_prompt: str = "You are a helpful assistant."
    padding_side: str = "right"

    def validate(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"processing.max_length must be >= 8, got {self.max_length}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"processing.padding_side must be left or right, got {self.padding_side!r}")


@dataclass
class DeepSpeedConfig:
    # A file in ds_configs/ by name (zero2, zero3, zero3_offload) or a path to a JSON file.
    config: str = "zero3"
    gradient_clipping: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleConfig:
    epochs: int = 1
    max_steps: int = 0  # > 0 stops after this many optimizer steps
    warmup_ratio: float = 0.03
    kind: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule.kind must be cosine, linear or constant, got {self.kind!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set schedule.epochs >= 1 or schedule.max_steps >= 1")


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: only at the end (and on preemption)
    keep_last: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint in the run dir, if any) | none | a path
    dir: str = ""  # default: <run_dir>/checkpoints


@dataclass
class LoggingConfig:
    every_steps: int = 1
    progress: bool = True
    tensorboard: bool = False
    warmup_steps: int = 2  # excluded from the throughput summary


@dataclass
class ExportConfig:
    at_end: bool = True
    dtype: str = "bfloat16"  # bfloat16 | float32
    dir: str = ""  # default: <run_dir>/export


@dataclass
class TrainConfig:
    run_dir: str = "runs/llave"
    seed: int = 42
    global_batch_size: int = 256
    num_workers: int = 2
    collective_timeout_s: float = 1800.0
    model: ModelConfig = field(default_factory=ModelConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    gradcache: GradCacheConfig = field(default_factory=GradCacheConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.collective_timeout_s <= 0:
            raise ValueError("collective_timeout_s must be > 0")
        for name in ("query_chunk_size", "target_chunk_size"):
            if getattr(self.gradcache, name) > self.global_batch_size:
                raise ValueError(f"gradcache.{name}={getattr(self.gradcache, name)} is larger than "
                                 f"global_batch_size={self.global_batch_size}")
        if self.export.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"export.dtype must be bfloat16 or float32, got {self.export.dtype!r}")
        resolve_ds_config_path(self.deepspeed.config)  # a missing file fails before any process group

    def validate_for_world(self, world_size: int) -> None:
        """Checks that need the number of ranks (before any model is built)."""
        if self.global_batch_size % world_size:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not divisible by the "
                              f"{world_size} ranks: every rank must hold the same number of pairs")
        local = self.global_batch_size // world_size
        for name in ("query_chunk_size", "target_chunk_size"):
            if getattr(self.gradcache, name) > local:
                raise ConfigError(f"gradcache.{name}={getattr(self.gradcache, name)} is larger than the "
                                  f"per-rank batch {local} (= {self.global_batch_size} / {world_size} ranks)")


def resolve_ds_config_path(name: str) -> Path:
    candidate = Path(name)
    if candidate.suffix != ".json":
        candidate = DS_CONFIG_DIR / f"{name}.json"
    if not candidate.is_file():
        shipped = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ValueError(f"deepspeed.config: {name!r} is neither a JSON file nor one of the shipped "
                         f"configs {shipped} (looked for {candidate})")
    return candidate


# ---------------------------------------------------------------------------- helpers

def lr_lambda(total_steps: int, cfg: ScheduleConfig):
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.kind == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return factor


def step_seed(seed: int, step: int, rank: int) -> int:
    """Per-step, per-rank seed: dropout masks depend only on (seed, step, rank), so an
    interrupted and resumed run draws exactly what an uninterrupted one draws."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2 ** 63)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def count_tokens(chunks) -> int:
    return int(sum(int(c["attention_mask"].sum()) for c in chunks if isinstance(c, dict) and "attention_mask" in c))


class PreemptionFlag:
    """SIGUSR1 / SIGTERM set a flag; the loop checkpoints at the end of the current step."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name


class MetricsWriter:
    """Per-step JSONL on rank 0 (appended across resumes), optional TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError("logging.tensorboard=true needs the tensorboard package "
                                  "(pip install tensorboard)") from exc
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------ train

@dataclass
class TrainResult:
    run_dir: str
    steps: int
    final_loss: float
    stopped_early: bool = False
    checkpoint: str = ""
    export_dir: str = ""


def train(cfg: TrainConfig, on_step_end: Optional[Callable[[int, object], None]] = None) -> TrainResult:
    """Run the training job on this rank (every rank calls it).

    ``on_step_end(step, result)``, if given, runs after each optimizer step (tests use it
    to raise a preemption signal at a chosen step).
    """
    from llave_ds import engine as eng
    from llave_ds.model import load_embedding_model, trainable_parameters
    from llave_ds.processing import InputFormatter

    # -- distributed environment, before anything heavy: bad configs fail fast ----------
    denv = distributed.detect_env()
    cfg.validate_for_world(denv.world_size)
    env = distributed.init_distributed(timeout_s=cfg.collective_timeout_s)
    rank, world = env.rank, env.world_size
    is_main = rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s")
    run_dir = Path(cfg.run_dir)
    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_root.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    local_batch = cfg.global_batch_size // world

    # -- DeepSpeed config, model, formatter ---------------------------------------------
    ds_config = eng.complete_ds_config(
        eng.load_ds_config(resolve_ds_config_path(cfg.deepspeed.config)),
        local_batch_size=local_batch, world_size=world,
        gradient_clipping=cfg.deepspeed.gradient_clipping,
        activation_checkpointing=cfg.model.gradient_checkpointing,
        bf16=cfg.model.dtype == "bfloat16")
    eng.attach_deepspeed_comm()
    model, processor = load_embedding_model(cfg.model, deepspeed_config=ds_config)
    formatter = InputFormatter(processor, model.backbone, max_length=cfg.processing.max_length,
                               max_image_tokens=cfg.processing.max_image_tokens,
                               query_instruction=cfg.processing.query_instruction,
                               target_instruction=cfg.processing.target_instruction,
                               system_prompt=cfg.processing.system_prompt,
                               padding_side=cfg.processing.padding_side)

    # -- data: every rank the same number of pairs per step -----------------------------
    dataset = MMEBTrainDataset(cfg.data)
    sampler = GlobalBatchSampler(dataset, cfg.global_batch_size, rank=rank, world_size=world,
                                 seed=cfg.seed, homogeneous=cfg.data.homogeneous_batches)
    collator = PairCollator(formatter, cfg.gradcache.query_chunk_size, cfg.gradcache.target_chunk_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                         num_workers=cfg.num_workers,
                                         persistent_workers=False)
    steps_per_epoch = len(sampler)
    total_steps = cfg.schedule.max_steps if cfg.schedule.max_steps > 0 else steps_per_epoch * cfg.schedule.epochs
    negatives = cfg.data.num_hard_negatives if cfg.data.use_hard_negatives else 0

    # -- optimizer, schedule, engine ----------------------------------------------------
    params = trainable_parameters(model)
    optimizer = eng.build_optimizer(params, ds_config, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.schedule))
    engine = eng.build_engine(model, optimizer, ds_config, lr_scheduler=scheduler)
    backend = eng.DeepSpeedStepBackend(engine, reduction=cfg.gradcache.reduction)
    device = backend.device

    # -- resume ---------------------------------------------------------------------------
    step = 0
    resume_from = None
    if cfg.checkpoint.resume == "auto":
        resume_from = ckpt.find_resume_checkpoint(ckpt_root)
    elif cfg.checkpoint.resume not in ("none", ""):
        resume_from = Path(cfg.checkpoint.resume)
        ckpt.describe(resume_from)
    if resume_from is not None:
        state = eng.load_checkpoint(engine, resume_from)
        if state.get("world_size") != world:
            raise ckpt.CheckpointError(
                f"{resume_from} was written by {state.get('world_size')} ranks, this run has {world}: "
                "resume with the same number of ranks, or convert it with DeepSpeed's "
                "ds_to_universal.py and load it as a universal checkpoint")
        step = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        ckpt.load_rng_state(resume_from, rank)
        if is_main:
            logger.info("resumed from %s at step %d", resume_from, step)

    # -- the loop ---------------------------------------------------------------------------
    preempt = PreemptionFlag()
    preempt.install()
    metrics = MetricsWriter(run_dir, is_main, cfg.logging.tensorboard)
    progress = None
    if is_main and cfg.logging.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    last_saved = step if resume_from is not None else -1
    final_loss = float("nan")
    stopped_early = False
    timed = []

    def save(at_step: int) -> Path:
        # The data position is the global step: epoch = step // steps_per_epoch, and the
        # batches already consumed in it = step % steps_per_epoch (the sampler's plan is
        # a function of seed and epoch only).
        sampler_state = {**sampler.state_dict(), "epoch": at_step // steps_per_epoch,
                         "step": at_step % steps_per_epoch}
        state = {"step": at_step, "world_size": world, "sampler": sampler_state}
        path = eng.save_checkpoint(engine, ckpt_root, ckpt.tag_for_step(at_step), state)
        if is_main:
            ckpt.prune_checkpoints(ckpt_root, cfg.checkpoint.keep_last)
        return path

    saved_path = resume_from
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch)
            for batch in loader:
                t0 = time.perf_counter()
                torch.manual_seed(step_seed(cfg.seed, step, rank))
                batch = batch.to(device)
                result = gradcache_step(backend, batch.query_chunks, batch.target_chunks, cfg.objective,
                                        batch.negative_chunks, batch.num_negatives_per_pair if negatives else 0)
                step += 1
                elapsed = time.perf_counter() - t0
                if on_step_end is not None:
                    on_step_end(step, result)
                # Ranks must agree to stop together: one tiny all-reduce per step.
                flags = torch.tensor([float(preempt.requested),
                                      float(count_tokens(batch.query_chunks) + count_tokens(batch.target_chunks)
                                            + count_tokens(batch.negative_chunks))], device=device)
                stop_now = bool(all_reduce_max(flags[:1]).item())
                tokens = float(all_reduce_sum(flags[1:]).item())
                final_loss = float(result.output.loss.detach())
                if step > cfg.logging.warmup_steps:
                    timed.append((elapsed, tokens))
                if is_main and step % max(1, cfg.logging.every_steps) == 0:
                    record = {"step": step, "epoch": epoch, **result.metrics(),
                              "samples_per_s": cfg.global_batch_size / elapsed,
                              "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                              "peak_mem_gb": peak_memory_gb(device), "skipped_rows": sum(batch.skipped.values())}
                    metrics.write(record)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{final_loss:.4f}", gap=f"{float(result.output.gap):.3f}",
                                         sps=f"{cfg.global_batch_size / elapsed:.1f}")
                if cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0:
                    saved_path, last_saved = save(step), step
                if stop_now:
                    logger.warning("preemption requested (%s): checkpointing at step %d and stopping",
                                   preempt.signal_name or "signal on another rank", step)
                    stopped_early = True
                    break
                if step >= total_steps:
                    break
            if stopped_early:
                break
        if last_saved != step:
            saved_path, last_saved = save(step), step
    finally:
        if progress is not None:
            progress.close()
        metrics.close()

    export_dir = ""
    if cfg.export.at_end and not stopped_early:
        from llave_ds.export import export_from_engine
        export_dir = str(Path(cfg.export.dir) if cfg.export.dir else run_dir / "export")
        export_from_engine(engine, model, processor, formatter, export_dir, cfg, dtype=cfg.export.dtype)
    if is_main and timed:
        sps = [cfg.global_batch_size / t for t, _ in timed]
        logger.info("throughput over %d timed steps: %.2f samples/s, %.0f tokens/s", len(timed),
                    sum(sps) / len(sps), sum(tok / t for t, tok in timed) / len(timed))
    return TrainResult(run_dir=str(run_dir), steps=step, final_loss=final_loss, stopped_early=stopped_early,
                       checkpoint=str(saved_path or ""), export_dir=export_dir)


# -------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/); omitted = built-in defaults")
    parser.add_argument("--resume", help="auto | none | CHECKPOINT_DIR (same as checkpoint.resume=...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_config(TrainConfig, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"llave-ds train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    try:
        result = train(cfg)
    except (ConfigError, ckpt.CheckpointError) as exc:
        print(f"llave-ds train: {exc}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(Exception):
            distributed.shutdown_distributed()
    if distributed.detect_env().rank == 0:
        print(json.dumps({"run_dir": result.run_dir, "steps": result.steps, "final_loss": result.final_loss,
                          "checkpoint": result.checkpoint, "export": result.export_dir,
                          "stopped_early": result.stopped_early}))
    # Preempted: a distinct exit code lets launch scripts requeue.
    return 3 if result.stopped_early else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
