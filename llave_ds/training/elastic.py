"""Resuming on another layout: another number of ranks.

A checkpoint's ZeRO shards belong to the rank count and stage that wrote them. When the
relaunch differs (a requeue on another allocation), the run continues through DeepSpeed's
*universal checkpoint*: ``ds_to_universal.py`` rewrites the shards as one folder per
parameter (fp32 weights, Adam moments), which an engine of any rank count loads
(``checkpoint.load_universal`` in the DeepSpeed config). The ZeRO stage must stay: DeepSpeed's
universal format differs between ZeRO-1/2 and ZeRO-3 (``resume_route`` says so, measured).

The continuation is the same run, not an approximation: the data plan is a function of
(seed, epoch) only and the position is the global step (``GlobalBatchSampler``), the
global batch is the same, the loss gathers every rank's rows exactly for any split, and
the LR schedule is a function of the step. What is per rank — the dropout masks drawn
from ``step_seed(seed, step, rank)`` — differs under another split; the supported
backbones train without dropout (docs/RELIABILITY.md, "Resume on another allocation").

The conversion runs once per checkpoint, on rank 0, in a child process (DeepSpeed's own
script: it forks worker pools, which a process holding a process group and a GPU context
should not do), into ``<checkpoint>/universal/`` with ``llave_universal.json`` written last.
The other ranks wait in short agreed polls, so no collective stays open for the length of
the conversion and a failure reaches every rank with the converter's own words.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from llave_ds.core.gather import all_reduce_max, rank_errors
from llave_ds.files import atomic_write_text
from llave_ds.training import checkpoint as ckpt
from llave_ds.training.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

UNIVERSAL = "universal"                 # <checkpoint>/universal/: DeepSpeed's universal checkpoint
UNIVERSAL_MARKER = "llave_universal.json"
_BUILD = ".universal-build"             # the converter writes here; renamed into place when done
CONVERTER = "deepspeed.checkpoint.ds_to_universal"


@dataclass(frozen=True)
class Layout:
    """What a checkpoint's files depend on: the number of ranks and the ZeRO stage; and what
    the run's meaning depends on: the global batch."""
    world_size: int
    zero_stage: int
    global_batch_size: int


def written_layout(path: Path, marker: dict) -> Layout:
    """The layout that wrote a checkpoint, from its completion marker. Markers written before
    2026-12-08 lack the stage and the global batch: the stage is read off the file names the
    marker lists (ZeRO-3 writes one model-states file per rank, ZeRO-0 no optimizer shard),
    the batch is left 0 (checked later by the sampler's own state)."""
    files = list((marker.get("files") or {}).keys()) or [p.name for p in Path(path).iterdir()]
    stage = marker.get("zero_stage")
    if stage is None:
        if any(name.startswith("zero_pp_rank_") and name.endswith("_model_states.pt") for name in files):
            stage = 3
        elif any(name.endswith("_optim_states.pt") for name in files):
            stage = 2  # 1 and 2 write the same files and convert the same way
        else:
            stage = 0
    return Layout(int(marker.get("world_size") or 0), int(stage), int(marker.get("global_batch_size") or 0))


def _stage_family(stage: int) -> str:
    """ZeRO-1 and ZeRO-2 are one DeepSpeed optimizer class writing the same files."""
    return {0: "0", 1: "1-2", 2: "1-2"}.get(stage, str(stage))


def resume_route(path: Path, run: Layout) -> str:
    """``"direct"`` when this run loads the checkpoint's own files; ``"universal"`` when it
    continues on another rank count through the universal checkpoint. Raises CheckpointError,
    before any process group, for what cannot continue as the same run: another global
    batch, another ZeRO stage, another rank count under ZeRO-0."""
    wrote = written_layout(path, ckpt.describe(path))
    if wrote.global_batch_size and wrote.global_batch_size != run.global_batch_size:
        raise CheckpointError(
            f"{path} was written with global_batch_size={wrote.global_batch_size}, this run has "
            f"{run.global_batch_size}: the continuation would draw other batches and take other optimizer "
            f"steps, so it would not be the same run. Keep global_batch_size={wrote.global_batch_size} (any rank "
            "count that divides it works), or start a new run (--resume none --overwrite, or another run_dir)")
    if _stage_family(wrote.zero_stage) != _stage_family(run.zero_stage):
        # Measured with DeepSpeed 0.19.8: a ZeRO-2 universal checkpoint loaded under ZeRO-3 fails
        # (KeyError 'optimizer_state_dict': the two stages write zero/optimizer_state.pt differently).
        raise CheckpointError(
            f"{path} was written under ZeRO stage {wrote.zero_stage}, this run uses stage {run.zero_stage}: "
            "DeepSpeed's universal checkpoints are specific to ZeRO-1/2 or ZeRO-3, so the optimizer state "
            f"cannot move between them. Resume with a stage-{wrote.zero_stage} DeepSpeed config (any rank count "
            "that divides the global batch works), or warm-start a new run from an export of this checkpoint")
    if wrote.world_size in (0, run.world_size):
        return "direct"
    if wrote.zero_stage == 0:
        raise CheckpointError(
            f"{path} was written by {wrote.world_size} ranks without ZeRO (stage 0), this run has "
            f"{run.world_size}: another rank count goes through DeepSpeed's universal checkpoint, which converts "
            f"ZeRO stage 1-3 optimizer shards only. Resume with {wrote.world_size} ranks, or train with ZeRO "
            "stage 1-3")
    return "universal"


def universal_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / UNIVERSAL


def read_universal_marker(ckpt_dir: Path) -> Optional[dict]:
    try:
        return json.loads((universal_dir(ckpt_dir) / UNIVERSAL_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class UniversalConversion:
    """DeepSpeed's ``ds_to_universal`` on one checkpoint, in a child process.

    ``start()`` launches it into ``<checkpoint>/.universal-build/``; ``poll()`` is None while it
    runs; ``finish()`` moves the result to ``<checkpoint>/universal/``, makes the model-states
    file readable under either ZeRO naming (a stage switch looks for the other one), and writes
    the marker last. A failure raises CheckpointError with the tail of the converter's log.
    """

    def __init__(self, ckpt_dir: Path, workers: Optional[int] = None):
        self.ckpt_dir = Path(ckpt_dir)
        self.build = self.ckpt_dir / _BUILD
        self.log_path = self.build / "ds_to_universal.log"
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0

    def start(self) -> None:
        shutil.rmtree(self.build, ignore_errors=True)
        shutil.rmtree(universal_dir(self.ckpt_dir), ignore_errors=True)   # an interrupted earlier move
        self.build.mkdir(parents=True)
        command = [sys.executable, "-m", CONVERTER, "--input_folder", str(self.ckpt_dir),
                   "--output_folder", str(self.build / UNIVERSAL),
                   "--num_extract_workers", str(self.workers), "--num_merge_workers", str(max(1, self.workers // 2)),
                   "--inject_missing_state"]   # checkpoints written before the client state carried the marker
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def poll(self) -> Optional[int]:
        return self.proc.poll() if self.proc is not None else None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self) -> dict:
        seconds = time.monotonic() - self.started
        code = self.proc.wait() if self.proc is not None else -1
        if code != 0:
            raise CheckpointError(f"converting {self.ckpt_dir} to a universal checkpoint failed (DeepSpeed's "
                                  f"{CONVERTER} exited with {code}); its log ends: {self._log_tail()}")
        out = universal_dir(self.ckpt_dir)
        (self.build / UNIVERSAL).rename(out)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            # Under a universal load DeepSpeed reads only the scheduler, the step counters and our
            # client state from this file (the weights come from zero/): the same under either name.
            if not (out / name).exists():
                source = next(iter(sorted(out.glob("*model_states.pt"))), None)
                if source is not None:
                    shutil.copy2(source, out / name)
        shutil.rmtree(self.build, ignore_errors=True)
        info = {"source": self.ckpt_dir.name, "seconds": round(seconds, 2),
                "bytes": ckpt.dir_size(out), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "converter": CONVERTER}
        atomic_write_text(out / UNIVERSAL_MARKER, json.dumps(info, indent=2))
        return info

    def _log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


def prepare_universal(ckpt_dir: Path, *, rank: int, device: torch.device, timeout_s: float,
                      poll_s: float = 0.5) -> Path:
    """The universal checkpoint of ``ckpt_dir`` on every rank, converting it first if needed.

    Rank 0 converts (once: a finished conversion is reused by later relaunches); every rank
    polls in step with the others through one tiny all-reduce per ``poll_s``, so no collective
    waits for the whole conversion. Every rank raises the same CheckpointError on a failure or
    after ``timeout_s`` (the child is killed)."""
    error, conversion = None, None
    if rank == 0 and read_universal_marker(ckpt_dir) is None:
        logger.info("resuming on another layout: converting %s to a universal checkpoint (DeepSpeed's %s)",
                    ckpt_dir, CONVERTER)
        try:
            conversion = UniversalConversion(ckpt_dir)
            conversion.start()
        except OSError as exc:
            error = f"cannot start the universal conversion of {ckpt_dir}: {exc}"
    while True:
        pending = conversion is not None and error is None and conversion.poll() is None
        if pending and time.monotonic() - conversion.started > timeout_s:
            conversion.kill()
            error = (f"converting {ckpt_dir} to a universal checkpoint took more than {timeout_s:.0f} s "
                     f"(checkpoint.universal_timeout_s); its log is in {conversion.log_path}")
            pending = False
        # Why agreed: the ranks must leave the loop together, or the others would wait in a
        # collective for a rank already loading the checkpoint.
        if not bool(all_reduce_max(torch.tensor([float(pending)], device=device)).item()):
            break
        time.sleep(poll_s)
    if conversion is not None and error is None:
        try:
            info = conversion.finish()
            logger.info("universal checkpoint written in %.1f s (%.1f MiB): %s", info["seconds"],
                        info["bytes"] / 2 ** 20, universal_dir(ckpt_dir))
        except (CheckpointError, OSError) as exc:
            error = str(exc)
    errors = rank_errors(error, device)   # also the point after which rank 0's folder is in place
    if not errors:
        missing = None if read_universal_marker(ckpt_dir) is not None else (
            f"{universal_dir(ckpt_dir)} is not complete on this rank's filesystem: the checkpoint directory "
            "must be shared by every node")
        errors = rank_errors(missing, device)
    if errors:
        raise CheckpointError("; ".join(errors))
    return universal_dir(ckpt_dir)
