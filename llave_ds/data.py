"""MMEB-train data: rows on disk or on the hub -> `Pair`s -> per-rank batches -> chunks.

This module knows nothing of models or training. It reads MMEB-train rows (``qry``,
``qry_image_path``, ``pos_text``, ``pos_image_path``, optional ``neg_text`` /
``neg_image_path``, and the video fields ``qry_video_path`` / ``pos_video_path`` /
``neg_video_path``), checks them, loads images and decodes videos lazily (in DataLoader
workers; how many frames per video is the caller's to say, from the processing config),
draws rank-aware global batches, and hands chunks of `Side`s to a caller-supplied
formatter that turns them into tensors.

Bad input never passes silently: it raises `DataError` naming subset, source, row and
field, or, with ``skip_bad_rows=True``, is skipped, counted per reason and logged on the
``llave_ds.data`` logger. See docs/DATA.md for the policy and why it keeps every rank's
batch the same size.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import re
import stat
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from llave_ds.config import check_choices
from llave_ds.video import EMPTY_VIDEO_FILE, MISSING_VIDEO, UNREADABLE_VIDEO, Video, VideoError, read_video
from llave_ds.video import to_rgb as _to_rgb  # transparent areas on white, one rule for images and frames

logger = logging.getLogger("llave_ds.data")

REQUIRED_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
NEGATIVE_FIELDS = ("neg_text", "neg_image_path")
# Optional, one per side (docs/DATA.md "Video rows"): a video file or a folder of frame
# images, relative to the image root like the image paths; "" / absent = none.
VIDEO_FIELDS = ("qry_video_path", "pos_video_path", "neg_video_path")
KNOWN_FIELDS = REQUIRED_FIELDS + NEGATIVE_FIELDS + VIDEO_FIELDS
KNOWN_SPLITS = ("original", "diverse_instruction")
DATA_EXTENSIONS = (".parquet", ".jsonl")
# LLaVE's local layout: one JSON array of rows per subset, ``<data_path>/<subset>.json``
# (flat files only: a hub download's directories hold parquet).
JSON_ARRAY_EXTENSION = ".json"
# JSON files a dataset directory may hold that are not data (datasets' and the hub's metadata).
_METADATA_JSON = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}
IMAGE_PLACEHOLDER = "<|image_1|>"
VIDEO_PLACEHOLDER = "<|video_1|>"
# Frames decoded per video when the caller does not say (processing.DEFAULT_VIDEO_FRAMES,
# the LLaVA-OneVision model card's count; training passes processing.video_frames).
DEFAULT_VIDEO_FRAMES = 8
# Far above any MMEB image (the largest documents are ~10 Mpx), far below a bomb.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# HF shard naming, as written by push_to_hub: "<split>-00000-of-00003.parquet".
_SHARD_NAME = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}\.(parquet|jsonl)$")
_ROW_WARNINGS_PER_SUBSET = 10

# Skip reasons (keys of the skip counters).
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE_FILE = "empty_image_file"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"
PATH_OUTSIDE_ROOT = "path_outside_root"
EMPTY_SIDE = "empty_side"
WRONG_TYPE = "wrong_type"
MISSING_NEGATIVES = "missing_negatives"
IMAGE_AND_VIDEO = "image_and_video"  # a side naming both an image and a video
# Video problems use llave_ds.video's reasons: missing_video, empty_video_file,
# unreadable_video, no_video_stream, no_frames, bad_frame, video_too_large.


class DataError(ValueError):
    """Bad training data. The message names source/subset, row and field.

    ``reason`` is one of the skip reasons above (None for schema/config problems).
    """

    def __init__(self, message: str, *, reason: Optional[str] = None, subset: Optional[str] = None,
                 row: Optional[int] = None, field: Optional[str] = None):
        super().__init__(message)
        self.reason = reason
        self.subset = subset
        self.row = row
        self.field = field

    def __reduce__(self):  # keep the attributes across process boundaries
        return (_rebuild_data_error, (str(self), self.reason, self.subset, self.row, self.field))


def _rebuild_data_error(message, reason, subset, row, field_name):
    return DataError(message, reason=reason, subset=subset, row=row, field=field_name)


class _RowProblem(Exception):
    """Internal: what is wrong with one row; turned into a DataError with its location."""

    def __init__(self, reason: str, field_name: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field_name, detail


# --------------------------------------------------------------------------- records

@dataclass
class Side:
    """One side of a pair: text (may hold ``<|image_1|>`` or ``<|video_1|>``) and an
    optional image or video (never both).

    ``image_path`` / ``video_path`` are relative to the image root; None means none.
    `MMEBTrainDataset.__getitem__` fills ``image`` (RGB) or ``video`` (a
    `llave_ds.video.Video`: the sampled RGB frames plus the file's fps and frame count).
    """
    text: str
    image_path: Optional[str] = None
    image: Optional[Image.Image] = None
    video_path: Optional[str] = None
    video: Optional[Video] = None

    @property
    def has_image(self) -> bool:
        return bool(self.image_path)

    @property
    def has_video(self) -> bool:
        return bool(self.video_path)


@dataclass
class Pair:
    """A query, its positive target and its hard negatives (possibly none).

    ``replaced`` lists the skip reasons of bad rows this pair stands in for (see
    `MMEBTrainDataset.__getitem__`); the collator sums them into ``TrainBatch.skipped``.
    """
    query: Side
    target: Side
    negatives: List[Side] = field(default_factory=list)
    subset: str = ""
    row: int = -1
    replaced: List[str] = field(default_factory=list)


@dataclass
class TrainDataConfig:
    """Where the MMEB-train data is and how to read it. Flat, simple types only.

    source:   a local directory (one file or directory per subset) or a hub dataset id.
    source_type: "auto" (a directory, or anything that looks like a path, is local),
              "local" or "hub".
    image_root: directory image paths are relative to; defaults to ``source`` when local.
    subsets:  subset names (list, or comma-separated string). None (the default) = the 20
              official MMEB-train subsets (``mmeb_subsets.json`` "train") that the source
              holds; the other subsets found (the hub repository also holds CIFAR_100,
              FashionIQ, ImageNet-A, ImageNet-R: evaluation tasks) are listed in the log and
              skipped. A source holding none of the official names (data of your own, the
              synthetic demo data) trains on every subset found. Name subsets to train on
              anything else.
    split:    "original" or "diverse_instruction" in MMEB-train.
    max_per_subset / cap_mode / seed: keep the first N rows of each subset ("first", as
              the reference does) or a seeded random N ("random").
    use_hard_negatives / num_hard_negatives: attach exactly K data negatives to every pair.
    skip_bad_rows: skip, count and log bad rows instead of raising DataError.
    max_skip_fraction: even when skipping, raise if more than this fraction of a subset is
              bad (a wrong image_root should not quietly skip everything).
    check_image_files: stat every image and video at load time (cheap; catches missing/empty
              files).
    verify_images_upfront: also fully decode every image and video at load time (slow;
              exact counts).
    max_image_pixels: decompression-bomb guard; larger images (and video frames) are bad rows.
    max_image_side: if set, images are downscaled so their longer side fits.
    max_substitute_attempts: lazily-found bad rows are replaced by the next rows of the
              same subset; give up (DataError) after this many in a row.
    cache_dir: datasets cache directory (None = the datasets default).
    homogeneous_batches: draw every global batch from a single subset (VLM2Vec-V2).
    """
    source: str = ""
    source_type: Literal["auto", "local", "hub"] = "auto"
    image_root: Optional[str] = None
    subsets: Optional[List[str]] = None
    split: str = "original"
    max_per_subset: Optional[int] = None
    cap_mode: Literal["first", "random"] = "first"
    seed: int = 0
    use_hard_negatives: bool = False
    num_hard_negatives: int = 1
    skip_bad_rows: bool = False
    max_skip_fraction: float = 0.1
    check_image_files: bool = True
    verify_images_upfront: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_side: Optional[int] = None
    max_substitute_attempts: int = 16
    cache_dir: Optional[str] = None
    homogeneous_batches: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the offending option."""
        if not self.source:
            raise ValueError("TrainDataConfig.source is empty: give a local directory or a hub dataset id")
        check_choices(self, "TrainDataConfig.")
        if self.max_per_subset is not None and self.max_per_subset < 1:
            raise ValueError(f"TrainDataConfig.max_per_subset must be >= 1 or None, got {self.max_per_subset}")
        if self.num_hard_negatives < 0 or (self.use_hard_negatives and self.num_hard_negatives < 1):
            raise ValueError("TrainDataConfig.num_hard_negatives must be >= 1 when use_hard_negatives is set, "
                             f"got {self.num_hard_negatives}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"TrainDataConfig.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.max_image_pixels < 1:
            raise ValueError(f"TrainDataConfig.max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_image_side is not None and self.max_image_side < 1:
            raise ValueError(f"TrainDataConfig.max_image_side must be >= 1 or None, got {self.max_image_side}")
        if self.max_substitute_attempts < 0:
            raise ValueError("TrainDataConfig.max_substitute_attempts must be >= 0")
        names = self.subset_names()
        if names is not None:
            if not names:
                raise ValueError("TrainDataConfig.subsets is empty: give names or None for all subsets")
            dupes = sorted(n for n, c in Counter(names).items() if c > 1)
            if dupes:
                raise ValueError(f"TrainDataConfig.subsets lists {dupes} more than once")

    def subset_names(self) -> Optional[List[str]]:
        if self.subsets is None:
            return None
        if isinstance(self.subsets, str):
            return [s.strip() for s in self.subsets.split(",") if s.strip()]
        return [str(s) for s in self.subsets]

    def is_local(self) -> bool:
        if self.source_type != "auto":
            return self.source_type == "local"
        src = self.source
        return os.path.isdir(src) or os.path.isabs(src) or src.startswith((".", "~"))


# --------------------------------------------------------------------------- images

def resolve_image_path(image_root: str, path: str) -> str:
    """Join ``path`` to ``image_root``; refuse anything that lands outside the root.

    Lexical check (normpath, no symlink resolution) so a root that holds symlinks to
    other disks still works, while ``../`` and foreign absolute paths are refused.
    """
    root = os.path.normpath(os.path.abspath(image_root))
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise _RowProblem(PATH_OUTSIDE_ROOT, "", f"image path {path!r} points outside the image root {root}")
    return full


def _check_image_file(full_path: str) -> None:
    try:
        st = os.stat(full_path)
    except FileNotFoundError:
        raise _RowProblem(MISSING_IMAGE, "", f"image file not found: {full_path}") from None
    except OSError as exc:
        raise _RowProblem(MISSING_IMAGE, "", f"cannot access image file {full_path}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _RowProblem(MISSING_IMAGE, "", f"image path is not a regular file: {full_path}")
    if st.st_size == 0:
        raise _RowProblem(EMPTY_IMAGE_FILE, "", f"image file is empty (0 bytes): {full_path}")


def _decode_image(full_path: str, max_pixels: int, max_side: Optional[int]) -> Image.Image:
    _check_image_file(full_path)
    # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that. Make the
    # warning an error only when our own limit is not higher than PIL's.
    bomb_filter = "error" if max_pixels <= Image.MAX_IMAGE_PIXELS else "ignore"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(bomb_filter, Image.DecompressionBombWarning)
            with open(full_path, "rb") as fh:
                img = Image.open(fh)
                width, height = img.size
                if width * height > max_pixels:
                    raise _RowProblem(IMAGE_TOO_LARGE, "", f"image {full_path} is {width}x{height} = "
                                      f"{width * height} pixels, above the limit of {max_pixels}")
                if max_side is not None:
                    img.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale
                img.load()  # full decode: truncated files fail here, not in the model
                rgb = _to_rgb(img)
    except _RowProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _RowProblem(IMAGE_TOO_LARGE, "", f"image {full_path} is too large ({exc})") from None
    except UnidentifiedImageError:
        raise _RowProblem(UNREADABLE_IMAGE, "", f"not a recognised image file: {full_path}") from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL decoders raise many types on corrupt data
        raise _RowProblem(UNREADABLE_IMAGE, "", f"image file is corrupt or truncated: {full_path} "
                          f"({type(exc).__name__}: {exc})") from None
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return rgb


def load_image(path: str, *, image_root: Optional[str] = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_side: Optional[int] = None) -> Image.Image:
    """Fully decode one image to RGB, or raise DataError (``reason`` set) saying why not."""
    try:
        full = resolve_image_path(image_root, path) if image_root is not None else path
        return _decode_image(full, max_pixels, max_side)
    except _RowProblem as p:
        raise DataError(p.detail, reason=p.reason) from None


# --------------------------------------------------------------------------- videos

def _check_video_source(full_path: str) -> None:
    """Load-time check of a video: a non-empty regular file or a folder (of frames)."""
    try:
        st = os.stat(full_path)
    except FileNotFoundError:
        raise _RowProblem(MISSING_VIDEO, "", f"video not found: {full_path}") from None
    except OSError as exc:
        raise _RowProblem(MISSING_VIDEO, "", f"cannot access video {full_path}: {exc}") from None
    if stat.S_ISDIR(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        raise _RowProblem(MISSING_VIDEO, "", f"video path is neither a file nor a folder of frames: {full_path}")
    if st.st_size == 0:
        raise _RowProblem(EMPTY_VIDEO_FILE, "", f"video file is empty (0 bytes): {full_path}")


def _decode_video(full_path: str, num_frames: Optional[int], max_side: Optional[int], max_pixels: int) -> Video:
    """``num_frames`` uniformly sampled RGB frames (`llave_ds.video.read_video`), or a
    `_RowProblem` with VideoError's reason (the message names the file)."""
    try:
        return read_video(full_path, num_frames, max_side=max_side, max_pixels=max_pixels)
    except VideoError as err:
        raise _RowProblem(err.reason or UNREADABLE_VIDEO, "", str(err)) from None


# --------------------------------------------------------------------------- rows

def _as_text(value: Any, field_name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise _RowProblem(WRONG_TYPE, field_name, f"expected a string, got {type(value).__name__} {_short(value)}")


def _as_text_list(value: Any, field_name: str) -> List[str]:
    """A negatives field: "" / None (none), one string (MMEB-train), or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, (list, tuple)):
        return [_as_text(v, f"{field_name}[{i}]") for i, v in enumerate(value)]
    raise _RowProblem(WRONG_TYPE, field_name,
                      f"expected a string or a list of strings, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# (text, image path, video path) of one side; "" = none.
_SideFields = Tuple[str, str, str]


@dataclass
class _RowSides:
    query: _SideFields
    target: _SideFields
    negatives: List[_SideFields]
    # The row's field names of each negative (its index in the row's lists, which may skip
    # empty entries): "neg_image_path[3]" names the file the user wrote.
    negative_index: List[int] = field(default_factory=list)


def _one_medium(text_field: str, image_field: str, video_field: str, side: _SideFields, what: str) -> None:
    text, image, video = side
    if image and video:
        raise _RowProblem(IMAGE_AND_VIDEO, video_field, f"{what} has both an image ({image_field}={image!r}) and a "
                          f"video ({video_field}={video!r}); a side holds at most one of them")
    if not text.strip() and not image and not video:
        raise _RowProblem(EMPTY_SIDE, text_field, f"{what} has neither text ({text_field}) nor image "
                          f"({image_field}) nor video ({video_field})")


def _parse_row(row: Mapping[str, Any], num_negatives: int) -> _RowSides:
    """Type- and content-check one row (no file access). num_negatives=0: ignore negatives."""
    query = (_as_text(row.get("qry"), "qry"), _as_text(row.get("qry_image_path"), "qry_image_path"),
             _as_text(row.get("qry_video_path"), "qry_video_path"))
    target = (_as_text(row.get("pos_text"), "pos_text"), _as_text(row.get("pos_image_path"), "pos_image_path"),
              _as_text(row.get("pos_video_path"), "pos_video_path"))
    _one_medium("qry", "qry_image_path", "qry_video_path", query, "query")
    _one_medium("pos_text", "pos_image_path", "pos_video_path", target, "positive")
    negatives: List[_SideFields] = []
    index: List[int] = []
    if num_negatives > 0:
        texts = _as_text_list(row.get("neg_text"), "neg_text")
        paths = _as_text_list(row.get("neg_image_path"), "neg_image_path")
        videos = _as_text_list(row.get("neg_video_path"), "neg_video_path")
        n = max(len(texts), len(paths), len(videos))
        for name, values in (("neg_text", texts), ("neg_image_path", paths), ("neg_video_path", videos)):
            if values and len(values) != n:
                lengths = ", ".join(f"{len(v)} {k}" for k, v in (("neg_text", texts), ("neg_image_path", paths),
                                                                 ("neg_video_path", videos)) if v)
                raise _RowProblem(WRONG_TYPE, name, f"the negatives' lists differ in length ({lengths} entries)")
        texts, paths, videos = (v or [""] * n for v in (texts, paths, videos))
        for i, side in enumerate(zip(texts, paths, videos)):
            if side[1] and side[2]:
                _one_medium("neg_text", f"neg_image_path[{i}]", f"neg_video_path[{i}]", side, f"negative {i}")
            if side[0].strip() or side[1] or side[2]:
                negatives.append(side)
                index.append(i)
        if len(negatives) < num_negatives:
            raise _RowProblem(MISSING_NEGATIVES, "neg_text", f"row has {len(negatives)} hard negative(s), "
                              f"{num_negatives} required (num_hard_negatives)")
        negatives, index = negatives[:num_negatives], index[:num_negatives]
    return _RowSides(query, target, negatives, index)


def _media_fields(sides: _RowSides) -> List[Tuple[str, str, str]]:
    """(field name, relative path, "image" | "video") of every image and video the pair needs."""
    out = []
    for prefix, side in (("qry", sides.query), ("pos", sides.target)):
        if side[1]:
            out.append((f"{prefix}_image_path", side[1], "image"))
        if side[2]:
            out.append((f"{prefix}_video_path", side[2], "video"))
    for i, side in zip(sides.negative_index, sides.negatives):
        if side[1]:
            out.append((f"neg_image_path[{i}]", side[1], "image"))
        if side[2]:
            out.append((f"neg_video_path[{i}]", side[2], "video"))
    return out


# --------------------------------------------------------------------------- sources

def official_train_subsets() -> List[str]:
    """The 20 MMEB-train subsets VLM2Vec and LLaVE train on, in their scripts' order."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmeb_subsets.json")
    with open(path, encoding="utf-8") as fh:
        return list(json.load(fh)["train"])


def default_train_subsets(found: Sequence[str], source: str) -> List[str]:
    """What ``subsets: None`` trains on: the official training subsets among ``found``, or
    everything found when the source holds none of them (logged either way)."""
    official = official_train_subsets()
    chosen = [n for n in official if n in found]
    if not chosen:
        logger.info("no official MMEB-train subset in %s: training on every subset found (%s)",
                    source, ", ".join(found))
        return list(found)
    skipped = sorted(set(found) - set(chosen))
    missing = [n for n in official if n not in found]
    logger.info("training on the %d official MMEB-train subset(s) found in %s%s", len(chosen), source,
                f"; skipped (not MMEB-train training subsets; name them in data.subsets to train on them): "
                f"{', '.join(skipped)}" if skipped else "")
    if missing:
        logger.warning("%d of the 20 official MMEB-train subsets are not in %s: %s", len(missing), source,
                       ", ".join(missing))
    return chosen


def list_local_subsets(root: str, json_arrays: bool = False) -> List[str]:
    """Subset names under a local MMEB directory (train or eval): ``<S>.parquet|jsonl``
    files or ``<S>/`` directories with data files; with ``json_arrays`` also ``<S>.json``
    files (LLaVE's layout). Hidden entries and dataset metadata files are ignored."""
    names = set()
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            continue
        stem, ext = os.path.splitext(entry.name)
        if entry.is_file() and (ext in DATA_EXTENSIONS or (
                json_arrays and ext == JSON_ARRAY_EXTENSION and entry.name not in _METADATA_JSON)):
            names.add(stem)
        elif entry.is_dir() and any(f.endswith(DATA_EXTENSIONS) for f in os.listdir(entry.path)):
            names.add(entry.name)
    return sorted(names)


def find_subset_files(root: str, subset: str, split: str) -> List[str]:
    """Data files of one subset and split in a local directory.

    Layouts, in this order: ``<root>/<S>.parquet|jsonl`` (no split); ``<root>/<S>/<split>.ext``
    or ``<root>/<S>/<split>-00000-of-0000N.ext`` (a ``huggingface-cli download
    TIGER-Lab/MMEB-train`` tree); ``<root>/<S>/*.ext`` when no file there is named after
    a split.
    """
    flat = [os.path.join(root, subset + ext) for ext in DATA_EXTENSIONS + (JSON_ARRAY_EXTENSION,)
            if os.path.isfile(os.path.join(root, subset + ext))]
    subdir = os.path.join(root, subset)
    in_dir = sorted(f for f in os.listdir(subdir) if f.endswith(DATA_EXTENSIONS)) if os.path.isdir(subdir) else []
    if flat and in_dir:
        raise DataError(f"subset {subset!r}: both {flat[0]} and the directory {subdir} hold data; keep one")
    if len(flat) > 1:
        raise DataError(f"subset {subset!r}: both {flat[0]} and {flat[1]} exist; keep one")
    if flat:
        return flat
    if not in_dir:
        raise DataError(f"subset {subset!r} not found in {root}; available subsets: "
                        f"{', '.join(list_local_subsets(root, json_arrays=True)) or '(none)'}", subset=subset)
    chosen = [f for f in in_dir if os.path.splitext(f)[0] == split or f.startswith(split + "-")]
    if not chosen:
        splits = sorted({m.group("split") for f in in_dir if (m := _SHARD_NAME.match(f))}
                        | {os.path.splitext(f)[0] for f in in_dir if os.path.splitext(f)[0] in KNOWN_SPLITS})
        if splits:
            raise DataError(f"subset {subset!r}: split {split!r} not found in {subdir}; available splits: "
                            f"{', '.join(splits)}", subset=subset)
        chosen = in_dir  # plain "<S>/*.parquet": files are not named after splits
    exts = {os.path.splitext(f)[1] for f in chosen}
    if len(exts) > 1:
        raise DataError(f"subset {subset!r}: {subdir} mixes {' and '.join(sorted(exts))} files; use one format")
    return [os.path.join(subdir, f) for f in chosen]


def _first_bad_json_line(path: str) -> Optional[str]:
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {lineno}: invalid JSON ({exc.msg})"
            if not isinstance(obj, dict):
                return f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
    return None


def _json_array_problem(path: str) -> Optional[str]:
    """Why a ``<subset>.json`` file is not a JSON array of row objects, or None."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        return f"invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})"
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read it ({exc})"
    if not isinstance(data, list):
        return f"expected a JSON array of row objects (LLaVE's <subset>.json), got a {type(data).__name__}"
    bad = next((i for i, row in enumerate(data) if not isinstance(row, dict)), None)
    if bad is not None:
        return f"element {bad}: expected a row object, got {type(data[bad]).__name__}"
    if not data:
        return "the array is empty"
    return None


def _load_local_subset(files: List[str], subset: str, cache_dir: Optional[str]):
    import datasets

    builder = "parquet" if files[0].endswith(".parquet") else "json"
    if files[0].endswith(JSON_ARRAY_EXTENSION):
        # Checked first: datasets' json builder reads a top-level array too, but its errors on
        # anything else name neither the file's problem nor the expected layout.
        problem = _json_array_problem(files[0])
        if problem:
            raise DataError(f"subset {subset!r}: {files[0]}: {problem}", subset=subset)
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except Exception as exc:
        detail = None
        if builder == "json" and not files[0].endswith(JSON_ARRAY_EXTENSION):
            detail = next((f"{f}, {d}" for f in files if (d := _first_bad_json_line(f))), None)
        raise DataError(f"subset {subset!r}: cannot read {detail or ', '.join(files)} "
                        f"({type(exc).__name__}: {exc})", subset=subset) from exc


def _load_hub_subset(source: str, subset: str, split: str, cache_dir: Optional[str]):
    import datasets

    try:
        return datasets.load_dataset(source, subset, split=split, cache_dir=cache_dir)
    except Exception as exc:
        raise DataError(f"subset {subset!r} of hub dataset {source!r}, split {split!r}: cannot load "
                        f"({type(exc).__name__}: {exc})", subset=subset) from exc


def _hub_subsets(source: str) -> List[str]:
    import datasets

    try:
        return list(datasets.get_dataset_config_names(source))
    except Exception as exc:
        raise DataError(f"cannot list the subsets of hub dataset {source!r} ({type(exc).__name__}: {exc}); "
                        "name them in TrainDataConfig.subsets") from exc


# --------------------------------------------------------------------------- dataset

@dataclass
class _Subset:
    name: str
    where: str             # for messages: file, directory or hub id
    table: Any             # datasets.Dataset after the per-subset cap
    source_rows: np.ndarray  # row in the file for each row of `table`
    kept: np.ndarray       # rows of `table` that passed the load-time checks
    has_videos: bool = False  # some kept row has a video on a side this run reads


class MMEBTrainDataset(torch.utils.data.Dataset):
    """MMEB-train pairs from a `TrainDataConfig`; ``dataset[i]`` is a `Pair` with images loaded
    and videos decoded.

    ``video_frames`` / ``video_max_side``: how videos are decoded (`llave_ds.video.read_video`:
    that many uniformly sampled frames, downscaled to that longer side); training passes
    ``processing.video_frames`` / ``processing.video_max_side`` so the formatter takes the
    decoded clip as it is. ``has_videos``: whether any kept row has a video (on a side the
    run reads: negatives only with hard negatives on); a function of the data and config
    alone, so the same on every rank reading the same data. Training turns the formatter's
    video slot on from it (docs/VIDEO.md, the dummy rule).

    Global index space: subsets laid end to end, in ``subset_ranges`` order
    (name -> (start, end)), so a sampler can draw batches from one subset.
    Row problems found at load time (schema, types, empty sides, paths, missing/empty
    files) raise DataError or, with skip_bad_rows, drop the row (``skip_counts``).
    Problems only decoding can find (corrupt, truncated, too large) surface in
    ``__getitem__``: DataError, or the next good row of the same subset is returned in
    its place and ``Pair.replaced`` records why (the batch keeps its size).
    """

    def __init__(self, config: TrainDataConfig, *, video_frames: Optional[int] = DEFAULT_VIDEO_FRAMES,
                 video_max_side: Optional[int] = None):
        config.validate()
        for name, value in (("video_frames", video_frames), ("video_max_side", video_max_side)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"MMEBTrainDataset: {name} must be a positive int or None, got {value!r}")
        self.config = config
        self.video_frames = video_frames
        self.video_max_side = video_max_side
        local = config.is_local()
        source = os.path.expanduser(config.source) if local else config.source
        if local and not os.path.isdir(source):
            raise DataError(f"data directory {source!r} does not exist (TrainDataConfig.source)")
        image_root = config.image_root if config.image_root is not None else (source if local else None)
        if image_root is None:
            raise ValueError("TrainDataConfig.image_root is required for a hub dataset: "
                             "the directory the *_image_path fields are relative to")
        self.image_root = os.path.abspath(os.path.expanduser(image_root))
        if not os.path.isdir(self.image_root):
            raise DataError(f"image root {self.image_root!r} does not exist (TrainDataConfig.image_root)")
        self._num_negatives = config.num_hard_negatives if config.use_hard_negatives else 0

        names = config.subset_names()
        if local:
            available = list_local_subsets(source, json_arrays=True)
            if names is None:
                names = default_train_subsets(available, source)
            unknown = [n for n in names if n not in available]
            if unknown:
                raise DataError(f"unknown subset(s) {unknown} in {source}; available subsets: "
                                f"{', '.join(available) or '(none)'}", subset=unknown[0])
        elif names is None:
            names = default_train_subsets(_hub_subsets(source), source)
        if not names:
            raise DataError(f"no subsets found in {source!r}")

        self.skip_counts: Counter = Counter()  # rows dropped at load time, per reason
        self.subset_skip_counts: Dict[str, Counter] = {}
        self._subsets: List[_Subset] = []
        for name in names:
            if local:
                files = find_subset_files(source, name, config.split)
                where = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])} ({len(files)} files)"
                table = _load_local_subset(files, name, config.cache_dir)
            else:
                where = f"{source}:{name}/{config.split}"
                table = _load_hub_subset(source, name, config.split, config.cache_dir)
            self._subsets.append(self._prepare_subset(name, where, table))

        self.subset_ranges: Dict[str, Tuple[int, int]] = {}
        self._starts: List[int] = []
        start = 0
        for sub in self._subsets:
            self.subset_ranges[sub.name] = (start, start + len(sub.kept))
            self._starts.append(start)
            start += len(sub.kept)
        self._length = start
        self.has_videos = any(sub.has_videos for sub in self._subsets)
        logger.info("loaded %d pairs from %d subset(s) of %s (split %s)%s%s", self._length, len(self._subsets),
                    source, config.split, "; with video rows" if self.has_videos else "",
                    f"; skipped {dict(self.skip_counts)}" if self.skip_counts else "")

    # ---- loading

    def _prepare_subset(self, name: str, where: str, table) -> _Subset:
        cfg = self.config
        columns = list(table.column_names)
        missing = [f for f in REQUIRED_FIELDS if f not in columns]
        if missing:
            raise DataError(f"subset {name!r} ({where}), all rows: missing required field(s) {missing}; "
                            f"expected fields {list(REQUIRED_FIELDS)} (+ optional "
                            f"{list(NEGATIVE_FIELDS + VIDEO_FIELDS)}), "
                            f"found {columns}", subset=name, field=missing[0])
        if self._num_negatives and not any(f in columns for f in NEGATIVE_FIELDS):
            raise DataError(f"subset {name!r} ({where}), all rows: use_hard_negatives is set but the subset has "
                            f"no {' / '.join(NEGATIVE_FIELDS)} field; found {columns}", subset=name,
                            field="neg_text", reason=MISSING_NEGATIVES)
        extra = [c for c in columns if c not in KNOWN_FIELDS]
        if extra:
            # Harmless: later MMEB variants add columns. Say so once rather than fail.
            logger.warning("subset %r (%s): ignoring unknown field(s) %s; expected %s", name, where, extra,
                           list(KNOWN_FIELDS))
        if len(table) == 0:
            raise DataError(f"subset {name!r} ({where}) has no rows", subset=name)

        n = len(table)
        source_rows = np.arange(n)
        if cfg.max_per_subset is not None and n > cfg.max_per_subset:
            if cfg.cap_mode == "first":
                source_rows = source_rows[:cfg.max_per_subset]
            else:
                # Seeded per subset name, so the choice does not depend on the subset list order.
                rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode("utf-8"))])
                source_rows = np.sort(rng.choice(n, size=cfg.max_per_subset, replace=False))
            table = table.select(source_rows.tolist())

        wanted = [c for c in KNOWN_FIELDS if c in columns
                  and (self._num_negatives or c not in NEGATIVE_FIELDS + ("neg_video_path",))]
        values = {c: table[c][:] for c in wanted}  # decoded python values, column by column
        stat_cache: Dict[str, Optional[_RowProblem]] = {}
        kept: List[int] = []
        problems: List[DataError] = []
        counts: Counter = Counter()
        has_videos = False
        for i in range(len(table)):
            row = {c: values[c][i] for c in wanted}
            try:
                row_has_video = self._check_row(row, stat_cache)
            except _RowProblem as p:
                err = self._row_error(name, where, int(source_rows[i]), p)
                if not cfg.skip_bad_rows:
                    problems.append(err)
                    if len(problems) >= 5:
                        break
                    continue
                counts[p.reason] += 1
                if sum(counts.values()) <= _ROW_WARNINGS_PER_SUBSET:
                    logger.warning("skipping bad row: %s", err)
                continue
            kept.append(i)
            has_videos = has_videos or row_has_video
        if problems:
            rest = "".join(f"\n  also: {p}" for p in problems[1:])
            more = "\n  (checking stopped there)" if len(problems) >= 5 else ""
            raise DataError(f"{problems[0]}{rest}{more}\n(to skip bad rows, counted and logged: "
                            "data.skip_bad_rows=true on the command line or in the YAML config; "
                            "TrainDataConfig(skip_bad_rows=True) in Python)",
                            reason=problems[0].reason, subset=name, row=problems[0].row, field=problems[0].field)
        if counts:
            skipped = sum(counts.values())
            logger.warning("subset %r: skipped %d of %d rows: %s", name, skipped, len(table), dict(counts))
            self.skip_counts.update(counts)
            self.subset_skip_counts[name] = counts
            if not kept or skipped > cfg.max_skip_fraction * len(table):
                raise DataError(f"subset {name!r} ({where}): {skipped} of {len(table)} rows are bad "
                                f"({dict(counts)}), more than max_skip_fraction={cfg.max_skip_fraction}; "
                                f"check image_root ({self.image_root}) and the data", subset=name)
        return _Subset(name, where, table, source_rows, np.asarray(kept, dtype=np.int64), has_videos)

    def _check_row(self, row: Mapping[str, Any], stat_cache: Dict[str, Optional[_RowProblem]]) -> bool:
        """Raise `_RowProblem` for a bad row; True when the row has a video."""
        sides = _parse_row(row, self._num_negatives)
        cfg = self.config
        fields = _media_fields(sides)
        for field_name, path, kind in fields:
            try:
                full = resolve_image_path(self.image_root, path)
                if cfg.check_image_files or cfg.verify_images_upfront:
                    if full not in stat_cache:
                        try:
                            if cfg.verify_images_upfront:
                                self._decode(full, kind)
                            elif kind == "video":
                                _check_video_source(full)
                            else:
                                _check_image_file(full)
                            stat_cache[full] = None
                        except _RowProblem as p:
                            stat_cache[full] = p
                    if stat_cache[full] is not None:
                        raise stat_cache[full]
            except _RowProblem as p:
                raise _RowProblem(p.reason, field_name, p.detail) from None
        return any(kind == "video" for _, _, kind in fields)

    def _decode(self, full: str, kind: str):
        cfg = self.config
        if kind == "video":
            return _decode_video(full, self.video_frames, self.video_max_side, cfg.max_image_pixels)
        return _decode_image(full, cfg.max_image_pixels, cfg.max_image_side)

    @staticmethod
    def _row_error(name: str, where: str, row: int, p: _RowProblem) -> DataError:
        return DataError(f"subset {name!r} ({where}), row {row}, field {p.field!r}: {p.detail}",
                         reason=p.reason, subset=name, row=row, field=p.field)

    # ---- access

    def __len__(self) -> int:
        return self._length

    @property
    def subsets(self) -> List[str]:
        return [s.name for s in self._subsets]

    def locate(self, index: int) -> Tuple[str, int]:
        """(subset, row in its source file) of a global index."""
        sub, k = self._position(index)
        return sub.name, int(sub.source_rows[sub.kept[k]])

    def _position(self, index: int) -> Tuple[_Subset, int]:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a dataset of {self._length} pairs")
        s = bisect.bisect_right(self._starts, index) - 1
        return self._subsets[s], index - self._starts[s]

    def __getitem__(self, index: int) -> Pair:
        sub, k = self._position(int(index))
        replaced: List[str] = []
        attempts = self.config.max_substitute_attempts if self.config.skip_bad_rows else 0
        for _ in range(attempts + 1):
            try:
                pair = self._load_pair(sub, k)
                pair.replaced = replaced
                return pair
            except DataError as err:
                if not self.config.skip_bad_rows:
                    raise
                # Counted through the pair (-> TrainBatch.skipped), not in self.skip_counts: in a
                # DataLoader worker this object is a copy that the main process never sees.
                replaced.append(err.reason or "unknown")
                k = (k + 1) % len(sub.kept)  # deterministic stand-in: next row of the same subset
                logger.warning("skipping bad row (replaced by the next row of the subset): %s", err)
        raise DataError(f"subset {sub.name!r} ({sub.where}): {len(replaced)} consecutive bad rows from global "
                        f"index {index} on ({dict(Counter(replaced))}); giving up (max_substitute_attempts="
                        f"{self.config.max_substitute_attempts}); check image_root ({self.image_root}) and the data",
                        subset=sub.name)

    def _load_pair(self, sub: _Subset, k: int) -> Pair:
        table_row = int(sub.kept[k])
        row_no = int(sub.source_rows[table_row])
        try:
            sides = _parse_row(sub.table[table_row], self._num_negatives)
            media: Dict[str, Any] = {}
            for field_name, path, kind in _media_fields(sides):
                try:
                    media[field_name] = self._decode(resolve_image_path(self.image_root, path), kind)
                except _RowProblem as p:
                    raise _RowProblem(p.reason, field_name, p.detail) from None
        except _RowProblem as p:
            raise self._row_error(sub.name, sub.where, row_no, p) from None

        def side(fields: _SideFields, image_field: str, video_field: str) -> Side:
            text, image_path, video_path = fields
            return Side(text=text, image_path=image_path or None, image=media.get(image_field),
                        video_path=video_path or None, video=media.get(video_field))

        return Pair(query=side(sides.query, "qry_image_path", "qry_video_path"),
                    target=side(sides.target, "pos_image_path", "pos_video_path"),
                    negatives=[side(n, f"neg_image_path[{i}]", f"neg_video_path[{i}]")
                               for i, n in zip(sides.negative_index, sides.negatives)],
                    subset=sub.name, row=row_no)


# --------------------------------------------------------------------------- sampler

RangesLike = Union[int, Mapping[str, Tuple[int, int]], Sequence[Tuple[int, int]]]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Per-rank index lists, one per optimizer step, from one shared global plan.

    ``sizes``: the dataset size, its subset ranges (name -> (start, end)) or the dataset.
    Every rank computes the same plan (seed, epoch): a sequence of global batches of
    ``global_batch_size`` indices; rank r takes the r-th contiguous slice. So all ranks
    get ``global_batch_size // world_size`` indices per step and the same number of
    steps, slices are disjoint within a step, and the plan does not depend on
    world_size (a run may resume on a different number of ranks).

    homogeneous=True draws every global batch from a single subset (VLM2Vec-V2): each
    subset is shuffled and cut into batches, then all batches are shuffled together.
    drop_last=True drops incomplete batches (per subset when homogeneous); False pads
    them by wrapping around the shuffled order (indices then repeat).

    Resume: ``state_dict()`` = {"epoch", "step"} (+ checks); after ``load_state_dict``
    the next iteration yields exactly the remaining batches of that epoch.
    """

    def __init__(self, sizes: RangesLike, global_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, homogeneous: bool = False, drop_last: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} is not a valid rank layout")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}: "
                             "every rank must hold the same number of samples")
        self.ranges = self._as_ranges(sizes)
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // world_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.homogeneous, self.drop_last = seed, homogeneous, drop_last
        self.num_samples = sum(e - s for s, e in self.ranges.values())
        self.epoch = 0
        self._resume_step = 0
        self._yielded = 0
        self._plan_cache: Optional[Tuple[int, List[np.ndarray]]] = None
        if homogeneous and drop_last:
            small = [n for n, (s, e) in self.ranges.items() if e - s < global_batch_size]
            if small:
                logger.warning("homogeneous batches: subset(s) %s have fewer than %d samples and are never drawn",
                               small, global_batch_size)
        self._num_steps = self._count_steps()
        if self._num_steps == 0:
            raise ValueError(f"no complete global batch of {global_batch_size} can be drawn from "
                             f"{self.num_samples} samples{' (per subset: homogeneous)' if homogeneous else ''}")

    @staticmethod
    def _as_ranges(sizes: RangesLike) -> Dict[str, Tuple[int, int]]:
        sizes = getattr(sizes, "subset_ranges", sizes)  # accept an MMEBTrainDataset too
        if isinstance(sizes, (int, np.integer)):
            ranges = {"all": (0, int(sizes))}
        elif isinstance(sizes, Mapping):
            ranges = {str(k): (int(v[0]), int(v[1])) for k, v in sizes.items()}
        else:
            ranges = {str(i): (int(v[0]), int(v[1])) for i, v in enumerate(sizes)}
        for name, (s, e) in ranges.items():
            if not 0 <= s <= e:
                raise ValueError(f"bad index range {name!r}: ({s}, {e})")
        return ranges

    def _count_steps(self) -> int:
        g = self.global_batch_size
        div = (lambda n: n // g) if self.drop_last else (lambda n: -(-n // g))
        if self.homogeneous:
            return sum(div(e - s) for s, e in self.ranges.values())
        return div(self.num_samples)

    def _cut(self, order: np.ndarray) -> List[np.ndarray]:
        g = self.global_batch_size
        if not self.drop_last and len(order) % g:
            order = np.resize(order, -(-len(order) // g) * g)  # wrap around to fill the last batch
        return [order[i:i + g] for i in range(0, len(order) - g + 1, g)]

    def _plan(self, epoch: int) -> List[np.ndarray]:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        if self.homogeneous:
            batches: List[np.ndarray] = []
            for s, e in self.ranges.values():
                batches.extend(self._cut(s + rng.permutation(e - s)))
            batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            everything = np.concatenate([np.arange(s, e) for s, e in self.ranges.values()])
            batches = self._cut(everything[rng.permutation(len(everything))])
        self._plan_cache = (epoch, batches)
        return batches

    def __len__(self) -> int:
        return self._num_steps

    def __iter__(self) -> Iterator[List[int]]:
        batches = self._plan(self.epoch)
        start, self._resume_step = self._resume_step, 0
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        self._yielded = start
        for b in range(start, len(batches)):
            self._yielded = b + 1
            yield batches[b][lo:hi].tolist()

    def global_batch(self, step: int, epoch: Optional[int] = None) -> List[int]:
        """All ranks' indices of one step (for checks and debugging)."""
        return self._plan(self.epoch if epoch is None else epoch)[step].tolist()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle. A resume point loaded for this same epoch is kept."""
        if epoch != self.epoch:
            self._resume_step = 0
        self.epoch = epoch

    def state_dict(self, consumed_steps: Optional[int] = None) -> Dict[str, int]:
        """{"epoch", "step"}: ``step`` = batches consumed in this epoch.

        Without ``consumed_steps`` it is the number of batches this sampler has yielded;
        behind a DataLoader with workers that runs ahead (prefetch), so pass the number
        of steps the training loop actually finished.
        """
        step = self._yielded if consumed_steps is None else int(consumed_steps)
        return {"epoch": self.epoch, "step": step, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "global_batch_size", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved sampler had {key}={state[key]}, this one has "
                                 f"{getattr(self, key)}; the remaining batches would differ")
        step = int(state["step"])
        if not 0 <= step <= self._num_steps:
            raise ValueError(f"cannot resume at step {step}: an epoch has {self._num_steps} steps")
        self.epoch = int(state["epoch"])
        self._resume_step = step
        self._yielded = step


# --------------------------------------------------------------------------- collator

Formatter = Callable[[List[Side], str], Dict[str, torch.Tensor]]


@dataclass
class TrainBatch:
    """One rank's share of a step, already cut into gradient-cache chunks.

    Chunk i of queries/targets covers pairs [i*c, (i+1)*c) (the last may be smaller).
    ``negative_chunks`` cover the hard negatives flattened pair by pair (pair0-neg0 ..
    pair0-neg{K-1}, pair1-neg0, ...). ``skipped`` counts, per reason, the bad rows that
    were replaced while building this batch.
    """
    query_chunks: List[Dict[str, torch.Tensor]]
    target_chunks: List[Dict[str, torch.Tensor]]
    negative_chunks: List[Dict[str, torch.Tensor]]
    num_pairs: int
    num_negatives_per_pair: int
    subsets: List[str]
    rows: List[int] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TrainBatch":
        def conv(chunks):
            return [{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in c.items()} for c in chunks]
        return TrainBatch(conv(self.query_chunks), conv(self.target_chunks), conv(self.negative_chunks),
                          self.num_pairs, self.num_negatives_per_pair, list(self.subsets), list(self.rows),
                          dict(self.skipped))

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainBatch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())


class PairCollator:
    """Turns a list of `Pair`s into a `TrainBatch`; picklable if ``formatter`` is.

    ``formatter(sides, role)`` (role "query" or "target"; negatives use "target") returns
    a dict of tensors for one chunk. Negatives are chunked with ``negative_chunk_size``
    (default: ``target_chunk_size``).
    """

    def __init__(self, formatter: Formatter, query_chunk_size: int, target_chunk_size: int,
                 negative_chunk_size: Optional[int] = None):
        negative_chunk_size = target_chunk_size if negative_chunk_size is None else negative_chunk_size
        for name, value in (("query_chunk_size", query_chunk_size), ("target_chunk_size", target_chunk_size),
                            ("negative_chunk_size", negative_chunk_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.formatter = formatter
        self.query_chunk_size = int(query_chunk_size)
        self.target_chunk_size = int(target_chunk_size)
        self.negative_chunk_size = int(negative_chunk_size)

    def _chunks(self, sides: List[Side], size: int, role: str) -> List[Dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(sides), size):
            features = self.formatter(sides[i:i + size], role)
            if not isinstance(features, Mapping):
                raise TypeError(f"formatter must return a dict of tensors, got {type(features).__name__}")
            out.append(dict(features))
        return out

    def __call__(self, pairs: Sequence[Pair]) -> TrainBatch:
        if not pairs:
            raise ValueError("PairCollator got an empty batch")
        if any(p is None for p in pairs):
            raise ValueError("PairCollator got None in the batch; MMEBTrainDataset replaces bad rows instead, "
                             "so that every rank keeps the same batch size")
        k = len(pairs[0].negatives)
        for p in pairs:
            if len(p.negatives) != k:
                raise DataError(f"pairs in one batch carry different numbers of hard negatives: subset "
                                f"{pairs[0].subset!r} row {pairs[0].row} has {k}, subset {p.subset!r} row {p.row} "
                                f"has {len(p.negatives)}", subset=p.subset, row=p.row, field="neg_text")
        skipped = Counter(reason for p in pairs for reason in p.replaced)
        return TrainBatch(
            query_chunks=self._chunks([p.query for p in pairs], self.query_chunk_size, "query"),
            target_chunks=self._chunks([p.target for p in pairs], self.target_chunk_size, "target"),
            negative_chunks=self._chunks([n for p in pairs for n in p.negatives], self.negative_chunk_size,
                                         "target"),
            num_pairs=len(pairs), num_negatives_per_pair=k, subsets=[p.subset for p in pairs],
            rows=[p.row for p in pairs], skipped=dict(skipped))
