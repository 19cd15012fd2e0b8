"""The optimizer and learning-rate schedule settings of a training run (``optim`` and
``schedule`` sections) and the schedule itself. The optimizer is built by
``engine.build_optimizer`` (DeepSpeed decides between torch's AdamW and its CPU Adam)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from llave_ds.config import check_choices


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # A step with a non-finite loss or gradient is skipped on every rank (parameters and
    # optimizer state untouched, counted in metrics.jsonl); this many in a row stop the run.
    max_consecutive_skips: int = 5

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"optim.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")


@dataclass
class ScheduleConfig:
    epochs: int = 1
    max_steps: int = 0  # > 0 stops after this many optimizer steps
    warmup_ratio: float = 0.03
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        check_choices(self, "schedule.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set schedule.epochs >= 1 or schedule.max_steps >= 1")


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
