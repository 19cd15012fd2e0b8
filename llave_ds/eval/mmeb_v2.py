"""MMEB-V2 scoring: queries ranked against their candidates as the official code ranks them,
the per-task score and prediction files, and the summary per category, modality and overall.

What the official ``eval.py`` (TIGER-AI-Lab/VLM2Vec, commit 6e1e1d4) does after encoding, and
what this module reproduces:

* candidates: the distinct candidate names of a task in first-occurrence order, each encoded
  once from its first occurrence (``generate_cand_dataset``), then a dict by name;
* ``eval_type: global``: every query is scored against every candidate of that dict by the dot
  product (the embeddings are unit vectors: cosine) and ranked by ``numpy.argsort`` of the
  negated scores (numpy's default sort: ties keep no promised order, so we call the same
  sort on the same float32 scores); ``local``: against its own ``cand_names``;
* a prediction record per query: ``{"prediction": [ranked names], "label": [relevant names],
  "rel_scores": [grades] or null}``, written to ``<task>_pred.jsonl``; the metrics of
  `llave_ds.eval.ranking_metrics` over them to ``<task>_score.json`` (with ``num_pred``,
  ``num_data``).

Where we differ (docs/EVALUATION.md): the global score matrix is formed in blocks of queries
(``block_rows``), so a corpus of pages never needs a queries x corpus matrix in memory (each
row's sort is the same sort on the same numbers, so the ranking is identical); the prediction
file can keep the top ``pred_top_k`` names instead of the whole ranking (the metrics read the
top 10); graded NDCG pairs each page with its own grade (`ranking_metrics`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from llave_ds.eval.mmeb_v2_tasks import CATEGORIES, MAIN_METRIC, MODALITIES, TASKS, V2Task
from llave_ds.eval.ranking_metrics import score_predictions
from llave_ds.files import atomic_write_text

SCORE_SUFFIX, PRED_SUFFIX = "_score.json", "_pred.jsonl"


# --------------------------------------------------------------------------- ranking

def candidate_pool(names: Sequence[str], embeddings: np.ndarray) -> Tuple[List[str], np.ndarray]:
    """The official candidate set as (names, matrix): one entry per distinct name, its first
    occurrence (``generate_cand_dataset`` keeps the first and encodes only that)."""
    index: Dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
    return list(index), np.asarray(embeddings)[list(index.values())]


def rank_global(queries: np.ndarray, cand_names: Sequence[str], cands: np.ndarray, *,
                block_rows: int = 1024) -> List[List[str]]:
    """Each query's ranking of every candidate (names, best first), ``block_rows`` queries at a time."""
    names, matrix = candidate_pool(cand_names, cands)
    if not names:
        raise ValueError("a global task needs at least one candidate")
    queries = np.asarray(queries)
    out: List[List[str]] = []
    for start in range(0, len(queries), block_rows):
        scores = np.dot(queries[start:start + block_rows], matrix.T)
        for row in np.argsort(-scores, axis=1):
            out.append([names[i] for i in row])
    return out


def rank_local(query: np.ndarray, cand_names: Sequence[str], cand_lookup: Mapping[str, np.ndarray]) -> List[str]:
    """One query's ranking of its own candidates (``cand_lookup``: name -> embedding, the pool)."""
    if not cand_names:
        raise ValueError("a local query needs at least one candidate")
    matrix = np.stack([cand_lookup[name] for name in cand_names])
    return [cand_names[i] for i in np.argsort(-np.dot(np.asarray(query), matrix.T))]


def prediction_records(task: V2Task, query_embeds: np.ndarray, infos: Sequence[Mapping], cand_names: Sequence[str],
                       cand_embeds: np.ndarray, *, block_rows: int = 1024) -> List[dict]:
    """The official prediction records of a task. ``infos`` are the per-query records of the
    official ``<task>_info.jsonl`` shape: ``label_name`` (a name or a list), optionally
    ``rel_scores``, and for local tasks ``cand_names``."""
    if len(infos) != len(query_embeds):
        raise ValueError(f"{task.name}: {len(infos)} query records for {len(query_embeds)} query embeddings")
    if task.eval_type == "global":
        rankings = rank_global(query_embeds, cand_names, cand_embeds, block_rows=block_rows)
    else:
        names, matrix = candidate_pool(cand_names, cand_embeds)
        lookup = dict(zip(names, matrix))
        rankings = []
        for i, (q, info) in enumerate(zip(query_embeds, infos)):
            missing = [n for n in info.get("cand_names", []) if n not in lookup]
            if missing:
                raise ValueError(f"{task.name}: query {i} names candidates that were not encoded: {missing[:3]}")
            rankings.append(rank_local(q, list(info.get("cand_names", [])), lookup))
    records = []
    for ranking, info in zip(rankings, infos):
        labels = info["label_name"] if isinstance(info["label_name"], list) else [info["label_name"]]
        rel = info.get("rel_scores")
        if rel is not None and len(rel) != len(labels):
            raise ValueError(f"{task.name}: a query has {len(labels)} relevant names and {len(rel)} rel_scores")
        records.append({"prediction": ranking, "label": labels, "rel_scores": rel})
    return records


# --------------------------------------------------------------------------- files

def score_file(out_dir: Path, task: str) -> Path:
    return Path(out_dir) / f"{task}{SCORE_SUFFIX}"


def pred_file(out_dir: Path, task: str) -> Path:
    return Path(out_dir) / f"{task}{PRED_SUFFIX}"


def write_task_results(out_dir: Path, task: V2Task, records: Sequence[dict], *,
                       pred_top_k: Optional[int] = None, extra: Optional[Mapping[str, Any]] = None) -> dict:
    """Score ``records`` and write ``<task>_score.json`` (the official keys, then ``extra``,
    e.g. our fingerprint) and ``<task>_pred.jsonl`` (each ranking cut to ``pred_top_k`` when
    given); the prediction file first, so a score file never exists without its predictions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = score_predictions(records)
    lines = []
    for rec in records:
        kept = rec["prediction"] if pred_top_k is None else rec["prediction"][:pred_top_k]
        lines.append(json.dumps({"prediction": kept, "label": rec["label"], "rel_scores": rec["rel_scores"]}))
    atomic_write_text(pred_file(out_dir, task.name), "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(score_file(out_dir, task.name), json.dumps({**scores, **(extra or {})}, indent=4) + "\n")
    return scores


def parquet_rows(task: str, files: Sequence[Path], needed: Sequence[str], error=ValueError):
    """``(file, row index, row)`` of a task's downloaded parquet files, each file checked for the
    ``needed`` columns first (``error``, naming the task, file and the columns it has)."""
    import pyarrow.parquet as pq

    for f in files:
        table = pq.read_table(f)
        missing = [c for c in needed if c and c not in table.column_names]
        if missing:
            raise error(f"MMEB-V2 task {task}: {f} has no column {', '.join(missing)} "
                        f"(columns: {', '.join(table.column_names)})")
        for i, row in enumerate(table.to_pylist()):
            yield f, i, row


def read_pred_file(path: Path) -> List[dict]:
    """The records of a ``<task>_pred.jsonl`` (ours or the official code's); a bad line is a
    ValueError naming the file, the line and the missing field."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not JSON ({exc.msg})") from None
            for key in ("prediction", "label"):
                if key not in rec:
                    raise ValueError(f"{path}: line {lineno} has no {key!r} field")
            records.append(rec)
    return records


def rescore_task(directory: Path, task: V2Task) -> Optional[dict]:
    """Score ``<task>_pred.jsonl`` in ``directory`` (or its ``<modality>/``) again and write the
    ``<task>_score.json`` beside it; None when the task has no prediction file."""
    for where in (Path(directory), Path(directory) / task.modality):
        path = pred_file(where, task.name)
        if path.is_file():
            scores = score_predictions(read_pred_file(path))
            atomic_write_text(score_file(where, task.name), json.dumps(scores, indent=4) + "\n")
            return scores
    return None


# --------------------------------------------------------------------------- summary

@dataclass
class Summary:
    """Main-metric scores per task, with the means the tables show."""
    task_scores: Dict[str, float]          # task -> main metric, for the tasks with a score file
    missing: List[str]                     # selected tasks without a (readable) score file

    def _mean(self, names: Iterable[str]) -> Optional[float]:
        values = [self.task_scores[n] for n in names if n in self.task_scores]
        return sum(values) / len(values) if values else None

    def modality_mean(self, modality: str) -> Optional[float]:
        """The official report's number: the unweighted mean over the modality's scored tasks."""
        return self._mean(t.name for t in TASKS.values() if t.modality == modality)

    def category_mean(self, modality: str, category: str) -> Optional[float]:
        return self._mean(t.name for t in TASKS.values() if t.modality == modality and t.category == category)

    def overall(self) -> Optional[float]:
        """Unweighted mean over every scored task (78 when complete)."""
        return self._mean(self.task_scores)

    def complete(self, modality: Optional[str] = None) -> bool:
        return not [n for n in self.missing if modality is None or TASKS[n].modality == modality]

    def as_dict(self) -> dict:
        out: Dict[str, Any] = {"overall": self.overall(), "num_tasks": len(self.task_scores),
                               "missing": list(self.missing), "modalities": {}}
        for m in MODALITIES:
            out["modalities"][m] = {
                "metric": MAIN_METRIC[m], "mean": self.modality_mean(m), "complete": self.complete(m),
                "categories": {c: self.category_mean(m, c) for c in CATEGORIES[m]},
                "tasks": {t.name: self.task_scores.get(t.name) for t in TASKS.values() if t.modality == m}}
        return out


def summarize(score_dicts: Mapping[str, Any], selected: Optional[Sequence[V2Task]] = None) -> Summary:
    """The summary of per-task score dicts (task -> the parsed ``<task>_score.json``, or
    anything else for a missing one). A score dict without its main metric is missing."""
    tasks = selected if selected is not None else list(TASKS.values())
    scores, missing = {}, []
    for t in tasks:
        value = score_dicts.get(t.name)
        metric = value.get(t.main_metric) if isinstance(value, Mapping) else None
        if isinstance(metric, (int, float)) and not isinstance(metric, bool) and math.isfinite(metric):
            scores[t.name] = float(metric)
        else:
            missing.append(t.name)
    return Summary(scores, missing)


def read_score_dir(directory: Path, tasks: Sequence[V2Task]) -> Dict[str, Any]:
    """``<task>_score.json`` of each task found in ``directory`` or in its ``image/``,
    ``video/``, ``visdoc/`` sub-directories (the official output layout), parsed; a file that
    is not JSON maps to the string "JSON_ERROR" (counted missing, as the official report does)."""
    directory = Path(directory)
    out: Dict[str, Any] = {}
    for t in tasks:
        for candidate in (score_file(directory, t.name), score_file(directory / t.modality, t.name)):
            if candidate.is_file():
                try:
                    out[t.name] = json.loads(candidate.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    out[t.name] = "JSON_ERROR"
                break
    return out


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(summary: Summary, label: str = "model") -> str:
    """Category, modality and overall means (x100), then one row per task."""
    head = ["model", "overall"]
    row = [label, _fmt(summary.overall())]
    for m in MODALITIES:
        for c in CATEGORIES[m]:
            head.append(f"{m} {c}")
            row.append(_fmt(summary.category_mean(m, c)))
        head.append(f"{m} ({MAIN_METRIC[m]})")
        row.append(_fmt(summary.modality_mean(m)))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", "",
             "| task | modality | category | metric | score |", "|---|---|---|---|---|"]
    for t in TASKS.values():
        if t.name in summary.task_scores or t.name in summary.missing:
            lines.append(f"| {t.name} | {t.modality} | {t.category} | {t.main_metric} | "
                         f"{_fmt(summary.task_scores.get(t.name))} |")
    if summary.missing:
        lines += ["", f"Missing ({len(summary.missing)}): {', '.join(summary.missing)}; the means are over the "
                      "scored tasks only."]
    return "\n".join(lines) + "\n"


def plot_categories(summary: Summary, path: Path, label: str = "model") -> Path:
    """A bar chart of the category and modality means (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, values, colours = [], [], []
    palette = {"image": "#4c72b0", "video": "#dd8452", "visdoc": "#55a868"}
    for m in MODALITIES:
        for c in CATEGORIES[m]:
            names.append(f"{m}\n{c}")
            mean = summary.category_mean(m, c)
            values.append(None if mean is None else 100 * mean)
            colours.append(palette[m])
    fig = Figure(figsize=(12, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), [v or 0.0 for v in values], color=colours)
    for i, v in enumerate(values):  # a category without scored tasks is not a zero
        ax.text(i, 1.5, "n/a" if v is None else f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("score x 100 (hit@1; visdoc: NDCG@5)")
    overall = summary.overall()
    ax.set_title(f"MMEB-V2 by category: {label} (overall {_fmt(overall)}, {len(summary.task_scores)} tasks)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_report(summary: Summary, out_prefix: Path, label: str = "model", plot: bool = True) -> Dict[str, Path]:
    """``<prefix>.json`` (summary), ``<prefix>.md`` (tables) and ``<prefix>.png`` (categories)."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_prefix.with_suffix(".json"), "md": out_prefix.with_suffix(".md")}
    atomic_write_text(paths["json"], json.dumps({"benchmark": "mmeb-v2", "model": label, **summary.as_dict()},
                                                indent=2) + "\n")
    atomic_write_text(paths["md"], markdown_table(summary, label))
    if plot:
        paths["png"] = plot_categories(summary, out_prefix.with_suffix(".png"), label)
    return paths
