"""Per-rank batches of pairs, cut into gradient-cache chunks.

`GlobalBatchSampler` draws the same global plan on every rank (a function of seed and
epoch) and gives rank r its slice; `PairCollator` turns a rank's pairs into a `TrainBatch`:
query, target and hard-negative chunks, each formatted by the formatter it is given. The
chunk sizes are the gradient cache's (``gradcache.*_chunk_size``, checked there); with
``gradcache.chunk_tokens`` the rows are sorted by length and packed under that token budget
(`token_budget_chunks`), each chunk carrying its rows' positions (``ROW_INDEX``).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from llave_ds.core.gradcache import ROW_INDEX, check_chunk_size
from llave_ds.data.errors import DataError
from llave_ds.data.mmeb_train import Pair
from llave_ds.media.side import Side

logger = logging.getLogger(__name__)


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


def join_batches(parts: Sequence[TrainBatch]) -> TrainBatch:
    """One rank's batch from parts collated separately (the shard loader's workers), in order:
    chunks one after another, a chunk's ``ROW_INDEX`` moved past the rows of the parts before it."""
    if len(parts) == 1:
        return parts[0]
    if not parts or len({p.num_negatives_per_pair for p in parts}) != 1:
        raise ValueError(f"cannot join {len(parts)} batch parts with hard negatives per pair "
                         f"{sorted({p.num_negatives_per_pair for p in parts})}")

    def shifted(chunks, offset):
        return [{**c, ROW_INDEX: c[ROW_INDEX] + offset} if ROW_INDEX in c else c for c in chunks]

    k = parts[0].num_negatives_per_pair
    queries, targets, negatives, skipped = [], [], [], Counter()
    done = 0
    for part in parts:
        queries += shifted(part.query_chunks, done)
        targets += shifted(part.target_chunks, done)
        negatives += shifted(part.negative_chunks, done * k)
        skipped.update(part.skipped)
        done += part.num_pairs
    return TrainBatch(queries, targets, negatives, done, k, [s for p in parts for s in p.subsets],
                      [r for p in parts for r in p.rows], dict(skipped))


def token_budget_chunks(lengths: Sequence[int], budget: int, max_rows: int) -> Tuple[List[List[int]], int]:
    """Rows (by position) grouped into chunks under a token budget: sorted longest first (ties
    in position order), a chunk takes rows while ``rows x its longest row <= budget`` and
    ``rows <= max_rows``. Returns (the chunks, how many rows exceeded the budget alone; each
    such row is a chunk of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    chunks: List[List[int]] = []
    over = 0
    for i in order:
        current = chunks[-1] if chunks else None
        # sorted: the chunk's longest row is its first
        if current and len(current) < max_rows and (len(current) + 1) * int(lengths[current[0]]) <= budget:
            current.append(i)
        else:
            chunks.append([i])
            over += int(lengths[i]) > budget
    return chunks, over


class PairCollator:
    """Turns a list of `Pair`s into a `TrainBatch`; picklable if ``formatter`` is.

    ``formatter(sides, role)`` (role "query" or "target"; negatives use "target") returns
    a dict of tensors for one chunk. Negatives are chunked with ``negative_chunk_size``
    (default: ``target_chunk_size``). ``chunk_tokens``: token-budget chunks
    (``GradCacheConfig.chunk_tokens``); the row lengths come from ``formatter.row_lengths``.
    """

    def __init__(self, formatter: Formatter, query_chunk_size: int, target_chunk_size: int,
                 negative_chunk_size: Optional[int] = None, chunk_tokens: Optional[int] = None):
        negative_chunk_size = target_chunk_size if negative_chunk_size is None else negative_chunk_size
        self.formatter = formatter
        self.query_chunk_size = check_chunk_size("query_chunk_size", query_chunk_size)
        self.target_chunk_size = check_chunk_size("target_chunk_size", target_chunk_size)
        self.negative_chunk_size = check_chunk_size("negative_chunk_size", negative_chunk_size)
        self.chunk_tokens = None if chunk_tokens is None else check_chunk_size("chunk_tokens", chunk_tokens)
        if self.chunk_tokens is not None and not callable(getattr(formatter, "row_lengths", None)):
            raise TypeError(f"gradcache.chunk_tokens needs a formatter with row_lengths(sides, role); "
                            f"{type(formatter).__name__} has none")
        self.rows_over_budget = 0  # rows longer than chunk_tokens on their own (each its own chunk)

    def _format(self, sides: List[Side], role: str) -> Dict[str, torch.Tensor]:
        features = self.formatter(sides, role)
        if not isinstance(features, Mapping):
            raise TypeError(f"formatter must return a dict of tensors, got {type(features).__name__}")
        return dict(features)

    def _chunks(self, sides: List[Side], size: int, role: str) -> List[Dict[str, torch.Tensor]]:
        if not sides:
            return []
        if self.chunk_tokens is None:
            return [self._format(sides[i:i + size], role) for i in range(0, len(sides), size)]
        groups, over = token_budget_chunks(self.formatter.row_lengths(sides, role), self.chunk_tokens, size)
        if over and not self.rows_over_budget:
            logger.warning("a %s row is longer than gradcache.chunk_tokens=%d on its own: it is a chunk of its "
                           "own (raise chunk_tokens if memory allows); further ones are only counted "
                           "(PairCollator.rows_over_budget)", role, self.chunk_tokens)
        self.rows_over_budget += over
        return [{**self._format([sides[i] for i in group], role), ROW_INDEX: torch.tensor(group, dtype=torch.long)}
                for group in groups]

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


class CountingCollator:
    """Wraps a ``PairCollator``: returns ``(batch, sides truncated while formatting it)``.

    The formatter's ``num_truncated`` counter lives in whichever process runs the collator
    (a DataLoader worker when ``num_workers > 0``), so the main process never sees it grow;
    the per-batch difference travels with the batch instead. Picklable.
    """

    def __init__(self, collator: PairCollator):
        self.collator = collator

    def __call__(self, pairs):
        formatter = self.collator.formatter
        before = getattr(formatter, "num_truncated", 0)
        batch = self.collator(pairs)
        return batch, getattr(formatter, "num_truncated", 0) - before
