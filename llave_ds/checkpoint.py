"""Training checkpoints: layout, the ``latest`` pointer, RNG states, pruning.

A checkpoint is ``<dir>/step_<N>/`` holding DeepSpeed's files (model, optimizer and
scheduler states of every rank), one ``rng_rank<r>.pt`` per rank, and a
``llave_complete.json`` marker written last. ``<dir>/latest`` names the newest complete
checkpoint; it is replaced atomically (write, fsync, rename) only after every rank has
finished writing, so a crash during a save leaves it pointing at the previous one.
DeepSpeed's own tools (``zero_to_fp32.py``) read the same ``latest`` file.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

logger = logging.getLogger("llave_ds.checkpoint")

COMPLETE_MARKER = "llave_complete.json"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def save_rng_state(ckpt_dir: Path, rank: int) -> None:
    torch.save(capture_rng_state(), ckpt_dir / f"rng_rank{rank}.pt")


def load_rng_state(ckpt_dir: Path, rank: int) -> None:
    path = ckpt_dir / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"missing RNG state {path}: the checkpoint is incomplete or was "
                              "written by a different number of ranks")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - name the file whatever torch raises
        raise CheckpointError(f"cannot read RNG state {path}: {exc}") from exc
    restore_rng_state(state)


def mark_complete(ckpt_dir: Path, info: dict) -> None:
    atomic_write_text(ckpt_dir / COMPLETE_MARKER, json.dumps(info, indent=2))


def read_marker(ckpt_dir: Path) -> Optional[dict]:
    path = ckpt_dir / COMPLETE_MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def set_latest(root: Path, tag: str) -> None:
    atomic_write_text(root / LATEST, tag)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _TAG.match(child.name)
        if m and child.is_dir() and read_marker(child) is not None:
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_resume_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        candidate = root / tag
        if read_marker(candidate) is not None:
            return candidate
        logger.warning("%s names %s, which is not a complete checkpoint; falling back to the "
                       "newest complete one", latest, candidate)
    done = complete_checkpoints(root)
    return done[-1][1] if done else None


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and partial ones
    older than the newest complete one). Never deletes what ``latest`` names."""
    if keep_last <= 0:
        return []
    done = complete_checkpoints(root)
    keep = {p for _, p in done[-keep_last:]}
    latest = root / LATEST
    if latest.is_file():
        keep.add(root / latest.read_text().strip())
    newest = done[-1][0] if done else -1
    removed = []
    for child in root.iterdir() if root.is_dir() else []:
        m = _TAG.match(child.name)
        if not m or not child.is_dir() or child in keep:
            continue
        if read_marker(child) is not None or int(m.group(1)) < newest:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def describe(ckpt_dir: Path) -> dict[str, Any]:
    marker = read_marker(ckpt_dir)
    if marker is None:
        raise CheckpointError(f"{ckpt_dir} is not a complete llave-ds checkpoint (no "
                              f"{COMPLETE_MARKER}); it may have been interrupted while saving")
    return marker
