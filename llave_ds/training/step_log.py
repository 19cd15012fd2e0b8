"""What rank 0 shows and keeps of each step: ``metrics.jsonl`` rows (optionally TensorBoard
scalars) and the progress bar.

One row per optimizer step across resumes: resuming at step S keeps the rows of steps <= S
and moves the rest (the interrupted attempt's steps after its last checkpoint, which the
resumed run repeats) to ``metrics.superseded.jsonl``. The file names are the run
directory's (`llave_ds.training.run_dir.RunDir`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
from typing import Optional

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from llave_ds.config import ConfigError
from llave_ds.files import atomic_write_text
from llave_ds.training.run_dir import RunDir

logger = logging.getLogger(__name__)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (GiB), or the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class MetricsWriter:
    """Per-step JSONL on rank 0 (a no-op elsewhere), one row per step across resumes;
    optional TensorBoard. Non-finite values become null (JSON has no NaN)."""

    def __init__(self, run: RunDir, enabled: bool, tensorboard: bool, resumed_at: Optional[int] = None):
        self.run = run
        self.enabled = enabled
        if enabled and resumed_at is not None:
            self._truncate(resumed_at)
        self.file = open(run.metrics_file, "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError("logging.tensorboard=true needs the tensorboard package "
                                  "(pip install tensorboard)") from exc
            self.tb = SummaryWriter(str(run.tensorboard_dir))

    def _truncate(self, resumed_at: int) -> None:
        path, superseded_path = self.run.metrics_file, self.run.superseded_metrics_file
        if not path.is_file():
            return
        keep, superseded = [], []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):  # a line torn by the crash
                superseded.append(json.dumps({"superseded_by_resume_from": resumed_at, "unreadable_line": line}))
                continue
            if step <= resumed_at:
                keep.append(line)
            else:
                superseded.append(json.dumps({**row, "superseded_by_resume_from": resumed_at}))
        if not superseded:
            return
        with open(superseded_path, "a", encoding="utf-8") as fh:
            fh.write("".join(r + "\n" for r in superseded))
        atomic_write_text(path, "".join(r + "\n" for r in keep))
        logger.info("resumed at step %d: %d later row(s) of the interrupted attempt moved from %s to %s",
                    resumed_at, len(superseded), path, superseded_path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        # JSON has no NaN / Infinity: a non-finite value (a skipped step's loss) becomes null.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class ProgressBar:
    """Rank 0's tqdm bar (a no-op elsewhere). While it is open, log records and Python
    warnings print on their own line above the bar, not glued to the end of its line."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self._stack = contextlib.ExitStack()
        if not enabled:
            return
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        logging.captureWarnings(True)
        self._stack.callback(logging.captureWarnings, False)
        self._stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger(),
                                                                 logging.getLogger("py.warnings")]))

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self._stack.close()
        if self.bar is not None:
            self.bar.close()
