"""Embeddings of a long list of sides, encoded shard by shard to disk, resumable.

``encode_to_store`` cuts the items into shards of ``shard_rows`` and encodes each missing
shard with the evaluation's sharded encoder (`llave_ds.eval.encoding.embed_dataset`: every
rank embeds a contiguous part of the shard, one gather puts it together), after which rank 0
writes it as ``<role>-<i>.npy`` (atomically). A manifest (``<role>.json``) holds the
fingerprint of what is encoded (model files, the items, the role and the options); shards
of a run with the same fingerprint are kept, so a killed mining run re-encodes only the
shards it had not finished. Rank 0 decides which shards are missing and hands the list to
every rank (`rank0_then_shared`), so the ranks run the same collectives. Memory holds one
shard at a time while encoding, and one block at a time while searching (`blocks`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from llave_ds.core import distributed
from llave_ds.eval.encoding import embed_dataset, rank0_then_shared
from llave_ds.files import atomic_write_text, write_atomically

logger = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 4096


def items_digest(items: Sequence[Any]) -> str:
    """SHA-256 of the items' JSON: what identifies the list encoded (order included)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class ShardStore:
    """The shards of one role under ``directory``: ``<role>-00000.npy`` ... and ``<role>.json``."""
    directory: Path
    role: str
    num_rows: int
    shard_rows: int = DEFAULT_SHARD_ROWS

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def shard_path(self, i: int) -> Path:
        return self.directory / f"{self.role}-{i:05d}.npy"

    @property
    def manifest_path(self) -> Path:
        return self.directory / f"{self.role}.json"

    def shard_range(self, i: int) -> range:
        return range(i * self.shard_rows, min(self.num_rows, (i + 1) * self.shard_rows))

    def missing(self, fingerprint: dict) -> List[int]:
        """Rank 0: the shards to encode. A manifest of other items, model or options makes every
        shard missing (its files are removed, the new manifest written)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        wanted = {"fingerprint": fingerprint, "num_rows": self.num_rows, "shard_rows": self.shard_rows}
        try:
            same = json.loads(self.manifest_path.read_text()) == wanted
        except (OSError, ValueError):
            same = False
        if not same:
            for old in self.directory.glob(f"{self.role}-*.npy"):
                old.unlink()
            atomic_write_text(self.manifest_path, json.dumps(wanted, indent=1, sort_keys=True) + "\n")
            return list(range(self.num_shards))
        return [i for i in range(self.num_shards) if not self.shard_path(i).is_file()]

    def blocks(self, rows: Optional[range] = None) -> Iterator[np.ndarray]:
        """The embeddings of ``rows`` (default: all), block by block (memory-mapped shards)."""
        rows = rows if rows is not None else range(self.num_rows)
        for i in range(self.num_shards):
            shard = self.shard_range(i)
            lo, hi = max(shard.start, rows.start), min(shard.stop, rows.stop)
            if lo < hi:
                yield np.load(self.shard_path(i), mmap_mode="r")[lo - shard.start:hi - shard.start]

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """The embeddings of the given rows, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        out = None
        for i in range(self.num_shards):
            shard = self.shard_range(i)
            here = np.nonzero((indices >= shard.start) & (indices < shard.stop))[0]
            if len(here):
                data = np.load(self.shard_path(i), mmap_mode="r")
                if out is None:
                    out = np.empty((len(indices), data.shape[1]), dtype=np.float32)
                out[here] = data[indices[here] - shard.start]
        return out if out is not None else np.empty((0, 0), dtype=np.float32)


class _Slice(torch.utils.data.Dataset):
    def __init__(self, dataset, rows: range):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.dataset[self.rows[i]]


def encode_to_store(embedder, dataset, store: ShardStore, fingerprint: dict, *, role: str, batch_size: int,
                    progress: bool, num_workers: int = 2, where: str = "",
                    on_shard: Optional[Callable[[int], None]] = None) -> ShardStore:
    """Encode every missing shard of ``dataset`` (sides) as ``role`` into ``store`` (collective:
    every rank calls it). ``on_shard(i)`` runs on every rank after shard ``i`` is written."""
    todo = rank0_then_shared(lambda: store.missing(fingerprint))
    if len(todo) < store.num_shards:
        logger.info("%s: %d of %d shards already encoded in %s (resumed)", role, store.num_shards - len(todo),
                    store.num_shards, store.directory)
    for n, i in enumerate(todo):
        emb = embed_dataset(embedder, _Slice(dataset, store.shard_range(i)), role=role,
                            desc=f"{store.role} shard {n + 1}/{len(todo)}", batch_size=batch_size, progress=progress,
                            num_workers=num_workers, where=where)
        if distributed.rank() == 0:
            array = emb.numpy().astype(np.float32, copy=False)
            write_atomically(store.shard_path(i), lambda tmp: _save(tmp, array))
        if on_shard is not None:
            on_shard(i)
    return store


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)
