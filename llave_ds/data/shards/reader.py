"""Shards -> samples: the source's row dicts as the folder layout yields them, with the bytes
of their images and videos.

    reader = ShardReader("https://host/data/")            # index.json and the shards there
    reader = ShardReader("https://host/train-{00000..00127}.tar", index="https://host/index.json")
    for sample in reader.iter_range(a, b):                # samples [a, b) of the global order
        sample.fields          # == row_files.read_rows(<its file>)[sample.row]
        sample.media[path]     # the bytes of the file the row names (a frame folder: [(name, bytes)])

Shards are streamed (``tarfile`` in stream mode over `streams.open_stream`: never a whole
shard in memory, never a seek). A slice of a shard that does not start at its first sample
streams past the samples before it without keeping them; the index says which shard and
offset sample i is (`ShardIndex.locate`, `ShardIndex.plan`), so asking for ``[a, b)`` opens
only the shards it needs.

Checks, each a `DataError` naming the shard (its location) and the sample's key:

* every member of a sample against the SHA-256 its JSON records (a corrupt member: reason
  ``unreadable_image`` / ``unreadable_video``), a member the JSON names but the shard lacks
  (``missing_image`` / ``missing_video``), a missing or invalid JSON (``bad_sample``);
  with ``skip_bad_samples`` these are skipped and counted per reason in ``skip_counts``
  (more than ``max_skip_fraction`` of one shard is still an error), as training's bad rows;
* a tar that breaks (bad header, truncated: the error names the last good key), or that holds
  fewer or more samples than the index says: always an error;
* a shard read whole: its SHA-256 and size against the index (``verify_checksums``), checked
  when its end is reached (the samples already yielded are not recalled); a mismatch is an
  error, unless damaged samples of that shard were found and skipped (then a warning).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, Iterator, Optional, Sequence, Tuple, Union

from llave_ds.data.errors import DataError
from llave_ds.data.shards.layout import SAMPLE_SUFFIX, ShardIndex, ShardSlice, split_member_name
from llave_ds.data.shards.streams import RetryPolicy, index_location, open_stream, read_bytes, shard_locations
from llave_ds.media.files import MISSING_IMAGE, MISSING_VIDEO, UNREADABLE_IMAGE, UNREADABLE_VIDEO

logger = logging.getLogger(__name__)

BAD_SAMPLE = "bad_sample"  # a sample without a readable JSON document (skip reason)
_WARNINGS_PER_SHARD = 10


@dataclass
class ShardSample:
    """One sample: where it is, the source row (``fields``) and its media by the row's paths."""
    key: str
    shard: str
    offset: int          # position in its shard
    index: int           # position in the global order
    subset: str
    file: str            # the source data file, relative to the source root
    row: int             # the row's position in that file
    fields: Dict[str, Any]
    media: Dict[str, Any] = field(default_factory=dict)  # path -> bytes; a frame folder: [(name, bytes)]


@dataclass
class BadSample:
    """In place of a damaged sample when the caller keeps positions (`read_slice(placeholders=True)`):
    training substitutes it, so that every lane keeps its length (`shards.train_stream`)."""
    key: str
    shard: str
    offset: int
    index: int
    error: DataError


class _SampleProblem(Exception):
    def __init__(self, reason: str, detail: str, field_name: Optional[str] = None):
        super().__init__(detail)
        self.reason, self.detail, self.field = reason, detail, field_name


class _Hashing(io.RawIOBase):
    """A read-through SHA-256 and byte count of a stream."""

    def __init__(self, stream: BinaryIO):
        super().__init__()
        self.stream, self.digest, self.count = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def load_index(source: Union[str, Sequence[str]], index: Union[None, str, ShardIndex] = None,
               retry: RetryPolicy = RetryPolicy()) -> ShardIndex:
    """The shard set's index: given, at the location ``index`` names, or beside the shards."""
    if isinstance(index, ShardIndex):
        return index
    where = index if index is not None else index_location(source)
    try:
        text = read_bytes(where, retry).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"shard index {where}: not UTF-8 text ({exc})", file=where) from None
    return ShardIndex.loads(text, where)


class ShardReader:
    """The samples of a shard set (``source``: a directory or URL prefix, a brace pattern or a
    list; ``index``: a `ShardIndex` or its location, by default ``index.json`` beside them)."""

    def __init__(self, source: Union[str, Sequence[str]], index: Union[None, str, ShardIndex] = None, *,
                 retry: RetryPolicy = RetryPolicy(), skip_bad_samples: bool = False,
                 max_skip_fraction: float = 0.1, verify_checksums: bool = True):
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.retry = retry
        self.index = load_index(source, index, retry)
        self.locations = shard_locations(source, [s.name for s in self.index.shards])
        self.skip_bad_samples = skip_bad_samples
        self.max_skip_fraction = max_skip_fraction
        self.verify_checksums = verify_checksums
        self.skip_counts: Counter = Counter()

    def __len__(self) -> int:
        return self.index.num_samples

    def __iter__(self) -> Iterator[ShardSample]:
        return self.iter_range(0, self.index.num_samples)

    def iter_range(self, start: int, end: int) -> Iterator[ShardSample]:
        """Samples ``[start, end)`` of the global order (bad ones skipped when skipping)."""
        for part in self.index.plan(start, end):
            yield from self.read_slice(part)

    def iter_shards(self, positions: Sequence[int]) -> Iterator[ShardSample]:
        """Whole shards, in the order given (a rank's or a worker's list)."""
        for position in positions:
            info = self.index.shards[position]
            yield from self.read_slice(ShardSlice(position, info.name, 0, info.num_samples,
                                                  self.index.starts[position]))

    def read_slice(self, part: ShardSlice, placeholders: bool = False) -> Iterator[Union[ShardSample, BadSample]]:
        """The samples of one slice, in order. ``placeholders``: a damaged sample yields a
        `BadSample` (neither raised nor skipped nor counted here: the caller decides)."""
        info = self.index.shards[part.position]
        location = self.locations[part.position]
        whole = part.start == 0 and part.end == info.num_samples
        skipped = 0
        offset, last_key = -1, None
        stream = open_stream(location, self.retry)
        try:
            hashing = _Hashing(stream)
            try:
                tar = tarfile.open(fileobj=hashing, mode="r|")
                # _samples asks while reading a key's first member, after the previous sample was
                # counted: offset + 1 is that key's offset.
                for key, members in _samples(tar, lambda k: offset + 1 < part.start):
                    offset += 1
                    last_key = key
                    if offset < part.start:
                        continue
                    if offset >= part.end:
                        break
                    try:
                        yield self._sample(part, info.name, offset, key, members)
                    except _SampleProblem as p:
                        err = DataError(f"shard {info.name} ({location}), sample {key}: {p.detail}", reason=p.reason,
                                        file=location, field=p.field)
                        if placeholders:
                            skipped += 1
                            yield BadSample(key, info.name, offset, part.first + offset - part.start, err)
                            continue
                        if not self.skip_bad_samples:
                            raise err from None
                        skipped += 1
                        self.skip_counts[p.reason] += 1
                        if skipped <= _WARNINGS_PER_SHARD:
                            logger.warning("skipping bad sample: %s", err)
                        if skipped > self.max_skip_fraction * info.num_samples:
                            raise DataError(f"shard {info.name} ({location}): {skipped} bad samples of "
                                            f"{info.num_samples}, more than max_skip_fraction="
                                            f"{self.max_skip_fraction}; the shard is damaged", file=location) from None
                if whole:
                    hashing.drain()
            except (tarfile.TarError, EOFError, OSError) as exc:
                after = f"after sample {last_key}" if last_key is not None else "at its start"
                raise DataError(f"shard {info.name} ({location}): the tar is corrupt or truncated {after} "
                                f"({type(exc).__name__}: {exc})", file=location) from None
        finally:
            stream.close()
        if offset + 1 < part.end:
            after = f"after sample {last_key}" if last_key is not None else "before its first sample"
            raise DataError(f"shard {info.name} ({location}): it ends {after}, at {offset + 1} of the index's "
                            f"{info.num_samples} samples (corrupt or truncated, or not the shard the index "
                            "describes)", file=location)
        if whole:
            if offset + 1 != info.num_samples:
                raise DataError(f"shard {info.name} ({location}): {offset + 1} samples, the index says "
                                f"{info.num_samples}", file=location)
            if self.verify_checksums and (hashing.count != info.bytes or hashing.digest.hexdigest() != info.sha256):
                if skipped:  # the damage was found sample by sample, and skipped as asked
                    logger.warning("shard %s (%s): its SHA-256 is not the index's; its %d damaged sample(s) were "
                                   "skipped", info.name, location, skipped)
                    return
                raise DataError(f"shard {info.name} ({location}): {hashing.count} bytes with SHA-256 "
                                f"{hashing.digest.hexdigest()[:16]}..., the index says {info.bytes} bytes, "
                                f"{info.sha256[:16]}... (the shard changed after the index was written)",
                                file=location)

    def _sample(self, part: ShardSlice, shard: str, offset: int, key: str, members: Dict[str, bytes]) -> ShardSample:
        raw = members.get(SAMPLE_SUFFIX)
        if raw is None:
            raise _SampleProblem(BAD_SAMPLE, f"no {key}.{SAMPLE_SUFFIX} member (members: {sorted(members)})")
        try:
            doc = json.loads(raw.decode("utf-8"))
            fields, media = doc["fields"], doc["media"]
            if not isinstance(fields, dict) or not isinstance(media, list):
                raise TypeError("'fields' must be an object and 'media' a list")
            subset, file, row = str(doc["subset"]), str(doc["file"]), int(doc["row"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise _SampleProblem(BAD_SAMPLE, f"{key}.{SAMPLE_SUFFIX} is not a sample document "
                                             f"({type(exc).__name__}: {exc})") from None
        out: Dict[str, Any] = {}
        for entry in media:
            out[entry["path"]] = self._media(key, entry, members)
        return ShardSample(key=key, shard=shard, offset=offset, index=part.first + offset - part.start,
                           subset=subset, file=file, row=row, fields=fields, media=out)

    @staticmethod
    def _media(key: str, entry: Dict[str, Any], members: Dict[str, bytes]):
        video = entry.get("kind") != "image"
        datas = []
        for suffix, digest in zip(entry["members"], entry["sha256"]):
            data = members.get(suffix)
            if data is None:
                raise _SampleProblem(MISSING_VIDEO if video else MISSING_IMAGE,
                                     f"field {entry['field']!r}: member {key}.{suffix} ({entry['path']}) is missing",
                                     entry["field"])
            if hashlib.sha256(data).hexdigest() != digest:
                raise _SampleProblem(UNREADABLE_VIDEO if video else UNREADABLE_IMAGE,
                                     f"field {entry['field']!r}: member {key}.{suffix} ({entry['path']}) is corrupt "
                                     "(its SHA-256 is not the one the sample records)", entry["field"])
            datas.append(data)
        if entry.get("kind") == "frames":
            return list(zip(entry["frames"], datas))
        return datas[0]


def _samples(tar: tarfile.TarFile, skipping) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, {suffix: bytes}) of consecutive members sharing a key; while ``skipping(key)``
    holds, members are passed over without being read."""
    key: Optional[str] = None
    members: Dict[str, bytes] = {}
    for member in tar:
        if not member.isfile():
            continue
        k, suffix = split_member_name(member.name)
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        if not skipping(k):
            members[suffix] = tar.extractfile(member).read()
        tar.members = []  # tarfile keeps every header it has read; a stream needs none of them
    if key is not None:
        yield key, members

