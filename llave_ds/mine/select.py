"""Which retrieved candidates become a query's hard negatives: the positive-aware rule.

A query's candidates come best first from the exact search (`llave_ds.mine.search`). Each is,
in this order:

1. **a copy of the positive**: the positive itself, or a candidate naming the same image or
   video file, or (text-only sides) the same text after stripping: never a negative, counted
   as ``copy``;
2. **outside the rank window**: ranks count the candidates left after (1), 0 = the best;
   ranks before ``skip_top`` (the very top, most likely unlabelled positives) and from
   ``skip_top + window`` on (``window`` > 0) are ``outside_window``;
3. **a likely false negative**: scoring above ``margin * score(positive)`` (``margin_kind:
   relative``, NV-Retriever's "TopK-PercPos", default 0.95) or above ``score(positive) -
   margin`` (``absolute``): ``above_margin``;
4. **kept**: the first ``num_negatives`` of the rest (``sampling: top``) or a sample of
   ``num_negatives`` of them (``sampling: random``, seeded by ``seed`` and the query's
   index, so the same query gets the same negatives whatever the ranks or the order); the
   eligible ones not taken are ``not_needed``.

A query left with fewer than ``num_negatives`` is ``short``: its row keeps what was found
(the caller counts and reports it; training with ``num_hard_negatives`` above that count
skips or refuses the row, docs/DATA.md). Everything here is pure: no model, no file.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import FrozenSet, List, Literal, Sequence, Tuple

import numpy as np

from llave_ds.config import check_choices

REASONS = ("copy", "outside_window", "above_margin", "kept", "not_needed")


@dataclass
class MineConfig:
    num_negatives: int = 3
    depth: int = 100                 # candidates retrieved per query (the positive and its copies included)
    margin_kind: Literal["relative", "absolute", "none"] = "relative"
    margin: float = 0.95             # relative: drop score > margin * positive; absolute: score > positive - margin
    skip_top: int = 0                # the rank window starts here (0 = the best candidate)
    window: int = 0                  # the window's length; 0 = to the end of the retrieved list
    sampling: Literal["top", "random"] = "top"
    seed: int = 0

    def validate(self) -> None:
        check_choices(self, "mine.")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.depth < self.num_negatives:
            raise ValueError(f"depth ({self.depth}) must be at least num_negatives ({self.num_negatives})")
        if self.skip_top < 0 or self.window < 0:
            raise ValueError(f"skip_top and window must be >= 0, got {self.skip_top} and {self.window}")
        if self.window and self.window < self.num_negatives:
            raise ValueError(f"window ({self.window}) must hold num_negatives ({self.num_negatives}) candidates")
        if self.skip_top + self.num_negatives > self.depth:
            raise ValueError(f"depth ({self.depth}) must reach past skip_top + num_negatives "
                             f"({self.skip_top} + {self.num_negatives})")
        if self.margin_kind == "relative" and not 0 < self.margin <= 1:
            raise ValueError(f"a relative margin is a fraction of the positive's score in (0, 1], got {self.margin}")
        if self.margin_kind == "absolute" and self.margin < 0:
            raise ValueError(f"an absolute margin must be >= 0, got {self.margin}")


def side_keys(text: str, image: str = "", video: str = "") -> FrozenSet[Tuple[str, str]]:
    """What makes two sides copies: the same image file, the same video file, or (neither
    medium) the same stripped text."""
    keys = set()
    if image:
        keys.add(("image", image))
    if video:
        keys.add(("video", video))
    if not keys:
        keys.add(("text", text.strip()))
    return frozenset(keys)


def margin_ceiling(positive_score: float, cfg: MineConfig) -> float:
    """The highest score a negative may have (inclusive)."""
    if cfg.margin_kind == "relative":
        return cfg.margin * positive_score
    if cfg.margin_kind == "absolute":
        return positive_score - cfg.margin
    return float("inf")


def select_negatives(ids: Sequence[int], scores: Sequence[float], positive_score: float, is_copy: Sequence[bool],
                     cfg: MineConfig, query_index: int) -> Tuple[List[int], Counter]:
    """The chosen candidate ids of one query (best first for ``top``, rank order for
    ``random``) and the count of each reason (`REASONS`) over its retrieved candidates.

    ``ids`` / ``scores``: the retrieved candidates, best first; ``is_copy[i]``: candidate i is
    the positive or a copy of it (`side_keys` intersect)."""
    counts: Counter = Counter({reason: 0 for reason in REASONS})
    ceiling = margin_ceiling(positive_score, cfg)
    eligible: List[int] = []
    rank = 0
    stop = cfg.skip_top + cfg.window if cfg.window else None
    for cid, score, copy in zip(ids, scores, is_copy):
        if copy:
            counts["copy"] += 1
            continue
        in_window = rank >= cfg.skip_top and (stop is None or rank < stop)
        rank += 1
        if not in_window:
            counts["outside_window"] += 1
        elif score > ceiling:
            counts["above_margin"] += 1
        else:
            eligible.append(int(cid))
    if cfg.sampling == "random" and len(eligible) > cfg.num_negatives:
        rng = np.random.default_rng([cfg.seed, query_index])
        picked = sorted(rng.choice(len(eligible), size=cfg.num_negatives, replace=False).tolist())
        chosen = [eligible[i] for i in picked]
    else:
        chosen = eligible[:cfg.num_negatives]
    counts["kept"] = len(chosen)
    counts["not_needed"] = len(eligible) - len(chosen)   # eligible, beyond the count
    return chosen, counts
