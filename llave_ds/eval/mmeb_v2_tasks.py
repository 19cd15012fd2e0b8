"""MMEB-V2's 78 tasks as the official code lists them: name, modality, category, how the
candidates are formed, and each modality's main metric.

The spec is TIGER-AI-Lab/VLM2Vec (read at commit 6e1e1d4, 2026-12-07):

* the task names, their order and their modality: ``experiments/report_score_v2.py``
  (``modality2dataset``: 36 image, 18 video, 24 visual-document tasks) -- the names of the
  score files (``<task>_score.json``) and of the rows of every published per-task table;
* each task's main metric: the same script's ``modality2metric``: ``hit@1`` for image and
  video tasks, ``ndcg_linear@5`` for visual documents;
* the categories: the comments of ``experiments/public/eval/image.yaml`` (CLS, QA, RET, VG)
  and the groups of the report's lists (video: CLS, QA, RET, MRET; visual documents: ViDoRe
  V1, ViDoRe V2, VisRAG, out-of-domain), which the VLM2Vec-V2 paper's tables use;
* ``eval_type``: ``experiments/public/eval/{image,video,visdoc}.yaml``. ``local``: each query is
  ranked against its own candidate list; ``global``: against every candidate of the task
  (the corpus of pages, the label set of a classification task, the captions of a
  retrieval task).

The official report script forms only the modality means (unweighted over the modality's
tasks); the category means and the overall mean (unweighted over all 78 tasks) are ours and
are marked so in docs/EVALUATION.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

MODALITIES: Tuple[str, ...] = ("image", "video", "visdoc")
MAIN_METRIC: Dict[str, str] = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}

# (category, eval_type, tasks) per modality, in the report script's task order.
_TABLE: Dict[str, Sequence[Tuple[str, str, Sequence[str]]]] = {
    "image": (
        ("CLS", "local", ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                          "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")),
        ("QA", "local", ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA",
                         "VizWiz", "GQA", "TextVQA")),
        ("RET", "local", ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                          "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")),
        ("VG", "local", ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")),
    ),
    "video": (
        ("CLS", "global", ("K700", "HMDB51", "UCF101", "Breakfast")),
        ("CLS", "local", ("SmthSmthV2",)),
        ("QA", "local", ("MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA")),
        ("RET", "global", ("DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2")),
        ("MRET", "local", ("QVHighlight", "Charades-STA", "MomentSeeker")),
    ),
    "visdoc": (
        ("VDRv1", "global", ("ViDoRe_arxivqa", "ViDoRe_docvqa", "ViDoRe_infovqa", "ViDoRe_tabfquad",
                             "ViDoRe_tatdqa", "ViDoRe_shiftproject", "ViDoRe_syntheticDocQA_artificial_intelligence",
                             "ViDoRe_syntheticDocQA_energy", "ViDoRe_syntheticDocQA_government_reports",
                             "ViDoRe_syntheticDocQA_healthcare_industry")),
        ("VDRv2", "global", ("ViDoRe_esg_reports_human_labeled_v2", "ViDoRe_biomedical_lectures_v2_multilingual",
                             "ViDoRe_economics_reports_v2_multilingual", "ViDoRe_esg_reports_v2_multilingual")),
        ("VR", "global", ("VisRAG_ArxivQA", "VisRAG_ChartQA", "VisRAG_MP-DocVQA", "VisRAG_SlideVQA",
                          "VisRAG_InfoVQA", "VisRAG_PlotQA")),
        ("OOD", "global", ("ViDoSeek-page", "ViDoSeek-doc", "MMLongBench-page", "MMLongBench-doc")),
    ),
}
# The report script's order within a modality (the video CLS group is split above only for
# its eval_type): the order of rows in every table we write.
_ORDER: Dict[str, Sequence[str]] = {
    "video": ("K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast", "MVBench", "Video-MME", "NExTQA", "EgoSchema",
              "ActivityNetQA", "DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2", "QVHighlight", "Charades-STA",
              "MomentSeeker"),
}
CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "image": ("CLS", "QA", "RET", "VG"), "video": ("CLS", "QA", "RET", "MRET"),
    "visdoc": ("VDRv1", "VDRv2", "VR", "OOD")}


@dataclass(frozen=True)
class V2Task:
    name: str
    modality: str
    category: str
    eval_type: str   # "local" | "global"

    @property
    def main_metric(self) -> str:
        return MAIN_METRIC[self.modality]


def _build() -> Dict[str, V2Task]:
    tasks: Dict[str, V2Task] = {}
    for modality in MODALITIES:
        found = {name: V2Task(name, modality, category, eval_type)
                 for category, eval_type, names in _TABLE[modality] for name in names}
        for name in _ORDER.get(modality, list(found)):
            tasks[name] = found[name]
    return tasks


TASKS: Dict[str, V2Task] = _build()


def tasks_of(modalities: Optional[Iterable[str]] = None, names: Optional[Iterable[str]] = None) -> List[V2Task]:
    """The selected tasks in the official order: those of ``modalities`` (default: all three),
    narrowed to ``names`` when given. Unknown names or modalities are a ValueError that lists
    what exists."""
    mods = list(modalities) if modalities else list(MODALITIES)
    bad = [m for m in mods if m not in MODALITIES]
    if bad:
        raise ValueError(f"unknown MMEB-V2 modality {', '.join(bad)}; known: {', '.join(MODALITIES)}")
    chosen = [t for t in TASKS.values() if t.modality in mods]
    if names is not None:
        wanted = list(names)
        unknown = [n for n in wanted if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown MMEB-V2 task {', '.join(unknown)}; known: {', '.join(TASKS)}")
        chosen = [t for t in chosen if t.name in set(wanted)]
    return chosen
