"""MMEB-V2's video retrieval tasks (MSR-VTT, MSVD, DiDeMo, VATEX, YouCook2), video
classification tasks (K700, SmthSmthV2, HMDB51, UCF101, Breakfast), video QA tasks (NExTQA,
EgoSchema, Video-MME, ActivityNetQA, MVBench) and the moment-retrieval tasks (QVHighlight,
Charades-STA, MomentSeeker) read as users download them, with the frames the official loaders
pick: all 18 of MMEB-V2's video tasks.

The spec (TIGER-AI-Lab/VLM2Vec, commit 6e1e1d4): ``src/data/eval_dataset/{msrvtt,msvd,didemo,
vatex,youcook2}_dataset.py`` (columns, instructions, video names), ``dataset_hf_path.py``
(hub dataset, config, split), ``experiments/public/eval/video.yaml`` (frame folders, 8 frames,
64 saved, ``eval_type: global``) and ``src/utils/vision_utils/vision_utils.py`` (the frames):

* each row is one query, the caption (MSVD, VATEX: the first of the list) after the task's
  instruction; its one relevant candidate is the row's video, named by the video's name;
  every query is ranked against every video of the task;
* a video is its frame folder ``<frame root>/<video name>/`` (images in natural name order;
  the official ``frame_root``: ``video-tasks/frames/video_ret/<task>/`` under ``--data``), of
  which 8 frames are taken at ``numpy.linspace(0, n - 1, 8)`` (all of them when the folder has
  fewer; our video pipeline then repeats frames in order up to the model's ``video_frames``);
  without a folder the video file under ``video-tasks/videos/video_ret/<task>/`` is read as
  the official ``save_frames`` would extract it (64 frames at ``floor(i * total / 64)``), then
  the same 8 are taken;
* candidate text ``<video> Understand the content of the provided video.``.

QA (``nextqa``, ``egoschema``, ``videomme``, ``activitynetqa_dataset.py``): the query is the
video (frames under ``video-tasks/frames/video_qa/<task>/<video>/``; ActivityNetQA's folders
are ``v_<name>``) with the official prompt, the question and the options written as each parser
writes them (`qa_row`); each query ranks its own options (``local``), named as the parser names
them (EgoSchema / Video-MME: the lettered option, encoded without its letter). Only frame folders
are read for QA: the official code extracts missing ones from the files with its own cv2 rule.

MVBench (``mvbench_dataset.py``, ``load_hf_dataset_multiple_subset``): the twenty sub-datasets of
``VLM2Vec/MVBench`` (one config each, split ``train``) read in the official ``subset_meta``
order and concatenated (`MVBENCH_SUBSETS`; downloaded as ``VLM2Vec/MVBench/<subset>/``). The
query is the row's video (``video-tasks/frames/video_qa/MVBench/<subset>/<video>/``, the folder
named by the ``video`` column as it is, ``.mp4`` included) with the QA prompt, the question and
the ``candidates`` lettered ``(A) ...`` one per line (``qa_template``, `mvbench_row`); the
lettered options are the candidates' names and texts, ranked locally, the lettered answer the
relevant one. The time bounds and fps-based frame picking in ``mvbench_dataset.py``
(``get_index``, ``read_video``, ``read_gif``, ``read_frame``) are never called by its
``data_prepare``: the official frames are the frame folder's, picked by ``process_video_frames``
as for the other tasks, and so are ours (frame folders only: the official fallback that
extracts a missing folder from the video with cv2, or copies TVQA's frames, is not reproduced).
An answer that is none of the candidates is an error naming the sub-dataset, file and row (the
official ``qa_template`` labels it ``(@) <answer>``, which no candidate can match).

MomentSeeker (``momentseeker_dataset.py``): text, text + image or text + video-segment queries,
several relevant clips per query; `_load_moment_seeker`.

Moment retrieval (``moment_retrieval_datasets.py``): the query is the row's video
(``video-tasks/frames/video_mret/<task>/<video>/query/``) with "Find the clip that corresponds
to the described scene in the given video:" and the row's ``query``; its candidates are the
clip folders beside ``query/``, the ``positive*`` one relevant (`_load_moments` for how we name
and order them); frame folders only.

Classification (``video_classification_datasets.py``, ``ssv2_dataset.py``): each row's video
(``video_id``; frames under ``video-tasks/frames/video_cls/<K700|SSv2|HMDB51|UCF101|Breakfast>/``)
after the task's instruction is the query; its label (``pos_text``) the relevant candidate.
K700, HMDB51, UCF101 and Breakfast rank against every label of the official label list
(``mmeb_v2_video_labels.json``, taken from ``video_classification_utils.py``: the pool is the
labels of the rows in row order, then the rest of the list); SmthSmthV2 ranks each query
against its own ``neg_text`` options, on the first 1,000 rows (``num_sample_per_subset``).

A row whose video has neither a frame folder nor a file is an error naming the task, row and
the two places looked at (the official code raises ``FileNotFoundError`` there too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from llave_ds.eval.mmeb_v2 import parquet_rows
from llave_ds.eval.mmeb_v2_tasks import TASKS, V2Task
from llave_ds.media.files import MediaError, resolve_under_root
from llave_ds.media.image import load_image
from llave_ds.media.side import Side
from llave_ds.media.video import list_frame_files, read_video

VIDEO = "<|video_1|>"
CANDIDATE_TEXT = VIDEO + " Understand the content of the provided video."
NUM_FRAMES, MAX_FRAMES_SAVED = 8, 64


@dataclass(frozen=True)
class RetrievalSpec:
    repo: str
    config: Optional[str]
    split: str
    instruction: str
    caption: str           # the caption column
    first_caption: bool    # the column holds a list: its first caption is the query
    video: str             # the column naming the video file ("" : the id column + ".mp4")
    name: str              # the column naming the video ("" : the video file's stem)


SPECS: Dict[str, RetrievalSpec] = {
    "MSR-VTT": RetrievalSpec("VLM2Vec/MSR-VTT", "test_1k", "test",
                             "Find a video that contains the following visual content:", "caption", False,
                             "video", "video_id"),
    "MSVD": RetrievalSpec("VLM2Vec/MSVD", None, "test", "Find the video snippet that corresponds to the given summary:",
                          "caption", True, "video", "video_id"),
    "DiDeMo": RetrievalSpec("VLM2Vec/DiDeMo", None, "test", "Find a video that includes the following described scenes:",
                            "caption", False, "video", ""),
    "VATEX": RetrievalSpec("VLM2Vec/VATEX", None, "test", "Select a video that fits the description provided:",
                           "enCap", True, "", "videoID"),
    "YouCook2": RetrievalSpec("lmms-lab/YouCook2", None, "val",
                              "Find a video that demonstrates the following action while making a recipe:",
                              "sentence", False, "video_path", "id"),
}


@dataclass(frozen=True)
class ClassificationSpec:
    repo: str
    frames: str            # the folder under video-tasks/{frames,videos}/video_cls/
    max_rows: Optional[int] = None
    options: bool = False  # SmthSmthV2: each row's own neg_text options (local), not the label list
    split: str = "test"
    config: Optional[str] = None


CLASSIFICATION: Dict[str, ClassificationSpec] = {
    "K700": ClassificationSpec("VLM2Vec/Kinetics-700", "K700"),
    "SmthSmthV2": ClassificationSpec("VLM2Vec/SmthSmthV2", "SSv2", max_rows=1000, options=True),
    "HMDB51": ClassificationSpec("VLM2Vec/HMDB51", "HMDB51"),
    "UCF101": ClassificationSpec("VLM2Vec/UCF101", "UCF101"),
    "Breakfast": ClassificationSpec("VLM2Vec/Breakfast", "Breakfast"),
}
LABELS_FILE = Path(__file__).with_name("mmeb_v2_video_labels.json")

QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided candidates. "
             "Return only the exact text of your chosen answer. Question: ")


@dataclass(frozen=True)
class QASpec:
    repo: str
    config: Optional[str]
    columns: Tuple[str, ...]
    split: str = "test"


QA: Dict[str, QASpec] = {   # nextqa / egoschema / videomme / activitynetqa_dataset.py
    "NExTQA": QASpec("VLM2Vec/NExTQA", "MC", ("video", "question", "answer", "a0", "a1", "a2", "a3", "a4")),
    "EgoSchema": QASpec("VLM2Vec/EgoSchema", "Subset", ("video_idx", "question", "answer", "option")),
    "Video-MME": QASpec("VLM2Vec/Video-MME", None, ("videoID", "question", "answer", "options")),
    "ActivityNetQA": QASpec("VLM2Vec/ActivityNetQA", None, ("video_name", "question", "answer")),
}


def _strip_letter(option: str) -> str:
    """``"B. a red car"`` -> ``"a red car"`` (the official ``o[o.find('. '):].strip('. ')``)."""
    return option[option.find(". "):].strip(". ")


def qa_row(task: str, row: dict) -> Tuple[str, str, List[str], List[str], str]:
    """(query text, video folder name, candidate names, candidate texts, the answer's name) of
    one row, as the task's official parser builds them (``<|video_1|>`` for the video token)."""
    def query(body: str) -> str:       # process_query: token, prompt, question
        return f"{VIDEO} {QA_PROMPT} {body}"

    if task == "NExTQA":
        options = [row[f"a{i}"] for i in range(5)]
        text = query(row["question"]) + "\nOptions:\n" + "".join(
            f"({chr(ord('A') + i)}) {o}\n" for i, o in enumerate(options))
        return text.rstrip(), str(row["video"]), options, options, options[int(row["answer"])]
    if task == "EgoSchema":
        options = list(row["option"])
        return (query(row["question"] + " ".join(options)), str(row["video_idx"]), options,
                [_strip_letter(o) for o in options], options[int(row["answer"])])
    if task == "Video-MME":
        options = list(row["options"])
        answer = options["ABCD".index(row["answer"])]
        return (query(row["question"] + "\n" + "\n".join(options)), str(row["videoID"]), options,
                [_strip_letter(o) for o in options], answer)
    options = ["yes", "no"]                     # ActivityNetQA
    return query(row["question"] + "? (A) yes; (B) no."), f"v_{row['video_name']}", options, options, row["answer"]


# MVBench (mvbench_dataset.py): the keys of subset_meta, the order the official code loads them in
MVBENCH_REPO, MVBENCH_SPLIT = "VLM2Vec/MVBench", "train"
MVBENCH_SUBSETS: Tuple[str, ...] = (
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym", "fine_grained_action",
    "unexpected_action", "object_existence", "object_interaction", "object_shuffle", "moving_direction",
    "action_localization", "scene_transition", "action_count", "moving_count", "moving_attribute", "state_change",
    "fine_grained_pose", "character_order", "egocentric_navigation", "counterfactual_inference")


def mvbench_row(subset: str, row: dict) -> Tuple[str, str, List[str], str]:
    """(query text, video key ``<subset>/<video>``, the lettered options, the lettered answer) of
    one MVBench row, as ``process_query`` and ``qa_template`` build them: the answer's letter is
    that of the last candidate equal to it (the official loop does not stop at the first), ``@``
    when none is (the official code's silent ``answer_idx`` -1; `load_video_task` refuses it)."""
    text = f"{VIDEO} {QA_PROMPT} {row['question']}\nOptions:\n"
    options, answer_idx = [], -1
    for idx, candidate in enumerate(row["candidates"]):
        options.append(f"({chr(ord('A') + idx)}) {candidate}")
        text += options[-1] + "\n"
        if candidate == row["answer"]:
            answer_idx = idx
    return (text.rstrip(), f"{subset}/{row['video']}", options,
            f"({chr(ord('A') + answer_idx)}) {row['answer']}")


def official_labels() -> dict:
    """``{"labels": {task: [...]}, "instructions": {task: str}}`` (the official lists)."""
    import json

    return json.loads(LABELS_FILE.read_text(encoding="utf-8"))


# moment retrieval (moment_retrieval_datasets.py): task -> hub dataset (default config, split test)
MOMENTS: Dict[str, str] = {"QVHighlight": "VLM2Vec/QVHighlight", "Charades-STA": "VLM2Vec/Charades-STA"}
MOMENT_QUERY = "Find the clip that corresponds to the described scene in the given video:"


@dataclass(frozen=True)
class MomentSpec:
    repo: str
    config: Optional[str] = None
    split: str = "test"


# MomentSeeker (momentseeker_dataset.py): text, text + image or text + video queries
SEEKER_REPO = "VLM2Vec/MomentSeeker"
SEEKER_QUERY = {"text": "Find the clip that corresponds to the given text:",
                "image": "Select the video clip that aligns with the given text and image:",
                "video": "Find the clip that corresponds to the given sentence and video segment:"}
SEEKER_CANDIDATE_TEXT = VIDEO + " Understand the content of the provided video clip."
IMAGE_SOURCE = "<image>"   # a sources entry (path, IMAGE_SOURCE) is an image, not a video

READABLE = (frozenset(SPECS) | frozenset(CLASSIFICATION) | frozenset(QA) | frozenset(MOMENTS)
            | {"MomentSeeker", "MVBench"})


class VideoTaskError(ValueError):
    """A video task that cannot be read; the message names task, file, row and field."""


def official_frame_indices(total: int, num_frames: int = NUM_FRAMES) -> List[int]:
    """``process_video_frames``: ``numpy.linspace(0, total - 1, num_frames)`` as int; every
    frame when the folder has fewer than ``num_frames``."""
    if total <= 0:
        return []
    if num_frames > total:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def task_dir(root: Path, task: str) -> Path:
    if task == "MVBench":
        return _mvbench_dir(root)
    spec = (SPECS.get(task) or CLASSIFICATION.get(task) or QA.get(task)
            or (MomentSpec(MOMENTS[task]) if task in MOMENTS else None)
            or (MomentSpec(SEEKER_REPO) if task == "MomentSeeker" else None))
    if spec is None:
        raise VideoTaskError(f"MMEB-V2 task {task}: not a video task (video tasks: {', '.join(sorted(READABLE))})")
    bases = [Path(root) / spec.repo, Path(root) / spec.repo.split("/")[-1], Path(root) / task]
    for base in bases:
        for sub in ([spec.config] if spec.config else []) + ["data", "."]:
            if list((base / sub).glob(f"{spec.split}-*.parquet")):
                return base / sub
    raise VideoTaskError(f"MMEB-V2 task {task}: no download found; looked for {spec.split}-*.parquet in "
                         f"{', '.join(str(b) for b in bases)} (and their {spec.config or 'data'}/ folders; "
                         f"download {spec.repo} there)")


def _mvbench_dir(root: Path) -> Path:
    """The folder holding MVBench's sub-dataset folders (``<subset>/train-*.parquet``): the first
    of ``VLM2Vec/MVBench`` and ``MVBench`` under ``root`` holding any; `_load_mvbench` wants all
    twenty."""
    bases = [Path(root) / MVBENCH_REPO, Path(root) / "MVBench"]
    for base in bases:
        if any(list((base / subset).glob(f"{MVBENCH_SPLIT}-*.parquet")) for subset in MVBENCH_SUBSETS):
            return base
    raise VideoTaskError(f"MMEB-V2 task MVBench: no download found; looked for <sub-dataset>/{MVBENCH_SPLIT}-*.parquet "
                         f"in {', '.join(str(b) for b in bases)} (download {MVBENCH_REPO} there: one folder per "
                         f"sub-dataset, {', '.join(MVBENCH_SUBSETS)})")


@dataclass
class VideoTask:
    """One task, ready to encode: queries and the candidate pool as (text, video name or None)
    items, the videos' sources, and the official info records."""
    task: V2Task
    query_items: List[Tuple[str, Optional[str]]]
    infos: List[dict]
    pool_ids: List[str]
    pool_items: List[Tuple[str, Optional[str]]]
    sources: Dict[str, Tuple[str, str]]      # video name -> (frame folder, video file); or (image path, IMAGE_SOURCE)
    source: str
    skipped: Dict[str, int] = field(default_factory=dict)

    @property
    def queries(self) -> "VideoSideDataset":
        return VideoSideDataset(self.query_items, self.sources, self.task.name)

    @property
    def candidates(self) -> "VideoSideDataset":
        return VideoSideDataset(self.pool_items, self.sources, self.task.name)


def _rows(task: str, directory: Path, split: str, needed: Sequence[str]):
    return parquet_rows(task, sorted(directory.glob(f"{split}-*.parquet")), needed, VideoTaskError)


def load_video_task(root: Path, task: str, image_root: Optional[str] = None) -> VideoTask:
    """Read ``task`` (module docstring); ``image_root`` replaces ``--data`` as the root of
    ``video-tasks/`` when given. Every frame folder, video file and image a row names must lie
    under that root (the training readers' rule, `resolve_under_root`): a video name with
    ``../`` or an absolute path is an error naming the task and the name."""
    media_root = Path(image_root) if image_root else Path(root)
    loaded = _load_video_task(root, task, media_root)
    if not loaded.query_items:
        raise VideoTaskError(f"MMEB-V2 task {task}: no rows in {loaded.source}")
    for name, (path, kind) in loaded.sources.items():
        for each in (path, kind if kind and kind != IMAGE_SOURCE else ""):
            if each:
                try:
                    resolve_under_root(str(media_root), each)
                except MediaError as exc:
                    raise VideoTaskError(f"MMEB-V2 task {task}: video {name!r}: {exc}") from None
    return loaded


def _load_video_task(root: Path, task: str, media_root: Path) -> VideoTask:
    if task in CLASSIFICATION:
        return _load_classification(root, task, media_root)
    if task in QA:
        return _load_qa(root, task, media_root)
    if task in MOMENTS:
        return _load_moments(root, task, media_root)
    if task == "MomentSeeker":
        return _load_moment_seeker(root, media_root)
    if task == "MVBench":
        return _load_mvbench(root, media_root)
    spec, directory = SPECS[task], task_dir(root, task)
    frames_root = media_root / "video-tasks" / "frames" / "video_ret" / task
    videos_root = media_root / "video-tasks" / "videos" / "video_ret" / task
    queries, infos, sources = [], [], {}
    for f, i, row in _rows(task, directory, spec.split, (spec.caption, spec.video, spec.name)):
        caption = row[spec.caption]
        if spec.first_caption:
            if not caption:
                raise VideoTaskError(f"MMEB-V2 task {task}: {f} row {i}: {spec.caption} is empty")
            caption = caption[0]
        file = os.path.basename(row[spec.video]) if spec.video else f"{row[spec.name]}.mp4"
        name = str(row[spec.name]) if spec.name else os.path.splitext(file)[0]
        queries.append((f"{spec.instruction} {caption}", None))
        infos.append({"cand_names": [name], "label_name": name})
        sources.setdefault(name, (str(frames_root / name), str(videos_root / file)))
    return VideoTask(TASKS[task], queries, infos, list(sources), [(CANDIDATE_TEXT, n) for n in sources], sources,
                     f"{spec.repo} ({directory})")


def _load_classification(root: Path, task: str, media_root: Path) -> VideoTask:
    spec, directory = CLASSIFICATION[task], task_dir(root, task)
    official = official_labels()
    text = VIDEO + " " + official["instructions"][task]
    frames_root = media_root / "video-tasks" / "frames" / "video_cls" / spec.frames
    videos_root = media_root / "video-tasks" / "videos" / "video_cls" / spec.frames
    queries, infos, sources, pool = [], [], {}, {}
    needed = ("video_id", "pos_text") + (("neg_text",) if spec.options else ())
    for f, i, row in _rows(task, directory, spec.split, needed):
        if spec.max_rows is not None and len(queries) >= spec.max_rows:
            break
        name = str(row["video_id"])
        sources.setdefault(name, (str(frames_root / name), str(videos_root / f"{name}.mp4")))
        queries.append((text, name))
        names = list(row["neg_text"]) if spec.options else [row["pos_text"]]
        if not names:
            raise VideoTaskError(f"MMEB-V2 task {task}: {f} row {i}: no options in neg_text")
        infos.append({"cand_names": names, "label_name": row["pos_text"]})
        for n in names:
            pool.setdefault(n, None)
    if not spec.options:  # the rest of the official label list after the rows' own labels
        for label in official["labels"][task]:
            pool.setdefault(label, None)
    return VideoTask(TASKS[task], queries, infos, list(pool), [(n, None) for n in pool], sources,
                     f"{spec.repo} ({directory})")


def _load_qa(root: Path, task: str, media_root: Path) -> VideoTask:
    spec, directory = QA[task], task_dir(root, task)
    frames_root = media_root / "video-tasks" / "frames" / "video_qa" / task
    queries, infos, sources, pool = [], [], {}, {}
    for f, i, row in _rows(task, directory, spec.split, spec.columns):
        try:
            text, video_name, names, texts, answer = qa_row(task, row)
        except (IndexError, ValueError, TypeError) as exc:
            raise VideoTaskError(f"MMEB-V2 task {task}: {f} row {i}: the answer does not name an option "
                                 f"({type(exc).__name__}: {exc})") from None
        if answer not in names:
            raise VideoTaskError(f"MMEB-V2 task {task}: {f} row {i}: answer {answer!r} is not an option")
        sources.setdefault(video_name, (str(frames_root / video_name), ""))
        queries.append((text, video_name))
        infos.append({"cand_names": names, "label_name": answer})
        for name, shown in zip(names, texts):
            pool.setdefault(name, shown)
    return VideoTask(TASKS[task], queries, infos, list(pool), [(shown, None) for shown in pool.values()], sources,
                     f"{spec.repo} ({directory})")


def _load_mvbench(root: Path, media_root: Path) -> VideoTask:
    """MVBench: the twenty sub-datasets in `MVBENCH_SUBSETS` order, each a QA task of its own
    rows (`mvbench_row`); a missing sub-dataset or an answer that is no candidate is an error."""
    task, base = "MVBench", _mvbench_dir(root)
    frames_root = media_root / "video-tasks" / "frames" / "video_qa" / task
    queries, infos, sources, pool = [], [], {}, {}
    for subset in MVBENCH_SUBSETS:
        files = sorted((base / subset).glob(f"{MVBENCH_SPLIT}-*.parquet"))
        if not files:
            raise VideoTaskError(f"MMEB-V2 task {task}: sub-dataset {subset}: no {MVBENCH_SPLIT}-*.parquet in "
                                 f"{base / subset} (the official code loads all {len(MVBENCH_SUBSETS)} sub-datasets "
                                 f"of {MVBENCH_REPO}; download them all)")
        for f, i, row in parquet_rows(task, files, ("video", "question", "candidates", "answer"), VideoTaskError):
            try:
                text, video_key, names, answer = mvbench_row(subset, row)
            except TypeError as exc:
                raise VideoTaskError(f"MMEB-V2 task {task}: sub-dataset {subset}: {f} row {i}: candidates is not a "
                                     f"list ({type(exc).__name__}: {exc})") from None
            if answer not in names:
                raise VideoTaskError(f"MMEB-V2 task {task}: sub-dataset {subset}: {f} row {i}: answer "
                                     f"{row['answer']!r} is not one of the candidates {row['candidates']!r}")
            sources.setdefault(video_key, (str(frames_root / video_key), ""))
            queries.append((text, video_key))
            infos.append({"cand_names": names, "label_name": answer})
            for name in names:
                pool.setdefault(name, None)
    return VideoTask(TASKS[task], queries, infos, list(pool), [(n, None) for n in pool], sources,
                     f"{MVBENCH_REPO} ({base})")


def _load_moments(root: Path, task: str, media_root: Path) -> VideoTask:
    """Each row's video (``<frame root>/<video>/query/``) with the scene described is the query;
    its candidates are the clip folders beside ``query/`` (the one named ``positive*`` relevant),
    named ``<video>/<clip>`` (the official names are the clip folders' absolute paths, which no
    two machines share) and taken in sorted order (the official ``os.listdir`` order is the file
    system's)."""
    directory = task_dir(root, task)
    frames_root = media_root / "video-tasks" / "frames" / "video_mret" / task
    queries, infos, sources, pool = [], [], {}, {}
    for f, i, row in _rows(task, directory, "test", ("query", "video_path")):
        video_name = os.path.splitext(os.path.basename(row["video_path"]))[0]
        folder = frames_root / video_name
        clips = sorted(c.name for c in folder.iterdir() if c.is_dir() and c.name != "query") if folder.is_dir() else []
        positives = [c for c in clips if c.startswith("positive")]
        if not clips or not positives or not (folder / "query").is_dir():
            raise VideoTaskError(f"MMEB-V2 task {task}: {f} row {i}: {folder} needs a query/ frame folder and clip "
                                 f"folders, one named positive* (found: {', '.join(clips) or 'nothing'}); moment "
                                 f"clips are read from frame folders only")
        query_key = f"{video_name}/query"
        sources.setdefault(query_key, (str(folder / "query"), ""))
        queries.append((f"{VIDEO} {MOMENT_QUERY} {row['query']}", query_key))
        names = [f"{video_name}/{c}" for c in clips]
        infos.append({"cand_names": names, "label_name": f"{video_name}/{positives[-1]}"})
        for name, clip in zip(names, clips):
            sources.setdefault(name, (str(folder / clip), ""))
            pool.setdefault(name, None)
    return VideoTask(TASKS[task], queries, infos, list(pool), [(CANDIDATE_TEXT, n) for n in pool], sources,
                     f"{MOMENTS[task]} ({directory})")


def clip_key(path: str) -> str:
    """The official clip folder name: ``a/b.mp4`` -> ``a_b``."""
    return path.replace("/", "_").split(".mp4")[0]


def _load_moment_seeker(root: Path, media_root: Path) -> VideoTask:
    """MomentSeeker: a query is text, text with an image (``<frame root>/query_<file>.jpg``) or
    text with a video segment (``<frame root>/video_frames/<clip key>/``), after the matching
    instruction; its candidates are its positive clips (all relevant) then its negatives, each
    a frame folder ``video_frames/<clip key>/`` named by that relative path (the official name is
    its absolute path)."""
    task = "MomentSeeker"
    directory = task_dir(root, task)
    frames_root = media_root / "video-tasks" / "frames" / "video_mret" / task
    queries, infos, sources, pool = [], [], {}, {}
    for f, i, row in _rows(task, directory, "test", ("query", "positive_frames", "negative_frames", "input_frames")):
        given = row["input_frames"] or ""
        if given.endswith(".mp4"):
            key = f"video_frames/{clip_key(given)}"
            sources.setdefault(key, (str(frames_root / key), ""))
            queries.append((f"{VIDEO} {SEEKER_QUERY['video']} {row['query']}", key))
        elif given.endswith(".jpg"):
            key = f"query_{given}"
            sources.setdefault(key, (str(frames_root / key), IMAGE_SOURCE))
            queries.append((f"<|image_1|> {SEEKER_QUERY['image']} {row['query']}", key))
        else:
            queries.append((f"{SEEKER_QUERY['text']} {row['query']}", None))
        positives = [f"video_frames/{clip_key(e['output_path'])}" for e in row["positive_frames"] or []]
        negatives = [f"video_frames/{clip_key(e['output_path'])}" for e in row["negative_frames"] or []]
        if not positives:
            raise VideoTaskError(f"MMEB-V2 task {task}: {f} row {i}: no positive_frames")
        infos.append({"cand_names": positives + negatives, "label_name": positives})
        for name in positives + negatives:
            sources.setdefault(name, (str(frames_root / name), ""))
            pool.setdefault(name, None)
    return VideoTask(TASKS[task], queries, infos, list(pool), [(SEEKER_CANDIDATE_TEXT, n) for n in pool], sources,
                     f"{SEEKER_REPO} ({directory})")


def official_clip(folder: str, file: str, where: str) -> List:
    """The frames the official loader gives the model (module docstring), as PIL images."""
    if os.path.isdir(folder) and list_frame_files(folder):
        frames = list(read_video(folder).frames)
    elif file and os.path.isfile(file):
        frames = list(read_video(file, None, max_frames=MAX_FRAMES_SAVED).frames)
    elif not file:  # QA and moment retrieval: the official extraction from files is not reproduced
        raise FileNotFoundError(f"{where}: no frame folder {folder} (QA and moment-retrieval videos are read from "
                                f"frame folders only: extract them as the official eval does)")
    else:
        raise FileNotFoundError(f"{where}: neither a frame folder {folder} nor a video file {file}")
    return [frames[i] for i in official_frame_indices(len(frames))]


class VideoSideDataset(torch.utils.data.Dataset):
    """(text, video name or None) items as sides, each clip read when its batch is asked for."""

    def __init__(self, items: Sequence[Tuple[str, Optional[str]]], sources: Dict[str, Tuple[str, str]], task: str):
        self.items, self.sources, self.task = list(items), sources, task

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Side:
        text, name = self.items[i]
        if name is None:
            return Side(text)
        where = f"MMEB-V2 task {self.task}: video {name!r}"
        try:
            path, kind = self.sources[name]
            if kind == IMAGE_SOURCE:
                return Side(text, load_image(path), image_path=path)
            return Side(text, video=official_clip(path, kind, where))
        except (ValueError, OSError) as exc:  # reported by the main process, without a worker traceback
            return Side(text, error=f"{type(exc).__name__}: {exc}")
