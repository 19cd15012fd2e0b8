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
import datetime
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from llave_ds import distributed, eval_video
from llave_ds.checkpoint import atomic_write_text
from llave_ds.data import load_image
from llave_ds.eval_data import (CANDIDATE, QUERY, EvalSubset, _is_local, check_subset_names, find_eval_files,
                                load_eval_subsets, shard, unique_items)
from llave_ds.gather import GatherMode, all_gather_objects, all_gather_rows
from llave_ds.metrics import (aggregate, candidate_scores, markdown_table, official_subsets,
                              positive_and_hardest_negative, precision_at_1, similarity_gap_stats,
                              subset_registry, synthetic_subsets)

logger = logging.getLogger("llave_ds.eval")

SCORE_FILE_SUFFIX = "_score.json"
SCORE_FILE_FORMAT = 1
# Files of a model directory whose change changes the embeddings (weights, configs,
# tokenizer, prompt settings). Other files (e.g. an eval JSON written into it) are ignored.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MODEL_FILES = {"config.json", "llave_embedding.json", "generation_config.json", "preprocessor_config.json",
                "processor_config.json", "video_preprocessor_config.json", "chat_template.json",
                "chat_template.jinja", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                "model.safetensors.index.json"}


@dataclass
class _LoadedSide:
    """What the formatter needs: text and a PIL image (or None)."""
    text: str
    image: Any
    error: Optional[str] = None  # why the image could not be loaded (raised in the main process)


class _SideLoader(torch.utils.data.Dataset):
    """The items of one role as sides, each image decoded when its batch is asked for (in a
    DataLoader worker): memory holds the batches in flight, not every image of the subset."""

    def __init__(self, subset: EvalSubset, items, max_image_pixels: Optional[int] = None):
        self.subset, self.items, self.max_image_pixels = subset, list(items), max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> _LoadedSide:
        item = self.items[i]
        image = None
        if item.image_path:
            kwargs = {"max_pixels": self.max_image_pixels} if self.max_image_pixels else {}
            try:
                image = load_image(self.subset.image_path(item.image_path), **kwargs)
            except (ValueError, OSError) as exc:  # reported by the main process, without a worker traceback
                return _LoadedSide(item.text, None, f"{type(exc).__name__}: {exc}")
        return _LoadedSide(item.text, image)


def _as_list(batch: list) -> list:
    return batch


def embed_items(embedder, subset: EvalSubset, items, *, batch_size: int, progress: bool,
                num_workers: int = 2) -> torch.Tensor:
    """Embeddings of ``items`` in order; with several ranks each embeds a contiguous shard
    and the shards are gathered (ranks may hold different counts; gather handles it).

    Images are streamed: ``num_workers`` DataLoader workers decode batch by batch while the
    model encodes (0: decode in this process, still one batch at a time)."""
    from tqdm.auto import tqdm


    import multiprocessing

    rank, world = distributed.rank(), distributed.world_size()
    local_items = list(shard(items, rank, world))
    if num_workers and multiprocessing.current_process().daemon:
        num_workers = 0  # a daemonic process (e.g. a multiprocessing pool worker) may not start workers
    # Queries and candidates are formatted differently (instructions): encode per role,
    # keeping the original order.
    out = torch.empty(len(local_items), embedder.dim, dtype=torch.float32)
    for role in sorted({it.role for it in local_items}):
        idx = [i for i, it in enumerate(local_items) if it.role == role]
        loader = torch.utils.data.DataLoader(
            _SideLoader(subset, [local_items[i] for i in idx]), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, collate_fn=_as_list, prefetch_factor=2 if num_workers else None)
        name = "target" if role == CANDIDATE else "query"
        start = 0
        for sides in tqdm(loader, desc=f"{subset.name} {name}", unit="batch", dynamic_ncols=True,
                          disable=not (progress and rank == 0)):
            bad = next((s.error for s in sides if s.error), None)
            if bad:
                raise ValueError(f"MMEB-eval subset {subset.name!r}: {bad}")
            emb = embedder.encode_sides(sides, role=name, batch_size=len(sides), progress=False)
            out[idx[start:start + len(sides)]] = emb.float().cpu()
            start += len(sides)
    if world > 1:
        # Every rank runs the same number of gathers (one per subset), padded by the gather.
        device = embedder.device
        gathered, _ = all_gather_rows(out.to(device), GatherMode.STOP_GRAD)
        out = gathered.cpu()
    return out


def evaluate_subset(embedder, subset: EvalSubset, *, batch_size: int = 16, progress: bool = True,
                    tie_policy: str = "first", num_workers: int = 2) -> dict:
    """Encode and score one subset. Besides the score matrices (``scores``,
    ``candidate_index``) returns ``record``: the JSON-able result a score file holds."""
    items, query_index, candidate_index = unique_items(subset.rows)
    emb = embed_items(embedder, subset, items, batch_size=batch_size, progress=progress, num_workers=num_workers)
    scores = candidate_scores(emb.numpy(), query_index, candidate_index)
    hits = precision_at_1(scores, tie_policy=tie_policy, candidate_ids=candidate_index)
    gap = similarity_gap_stats(scores, candidate_ids=candidate_index)
    pos, neg, _ = positive_and_hardest_negative(scores, candidate_ids=candidate_index)
    record = {
        "p_at_1": float(np.mean(hits)) if len(hits) else float("nan"), "num_queries": int(len(hits)),
        "num_embedded": len(items), "empty_sides": subset.empty_sides, "gap": gap.to_dict(),
        # Per query, so --analysis-dir works for subsets loaded from their score file too.
        "per_query": {"hit": [bool(h) for h in hits], "pos": [float(v) for v in pos],
                      "hardest_neg": [float(v) if np.isfinite(v) else None for v in neg]},
    }
    return {**record, "gap": gap, "scores": scores, "candidate_index": candidate_index, "record": record}


def evaluate(embedder, subsets: Mapping[str, EvalSubset], *, batch_size: int = 16, progress: bool = True,
             tie_policy: str = "first", stored: Optional[Mapping[str, Mapping[str, Any]]] = None,
             on_result: Optional[Callable[[str, dict], None]] = None,
             order: Optional[Sequence[str]] = None, num_workers: int = 2) -> dict:
    """P@1 per subset and the MMEB aggregates; also returns per-subset gap statistics.

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
    for name, subset in subsets.items():
        res = evaluate_subset(embedder, subset, batch_size=batch_size, progress=progress, tie_policy=tie_policy,
                              num_workers=num_workers)
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
    return {"summary": summary, "details": details}


def _gap_dict(gap: Any) -> dict:
    return gap.to_dict() if hasattr(gap, "to_dict") else dict(gap)


def write_analysis(details: dict, out_dir: Path, label: str = "model") -> dict:
    """Figure-1 style histogram (positive vs hardest negative) and a Table-1 style table,
    from the per-query similarities of every subset (fresh or loaded from a score file)."""
    from llave_ds.analysis import gap_table, plot_similarity_histograms

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
    if not _is_local(data, source_type):
        return list(official_subsets()), []
    root = os.path.expanduser(data)
    found = check_subset_names(data, None, source_type)
    chosen = [name for name in known if name in found]
    skipped = [name for name in found if name not in chosen]
    if not chosen:
        raise ValueError(f"no official or synthetic MMEB subset in {root} (found: {', '.join(found)}); name the "
                         "subsets to evaluate with --subsets (one without a known category is reported on its own)")
    return chosen, skipped


# ------------------------------------------------------------------------------- score files

def score_file(scores_dir: Path, subset: str) -> Path:
    """``<scores_dir>/<subset>_score.json`` (the official VLM2Vec eval's naming)."""
    if not subset or os.sep in subset or (os.altsep and os.altsep in subset) or subset in (".", ".."):
        raise ValueError(f"subset name {subset!r} cannot name a score file")
    return Path(scores_dir) / f"{subset}{SCORE_FILE_SUFFIX}"


def model_fingerprint(model_dir: str) -> dict:
    """What identifies the model cheaply: its resolved path and (size, mtime) of the files that
    make the embeddings (weights, configs, tokenizer, llave_embedding.json). Weights are not
    hashed (tens of GB); a rewritten or re-exported file changes its mtime."""
    path = Path(model_dir).expanduser().resolve()
    files = {}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            name = f.name
            if f.is_file() and (name.endswith(_WEIGHT_SUFFIXES) or name in _MODEL_FILES
                                or name.startswith("tokenizer")):
                st = f.stat()
                files[name] = [st.st_size, st.st_mtime_ns]
    return {"path": str(path), "files": files}


def data_fingerprint(data: str, subset: str, split: str, *, source_type: str = "auto") -> dict:
    """A local subset's data files with (size, mtime); for a hub id, the id, subset and split."""
    if not _is_local(data, source_type):
        return {"hub": data, "subset": subset, "split": split}
    files = {}
    for f in find_eval_files(os.path.expanduser(data), subset, split):
        st = os.stat(f)
        files[os.path.abspath(f)] = [st.st_size, st.st_mtime_ns]
    return {"files": files}


def _fingerprint_difference(stored: Any, current: Any, where: str = "") -> Optional[str]:
    """The first difference of two fingerprints, as a readable path (None when equal)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in list(current) + [k for k in stored if k not in current]:
            if key not in stored or key not in current:
                return f"{where}{key} only in the {'new' if key in current else 'stored'} fingerprint"
            diff = _fingerprint_difference(stored[key], current[key], f"{where}{key}.")
            if diff:
                return diff
        return None
    if stored != current:
        return f"{where.rstrip('.')}: stored {stored!r}, now {current!r}"
    return None


_RECORD_KEYS = ("p_at_1", "num_queries", "num_embedded", "empty_sides", "gap", "per_query", "fingerprint")


def read_score_file(path: Path, subset: str, fingerprint: Mapping[str, Any]) -> tuple[Optional[dict], str]:
    """``(record, "")`` when ``path`` holds this subset's result for exactly this fingerprint,
    else ``(None, why not)``."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, "no score file"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if record.get("format") != SCORE_FILE_FORMAT:
        return None, f"format {record.get('format')!r}, expected {SCORE_FILE_FORMAT}"
    if record.get("subset") != subset:
        return None, f"holds subset {record.get('subset')!r}"
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        return None, f"missing field(s) {missing}"
    diff = _fingerprint_difference(record["fingerprint"], json.loads(json.dumps(fingerprint)))
    if diff:
        return None, f"computed with something else ({diff})"
    return record, ""


def write_score_file(path: Path, subset: str, record: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> Path:
    """Write one subset's result atomically (temporary file, then rename): an interrupted
    run never leaves a half-written file that a re-run would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = subset_registry().get(subset)
    full = {"format": SCORE_FILE_FORMAT, "subset": subset,
            "category": info.category if info else None, "distribution": info.distribution if info else None,
            **record, "fingerprint": fingerprint,
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(path, json.dumps(full, indent=1))
    return path


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
    image_root = args.image_root or (args.data if _is_local(args.data, "auto") else None)
    return {"split": args.split, "max_rows": args.max_rows, "tie_policy": args.tie_policy,
            "max_length": args.max_length, "strict_empty": bool(getattr(args, "strict_empty", False)),
            "image_root": os.path.abspath(os.path.expanduser(image_root)) if image_root else None}


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


def _rank0_then_shared(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only, its result (or its error) handed to every rank in one
    collective that every rank runs: ranks never decide differently, nor hang on a failure."""
    value, error, exc = None, None, None
    if distributed.rank() == 0:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - passed on to the other ranks, then re-raised
            exc, error = e, f"{type(e).__name__}: {e}"
    if distributed.world_size() > 1:
        value, error = all_gather_objects((value, error))[0]
    if exc is not None:
        raise exc
    if error is not None:
        raise ValueError(f"rank 0 failed: {error}")
    return value


def _load_on_every_rank(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it fails on any rank, every rank raises (one collective)."""
    value, error, exc = None, None, None
    try:
        value = fn()
    except (ValueError, FileNotFoundError) as e:
        exc, error = e, str(e)
    if distributed.world_size() > 1:
        errors = [f"rank {r}: {e}" for r, e in enumerate(all_gather_objects(error)) if e is not None]
    else:
        errors = []
    if exc is not None:
        raise exc
    if errors:
        raise ValueError("; ".join(errors))
    return value


# ------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("mmeb", "video-retrieval"), default="mmeb",
                        help="mmeb (default): MMEB's P@1 per subset; video-retrieval: text<->video Recall@1/5/10 "
                             "and median rank on a split file of video paths and captions (docs/EVALUATION.md)")
    parser.add_argument("--model", required=True, help="exported model directory (or a base model directory)")
    parser.add_argument("--data", required=True, help="MMEB-eval directory (per-subset parquet/jsonl) or hub id; "
                                                      "with --task video-retrieval: the split's .jsonl / .csv")
    parser.add_argument("--image-root", help="directory image paths are relative to (default: --data)")
    parser.add_argument("--subsets", nargs="*",
                        help="subset names (default: the official and synthetic subsets found locally, or the 36 "
                             "official ones of a hub id); a subset without a known category is reported on its own")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-rows", type=int, help="evaluate only the first N queries of each subset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="DataLoader workers decoding images while the model encodes (0: in this process)")
    parser.add_argument("--tie-policy", choices=("first", "strict"),
                        help="equal similarities: first (MMEB default: the lower index wins, as the official code) "
                             "or strict (video-retrieval default: the correct item ranks after its ties)")
    parser.add_argument("--max-length", type=int, help="override the formatter's max_length")
    parser.add_argument("--strict-empty", action="store_true",
                        help="refuse a query or candidate with no text and no image (default: embed it as \"\", "
                             "like the official eval, and count it)")
    parser.add_argument("--out", help="write the JSON result here (and a .md table beside it)")
    parser.add_argument("--scores-dir",
                        help="write <subset>_score.json here as each subset finishes; a re-run loads the matching "
                             "ones instead of encoding again (default: <out dir>/<out stem>_subsets with --out)")
    parser.add_argument("--rescore", action="store_true",
                        help="evaluate every subset again even when its score file matches")
    parser.add_argument("--analysis-dir", help="also write the similarity histogram PNG and gap table here")
    parser.add_argument("--no-progress", action="store_true")
    eval_video.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from llave_ds.embedder import LlaveEmbedder

    if args.task == "video-retrieval":
        return eval_video.run(args)
    args.tie_policy = args.tie_policy or "first"

    if distributed.detect_env().world_size > 1:
        distributed.init_distributed(timeout_s=1800)
    logging.basicConfig(level=logging.INFO if distributed.detect_env().rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        scores_dir = scores_dir_for(args)
        # Decided on rank 0 from the score files, before any other collective, and shared.
        plan: EvalPlan = _rank0_then_shared(lambda: plan_run(args, scores_dir))
        subsets = _load_on_every_rank(lambda: load_eval_subsets(
            args.data, plan.to_evaluate, split=args.split, image_root=args.image_root, max_rows=args.max_rows,
            strict_empty=args.strict_empty) if plan.to_evaluate else {})
        embedder = None
        if subsets:
            overrides = {"max_length": args.max_length} if args.max_length else {}
            embedder = LlaveEmbedder.from_pretrained(args.model, **overrides)

        def save(name: str, record: dict) -> None:
            path = write_score_file(score_file(scores_dir, name), name, record, plan.fingerprints[name])
            logger.info("%s: wrote %s", name, path)

        result = evaluate(embedder, subsets, batch_size=args.batch_size, progress=not args.no_progress,
                          num_workers=args.num_workers,
                          tie_policy=args.tie_policy, stored=plan.stored, order=plan.names,
                          on_result=save if scores_dir is not None else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llave-ds eval: {exc}", file=sys.stderr)
        return 2
    finally:
        if distributed.detect_env().world_size > 1:
            distributed.shutdown_distributed()
    if distributed.detect_env().rank != 0:
        return 0
    summary = result["summary"]
    summary["not_evaluated"] = plan.not_evaluated
    summary["scores_dir"] = str(scores_dir) if scores_dir is not None else None
    table = markdown_table(summary)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.eval", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
