"""MMEB-V2's 24 visual-document tasks read as users download them: BEIR-layout datasets of
queries, a corpus of page images and graded qrels, and the queries and candidate pool the
official loaders build from them.

The spec (TIGER-AI-Lab/VLM2Vec, commit 6e1e1d4): ``src/constant/dataset_hf_path.py`` (which
hub dataset, language and split each task reads), ``src/data/eval_dataset/vidore_dataset.py``
and ``visrag_dataset.py`` (the same BEIR reading for both), ``src/utils/dataset_utils.py:
load_qrels_mapping`` (qrels with score > 0, the highest score of a repeated pair) and
``base_eval_dataset.py: generate_cand_dataset`` (the candidate pool: each query's relevant
pages in qrels order, then the corpus, first occurrence kept).

A task's directory holds the three configs as the hub snapshot has them, ``queries/``,
``corpus/`` and ``qrels/``, each of ``<split>-*.parquet`` files (``huggingface-cli download
--repo-type dataset vidore/arxivqa_test_subsampled_beir --local-dir ROOT/vidore/arxivqa_test_subsampled_beir``).
It is looked for under ``--data`` as ``<org>/<name>``, ``<name>`` or the task's own name.

Where the official loader crashes we name the task, file and row, and skip by a stated rule
(counted in the score file's ``skipped``): a query with no relevant page (no qrels row with
score > 0: the official ``KeyError``), a qrels page that is not in the corpus (the official
``FileNotFoundError`` for its image; the judgement is dropped and the query skipped if none is
left). An empty corpus, a missing config or column, and an undecodable page are errors.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from llave_ds.eval.mmeb_v2 import parquet_rows
from llave_ds.eval.mmeb_v2_tasks import TASKS, V2Task
from llave_ds.media.side import Side

logger = logging.getLogger(__name__)

# task -> (hub dataset, language filter or None, split): dataset_hf_path.py's visdoc entries
SOURCES: Dict[str, Tuple[str, Optional[str], str]] = {
    "ViDoRe_arxivqa": ("vidore/arxivqa_test_subsampled_beir", None, "test"),
    "ViDoRe_docvqa": ("vidore/docvqa_test_subsampled_beir", None, "test"),
    "ViDoRe_infovqa": ("vidore/infovqa_test_subsampled_beir", None, "test"),
    "ViDoRe_tabfquad": ("vidore/tabfquad_test_subsampled_beir", None, "test"),
    "ViDoRe_tatdqa": ("vidore/tatdqa_test_beir", None, "test"),
    "ViDoRe_shiftproject": ("vidore/shiftproject_test_beir", None, "test"),
    "ViDoRe_syntheticDocQA_artificial_intelligence": ("vidore/syntheticDocQA_artificial_intelligence_test_beir",
                                                      None, "test"),
    "ViDoRe_syntheticDocQA_energy": ("vidore/syntheticDocQA_energy_test_beir", None, "test"),
    "ViDoRe_syntheticDocQA_government_reports": ("vidore/syntheticDocQA_government_reports_test_beir", None, "test"),
    "ViDoRe_syntheticDocQA_healthcare_industry": ("vidore/syntheticDocQA_healthcare_industry_test_beir", None, "test"),
    "ViDoRe_esg_reports_human_labeled_v2": ("vidore/esg_reports_human_labeled_v2", None, "test"),
    "ViDoRe_biomedical_lectures_v2_multilingual": ("vidore/biomedical_lectures_v2", None, "test"),
    "ViDoRe_economics_reports_v2_multilingual": ("vidore/economics_reports_v2", None, "test"),
    "ViDoRe_esg_reports_v2_multilingual": ("vidore/esg_reports_v2", None, "test"),
    "VisRAG_ArxivQA": ("openbmb/VisRAG-Ret-Test-ArxivQA", None, "train"),
    "VisRAG_ChartQA": ("openbmb/VisRAG-Ret-Test-ChartQA", None, "train"),
    "VisRAG_MP-DocVQA": ("openbmb/VisRAG-Ret-Test-MP-DocVQA", None, "train"),
    "VisRAG_SlideVQA": ("openbmb/VisRAG-Ret-Test-SlideVQA", None, "train"),
    "VisRAG_InfoVQA": ("openbmb/VisRAG-Ret-Test-InfoVQA", None, "train"),
    "VisRAG_PlotQA": ("openbmb/VisRAG-Ret-Test-PlotQA", None, "train"),
    "ViDoSeek-doc": ("VLM2Vec/ViDoSeek", None, "test"),
    "ViDoSeek-page": ("VLM2Vec/ViDoSeek-page-fixed", None, "test"),
    "MMLongBench-doc": ("VLM2Vec/MMLongBench-doc", None, "test"),
    "MMLongBench-page": ("VLM2Vec/MMLongBench-page-fixed", None, "test"),
}
# The official prompts (vidore_dataset.py / visrag_dataset.py); the image token first, as the
# official process_input_text puts it.
QUERY_INSTRUCTION = "Find a document image that matches the given query:"
PAGE_TEXT = "<|image_1|> Understand the content of the provided document image."
CONFIG_COLUMNS = {"queries": ("query-id", "query"), "corpus": ("corpus-id", "image"),
                  "qrels": ("query-id", "corpus-id", "score")}


class VisdocDataError(ValueError):
    """A visual-document task that cannot be read; the message names task, file and field."""


def task_dir(root: Path, task: str) -> Path:
    """Where ``task``'s BEIR configs are under ``root`` (module docstring); an error lists
    the places looked at."""
    repo = SOURCES[task][0]
    tried = [Path(root) / repo, Path(root) / repo.split("/")[-1], Path(root) / task]
    for candidate in tried:
        if (candidate / "queries").is_dir() or (candidate / "corpus").is_dir():
            return candidate
    raise VisdocDataError(f"MMEB-V2 task {task}: no BEIR download found; looked for queries/, corpus/, qrels/ in "
                          f"{', '.join(str(p) for p in tried)} (download {repo} there)")


def _read_config(directory: Path, config: str, split: str, task: str) -> List[Dict[str, Any]]:
    folder = directory / config
    files = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob("*.parquet"))
    if not files:
        raise VisdocDataError(f"MMEB-V2 task {task}: no {config} parquet files in {folder} (expected "
                              f"{split}-00000-of-0000N.parquet)")
    return [row for _, _, row in parquet_rows(task, files, CONFIG_COLUMNS[config], VisdocDataError)]


@dataclass
class VisdocTask:
    """One task, ready to encode: the queries (text), their official info records, and the
    candidate pool (page ids in the official order, with where each page's image is)."""
    task: V2Task
    query_texts: List[str]
    infos: List[dict]                      # label_name, rel_scores, cand_names per query
    pool_ids: List[Any]                    # page ids, official pool order
    pages: Dict[Any, Any]                  # page id -> the corpus row's image (HF Image struct / bytes)
    source: str
    skipped: Dict[str, int] = field(default_factory=dict)

    @property
    def queries(self) -> "QueryDataset":
        return QueryDataset(self.query_texts)

    @property
    def candidates(self) -> "PageDataset":
        return PageDataset(self)


def load_visdoc_task(root: Path, task: str, image_root: Optional[str] = None) -> VisdocTask:
    """Read ``task`` from ``root`` (module docstring for the layout and the skip rules; the
    pages are in the corpus itself, ``image_root`` is not used)."""
    v2 = TASKS[task]
    repo, language, split = SOURCES[task]
    directory = task_dir(root, task)
    queries = _read_config(directory, "queries", split, task)
    qrels = _read_config(directory, "qrels", split, task)
    corpus = _read_config(directory, "corpus", split, task)
    if not corpus:
        raise VisdocDataError(f"MMEB-V2 task {task}: the corpus in {directory / 'corpus'} is empty")
    if language is not None:
        queries = [q for q in queries if q.get("language") == language]
    relevant: Dict[Any, Dict[Any, float]] = {}
    for row in qrels:  # load_qrels_mapping: score > 0, the highest score of a repeated pair
        if row["score"] is not None and row["score"] > 0:
            pages = relevant.setdefault(row["query-id"], {})
            pages[row["corpus-id"]] = max(pages.get(row["corpus-id"], 0), row["score"])
    pages = {}
    for i, row in enumerate(corpus):
        if row["image"] is None:
            raise VisdocDataError(f"MMEB-V2 task {task}: corpus row {i} (corpus-id {row['corpus-id']!r}) "
                                  f"has no image")
        pages.setdefault(row["corpus-id"], row["image"])
    skipped = {"queries_without_relevant_page": 0, "judgements_for_pages_not_in_corpus": 0}
    texts, infos, pool = [], [], {}
    for q in queries:
        judged = relevant.get(q["query-id"], {})
        kept = {page: score for page, score in judged.items() if page in pages}
        skipped["judgements_for_pages_not_in_corpus"] += len(judged) - len(kept)
        if not kept:
            skipped["queries_without_relevant_page"] += 1
            continue
        texts.append(f"{QUERY_INSTRUCTION} {q['query']}")
        names = list(kept)
        infos.append({"cand_names": names, "label_name": names, "rel_scores": [kept[n] for n in names]})
        for n in names:
            pool.setdefault(n, None)
    for page in pages:
        pool.setdefault(page, None)
    for what, n in skipped.items():
        if n:
            logger.warning("MMEB-V2 task %s: skipped %d %s (%s)", task, n, what.replace("_", " "), directory)
    return VisdocTask(v2, texts, infos, list(pool), pages, f"{repo} ({directory})",
                      {k: v for k, v in skipped.items() if v})


def _decode(image: Any, where: str):
    from PIL import Image

    data = image.get("bytes") if isinstance(image, dict) else image
    if isinstance(image, dict) and not data and image.get("path"):
        return Image.open(image["path"]).convert("RGB")
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"{where}: the image is neither bytes nor an HF image record ({type(image).__name__})")
    return Image.open(io.BytesIO(data)).convert("RGB")


class QueryDataset(torch.utils.data.Dataset):
    """The queries as text-only sides."""

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> Side:
        return Side(self.texts[i])


class PageDataset(torch.utils.data.Dataset):
    """The pool's pages as image sides, each decoded when its batch is asked for."""

    def __init__(self, vt: VisdocTask):
        self.ids, self.pages, self.task = list(vt.pool_ids), vt.pages, vt.task.name

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Side:
        where = f"MMEB-V2 task {self.task}: corpus-id {self.ids[i]!r}"
        try:
            return Side(PAGE_TEXT, _decode(self.pages[self.ids[i]], where))
        except (ValueError, OSError) as exc:  # reported by the main process, without a worker traceback
            return Side(PAGE_TEXT, error=f"{where}: {type(exc).__name__}: {exc}")
