"""MMEB scoring from score matrices: precision@1, aggregation, similarity-gap statistics.

Pure numpy (torch tensors are accepted and converted); no models. See docs/EVALUATION.md.

Conventions (MMEB / VLM2Vec):

- one query's candidates are scored by cosine similarity; the ground truth is candidate
  0 (``ground_truth_index``);
- precision@1 (hit@1) of a query is 1 when the ground truth has the highest score. The
  official scorer takes ``argmax``, whose first index wins ties, so a tie with the ground
  truth at index 0 counts as a hit: ``tie_policy="first"`` (default, comparable to
  published numbers). ``tie_policy="strict"`` counts any tie with the ground truth as a
  miss (the ground truth must beat every other candidate);
- a subset's score is the mean hit rate over its queries; MMEB's overall score, and each
  category / IND / OOD score, is the *unweighted* mean of the subset scores.

Subset metadata (category, in/out-of-distribution) lives in ``mmeb_subsets.json`` next to
this module: the 36 official MMEB(-V1) subsets plus the offline synthetic ones.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

CATEGORIES: Tuple[str, ...] = ("classification", "vqa", "retrieval", "grounding")
CATEGORY_ABBREVIATIONS: Dict[str, str] = {
    "classification": "CLS", "vqa": "VQA", "retrieval": "RET", "grounding": "GD"}
DISTRIBUTIONS: Tuple[str, ...] = ("IND", "OOD", "synthetic")
TIE_POLICIES: Tuple[str, ...] = ("first", "strict")
DEFAULT_MARGINS: Tuple[float, ...] = (0.0, 0.05, 0.1)
SUBSETS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "mmeb_subsets.json")

ArrayLike = Any  # numpy array, torch tensor, or nested sequences of numbers


# --------------------------------------------------------------------------- subsets

@dataclass(frozen=True)
class SubsetInfo:
    """What a subset counts towards: its category and its distribution.

    ``distribution`` is "IND" (an MMEB-train subset too), "OOD", "synthetic" or None (a
    user subset that counts towards neither IND nor OOD). ``official`` marks the 36
    MMEB(-V1) subsets.
    """
    name: str
    category: str
    distribution: Optional[str] = None
    official: bool = False

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"subset {self.name!r}: category must be one of {list(CATEGORIES)}, "
                             f"got {self.category!r}")
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"subset {self.name!r}: distribution must be one of {list(DISTRIBUTIONS)} or None, "
                             f"got {self.distribution!r}")


def _read_subsets_file() -> Dict[str, Any]:
    with open(SUBSETS_FILE, encoding="utf-8") as fh:
        return json.load(fh)


def official_subsets() -> Dict[str, SubsetInfo]:
    """The 36 MMEB(-V1) evaluation subsets, in the benchmark's order (from mmeb_subsets.json)."""
    data = _read_subsets_file()["official"]
    return {name: SubsetInfo(name, d["category"], d["distribution"], official=True) for name, d in data.items()}


def synthetic_subsets() -> Dict[str, SubsetInfo]:
    """The subsets of `llave_ds.toy.synthetic` (distribution "synthetic": neither IND nor OOD)."""
    data = _read_subsets_file()["synthetic"]
    return {name: SubsetInfo(name, d["category"], d.get("distribution", "synthetic")) for name, d in data.items()}


SubsetSpec = Union[str, Mapping[str, Any], SubsetInfo]


def _as_info(name: str, spec: SubsetSpec) -> SubsetInfo:
    if isinstance(spec, SubsetInfo):
        return SubsetInfo(name, spec.category, spec.distribution, spec.official)
    if isinstance(spec, str):
        return SubsetInfo(name, spec, None)
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"category", "distribution"}
        if "category" not in spec or unknown:
            raise ValueError(f"subset {name!r}: expected {{'category': ..., 'distribution': ...}}, got {dict(spec)!r}")
        return SubsetInfo(name, spec["category"], spec.get("distribution"))
    raise TypeError(f"subset {name!r}: expected a category name, a mapping or a SubsetInfo, "
                    f"got {type(spec).__name__}")


def subset_registry(extra: Optional[Mapping[str, SubsetSpec]] = None) -> Dict[str, SubsetInfo]:
    """Official + synthetic subsets, plus ``extra`` (user subsets).

    ``extra`` maps a subset name to a category name (``"retrieval"``: counts towards its
    category and the overall mean, not towards IND/OOD), to ``{"category": ...,
    "distribution": "IND" | "OOD" | "synthetic" | None}``, or to a `SubsetInfo`. Giving
    an official subset a different category or distribution is refused.
    """
    registry = dict(official_subsets())
    registry.update(synthetic_subsets())
    for name, spec in (extra or {}).items():
        info = _as_info(name, spec)
        known = registry.get(name)
        if known is not None and known.official:
            if (info.category, info.distribution) != (known.category, known.distribution):
                raise ValueError(f"subset {name!r} is an official MMEB subset ({known.category}, "
                                 f"{known.distribution}); refusing to redefine it as ({info.category}, "
                                 f"{info.distribution})")
            continue
        registry[name] = info
    return registry


# --------------------------------------------------------------------------- score inputs

def _to_numpy(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor (bf16 has no numpy dtype)
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        return x.numpy()
    return np.asarray(x)


def _score_rows(scores: Union[ArrayLike, Sequence[ArrayLike]]) -> Union[np.ndarray, List[np.ndarray]]:
    """A 2-D float array [Q, C], or a list of 1-D float arrays (variable candidate counts)."""
    if isinstance(scores, (list, tuple)):
        if len(scores) == 0:
            return np.zeros((0, 1))
        if all(np.ndim(s) == 0 for s in scores):
            raise ValueError("scores is a flat list of numbers; expected [Q, C] or a list of per-query arrays "
                             "(for a single query pass [scores])")
        rows = []
        for q, s in enumerate(scores):
            a = _to_numpy(s)
            if a.ndim != 1:
                raise ValueError(f"query {q}: expected a 1-D array of candidate scores, got shape {a.shape}")
            rows.append(a.astype(np.float64, copy=False))
        return rows
    a = _to_numpy(scores)
    if a.ndim != 2:
        raise ValueError(f"scores must be a [Q, C] matrix or a list of per-query arrays, got shape {a.shape}"
                         + (" (for a single query pass scores[None])" if a.ndim == 1 else ""))
    return a.astype(np.float64, copy=False)


def _per_query(value: Union[int, ArrayLike], num_queries: int, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return np.full(num_queries, int(arr), dtype=np.int64)
    if arr.shape != (num_queries,):
        raise ValueError(f"{what} must be an int or have one entry per query ({num_queries}), got shape {arr.shape}")
    return arr.astype(np.int64)


def _check_row(q: int, row: np.ndarray, gt: int) -> None:
    if row.size == 0:
        raise ValueError(f"query {q} has no candidates")
    if not 0 <= gt < row.size:
        raise ValueError(f"query {q}: ground_truth_index {gt} out of range for {row.size} candidates")
    if np.isnan(row).any():
        j = int(np.flatnonzero(np.isnan(row))[0])
        raise ValueError(f"query {q}: score of candidate {j} is NaN")


def _check_ids(q: int, ids: Optional[np.ndarray], size: int) -> None:
    if ids is not None and ids.shape != (size,):
        raise ValueError(f"query {q}: candidate_ids has {ids.shape} entries for {size} candidates")


# --------------------------------------------------------------------------- precision@1

def precision_at_1(scores: Union[ArrayLike, Sequence[ArrayLike]], ground_truth_index: Union[int, ArrayLike] = 0,
                   tie_policy: str = "first",
                   candidate_ids: Optional[Union[ArrayLike, Sequence[ArrayLike]]] = None) -> np.ndarray:
    """Per-query hit@1 (bool array [Q]); its mean is the subset's MMEB score.

    scores: a [Q, C] matrix (numpy or torch) or a list of Q 1-D arrays when queries have
        different candidate counts.
    ground_truth_index: the ground truth's candidate index (MMEB: 0), or one per query.
    tie_policy: "first" (default, the official scorer): hit iff ``argmax`` (first index
        of the maximum) is the ground truth, so with the ground truth at index 0 a tie
        counts as a hit; with the ground truth at index g > 0 a tied candidate before g
        wins. "strict": hit iff the ground truth scores strictly above every other
        candidate (any tie is a miss).
    candidate_ids: optional item ids of the candidates (same shape as ``scores``, e.g.
        ``candidate_index`` from `llave_ds.eval.mmeb_data.unique_items`). Candidates with the
        ground truth's id are the same item and never count against it (they tie with it
        exactly when embedded once).

    A query with a single candidate is always a hit. A NaN score raises ValueError naming
    the query. Ties are exact float equality.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {list(TIE_POLICIES)}, got {tie_policy!r}")
    rows = _score_rows(scores)
    num_queries = len(rows)
    gts = _per_query(ground_truth_index, num_queries, "ground_truth_index")
    ids = None if candidate_ids is None else _score_ids(candidate_ids, num_queries)
    if isinstance(rows, np.ndarray) and (ids is None or isinstance(ids, np.ndarray)):
        return _p1_matrix(rows, gts, tie_policy, ids)
    hits = np.zeros(num_queries, dtype=bool)
    for q in range(num_queries):
        row = rows[q]
        qids = None if ids is None else np.asarray(ids[q])
        _check_row(q, row, int(gts[q]))
        _check_ids(q, qids, row.size)
        hits[q] = _p1_matrix(row[None], gts[q:q + 1], tie_policy, None if qids is None else qids[None])[0]
    return hits


def _score_ids(candidate_ids, num_queries: int):
    if isinstance(candidate_ids, (list, tuple)):
        if len(candidate_ids) != num_queries:
            raise ValueError(f"candidate_ids has {len(candidate_ids)} rows for {num_queries} queries")
        return [np.asarray(_to_numpy(c)) for c in candidate_ids]
    return np.asarray(_to_numpy(candidate_ids))


def _p1_matrix(s: np.ndarray, gts: np.ndarray, tie_policy: str, ids: Optional[np.ndarray]) -> np.ndarray:
    num_queries, num_candidates = s.shape
    if num_queries == 0:
        return np.zeros(0, dtype=bool)
    if num_candidates == 0:
        raise ValueError("query 0 has no candidates")
    if ((gts < 0) | (gts >= num_candidates)).any():
        q = int(np.flatnonzero((gts < 0) | (gts >= num_candidates))[0])
        raise ValueError(f"query {q}: ground_truth_index {gts[q]} out of range for {num_candidates} candidates")
    nan = np.isnan(s)
    if nan.any():
        q, j = (int(v) for v in np.argwhere(nan)[0])
        raise ValueError(f"query {q}: score of candidate {j} is NaN")
    rows = np.arange(num_queries)
    if ids is not None:
        if ids.shape != s.shape:
            raise ValueError(f"candidate_ids has shape {ids.shape}, scores {s.shape}")
        same = ids == ids[rows, gts][:, None]          # the ground truth and its duplicates
    else:
        same = np.zeros(s.shape, dtype=bool)
        same[rows, gts] = True
    if tie_policy == "first":
        return same[rows, np.argmax(s, axis=1)]
    others = np.where(same, -np.inf, s).max(axis=1)   # -inf when there is no other candidate
    return s[rows, gts] > others


# --------------------------------------------------------------------------- embeddings -> scores

def candidate_scores(item_embeddings: ArrayLike, query_index: ArrayLike, candidate_index: Sequence[ArrayLike],
                     normalize: bool = False, max_dense: int = 1 << 25) -> Union[np.ndarray, List[np.ndarray]]:
    """Cosine scores of each query against its candidates from deduplicated item embeddings.

    ``item_embeddings`` [N, D] in the item order of `llave_ds.eval.mmeb_data.unique_items`;
    ``query_index`` [Q] and ``candidate_index`` (Q arrays) index into it. Embeddings are
    assumed L2-normalised (LLaVE's are) unless ``normalize=True``. Computed in float32
    (float64 if given float64). When Q x (distinct candidates) <= ``max_dense`` one matrix
    product serves all queries (classification: shared labels), else one product per
    query; memory stays O(Q x C + N x D) either way. Returns a [Q, C] matrix when every
    query has the same number of candidates, else a list of arrays.
    """
    emb = _to_numpy(item_embeddings)
    emb = emb.astype(np.float64 if emb.dtype == np.float64 else np.float32, copy=False)
    if emb.ndim != 2:
        raise ValueError(f"item_embeddings must be [N, D], got shape {emb.shape}")
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    qi = np.asarray(query_index, dtype=np.int64)
    if len(candidate_index) != len(qi):
        raise ValueError(f"{len(qi)} queries but {len(candidate_index)} candidate index arrays")
    ci = [np.asarray(c, dtype=np.int64) for c in candidate_index]
    if len(qi) == 0:
        return np.zeros((0, 0), dtype=emb.dtype)
    uniq = np.unique(np.concatenate(ci))
    if len(qi) * len(uniq) <= max_dense:
        dense = emb[qi] @ emb[uniq].T                                  # [Q, distinct candidates]
        rows = [dense[q, np.searchsorted(uniq, c)] for q, c in enumerate(ci)]
    else:
        rows = [emb[c] @ emb[q] for q, c in zip(qi, ci)]
    return np.stack(rows) if len({len(c) for c in ci}) == 1 else rows


# --------------------------------------------------------------------------- aggregation

UNKNOWN_POLICIES: Tuple[str, ...] = ("raise", "separate")


def aggregate(per_subset: Mapping[str, float], subset_info: Optional[Mapping[str, SubsetSpec]] = None,
              unknown: str = "raise") -> Dict[str, Any]:
    """MMEB summary of per-subset precision@1 values (fractions in [0, 1]).

    Every mean is the unweighted mean of the subset scores it covers (the MMEB convention),
    over the subsets present only. ``subset_info`` adds user subsets to the official and
    synthetic ones (see `subset_registry`). A subset known to neither raises ValueError
    (``unknown="raise"``, default: a silent drop would hide a typo) or, with
    ``unknown="separate"``, is reported under ``other`` and left out of every mean (so one
    extra subset, e.g. the CIFAR-100 directory of the hub download, costs nothing else).

    Returns a dict:
      ``overall``: mean over all subsets given (None when none);
      ``by_category``: {classification, vqa, retrieval, grounding} -> mean or None;
      ``by_distribution``: {"IND", "OOD"} (and "synthetic" when present) -> mean or None;
      ``counts``: number of subsets behind each of these means (same keys, plus "overall");
      ``per_subset``: the input scores; ``subsets``: name -> {category, distribution, official};
      ``missing_official``: official subsets not given, in benchmark order (of ``num_official``);
      ``comparable_to_mmeb``: all 36 official subsets present and nothing else;
      ``other``: {name: score} of the subsets without a known category (``unknown="separate"``
      only; empty when there are none).
    """
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {list(UNKNOWN_POLICIES)}, got {unknown!r}")
    registry = subset_registry(subset_info)
    unknown_names = [name for name in per_subset if name not in registry]
    if unknown_names and unknown == "raise":
        raise ValueError(f"no category known for subset(s) {unknown_names}: pass subset_info={{name: category}} "
                         f"(one of {list(CATEGORIES)}) or {{name: {{'category': ..., 'distribution': ...}}}}, "
                         "or unknown='separate' to report them apart from every aggregate")
    scores: Dict[str, float] = {}
    other: Dict[str, float] = {}
    for name, value in per_subset.items():
        v = float(value)
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            hint = " (looks like a percentage: pass fractions, e.g. 0.652 not 65.2)" if 1.0 < v <= 100.0 else ""
            raise ValueError(f"subset {name!r}: score must be a fraction in [0, 1], got {value!r}{hint}")
        (other if name in unknown_names else scores)[name] = v

    def mean(names: List[str]) -> Optional[float]:
        return float(np.mean([scores[n] for n in names])) if names else None

    by_category, by_distribution, counts = {}, {}, {"overall": len(scores)}
    for cat in CATEGORIES:
        names = [n for n in scores if registry[n].category == cat]
        by_category[cat], counts[cat] = mean(names), len(names)
    dists = ["IND", "OOD"] + (["synthetic"] if any(registry[n].distribution == "synthetic" for n in scores) else [])
    for dist in dists:
        names = [n for n in scores if registry[n].distribution == dist]
        by_distribution[dist], counts[dist] = mean(names), len(names)
    official = [n for n, info in registry.items() if info.official]
    missing = [n for n in official if n not in scores]
    return dict(
        overall=mean(list(scores)),
        by_category=by_category,
        by_distribution=by_distribution,
        counts=counts,
        per_subset=dict(scores),
        subsets={n: dict(category=registry[n].category, distribution=registry[n].distribution,
                         official=registry[n].official) for n in scores},
        missing_official=missing,
        num_official=len(official),
        comparable_to_mmeb=not missing and len(scores) == len(official),
        **({"other": other} if unknown == "separate" else {}),
    )


def _fmt(value: Optional[float], percent: bool, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value * 100 if percent else value:.{digits}f}"


def markdown_table(result: Mapping[str, Any], *, percent: bool = True, digits: int = 1,
                   per_subset: bool = True) -> str:
    """Markdown summary of an `aggregate` result (scores ×100 with ``percent``, like the papers).

    A summary row (overall, per category, IND/OOD[/synthetic]) with subset counts, then,
    with ``per_subset``, one row per subset grouped by category, then a note on missing
    official subsets, then the ``other`` subsets (no known category), which no aggregate covers.
    """
    dists = list(result["by_distribution"])
    head = ["Overall"] + [CATEGORY_ABBREVIATIONS[c] for c in CATEGORIES] + dists
    values = ([result["overall"]] + [result["by_category"][c] for c in CATEGORIES]
              + [result["by_distribution"][d] for d in dists])
    counts = [result["counts"]["overall"]] + [result["counts"][c] for c in CATEGORIES] + [result["counts"][d] for d in dists]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|",
             "| score | " + " | ".join(_fmt(v, percent, digits) for v in values) + " |",
             "| subsets | " + " | ".join(str(c) for c in counts) + " |"]
    if per_subset and result["per_subset"]:
        lines += ["", "| subset | category | distribution | P@1 |", "|---|---|---|---|"]
        info = result["subsets"]
        order = {c: i for i, c in enumerate(CATEGORIES)}
        names = sorted(result["per_subset"], key=lambda n: order[info[n]["category"]])  # stable: keeps input order
        for n in names:
            lines.append(f"| {n} | {info[n]['category']} | {info[n]['distribution'] or '–'} | "
                         f"{_fmt(result['per_subset'][n], percent, digits)} |")
    missing = result["missing_official"]
    if result.get("comparable_to_mmeb"):
        lines += ["", f"All {result['num_official']} official MMEB subsets present: comparable to published MMEB scores."]
    else:
        parts = []
        if missing:
            listed = f": {', '.join(missing)}" if len(missing) <= 12 else ""
            parts.append(f"{len(missing)} of {result['num_official']} official subsets missing{listed}")
        if any(not i["official"] for i in result["subsets"].values()):
            parts.append("non-official subsets included")
        lines += ["", "Not comparable to published MMEB scores: " + "; ".join(parts) + "."]
    other = result.get("other") or {}
    if other:
        lines += ["", f"Other subsets ({len(other)}; no known category, in no aggregate above):", "",
                  "| subset | P@1 |", "|---|---|"]
        lines += [f"| {n} | {_fmt(v, percent, digits)} |" for n, v in other.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- similarity gaps

def positive_and_hardest_negative(scores: Union[ArrayLike, Sequence[ArrayLike]],
                                  ground_truth_index: Union[int, ArrayLike] = 0,
                                  candidate_ids: Optional[Union[ArrayLike, Sequence[ArrayLike]]] = None,
                                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query positive similarity and hardest (highest-scoring) negative similarity.

    Returns ``(pos, hardest_neg, has_negative)``, each [Q]; a query without any negative
    (a single candidate, or only duplicates of the ground truth under ``candidate_ids``)
    has ``hardest_neg = -inf`` and ``has_negative = False``. NaN raises ValueError.
    """
    rows = _score_rows(scores)
    num_queries = len(rows)
    gts = _per_query(ground_truth_index, num_queries, "ground_truth_index")
    ids = None if candidate_ids is None else _score_ids(candidate_ids, num_queries)
    pos = np.empty(num_queries)
    neg = np.empty(num_queries)
    for q in range(num_queries):
        row = rows[q]
        _check_row(q, row, int(gts[q]))
        qids = None if ids is None else np.asarray(ids[q])
        _check_ids(q, qids, row.size)
        same = np.zeros(row.size, dtype=bool) if qids is None else qids == qids[gts[q]]
        same[gts[q]] = True
        pos[q] = row[gts[q]]
        neg[q] = row[~same].max() if (~same).any() else -np.inf
    return pos, neg, neg != -np.inf


@dataclass
class GapStats:
    """Positive vs hardest-negative similarity summary (the LLaVE paper's Table 1 / Figure 1).

    ``frac_beaten_by[m]``: fraction of queries whose positive beats their hardest negative
    (hence every negative) by more than ``m``: ``pos - hardest_neg > m`` (strict).
    Histograms share ``hist_edges``.
    """
    num_queries: int
    mean_pos: float
    mean_hardest_neg: float
    mean_gap: float
    frac_beaten_by: Dict[float, float]
    hist_edges: np.ndarray
    pos_hist: np.ndarray
    neg_hist: np.ndarray
    num_without_negative: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return dict(num_queries=self.num_queries, mean_pos=self.mean_pos, mean_hardest_neg=self.mean_hardest_neg,
                    mean_gap=self.mean_gap, frac_beaten_by={str(k): v for k, v in self.frac_beaten_by.items()},
                    hist_edges=self.hist_edges.tolist(), pos_hist=self.pos_hist.tolist(),
                    neg_hist=self.neg_hist.tolist(), num_without_negative=self.num_without_negative)


def histogram_edges(*arrays: np.ndarray, bins: int = 50) -> np.ndarray:
    """Common bin edges: [-1, 1] (cosine range), widened if the data fall outside it."""
    finite = [a[np.isfinite(a)] for a in arrays if np.size(a)]
    lo = min([-1.0] + [float(a.min()) for a in finite if a.size])
    hi = max([1.0] + [float(a.max()) for a in finite if a.size])
    return np.linspace(lo, hi, bins + 1)


def gap_stats(pos_sims: ArrayLike, hardest_neg_sims: ArrayLike, margins: Sequence[float] = DEFAULT_MARGINS,
              bins: int = 50) -> GapStats:
    """`GapStats` from per-query positive and hardest-negative similarities (equal lengths).

    Queries whose hardest negative is -inf (no negative) are left out and counted in
    ``num_without_negative``; NaN raises ValueError.
    """
    pos = _to_numpy(pos_sims).astype(np.float64).ravel()
    neg = _to_numpy(hardest_neg_sims).astype(np.float64).ravel()
    if pos.shape != neg.shape:
        raise ValueError(f"pos_sims has {pos.size} values, hardest_neg_sims {neg.size}")
    for what, a in (("pos_sims", pos), ("hardest_neg_sims", neg)):
        if np.isnan(a).any():
            raise ValueError(f"{what}[{int(np.flatnonzero(np.isnan(a))[0])}] is NaN")
    keep = neg != -np.inf
    pos, neg = pos[keep], neg[keep]
    gap = pos - neg
    n = int(pos.size)
    edges = histogram_edges(pos, neg, bins=bins)

    def m(a):
        return float(a.mean()) if n else float("nan")

    return GapStats(num_queries=n, mean_pos=m(pos), mean_hardest_neg=m(neg), mean_gap=m(gap),
                    frac_beaten_by={float(mg): (float((gap > mg).mean()) if n else float("nan")) for mg in margins},
                    hist_edges=edges, pos_hist=np.histogram(pos, edges)[0], neg_hist=np.histogram(neg, edges)[0],
                    num_without_negative=int((~keep).sum()))


def similarity_gap_stats(scores: Union[ArrayLike, Sequence[ArrayLike]], margins: Sequence[float] = DEFAULT_MARGINS,
                         ground_truth_index: Union[int, ArrayLike] = 0, bins: int = 50,
                         candidate_ids: Optional[Union[ArrayLike, Sequence[ArrayLike]]] = None) -> GapStats:
    """`gap_stats` from score matrices with the ground truth at ``ground_truth_index`` (MMEB: 0)."""
    pos, neg, _ = positive_and_hardest_negative(scores, ground_truth_index, candidate_ids)
    return gap_stats(pos, neg, margins, bins)
