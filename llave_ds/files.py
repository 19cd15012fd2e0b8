"""Writing files so that a crash never leaves a half-written one behind.

Every file llave-ds writes that a later run trusts (checkpoint markers and ``latest``, the run
directory's records, score files, embeddings) is written to a temporary sibling, flushed to
disk and renamed over its destination. A leaf: it imports nothing of llave-ds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def temporary_sibling(path: PathLike) -> Path:
    """``.<name>.tmp<pid><suffix>`` beside ``path`` (the suffix kept: numpy and other writers
    look at it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")


def fsync_dir(path: PathLike) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def fsync_tree(root: PathLike) -> None:
    """fsync every file under ``root`` (before renaming a whole directory into place)."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_atomically(path: PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` writes the content to a temporary sibling, which is then fsynced and
    renamed over ``path``. On any failure (a full disk) ``path`` keeps its old content and the
    temporary file is removed."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `write_atomically`)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
