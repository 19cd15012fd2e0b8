"""A local training source as files of rows: read each data file's rows as they are, and
write them back in the same layout and format with the hard-negative fields replaced
(``llave-ds mine``).

Which files a source holds is `llave_ds.data.mmeb_files` (every layout the training reader
accepts: ``<root>/S.parquet|jsonl``, LLaVE's ``<root>/S.json`` arrays, ``<root>/S/<split>...``
and its shards). The output mirrors each file's path under a new root; only data files are
written (images and other files stay where they are: point ``image_root`` at them).

Nothing but the negative fields changes: rows keep their order and count, every other field
its value and, in parquet, its column type (the schema is read from the input file); the
negative fields are lists of strings (``list<string>`` in parquet), added after the
existing fields where a file had none.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from llave_ds.data.errors import DataError
from llave_ds.data.mmeb_files import find_subset_files, is_local_source, list_subsets
from llave_ds.data.mmeb_train import KNOWN_SPLITS
from llave_ds.files import write_atomically

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json"}
NEGATIVE_TYPE = pa.list_(pa.string())


@dataclass(frozen=True)
class RowFile:
    """One data file of a local source."""
    subset: str
    path: Path       # the data file
    relative: Path   # its path under the source root (the output's path under its root)
    format: str      # "parquet" | "jsonl" | "json" (LLaVE's JSON array of rows)


def row_files(source: str, subsets: Optional[Sequence[str]] = None, split: str = "train") -> List[RowFile]:
    """Every data file of ``subsets`` (default: every subset in ``source``, LLaVE's JSON arrays
    included) for ``split``, in subset order, then file order. ``source`` must be a local
    directory: a hub id or a missing directory is a DataError. ``split`` only picks among
    ``<S>/<split>...`` files; pass the training config's (MMEB-train's are ``original`` and
    ``diverse_instruction``)."""
    if not is_local_source(source):
        raise DataError(f"{source!r} looks like a hub dataset id; mining and sharding read a local directory: "
                        "download it first (huggingface-cli download --repo-type dataset ... --local-dir DIR)")
    root = os.path.expanduser(source)
    if not os.path.isdir(root):
        raise DataError(f"data directory {source!r} does not exist; mining and sharding read a local directory")
    names = list_subsets(root, json_arrays=True) if subsets is None else list(subsets)
    if not names:
        raise DataError(f"no subsets found in {source!r}")
    out = []
    for name in names:
        for path in find_subset_files(root, name, split, json_arrays=True, known_splits=KNOWN_SPLITS):
            out.append(RowFile(subset=name, path=Path(path), relative=Path(os.path.relpath(path, root)),
                               format=FORMATS[os.path.splitext(path)[1]]))
    return out


def read_rows(f: RowFile) -> List[Dict[str, Any]]:
    """The rows of ``f`` as dicts, in file order, with their native values (lists stay lists)."""
    if f.format == "parquet":
        try:
            return pq.ParquetFile(f.path).read().to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise _error(f, f"cannot read it as parquet ({type(exc).__name__}: {exc})") from exc
    if f.format == "jsonl":
        return _read_jsonl(f)
    try:
        with open(f.path, encoding="utf-8") as fh:
            rows = json.load(fh)
    except json.JSONDecodeError as exc:
        raise _error(f, f"invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(f, f"cannot read it ({exc})") from exc
    if not isinstance(rows, list):
        raise _error(f, f"expected a JSON array of row objects (LLaVE's <subset>.json), got a {type(rows).__name__}")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise _error(f, f"element {bad}: expected a row object, got {type(rows[bad]).__name__}", row=bad)
    return rows


def _read_jsonl(f: RowFile) -> List[Dict[str, Any]]:
    rows = []
    try:
        with open(f.path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    row = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                    raise _error(f, f"invalid JSON ({detail})", line=lineno) from exc
                if not isinstance(row, dict):
                    raise _error(f, f"expected a JSON object, got {type(row).__name__}", line=lineno)
                rows.append(row)
    except OSError as exc:
        raise _error(f, f"cannot read it ({exc})") from exc
    return rows


def write_rows(f: RowFile, rows: Sequence[Dict[str, Any]], out_root: Path,
               negative_fields: Sequence[str]) -> Path:
    """Write ``rows`` to ``out_root / f.relative`` in ``f.format``, atomically; return that path.

    ``negative_fields`` are written as lists of strings (a row without one gets ``[]``), in
    the place they had in the input (parquet: the input file's column; jsonl and json: the
    row's key) or after the other fields; everything else is written as given, parquet
    columns with the input file's types.
    """
    negative_fields = list(negative_fields)
    out = [_with_negatives(f, i, row, negative_fields) for i, row in enumerate(rows)]
    path = Path(out_root) / f.relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if f.format == "parquet":
        table = pa.Table.from_pylist(out, schema=_output_schema(f, negative_fields))
        return write_atomically(path, lambda tmp: pq.write_table(table, tmp))
    if f.format == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in out)
    else:  # one JSON array, a row per line
        text = "[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in out) + ("\n]\n" if out else "]\n")
    return write_atomically(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def _with_negatives(f: RowFile, index: int, row: Dict[str, Any], negative_fields: List[str]) -> Dict[str, Any]:
    """``row`` in its key order with each negative field a list of strings (appended if absent)."""
    out = dict(row)
    for name in negative_fields:
        value = row.get(name)
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _error(f, f"field {name!r}: a negative field must be a list of strings, got {value!r:.60}",
                         row=index, field=name)
        out[name] = list(value)
    return out


def _output_schema(f: RowFile, negative_fields: List[str]) -> pa.Schema:
    """The input file's schema, with the negative fields ``list<string>`` (replaced or
    appended), and the column records of its metadata brought in line."""
    schema = pq.read_schema(f.path)
    fields = [pa.field(fl.name, NEGATIVE_TYPE) if fl.name in negative_fields else fl for fl in schema]
    fields += [pa.field(name, NEGATIVE_TYPE) for name in negative_fields if name not in schema.names]
    metadata = dict(schema.metadata or {})
    if b"huggingface" in metadata:
        # A datasets-written file (the hub's MMEB-train) records its features; older datasets
        # trust that record over the arrow types, so it must describe the new negative columns.
        from datasets import Features

        record = json.loads(metadata[b"huggingface"])
        features = (record.get("info") or {}).get("features")
        if isinstance(features, dict):
            listed = Features.from_arrow_schema(pa.schema([pa.field(n, NEGATIVE_TYPE) for n in negative_fields]))
            features.update(listed.to_dict())
            metadata[b"huggingface"] = json.dumps(record).encode("utf-8")
    if b"pandas" in metadata:
        # A pandas-written file: its record of a string column would make pandas cast the list
        # back to a string; without a record pandas takes the arrow type.
        record = json.loads(metadata[b"pandas"])
        record["columns"] = [c for c in record.get("columns", []) if c.get("name") not in negative_fields]
        metadata[b"pandas"] = json.dumps(record).encode("utf-8")
    return pa.schema(fields, metadata=metadata or None)


def _error(f: RowFile, detail: str, *, line: Optional[int] = None, row: Optional[int] = None,
           field: Optional[str] = None) -> DataError:
    where = f"{f.path}, line {line}" if line is not None else str(f.path)
    return DataError(f"subset {f.subset!r}: {where}: {detail}", subset=f.subset, file=str(f.path),
                     row=row, field=field)
