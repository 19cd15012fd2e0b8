"""Training entry point: ``llave-ds train --config FILE.yaml key.sub=value ...``
(also ``python -m llave_ds.train``), under the deepspeed launcher, torchrun, srun or as
a single process. Reads top to bottom: config -> preflight (model directory, resume
checkpoint) -> distributed -> data -> model -> engine -> resume -> loop (gradient-cache
step, metrics, checkpoints) -> export.

The loop composes the library: data (`llave_ds.data`), the model and its formatter
(`llave_ds.model`), the gradient cache (`llave_ds.core.gradcache`) and DeepSpeed
(`llave_ds.training.engine`); the run directory (`llave_ds.training.run_dir.RunDir`) owns
every file the run writes, `llave_ds.training.step_log` what each step logs, and
`llave_ds.core.distributed` the preemption flag and the launcher watch.

Failure handling (docs/RELIABILITY.md): configuration and checkpoint problems that can be
seen without the other ranks fail before any process group exists; a failure on one rank
(data loading, a checkpoint write) is agreed on and raised on every rank with its text;
a non-finite loss or gradient skips the step on every rank (counted, logged) and too many
in a row stop the run (``optim.max_consecutive_skips``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from llave_ds.config import ConfigError, config_to_yaml, load_config, shipped_file
from llave_ds.core import distributed
from llave_ds.core.distributed import PreemptionFlag, is_peer_failure
from llave_ds.core.gather import all_gather_objects, all_reduce_max, all_reduce_sum, is_distributed, rank_errors
from llave_ds.core.gradcache import GradCacheConfig, gradcache_step
from llave_ds.core.objective import ObjectiveConfig
from llave_ds.data.batching import CountingCollator, GlobalBatchSampler, PairCollator
from llave_ds.data.errors import DataError
from llave_ds.data.loading import open_train_data, train_loader
from llave_ds.data.mmeb_train import TrainDataConfig
from llave_ds.export.model_dir import ExportConfig, export_from_engine
from llave_ds.model.backbones import check_model_path
from llave_ds.model.checkpointing import apply_gradient_checkpointing
from llave_ds.model.embedding import ModelConfig, load_embedding_model, trainable_parameters
from llave_ds.model.formatter import InputFormatter, ProcessingConfig
from llave_ds.training import checkpoint as ckpt
from llave_ds.training import engine as eng
from llave_ds.training.checkpoint import CheckpointConfig
from llave_ds.training.elastic import Layout, prepare_universal, resume_route
from llave_ds.training.engine import (DeepSpeedConfig, EngineConfigError, complete_ds_config, load_ds_config,
                                      resolve_ds_config_path)
from llave_ds.training.memory_plan import MemoryConfig, build_time_ds_config, plan_for_model
from llave_ds.training.optim import OptimConfig, ScheduleConfig, lr_lambda
from llave_ds.training.run_dir import RunDir, choose_verified
from llave_ds.training.step_log import MetricsWriter, ProgressBar, peak_memory_gb

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ config
# Each section's config lives beside the component it configures (ModelConfig in model,
# ProcessingConfig in processing, CheckpointConfig in checkpoint, DeepSpeedConfig in engine,
# ExportConfig in export, OptimConfig / ScheduleConfig in optim, ...); only the logging
# section, which this loop alone uses, and the top-level TrainConfig are defined here.

@dataclass
class LoggingConfig:
    every_steps: int = 1
    progress: bool = True
    tensorboard: bool = False
    warmup_steps: int = 2  # excluded from the throughput summary


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
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.collective_timeout_s <= 0:
            raise ValueError("collective_timeout_s must be > 0")
        self.check_chunk_sizes(1)
        if self.model.dtype == "float16":
            raise ValueError("model.dtype=float16 would train fp16 weights without loss scaling, and DeepSpeed's "
                             "fp16 loss scaling does not mix with the gradient cache; use bfloat16 or float32")
        # The DeepSpeed config is read and checked here, before any process group: a missing
        # or invalid file, a ZeRO stage that cannot work, fp16, an optimizer block...
        path = resolve_ds_config_path(self.deepspeed.config)
        try:
            complete_ds_config(load_ds_config(path), local_batch_size=1, world_size=1,
                               gradient_clipping=self.deepspeed.gradient_clipping,
                               activation_checkpointing=self.model.gradient_checkpointing,
                               bf16=self.model.dtype == "bfloat16")
        except EngineConfigError as exc:
            raise ValueError(f"deepspeed.config ({path}): {exc}") from None

    def validate_for_world(self, world_size: int) -> None:
        """Checks that need the number of ranks (before any model is built)."""
        if self.global_batch_size % world_size:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not divisible by the "
                              f"{world_size} ranks: every rank must hold the same number of pairs")
        self.check_chunk_sizes(world_size)

    def check_chunk_sizes(self, world_size: int) -> None:
        """A chunk may not exceed a rank's share of the batch (the whole batch on one rank);
        the rule is the gradient cache's (`GradCacheConfig.validate`)."""
        local = self.global_batch_size // world_size
        share = (f"global_batch_size={self.global_batch_size}" if world_size == 1 else
                 f"the per-rank batch {local} (= {self.global_batch_size} / {world_size} ranks)")
        try:
            self.gradcache.validate(local, share)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def resolve_train_config_path(name: Optional[str]) -> Optional[str]:
    """``--config``: a YAML file, or the name of a shipped config (``--config llave_2b``)."""
    if name is None or Path(name).is_file() or Path(name).suffix in (".yaml", ".yml") or "/" in name:
        return name
    return str(shipped_file("train", name))


# ---------------------------------------------------------------------------- helpers

def step_seed(seed: int, step: int, rank: int) -> int:
    """Per-step, per-rank seed: dropout masks depend only on (seed, step, rank), so an
    interrupted and resumed run draws exactly what an uninterrupted one draws."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2 ** 63)


def count_tokens(chunks) -> int:
    return int(sum(int(c["attention_mask"].sum()) for c in chunks if isinstance(c, dict) and "attention_mask" in c))


class TrainingError(RuntimeError):
    """A failure raised on every rank together, with the failing rank's text (a rank's data
    loader raised, ranks ran out of data unevenly, too many non-finite steps)."""


class PeerStoppedError(TrainingError):
    """Another rank is gone (killed, crashed, its node lost) while this one was in a collective:
    raised on the surviving ranks instead of the communication library's own error."""


class NonFiniteLossError(TrainingError):
    """``optim.max_consecutive_skips`` steps in a row had a non-finite loss or gradient."""


def run_layout(cfg: "TrainConfig", world_size: int) -> Layout:
    """Ranks, ZeRO stage and global batch: what decides how a checkpoint resumes (``elastic``)."""
    stage = eng.zero_stage(load_ds_config(resolve_ds_config_path(cfg.deepspeed.config)))
    return Layout(world_size, stage, cfg.global_batch_size)


def preflight(cfg: "TrainConfig", world_size: int) -> list[Path]:
    """Every check that needs no other rank, before any process group exists: the number of
    ranks, the model directory, the resume checkpoint (on another layout too). Returns the
    checkpoints to try resuming from, best first (``RunDir.resume_candidates``)."""
    cfg.validate_for_world(world_size)
    check_model_path(cfg.model.path, cfg.model.backbone)
    return RunDir.from_config(cfg).resume_candidates(cfg.checkpoint.resume, run_layout(cfg, world_size),
                                                     cfg.checkpoint.overwrite)


def next_batch_agreed(iterator, device: torch.device, step: int):
    """The next item of ``iterator`` on every rank, or None when every rank's is exhausted.

    One tiny all-reduce per step. A rank whose loader raised makes every rank raise
    TrainingError with that rank's error text; ranks running out of data at different
    steps (they would hang in the next collective) make every rank raise too.
    """
    item, error = None, None
    status = 0  # 0 ok, 1 exhausted, 2 failed
    try:
        item = next(iterator)
    except StopIteration:
        status = 1
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        status, error = 2, exc
    flags = torch.tensor([status == 2, status == 1, status == 0], dtype=torch.int64, device=device)
    any_failed, any_done, any_ok = (bool(v) for v in all_reduce_max(flags).tolist())
    if any_failed:
        texts = rank_errors(f"{type(error).__name__}: {error}" if error is not None else None, device)
        raise TrainingError(f"loading the batch of step {step} failed on "
                            f"{'this rank' if error is not None else 'another rank'}: {'; '.join(texts)}") from error
    if any_done and any_ok:
        done = rank_errors("ran out of data" if status == 1 else None, device)
        raise TrainingError(f"at step {step} {', '.join(d.split(':')[0] for d in done)} ran out of data while the "
                            "other ranks still had batches: every rank must draw the same number of steps "
                            "(same data, same global_batch_size)")
    return None if any_done else item


def check_same_data(dataset, sampler, device: torch.device) -> None:
    """Every rank must see the same dataset and the same number of steps per epoch, or the
    first rank to finish an epoch would leave the others waiting in a collective; and agree
    on whether the data has videos (the formatter's video slot: the same modules per chunk)."""
    if not is_distributed():
        return
    seen = all_gather_objects((len(dataset), len(sampler), bool(getattr(dataset, "has_videos", False))))
    if len(set(seen)) > 1:
        detail = ", ".join(f"rank {r}: {n} pairs / {s} steps per epoch{' / videos' if v else ''}"
                           for r, (n, s, v) in enumerate(seen))
        raise DataError(f"the ranks see different training data ({detail}); every rank must read the same "
                        "data (data.source, data.image_root, data.subsets, data.max_per_subset)")


# ------------------------------------------------------------------------ train state

@dataclass
class TrainState:
    """Where the run is, beyond the engine's tensors: one object that every checkpoint
    saves (``state_dict``, the engine's client state) and a resume restores
    (``load_state_dict``).

    The data position is the global step: epoch = step // steps_per_epoch, and the batches
    consumed in it = step % steps_per_epoch (the sampler's plan is a function of seed and
    epoch only), so it holds on any rank count. The RNG is each rank's own: ``save_checkpoint``
    writes it beside the client state (``rng_rank<r>.pt``) and ``resume`` restores it.
    """
    sampler: GlobalBatchSampler   # or the shards' ShardBatchPlan: the same state_dict / load_state_dict
    world_size: int
    step: int = 0
    skipped_steps: int = 0       # optimizer steps skipped for non-finite values, in total
    consecutive_skips: int = 0   # ... in a row up to now (the run stops at optim.max_consecutive_skips)
    skipped_rows: int = 0        # bad rows replaced during training, summed over ranks
    truncated_sides: int = 0     # sides cut to processing.max_length (this launch only)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def state_dict(self) -> dict:
        sampler = {**self.sampler.state_dict(), "epoch": self.epoch, "step": self.step % self.steps_per_epoch}
        return {"step": self.step, "world_size": self.world_size, "sampler": sampler,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "skipped_rows": self.skipped_rows}

    def load_state_dict(self, state: dict, source: Path, elastic: bool = False) -> None:
        if not elastic:  # the checkpoint's own files were loaded: they must be this layout's
            ckpt.check_written_by(source, state.get("world_size"), self.world_size)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.skipped_rows = int(state.get("skipped_rows", 0))
        self.sampler.load_state_dict(state["sampler"])

    def resume(self, engine, path: Path, rank: int, universal: Optional[Path] = None) -> None:
        """Engine tensors, this state and this rank's RNG from the checkpoint at ``path``; from
        its ``universal`` form on another layout, where the RNG files are those of ranks that no
        longer exist and none is restored (each step reseeds from (seed, step, rank) anyway)."""
        self.load_state_dict(eng.load_checkpoint(engine, path, universal), path, elastic=universal is not None)
        if universal is None:
            ckpt.load_rng_state(path, rank)

    def record(self, result, skipped_rows: int, truncated_sides: int) -> None:
        """Count one finished step (``result.skipped`` is the same on every rank)."""
        self.step += 1
        self.skipped_rows += skipped_rows
        self.truncated_sides += truncated_sides
        self.skipped_steps += int(result.skipped)
        self.consecutive_skips = self.consecutive_skips + 1 if result.skipped else 0


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    final_loss: Optional[float]  # None when this launch ran no step and the run logged no loss
    stopped_early: bool = False
    checkpoint: str = ""
    export_dir: str = ""


# ------------------------------------------------------------------------------ train

def train(cfg: TrainConfig, on_step_end: Optional[Callable[[int, object], None]] = None) -> TrainResult:
    """Run the training job on this rank (every rank calls it).

    ``on_step_end(step, result)``, if given, runs after each optimizer step (tests use it
    to raise a preemption signal at a chosen step).
    """
    eng.silence_deprecated_collective_warnings()  # DeepSpeed's, one per ZeRO step otherwise
    # -- before any process group: config for this world size, model dir, resume checkpoint
    denv = distributed.detect_env()
    resume_candidates = preflight(cfg, denv.world_size)
    # Installed first: SIGUSR1's default action kills the process, and a cluster may send
    # it while a large model is still loading.
    preempt = PreemptionFlag()
    preempt.install()
    env = distributed.init_distributed(timeout_s=cfg.collective_timeout_s)
    rank, world = env.rank, env.world_size
    is_main = rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s")
    run = RunDir.from_config(cfg)
    if is_main:
        run.prepare(cfg, fresh=not resume_candidates)
    device = distributed.default_device(env)

    # -- the resume checkpoint's checksums, read by all ranks in parallel ------------------
    resume_from = choose_verified(resume_candidates, resume=cfg.checkpoint.resume, checksums=cfg.checkpoint.checksums,
                                  rank=rank, world=world, device=device, is_main=is_main)
    universal = None  # another rank count: continue through the universal checkpoint
    if resume_from is not None and resume_route(resume_from, run_layout(cfg, world)) == "universal":
        universal = prepare_universal(resume_from, rank=rank, device=device,
                                      timeout_s=cfg.checkpoint.universal_timeout_s)

    # -- data first (cheap, and bad data should not wait for the model): same on all ranks
    dataset, sampler = open_train_data(cfg.data, global_batch_size=cfg.global_batch_size, rank=rank, world_size=world,
                                       seed=cfg.seed, video_frames=cfg.processing.video_frames,
                                       video_max_side=cfg.processing.video_max_side)
    check_same_data(dataset, sampler, device)

    # -- DeepSpeed config, model, formatter ---------------------------------------------
    torch.manual_seed(cfg.seed)
    ds_config = eng.complete_ds_config(
        eng.load_ds_config(resolve_ds_config_path(cfg.deepspeed.config)),
        local_batch_size=cfg.global_batch_size // world, world_size=world,
        gradient_clipping=cfg.deepspeed.gradient_clipping,
        activation_checkpointing=cfg.model.gradient_checkpointing,
        bf16=cfg.model.dtype == "bfloat16")
    eng.attach_deepspeed_comm()
    model, processor = load_embedding_model(
        cfg.model, deepspeed_config=build_time_ds_config(ds_config, cfg.deepspeed.param_persistence))
    # Matryoshka sizes against the model's width, before any step (the same on every rank)
    try:
        cfg.objective.matryoshka(model.hidden_size)
    except ValueError as exc:
        raise ValueError(f"objective: {exc} (model {cfg.model.path})") from None
    # -- memory plan: "auto" checkpointing / persistence from the memory model (same on all ranks:
    # a function of the config, the model and the device kind only) -------------------------
    negatives = cfg.data.num_hard_negatives if cfg.data.use_hard_negatives else 0
    plan = plan_for_model(
        model, memory=cfg.memory, checkpointing=cfg.model.gradient_checkpointing,
        checkpoint_every=cfg.model.checkpoint_every, persistence=cfg.deepspeed.param_persistence,
        ds_config=ds_config, world=world, reduction=cfg.gradcache.reduction,
        chunk_rows=max(cfg.gradcache.query_chunk_size, cfg.gradcache.target_chunk_size),
        max_length=cfg.processing.max_length, chunk_tokens=cfg.gradcache.chunk_tokens,
        step_rows=cfg.global_batch_size // world * (2 + negatives),
        padding_mask=cfg.model.padding_mask == "always" or cfg.processing.padding_side == "left", device=device)
    if plan is not None:
        if cfg.model.gradient_checkpointing == "auto":
            apply_gradient_checkpointing(model.base_hf_model, plan.checkpointing, plan.checkpoint_every)
        ds_config = plan.apply_to(ds_config)
        if is_main:
            run.write_memory_plan(plan.as_dict())
    if universal is not None:
        ds_config = eng.with_universal_load(ds_config)
    # video_slot: with any video rows every chunk carries a (dummy) video, so every rank runs
    # the same tower calls in every chunk under ZeRO-3 (docs/VIDEO.md, the dummy rule).
    formatter = InputFormatter.from_config(processor, model.backbone, cfg.processing,
                                           video_slot=dataset.has_videos)

    # -- loader: every rank the same number of pairs per step ------------------------------
    collator = CountingCollator(PairCollator(formatter, **cfg.gradcache.chunk_sizes()))
    loader = train_loader(dataset, sampler, collator, cfg.num_workers)
    total_steps = cfg.schedule.max_steps if cfg.schedule.max_steps > 0 else len(sampler) * cfg.schedule.epochs

    # -- optimizer, schedule, engine ----------------------------------------------------
    optimizer = eng.build_optimizer(trainable_parameters(model), ds_config, lr=cfg.optim.lr,
                                    weight_decay=cfg.optim.weight_decay,
                                    betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.schedule))
    engine = eng.build_engine(model, optimizer, ds_config, lr_scheduler=scheduler)
    backend = eng.DeepSpeedStepBackend(engine, reduction=cfg.gradcache.reduction)
    device = backend.device

    # -- resume ---------------------------------------------------------------------------
    state = TrainState(sampler, world_size=world)
    if resume_from is not None:
        state.resume(engine, resume_from, rank, universal)
        if is_main:
            logger.info("resumed from %s at step %d%s", resume_from, state.step,
                        " (its universal form: another rank count)" if universal else "")

    def save() -> Path:
        path = eng.save_checkpoint(engine, run.checkpoints, ckpt.tag_for_step(state.step), state.state_dict(),
                                   checksums=cfg.checkpoint.checksums)
        if is_main:
            ckpt.prune_checkpoints(run.checkpoints, cfg.checkpoint.keep_last)
        return path

    # -- the loop ---------------------------------------------------------------------------
    metrics = MetricsWriter(run, is_main, cfg.logging.tensorboard,
                            resumed_at=state.step if resume_from is not None else None)
    progress = ProgressBar(total_steps, state.step, enabled=is_main and cfg.logging.progress)
    saved_path, last_saved = resume_from, (state.step if resume_from is not None else -1)
    final_loss: Optional[float] = None
    stopped_early, timed = False, []
    try:
        while state.step < total_steps and not stopped_early:
            sampler.set_epoch(state.epoch)
            batches = iter(loader)
            while state.step < total_steps and (item := next_batch_agreed(batches, device, state.step + 1)):
                batch, truncated = item
                t0 = time.perf_counter()
                torch.manual_seed(step_seed(cfg.seed, state.step, rank))
                batch = batch.to(device)
                result = gradcache_step(backend, batch.query_chunks, batch.target_chunks, cfg.objective,
                                        batch.negative_chunks, batch.num_negatives_per_pair if negatives else 0)
                elapsed = time.perf_counter() - t0
                if on_step_end is not None:  # before the agreement: a signal it raises counts at this step
                    on_step_end(state.step + 1, result)
                # Ranks must agree to stop together, and the counts are summed over ranks.
                stop_now, tokens, skipped_rows, truncated_sides = agree_after_step(preempt, batch, truncated, device)
                state.record(result, skipped_rows, truncated_sides)
                final_loss = float(result.output.loss.detach())
                if state.step > cfg.logging.warmup_steps and not result.skipped:
                    timed.append((elapsed, tokens))
                if is_main:
                    log_step(cfg, state, result, elapsed, tokens, skipped_rows, truncated_sides,
                             sum(dataset.skip_counts.values()), metrics, progress, final_loss)
                check_consecutive_skips(cfg, state, result, saved_path)
                if cfg.checkpoint.every_steps > 0 and state.step % cfg.checkpoint.every_steps == 0:
                    saved_path, last_saved = save(), state.step
                if stop_now:
                    logger.warning("preemption requested (%s): checkpointing at step %d and stopping",
                                   preempt.signal_name or "signal on another rank", state.step)
                    stopped_early = True
                    break
        if last_saved != state.step:
            saved_path, last_saved = save(), state.step
    except Exception as exc:
        # An agreed TrainingError is every rank's, never a lost peer, even when its text quotes
        # a refused connection (a shard server that went away).
        if isinstance(exc, TrainingError) or not is_peer_failure(exc):
            raise
        raise peer_stopped(exc, state.step, run.checkpoints) from None
    finally:
        progress.close()
        metrics.close()
    if final_loss is None and is_main:
        final_loss = run.last_logged_loss()  # nothing left to do in this launch: the run's last loss
    if is_main:
        log_run_summary(cfg, dataset, state, timed)

    export_dir = ""
    if cfg.export.at_end and not stopped_early:
        export_dir = str(run.export_dir)
        export_from_engine(engine, model, processor, formatter, export_dir, cfg, dtype=cfg.export.dtype)
    return TrainResult(run_dir=str(run.path), steps=state.step, final_loss=final_loss, stopped_early=stopped_early,
                       checkpoint=str(saved_path or ""), export_dir=export_dir)


# ------------------------------------------------------------------- the loop's parts

def agree_after_step(preempt: "PreemptionFlag", batch, truncated: int, device) -> tuple[bool, int, int, int]:
    """(stop now, tokens, replaced rows, truncated sides) over all ranks: two tiny all-reduces.
    Every rank must stop at the same step, or the others wait in the next collective."""
    flags = torch.tensor([float(preempt.poll()),
                          float(count_tokens(batch.query_chunks) + count_tokens(batch.target_chunks)
                                + count_tokens(batch.negative_chunks)),
                          float(sum(batch.skipped.values())), float(truncated)], device=device)
    stop_now = bool(all_reduce_max(flags[:1]).item())
    tokens, skipped_rows, truncated_sides = (int(v) for v in all_reduce_sum(flags[1:]).tolist())
    return stop_now, tokens, skipped_rows, truncated_sides


def log_step(cfg: TrainConfig, state: TrainState, result, elapsed: float, tokens: int, skipped_rows: int,
             truncated_sides: int, load_skipped: int, metrics: "MetricsWriter", progress: "ProgressBar",
             loss: float) -> None:
    """Rank 0: the skipped-step warning, the metrics row and the progress bar of one step."""
    if result.skipped:
        logger.warning("step %d skipped: %s (%d in a row, %d in total; the run stops at "
                       "optim.max_consecutive_skips=%d in a row)", state.step, result.skip_reason,
                       state.consecutive_skips, state.skipped_steps, cfg.optim.max_consecutive_skips)
    if state.step % max(1, cfg.logging.every_steps) == 0:
        record = {"step": state.step, "epoch": (state.step - 1) // state.steps_per_epoch, **result.metrics(),
                  "samples_per_s": cfg.global_batch_size / elapsed,
                  "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                  "peak_mem_gb": peak_memory_gb(result.output.loss.device), "skipped_rows": skipped_rows,
                  "skipped_rows_total": state.skipped_rows, "load_skipped_rows": load_skipped,
                  "truncated_sides": truncated_sides, "skipped_step": int(result.skipped),
                  "skipped_steps": state.skipped_steps}
        if result.skipped:
            record["skip_reason"] = result.skip_reason
        metrics.write(record)
    progress.update(loss=f"{loss:.4f}", gap=f"{float(result.output.gap):.3f}",
                    sps=f"{cfg.global_batch_size / elapsed:.1f}")


def check_consecutive_skips(cfg: TrainConfig, state: TrainState, result, saved_path: Optional[Path]) -> None:
    """Too many non-finite steps in a row stop the run (on every rank: the count is agreed)."""
    if state.consecutive_skips < cfg.optim.max_consecutive_skips:
        return
    last = f"; the last complete checkpoint is {saved_path}" if saved_path else ""
    raise NonFiniteLossError(
        f"step {state.step}: {state.consecutive_skips} optimizer steps in a row were skipped for non-finite "
        f"values (optim.max_consecutive_skips={cfg.optim.max_consecutive_skips}); last: "
        f"{result.skip_reason}. The parameters are those of the last good step{last}. Lower "
        "optim.lr, check the data of these steps, or raise the limit")


def peer_stopped(exc: BaseException, step: int, ckpt_root: Path) -> PeerStoppedError:
    """One line for the user instead of gloo's / NCCL's traceback: what happened, where,
    and how to go on (the checkpoints of this run are intact: saves are all-or-nothing)."""
    return PeerStoppedError(
        f"another rank stopped (killed, crashed or stuck) during step {step + 1}; the communication layer "
        f"said: {str(exc).splitlines()[0][:200]}. The last complete checkpoint is "
        f"{ckpt.find_resume_checkpoint(ckpt_root) or 'none (no checkpoint yet)'}: relaunch with --resume auto "
        "to continue from it")


def log_run_summary(cfg: TrainConfig, dataset, state: TrainState, timed: list) -> None:
    """Rank 0, at the end: what was skipped or cut, and the throughput of the timed steps."""
    load_skipped = sum(dataset.skip_counts.values())
    if load_skipped or state.skipped_rows or state.truncated_sides or state.skipped_steps:
        logger.warning("data and numerics: %d bad rows skipped at load %s, %d replaced during training, %d sides "
                       "truncated to processing.max_length, %d optimizer steps skipped (non-finite)",
                       load_skipped, dict(dataset.skip_counts) if load_skipped else "", state.skipped_rows,
                       state.truncated_sides, state.skipped_steps)
    if timed:
        sps = [cfg.global_batch_size / t for t, _ in timed]
        logger.info("throughput over %d timed steps: %.2f samples/s, %.0f tokens/s", len(timed),
                    sum(sps) / len(sps), sum(tok / t for t, tok in timed) / len(timed))


# -------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config, or the name of a shipped one (llave_2b, demo_cpu, ...: "
                                         "see configs/); omitted = built-in defaults")
    parser.add_argument("--resume", help="auto | none | CHECKPOINT_DIR (same as checkpoint.resume=...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --resume none in a run directory that holds checkpoints: start fresh, moving "
                             "them and the metrics to <run_dir>/previous-<time>/ (checkpoint.overwrite=true)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N unless given --no_local_rank; the rank
    # comes from the environment either way.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    return load_config(TrainConfig, resolve_train_config_path(args.config), overrides)


def report_error(text: str) -> None:
    """``llave-ds train: TEXT`` on stderr in one write (one line per rank: under a launcher
    the ranks share the terminal, and print()'s separate writes interleaved their lines)."""
    env = distributed.detect_env()
    prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
    line = f"{prefix}llave-ds train: {text}\n".encode("utf-8", "replace")
    sys.stderr.flush()
    if _has_fileno(sys.stderr):
        os.write(sys.stderr.fileno(), line)
    else:
        sys.stderr.write(line.decode())


def _has_fileno(stream) -> bool:
    with contextlib.suppress(AttributeError, OSError, ValueError):  # a captured stream (tests) has none
        return stream.fileno() >= 0
    return False


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (ConfigError, ValueError) as exc:
        report_error(f"config error: {exc}")
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    try:
        result = train(cfg)
        # Work is checkpointed: a late SIGTERM/SIGUSR1 from the scheduler must not turn the
        # exit code into 143 while Python shuts down (it resets handlers to the default).
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    except (ConfigError, EngineConfigError) as exc:
        report_error(f"config error: {exc}")
        return write_exit_status(cfg, 2, "failed", f"config error: {exc}")
    except ckpt.CheckpointError as exc:
        report_error(f"checkpoint error: {exc}")
        return write_exit_status(cfg, 2, "failed", f"checkpoint error: {exc}")
    except DataError as exc:
        report_error(f"data error: {exc}")
        return write_exit_status(cfg, 2, "failed", f"data error: {exc}")
    except TrainingError as exc:
        report_error(str(exc))
        return write_exit_status(cfg, 1, "failed", str(exc))
    finally:
        with contextlib.suppress(Exception):
            distributed.shutdown_distributed()
    if distributed.detect_env().rank == 0:
        loss = result.final_loss if result.final_loss is not None and math.isfinite(result.final_loss) else None
        print(json.dumps({"run_dir": result.run_dir, "steps": result.steps, "final_loss": loss,
                          "checkpoint": result.checkpoint, "export": result.export_dir,
                          "stopped_early": result.stopped_early}))
    # Preempted: a distinct exit code lets launch scripts requeue.
    if result.stopped_early:
        return write_exit_status(cfg, 3, "preempted", f"checkpointed at step {result.steps}; resume with "
                                 "--resume auto", step=result.steps)
    return write_exit_status(cfg, 0, "completed", "", step=result.steps)


def write_exit_status(cfg: "TrainConfig", code: int, status: str, message: str, step: Optional[int] = None) -> int:
    """Rank 0 records how the launch ended (``RunDir.write_exit_status``); returns ``code``."""
    if distributed.detect_env().rank == 0:
        RunDir.from_config(cfg).write_exit_status(code, status, message, step=step)
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
