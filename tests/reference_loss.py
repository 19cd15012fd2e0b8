"""An independent float64 reference of the LLaVE loss, written from the paper's formula.

Deliberately naive (explicit loops, explicit weights and denominators, no logsumexp), so
it shares no code or structure with ``llave_ds.core.objective``.
"""
from __future__ import annotations

import torch


def direction_row_losses(anchors, candidates, rows, tau, alpha, hard=None, delta=None):
    """-log(e^{s_ii/tau} / (e^{s_ii/tau} + sum_j w_ij e^{s_ij/tau})) for each row i in rows.

    The positive of anchor i is candidates[i]; hard[i] (K x D) are extra negatives of i.
    A candidate c with <candidates[i], c> > delta is dropped from the denominator.
    """
    out = []
    for i in rows:
        pos = candidates[i]
        s_pos = anchors[i] @ pos
        numerator = torch.exp(s_pos / tau)
        denominator = numerator
        negs = [candidates[j] for j in range(candidates.shape[0]) if j != i]
        if hard is not None:
            negs += [hard[i, k] for k in range(hard.shape[1])]
        for c in negs:
            if delta is not None and float(pos.detach() @ c.detach()) > delta:
                continue
            s = anchors[i] @ c
            weight = torch.exp(alpha * s.detach())  # a constant for autograd
            denominator = denominator + weight * torch.exp(s / tau)
        out.append(-torch.log(numerator / denominator))
    return torch.stack(out)


def reference_loss_sum(q, t, rows, tau, alpha, symmetric, hard=None, delta=None):
    """Sum over ``rows`` of the per-row losses of both directions (when symmetric)."""
    total = direction_row_losses(q, t, rows, tau, alpha, hard, delta).sum()
    if symmetric:
        total = total + direction_row_losses(t, q, rows, tau, alpha, None, delta).sum()
    return total


def reference_loss(q, t, tau, alpha, symmetric, hard=None, delta=None):
    n = q.shape[0]
    return reference_loss_sum(q, t, range(n), tau, alpha, symmetric, hard, delta) / (
        n * (2 if symmetric else 1))


def prefix_normalised(x, size):
    """The first ``size`` coordinates of each row over their Euclidean length (written out)."""
    head = x[..., :size]
    return head / torch.sqrt((head * head).sum(dim=-1, keepdim=True))


def reference_matryoshka_loss_sum(q, t, rows, tau, alpha, symmetric, sizes, hard=None, delta=None):
    """sum_d w_d * reference_loss_sum on each size's re-normalised prefix; ``sizes`` is
    [(size, weight)]."""
    total = 0.0
    for size, weight in sizes:
        total = total + weight * reference_loss_sum(
            prefix_normalised(q, size), prefix_normalised(t, size), rows, tau, alpha, symmetric,
            None if hard is None else prefix_normalised(hard, size), delta)
    return total


def reference_matryoshka_loss(q, t, tau, alpha, symmetric, sizes, hard=None, delta=None):
    n = q.shape[0]
    return reference_matryoshka_loss_sum(q, t, range(n), tau, alpha, symmetric, sizes, hard, delta) / (
        n * (2 if symmetric else 1))
