"""MMEB-eval loading, candidate deduplication and rank sharding. No models.

An MMEB-eval row is one query and its candidates, the ground truth first:

| field | type | meaning |
|---|---|---|
| ``qry_text`` | string | query text (may hold ``<|image_1|>``) |
| ``qry_img_path`` | string | query image relative to the image root; ``""`` = text-only |
| ``tgt_text`` | list of strings | candidate texts, ground truth first |
| ``tgt_img_path`` | list of strings | candidate images, same length as ``tgt_text`` |

Sources: a local directory (``<dir>/<Subset>.parquet|jsonl``, or the hub snapshot layout
``<dir>/<Subset>/test-00000-of-00001.parquet``) or a hub dataset id read with
``datasets.load_dataset(id, subset, split="test")``; both go through `parse_eval_rows`.
Bad rows raise `EvalDataError` (a ValueError) naming subset, file, row and field. A query
or candidate with no text and no image is not bad: the official VLM2Vec eval embeds it as
``""``, and so do we (counted in ``EvalSubset.empty_sides`` and logged); ``strict_empty=True``
refuses it instead.

`unique_items` maps every query and candidate to a deduplicated item list so each
distinct (role, text, image) is embedded once; `shard` / `reassemble` split that list
over ranks and put the gathered embeddings back in order. See docs/EVALUATION.md.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from llave_ds.data.errors import DataError
from llave_ds.data.mmeb_files import find_subset_files, is_local_source, list_subsets, unknown_subsets_message
from llave_ds.formats import EVAL_FIELDS
from llave_ds.media.files import MediaError, check_image_file, resolve_under_root

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "test"
QUERY, CANDIDATE = "query", "candidate"


class EvalDataError(DataError):
    """Bad MMEB-eval data or source. The message names subset, file, row and field where known."""


# --------------------------------------------------------------------------- rows

@dataclass(frozen=True)
class EvalRow:
    """One query and its candidates (ground truth = candidate 0). Image paths are relative
    to the image root as written in the data; ``""`` means no image. ``row``: index of the
    row in the subset."""
    qry_text: str
    qry_img_path: str
    tgt_text: Tuple[str, ...]
    tgt_img_path: Tuple[str, ...]
    row: int = -1

    @property
    def num_candidates(self) -> int:
        return len(self.tgt_text)

    def candidates(self) -> List[Tuple[str, str]]:
        return list(zip(self.tgt_text, self.tgt_img_path))


class _Problem(Exception):
    def __init__(self, field_name: str, detail: str):
        super().__init__(detail)
        self.field, self.detail = field_name, detail


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _as_str(value: Any, field_name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise _Problem(field_name, f"expected a string, got {type(value).__name__} {_short(value)}")


def _as_str_list(value: Any, field_name: str) -> Tuple[str, ...]:
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _Problem(field_name, f"expected a list of strings, got {type(value).__name__} {_short(value)}")
    return tuple(_as_str(v, f"{field_name}[{i}]") for i, v in enumerate(value))


def _parse_record(record: Any, strict_empty: bool = False) -> Tuple[str, str, Tuple[str, ...], Tuple[str, ...]]:
    if not isinstance(record, Mapping):
        raise _Problem("", f"expected a row object, got {type(record).__name__}")
    missing = [f for f in EVAL_FIELDS if f not in record]
    if missing:
        raise _Problem(missing[0], f"missing required field(s) {missing}; present: {sorted(record)}")
    qry_text = _as_str(record["qry_text"], "qry_text")
    qry_img = _as_str(record["qry_img_path"], "qry_img_path")
    tgt_text = _as_str_list(record["tgt_text"], "tgt_text")
    tgt_img = _as_str_list(record["tgt_img_path"], "tgt_img_path")
    if not tgt_text and not tgt_img:
        raise _Problem("tgt_text", "empty candidate list")
    if len(tgt_text) != len(tgt_img):
        raise _Problem("tgt_img_path", f"has {len(tgt_img)} entries but tgt_text has {len(tgt_text)}; "
                                       "each candidate needs one text and one image path (\"\" for none)")
    if strict_empty:
        if not qry_text and not qry_img:
            raise _Problem("qry_text", "empty query: no text and no image (strict_empty refuses it; by default "
                                       "it is embedded as \"\", as the official VLM2Vec eval does)")
        for j, (t, p) in enumerate(zip(tgt_text, tgt_img)):
            if not t and not p:
                raise _Problem(f"tgt_text[{j}]", f"empty candidate {j}: no text and no image (strict_empty "
                                                 "refuses it; by default it is embedded as \"\")")
    return qry_text, qry_img, tgt_text, tgt_img


def is_empty_side(text: str, image_path: str) -> bool:
    """No text and no image: the official VLM2Vec eval embeds such a side as ``""``."""
    return not text and not image_path


def count_empty_sides(rows: Iterable["EvalRow"]) -> Dict[str, int]:
    """``{"query": n, "candidate": m}``: sides with no text and no image (embedded as ``""``)."""
    counts = {QUERY: 0, CANDIDATE: 0}
    for r in rows:
        counts[QUERY] += is_empty_side(r.qry_text, r.qry_img_path)
        counts[CANDIDATE] += sum(is_empty_side(t, p) for t, p in zip(r.tgt_text, r.tgt_img_path))
    return counts


def _where(subset: Optional[str], file: Optional[str], row: Optional[int], line: Optional[int]) -> str:
    parts = []
    if subset is not None:
        parts.append(f"subset {subset!r}")
    if file:
        parts.append(f"file {file}")
    if line is not None:
        parts.append(f"line {line}")
    if row is not None:
        parts.append(f"row {row}")
    return ", ".join(parts)


def parse_eval_rows(records: Iterable[Any], *, subset: Optional[str] = None,
                    file: Optional[str] = None, strict_empty: bool = False) -> List[EvalRow]:
    """Check and convert MMEB-eval records (dicts, e.g. from ``datasets`` or pyarrow) to `EvalRow`s.

    ``records`` may also yield ``(file, row_in_file, line, record)`` tuples (what the local
    readers produce) so errors name the exact file, row and line. A query or candidate
    with no text and no image is kept (embedded as ``""``, like the official eval; see
    `count_empty_sides`) unless ``strict_empty``, which refuses it.
    """
    rows: List[EvalRow] = []
    for i, item in enumerate(records):
        if isinstance(item, tuple) and len(item) == 4:
            f, r, line, record = item
        else:
            f, r, line, record = file, i, None, item
        try:
            q, qi, tt, ti = _parse_record(record, strict_empty)
        except _Problem as p:
            loc = _where(subset, f, r, line)
            fld = f", field {p.field!r}" if p.field else ""
            raise EvalDataError(f"MMEB-eval {loc}{fld}: {p.detail}", subset=subset, file=f, row=r,
                                field=p.field or None) from None
        rows.append(EvalRow(q, qi, tt, ti, row=len(rows)))
    return rows


# --------------------------------------------------------------------------- local files

def list_eval_subsets(root: str) -> List[str]:
    """Subsets in a local MMEB-eval directory (`llave_ds.data.mmeb_files` layouts)."""
    return list_subsets(root)


def _unknown_subsets(names: Sequence[str], available: Sequence[str], where: str) -> EvalDataError:
    return EvalDataError(unknown_subsets_message(list(names), available, where, what="MMEB-eval subset"),
                         subset=names[0])


def find_eval_files(root: str, subset: str, split: str = DEFAULT_SPLIT) -> List[str]:
    """Data files of one subset in a local directory (`llave_ds.data.mmeb_files` layouts:
    ``<root>/<S>.parquet|jsonl``, or a ``huggingface-cli download TIGER-Lab/MMEB-eval``
    snapshot's ``<root>/<S>/<split>-00000-of-00001.parquet``)."""
    return find_subset_files(root, subset, split, what="MMEB-eval subset", error=EvalDataError)


def _read_parquet(path: str, subset: str) -> Iterator[Tuple[str, int, Optional[int], Dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise EvalDataError(f"subset {subset!r}: cannot read {path} ({type(exc).__name__}: {exc})",
                            subset=subset, file=path) from exc
    names = pf.schema_arrow.names
    missing = [f for f in EVAL_FIELDS if f not in names]
    if missing:
        raise EvalDataError(f"MMEB-eval subset {subset!r}, file {path}, all rows, field {missing[0]!r}: missing "
                            f"required column(s) {missing}; columns: {names}", subset=subset, file=path,
                            field=missing[0])
    r = 0
    for batch in pf.iter_batches(columns=list(EVAL_FIELDS)):
        for record in batch.to_pylist():
            yield path, r, None, record
            r += 1


def _read_jsonl(path: str, subset: str) -> Iterator[Tuple[str, int, Optional[int], Any]]:
    r = 0
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"MMEB-eval subset {subset!r}, file {path}, line {lineno}, row {r}: invalid JSON "
                                    f"({exc.msg})", subset=subset, file=path, row=r) from None
            yield path, r, lineno, record
            r += 1


def read_eval_files(files: Sequence[str], subset: str) -> Iterator[Tuple[str, int, Optional[int], Any]]:
    """``(file, row_in_file, line_or_None, record)`` for every row of local parquet / jsonl files."""
    for path in files:
        reader = _read_parquet if path.endswith(".parquet") else _read_jsonl
        yield from reader(path, subset)


# --------------------------------------------------------------------------- images

def _image_fields(row: EvalRow) -> Iterator[Tuple[str, str]]:
    if row.qry_img_path:
        yield "qry_img_path", row.qry_img_path
    for j, p in enumerate(row.tgt_img_path):
        if p:
            yield f"tgt_img_path[{j}]", p


# --------------------------------------------------------------------------- subsets

@dataclass
class EvalSubset:
    """One loaded MMEB-eval subset. ``source``: the files or the hub id it came from;
    ``locations[i]``: (file, row_in_file, jsonl line or None) of row i."""
    name: str
    source: str
    rows: List[EvalRow]
    image_root: Optional[str] = None
    locations: List[Tuple[Optional[str], int, Optional[int]]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[EvalRow]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> EvalRow:
        return self.rows[i]

    @property
    def num_candidates(self) -> List[int]:
        return [r.num_candidates for r in self.rows]

    @property
    def empty_sides(self) -> Dict[str, int]:
        """Queries / candidates with no text and no image (embedded as ``""``)."""
        return count_empty_sides(self.rows)

    def image_path(self, path: str) -> Optional[str]:
        """Absolute path of an image path from this subset's rows (None for ``""``)."""
        if not path:
            return None
        if self.image_root is None:
            raise EvalDataError(f"subset {self.name!r}: no image_root given, cannot resolve {path!r}",
                                subset=self.name)
        return resolve_under_root(self.image_root, path)


def _hub_records(source: str, subset: str, split: str, cache_dir: Optional[str]):
    import datasets

    try:
        available = list(datasets.get_dataset_config_names(source))
    except Exception:
        available = None  # offline or not listable: let load_dataset say what is wrong
    if available is not None and subset not in available:
        raise _unknown_subsets([subset], available, f"hub dataset {source!r}")
    try:
        ds = datasets.load_dataset(source, subset, split=split, cache_dir=cache_dir)
    except Exception as exc:
        raise EvalDataError(f"subset {subset!r} of hub dataset {source!r}, split {split!r}: cannot load "
                            f"({type(exc).__name__}: {exc})", subset=subset) from exc
    where = f"{source}:{subset}/{split}"
    return ((where, i, None, record) for i, record in enumerate(ds))


def load_eval_subset(source: str, subset: str, *, split: str = DEFAULT_SPLIT, image_root: Optional[str] = None,
                     source_type: str = "auto", check_images: bool = True, max_rows: Optional[int] = None,
                     cache_dir: Optional[str] = None, strict_empty: bool = False) -> EvalSubset:
    """Load and check one MMEB-eval subset.

    source: a local directory (see `find_eval_files`) or a hub dataset id such as
        ``"TIGER-Lab/MMEB-eval"`` (``source_type`` "auto" decides by whether the path exists
        or looks like one).
    image_root: what image paths are relative to; default: ``source`` for a local
        directory, required for a hub id when ``check_images`` (MMEB-eval's images come from
        its ``images.zip``, unzipped e.g. to ``eval_images/``).
    check_images: every distinct image path must stay inside the root and exist as a
        non-empty file (checked with ``stat`` only; nothing is decoded).
    max_rows: keep only the first rows (smoke tests).
    strict_empty: refuse a query or candidate with no text and no image. Default: keep it
        (embedded as ``""``, as the official VLM2Vec eval does), counted in
        ``EvalSubset.empty_sides`` and logged.

    Raises `EvalDataError` naming subset, file, row and field.
    """
    local = is_local_source(source, source_type)
    if local:
        root = os.path.expanduser(source)
        if not os.path.isdir(root):
            raise EvalDataError(f"MMEB-eval directory {source!r} does not exist", subset=subset)
        files = find_eval_files(root, subset, split)
        records: Iterable[Any] = read_eval_files(files, subset)
        where = ", ".join(files)
        if image_root is None:
            image_root = root
    else:
        if check_images and image_root is None:
            raise ValueError(f"image_root is required for hub dataset {source!r}: download and unzip its images "
                             "(MMEB-eval: images.zip -> eval_images/) and pass that directory, or pass "
                             "check_images=False")
        records = _hub_records(source, subset, split, cache_dir)
        where = f"{source} ({subset}, split {split})"
    if max_rows is not None:
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
        records = _take(records, max_rows)
    locations: List[Tuple[Optional[str], int, Optional[int]]] = []

    def tap() -> Iterator[Any]:
        for f, r, line, record in records:
            locations.append((f, r, line))
            yield f, r, line, record

    rows = parse_eval_rows(tap(), subset=subset, strict_empty=strict_empty)
    if not rows:
        raise EvalDataError(f"MMEB-eval subset {subset!r} ({where}) has no rows", subset=subset)
    out = EvalSubset(subset, where, rows, None if image_root is None else os.path.abspath(image_root), locations)
    empty = out.empty_sides
    if any(empty.values()):
        logger.warning("subset %s: %d empty quer%s and %d empty candidate%s (no text, no image) will be embedded "
                       "as \"\" (official VLM2Vec behaviour; strict_empty / --strict-empty refuses them)", subset,
                       empty[QUERY], "y" if empty[QUERY] == 1 else "ies", empty[CANDIDATE],
                       "" if empty[CANDIDATE] == 1 else "s")
    if image_root is not None:
        _check_image_paths(out, check_images)
    return out


def _take(it: Iterable[Any], n: int) -> Iterator[Any]:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def _check_image_paths(sub: EvalSubset, exist: bool) -> None:
    seen: Dict[str, None] = {}
    for (f, r, line), row in zip(sub.locations, sub.rows):
        for fld, path in _image_fields(row):
            if path in seen:
                continue
            seen[path] = None
            try:
                full = resolve_under_root(sub.image_root, path)
                if exist:
                    check_image_file(full)
            except MediaError as exc:
                loc = _where(sub.name, f, r, line)
                raise EvalDataError(f"MMEB-eval {loc}, field {fld!r}: {exc}", reason=exc.reason, subset=sub.name,
                                    file=f, row=r, field=fld) from None


def check_subset_names(source: str, subsets: Optional[Sequence[str]] = None,
                       source_type: str = "auto") -> List[str]:
    """The subset names to load: ``subsets`` checked (no duplicates; for a local directory,
    every name present, all unknown names reported at once with the available subsets), or
    None: every subset of a local directory. Reads no rows."""
    local = is_local_source(source, source_type)
    if subsets is None:
        if not local:
            raise ValueError("name the subsets to load from a hub dataset (e.g. llave_ds.eval.mmeb_metrics.official_subsets())")
        root = os.path.expanduser(source)
        if not os.path.isdir(root):
            raise EvalDataError(f"MMEB-eval directory {source!r} does not exist")
        subsets = list_eval_subsets(root)
        if not subsets:
            raise EvalDataError(f"no MMEB-eval subsets found in {source!r}")
    subsets = list(subsets)
    if len(set(subsets)) != len(subsets):
        raise ValueError(f"subsets lists {sorted({s for s in subsets if subsets.count(s) > 1})} more than once")
    if local and os.path.isdir(os.path.expanduser(source)):
        available = list_eval_subsets(os.path.expanduser(source))
        unknown = [s for s in subsets if s not in available]
        if unknown:
            raise _unknown_subsets(unknown, available, source)
    return subsets


def load_eval_subsets(source: str, subsets: Optional[Sequence[str]] = None, **options: Any) -> Dict[str, EvalSubset]:
    """`load_eval_subset` for several subsets (None: every subset of a local directory).

    Unknown names are all reported at once, with the available subsets, before anything
    loads. ``options`` go to `load_eval_subset` (``strict_empty=True`` refuses empty sides).
    """
    names = check_subset_names(source, subsets, options.get("source_type", "auto"))
    return {s: load_eval_subset(source, s, **options) for s in names}


# --------------------------------------------------------------------------- deduplication

class EvalItem(NamedTuple):
    """One thing to embed: a query or a candidate (``role``), its text and image path ("" = none)."""
    role: str
    text: str
    image_path: str


def _row_fields(row: Any) -> Tuple[str, str, Sequence[str], Sequence[str]]:
    if isinstance(row, EvalRow):
        return row.qry_text, row.qry_img_path, row.tgt_text, row.tgt_img_path
    if isinstance(row, Mapping):
        q, qi, tt, ti = _parse_record(row)
        return q, qi, tt, ti
    raise TypeError(f"expected EvalRow or a row mapping, got {type(row).__name__}")


def unique_items(subset_rows: Iterable[Any]) -> Tuple[List[EvalItem], np.ndarray, List[np.ndarray]]:
    """Deduplicate the things to embed in one subset.

    Returns ``(items, query_index, candidate_index)``: ``items`` lists each distinct
    (role, text, image_path) once, all queries first, then all candidates, each in order of
    first appearance; ``query_index[i]`` is the item of query i and ``candidate_index[i]``
    (int64 array, ground truth first) the items of its candidates. Queries and candidates
    are separate item spaces: the same text + image as a query and as a candidate gives two
    items (the two sides may be formatted differently, e.g. an instruction on queries).
    Candidates repeated across (or within) queries map to one item.
    """
    parsed = [_row_fields(r) for r in subset_rows]
    index: Dict[EvalItem, int] = {}
    items: List[EvalItem] = []

    def item_id(key: EvalItem) -> int:
        i = index.get(key)
        if i is None:
            i = index[key] = len(items)
            items.append(key)
        return i

    query_index = np.array([item_id(EvalItem(QUERY, q, qi)) for q, qi, _, _ in parsed], dtype=np.int64)
    candidate_index = [np.array([item_id(EvalItem(CANDIDATE, t, p)) for t, p in zip(tt, ti)], dtype=np.int64)
                       for _, _, tt, ti in parsed]
    return items, query_index, candidate_index


# --------------------------------------------------------------------------- rank sharding

def _check_world(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} / world size {world} is not a valid rank layout")


def shard_padded_size(num_items: int, world: int) -> int:
    """Items per rank (``ceil(num_items / world)``): every rank pads its shard to this size
    so an equal-size ``all_gather`` works; `reassemble` drops the padding."""
    if world < 1 or num_items < 0:
        raise ValueError(f"need num_items >= 0 and world >= 1, got {num_items}, {world}")
    return math.ceil(num_items / world) if num_items else 0


def shard_range(num_items: int, rank: int, world: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank's contiguous shard: ranks 0.. get ``shard_padded_size``
    items each, the last non-empty one possibly fewer, trailing ranks possibly none."""
    _check_world(rank, world)
    size = shard_padded_size(num_items, world)
    start = min(rank * size, num_items)
    return start, min(start + size, num_items)


def shard(items: Sequence[Any], rank: int, world: int) -> Sequence[Any]:
    """Rank's contiguous slice of ``items`` (list, array or tensor), see `shard_range`."""
    start, stop = shard_range(len(items), rank, world)
    return items[start:stop]


def pad_shard(local: Any, num_items: int, world: int) -> Any:
    """Pad a rank's embeddings [n_local, ...] with zero rows to `shard_padded_size` rows."""
    size = shard_padded_size(num_items, world)
    n = len(local)
    if n > size:
        raise ValueError(f"shard has {n} rows, more than the per-rank size {size}")
    if n == size:
        return local
    if hasattr(local, "new_zeros"):  # torch
        import torch

        return torch.cat([local, local.new_zeros((size - n,) + tuple(local.shape[1:]))])
    local = np.asarray(local)
    return np.concatenate([local, np.zeros((size - n,) + local.shape[1:], dtype=local.dtype)])


def reassemble(gathered: Any, num_items: int) -> Any:
    """Embeddings of all items in the original order from the per-rank results.

    ``gathered``: one array/tensor per rank (rank order), each holding that rank's shard,
    optionally padded to `shard_padded_size` (as an equal-size ``all_gather`` returns);
    or a stacked [world, padded, ...] array/tensor. Padding rows are dropped.
    """
    parts = list(gathered)
    world = len(parts)
    if world < 1:
        raise ValueError("gathered is empty: need one entry per rank")
    pieces = []
    for r, part in enumerate(parts):
        start, stop = shard_range(num_items, r, world)
        if len(part) < stop - start:
            raise ValueError(f"rank {r} returned {len(part)} rows, its shard has {stop - start} "
                             f"(num_items={num_items}, world={world})")
        if len(part) > max(stop - start, shard_padded_size(num_items, world)):
            raise ValueError(f"rank {r} returned {len(part)} rows, more than the per-rank size "
                             f"{shard_padded_size(num_items, world)}: wrong num_items or world size?")
        pieces.append(part[:stop - start])
    first = parts[0]
    if hasattr(first, "new_zeros"):
        import torch

        return torch.cat(pieces)
    if isinstance(first, np.ndarray):
        return np.concatenate(pieces)
    return [x for p in pieces for x in p]
