"""The collectives built on the process group: the objective's gathers, and the small
agreements that let every rank fail together instead of hanging (``rank_errors``).

Two ways to put every rank's embeddings into every rank's denominator:

``exact`` (default)
    A differentiable all-gather. Its backward all-reduces (sums) the gradient of the
    gathered tensor over ranks and hands each rank its own slice. When each rank's loss
    is its share of the global loss (see ``objective.py``), every rank ends up with
    exactly the gradient that one device holding the whole global batch would compute
    for its local embeddings.

``stop_grad``
    Remote embeddings enter as constants; only the local slice keeps its autograd
    history. There is no collective in the backward pass (cheaper), but the gradient of
    a local embedding only contains the terms of the *local* rows of the loss: the
    contribution of other ranks' rows (where the local embedding is a negative in
    their denominators) is dropped. In the symmetric loss each embedding is a candidate
    in the other direction too, so the dropped part is the remote rows of both
    directions. See ``docs/OBJECTIVE.md``.

Ranks may hold different numbers of rows: sizes are exchanged first, rows are padded to
the largest size for the gather and the padding is cut out again, so a short last batch
never hangs a step. Mismatched embedding widths are refused with the same error on every
rank. Timeouts come from the process group (``llave_ds.core.distributed.init_distributed``);
the torch.distributed primitives themselves are in ``llave_ds.core.distributed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch

from llave_ds.core import distributed as pg
from llave_ds.core.distributed import is_distributed


class GatherMode(str, Enum):
    EXACT = "exact"
    STOP_GRAD = "stop_grad"
    LOCAL = "local"  # no gather: each rank's negatives are its own rows (ablations)


class RankMismatchError(RuntimeError):
    """Ranks disagree on something every rank must share (raised on every rank)."""


def _gather_shape_info(x: torch.Tensor, group) -> torch.Tensor:
    """[W, 1 + ndim-1] int64: every rank's row count and trailing shape."""
    world = pg.world_size(group)
    info = torch.tensor([x.shape[0], *x.shape[1:]], dtype=torch.int64, device=x.device)
    # Ranks with a different number of dims would make the gather itself mismatch;
    # prepend the ndim so that case is caught by the same comparison.
    info = torch.cat([torch.tensor([x.dim()], dtype=torch.int64, device=x.device),
                      info, torch.zeros(8 - info.numel(), dtype=torch.int64, device=x.device)])
    out = [torch.empty_like(info) for _ in range(world)]
    pg.all_gather_into_list(out, info, group)
    return torch.stack(out)


@dataclass(frozen=True)
class GatherLayout:
    """Where each rank's rows sit in the gathered (unpadded) tensor."""

    sizes: tuple[int, ...]
    rank: int

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)


class _ExactAllGather(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradient over ranks and slices it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = pg.rank(group)
        world = pg.world_size(group)
        out = [torch.empty_like(x) for _ in range(world)]
        pg.all_gather_into_list(out, x.contiguous(), group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        # Each rank's loss touched every gathered row; the local rows' total gradient is
        # the sum of what every rank's loss says about them.
        pg.all_reduce_(grad, "sum", ctx.group)
        n = grad.shape[0] // pg.world_size(ctx.group)
        return grad[ctx.rank * n:(ctx.rank + 1) * n], None


def all_gather_rows(x: torch.Tensor, mode: GatherMode | str = GatherMode.EXACT,
                    group=None) -> tuple[torch.Tensor, GatherLayout]:
    """Concatenate every rank's rows (rank order). Ranks may have different row counts.

    Returns the gathered tensor and the layout (sizes per rank, this rank's offset).
    Without a multi-rank process group it returns ``x`` itself.
    """
    mode = GatherMode(mode)
    if mode is GatherMode.LOCAL:
        raise ValueError("all_gather_rows: mode 'local' gathers nothing; the objective handles it")
    if not is_distributed(group):
        return x, GatherLayout((x.shape[0],), 0)
    rank = pg.rank(group)
    info = _gather_shape_info(x, group)
    if not bool((info[:, 0] == info[0, 0]).all() and (info[:, 2:] == info[0, 2:]).all()):
        shapes = [tuple(int(v) for v in row[1:1 + int(row[0])]) for row in info]
        raise RankMismatchError(
            f"all_gather_rows: ranks hold tensors of incompatible shapes {shapes}; only "
            f"the first (row) dimension may differ between ranks")
    sizes = tuple(int(s) for s in info[:, 1])
    max_rows = max(sizes)
    if max_rows == 0:
        return x, GatherLayout(sizes, rank)
    padded = x
    if x.shape[0] < max_rows:
        pad = x.new_zeros((max_rows - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, pad], dim=0)
    if mode is GatherMode.EXACT:
        gathered = _ExactAllGather.apply(padded, group)
    else:
        with torch.no_grad():
            parts = [torch.empty_like(padded) for _ in sizes]
            pg.all_gather_into_list(parts, padded.detach().contiguous(), group)
        parts[rank] = padded  # the local slice keeps its autograd history
        gathered = torch.cat(parts, dim=0)
    if all(s == max_rows for s in sizes):
        return gathered, GatherLayout(sizes, rank)
    keep = torch.cat([torch.arange(r * max_rows, r * max_rows + s, device=x.device)
                      for r, s in enumerate(sizes)])
    return gathered.index_select(0, keep), GatherLayout(sizes, rank)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of a detached tensor over ranks (identity without a process group)."""
    return pg.all_reduce_(t.detach().clone(), "sum", group)


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    return pg.all_reduce_(t.detach().clone(), "max", group)


def all_ranks_ok(ok: bool, device: Optional[torch.device] = None, group=None) -> bool:
    """True only when every rank reports ok: lets all ranks fail together, not hang."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device or "cpu")
    return int(all_reduce_max(flag, group).item()) == 0


def all_gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group)."""
    return pg.all_gather_object(obj, group)


def rank_codes(code: int, device: Optional[torch.device] = None, group=None) -> dict[int, int]:
    """Every rank's small status code, by rank, keeping only the non-zero ones (one all-reduce)."""
    world = pg.world_size(group) if is_distributed(group) else 1
    rank = pg.rank(group) if is_distributed(group) else 0
    codes = torch.zeros(world, dtype=torch.int64, device=device or "cpu")
    codes[rank] = code
    codes = all_reduce_max(codes, group)
    return {r: int(c) for r, c in enumerate(codes.tolist()) if c}


def rank_errors(local_error: Optional[str], device: Optional[torch.device] = None, group=None) -> list[str]:
    """Agree on failures: every rank passes its own error text (None when fine) and gets
    ``["rank R: text", ...]`` for every failing rank (empty when all are fine).

    One tiny all-reduce when everything is fine; the texts travel only when some rank
    failed. Every rank must call it at the same point.
    """
    if not is_distributed(group):
        return [f"rank 0: {local_error}"] if local_error is not None else []
    if all_ranks_ok(local_error is None, device, group):
        return []
    texts = all_gather_objects(local_error, group)
    return [f"rank {r}: {t}" for r, t in enumerate(texts) if t is not None]
