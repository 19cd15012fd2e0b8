"""MMEB evaluation: ``llave-ds eval --model DIR --data DIR [--subsets ...] [--out FILE.json]``.

For each subset: every distinct query and candidate is embedded once (spread across
ranks when launched distributed), candidates are scored by cosine similarity, and
precision@1 is the share of queries whose ground truth (candidate 0) scores highest.
Aggregates per category, in-distribution / out-of-distribution and overall use the
official subset lists (``mmeb_subsets.json``). ``--analysis-dir`` adds the similarity-gap
analysis: positive vs hardest-negative similarity histograms (PNG) and a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from llave_ds import distributed
from llave_ds.eval_data import CANDIDATE, EvalSubset, load_eval_subsets, shard, unique_items
from llave_ds.metrics import aggregate, candidate_scores, markdown_table, precision_at_1, similarity_gap_stats

logger = logging.getLogger("llave_ds.eval")


@dataclass
class _LoadedSide:
    """What the formatter needs: text and a PIL image (or None)."""
    text: str
    image: Any


def _load_sides(subset: EvalSubset, items, max_image_pixels: Optional[int] = None) -> list[_LoadedSide]:
    from llave_ds.data import load_image
    sides = []
    for item in items:
        image = None
        if item.image_path:
            kwargs = {"max_pixels": max_image_pixels} if max_image_pixels else {}
            image = load_image(subset.image_path(item.image_path), **kwargs)
        sides.append(_LoadedSide(item.text, image))
    return sides


def embed_items(embedder, subset: EvalSubset, items, *, batch_size: int, progress: bool) -> torch.Tensor:
    """Embeddings of ``items`` in order; with several ranks each embeds a contiguous shard
    and the shards are gathered (ranks may hold different counts; gather handles it)."""
    from llave_ds.gather import GatherMode, all_gather_rows

    rank, world = distributed.rank(), distributed.world_size()
    local_items = list(shard(items, rank, world))
    # Queries and candidates are formatted differently (instructions): encode per role,
    # keeping the original order.
    out = torch.empty(len(local_items), embedder.dim, dtype=torch.float32)
    for role in sorted({it.role for it in local_items}):
        idx = [i for i, it in enumerate(local_items) if it.role == role]
        sides = _load_sides(subset, [local_items[i] for i in idx])
        emb = embedder.encode_sides(sides, role="target" if role == CANDIDATE else "query",
                                    batch_size=batch_size, progress=progress and rank == 0)
        out[idx] = emb.float().cpu()
    if world > 1:
        # Every rank runs the same number of gathers (one per subset), padded by the gather.
        device = embedder.device
        gathered, _ = all_gather_rows(out.to(device), GatherMode.STOP_GRAD)
        out = gathered.cpu()
    return out


def evaluate_subset(embedder, subset: EvalSubset, *, batch_size: int = 16, progress: bool = True,
                    tie_policy: str = "first") -> dict:
    items, query_index, candidate_index = unique_items(subset.rows)
    emb = embed_items(embedder, subset, items, batch_size=batch_size, progress=progress)
    scores = candidate_scores(emb.numpy(), query_index, candidate_index)
    hits = precision_at_1(scores, tie_policy=tie_policy, candidate_ids=candidate_index)
    gap = similarity_gap_stats(scores, candidate_ids=candidate_index)
    return {"p_at_1": float(np.mean(hits)) if len(hits) else float("nan"), "num_queries": int(len(hits)),
            "num_embedded": len(items), "gap": gap, "scores": scores, "candidate_index": candidate_index}


def evaluate(embedder, subsets: dict[str, EvalSubset], *, batch_size: int = 16, progress: bool = True,
             tie_policy: str = "first") -> dict:
    """P@1 per subset and the MMEB aggregates; also returns per-subset gap statistics."""
    per_subset, details = {}, {}
    for name, subset in subsets.items():
        res = evaluate_subset(embedder, subset, batch_size=batch_size, progress=progress, tie_policy=tie_policy)
        per_subset[name] = res["p_at_1"]
        details[name] = res
        if distributed.rank() == 0:
            logger.info("%s: P@1 %.4f over %d queries (%d items embedded)", name, res["p_at_1"],
                        res["num_queries"], res["num_embedded"])
    summary = aggregate(per_subset)
    summary["gap"] = {name: d["gap"].to_dict() for name, d in details.items()}
    summary["num_queries"] = {name: d["num_queries"] for name, d in details.items()}
    return {"summary": summary, "details": details}


def write_analysis(details: dict, out_dir: Path, label: str = "model") -> dict:
    """Figure-1 style histogram (positive vs hardest negative) and a Table-1 style table."""
    from llave_ds.analysis import gap_table, plot_similarity_histograms
    from llave_ds.metrics import positive_and_hardest_negative

    out_dir.mkdir(parents=True, exist_ok=True)
    pos_all, neg_all = [], []
    for d in details.values():
        pos, neg, has_neg = positive_and_hardest_negative(d["scores"], candidate_ids=d["candidate_index"])
        pos_all.append(np.asarray(pos)[has_neg])
        neg_all.append(np.asarray(neg)[has_neg])
    groups = {label: (np.concatenate(pos_all), np.concatenate(neg_all))}
    png = plot_similarity_histograms(groups, out_dir / "similarity_histogram.png")
    table = gap_table(groups)
    (out_dir / "similarity_gap.md").write_text(table + "\n")
    return {"histogram": str(png), "table": table}


# ------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model directory (or a base model directory)")
    parser.add_argument("--data", required=True, help="MMEB-eval directory (per-subset parquet/jsonl) or hub id")
    parser.add_argument("--image-root", help="directory image paths are relative to (default: --data)")
    parser.add_argument("--subsets", nargs="*", help="subset names (default: all found locally)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-rows", type=int, help="evaluate only the first N queries of each subset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tie-policy", choices=("first", "strict"), default="first")
    parser.add_argument("--max-length", type=int, help="override the formatter's max_length")
    parser.add_argument("--out", help="write the JSON result here (and a .md table beside it)")
    parser.add_argument("--analysis-dir", help="also write the similarity histogram PNG and gap table here")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from llave_ds.embedder import LlaveEmbedder

    if distributed.detect_env().world_size > 1:
        distributed.init_distributed(timeout_s=1800)
    logging.basicConfig(level=logging.INFO if distributed.detect_env().rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        subsets = load_eval_subsets(args.data, args.subsets or None, split=args.split,
                                    image_root=args.image_root, max_rows=args.max_rows)
        overrides = {"max_length": args.max_length} if args.max_length else {}
        embedder = LlaveEmbedder.from_pretrained(args.model, **overrides)
        result = evaluate(embedder, subsets, batch_size=args.batch_size, progress=not args.no_progress,
                          tie_policy=args.tie_policy)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llave-ds eval: {exc}", file=sys.stderr)
        return 2
    finally:
        if distributed.detect_env().world_size > 1:
            distributed.shutdown_distributed()
    if distributed.detect_env().rank != 0:
        return 0
    summary = result["summary"]
    table = markdown_table(summary)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.eval", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
