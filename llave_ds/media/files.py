"""Media files on disk: where a path points and whether the file can be read at all.

One set of checks for every reader (training rows, evaluation rows, ``llave-ds encode``,
``LlaveEmbedder``, the video reader): a path is resolved under its root (never outside it),
and a file is refused when missing, not a regular file (for videos: not a file nor a folder of
frames) or empty. Each refusal is a `MediaError` whose message names the file and whose
``reason`` is a stable key for counting skipped rows (`REASONS`).
"""
from __future__ import annotations

import os
import stat
from typing import Literal, Optional, Tuple

# MediaError.reason values (the keys of the skip counters in llave_ds.data).
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE_FILE = "empty_image_file"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"
PATH_OUTSIDE_ROOT = "path_outside_root"
MISSING_VIDEO = "missing_video"
EMPTY_VIDEO_FILE = "empty_video_file"
UNREADABLE_VIDEO = "unreadable_video"
NO_VIDEO_STREAM = "no_video_stream"
NO_FRAMES = "no_frames"
BAD_FRAME = "bad_frame"
VIDEO_TOO_LARGE = "video_too_large"
IMAGE_REASONS: Tuple[str, ...] = (MISSING_IMAGE, EMPTY_IMAGE_FILE, UNREADABLE_IMAGE, IMAGE_TOO_LARGE)
VIDEO_REASONS: Tuple[str, ...] = (MISSING_VIDEO, EMPTY_VIDEO_FILE, UNREADABLE_VIDEO, NO_VIDEO_STREAM, NO_FRAMES,
                                  BAD_FRAME, VIDEO_TOO_LARGE)
REASONS: Tuple[str, ...] = IMAGE_REASONS + VIDEO_REASONS + (PATH_OUTSIDE_ROOT,)

# Per image (and per video frame): far above any MMEB image (the largest documents are
# ~10 Mpx), far below a decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000


class MediaError(ValueError):
    """An image or video that cannot be used; the message names the file and the problem.

    ``path``: the file (or frame folder); ``reason``: one of `REASONS`.
    """

    def __init__(self, message: str, *, path: Optional[str] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep the attributes across process boundaries (DataLoader workers)
        return _rebuild, (type(self), str(self), self.path, self.reason)


def _rebuild(cls, message, path, reason):
    return cls(message, path=path, reason=reason)


def resolve_under_root(root: str, path: str) -> str:
    """``path`` joined to ``root``; a `MediaError` (``path_outside_root``) when the result
    lies outside the root.

    Lexical check (normpath, symlinks not resolved): ``../`` and foreign absolute paths are
    refused, while a root that holds symlinks to other disks still works.
    """
    base = os.path.normpath(os.path.abspath(os.path.expanduser(root)))
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))
    if os.path.commonpath([base, full]) != base:
        raise MediaError(f"image path {path!r} points outside the image root {base}", path=full,
                         reason=PATH_OUTSIDE_ROOT)
    return full


def _stat(path: str, what: str, missing: str) -> os.stat_result:
    """``os.stat(path)``, or a `MediaError` naming ``what`` the path should be (reason ``missing``)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise MediaError(f"{what} not found: {path}", path=path, reason=missing) from None
    except OSError as exc:
        raise MediaError(f"cannot access {what} {path}: {exc.strerror or exc}", path=path, reason=missing) from None


def check_image_file(path: str) -> None:
    """A non-empty regular file, or a `MediaError` saying what it is instead (stat only)."""
    st = _stat(path, "image file", MISSING_IMAGE)
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(f"image path is not a regular file: {path}", path=path, reason=MISSING_IMAGE)
    if st.st_size == 0:
        raise MediaError(f"image file is empty (0 bytes): {path}", path=path, reason=EMPTY_IMAGE_FILE)


def check_video_source(path: str) -> Literal["file", "frames"]:
    """``"file"`` for a non-empty regular file, ``"frames"`` for a folder (of frame images),
    or a `MediaError` (stat only; a folder's frames are checked when it is read)."""
    st = _stat(path, "video", MISSING_VIDEO)
    if stat.S_ISDIR(st.st_mode):
        return "frames"
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(f"video path is neither a file nor a folder of frames: {path}", path=path,
                         reason=MISSING_VIDEO)
    if st.st_size == 0:
        raise MediaError(f"video file is empty (0 bytes): {path}", path=path, reason=EMPTY_VIDEO_FILE)
    return "file"
