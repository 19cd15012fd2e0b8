"""``llave-ds eval --benchmark mmeb-v2``: encode the selected MMEB-V2 tasks a download holds,
score each as the official code does, write its score and prediction files as it finishes,
and summarise a directory of score files (ours or the official eval's).

* ``--model M --data ROOT --scores-dir DIR``: every selected task found under ``ROOT`` whose
  ``DIR/<task>_score.json`` does not match this model, download and options (fingerprint) is
  encoded (queries and the page pool spread over the ranks under torchrun / srun) and scored;
  a killed run re-encodes only the tasks without a matching score file. Every task is read:
  the image tasks by `llave_ds.eval.mmeb_v2_image`, the visual-document tasks by
  `llave_ds.eval.mmeb_v2_visdoc` and the video tasks by `llave_ds.eval.mmeb_v2_video`.
* ``--scores-dir DIR`` alone: the summary only (``--rescore-preds``: score each
  ``<task>_pred.jsonl`` again first).

Rank 0 decides which tasks to encode from the score files and shares the plan before any
other collective; every rank loads the tasks and all fail together on bad data; only rank 0
writes files.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from llave_ds.core import distributed
from llave_ds.eval import mmeb_v2_image, mmeb_v2_video, mmeb_v2_visdoc
from llave_ds.eval.encoding import (embed_dataset, eval_process_group, load_embedder, load_on_every_rank,
                                    rank0_then_shared)
from llave_ds.eval.mmeb_v2 import (markdown_table, prediction_records, read_score_dir, rescore_task, score_file,
                                   summarize, write_report, write_task_results)
from llave_ds.eval.mmeb_v2_tasks import MODALITIES, TASKS, V2Task, tasks_of
from llave_ds.eval.score_files import files_fingerprint, model_fingerprint

logger = logging.getLogger(__name__)

def reader(task: V2Task):
    """(task_dir, load) of a task: task_dir(root, task) finds the download (an error naming where
    it looked), load(root, task, image_root) reads it into an object with ``task``, ``queries``,
    ``candidates``, ``infos``, ``pool_ids``, ``skipped`` and ``source``."""
    if task.modality == "image":
        return mmeb_v2_image.task_dir, mmeb_v2_image.load_image_task
    if task.modality == "visdoc":
        return mmeb_v2_visdoc.task_dir, mmeb_v2_visdoc.load_visdoc_task
    return mmeb_v2_video.task_dir, mmeb_v2_video.load_video_task


def plan_tasks(args: argparse.Namespace, tasks: List[V2Task], scores_dir: Path) -> Dict[str, Any]:
    """Which selected tasks to encode (found in the download, no matching score file), which
    are already scored, and which the download lacks; with each task's fingerprint."""
    plan: Dict[str, Any] = {"encode": [], "stored": [], "absent": [], "fingerprints": {}}
    model_fp = model_fingerprint(args.model)
    options = {"max_length": args.max_length, "pred_top_k": args.pred_top_k}
    for t in tasks:
        try:
            directory = reader(t)[0](Path(args.data), t.name)
        except ValueError:
            if args.tasks:  # named explicitly: a missing download is an error
                raise
            plan["absent"].append(t.name)
            continue
        fp = {"model": model_fp, "data": files_fingerprint(sorted(directory.rglob("*.parquet"))), "options": options}
        plan["fingerprints"][t.name] = fp
        path = score_file(scores_dir, t.name)
        stored = None
        if path.is_file() and not args.rescore:
            try:
                stored = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                stored = None
        if stored == fp:
            plan["stored"].append(t.name)
            logger.info("%s: already scored in %s (matching fingerprint)", t.name, path)
        else:
            plan["encode"].append(t.name)
    return plan


def _encode_tasks(args: argparse.Namespace, plan: Dict[str, Any], scores_dir: Path) -> None:
    loaded = load_on_every_rank(lambda: [reader(TASKS[name])[1](Path(args.data), name, args.image_root)
                                         for name in plan["encode"]])
    if not loaded:
        return
    embedder = load_embedder(args.model, args.max_length)
    progress = not args.no_progress
    for vt in loaded:
        name = vt.task.name
        common = dict(batch_size=args.batch_size, progress=progress, num_workers=args.num_workers,
                      where=f"MMEB-V2 task {name}: ")
        queries = embed_dataset(embedder, vt.queries, role="query", desc=f"{name} queries", **common)
        pages = embed_dataset(embedder, vt.candidates, role="target", desc=f"{name} candidates", **common)
        if distributed.rank() != 0:
            continue
        records = prediction_records(vt.task, queries.numpy(), vt.infos, vt.pool_ids, pages.numpy())
        extra = {"fingerprint": plan["fingerprints"][name], "skipped": vt.skipped, "source": vt.source,
                 "num_candidates": len(vt.pool_ids)}
        scores = write_task_results(scores_dir, vt.task, records, pred_top_k=args.pred_top_k, extra=extra)
        logger.info("%s: %s %.4f (%d queries, %d candidates) -> %s", name, vt.task.main_metric,
                    scores[vt.task.main_metric], len(records), len(vt.pool_ids), score_file(scores_dir, name))


def run(args: argparse.Namespace) -> int:
    """The MMEB-V2 branch of ``llave-ds eval`` (module docstring)."""
    modalities = args.modalities.split(",") if args.modalities else None
    try:
        tasks = tasks_of(modalities, args.tasks)
    except ValueError as exc:
        print(f"llave-ds eval: {exc}", file=sys.stderr)
        return 2
    if args.pred_top_k is not None and args.pred_top_k < 10:
        print(f"llave-ds eval: --pred-top-k {args.pred_top_k}: keep at least the top 10 (the metrics read them, and "
              f"--rescore-preds scores from the file)", file=sys.stderr)
        return 2
    if not args.scores_dir:
        print("llave-ds eval: --benchmark mmeb-v2 needs --scores-dir (where the per-task <task>_score.json and "
              "<task>_pred.jsonl are written, or read for the summary)", file=sys.stderr)
        return 2
    scores_dir = Path(args.scores_dir)
    if args.model:
        if not args.data:
            print("llave-ds eval: --model needs --data (the directory the MMEB-V2 downloads are under)",
                  file=sys.stderr)
            return 2
        status = _encode(args, tasks, scores_dir)
        if status is not None:
            return status
    elif not scores_dir.is_dir():
        print(f"llave-ds eval: --scores-dir {scores_dir} is not a directory", file=sys.stderr)
        return 2
    if distributed.detect_env().rank != 0:
        return 0
    if args.rescore_preds:
        try:
            rescored = [t.name for t in tasks if rescore_task(scores_dir, t) is not None]
        except ValueError as exc:
            print(f"llave-ds eval: {exc}", file=sys.stderr)
            return 2
        logger.info("scored %d prediction file(s) again", len(rescored))
    summary = summarize(read_score_dir(scores_dir, tasks), tasks)
    label = args.label or (Path(args.model).name if args.model else scores_dir.name)
    print(markdown_table(summary, label), end="")
    if args.out:
        paths = write_report(summary, Path(args.out), label, plot=not args.no_plot)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(json.dumps({"benchmark": "mmeb-v2", "overall": summary.overall(), "num_tasks": len(summary.task_scores),
                      **{m: summary.modality_mean(m) for m in MODALITIES}}))
    return 0 if summary.task_scores else 1


def _encode(args: argparse.Namespace, tasks: List[V2Task], scores_dir: Path) -> Optional[int]:
    try:
        with eval_process_group():
            if distributed.rank() == 0:
                scores_dir.mkdir(parents=True, exist_ok=True)
            plan = rank0_then_shared(lambda: plan_tasks(args, tasks, scores_dir))
            if plan["absent"]:
                logger.info("not in %s (skipped): %s", args.data, ", ".join(plan["absent"]))
            _encode_tasks(args, plan, scores_dir)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llave-ds eval: {exc}", file=sys.stderr)
        return 2
    return None
