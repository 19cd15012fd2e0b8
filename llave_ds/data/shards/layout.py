"""What a shard set is: tar shards in the WebDataset layout and the ``index.json`` beside them.

A shard ``<prefix>-NNNNN.tar`` holds samples one after another; a sample is the members
whose names share a key (the WebDataset rule: the key is the member name up to its first dot):

    0000000017.json          {"subset", "file", "row", "fields", "media"}
    0000000017.qry.png       the query's image, the original file's bytes
    0000000017.pos.jpg       the positive's image
    0000000017.neg1.mp4      negative 1's video (its index in the row's negative lists)
    0000000017.qry.f00003.png  frame 3 of a frame-folder video (``kind: frames``)

``fields`` is the source row exactly as the folder layout reads it (`row_files.read_rows`:
every field, paths as written, relative to the image root); ``media`` lists each image or
video the row names: ``field`` (``qry_image_path``, ``neg_image_path[1]``, ... as
`train_rows.media_fields` names them), ``path`` (the row's value), ``kind`` (image, video,
frames), ``members`` (member suffixes), ``sha256`` (of each member) and, for frames, the
frame file names. The key is the sample's position in the global order (all shards laid
end to end), zero-padded to 10 digits.

``index.json`` (written last, atomically) names the format and version, every shard in
order with its sample count, bytes and SHA-256, the total, and each subset's contiguous
range of the global order with the rows skipped as bad. `ShardIndex.locate` maps a global
sample index to (shard, offset) and `ShardIndex.plan` cuts ``[a, b)`` into per-shard slices,
from the index alone.
"""
from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from llave_ds.data.errors import DataError

FORMAT = "llave-ds-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
DEFAULT_PREFIX = "train"
KEY_DIGITS = 10
SAMPLE_SUFFIX = "json"
SHARD_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_][A-Za-z0-9_-]*)-(?P<number>\d{5,})\.tar$")
_EXTENSION = re.compile(r"^[a-z0-9]{1,10}$")
_NEGATIVE_FIELD = re.compile(r"^neg_(image|video)_path\[(\d+)\]$")


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:05d}.tar"


def sample_key(global_index: int) -> str:
    return f"{global_index:0{KEY_DIGITS}d}"


def split_member_name(name: str) -> Tuple[str, str]:
    """(key, suffix) of a tar member name: the key runs to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    key, dot, suffix = base.partition(".")
    return (f"{head}/{key}" if head else key), suffix


def media_slot(field_name: str) -> str:
    """The member name part of a media field: ``qry``, ``pos``, ``neg<i>``."""
    if field_name.startswith("qry_"):
        return "qry"
    if field_name.startswith("pos_"):
        return "pos"
    match = _NEGATIVE_FIELD.match(field_name)
    if match:
        return f"neg{match.group(2)}"
    raise ValueError(f"not a media field: {field_name!r}")


def member_suffix(slot: str, path: str, frame: Optional[int] = None) -> str:
    """``qry.png`` for a file, ``qry.f00003.png`` for frame 3 of a folder: the original
    file's extension (lower case; ``bin`` when it has none a WebDataset reader could take)."""
    ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    ext = ext if _EXTENSION.match(ext) else "bin"
    return f"{slot}.{ext}" if frame is None else f"{slot}.f{frame:05d}.{ext}"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSlice:
    """Samples ``[start, end)`` of shard ``position`` (its offsets inside the shard); the
    first of them is sample ``first`` of the global order."""
    position: int
    name: str
    start: int
    end: int
    first: int

    @property
    def whole(self) -> bool:
        return self.start == 0


@dataclass
class ShardIndex:
    """``index.json``: the shards in order, their counts and checksums, the subsets' ranges."""
    shards: List[ShardInfo]
    subsets: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.starts: List[int] = []
        total = 0
        for info in self.shards:
            self.starts.append(total)
            total += info.num_samples
        self.num_samples = total

    # ---- the global order

    def locate(self, index: int) -> Tuple[int, int]:
        """(shard position, offset in that shard) of sample ``index`` of the global order."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for a shard set of {self.num_samples} samples")
        position = bisect.bisect_right(self.starts, index) - 1
        while self.shards[position].num_samples == 0:  # an empty shard shares its start with the next
            position += 1
        return position, index - self.starts[position]

    def plan(self, start: int, end: int) -> List[ShardSlice]:
        """Samples ``[start, end)`` of the global order as per-shard slices, in order."""
        if not 0 <= start <= end <= self.num_samples:
            raise IndexError(f"samples [{start}, {end}) out of range for a shard set of {self.num_samples} samples")
        out = []
        position = self.locate(start)[0] if start < end else len(self.shards)
        while position < len(self.shards) and self.starts[position] < end:
            first = self.starts[position]
            lo, hi = max(start, first) - first, min(end, first + self.shards[position].num_samples) - first
            if hi > lo:
                out.append(ShardSlice(position, self.shards[position].name, lo, hi, first + lo))
            position += 1
        return out

    def subset_of(self, index: int) -> str:
        for name, info in self.subsets.items():
            if info["start"] <= index < info["end"]:
                return name
        raise IndexError(f"sample {index} is in no subset of the index")

    # ---- on disk

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "num_samples": self.num_samples,
                "num_shards": len(self.shards),
                "shards": [{"name": s.name, "num_samples": s.num_samples, "bytes": s.bytes, "sha256": s.sha256}
                           for s in self.shards],
                "subsets": self.subsets, "source": self.source}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def loads(cls, text: str, where: str) -> "ShardIndex":
        """Parse and check ``index.json``'s text; a DataError names ``where`` and what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"shard index {where}: invalid JSON at line {exc.lineno}, column {exc.colno} "
                            f"({exc.msg})", file=where) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"shard index {where}: not a llave-ds shard index (format {FORMAT!r} expected)",
                            file=where)
        if data.get("version") != FORMAT_VERSION:
            raise DataError(f"shard index {where}: format version {data.get('version')!r}; this llave-ds reads "
                            f"version {FORMAT_VERSION} (re-make the shards with `llave-ds shard`)", file=where)
        try:
            shards = [ShardInfo(str(s["name"]), int(s["num_samples"]), int(s["bytes"]), str(s["sha256"]))
                      for s in data["shards"]]
            index = cls(shards, dict(data.get("subsets") or {}), dict(data.get("source") or {}), FORMAT_VERSION)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"shard index {where}: malformed shard list ({type(exc).__name__}: {exc})",
                            file=where) from exc
        if index.num_samples != data.get("num_samples"):
            raise DataError(f"shard index {where}: num_samples {data.get('num_samples')!r} is not the sum of the "
                            f"shards' counts ({index.num_samples})", file=where)
        return index
