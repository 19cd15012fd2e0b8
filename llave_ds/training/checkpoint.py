"""Training checkpoints: layout, the ``latest`` pointer, RNG states, pruning.

A checkpoint is ``<dir>/step_<N>/`` holding DeepSpeed's files (model, optimizer and
scheduler states of every rank), one ``rng_rank<r>.pt`` per rank, and a
``llave_complete.json`` marker written last. ``<dir>/latest`` names the newest complete
checkpoint; it is replaced atomically (write, fsync, rename) only after every rank has
finished writing, so a crash during a save leaves it pointing at the previous one.
DeepSpeed's own tools (``zero_to_fp32.py``) read the same ``latest`` file.

The marker lists every file of the checkpoint with its size and CRC-32 (``files``), so a
missing, truncated or corrupted shard is found before anything is loaded, with an error
naming the file (``verify_checkpoint``). Checkpoints written before the manifest existed
have no ``files`` entry and are not verified. See docs/RELIABILITY.md.
"""
from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from llave_ds.files import atomic_write_text

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "llave_complete.json"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: only at the end (and on preemption)
    keep_last: int = 2
    # auto: the newest complete checkpoint that verifies (older ones when the newest is
    # damaged, with a warning naming what was skipped) | none: start fresh | a checkpoint path.
    resume: str = "auto"
    # With resume: none in a run directory that holds checkpoints: start fresh anyway, after
    # moving its checkpoints and metrics into <run_dir>/previous-<time>/ (refused otherwise).
    overwrite: bool = False
    dir: str = ""  # default: <run_dir>/checkpoints
    # Record a CRC-32 of every checkpoint file when saving and check it before resuming
    # (ranks share the reading); sizes are always recorded and checked.
    checksums: bool = True
    # Resuming on another rank count converts the checkpoint to DeepSpeed's
    # universal format first (rank 0, once); the run stops with an error if that takes longer.
    universal_timeout_s: float = 7200.0

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0, got {self.keep_last}")
        if self.universal_timeout_s <= 0:
            raise ValueError(f"checkpoint.universal_timeout_s must be > 0, got {self.universal_timeout_s}")
        if self.overwrite and self.resume not in ("none", ""):
            raise ValueError(f"checkpoint.overwrite=true starts a run afresh and needs checkpoint.resume=none "
                             f"(--resume none --overwrite), got checkpoint.resume={self.resume}")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Union[str, Path]) -> Optional[int]:
    """The step of a checkpoint directory named ``step_<N>`` (None for any other name)."""
    m = _TAG.match(Path(path).name)
    return int(m.group(1)) if m else None


def looks_like_checkpoint(path: Union[str, Path]) -> bool:
    """A checkpoint directory by its name, its completion marker or DeepSpeed's model states
    (checked without reading anything)."""
    path = Path(path)
    return step_of(path) is not None or (path / COMPLETE_MARKER).exists() or any(path.glob("*_model_states.pt"))


def check_written_by(path: Path, written_by: Optional[int], world_size: int) -> None:
    """A checkpoint's own files load only on the number of ranks that wrote them (ZeRO
    partitions); another rank count goes through its universal checkpoint (``elastic``)."""
    if written_by is not None and written_by != world_size:
        raise CheckpointError(
            f"{path} was written by {written_by} ranks, this run has {world_size}, and its own files were "
            "about to be loaded: another rank count loads the checkpoint's universal form "
            "(llave_ds.training.elastic.resume_route decides; relaunch with --resume auto or the checkpoint path)")


def capture_rng_state() -> dict:
    """Every RNG's state in types ``torch.load(weights_only=True)`` reads (tensors, tuples,
    ints, floats, strings): numpy's key array travels as an int64 tensor, not a pickled array."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    else:  # written before 2026-12-07: numpy's own tuple, read through LEGACY_NUMPY_GLOBALS
        np.random.set_state(numpy_state)
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
        state = load_own_file(path)
    except Exception as exc:  # noqa: BLE001 - name the file whatever torch raises
        raise CheckpointError(f"cannot read RNG state {path}: {exc}") from exc
    restore_rng_state(state)


# numpy's array reconstruction, the only globals an RNG file written before 2026-12-07 needs
# (no other class, no function that runs code): allowed so that those checkpoints still resume.
_NUMPY_CORE = getattr(np, "_core", None) or np.core   # numpy 2 / numpy 1
LEGACY_NUMPY_GLOBALS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_own_file(path: Path, map_location: str = "cpu"):
    """A ``.pt`` file of tensors and plain values (our RNG states; DeepSpeed's model-states file,
    which holds our client state), read with ``weights_only=True``: a checkpoint from someone
    else cannot run code through it. DeepSpeed's optimizer states pickle DeepSpeed classes and
    are read by DeepSpeed itself (``engine.load_checkpoint``, ``weights_only=False``): the one
    place a checkpoint file is unpickled in full."""
    with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


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


def resume_candidates(root: Path) -> list[Path]:
    """What ``--resume auto`` may resume from, best first: the checkpoint ``latest`` names
    (if complete), then every other complete checkpoint, newest first. Logs, as warnings,
    a ``latest`` that names an incomplete checkpoint and every incomplete checkpoint newer
    than the best candidate (a save that was interrupted: never resumable)."""
    done = [p for _, p in reversed(complete_checkpoints(root))]
    latest = root / LATEST
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if candidate in done:
            done.remove(candidate)
            done.insert(0, candidate)
        else:
            logger.warning("%s names %s, which is not a complete checkpoint; falling back to the "
                           "newest complete one", latest, candidate)
    best = int(_TAG.match(done[0].name).group(1)) if done else -1
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        m = _TAG.match(child.name)
        if m and child.is_dir() and int(m.group(1)) > best and read_marker(child) is None:
            logger.warning("skipping %s: it has no %s, so its save was interrupted (it is not resumable)",
                           child, COMPLETE_MARKER)
    return done


def find_resume_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
    candidates = resume_candidates(root)
    return candidates[0] if candidates else None


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


# ------------------------------------------------------------------ manifest / verification

def file_crc32(path: Path, block: int = 1 << 24) -> str:
    """CRC-32 of a file as 8 hex digits (zlib: ~2 GB/s on one core)."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                break
            crc = zlib.crc32(data, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def list_checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Relative paths (posix) of the regular files of a checkpoint, sorted; the completion
    marker and temporary files are left out."""
    ckpt_dir = Path(ckpt_dir)
    out = []
    for p in ckpt_dir.rglob("*"):
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith("."):
            out.append(p.relative_to(ckpt_dir).as_posix())
    return sorted(out)


def build_manifest(ckpt_dir: Path, files: Sequence[str], crcs: Optional[dict] = None) -> dict:
    """``{file: {"size": bytes, "crc32": hex}}`` for the marker (crc32 only where given)."""
    manifest = {}
    for name in files:
        entry: dict[str, Any] = {"size": (Path(ckpt_dir) / name).stat().st_size}
        if crcs and name in crcs:
            entry["crc32"] = crcs[name]
        manifest[name] = entry
    return manifest


def _other_checkpoints_hint(ckpt_dir: Path, purpose: str = "resume") -> str:
    others = [p for _, p in complete_checkpoints(ckpt_dir.parent) if p != ckpt_dir]
    if not others:
        return "no other complete checkpoint exists in " + str(ckpt_dir.parent)
    if purpose == "export":
        return f"export the previous complete checkpoint instead: llave-ds export {others[-1]} --out ..."
    return (f"to resume from the previous complete checkpoint set checkpoint.resume={others[-1]} "
            f"(or --resume {others[-1]})")


def verify_checkpoint(ckpt_dir: Path, *, checksums: bool = True, files: Optional[Iterable[str]] = None,
                      purpose: str = "resume") -> dict:
    """Check the files the marker lists: present, same size, and (``checksums``) same CRC-32.

    Raises CheckpointError naming the first bad file and what to use instead (``purpose``:
    "resume" or "export" words the hint). ``files`` limits the CRC check to a subset (ranks
    share the reading); sizes are always checked for every file. Returns the marker. A
    marker without a manifest (older checkpoints) passes unchecked.
    """
    ckpt_dir = Path(ckpt_dir)
    marker = describe(ckpt_dir)
    manifest = marker.get("files")
    if not isinstance(manifest, dict):
        return marker
    for name in sorted(manifest):
        path = ckpt_dir / name
        want = manifest[name].get("size")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} is missing {path} (listed in {COMPLETE_MARKER} when "
                                  f"it was saved): the checkpoint cannot be loaded; restore the file, or "
                                  f"{_other_checkpoints_hint(ckpt_dir, purpose)}")
        size = path.stat().st_size
        if want is not None and size != want:
            raise CheckpointError(f"checkpoint file {path} is {size} bytes but was {want} bytes when saved: it "
                                  f"is truncated or was overwritten; restore the file, or "
                                  f"{_other_checkpoints_hint(ckpt_dir, purpose)}")
    if checksums:
        for name in sorted(manifest) if files is None else files:
            want = manifest.get(name, {}).get("crc32")
            if want is None:
                continue
            path = ckpt_dir / name
            got = file_crc32(path)
            if got != want:
                raise CheckpointError(f"checkpoint file {path} is corrupted: its CRC-32 is {got}, {want} when it "
                                      f"was saved; restore the file, or "
                                      f"{_other_checkpoints_hint(ckpt_dir, purpose)}")
    return marker


def find_unreadable_file(ckpt_dir: Path) -> Optional[tuple[Path, str]]:
    """The first ``*.pt`` file of a checkpoint that is not an intact torch archive, with the
    error; for naming the culprit after a load failed (failure path only). Each file's zip
    structure and every member's CRC are checked, nothing is unpickled: no code in the files runs."""
    import zipfile

    for path in sorted(Path(ckpt_dir).rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return path, f"corrupted member {bad}"
        except Exception as exc:  # noqa: BLE001 - any failure names this file
            return path, f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------ save failures

_DISK_FULL_HINTS = ("no space left", "unexpected pos", "file write failed", "disk quota")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def looks_like_disk_full(messages: Sequence[str], root: Path) -> bool:
    """torch.save reports a full disk as ``unexpected pos N vs M`` (no errno): also compare
    the free space with the size of the newest complete checkpoint."""
    text = " ".join(messages).lower()
    if any(h in text for h in _DISK_FULL_HINTS) or f"[errno {errno.ENOSPC}]" in text:
        return True
    done = complete_checkpoints(root)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return False
    return bool(done) and free < dir_size(done[-1][1])


def save_failure_message(root: Path, tag: str, messages: Sequence[str]) -> str:
    """What went wrong, whether the disk is full, and what is still safe to resume from."""
    root = Path(root)
    text = f"saving checkpoint {root / tag} failed: " + "; ".join(messages) + "."
    if looks_like_disk_full(messages, root):
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            free = -1
        done = complete_checkpoints(root)
        size = f" (the previous checkpoint takes {dir_size(done[-1][1]) / 2 ** 20:.1f} MiB)" if done else ""
        text += (f" The filesystem holding {root} looks full: {free / 2 ** 20:.1f} MiB free{size}. Free space, "
                 "lower checkpoint.keep_last, or point checkpoint.dir at a larger disk.")
    resume = find_resume_checkpoint(root)
    if resume is not None:
        text += (f" The incomplete {tag} was removed; {root / LATEST} still names {resume.name}, which is "
                 "intact: training can resume from it.")
    else:
        text += f" The incomplete {tag} was removed; there is no earlier complete checkpoint."
    return text


def clear_stale_tag(root: Path, tag: str) -> None:
    """Before saving ``tag``: remove what an interrupted earlier save of the same tag left
    (no marker), or the marker of a complete one being overwritten, so that a crash during
    this save can never leave a marker next to half-written files."""
    path = Path(root) / tag
    if not path.exists():
        return
    if read_marker(path) is None:
        shutil.rmtree(path, ignore_errors=True)
    else:
        (path / COMPLETE_MARKER).unlink()
