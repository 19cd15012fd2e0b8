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
drops a candidate whose similarity to the anchor's positive exceeds delta.

Cross-device negatives: with ``gather_mode`` set and a multi-rank process group, every
rank's queries and targets join every denominator (``gather.py``), labels are offset by
the rows of the ranks before this one, and each rank's loss is its share of the global
loss (sum of its rows / global row count). The returned value is the global loss on
every rank; its gradient w.r.t. this rank's inputs equals the slice of the gradient that
one device holding the whole global batch would compute (exact mode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

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

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"objective.temperature must be > 0, got {self.temperature}")
        if self.alpha < 0:
            raise ValueError(f"objective.alpha must be >= 0 (0 = InfoNCE), got {self.alpha}")
        if self.false_negative_threshold is not None and not -1.0 <= self.false_negative_threshold <= 1.0:
            raise ValueError("objective.false_negative_threshold is a cosine similarity in "
                             f"[-1, 1] (or null), got {self.false_negative_threshold}")
        check_choices(self, "objective.")


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
                           group=None) -> ContrastiveOutput:
    """LLaVE loss over L2-normalised ``query`` [B, D] and ``target`` [B, D] (pair i = row i).

    ``hard_negatives`` [B, K, D]: extra targets per query (query->target only).
    ``gather_mode``: None for one process; "exact" / "stop_grad" gathers every rank's rows
    into the denominators (a no-op on one rank). Ranks may hold different B.
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

    loss_sum, stat_sums = _direction(query, all_targets, positive_index, hard_negatives,
                                     temperature, alpha, false_negative_threshold)
    directions = 1
    if symmetric:
        loss_tq, _ = _direction(target, all_queries, positive_index, None, temperature, alpha,
                                false_negative_threshold)
        loss_sum = loss_sum + loss_tq
        directions = 2
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
    pos_sum, hardest_sum, hits, rows_with_negatives = stat_sums
    return ContrastiveOutput(
        loss=loss,
        positive_similarity=pos_sum / total,
        hardest_negative_similarity=hardest_sum / rows_with_negatives.clamp(min=1),
        accuracy=hits / total,
    )
