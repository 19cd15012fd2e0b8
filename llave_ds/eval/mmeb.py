"""MMEB evaluation: ``llave-ds eval --model DIR --data DIR [--subsets ...] [--out FILE.json]``.

For each subset: every distinct query and candidate is embedded once (spread across
ranks when launched distributed), candidates are scored by cosine similarity, and
precision@1 is the share of queries whose ground truth (candidate 0) scores highest.
Aggregates per category, in-distribution / out-of-distribution and overall use the
official subset lists (``mmeb_subsets.json``). ``--analysis-dir`` adds the similarity-gap
analysis: positive vs hardest-negative similarity histograms (PNG) and a table.

Without ``--subsets`` the official and synthetic subsets found in the data directory are
evaluated; anything else there (the hub download's CIFAR-100) is listed and skipped. Each
subset's result is written to ``<subset>_score.json`` as soon as it is done (like the
official VLM2Vec eval), and a re-run loads a subset whose score file matches the model,
data and options instead of encoding it again. A named subset without a known category
is scored and reported on its own, outside every aggregate. See docs/EVALUATION.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from llave_ds.core import distributed
from llave_ds.core.objective import matryoshka_sizes, truncate
from llave_ds.data.mmeb_files import is_local_source
from llave_ds.eval.encoding import (embed_dataset, eval_process_group, load_embedder, load_on_every_rank,
                                    rank0_then_shared)
from llave_ds.eval.mmeb_data import CANDIDATE, QUERY, EvalSubset, check_subset_names, load_eval_subsets, unique_items
from llave_ds.eval.mmeb_metrics import (aggregate, candidate_scores, markdown_table, official_subsets,
                                        positive_and_hardest_negative, precision_at_1, similarity_gap_stats,
                                        subset_registry, synthetic_subsets)
from llave_ds.eval.score_files import data_fingerprint, model_fingerprint, read_score_file, score_file, write_score_file
from llave_ds.media.image import load_image
from llave_ds.media.side import Side

logger = logging.getLogger(__name__)

class _SideLoader(torch.utils.data.Dataset):
    """The items of one role as sides, each image decoded when its batch is asked for (in a
    DataLoader worker): memory holds the batches in flight, not every image of the subset."""

    def __init__(self, subset: EvalSubset, items, max_image_pixels: Optional[int] = None):
        self.subset, self.items, self.max_image_pixels = subset, list(items), max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Side:
        item = self.items[i]
        image = None
        if item.image_path:
            kwargs = {"max_pixels": self.max_image_pixels} if self.max_image_pixels else {}
            try:
                image = load_image(self.subset.image_path(item.image_path), **kwargs)
            except (ValueError, OSError) as exc:  # reported by the main process, without a worker traceback
                return Side(item.text, image_path=item.image_path, error=f"{type(exc).__name__}: {exc}")
        return Side(item.text, image, image_path=item.image_path or None)


def embed_items(embedder, subset: EvalSubset, items, *, batch_size: int, progress: bool,
                num_workers: int = 2) -> torch.Tensor:
    """Embeddings of ``items`` in order, queries and candidates each formatted for their role
    (instructions) and encoded by `llave_ds.eval.encoding.embed_dataset`: spread over the ranks,
    images decoded by ``num_workers`` DataLoader workers while the model encodes."""
    out = torch.empty(len(items), embedder.dim, dtype=torch.float32)
    for role in (QUERY, CANDIDATE):  # both roles on every rank: the same gathers everywhere
        idx = [i for i, it in enumerate(items) if it.role == role]
        name = "target" if role == CANDIDATE else "query"
        out[idx] = embed_dataset(embedder, _SideLoader(subset, [items[i] for i in idx]), role=name,
                                 desc=f"{subset.name} {name}", batch_size=batch_size, progress=progress,
                                 num_workers=num_workers, where=f"MMEB-eval subset {subset.name!r}: ")
    return out


def evaluate_subset(embedder, subset: EvalSubset, *, batch_size: int = 16, progress: bool = True,
                    tie_policy: str = "first", num_workers: int = 2, sizes: Optional[Sequence[int]] = None) -> dict:
    """Encode and score one subset. Besides the score matrices (``scores``,
    ``candidate_index``) returns ``record``: the JSON-able result a score file holds.
    ``sizes``: Matryoshka sizes also scored, from the same encoding (each size's prefix of
    the embeddings, re-normalised): ``record["p_at_1_by_dim"]``."""
    items, query_index, candidate_index = unique_items(subset.rows)
    emb = embed_items(embedder, subset, items, batch_size=batch_size, progress=progress, num_workers=num_workers)
    scores = candidate_scores(emb.numpy(), query_index, candidate_index)
    hits = precision_at_1(scores, tie_policy=tie_policy, candidate_ids=candidate_index)
    by_dim = {}
    for size in sizes or ():
        hits_d = precision_at_1(candidate_scores(truncate(emb, size).numpy(), query_index, candidate_index),
                                tie_policy=tie_policy, candidate_ids=candidate_index)
        by_dim[str(size)] = float(np.mean(hits_d)) if len(hits_d) else float("nan")
    gap = similarity_gap_stats(scores, candidate_ids=candidate_index)
    pos, neg, _ = positive_and_hardest_negative(scores, candidate_ids=candidate_index)
    record = {
        "p_at_1": float(np.mean(hits)) if len(hits) else float("nan"), "num_queries": int(len(hits)),
        "num_embedded": len(items), "empty_sides": subset.empty_sides, "gap": gap.to_dict(),
        # Per query, so --analysis-dir works for subsets loaded from their score file too.
        "per_query": {"hit": [bool(h) for h in hits], "pos": [float(v) for v in pos],
                      "hardest_neg": [float(v) if np.isfinite(v) else None for v in neg]},
    }
    if sizes:
        record["p_at_1_by_dim"] = by_dim
    return {**record, "gap": gap, "scores": scores, "candidate_index": candidate_index, "record": record}


def evaluate(embedder, subsets: Mapping[str, EvalSubset], *, batch_size: int = 16, progress: bool = True,
             tie_policy: str = "first", stored: Optional[Mapping[str, Mapping[str, Any]]] = None,
             on_result: Optional[Callable[[str, dict], None]] = None,
             order: Optional[Sequence[str]] = None, num_workers: int = 2,
             dims: Optional[Sequence[Union[int, str]]] = None) -> dict:
    """P@1 per subset and the MMEB aggregates; also returns per-subset gap statistics.

    dims: Matryoshka sizes (``[64, 256, "full"]``, resolved against the embedder's width):
        every subset is also scored at each size from the same encoding, and
        ``summary["by_dim"]`` holds the aggregates per size (stored records must have them:
        the CLI's score-file fingerprint includes the sizes).
    stored: results already known (name -> score-file record, see `read_score_file`): reported
        without encoding anything. embedder may be None when ``subsets`` is empty.
    on_result: called on rank 0 with ``(name, record)`` as soon as a subset is scored (the
        CLI writes its score file there, so a crash loses at most the subset in progress).
    order: subset order of the report (default: stored, then evaluated).

    Subsets without a known category (not official, not synthetic) are scored and reported
    under ``summary["other"]``, outside every aggregate, never an error after the encoding.
    """
    stored = dict(stored or {})
    overlap = sorted(set(stored) & set(subsets))
    if overlap:
        raise ValueError(f"subset(s) {overlap} are both stored and to be evaluated")
    details: dict[str, dict] = {name: {**rec, "from_file": True} for name, rec in stored.items()}
    sizes = [d for d, _ in matryoshka_sizes(dims, None, embedder.dim)] if dims and subsets else None
    for name, subset in subsets.items():
        res = evaluate_subset(embedder, subset, batch_size=batch_size, progress=progress, tie_policy=tie_policy,
                              num_workers=num_workers, sizes=sizes)
        details[name] = {**res, "from_file": False}
        if distributed.rank() == 0:
            empty = res["empty_sides"]
            logger.info("%s: P@1 %.4f over %d queries (%d items embedded%s)", name, res["p_at_1"],
                        res["num_queries"], res["num_embedded"],
                        f"; empty sides embedded as \"\": query {empty[QUERY]}, candidate {empty[CANDIDATE]}"
                        if any(empty.values()) else "")
            if on_result is not None:
                on_result(name, res["record"])
    if order is not None:
        if sorted(order) != sorted(details):
            raise ValueError(f"order {list(order)} does not list the subsets {sorted(details)}")
        details = {name: details[name] for name in order}
    summary = aggregate({name: d["p_at_1"] for name, d in details.items()}, unknown="separate")
    summary["gap"] = {name: _gap_dict(d["gap"]) for name, d in details.items()}
    summary["num_queries"] = {name: d["num_queries"] for name, d in details.items()}
    summary["num_embedded"] = {name: d["num_embedded"] for name, d in details.items()}
    summary["empty_sides"] = {name: d["empty_sides"] for name, d in details.items()}
    summary["already_scored"] = [name for name, d in details.items() if d["from_file"]]
    if dims and details:
        keys = list(next(iter(details.values()))["p_at_1_by_dim"])
        summary["by_dim"] = {k: aggregate({name: d["p_at_1_by_dim"][k] for name, d in details.items()},
                                          unknown="separate") for k in keys}
    return {"summary": summary, "details": details}


def by_dim_table(summary: Mapping[str, Any], digits: int = 1) -> str:
    """Markdown: P@1 x100 per Matryoshka size (columns) for the overall score, each category
    with subsets, and each subset (rows; subsets without a category last, outside the overall)."""
    by_dim = summary["by_dim"]
    keys = list(by_dim)
    first = by_dim[keys[0]]

    def row(label, pick):
        values = [pick(by_dim[k]) for k in keys]
        return f"| {label} | " + " | ".join("–" if v is None else f"{v * 100:.{digits}f}" for v in values) + " |"

    lines = ["| P@1 by embedding size | " + " | ".join(f"d={k}" for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|", row("**Overall**", lambda a: a["overall"])]
    lines += [row(f"*{c}*", lambda a, c=c: a["by_category"][c]) for c, v in first["by_category"].items()
              if v is not None]
    lines += [row(n, lambda a, n=n: a["per_subset"][n]) for n in first["per_subset"]]
    lines += [row(f"{n} (no category)", lambda a, n=n: a["other"][n]) for n in first.get("other", {})]
    return "\n".join(lines) + "\n"


def _gap_dict(gap: Any) -> dict:
    return gap.to_dict() if hasattr(gap, "to_dict") else dict(gap)


def write_analysis(details: dict, out_dir: Path, label: str = "model") -> dict:
    """Figure-1 style histogram (positive vs hardest negative) and a Table-1 style table,
    from the per-query similarities of every subset (fresh or loaded from a score file)."""
    from llave_ds.eval.analysis import gap_table, plot_similarity_histograms

    out_dir.mkdir(parents=True, exist_ok=True)
    pos_all, neg_all = [], []
    for d in details.values():
        pos = np.asarray(d["per_query"]["pos"], dtype=np.float64)
        neg = np.asarray([-np.inf if v is None else v for v in d["per_query"]["hardest_neg"]], dtype=np.float64)
        has_neg = np.isfinite(neg)
        pos_all.append(pos[has_neg])
        neg_all.append(neg[has_neg])
    groups = {label: (np.concatenate(pos_all), np.concatenate(neg_all))}
    png = plot_similarity_histograms(groups, out_dir / "similarity_histogram.png")
    table = gap_table(groups)
    (out_dir / "similarity_gap.md").write_text(table + "\n")
    return {"histogram": str(png), "table": table}


# ------------------------------------------------------------------------------- subset selection

def default_subsets(data: str, *, source_type: str = "auto") -> tuple[list[str], list[str]]:
    """``(to evaluate, not evaluated)`` when no subsets are named.

    A local directory: its official subsets (benchmark order), then its synthetic ones; every
    other subset found there (the hub download's CIFAR-100, a user's own) is not evaluated
    and returned second. A hub id: the 36 official subsets.
    """
    known = list(official_subsets()) + list(synthetic_subsets())
    if not is_local_source(data, source_type):
        return list(official_subsets()), []
    root = os.path.expanduser(data)
    found = check_subset_names(data, None, source_type)
    chosen = [name for name in known if name in found]
    skipped = [name for name in found if name not in chosen]
    if not chosen:
        raise ValueError(f"no official or synthetic MMEB subset in {root} (found: {', '.join(found)}); name the "
                         "subsets to evaluate with --subsets (one without a known category is reported on its own)")
    return chosen, skipped


# ------------------------------------------------------------------------------- run plan

@dataclass
class EvalPlan:
    """What a run does, decided once (on rank 0) and shared with every rank, so all ranks
    encode the same subsets and run the same collectives.

    names: every subset reported, in order; stored: name -> record of those loaded from a
    matching score file (not encoded again); not_evaluated: subsets found in the data but
    outside the official/synthetic tables and not named; fingerprints: name -> fingerprint
    of each subset's result (empty without a scores directory).
    """
    names: list[str]
    stored: dict[str, dict] = field(default_factory=dict)
    not_evaluated: list[str] = field(default_factory=list)
    fingerprints: dict[str, dict] = field(default_factory=dict)

    @property
    def to_evaluate(self) -> list[str]:
        return [n for n in self.names if n not in self.stored]


def scores_dir_for(args: argparse.Namespace) -> Optional[Path]:
    """``--scores-dir``, else ``<out dir>/<out stem>_subsets`` next to ``--out``, else None."""
    if getattr(args, "scores_dir", None):
        return Path(args.scores_dir)
    if args.out:
        out = Path(args.out)
        return out.parent / f"{out.stem}_subsets"
    return None


def _options_fingerprint(args: argparse.Namespace) -> dict:
    image_root = args.image_root or (args.data if is_local_source(args.data, "auto") else None)
    return {"split": args.split, "max_rows": args.max_rows, "tie_policy": args.tie_policy,
            "max_length": args.max_length, "strict_empty": bool(getattr(args, "strict_empty", False)),
            "image_root": os.path.abspath(os.path.expanduser(image_root)) if image_root else None,
            # only when given: score files written without --dims stay valid
            **({"dims": list(args.dims)} if getattr(args, "dims", None) else {})}


def plan_run(args: argparse.Namespace, scores_dir: Optional[Path]) -> EvalPlan:
    """Which subsets to evaluate and which are already scored (reads no rows, loads no model)."""
    if args.subsets:
        names, not_evaluated = check_subset_names(args.data, args.subsets), []
    else:
        names, not_evaluated = default_subsets(args.data)
        official = official_subsets()
        n_official = sum(n in official for n in names)
        logger.info("MMEB-eval data %s: evaluating %d of the %d official subsets%s and %d synthetic: %s",
                    args.data, n_official, len(official),
                    "" if n_official == len(official) else " (the others are not there)",
                    len(names) - n_official, ", ".join(names))
        if not_evaluated:
            logger.info("not evaluated (not an official or synthetic MMEB subset; name it with --subsets to score "
                        "it on its own): %s", ", ".join(not_evaluated))
    registry = subset_registry()
    other = [n for n in names if n not in registry]
    if other:
        logger.info("no known category for %s: scored and reported on their own, outside every aggregate",
                    ", ".join(other))
    plan = EvalPlan(names=list(names), not_evaluated=not_evaluated)
    if scores_dir is None:
        logger.info("no --out or --scores-dir: per-subset scores are not saved, a re-run encodes everything again")
        return plan
    model_fp, options_fp = model_fingerprint(args.model), _options_fingerprint(args)
    for name in names:
        plan.fingerprints[name] = {"model": model_fp, "options": options_fp,
                                   "data": data_fingerprint(args.data, name, args.split)}
        path = score_file(scores_dir, name)
        if getattr(args, "rescore", False):
            continue
        record, why = read_score_file(path, name, plan.fingerprints[name])
        if record is not None:
            plan.stored[name] = record
            logger.info("%s: skipped, already scored (P@1 %.4f in %s)", name, record["p_at_1"], path)
        elif path.exists():
            logger.info("%s: %s %s: evaluating again", name, path, why)
    return plan


# ------------------------------------------------------------------------------- CLI

def _evaluate_planned(args: argparse.Namespace) -> tuple:
    """(result, plan, scores_dir) of the run on every rank: the plan decided on rank 0 from the
    score files before any other collective and shared, the subsets to evaluate loaded on
    every rank (all fail together), each written to its score file as it finishes."""
    scores_dir = scores_dir_for(args)
    plan: EvalPlan = rank0_then_shared(lambda: plan_run(args, scores_dir))
    subsets = load_on_every_rank(lambda: load_eval_subsets(
        args.data, plan.to_evaluate, split=args.split, image_root=args.image_root, max_rows=args.max_rows,
        strict_empty=args.strict_empty) if plan.to_evaluate else {})
    embedder = load_embedder(args.model, args.max_length) if subsets else None

    def save(name: str, record: dict) -> None:
        path = write_score_file(score_file(scores_dir, name), name, record, plan.fingerprints[name])
        logger.info("%s: wrote %s", name, path)

    result = evaluate(embedder, subsets, batch_size=args.batch_size, progress=not args.no_progress,
                      num_workers=args.num_workers,
                      tie_policy=args.tie_policy, stored=plan.stored, order=plan.names,
                      dims=getattr(args, "dims", None),
                      on_result=save if scores_dir is not None else None)
    return result, plan, scores_dir


def run(args: argparse.Namespace) -> int:
    """The MMEB branch of ``llave-ds eval`` (`llave_ds.eval.cli` parses the arguments)."""
    args.tie_policy = args.tie_policy or "first"
    try:
        with eval_process_group():
            result, plan, scores_dir = _evaluate_planned(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llave-ds eval: {exc}", file=sys.stderr)
        return 2
    if distributed.detect_env().rank != 0:
        return 0
    summary = result["summary"]
    summary["not_evaluated"] = plan.not_evaluated
    summary["scores_dir"] = str(scores_dir) if scores_dir is not None else None
    table = markdown_table(summary)
    if "by_dim" in summary:
        table += "\n" + by_dim_table(summary)
    if plan.not_evaluated:
        table += (f"\nNot evaluated (found in the data, not an official or synthetic subset; name it with "
                  f"--subsets to score it on its own): {', '.join(plan.not_evaluated)}.\n")
    print(table)
    if args.analysis_dir:
        summary["analysis"] = write_analysis(result["details"], Path(args.analysis_dir))
        print(summary["analysis"]["table"])
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, default=float))
        out.with_suffix(".md").write_text(table + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
