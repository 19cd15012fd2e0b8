"""Positive vs hardest-negative similarity analysis (LLaVE paper, Figure 1 / Table 1).

A *group* is one model or setting (e.g. "InfoNCE" vs "LLaVE") given as per-query
positive similarities and hardest-negative similarities; `groups_from_scores` builds them
from MMEB score matrices (ground truth at candidate 0). `plot_similarity_histograms`
writes a PNG (matplotlib, Agg canvas, no pyplot state), `gap_table` a markdown table.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from llave_ds.eval.mmeb_metrics import DEFAULT_MARGINS, GapStats, gap_stats, positive_and_hardest_negative

Group = Tuple[Any, Any]  # (pos_sims [Q], hardest_neg_sims [Q])


def groups_from_scores(scores_by_label: Mapping[str, Any], ground_truth_index: int = 0) -> Dict[str, Group]:
    """{label: score matrix or list of per-query arrays} -> {label: (pos_sims, hardest_neg_sims)}.

    Queries without a negative (a single candidate) are left out.
    """
    out: Dict[str, Group] = {}
    for label, scores in scores_by_label.items():
        pos, neg, has_negative = positive_and_hardest_negative(scores, ground_truth_index)
        out[label] = (pos[has_negative], neg[has_negative])
    return out


def _stats(groups: Mapping[str, Group], margins: Sequence[float], bins: int) -> Dict[str, GapStats]:
    if not groups:
        raise ValueError("groups is empty: give {label: (pos_sims, hardest_neg_sims)}")
    out = {}
    for label, group in groups.items():
        if not isinstance(group, (tuple, list)) or len(group) != 2:
            raise ValueError(f"group {label!r}: expected (pos_sims, hardest_neg_sims)")
        try:
            out[label] = gap_stats(group[0], group[1], margins, bins)
        except ValueError as exc:
            raise ValueError(f"group {label!r}: {exc}") from None
    return out


def gap_table(groups: Mapping[str, Group], margins: Sequence[float] = DEFAULT_MARGINS, digits: int = 3) -> str:
    """Markdown table, one row per group: queries, mean positive, mean hardest negative,
    mean gap (positive - hardest negative) and, per margin m, the fraction of queries whose
    positive beats every negative by more than m."""
    stats = _stats(groups, margins, bins=10)
    head = (["group", "queries", "mean pos", "mean hardest neg", "mean gap"]
            + [f"pos > neg + {m:g}" for m in margins])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in stats.items():
        cells = [str(label), str(s.num_queries)] + [f"{v:.{digits}f}" for v in (s.mean_pos, s.mean_hardest_neg, s.mean_gap)]
        cells += [f"{s.frac_beaten_by[float(m)]:.{digits}f}" for m in margins]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_similarity_histograms(groups: Mapping[str, Group], path: str, *, bins: int = 50,
                               title: Optional[str] = None, value_range: Optional[Tuple[float, float]] = None,
                               dpi: int = 100) -> str:
    """Write a PNG with one panel per group, overlaying the distribution of positive and
    hardest-negative similarities (shared bins and x axis), means marked. Returns ``path``.

    ``value_range``: x range of the bins; default the data's range (all groups) padded by 2 %.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = _stats(groups, DEFAULT_MARGINS, bins)
    arrays = [np.asarray(g[i], dtype=np.float64).ravel() for g in groups.values() for i in (0, 1)]
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if value_range is not None:
        lo, hi = value_range
    elif finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        pad = max(0.02 * (hi - lo), 1e-3)
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = -1.0, 1.0
    edges = np.linspace(lo, hi, bins + 1)
    n = len(stats)
    fig = Figure(figsize=(4.5 * n, 3.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False, sharex=True)[0]
    for ax, (label, (pos, neg)) in zip(axes, groups.items()):
        s = stats[label]
        pos = np.asarray(pos, dtype=np.float64).ravel()
        neg = np.asarray(neg, dtype=np.float64).ravel()
        neg = neg[np.isfinite(neg)]
        ax.hist(pos, bins=edges, alpha=0.55, color="tab:blue", label="positive")
        ax.hist(neg, bins=edges, alpha=0.55, color="tab:red", label="hardest negative")
        if s.num_queries:
            ax.axvline(s.mean_pos, color="tab:blue", linestyle="--", linewidth=1)
            ax.axvline(s.mean_hardest_neg, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(f"{label}\ngap {s.mean_gap:.3f}, n={s.num_queries}", fontsize=10)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("queries")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png")
    return path
