"""The hardness-weighted contrastive objective of LLaVE, on plain tensors.

For an anchor i with positive candidate p(i), similarities s_ij (cosine: inputs are
L2-normalised), temperature tau and hardness alpha:

    loss_i = -log( e^{s_ip/tau} / ( e^{s_ip/tau} + sum_{j != p} w_ij e^{s_ij/tau} ) ),
    w_ij   = exp(alpha * stopgrad(s_ij))

which is cross-entropy over the logits ``s_ij/tau + alpha*sg(s_ij)`` for negatives and
``s_ip/tau`` for the positive. alpha = 0 is InfoNCE. The weight is a constant for
autograd, so a negative's gradient share is proportional to ``exp((alpha + 1/tau) s_ij)``
instead of InfoNCE's ``exp(s_ij / tau)``: harder negatives dominate.

Options: the symmetric average of query->target and target->query (the reference
code's default; the paper writes only query->target); per-query hard negatives from the
data ([B, K, D]) that join only that query's denominator; a false-negative filter that
drops a candidate whose similarity to the anchor's positive exceeds delta; Matryoshka sizes
(``matryoshka_dims``): the loss is the weighted sum of the same loss on each prefix of the
embedding, re-normalised, every term with its own similarities (hardness weights, filter).

Cross-device negatives: with ``gather_mode`` set and a multi-rank process group, every
rank's queries and targets join every denominator (``gather.py``), labels are offset by
the rows of the ranks before this one, and each rank's loss is its share of the global
loss (sum of its rows / global row count). The returned value is the global loss on
every rank; its gradient w.r.t. this rank's inputs equals the slice of the gradient that
one device holding the whole global batch would compute (exact mode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from llave_ds.config import check_choices
from llave_ds.core.gather import GatherMode, all_gather_rows, all_reduce_sum, is_distributed


@dataclass
class ObjectiveConfig:
    temperature: float = 0.02
    alpha: float = 9.0
    symmetric: bool = True
    false_negative_threshold: Optional[float] = None  # delta; None = filter off
    # GatherMode's values; "local": no cross-rank negatives. Ignored on one rank.
    gather_mode: Literal["exact", "stop_grad", "local"] = "exact"
    # Matryoshka: nested sizes, increasing, "full" (the whole vector) allowed last, e.g.
    # [64, 256, 1024, full]; null = off. Weights: one per size (default 1 each).
    matryoshka_dims: Optional[List[Union[int, str]]] = None
    matryoshka_weights: Optional[List[float]] = None

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"objective.temperature must be > 0, got {self.temperature}")
        if self.alpha < 0:
            raise ValueError(f"objective.alpha must be >= 0 (0 = InfoNCE), got {self.alpha}")
        if self.false_negative_threshold is not None and not -1.0 <= self.false_negative_threshold <= 1.0:
            raise ValueError("objective.false_negative_threshold is a cosine similarity in "
                             f"[-1, 1] (or null), got {self.false_negative_threshold}")
        check_choices(self, "objective.")
        # "64" from a comma-list override is the size 64
        self.matryoshka_dims = check_matryoshka(self.matryoshka_dims, self.matryoshka_weights, "objective.")

    def matryoshka(self, dim: int) -> Optional[List[Tuple[int, float]]]:
        """(size, weight) per Matryoshka size for embeddings of width ``dim``; None when off."""
        return matryoshka_sizes(self.matryoshka_dims, self.matryoshka_weights, dim)


FULL = "full"


def check_matryoshka(dims: Optional[Sequence], weights: Optional[Sequence] = None, prefix: str = "",
                     name: str = "matryoshka_dims") -> Optional[List[Union[int, str]]]:
    """The rule for a Matryoshka size list (config and ``--dims`` alike): positive integers in
    increasing order, ``"full"`` allowed once, last; weights (optional) one per size, >= 0, not
    all 0. Returns the sizes with digit strings as integers."""
    if dims is None:
        if weights is not None:
            raise ValueError(f"{prefix}matryoshka_weights is set but {prefix}{name} is not")
        return None
    if isinstance(dims, (str, int)) or not len(dims):
        raise ValueError(f"{prefix}{name} must be a non-empty list of sizes (e.g. [64, 256, full]), got {dims!r}")
    dims = [int(d) if isinstance(d, str) and d.strip().isdigit() else d for d in dims]
    ints = []
    for i, d in enumerate(dims):
        if d == FULL and i == len(dims) - 1:
            continue
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"{prefix}{name}[{i}] must be a positive integer or '{FULL}' (last only), got {d!r}")
        ints.append(d)
    if any(b <= a for a, b in zip(ints, ints[1:])):
        raise ValueError(f"{prefix}{name} must increase, got {list(dims)}")
    if weights is not None:
        if len(weights) != len(dims):
            raise ValueError(f"{prefix}matryoshka_weights needs one weight per size ({len(dims)}), "
                             f"got {len(weights)}")
        if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0 for w in weights) \
                or not any(w > 0 for w in weights):
            raise ValueError(f"{prefix}matryoshka_weights must be numbers >= 0, not all 0; got {list(weights)}")
    return dims


def matryoshka_sizes(dims: Optional[Sequence], weights: Optional[Sequence], width: int
                     ) -> Optional[List[Tuple[int, float]]]:
    """``dims`` resolved against embeddings of ``width`` (``"full"`` -> width), with weights;
    None when off. A size above the width is an error (it would silently be the full vector)."""
    dims = check_matryoshka(dims, weights)
    if dims is None:
        return None
    sizes = [width if d == FULL else int(d) for d in dims]
    if max(sizes) > width or len(set(sizes)) != len(sizes):
        raise ValueError(f"matryoshka_dims {list(dims)} are the sizes {sizes} for embeddings of width {width}: "
                         f"each must be at most {width} and appear once")
    return list(zip(sizes, [float(w) for w in weights] if weights is not None else [1.0] * len(sizes)))


def truncate(x: torch.Tensor, size: int) -> torch.Tensor:
    """The first ``size`` dimensions of L2-normalised rows, re-normalised (the full width is
    returned as is, bit for bit)."""
    return x if size == x.shape[-1] else F.normalize(x[..., :size], dim=-1)


@dataclass
class ContrastiveOutput:
    """The loss and detached statistics of the query->target direction (global means)."""

    loss: torch.Tensor
    positive_similarity: torch.Tensor
    hardest_negative_similarity: torch.Tensor
    accuracy: torch.Tensor
    stats_extra: dict = field(default_factory=dict)

    @property
    def gap(self) -> torch.Tensor:
        return self.positive_similarity - self.hardest_negative_similarity

    def stats(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "pos_sim": float(self.positive_similarity),
            "hardest_neg_sim": float(self.hardest_negative_similarity),
            "gap": float(self.gap),
            "acc": float(self.accuracy),
            **self.stats_extra,
        }


def weighted_logits(sim: torch.Tensor, positive_mask: torch.Tensor, temperature: float,
                    alpha: float) -> torch.Tensor:
    """``s/tau`` everywhere plus ``alpha*sg(s)`` on negatives (never on the positive)."""
    hardness = alpha * sim.detach()
    return sim / temperature + hardness.masked_fill(positive_mask, 0.0)


def _direction(anchors: torch.Tensor, candidates: torch.Tensor, positive_index: torch.Tensor,
               extra_negatives: Optional[torch.Tensor], temperature: float, alpha: float,
               fn_threshold: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss over the anchors and the statistic sums [pos, hardest, hits, rows_with_negs].

    anchors [B, D]; candidates [N, D]; positive_index [B] into candidates;
    extra_negatives [B, K, D] joining only their own anchor's denominator.
    """
    b = anchors.shape[0]
    sim = anchors @ candidates.T  # [B, N]
    positive_mask = F.one_hot(positive_index, candidates.shape[0]).bool()
    dropped = torch.zeros_like(positive_mask)
    if fn_threshold is not None:
        # A candidate nearly identical to the anchor's own positive is most likely an
        # unlabelled positive: keep it out of the denominator instead of pushing it away.
        positives = candidates.detach()[positive_index]
        dropped = (positives @ candidates.detach().T > fn_threshold) & ~positive_mask
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        sim_extra = torch.einsum("bd,bkd->bk", anchors, extra_negatives)
        sim = torch.cat([sim, sim_extra], dim=1)
        positive_mask = torch.cat([positive_mask, torch.zeros_like(sim_extra, dtype=torch.bool)], 1)
        extra_dropped = torch.zeros_like(sim_extra, dtype=torch.bool)
        if fn_threshold is not None:
            positives = candidates.detach()[positive_index]
            extra_dropped = torch.einsum("bd,bkd->bk", positives, extra_negatives.detach()) > fn_threshold
        dropped = torch.cat([dropped, extra_dropped], dim=1)
    logits = weighted_logits(sim, positive_mask, temperature, alpha).masked_fill(dropped, float("-inf"))
    target_col = positive_mask.float().argmax(dim=1)
    loss_sum = F.cross_entropy(logits, target_col, reduction="sum")

    with torch.no_grad():
        s = sim.detach()
        negatives = ~positive_mask & ~dropped
        pos = s[positive_mask].view(b)
        hardest = s.masked_fill(~negatives, float("-inf")).max(dim=1).values if s.shape[1] else pos
        has_neg = negatives.any(dim=1)
        hits = (pos > hardest) | ~has_neg
        stat_sums = torch.stack([
            pos.sum(), torch.where(has_neg, hardest, torch.zeros_like(hardest)).sum(),
            hits.float().sum(), has_neg.float().sum()]).float()
    return loss_sum, stat_sums


def hardness_weighted_loss(query: torch.Tensor, target: torch.Tensor, temperature: float = 0.02,
                           alpha: float = 9.0, symmetric: bool = True,
                           hard_negatives: Optional[torch.Tensor] = None,
                           false_negative_threshold: Optional[float] = None,
                           gather_mode: Optional[GatherMode | str] = None,
                           group=None,
                           matryoshka: Optional[Sequence[Tuple[int, float]]] = None) -> ContrastiveOutput:
    """LLaVE loss over L2-normalised ``query`` [B, D] and ``target`` [B, D] (pair i = row i).

    ``hard_negatives`` [B, K, D]: extra targets per query (query->target only).
    ``gather_mode``: None for one process; "exact" / "stop_grad" gathers every rank's rows
    into the denominators (a no-op on one rank). Ranks may hold different B.
    ``matryoshka``: (size, weight) pairs (``ObjectiveConfig.matryoshka``): the loss is
    sum_d weight_d * loss(truncate(., d)); the rows are gathered once, at full width. The
    statistics are those of the largest size, plus ``loss_d<size>`` per size.
    """
    if query.shape != target.shape or query.dim() != 2:
        raise ValueError(f"query and target must both be [B, D]; got {tuple(query.shape)} "
                         f"and {tuple(target.shape)}")
    if hard_negatives is not None and (hard_negatives.dim() != 3
                                       or hard_negatives.shape[0] != query.shape[0]
                                       or hard_negatives.shape[2] != query.shape[1]):
        raise ValueError(f"hard_negatives must be [B, K, D] = [{query.shape[0]}, K, "
                         f"{query.shape[1]}]; got {tuple(hard_negatives.shape)}")
    distributed = gather_mode is not None and is_distributed(group)
    local_only = distributed and GatherMode(gather_mode) is GatherMode.LOCAL
    if local_only:
        # No cross-rank negatives: each rank's rows against its own candidates only. The
        # normalisation still uses the global row count, so the global loss is the mean
        # of every row's loss and the gradient scaling of the exact mode carries over.
        all_targets, all_queries, offset = target, query, 0
        total = int(all_reduce_sum(torch.tensor(float(query.shape[0]), device=query.device), group).item())
    elif distributed:
        all_targets, layout = all_gather_rows(target, gather_mode, group)
        all_queries = all_gather_rows(query, gather_mode, group)[0] if symmetric else None
        offset, total = layout.offset, layout.total
    else:
        all_targets, all_queries, offset, total = target, query, 0, query.shape[0]
    if total == 0:
        raise ValueError("hardness_weighted_loss: the global batch is empty")
    # Labels: local row i's positive sits at (rows of earlier ranks) + i in the gather.
    positive_index = torch.arange(query.shape[0], device=query.device) + offset

    sizes = list(matryoshka) if matryoshka else [(query.shape[1], None)]
    if any(not 0 < d <= query.shape[1] for d, _ in sizes):
        raise ValueError(f"matryoshka sizes {[d for d, _ in sizes]} do not fit embeddings of width {query.shape[1]}")
    largest = max(d for d, _ in sizes)   # the statistics are this size's
    loss_sum, size_sums = None, []
    for size, weight in sizes:
        # Each size is the whole loss on its own re-normalised prefix: its similarities,
        # hardness weights and false-negative filter are that size's own (DECISIONS.md).
        def cut(x):
            return None if x is None else truncate(x, size)
        size_sum, size_stats = _direction(cut(query), cut(all_targets), positive_index, cut(hard_negatives),
                                          temperature, alpha, false_negative_threshold)
        if symmetric:
            size_sum = size_sum + _direction(cut(target), cut(all_queries), positive_index, None, temperature,
                                             alpha, false_negative_threshold)[0]
        size_sums.append(size_sum.detach())
        term = size_sum if weight is None else weight * size_sum
        loss_sum = term if loss_sum is None else loss_sum + term
        if size == largest:
            stat_sums = size_stats
    directions = 2 if symmetric else 1
    if matryoshka:  # the per-size losses ride in the statistics' all-reduce
        stat_sums = torch.cat([stat_sums, torch.stack(size_sums).to(stat_sums)])
    # This rank's share of the global mean: summing it over ranks gives the global loss,
    # and (through the exact gather's backward) each rank's inputs receive exactly the
    # global-batch gradient. Dividing by the *global* row count, not the local one, is
    # what keeps that true when ranks hold different numbers of rows.
    local_share = loss_sum / (total * directions)
    if distributed:
        global_loss = all_reduce_sum(local_share, group)
        stat_sums = all_reduce_sum(stat_sums, group)
        # Value = the global loss on every rank; gradient = that of the local share.
        loss = local_share + (global_loss - local_share.detach())
    else:
        loss = local_share
    pos_sum, hardest_sum, hits, rows_with_negatives = stat_sums[:4]
    per_size = {f"loss_d{d}": float(v) / (total * directions)
                for (d, _), v in zip(sizes, stat_sums[4:])} if matryoshka else {}
    return ContrastiveOutput(
        loss=loss,
        positive_similarity=pos_sum / total,
        hardest_negative_similarity=hardest_sum / rows_with_negatives.clamp(min=1),
        accuracy=hits / total,
        stats_extra=per_size,
    )
