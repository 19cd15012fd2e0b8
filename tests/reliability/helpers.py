"""Shared machinery of the reliability suite: a rank launcher that tolerates killed ranks,
the suite's training config, and the per-rank functions the tests run (module level, so
the launcher can send them to the ranks by reference).

Why not ``tests.distributed_harness.run_distributed``: a rank killed with SIGKILL never
reports, which that harness turns into an AssertionError, and it spawns fresh
interpreters (about 14 s of imports per run on the 2 shared CI cores). ``run_ranks``
reuses the harness's ``_worker`` (same torchrun variables, same gloo process group) but
forks the ranks from a multiprocessing *forkserver* that imported torch, DeepSpeed,
transformers and llave_ds once, and reports every rank's outcome, exit code and the
time its outcome arrived.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from llave_ds.core.distributed import free_port
from tests.distributed_harness import _worker

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"
COLLECTIVE_TIMEOUT_S = 30
STEPS = 4             # the reference run: 4 steps of 8 pairs, checkpoints at 2 and 4
RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
_PRELOAD = ["torch", "datasets", "transformers", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer",
            "llave_ds.train", "llave_ds.training.engine", "llave_ds.model.embedding", "llave_ds.model.formatter", "llave_ds.export.model_dir",
            "tests.distributed_harness", "tests.test_gradcache", "tests.reliability.helpers"]
_started = False


# ------------------------------------------------------------------------------ launcher

@dataclass
class RankRun:
    """What came back from each rank: outcome (RankOutcome-like dicts), exit codes, when
    each outcome arrived (seconds since start), and whether the deadline was hit."""
    outcomes: dict = field(default_factory=dict)   # rank -> {"ok", "value", "error", "at", "wall"}
    exitcodes: list = field(default_factory=list)
    hung: list = field(default_factory=list)
    started: float = 0.0
    wall_s: float = 0.0

    def value(self, rank: int) -> Any:
        out = self.outcomes[rank]
        assert out["ok"], f"rank {rank} failed:\n{out['error']}"
        return out["value"]

    def all_ok(self) -> bool:
        return len(self.outcomes) == len(self.exitcodes) and all(o["ok"] for o in self.outcomes.values())

    def describe(self) -> str:
        lines = [f"exit codes {self.exitcodes}, hung {self.hung}, wall {self.wall_s:.1f}s"]
        for r, o in sorted(self.outcomes.items()):
            lines.append(f"--- rank {r} ok={o['ok']} at {o['at']:.1f}s\n{o['error'][-3000:]}")
        return "\n".join(lines)


def _context():
    global _started
    ctx = mp.get_context("forkserver")
    if not _started:
        from multiprocessing import forkserver
        ctx.set_forkserver_preload(_PRELOAD)
        saved = {k: os.environ.get(k) for k in RANK_ENV}
        os.environ.update(RANK_ENV)  # DeepSpeed picks its accelerator at import time
        try:
            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _started = True
    return ctx


def run_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 240.0,
              collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, env: Optional[dict] = None) -> RankRun:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; never raises for a
    failing, killed or hung rank (hung ranks are killed at the deadline and listed)."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    # Not daemonic: a rank's DataLoader may start worker processes.
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, collective_timeout_s,
                                               {**RANK_ENV, **(env or {})}, queue, args), daemon=False)
             for r in range(world_size)]
    run = RankRun(started=time.monotonic())
    for p in procs:
        p.start()
    deadline = run.started + timeout_s
    while len(run.outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, payload, err = queue.get(timeout=0.2)
        except Exception:  # queue.Empty
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        run.outcomes[rank] = {"ok": ok, "value": pickle.loads(payload) if ok else None, "error": err,
                              "at": time.monotonic() - run.started, "wall": time.time()}
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    run.hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    run.exitcodes = [p.exitcode for p in procs]
    run.wall_s = time.monotonic() - run.started
    return run


# ------------------------------------------------------------------------- configuration

def overrides(assets: dict, run_dir, **extra) -> list[str]:
    """The suite's training run: 2 ranks x 4 pairs, ZeRO-3 (configs/demo_cpu.yaml), hard
    negatives, 6 steps per epoch, checkpoints every 2 steps, fp32 export."""
    base = {"model.path": assets["model"], "data.source": assets["train"], "data.image_root": assets["images"],
            "run_dir": str(run_dir), "global_batch_size": 8, "num_workers": 0,
            "gradcache.query_chunk_size": 2, "gradcache.target_chunk_size": 4,
            "schedule.max_steps": STEPS, "checkpoint.every_steps": 2, "checkpoint.keep_last": 3,
            "logging.progress": False, "export.dtype": "float32", "collective_timeout_s": COLLECTIVE_TIMEOUT_S}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def records(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def last_records(run_dir) -> dict[int, dict]:
    """step -> its last record (a resumed run appends)."""
    return {r["step"]: r for r in records(run_dir)}


def exported(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted((Path(run_dir) / "export").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_export_diff(a: dict, b: dict) -> float:
    assert a and a.keys() == b.keys(), (sorted(a)[:5], sorted(b)[:5])
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def clone_at_step(reference_dir: Path, dest: Path, step: int = 2, ckpt_dir: Optional[Path] = None) -> Path:
    """A run directory as the reference run left it after ``step``: that checkpoint (named by
    ``latest``) and the metrics up to it. Resuming from it must reproduce the reference."""
    from llave_ds.training import checkpoint as ckpt
    tag = ckpt.tag_for_step(step)
    dest.mkdir(parents=True)
    root = ckpt_dir or dest / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(reference_dir / "checkpoints" / tag, root / tag)
    ckpt.set_latest(root, tag)
    kept = [json.dumps(r) for r in records(reference_dir) if r["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return root / tag


# ------------------------------------------------------------------------ rank functions

def _load(overrides_list):
    from llave_ds.config import load_config
    from llave_ds.train import TrainConfig
    return load_config(TrainConfig, DEMO_CONFIG, overrides_list)


def _log_to_run_dir(overrides_list, rank: int) -> None:
    """Warnings of the llave_ds loggers (and of DataLoader workers forked from this rank)
    also go to <run_dir>/rank<r>.log, for the tests to read."""
    import logging
    run_dir = Path(_load(overrides_list).run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / f"rank{rank}.log")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    logging.getLogger("llave_ds").addHandler(handler)


def _track_step(tr, state: dict) -> None:
    """Keep ``state["step"]`` = the step being run (1-based, also after a resume): train()
    seeds every step with ``step_seed(seed, steps_done, rank)`` before anything else."""
    real = tr.step_seed

    def step_seed(seed, step, rank):
        state["step"], state["backwards"] = step + 1, 0
        return real(seed, step, rank)
    tr.step_seed = step_seed


def train_rank(rank, world, overrides_list, faults: Optional[dict] = None):
    """``llave_ds.train.train`` on this rank, with optional injected faults:

    * ``kill_in_step``: (step, rank) -> SIGKILL itself in the 2nd backward of that step;
    * ``kill_in_save``: (step, rank) -> SIGKILL itself after DeepSpeed wrote its files of
      that step's checkpoint (before its RNG state, the barrier and the marker);
    * ``loader_error``: rank -> its dataset raises DataError on the first item it loads;
    * ``enospc``: (step, rank) -> writing that checkpoint's optimizer shard on that rank
      writes half the bytes and fails with ENOSPC, as a full disk does;
    * ``different_data``: rank -> that rank reads fewer rows (data.max_per_subset=10).

    Returns the TrainResult fields, or {"error": text} when train() raised; and whether the
    model was built ("model_built").
    """
    import errno

    from llave_ds import train as tr
    from llave_ds.data.errors import DataError
    from llave_ds.data.mmeb_train import MMEBTrainDataset
    from llave_ds.training import checkpoint as ckpt
    from llave_ds.training import engine as eng

    faults = faults or {}
    state = {"step": 1, "backwards": 0}
    marks = Path(faults.get("marks_dir", "/tmp"))

    def die(what):
        (marks / f"killed_rank{rank}.json").write_text(json.dumps({"what": what, "t": time.time()}))
        os.kill(os.getpid(), signal.SIGKILL)

    if "kill_in_step" in faults:
        at_step, who = faults["kill_in_step"]
        real_backward = eng.DeepSpeedStepBackend.backward

        def backward(self, surrogate, last):
            if state["step"] == at_step and rank == who:
                state["backwards"] += 1
                if state["backwards"] == 2:
                    die(f"backward of step {at_step}")
            return real_backward(self, surrogate, last)
        eng.DeepSpeedStepBackend.backward = backward
    if "kill_in_save" in faults:
        at_step, who = faults["kill_in_save"]
        real_rng = ckpt.save_rng_state

        def save_rng_state(ckpt_dir, r):
            if Path(ckpt_dir).name == ckpt.tag_for_step(at_step) and rank == who:
                die(f"checkpoint save of step {at_step}")
            return real_rng(ckpt_dir, r)
        ckpt.save_rng_state = save_rng_state
    if faults.get("loader_error") == rank:
        def getitem(self, index):
            raise DataError(f"injected: image for index {index} is unreadable on rank {rank}",
                            reason="unreadable_image")
        MMEBTrainDataset.__getitem__ = getitem
    if "enospc" in faults:
        at_step, who = faults["enospc"]
        real_save = torch.save

        def full_disk_save(obj, f, *args, **kwargs):
            name = str(f)
            if rank == who and ckpt.tag_for_step(at_step) in name and "optim_states" in name:
                real_save(obj, f, *args, **kwargs)
                with open(name, "r+b") as fh:  # what a full disk leaves: a partial file
                    fh.truncate(os.path.getsize(name) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
            return real_save(obj, f, *args, **kwargs)
        torch.save = full_disk_save
    if faults.get("different_data") == rank:
        overrides_list = list(overrides_list) + ["data.max_per_subset=10"]

    import llave_ds.model.embedding as model_module
    real_load_model = model_module.load_embedding_model

    def load_embedding_model(*args, **kwargs):
        state["model_built"] = True
        return real_load_model(*args, **kwargs)
    model_module.load_embedding_model = load_embedding_model
    state["model_built"] = False

    _track_step(tr, state)
    _log_to_run_dir(overrides_list, rank)
    # A rank started by the forkserver inherits its start method; under torchrun DataLoader
    # workers are forked from the rank (and then inherit its log handlers), as here.
    mp.set_start_method("fork", force=True)
    try:
        res = tr.train(_load(overrides_list))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return {"error": f"{type(exc).__name__}: {exc}", "model_built": state["model_built"]}
    finally:
        model_module.load_embedding_model = real_load_model
    return {"steps": res.steps, "stopped_early": res.stopped_early, "checkpoint": res.checkpoint,
            "final_loss": res.final_loss, "model_built": state["model_built"]}


def _tensors(obj, prefix=""):
    """Every tensor in a nested optimizer state (dicts / lists), by path."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone().float()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def engine_snapshot(engine) -> dict:
    """Full parameters (gathered: call on every rank), this rank's optimizer state tensors
    (fp32 master partitions, Adam moments, step counts) and the learning rate."""
    from llave_ds.training.engine import gathered_state_dict
    opt = engine.optimizer
    state = _tensors(opt.state_dict(), "optimizer")
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        if hasattr(opt, name):
            state.update(_tensors(list(getattr(opt, name)), name))
    inner = getattr(opt, "optimizer", opt)
    steps = [float(s["step"]) for s in inner.state.values() if "step" in s]
    lr = engine.get_lr()[0] if engine.get_lr() else float("nan")
    return {"params": gathered_state_dict(engine), "optimizer": state, "adam_steps": steps, "lr": lr}


def snapshot_diff(a: dict, b: dict) -> dict:
    """Largest differences between two snapshots (0.0 = bitwise equal)."""
    def worst(x, y):
        if x.keys() != y.keys():  # e.g. the first step creates the Adam moments
            return float("inf")
        return max((float((x[k] - y[k]).abs().max()) for k in x if x[k].numel()), default=0.0)
    return {"params": worst(a["params"], b["params"]), "optimizer": worst(a["optimizer"], b["optimizer"]),
            "adam_steps_equal": a["adam_steps"] == b["adam_steps"], "lr_equal": a["lr"] == b["lr"]}


def numerics_rank(rank, world, overrides_list, plan: dict):
    """Training with injected non-finite values. ``plan``: step -> (kind, rank), kind
    ``"embedding"`` (this rank's pass-1 embeddings become NaN, so the loss is NaN) or
    ``"param_grad"`` (this rank's backward surrogate is multiplied by NaN: finite loss,
    non-finite parameter gradients, caught by DeepSpeed's overflow check). Returns the
    error train() raised, and the differences between the snapshots after each step."""
    from llave_ds import train as tr
    from llave_ds.training import engine as eng

    state = {"step": 1, "engine": None}
    snaps = {}
    real_build, real_encode, real_backward = eng.build_engine, eng.DeepSpeedStepBackend.encode, \
        eng.DeepSpeedStepBackend.backward

    def build_engine(*args, **kwargs):
        state["engine"] = real_build(*args, **kwargs)
        snaps[0] = engine_snapshot(state["engine"])
        return state["engine"]

    def encode(self, chunk):
        emb = real_encode(self, chunk)
        if plan.get(state["step"]) == ("embedding", rank) and not torch.is_grad_enabled():
            emb = emb * float("nan")
        return emb

    def backward(self, surrogate, last):
        if plan.get(state["step"]) == ("param_grad", rank):
            surrogate = surrogate * float("nan")
        return real_backward(self, surrogate, last)

    skipped = {}

    def hook(step, result):
        snaps[step] = engine_snapshot(state["engine"])
        skipped[step] = (result.skipped, result.skip_reason, sorted(result.timings))

    _track_step(tr, state)
    _log_to_run_dir(overrides_list, rank)
    eng.build_engine, eng.DeepSpeedStepBackend.encode, eng.DeepSpeedStepBackend.backward = \
        build_engine, encode, backward
    error = ""
    try:
        tr.train(_load(overrides_list), on_step_end=hook)
    except tr.TrainingError as exc:
        error = f"{type(exc).__name__}: {exc}"
    diffs = {s: snapshot_diff(snaps[s - 1], snaps[s]) for s in sorted(snaps) if s > 0}
    return {"error": error, "diffs": diffs, "skipped": skipped}


# ------------------------------------------------------------------ in-process entry point

def train_cli_in_process(argv: list[str], monkeypatch, capsys, world_size: Optional[int] = None):
    """``llave-ds train ARGS`` in this process with the process-group constructor replaced
    by a trap: returns (exit code, stderr). Proves that an error is reported before any
    process group could exist. ``world_size`` fakes a torchrun launch of rank 0."""
    import torch.distributed as dist

    from llave_ds.core import distributed
    from llave_ds.train import main

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started before the error was found")
    monkeypatch.setattr(distributed, "init_distributed", no_process_group)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    if world_size is not None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert not dist.is_initialized()
    assert "Traceback" not in err, err
    return code, err


def data_rank(rank, world, runs: dict):
    """Several train() calls in one rank process (only the last may build a model): name ->
    overrides. Returns name -> train_rank's result."""
    return {name: train_rank(rank, world, ov) for name, ov in runs.items()}
