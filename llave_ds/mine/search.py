"""Exact top-k search of unit-vector queries against a candidate pool read in blocks.

The pool never needs to be in memory at once: it comes as blocks of rows (the embedding
shards on disk), each block scored against a block of queries with one matrix product, and
each query keeps its running best ``k``. The result equals a full ``argsort`` of the whole
score matrix cut at ``k`` (ties: the lower candidate id first), which
`tests/test_mine.py` checks against numpy on random and tied scores. Scores are float32 dot
products (cosine for unit vectors); the matrix product runs in torch, on ``device`` when
given (a GPU when mining on one), else on the CPU.

Why not an ANN library: at 1M candidates x 1,536 dims an exact pass is one
``[Q, 1M]`` product per query block, which is a fraction of the encoding's cost (the
encoder runs a 2B-8B model per candidate); the issue asks for faiss only if a measurement
shows the search is the bottleneck, and none has (docs/MINING.md).
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import torch


def topk_blocks(queries: np.ndarray, candidate_blocks: Iterable[np.ndarray], k: int, *,
                query_block: int = 4096, device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(scores [Q, k'], ids [Q, k'])`` of each query's best ``k`` candidates, best first,
    with ``k' = min(k, pool size)``; ids count rows across the blocks in order.

    ``candidate_blocks`` is iterated once per query block (a list, or something re-iterable
    like the store's shard reader)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    device = device or torch.device("cpu")
    out_scores, out_ids = [], []
    for q0 in range(0, len(queries), query_block):
        q = torch.from_numpy(queries[q0:q0 + query_block]).to(device)
        best_s = torch.empty(len(q), 0, dtype=torch.float32, device=device)
        best_i = torch.empty(len(q), 0, dtype=torch.int64, device=device)
        offset = 0
        for block in candidate_blocks:
            c = torch.from_numpy(np.array(block, dtype=np.float32)).to(device)   # a copy: blocks may be read-only maps
            if c.shape[1] != q.shape[1]:
                raise ValueError(f"candidate block of width {c.shape[1]} for queries of width {q.shape[1]}")
            block_s, block_i = _block_best(q @ c.T, offset, k)
            offset += len(c)
            best_s, best_i = _best(torch.cat([best_s, block_s], 1), torch.cat([best_i, block_i], 1), k)
        out_scores.append(best_s.cpu().numpy())
        out_ids.append(best_i.cpu().numpy())
    if not out_scores:
        return np.empty((0, 0), np.float32), np.empty((0, 0), np.int64)
    return np.concatenate(out_scores), np.concatenate(out_ids)


def _block_best(scores: torch.Tensor, offset: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best columns of each row of one block (ids = column + ``offset``), exact under
    ties: ``topk`` picks among equal scores arbitrarily, so a row whose cut falls inside a run
    of equal scores is sorted in full, stably (the lower id first)."""
    kk = min(k, scores.shape[1])
    values, cols = torch.topk(scores, kk, dim=1)
    crossing = (scores >= values[:, -1:]).sum(1) > kk
    if bool(crossing.any()):
        rows = crossing.nonzero().squeeze(1)
        order = torch.argsort(scores[rows], dim=1, descending=True, stable=True)[:, :kk]
        values[rows], cols[rows] = scores[rows].gather(1, order), order
    return values, cols + offset


def _best(scores: torch.Tensor, ids: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row: score descending, then id ascending (a stable order, so
    a tie never depends on the block boundaries)."""
    # Sort by id first, then stably by score: equal scores keep the id order.
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), ids.gather(1, order)
