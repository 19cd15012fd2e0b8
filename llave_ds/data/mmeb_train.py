"""MMEB-train data: rows on disk or on the hub -> `Pair`s of `Side`s with their media loaded.

This module knows nothing of models or training. It reads MMEB-train rows (``qry``,
``qry_image_path``, ``pos_text``, ``pos_image_path``, optional ``neg_text`` /
``neg_image_path``, and the video fields ``qry_video_path`` / ``pos_video_path`` /
``neg_video_path``; `llave_ds.formats`), checks them, and loads images and decodes videos
lazily (in DataLoader workers, with `llave_ds.media`; how many frames per video is the
caller's to say, from the processing config). Where the files are is
`llave_ds.data.mmeb_files`; batching and chunking is `llave_ds.data.batching`.

Bad input never passes silently: it raises `DataError` naming subset, source, row and
field, or, with ``skip_bad_rows=True``, is skipped, counted per reason and logged on the
``llave_ds.data.mmeb_train`` logger. See docs/DATA.md for the policy and why it keeps every rank's
batch the same size.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from llave_ds.config import check_choices
from llave_ds.data.errors import DataError
from llave_ds.data.mmeb_files import (JSON_ARRAY_EXTENSION, find_subset_files, is_local_source, list_subsets,
                                      official_train_subsets, unknown_subsets_message)
from llave_ds.data.train_rows import MISSING_NEGATIVES, RowProblem, RowSides, SideFields, media_fields, parse_row
from llave_ds.formats import NEGATIVE_FIELDS, REQUIRED_TRAIN_FIELDS, TRAIN_FIELDS, VIDEO_FIELDS
from llave_ds.media.files import (DEFAULT_MAX_PIXELS, UNREADABLE_IMAGE, MediaError, check_image_file,
                                  check_video_source, resolve_under_root)
from llave_ds.media.image import load_image
from llave_ds.media.side import Side
from llave_ds.media.video import DEFAULT_VIDEO_FRAMES, read_video

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = REQUIRED_TRAIN_FIELDS
KNOWN_FIELDS = TRAIN_FIELDS
KNOWN_SPLITS = ("original", "diverse_instruction")
_ROW_WARNINGS_PER_SUBSET = 10


# --------------------------------------------------------------------------- records

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

    source:   a local directory (one file or directory per subset) or a hub dataset id; with
              source_type "shards", a shard set (`llave-ds shard`): a directory, a URL prefix,
              a brace pattern or an fsspec URL (docs/DATA.md, "Shards").
    source_type: "auto" (a directory, or anything that looks like a path, is local),
              "local", "hub" or "shards".
    shard_index / shard_lanes / shard_retries / shard_timeout_s: shards only: where
              index.json is (default: beside the shards); the lanes a global batch is drawn
              from (0: the largest divisor of global_batch_size that is at most the number of
              shards; a run may resume on any rank count that divides it); how often a shard
              fetch is tried and how long each connect or read may take.
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
    source_type: Literal["auto", "local", "hub", "shards"] = "auto"
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
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_image_side: Optional[int] = None
    max_substitute_attempts: int = 16
    cache_dir: Optional[str] = None
    homogeneous_batches: bool = False
    shard_index: Optional[str] = None
    shard_lanes: int = 0
    shard_retries: int = 5
    shard_timeout_s: float = 60.0

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
        if self.shard_lanes < 0 or self.shard_retries < 1 or self.shard_timeout_s <= 0:
            raise ValueError("TrainDataConfig: shard_lanes must be >= 0, shard_retries >= 1 and shard_timeout_s > 0, "
                             f"got {self.shard_lanes}, {self.shard_retries}, {self.shard_timeout_s}")
        if self.source_type == "shards":
            # A shard set is fixed when it is made: choose subsets and caps with `llave-ds shard`.
            for name, value, default in (("subsets", self.subsets, None), ("max_per_subset", self.max_per_subset, None),
                                         ("homogeneous_batches", self.homogeneous_batches, False)):
                if value != default:
                    raise ValueError(f"TrainDataConfig.{name}={value!r} does not apply to source_type=shards: a shard "
                                     "set is read whole, in lanes (choose subsets when making it: llave-ds shard "
                                     "--subsets)")
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
        return self.source_type != "shards" and is_local_source(self.source, self.source_type)


# --------------------------------------------------------------------------- sources

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

    ``video_frames`` / ``video_max_side``: how videos are decoded (`llave_ds.media.video.read_video`:
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
            available = list_subsets(source, json_arrays=True)
            if names is None:
                names = default_train_subsets(available, source)
            unknown = [n for n in names if n not in available]
            if unknown:
                raise DataError(unknown_subsets_message(unknown, available, source), subset=unknown[0])
        elif names is None:
            names = default_train_subsets(_hub_subsets(source), source)
        if not names:
            raise DataError(f"no subsets found in {source!r}")

        self.skip_counts: Counter = Counter()  # rows dropped at load time, per reason
        self.subset_skip_counts: Dict[str, Counter] = {}
        self._subsets: List[_Subset] = []
        for name in names:
            if local:
                files = find_subset_files(source, name, config.split, json_arrays=True, known_splits=KNOWN_SPLITS)
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
        stat_cache: Dict[str, Optional[MediaError]] = {}
        kept: List[int] = []
        problems: List[DataError] = []
        counts: Counter = Counter()
        has_videos = False
        for i in range(len(table)):
            row = {c: values[c][i] for c in wanted}
            try:
                row_has_video = self._check_row(row, stat_cache)
            except RowProblem as p:
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

    def _check_row(self, row: Mapping[str, Any], stat_cache: Dict[str, Optional[MediaError]]) -> bool:
        """Raise `RowProblem` for a bad row; True when the row has a video."""
        sides = parse_row(row, self._num_negatives)
        cfg = self.config
        fields = media_fields(sides)
        for field_name, path, kind in fields:
            try:
                full = resolve_under_root(self.image_root, path)
                if cfg.check_image_files or cfg.verify_images_upfront:
                    if full not in stat_cache:
                        try:
                            if cfg.verify_images_upfront:
                                self._decode(full, kind)
                            elif kind == "video":
                                check_video_source(full)
                            else:
                                check_image_file(full)
                            stat_cache[full] = None
                        except MediaError as exc:
                            stat_cache[full] = exc
                    if stat_cache[full] is not None:
                        raise stat_cache[full]
            except MediaError as exc:
                raise RowProblem(exc.reason or UNREADABLE_IMAGE, field_name, str(exc)) from None
        return any(kind == "video" for _, _, kind in fields)

    def _decode(self, full: str, kind: str):
        """An image (RGB) or a video clip (`read_video` with the run's frame rule), or a MediaError."""
        cfg = self.config
        if kind == "video":
            return read_video(full, self.video_frames, max_side=self.video_max_side, max_pixels=cfg.max_image_pixels)
        return load_image(full, max_pixels=cfg.max_image_pixels, max_side=cfg.max_image_side)

    @staticmethod
    def _row_error(name: str, where: str, row: int, p: RowProblem) -> DataError:
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
            sides = parse_row(sub.table[table_row], self._num_negatives)
            media: Dict[str, Any] = {}
            for field_name, path, kind in media_fields(sides):
                try:
                    media[field_name] = self._decode(resolve_under_root(self.image_root, path), kind)
                except MediaError as exc:
                    raise RowProblem(exc.reason or UNREADABLE_IMAGE, field_name, str(exc)) from None
        except RowProblem as p:
            raise self._row_error(sub.name, sub.where, row_no, p) from None
        return pair_from_row(sides, media, sub.name, row_no)


def pair_from_row(sides: RowSides, media: Mapping[str, Any], subset: str, row: int) -> Pair:
    """A `Pair` from a row's parsed sides and its decoded media by field (``qry_image_path``,
    ``neg_video_path[1]``, ...: `media_fields`' names); shared by the folder and shard readers."""
    def side(fields: SideFields, image_field: str, video_field: str) -> Side:
        text, image_path, video_path = fields
        return Side(text=text, image_path=image_path or None, image=media.get(image_field),
                    video_path=video_path or None, video=media.get(video_field))

    return Pair(query=side(sides.query, "qry_image_path", "qry_video_path"),
                target=side(sides.target, "pos_image_path", "pos_video_path"),
                negatives=[side(n, f"neg_image_path[{i}]", f"neg_video_path[{i}]")
                           for i, n in zip(sides.negative_index, sides.negatives)],
                subset=subset, row=row)
