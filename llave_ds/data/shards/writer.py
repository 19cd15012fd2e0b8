"""Any local training source -> tar shards of a target size and their ``index.json``.

The rows are read as the folder layout holds them (`llave_ds.data.row_files`: MMEB-train
parquet / jsonl, LLaVE's JSON arrays, the synthetic task, ``llave-ds mine``'s output), in
subset order, file order, row order: that is the global order of the shards. Each row is
checked by the training reader's rule (`train_rows.parse_row`, every negative kept), each
image or video path is resolved under the image root (`media.files.resolve_under_root`:
paths leaving it are refused) and stat-checked, and the files' bytes go into the sample as
they are (no re-encoding; a frame folder as one member per frame). A bad row is a
`DataError` naming subset, file, row and field, or, with ``skip_bad_rows``, a counted, logged
skip (more than ``max_skip_fraction`` of a subset bad is still an error), as in training.

Shards are written under a temporary name and renamed when complete; ``index.json`` is
written last, atomically, so a directory with an index holds complete shards. Rewriting an
earlier shard set first removes its index, and its shards that the new set does not reuse
are deleted at the end. Same input, same bytes: members carry no time, owner or mode of
their own.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pyarrow.parquet as pq

from llave_ds.data.errors import DataError
from llave_ds.data.row_files import RowFile, read_rows, row_files
from llave_ds.data.shards.layout import (DEFAULT_PREFIX, INDEX_NAME, SAMPLE_SUFFIX, SHARD_NAME, ShardIndex, ShardInfo,
                                         media_slot, member_suffix, sample_key, shard_name)
from llave_ds.data.train_rows import WRONG_TYPE, RowProblem, media_fields, parse_row
from llave_ds.files import atomic_write_text, fsync_dir, temporary_sibling
from llave_ds.formats import REQUIRED_TRAIN_FIELDS
from llave_ds.media.files import (MISSING_IMAGE, MISSING_VIDEO, NO_FRAMES, MediaError, check_image_file,
                                  check_video_source, resolve_under_root)
from llave_ds.media.video import list_frame_files

logger = logging.getLogger(__name__)

_ROW_WARNINGS_PER_SUBSET = 10
_BLOCK = 512


@dataclass
class _Sample:
    """One row ready for a shard: its JSON document and (suffix, bytes) members."""
    doc: Dict[str, Any]
    members: List[Tuple[str, bytes]]

    def tar_bytes(self, json_bytes: bytes) -> int:
        return sum(_BLOCK + -(-len(b) // _BLOCK) * _BLOCK for b in [json_bytes] + [m for _, m in self.members])


class _DigestWriter:
    """The shard's file as tarfile writes it, hashed on the way (no second read to checksum it)."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()


class _ShardFile:
    """One shard being written: a tar under a temporary name, renamed by `close`."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = temporary_sibling(path)
        self.file = open(self.tmp, "wb")
        self.hashed = _DigestWriter(self.file)
        self.tar = tarfile.open(fileobj=self.hashed, mode="w", format=tarfile.PAX_FORMAT)
        self.num_samples = 0

    def size(self) -> int:
        return self.file.tell()

    def add(self, key: str, suffix: str, data: bytes) -> None:
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))
        self.tar.members = []  # tarfile keeps every header it wrote; a shard of many samples needs none

    def close(self) -> ShardInfo:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return ShardInfo(self.path.name, self.num_samples, self.path.stat().st_size, self.hashed.digest.hexdigest())

    def abort(self) -> None:
        try:
            self.tar.close()
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def count_rows(files: Sequence[RowFile]) -> int:
    """Rows in ``files`` (parquet: from the metadata; jsonl: non-empty lines; JSON arrays: read)."""
    total = 0
    for f in files:
        if f.format == "parquet":
            try:
                total += pq.ParquetFile(f.path).metadata.num_rows
                continue
            except Exception:  # read_rows will report it with the file's name
                continue
        if f.format == "jsonl":
            with open(f.path, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
            continue
        total += len(read_rows(f))
    return total


def check_output_dir(out: str, source: str) -> Path:
    """``out`` as a directory to write shards into: not the source, and empty or an earlier
    shard set (holding ``index.json``)."""
    path = Path(out).expanduser()
    if path.resolve() == Path(source).expanduser().resolve():
        raise DataError(f"--out {out!r} is the source directory; the shards go into a directory of their own")
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {out!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / INDEX_NAME).is_file():
        raise DataError(f"--out {out!r} is not empty and holds no shard set ({INDEX_NAME}); "
                        "give an empty or new directory")
    return path


def write_shards(source: str, out: str, *, image_root: Optional[str] = None,
                 subsets: Optional[Sequence[str]] = None, split: str = "original",
                 shard_size: int = 256 * 1000 ** 2, prefix: str = DEFAULT_PREFIX, skip_bad_rows: bool = False,
                 max_skip_fraction: float = 0.1, files: Optional[Sequence[RowFile]] = None,
                 progress: Optional[Callable[[int], None]] = None) -> ShardIndex:
    """Write every row of ``source`` (``subsets``, ``split``: as `row_files.row_files`) into
    shards of about ``shard_size`` bytes under ``out``; return the index written there.
    ``progress(n)`` is called with the rows handled since its last call."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 byte, got {shard_size}")
    if not SHARD_NAME.match(shard_name(prefix, 0)):
        raise ValueError(f"shard prefix {prefix!r}: letters, digits, '_' and '-' only")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    out_dir = check_output_dir(out, source)
    files = list(files) if files is not None else row_files(source, subsets, split)
    root = os.path.abspath(os.path.expanduser(image_root if image_root is not None else source))
    if not os.path.isdir(root):
        raise DataError(f"image root {root!r} does not exist (--image-root)")
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = _forget_earlier_set(out_dir)

    shards: List[ShardInfo] = []
    subset_info: Dict[str, Dict[str, Any]] = {}
    current: Optional[_ShardFile] = None
    total = 0
    try:
        for name in dict.fromkeys(f.subset for f in files):
            start, counts, rows_seen, videos = total, Counter(), 0, 0
            for f in (f for f in files if f.subset == name):
                rows = read_rows(f)
                _check_fields(f, rows)
                for i, row in enumerate(rows):
                    rows_seen += 1
                    try:
                        sample = _build_sample(f, i, row, root)
                    except RowProblem as p:
                        err = DataError(f"subset {name!r} ({f.path}), row {i}, field {p.field!r}: {p.detail}",
                                        reason=p.reason, subset=name, row=i, field=p.field, file=str(f.path))
                        if not skip_bad_rows:
                            raise DataError(f"{err}\n(to skip bad rows, counted and logged: --skip-bad-rows)",
                                            reason=p.reason, subset=name, row=i, field=p.field,
                                            file=str(f.path)) from None
                        counts[p.reason] += 1
                        if sum(counts.values()) <= _ROW_WARNINGS_PER_SUBSET:
                            logger.warning("skipping bad row: %s", err)
                        if progress:
                            progress(1)
                        continue
                    key = sample_key(total)
                    doc = json.dumps(sample.doc, ensure_ascii=False, sort_keys=True).encode("utf-8")
                    if current is not None and current.num_samples and \
                            current.size() + sample.tar_bytes(doc) > shard_size:
                        shards.append(current.close())
                        current = None
                    if current is None:
                        current = _ShardFile(out_dir / shard_name(prefix, len(shards)))
                    current.add(key, SAMPLE_SUFFIX, doc)
                    for suffix, data in sample.members:
                        current.add(key, suffix, data)
                    current.num_samples += 1
                    total += 1
                    videos += any(m["kind"] != "image" for m in sample.doc["media"])
                    if progress:
                        progress(1)
            skipped = sum(counts.values())
            if skipped:
                logger.warning("subset %r: skipped %d of %d rows: %s", name, skipped, rows_seen, dict(counts))
                if total == start or skipped > max_skip_fraction * rows_seen:
                    raise DataError(f"subset {name!r}: {skipped} of {rows_seen} rows are bad ({dict(counts)}), more "
                                    f"than max_skip_fraction={max_skip_fraction}; check the image root ({root}) "
                                    "and the data", subset=name)
            subset_info[name] = {"start": start, "end": total, "rows": rows_seen, "skipped": dict(counts),
                                 "videos": videos,
                                 "files": [str(f.relative) for f in files if f.subset == name]}
        if current is not None:
            shards.append(current.close())
            current = None
    except BaseException:
        if current is not None:
            current.abort()
        raise
    if not shards:
        raise DataError(f"no rows to write from {source!r}")
    index = ShardIndex(shards, subset_info, {"data": os.path.abspath(os.path.expanduser(source)), "image_root": root,
                                             "split": split, "shard_size": shard_size, "prefix": prefix})
    atomic_write_text(out_dir / INDEX_NAME, index.dumps())
    for name in earlier - {s.name for s in shards}:
        (out_dir / name).unlink(missing_ok=True)
    fsync_dir(out_dir)
    return index


def _forget_earlier_set(out_dir: Path) -> set:
    """Remove an earlier set's index (first: a half-rewritten set must not look complete) and
    return the names of its shards."""
    path = out_dir / INDEX_NAME
    if not path.is_file():
        return set()
    try:
        names = {s["name"] for s in json.loads(path.read_text(encoding="utf-8")).get("shards", [])}
    except (ValueError, TypeError, KeyError, AttributeError):
        names = set()
    path.unlink()
    fsync_dir(out_dir)
    return {n for n in names if isinstance(n, str) and SHARD_NAME.match(n)}


def _check_fields(f: RowFile, rows: List[Dict[str, Any]]) -> None:
    found = set().union(*(row.keys() for row in rows)) if rows else set()
    missing = [name for name in REQUIRED_TRAIN_FIELDS if name not in found]
    if rows and missing:
        raise DataError(f"subset {f.subset!r} ({f.path}), all rows: missing required field(s) {missing}; "
                        f"found {sorted(found)}", subset=f.subset, field=missing[0], file=str(f.path))


def _build_sample(f: RowFile, row_no: int, row: Dict[str, Any], root: str) -> _Sample:
    """The row's sample, or a `RowProblem` (bad fields, a path outside the root, a missing or
    empty file)."""
    sides = parse_row(row, 0, every_negative=True)
    for name, value in row.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise RowProblem(WRONG_TYPE, name, f"a {type(value).__name__} value cannot be written as JSON") from None
    media, members = [], []
    for field_name, path, kind in media_fields(sides):
        slot = media_slot(field_name)
        try:
            full = resolve_under_root(root, path)
            if kind == "video" and check_video_source(full) == "frames":
                frames = list_frame_files(full)
                if not frames:
                    raise MediaError(f"frame folder holds no frame images: {full}", path=full, reason=NO_FRAMES)
                datas = [_read(frame, MISSING_VIDEO) for frame in frames]
                suffixes = [member_suffix(slot, frame, k) for k, frame in enumerate(frames)]
                entry = {"frames": [os.path.basename(frame) for frame in frames]}
                kind_written = "frames"
            else:
                if kind == "image":
                    check_image_file(full)
                datas = [_read(full, MISSING_VIDEO if kind == "video" else MISSING_IMAGE)]
                suffixes = [member_suffix(slot, path)]
                entry, kind_written = {}, kind
        except MediaError as exc:
            raise RowProblem(exc.reason or MISSING_IMAGE, field_name, str(exc)) from None
        entry.update({"field": field_name, "path": path, "kind": kind_written, "members": suffixes,
                      "sha256": [hashlib.sha256(d).hexdigest() for d in datas]})
        media.append(entry)
        members += list(zip(suffixes, datas))
    doc = {"subset": f.subset, "file": str(f.relative), "row": row_no, "fields": row, "media": media}
    return _Sample(doc, members)


def _read(path: str, reason: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise MediaError(f"cannot read {path}: {exc.strerror or exc}", path=path, reason=reason) from None
