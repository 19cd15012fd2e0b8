"""MMEB-V2's 36 image tasks read as users download them, with the queries, candidates and
candidate names the official parsers build.

The spec (TIGER-AI-Lab/VLM2Vec, commit 6e1e1d4): ``src/data/eval_dataset/image_cls_dataset.py``,
``image_qa_dataset.py``, ``image_i2t_eval.py``, ``image_t2i_eval.py`` and
``image_i2i_vg_dataset.py`` read the hub dataset ``ziyjiang/MMEB_Test_Instruct`` (one config
per task, split ``test``: ``qry_inst``, ``qry_text``, ``qry_img_path``, ``tgt_inst``,
``tgt_text``, ``tgt_img_path``) with the images of MMEB-eval under an image root; every image
task ranks each query against its own candidates (``eval_type: local``).

Texts, with ``<|image_1|>`` where the official code puts the backbone's image token
(``process_input_text``: image token, instruction, text, joined by spaces; " \\n" -> "\\n"):

* classification, i2t: query = image + ``qry_inst`` (its image tag removed) + ``qry_text`` + "\\n";
  candidates = the ``tgt_text`` strings, named by themselves;
* QA, i2i / grounding: the same with "\\n" before the stripped instruction; grounding's
  candidates are images (+ instruction, + caption where the task has captions), named
  ``path:caption`` (RefCOCO-Matching has several objects of one image as candidates);
* t2i: query = ``qry_inst`` + " " + ``qry_text`` + "\\n" (VisDial: one more "\\n"), no image;
  candidates = images with the target instruction (and each caption where WebQA / EDIS have
  them), named by their image path.

A task's directory holds ``<task>/test-*.parquet`` as the hub snapshot has it, looked for under
``--data`` as ``ziyjiang/MMEB_Test_Instruct/<task>``, ``MMEB_Test_Instruct/<task>`` or
``<task>``; images under ``--image-root`` (default ``--data``/image-tasks, the official
``image_root``). A row without candidates, a missing column or an image that does not decode
is an error naming the task, file and row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llave_ds.eval.mmeb_v2 import parquet_rows
from llave_ds.eval.mmeb_v2_tasks import TASKS, V2Task
from llave_ds.media.image import load_image
from llave_ds.media.side import Side

IMAGE = "<|image_1|>"
COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")
# task -> the official parser (experiments/public/eval/image.yaml)
PARSERS: Dict[str, str] = {
    **{t: "image_cls" for t in ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                                "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{t: "image_qa" for t in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
                               "ScienceQA", "VizWiz", "GQA", "TextVQA")},
    **{t: "image_i2t" for t in ("MSCOCO_i2t", "VisualNews_i2t")},
    **{t: "image_t2i" for t in ("VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ")},
    **{t: "image_i2i_vg" for t in ("CIRR", "NIGHTS", "OVEN", "FashionIQ", "MSCOCO", "RefCOCO", "RefCOCO-Matching",
                                   "Visual7W-Pointing")},
}
HUB = "ziyjiang/MMEB_Test_Instruct"


class ImageTaskError(ValueError):
    """An image task that cannot be read; the message names task, file, row and field."""


def _prompt(instruction: str, text: str = "", image: bool = True) -> str:
    """The official ``process_input_text`` with the image token first, then " \\n" -> "\\n"."""
    prompt = instruction + (" " + text if text else "")
    return ((IMAGE + " " + prompt) if image else prompt).replace(" \n", "\n")


def query_text(parser: str, task: str, row: dict) -> Tuple[str, bool]:
    """(text, has image) of a row's query."""
    inst, text = row["qry_inst"] or "", row["qry_text"] or ""
    if parser == "image_t2i":  # no image: an image tag in the instruction would have nothing to show
        out = inst.replace(IMAGE, "").strip() + " " + text + "\n" + ("\n" if task == "VisDial" else "")
        return out, False
    inst = inst.replace(IMAGE, "")
    if parser in ("image_qa", "image_i2i_vg"):
        inst = "\n" + inst.strip()
    return _prompt(inst, text) + "\n", True


def candidates(parser: str, row: dict) -> List[Tuple[str, str, Optional[str]]]:
    """(name, text, image path or None) of a row's candidates, in order."""
    texts, paths = list(row["tgt_text"] or []), list(row["tgt_img_path"] or [])
    if parser in ("image_cls", "image_qa", "image_i2t"):
        return [(t, t, None) for t in texts]
    inst = (row["tgt_inst"] or "").replace(IMAGE, "")
    captioned = bool(texts and texts[0].strip())
    if captioned:
        shown = [_prompt(inst + " " + cap) + "\n" for cap in texts]
    else:
        shown = [_prompt(inst) + ("\n" if parser == "image_t2i" else "")] * len(paths)
    if parser == "image_t2i":
        names = paths
    else:
        caps = texts if texts else [""] * len(paths)
        names = [p + ":" + c.strip('"') for p, c in zip(paths, caps)]
    return list(zip(names, shown, paths))


def task_dir(root: Path, task: str) -> Path:
    tried = [Path(root) / HUB / task, Path(root) / HUB.split("/")[-1] / task, Path(root) / task]
    for candidate in tried:
        if any(candidate.glob("*.parquet")):
            return candidate
    raise ImageTaskError(f"MMEB-V2 task {task}: no download found; looked for *.parquet in "
                         f"{', '.join(str(p) for p in tried)} (download {HUB}, config {task}, there)")


@dataclass
class ImageTask:
    """One task, ready to encode: query sides, the candidate set (first occurrence of each
    name, as the official code encodes it) and the official info records."""
    task: V2Task
    query_items: List[Tuple[str, Optional[str]]]      # (text, image path)
    infos: List[dict]
    pool_ids: List[str]
    pool_items: List[Tuple[str, Optional[str]]]       # (text, image path) per pool id
    image_root: str
    source: str
    skipped: Dict[str, int] = field(default_factory=dict)

    @property
    def queries(self) -> "PathSideDataset":
        return PathSideDataset(self.query_items, self.image_root, self.task.name, "query")

    @property
    def candidates(self) -> "PathSideDataset":
        return PathSideDataset(self.pool_items, self.image_root, self.task.name, "candidate")


def load_image_task(root: Path, task: str, image_root: Optional[str] = None) -> ImageTask:
    v2, parser = TASKS[task], PARSERS[task]
    directory = task_dir(root, task)
    files = sorted(directory.glob("test-*.parquet")) or sorted(directory.glob("*.parquet"))
    image_root = str(image_root or Path(root) / "image-tasks")
    queries, infos, pool = [], [], {}
    for f, i, row in parquet_rows(task, files, COLUMNS, ImageTaskError):
        cands = candidates(parser, row)
        if not cands:
            raise ImageTaskError(f"MMEB-V2 task {task}: {f} row {i}: no candidates (tgt_text / tgt_img_path)")
        text, has_image = query_text(parser, task, row)
        if has_image and not row["qry_img_path"]:
            raise ImageTaskError(f"MMEB-V2 task {task}: {f} row {i}: qry_img_path is empty")
        queries.append((text, row["qry_img_path"] if has_image else None))
        names = [name for name, _, _ in cands]
        infos.append({"cand_names": names, "label_name": names[0]})
        for name, shown, path in cands:
            pool.setdefault(name, (shown, path))
    return ImageTask(v2, queries, infos, list(pool), list(pool.values()), image_root, f"{HUB} ({directory})")


class PathSideDataset(torch.utils.data.Dataset):
    """(text, image path under the image root or None) items as sides, each image decoded
    when its batch is asked for."""

    def __init__(self, items: Sequence[Tuple[str, Optional[str]]], image_root: str, task: str, role: str):
        self.items, self.image_root, self.task, self.role = list(items), image_root, task, role

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Side:
        text, path = self.items[i]
        if not path:
            return Side(text)
        try:
            return Side(text, load_image(path, image_root=self.image_root), image_path=path)
        except (ValueError, OSError) as exc:  # reported by the main process, without a worker traceback
            return Side(text, image_path=path, error=f"MMEB-V2 task {self.task}: {self.role} {i} ({path}): "
                                                     f"{type(exc).__name__}: {exc}")
