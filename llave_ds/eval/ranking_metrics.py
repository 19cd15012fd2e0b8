"""MMEB-V2's ranking metrics, as the official code computes them from ranked candidate names.

The spec is ``RankingMetrics`` in TIGER-AI-Lab/VLM2Vec ``src/utils/eval_utils/metrics.py``
(commit 6e1e1d4): for k in (1, 5, 10), averaged over the queries of a task,

* ``hit@k``: 1 if any relevant name is in the top k (0 for a query without relevant names);
* ``precision@k``: distinct relevant names in the top k / k (0 without relevant names);
* ``recall@k``: distinct relevant names in the top k / relevant names (1.0 without any: the
  official convention);
* ``f1@k``: 2 P R / (P + R), 0 when both are 0;
* ``map@k``: sum of precision at each relevant position of the top k, divided by
  min(relevant names, k) (0 without relevant names);
* ``mrr@k``: 1 / position of the first relevant name within the top k, else 0;
* ``ndcg_linear@k`` / ``ndcg_exponential@k``: DCG of the top k with gain g or 2^g - 1 and
  discount log2(position + 1), over the ideal DCG (the grades sorted, top k; binary
  relevance: min(relevant, k) ones); 0 when the ideal DCG is 0.

A task's relevant names are de-duplicated first (the official ``list(set(label))``); the
position-wise sums (``map``, ``ndcg``) count a relevant name each time the ranking repeats it,
the set-based ones (``hit``, ``precision``, ``recall``) once, as the official code does.

One deliberate difference, graded relevance (``rel_scores``, the visual-document qrels): the
official code de-duplicates the relevant names through a Python ``set`` and then pairs them
with the grades in their original order, so a grade can land on another page; the set's order
depends on the process's string-hash seed, so for a query whose relevant pages have different
grades the official NDCG changes from run to run and cannot be reproduced. We pair each page
with its own grade (the qrels' meaning). With equal grades (binary qrels) the two agree exactly;
docs/EVALUATION.md.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

KS = (1, 5, 10)
ALL_METRICS = ("hit", "ndcg", "precision", "recall", "f1", "map", "mrr")  # the official default list


def _unique(labels: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(labels))


def _dcg(gains: Sequence[float], exponential: bool) -> float:
    return sum(((2.0 ** g - 1.0) if exponential else g) / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(prediction: Sequence[str], labels: Sequence[str], k: int,
              rel_scores: Optional[Sequence[float]] = None, exponential: bool = False) -> float:
    """NDCG@k of one query (module docstring); ``labels`` already de-duplicated."""
    if rel_scores is None:
        grade = {name: 1.0 for name in labels}
        ideal = [1.0] * min(len(grade), k)
    else:
        if len(rel_scores) != len(labels):
            raise ValueError(f"rel_scores has {len(rel_scores)} grades for {len(labels)} relevant names")
        grade = {}
        for name, g in zip(labels, rel_scores):
            grade.setdefault(name, float(g))
        ideal = sorted(grade.values(), reverse=True)[:k]
    gains = [grade.get(name, 0.0) for name in prediction[:k]]
    ideal_dcg = _dcg(ideal, exponential) if ideal else 1.0
    return _dcg(gains, exponential) / ideal_dcg if ideal_dcg > 0 else 0.0


def query_metrics(prediction: Sequence[str], labels: Sequence[str], rel_scores: Optional[Sequence[float]] = None,
                  ks: Sequence[int] = KS, metrics: Sequence[str] = ALL_METRICS) -> Dict[str, float]:
    """Every metric of one query at every k (the keys of the official score file)."""
    if rel_scores is not None:  # keep each name's own grade through the de-duplication
        pairs = {}
        for name, g in zip(labels, rel_scores):
            pairs.setdefault(name, g)
        labels, rel_scores = list(pairs), list(pairs.values())
    else:
        labels = _unique(labels)
    relevant = set(labels)
    out: Dict[str, float] = {}
    for k in sorted(ks):
        top = prediction[:k]
        hits = len(set(top) & relevant)
        p = hits / k if relevant and k else 0.0
        r = (hits / len(relevant)) if relevant else 1.0
        if "hit" in metrics:
            out[f"hit@{k}"] = 1.0 if relevant and hits else 0.0
        if "ndcg" in metrics:
            out[f"ndcg_linear@{k}"] = ndcg_at_k(prediction, labels, k, rel_scores, exponential=False)
            out[f"ndcg_exponential@{k}"] = ndcg_at_k(prediction, labels, k, rel_scores, exponential=True)
        if "precision" in metrics:
            out[f"precision@{k}"] = p
        if "recall" in metrics:
            out[f"recall@{k}"] = r
        if "f1" in metrics:
            out[f"f1@{k}"] = 2 * p * r / (p + r) if p + r else 0.0
        if "map" in metrics:
            found, total = 0, 0.0
            for i, name in enumerate(top):
                if name in relevant:
                    found += 1
                    total += found / (i + 1)
            out[f"map@{k}"] = total / min(len(relevant), k) if relevant and found else 0.0
        if "mrr" in metrics:
            first = next((i for i, name in enumerate(top) if name in relevant), None) if relevant else None
            out[f"mrr@{k}"] = 1.0 / (first + 1) if first is not None else 0.0
    return out


# The official score file's key order: metric families in this order, each at every k.
_KEY_ORDER = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1", "map", "mrr")


def score_predictions(preds: Sequence[Mapping], ks: Sequence[int] = KS,
                      metrics: Sequence[str] = ALL_METRICS) -> Dict[str, float]:
    """A task's score dict from its prediction records (``{"prediction": [...], "label":
    [...] or name, "rel_scores": [...] or None}``): each metric's mean over the queries, in
    the official score file's key order, then ``num_pred`` and ``num_data``."""
    sums: Dict[str, float] = {}
    for rec in preds:
        labels = rec["label"] if isinstance(rec["label"], (list, tuple)) else [rec["label"]]
        for key, value in query_metrics(rec["prediction"], labels, rec.get("rel_scores"), ks, metrics).items():
            sums[key] = sums.get(key, 0.0) + value
    n = len(preds)
    order = [f"{family}@{k}" for family in _KEY_ORDER for k in sorted(ks)]
    out = {key: (sums[key] / n if n else 0.0) for key in order if key in sums or (not n and _wanted(key, metrics))}
    out["num_pred"] = n
    out["num_data"] = n
    return out


def _wanted(key: str, metrics: Sequence[str]) -> bool:
    family = key.split("@")[0]
    return (family.split("_")[0] if family.startswith("ndcg") else family) in metrics
