"""The run directory: its layout, written once, and what train, export and eval ask of it.

::

    RUN_DIR/
      config.yaml               the resolved config; relaunching with it resumes the run
      metrics.jsonl             one row per optimizer step, across resumes (rank 0)
      metrics.superseded.jsonl  rows of an interrupted attempt that a resume repeated
      tensorboard/              with logging.tensorboard
      checkpoints/              step_<N>/ and `latest` (llave_ds.training.checkpoint); or checkpoint.dir
      export/                   the end-of-training export; or export.dir
      exit_status.json          how the last launch ended (completed / preempted / failed)
      memory_plan.json          what model.gradient_checkpointing / deepspeed.param_persistence: auto chose
      previous-<time>/          what `--resume none --overwrite` moved aside (nothing is deleted)

`RunDir` is the one owner of these names. Training writes through it (`prepare`, the
metrics writer, `write_exit_status`) and decides where to resume (`resume_candidates`,
`choose_verified`); ``llave-ds export RUN_DIR`` finds the checkpoint and the run's settings
through it (`open`, `of_checkpoint`, `read_config`, `last_metrics`); ``llave-ds eval --model
RUN_DIR`` evaluates the run's export (`export_dir`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import yaml

from llave_ds.config import dump_config
from llave_ds.core.gather import rank_errors
from llave_ds.files import atomic_write_text
from llave_ds.training import checkpoint as ckpt
from llave_ds.training.elastic import Layout, resume_route

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


class RunDir:
    """One run's directory (see the module docstring for the layout).

    ``checkpoint_dir`` / ``export_dir``: where the run keeps its checkpoints and export when
    its config moved them (``checkpoint.dir``, ``export.dir``); empty means inside the run
    directory.
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    SUPERSEDED_METRICS = "metrics.superseded.jsonl"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    EXPORT = "export"
    EXIT_STATUS = "exit_status.json"
    MEMORY_PLAN = "memory_plan.json"
    PREVIOUS = "previous-%Y%m%dT%H%M%SZ"  # time.strftime pattern, UTC

    def __init__(self, path: PathLike, *, checkpoint_dir: PathLike = "", export_dir: PathLike = ""):
        self.path = Path(path)
        self.checkpoints = Path(checkpoint_dir) if checkpoint_dir else self.path / self.CHECKPOINTS
        self.export_dir = Path(export_dir) if export_dir else self.path / self.EXPORT

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- finding one ----------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any) -> "RunDir":
        """The run directory of a training config (``run_dir``, ``checkpoint.dir``, ``export.dir``)."""
        return cls(cfg.run_dir, checkpoint_dir=cfg.checkpoint.dir, export_dir=cfg.export.dir)

    @classmethod
    def open(cls, path: PathLike) -> "RunDir":
        """An existing run directory; where its config.yaml moved the checkpoints or the export,
        that is where they are looked for. A missing or unreadable config.yaml leaves the
        defaults (the config is read, and its problems reported, by whoever needs it)."""
        raw = cls(path)._read_config_quietly()
        section = lambda name: raw.get(name) if isinstance(raw.get(name), dict) else {}  # noqa: E731
        return cls(path, checkpoint_dir=section("checkpoint").get("dir") or "",
                   export_dir=section("export").get("dir") or "")

    @classmethod
    def of_checkpoint(cls, ckpt_dir: PathLike) -> Optional["RunDir"]:
        """The run directory a checkpoint belongs to (``RUN_DIR/checkpoints/step_N``, or a
        checkpoints directory holding the config), or None when no config.yaml is beside it."""
        ckpt_dir = Path(ckpt_dir)
        for candidate in (ckpt_dir.parent.parent, ckpt_dir.parent):
            if (candidate / cls.CONFIG).is_file():
                return cls.open(candidate)
        return None

    # -- its files ------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def superseded_metrics_file(self) -> Path:
        return self.path / self.SUPERSEDED_METRICS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def exit_status_file(self) -> Path:
        return self.path / self.EXIT_STATUS

    @property
    def memory_plan_file(self) -> Path:
        return self.path / self.MEMORY_PLAN

    def write_memory_plan(self, plan: dict) -> None:
        """Record the memory plan of this launch (rank 0; each launch plans again)."""
        atomic_write_text(self.memory_plan_file, json.dumps(plan, indent=1) + "\n")

    def is_run(self) -> bool:
        """Whether a training run wrote here (its config.yaml exists)."""
        return self.config_file.is_file()

    def read_config(self) -> dict:
        """The run's resolved config as a plain mapping; ValueError naming the file when it is
        missing or not a YAML mapping."""
        try:
            raw = yaml.safe_load(self.config_file.read_text())
        except FileNotFoundError:
            raise ValueError(f"{self.config_file} does not exist: not a llave-ds run directory") from None
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read the run config {self.config_file}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"run config {self.config_file} is not a mapping")
        return raw

    def _read_config_quietly(self) -> dict:
        try:
            return self.read_config()
        except ValueError:
            return {}

    def latest_checkpoint(self) -> Optional[Path]:
        """The checkpoint a resume would take first (`checkpoint.find_resume_checkpoint`)."""
        return ckpt.find_resume_checkpoint(self.checkpoints)

    def metrics_rows(self) -> Iterator[dict]:
        """The rows of metrics.jsonl in order (none when absent); a line torn by a crash is skipped."""
        if not self.metrics_file.is_file():
            return
        with open(self.metrics_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    yield row

    def last_metrics(self) -> Optional[dict]:
        """The last row of metrics.jsonl (None when absent or empty)."""
        last = None
        for last in self.metrics_rows():
            pass
        return last

    def last_logged_loss(self) -> Optional[float]:
        """The loss of the last metrics row that has a finite one (None without one)."""
        losses = [row.get("loss") for row in self.metrics_rows()]
        finite = [float(v) for v in losses if isinstance(v, (int, float)) and math.isfinite(v)]
        return finite[-1] if finite else None

    # -- writing it (rank 0) --------------------------------------------------------

    def prepare(self, cfg: Any, *, fresh: bool) -> None:
        """Create the directory, move earlier checkpoints and metrics aside under
        ``checkpoint.overwrite`` on a fresh start, and save the resolved config."""
        self.path.mkdir(parents=True, exist_ok=True)
        if cfg.checkpoint.overwrite and fresh:
            moved = self.move_aside()
            if moved is not None:
                logger.warning("checkpoint.overwrite: moved the earlier checkpoints and metrics of %s to %s",
                               self.path, moved)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        # Resuming is a decision of each launch, not a property of the run: the saved config
        # resumes (a run started with --resume none must stay resumable from its config.yaml).
        resumable = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto",
                                                                             overwrite=False))
        dump_config(resumable, self.config_file)

    def move_aside(self) -> Optional[Path]:
        """Move the run's checkpoints and metrics into ``previous-<UTC time>/`` (a deliberate
        fresh start in a used run directory); returns that folder, or None when there was
        nothing to move. Nothing is deleted."""
        movable = [p for p in (self.checkpoints, self.metrics_file, self.superseded_metrics_file) if p.exists()]
        if not movable:
            return None
        dest = self.path / time.strftime(self.PREVIOUS, time.gmtime())
        n = 0
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        dest.mkdir(parents=True)
        for p in movable:
            shutil.move(str(p), str(dest / p.name))
        return dest

    def write_exit_status(self, code: int, status: str, message: str, step: Optional[int] = None) -> int:
        """Record how the launch ended in ``exit_status.json`` and return ``code`` (call on rank 0).

        Why: a launcher does not pass the ranks' exit code on (torchrun exits 1 when its ranks
        exit 3; a launcher killed by a signal reports nothing), so a wrapper that requeues on
        "preempted" reads this file instead (``launch/run_with_status.sh``)."""
        if self.path.is_dir():
            record = {"status": status, "exit_code": code, "step": step, "message": message[:2000],
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:  # reporting must never be what fails
                atomic_write_text(self.exit_status_file, json.dumps(record, indent=2) + "\n")
            except OSError:
                pass
        return code

    # -- where to resume ------------------------------------------------------------

    def resume_candidates(self, resume: str, layout: Layout, overwrite: bool = False) -> list[Path]:
        """The checkpoints to try resuming from, best first, checked without loading anything:
        complete, resumable on this run's ``layout`` (directly or through the universal form:
        ``elastic.resume_route``), every listed file present with its recorded size.

        ``resume="auto"``: every complete checkpoint of the run that passes, newest first; one
        that does not is skipped with a warning naming it and why (an unattended requeue must
        recover, not fail again). A path: that one, or an error. ``"none"``: nothing, and
        refused when the run holds checkpoints, unless ``overwrite``.
        """
        root = self.checkpoints
        if resume in ("none", ""):
            existing = ckpt.complete_checkpoints(root)
            if existing and not overwrite:
                raise ckpt.CheckpointError(
                    f"{root} holds checkpoints up to step {existing[-1][0]}: starting fresh (checkpoint.resume=none) "
                    f"would append a new run to {self.metrics_file} and move 'latest' away from them. Resume "
                    "with --resume auto, or start over with --resume none --overwrite (the old checkpoints and "
                    "metrics are moved to <run_dir>/previous-<time>/), or choose another run_dir")
            return []
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise ckpt.CheckpointError(f"checkpoint.resume={resume}: no such checkpoint directory")
            resume_route(path, layout)
            ckpt.verify_checkpoint(path, checksums=False)
            return [path]
        found = ckpt.resume_candidates(root)
        usable, problems = [], []
        for path in found:
            # A setup mistake, not damage: never skipped.
            resume_route(path, layout)
            try:
                ckpt.verify_checkpoint(path, checksums=False)
            except ckpt.CheckpointError as exc:
                problems.append(str(exc))
                logger.warning("--resume auto: skipping %s: %s", path, exc)
                continue
            usable.append(path)
        if found and not usable:
            raise ckpt.CheckpointError(f"--resume auto: no checkpoint in {root} is usable: " + "; ".join(problems))
        return usable


def choose_verified(candidates: list[Path], *, resume: str, checksums: bool, rank: int, world: int, device,
                    is_main: bool) -> Optional[Path]:
    """The first candidate whose files match their checksums. Every rank reads a share of the
    files and the ranks agree through one gather per candidate (so all pick the same one).
    Under ``resume="auto"`` a damaged one is skipped with a warning naming the file; an
    explicit checkpoint that fails is an error."""
    if not checksums:
        return candidates[0] if candidates else None
    failures = []
    for path in candidates:
        files = sorted((ckpt.read_marker(path) or {}).get("files") or {})
        local_error = None
        try:
            ckpt.verify_checkpoint(path, checksums=True, files=files[rank::world])
        except ckpt.CheckpointError as exc:
            local_error = str(exc)
        errors = rank_errors(local_error, device)  # every rank gets every rank's verdict
        if not errors:
            return path
        if resume != "auto":
            raise ckpt.CheckpointError("; ".join(errors))
        failures.append("; ".join(errors))
        if is_main:
            logger.warning("--resume auto: skipping %s, it does not verify: %s", path, "; ".join(errors))
    if failures:
        raise ckpt.CheckpointError("--resume auto: no checkpoint verifies: " + " | ".join(failures))
    return None
