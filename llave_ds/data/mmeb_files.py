"""MMEB on disk: which subsets a directory holds, where each subset's files are, and the
official subset lists. Shared by the training data (`llave_ds.data.mmeb_train`) and the
evaluation data (`llave_ds.eval.mmeb_data`).

Layouts of one subset ``S`` under a root, looked up in this order:

* ``<root>/S.parquet`` or ``<root>/S.jsonl`` (one file, no split);
* ``<root>/S.json``: LLaVE's layout, one JSON array of rows per subset (training data only);
* ``<root>/S/<split>.parquet|jsonl`` or ``<root>/S/<split>-00000-of-0000N.parquet`` (a
  ``huggingface-cli download TIGER-Lab/MMEB-train`` or ``MMEB-eval`` snapshot);
* ``<root>/S/*.parquet|jsonl`` when no file there is named after a split.

``mmeb_subsets.json`` beside this module holds the official lists: the 20 MMEB-train
subsets, the 36 MMEB(-V1) evaluation subsets with their category and IND/OOD, and the
offline synthetic subsets.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import re
from typing import Any, Dict, List, Sequence, Tuple, Type

from llave_ds.data.errors import DataError
from llave_ds.formats import MINING_RECORD

DATA_EXTENSIONS: Tuple[str, ...] = (".parquet", ".jsonl")
JSON_ARRAY_EXTENSION = ".json"
# JSON files a dataset directory may hold that are not data (datasets' and the hub's metadata,
# llave-ds mine's provenance).
METADATA_JSON = frozenset({"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json",
                           MINING_RECORD})
# HF shard naming, as written by push_to_hub: "<split>-00000-of-00003.parquet".
SHARD_NAME = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}\.(parquet|jsonl)$")
SUBSETS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmeb_subsets.json")


@functools.lru_cache(maxsize=1)
def subset_lists() -> Dict[str, Any]:
    """The parsed ``mmeb_subsets.json`` (read once): ``train`` (the 20 training subsets in the
    official scripts' order), ``eval`` (name -> category and IND/OOD, benchmark order) and
    ``synthetic``."""
    with open(SUBSETS_FILE, encoding="utf-8") as fh:
        return json.load(fh)


def official_train_subsets() -> List[str]:
    """The 20 MMEB-train subsets VLM2Vec and LLaVE train on, in their scripts' order."""
    return list(subset_lists()["train"])


def is_local_source(source: str, source_type: str = "auto") -> bool:
    """Whether ``source`` is a local directory (else a hub dataset id). ``source_type``
    "local" / "hub" decides; "auto": an existing path, or anything that looks like one."""
    if source_type not in ("auto", "local", "hub"):
        raise ValueError(f"source_type must be 'auto', 'local' or 'hub', got {source_type!r}")
    if source_type != "auto":
        return source_type == "local"
    return (os.path.isdir(source) or os.path.isabs(source) or source.startswith((".", "~"))
            or os.path.exists(source))


def list_subsets(root: str, *, json_arrays: bool = False) -> List[str]:
    """Subset names under a local MMEB directory: ``<S>.parquet|jsonl`` files or ``<S>/``
    directories with data files; with ``json_arrays`` also ``<S>.json`` files (LLaVE's
    layout). Hidden entries and dataset metadata files are ignored."""
    names = set()
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            continue
        stem, ext = os.path.splitext(entry.name)
        if entry.is_file() and (ext in DATA_EXTENSIONS or (
                json_arrays and ext == JSON_ARRAY_EXTENSION and entry.name not in METADATA_JSON)):
            names.add(stem)
        elif entry.is_dir() and any(f.endswith(DATA_EXTENSIONS) for f in os.listdir(entry.path)):
            names.add(entry.name)
    return sorted(names)


def unknown_subsets_message(names: Sequence[str], available: Sequence[str], where: str,
                            what: str = "subset") -> str:
    """``unknown <what>(s) [...] in <where> (did you mean ...?); available subsets: ...``."""
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, list(available), n=3, cutoff=0.6)
        close += [a for a in available if a.lower() == name.lower() and a not in close]
        if close:
            hints.append(f"did you mean {' or '.join(repr(h) for h in close)}" +
                         (f" for {name!r}" if len(names) > 1 else ""))
    listed = repr(names[0]) if len(names) == 1 else str(list(names))
    plural = "" if len(names) == 1 else "(s)"
    hint = f" ({'; '.join(hints)}?)" if hints else ""
    return (f"unknown {what}{plural} {listed} in {where}{hint}; available subsets: "
            f"{', '.join(available) or '(none)'}")


def find_subset_files(root: str, subset: str, split: str, *, json_arrays: bool = False,
                      known_splits: Sequence[str] = (), what: str = "subset",
                      error: Type[DataError] = DataError) -> List[str]:
    """Data files of one subset and split in a local directory (the layouts above).

    ``json_arrays``: also accept ``<root>/<S>.json`` (LLaVE's training layout);
    ``known_splits``: file stems that name a split even without shard numbering (MMEB-train's
    ``original`` / ``diverse_instruction``); ``what`` words the unknown-subset error; errors
    are ``error`` (a DataError) naming the subset and the files.
    """
    flat_exts = DATA_EXTENSIONS + ((JSON_ARRAY_EXTENSION,) if json_arrays else ())
    flat = [os.path.join(root, subset + ext) for ext in flat_exts if os.path.isfile(os.path.join(root, subset + ext))]
    subdir = os.path.join(root, subset)
    in_dir = sorted(f for f in os.listdir(subdir) if f.endswith(DATA_EXTENSIONS)) if os.path.isdir(subdir) else []
    if flat and in_dir:
        raise error(f"subset {subset!r}: both {flat[0]} and the directory {subdir} hold data; keep one",
                    subset=subset)
    if len(flat) > 1:
        raise error(f"subset {subset!r}: both {flat[0]} and {flat[1]} exist; keep one", subset=subset)
    if flat:
        return flat
    if not in_dir:
        available = list_subsets(root, json_arrays=json_arrays)
        raise error(unknown_subsets_message([subset], available, root, what), subset=subset)
    chosen = [f for f in in_dir if os.path.splitext(f)[0] == split or f.startswith(split + "-")]
    if not chosen:
        splits = sorted({m.group("split") for f in in_dir if (m := SHARD_NAME.match(f))}
                        | {os.path.splitext(f)[0] for f in in_dir if os.path.splitext(f)[0] in known_splits})
        if splits:
            raise error(f"subset {subset!r}: split {split!r} not found in {subdir}; available splits: "
                        f"{', '.join(splits)}", subset=subset)
        chosen = in_dir  # plain "<S>/*.parquet": files are not named after splits
    exts = {os.path.splitext(f)[1] for f in chosen}
    if len(exts) > 1:
        raise error(f"subset {subset!r}: {subdir} mixes {' and '.join(sorted(exts))} files; use one format",
                    subset=subset)
    return [os.path.join(subdir, f) for f in chosen]

