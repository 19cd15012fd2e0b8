"""An offline MMEB-V2 visual-document world in the official download layout, so CI runs the
whole ``llave-ds eval --benchmark mmeb-v2`` path without the hub.

Each task is a BEIR dataset as ``huggingface-cli download`` leaves it under
``ROOT/<org>/<name>/`` (`llave_ds.eval.mmeb_v2_visdoc.SOURCES`): ``queries/``, ``corpus/`` and
``qrels/`` of ``<split>-00000-of-00001.parquet``. Pages are rendered with PIL: a coloured page
with a title word and a few lines of text ("alpha report: page 3"), stored as the hub's image
records (``{"bytes": PNG, "path": name}``). Queries ask for a page's title word; the qrels
grade the asked page 2 (ViDoRe v2's graded tasks) or 1, and the page sharing its word (12
pages, 10 words: pages 10 and 11 repeat the first two) 1.

Three tasks with the three id styles of the real data: ``ViDoRe_arxivqa`` (integer ids),
``ViDoRe_esg_reports_v2_multilingual`` (graded qrels, a ``language`` column),
``VisRAG_ChartQA`` (file-name ids, split ``train``). ``bad=True`` adds what the official code
crashes on: a query without qrels and a qrels row for a page missing from the corpus.

Images: ``ROOT/ziyjiang/MMEB_Test_Instruct/<task>/test-00000-of-00001.parquet`` with the
official columns (``qry_inst``, ``qry_text``, ``qry_img_path``, ``tgt_inst``, ``tgt_text``,
``tgt_img_path``) and PNGs under ``ROOT/image-tasks/``, for one task of each official parser
(``IMAGE_TASKS``): classification, QA, i2t, t2i without and with captions, grounding with
captions (several objects of one image) and without.

Videos: ``ROOT/VLM2Vec/<task>/[<config>|data]/test-00000-of-00001.parquet`` with each task's own
columns (retrieval: MSR-VTT's ``video_id`` / ``video`` / ``caption``, MSVD's caption lists,
DiDeMo's names from the file; classification: HMDB51's ``video_id`` / ``pos_text`` from the
official labels, SmthSmthV2's ``neg_text`` options; QA: NExTQA, EgoSchema, Video-MME and
ActivityNetQA rows asking where the square goes; moment retrieval: QVHighlight's ``query`` /
``video_path`` with a ``query/`` folder and positive / negative clip folders per video;
MomentSeeker's text, image and video-segment queries with their clips) and the
frame folders the official eval reads,
``ROOT/video-tasks/frames/video_{ret,cls,qa,mret}/<task folder>/<video>/...`` (a square moving
across the frames, one direction and colour per video). MVBench is its twenty sub-datasets,
``ROOT/VLM2Vec/MVBench/<subset>/train-00000-of-00001.parquet``, one or two rows each (the two
rows of a sub-dataset share its one video; the ones the official code has time bounds for carry
``start`` / ``end``, which it does not use), frames under
``video-tasks/frames/video_qa/MVBench/<subset>/<clip>.mp4/``.

Same seed -> the same files.
"""
from __future__ import annotations

import argparse
import io
import random
from pathlib import Path
from typing import Dict, List

from llave_ds.eval.mmeb_v2_visdoc import SOURCES

TASKS = ("ViDoRe_arxivqa", "ViDoRe_esg_reports_v2_multilingual", "VisRAG_ChartQA")
IMAGE_TASKS = ("ImageNet-1K", "OK-VQA", "MSCOCO_i2t", "MSCOCO_t2i", "WebQA", "RefCOCO-Matching", "CIRR")
VIDEO_TASKS = ("MSR-VTT", "MSVD", "DiDeMo", "HMDB51", "SmthSmthV2", "NExTQA", "EgoSchema", "Video-MME",
               "ActivityNetQA", "MVBench", "QVHighlight", "MomentSeeker")
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
COLOURS = ((250, 250, 245), (235, 245, 255), (255, 245, 230), (240, 255, 240))


def render_page(word: str, number: int, size: int = 64, seed: int = 0) -> bytes:
    """A PNG page: a background colour, the title word, a line with the page number."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), COLOURS[rng.randrange(len(COLOURS))])
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), word, fill=(20, 20, 20))
    draw.text((4, 24), f"page {number}", fill=(60, 60, 60))
    for y in range(40, size - 4, 6):
        draw.line((4, y, 4 + rng.randrange(size // 2, size - 8), y), fill=(150, 150, 150))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write(folder: Path, split: str, rows: List[Dict], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"{split}-00000-of-00001.parquet")


def write_task(root: Path, task: str, *, num_pages: int = 12, num_queries: int = 6, seed: int = 0,
               bad: bool = False) -> Path:
    """Write one task's BEIR download under ``root``; returns its directory."""
    import pyarrow as pa

    repo, _, split = SOURCES[task]
    directory = Path(root) / repo
    rng = random.Random(f"{task}:{seed}")
    string_ids = task.startswith("VisRAG")
    page_id = (lambda i: f"page_{i:03d}.png") if string_ids else (lambda i: i)
    words = [WORDS[i % len(WORDS)] for i in range(num_pages)]
    corpus = [{"corpus-id": page_id(i), "image": {"bytes": render_page(words[i], i, seed=seed * 1000 + i),
                                                 "path": f"{page_id(i)}"}} for i in range(num_pages)]
    graded = task.endswith("_v2_multilingual")
    queries, qrels = [], []
    for q in range(num_queries):
        target = rng.randrange(num_pages)
        qid = f"q{q}" if string_ids else q
        row = {"query-id": qid, "query": f"Which page is the {words[target]} report?"}
        if graded:
            row["language"] = rng.choice(["english", "french"])
        queries.append(row)
        qrels.append({"query-id": qid, "corpus-id": page_id(target), "score": 2 if graded else 1})
        twin = next((i for i in range(num_pages) if i != target and words[i] == words[target]), None)
        if twin is not None:
            qrels.append({"query-id": qid, "corpus-id": page_id(twin), "score": 1})
    if bad:
        queries.append({"query-id": "q_orphan" if string_ids else 999, "query": "a query nobody judged",
                        **({"language": "english"} if graded else {})})
        qrels.append({"query-id": queries[0]["query-id"], "corpus-id": page_id(num_pages + 5), "score": 1})
    id_type = pa.string() if string_ids else pa.int64()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    query_fields = [("query-id", id_type), ("query", pa.string())] + ([("language", pa.string())] if graded else [])
    _write(directory / "corpus", split, corpus, pa.schema([("corpus-id", id_type), ("image", image_type)]))
    _write(directory / "queries", split, queries, pa.schema(query_fields))
    _write(directory / "qrels", split, qrels,
           pa.schema([("query-id", id_type), ("corpus-id", id_type), ("score", pa.int64())]))
    return directory


def _image_row(task: str, q: int, image: str) -> dict:
    """One MMEB_Test_Instruct row of ``task`` whose query (or truth) is ``image``'s picture."""
    labels = [WORDS[(q + k) % len(WORDS)] for k in range(4)]          # the truth first, as MMEB
    others = [f"{task}/img_{(q + k) % 6}.png" for k in range(4)]      # candidate images, truth first
    if task == "ImageNet-1K":
        return dict(qry_inst="<|image_1|> Represent the given image for classification", qry_text="",
                    qry_img_path=image, tgt_inst="", tgt_text=labels, tgt_img_path=[""] * 4)
    if task == "OK-VQA":
        return dict(qry_inst="<|image_1|> Represent the given image with the following question:",
                    qry_text=f"What word is shown? ({q})", qry_img_path=image, tgt_inst="", tgt_text=labels,
                    tgt_img_path=[""] * 4)
    if task == "MSCOCO_i2t":
        return dict(qry_inst="<|image_1|> Find an image caption describing the given everyday image.", qry_text="",
                    qry_img_path=image, tgt_inst="", tgt_text=[f"a card saying {w}" for w in labels],
                    tgt_img_path=[""] * 4)
    if task in ("MSCOCO_t2i", "WebQA"):
        captions = [f"page of {w}" for w in labels] if task == "WebQA" else [""] * 4
        return dict(qry_inst="Find me an everyday image that matches the given caption:", qry_text=labels[0],
                    qry_img_path="", tgt_inst="<|image_1|> Represent the given image.", tgt_text=captions,
                    tgt_img_path=others)
    if task == "RefCOCO-Matching":   # several objects of one image: names are path:caption
        return dict(qry_inst="<|image_1|> Select the portion of the image that follows the language expressions.",
                    qry_text=f"the {labels[0]} word", qry_img_path=image,
                    tgt_inst="<|image_1|> Select the portion of the image that follows the language expressions:",
                    tgt_text=[f'"the {w} word"' for w in labels], tgt_img_path=[image] * 4)
    return dict(qry_inst="<|image_1|> Given an image, find a similar everyday image with the described changes:",
                qry_text="make it brighter", qry_img_path=image,
                tgt_inst="<|image_1|> Represent the given image.", tgt_text=[""] * 4, tgt_img_path=others)


def write_image_task(root: Path, task: str, *, num_queries: int = 6, seed: int = 0) -> Path:
    """One image task: the parquet under ``root/ziyjiang/MMEB_Test_Instruct/<task>/`` and its
    PNGs under ``root/image-tasks/<task>/``; returns the task directory."""
    import pyarrow as pa

    images = Path(root) / "image-tasks" / task
    images.mkdir(parents=True, exist_ok=True)
    for k in range(6):
        (images / f"img_{k}.png").write_bytes(render_page(WORDS[k], k, size=32, seed=seed * 100 + k))
    rows = [_image_row(task, q, f"{task}/img_{q % 6}.png") for q in range(num_queries)]
    schema = pa.schema([("qry_inst", pa.string()), ("qry_text", pa.string()), ("qry_img_path", pa.string()),
                        ("tgt_inst", pa.string()), ("tgt_text", pa.list_(pa.string())),
                        ("tgt_img_path", pa.list_(pa.string()))])
    directory = Path(root) / "ziyjiang" / "MMEB_Test_Instruct" / task
    _write(directory, "test", rows, schema)
    return directory


def _write_frames(folder: Path, video: int, num_frames: int = 12, size: int = 32) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colour = ((200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 160, 40))[video % 4]
    for f in range(num_frames):
        img = Image.new("RGB", (size, size), (245, 245, 245))
        x = (f * 2 if video % 2 == 0 else size - 8 - f * 2) % (size - 8)
        ImageDraw.Draw(img).rectangle((x, 12, x + 7, 19), fill=colour)
        img.save(folder / f"frame_{f + 1:04d}.png")


def write_video_task(root: Path, task: str, *, num_videos: int = 5) -> Path:
    """One video retrieval task: its parquet as the hub has it and its frame folders."""
    import pyarrow as pa

    from llave_ds.eval.mmeb_v2_video import CLASSIFICATION, MOMENTS, QA, SPECS

    if task in CLASSIFICATION:
        return _write_classification_task(root, task, num_videos)
    if task in QA:
        return _write_qa_task(root, task, num_videos)
    if task in MOMENTS:
        return _write_moment_task(root, task, num_videos)
    if task == "MomentSeeker":
        return _write_moment_seeker(root, num_videos)
    if task == "MVBench":
        return _write_mvbench(root)
    spec = SPECS[task]
    names = [f"video{v}" for v in range(num_videos)]
    for v, name in enumerate(names):
        _write_frames(Path(root) / "video-tasks" / "frames" / "video_ret" / task / name, v)
    captions = [f"a {('red', 'green', 'blue', 'yellow')[v % 4]} square moving {('right', 'left')[v % 2]}"
                for v in range(num_videos)]
    if task == "MSVD":
        rows = [{"video_id": n, "video": f"{n}.avi", "caption": [c, c + " again"]} for n, c in zip(names, captions)]
    elif task == "DiDeMo":
        rows = [{"video": f"videos/{n}.mp4", "caption": c} for n, c in zip(names, captions)]
    else:
        rows = [{"video_id": n, "video": f"{n}.mp4", "caption": c} for n, c in zip(names, captions)]
    directory = Path(root) / spec.repo / (spec.config or "data")
    _write(directory, spec.split, rows, pa.Table.from_pylist(rows).schema)
    return directory


def _write_classification_task(root: Path, task: str, num_videos: int) -> Path:
    """HMDB51-like rows (``video_id``, ``pos_text`` from the official label list) or SmthSmthV2's
    (with ``neg_text``: the truth and three other labels, in a shuffled order)."""
    import pyarrow as pa

    from llave_ds.eval.mmeb_v2_video import CLASSIFICATION, official_labels

    spec = CLASSIFICATION[task]
    labels = official_labels()["labels"][task]
    rows = []
    for v in range(num_videos):
        name = str(1000 + v)
        _write_frames(Path(root) / "video-tasks" / "frames" / "video_cls" / spec.frames / name, v)
        row = {"video_id": name, "pos_text": labels[v % 3]}
        if spec.options:
            options = [labels[(v % 3 + k) % len(labels)] for k in range(4)]
            random.Random(v).shuffle(options)
            row["neg_text"] = options
        rows.append(row)
    directory = Path(root) / spec.repo / "data"
    _write(directory, spec.split, rows, pa.Table.from_pylist(rows).schema)
    return directory


def _write_qa_task(root: Path, task: str, num_videos: int) -> Path:
    """Rows in the task's own columns (NExTQA's a0..a4 and an answer index, EgoSchema's lettered
    ``option`` list, Video-MME's ``options`` and answer letter, ActivityNetQA's yes/no) and their
    frame folders (ActivityNetQA's named ``v_<name>``)."""
    import pyarrow as pa

    from llave_ds.eval.mmeb_v2_video import QA

    directions = ("right", "left")
    rows = []
    for v in range(num_videos):
        name = f"{task.lower().replace('-', '')}{v}"
        folder = f"v_{name}" if task == "ActivityNetQA" else name
        _write_frames(Path(root) / "video-tasks" / "frames" / "video_qa" / task / folder, v)
        truth = directions[v % 2]
        options = ["up", "down", "left", "right"]
        if task == "NExTQA":
            rows.append({"video": name, "question": "where does the square go?", "answer": options.index(truth),
                         "qid": v, "type": "TN", **{f"a{i}": o for i, o in enumerate(options + ["nowhere"])}})
        elif task == "EgoSchema":
            lettered = [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]
            rows.append({"video_idx": name, "question": "where does the square go?",
                         "answer": str(options.index(truth)), "question_idx": f"q{v}", "option": lettered})
        elif task == "Video-MME":
            lettered = [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]
            rows.append({"videoID": name, "question": "Where does the square go?", "options": lettered,
                         "answer": "ABCD"[options.index(truth)], "question_id": f"q{v}", "domain": "toy",
                         "sub_category": "motion"})
        else:
            rows.append({"video_name": name, "question": f"does the square move {truth}", "answer": "yes",
                         "question_id": f"q{v}"})
    spec = QA[task]
    directory = Path(root) / spec.repo / (spec.config or "data")
    _write(directory, spec.split, rows, pa.Table.from_pylist(rows).schema)
    return directory


def _write_mvbench(root: Path) -> Path:
    """MVBench's twenty sub-datasets: two rows in the even-numbered ones (one video, two questions),
    one in the others; three or four ``candidates`` and the ``answer`` as one of their texts;
    ``start`` / ``end`` where the official ``subset_meta`` has time bounds; 9-frame folders."""
    import pyarrow as pa

    from llave_ds.eval.mmeb_v2_video import MVBENCH_REPO, MVBENCH_SUBSETS

    bounded = ("episodic_reasoning", "action_sequence", "action_prediction", "object_interaction",
               "action_localization")
    base = Path(root) / MVBENCH_REPO
    for k, subset in enumerate(MVBENCH_SUBSETS):
        clip = f"clip{k}.mp4"
        _write_frames(Path(root) / "video-tasks" / "frames" / "video_qa" / "MVBench" / subset / clip, k, num_frames=9)
        truth = ("right", "left")[k % 2]
        candidates = ["left", "right", "up", "down"][:3 + k % 2]
        questions = ["Where does the square go?", "Which way does the square move?"][:1 + (k % 2 == 0)]
        rows = [{"video": clip, "question": q, "candidates": candidates, "answer": truth,
                 **({"start": 0.5, "end": 3.0} if subset in bounded else {})} for q in questions]
        _write(base / subset, "train", rows, pa.Table.from_pylist(rows).schema)
    return base


def _write_moment_task(root: Path, task: str, num_videos: int) -> Path:
    """Rows (``query``, ``video_path``) and, per video, the frame folders the official eval reads:
    ``query/`` (the whole video), ``positive_0/`` and three ``negative_<k>/`` clips."""
    import pyarrow as pa

    from llave_ds.eval.mmeb_v2_video import MOMENTS

    rows = []
    for v in range(num_videos):
        name = f"moment{v}"
        base = Path(root) / "video-tasks" / "frames" / "video_mret" / task / name
        _write_frames(base / "query", v)
        _write_frames(base / "positive_0", v, num_frames=4)
        for k in range(3):
            _write_frames(base / f"negative_{k}", v + k + 1, num_frames=4)
        rows.append({"query": f"the square moving {('right', 'left')[v % 2]}", "video_path": f"videos/{name}.mp4"})
    directory = Path(root) / MOMENTS[task] / "data"
    _write(directory, "test", rows, pa.Table.from_pylist(rows).schema)
    return directory


def _write_moment_seeker(root: Path, num_videos: int) -> Path:
    """MomentSeeker rows: text, text + image and text + video-segment queries in turn, one or two
    positive clips and three negatives each, as ``video_frames/<clip>/`` folders (at most 8 frames,
    as the official extraction saves) and ``query_<name>.jpg`` images."""
    import pyarrow as pa

    from llave_ds.eval.mmeb_v2_video import SEEKER_REPO, clip_key

    base = Path(root) / "video-tasks" / "frames" / "video_mret" / "MomentSeeker"
    rows = []
    for v in range(num_videos):
        clips = [f"src{v}/clip_{k}.mp4" for k in range(5)]
        for k, clip in enumerate(clips):
            _write_frames(base / "video_frames" / clip_key(clip), v + k, num_frames=6)
        kind = ("text", "image", "video")[v % 3]
        given = ""
        if kind == "image":
            given = f"still{v}.jpg"
            base.mkdir(parents=True, exist_ok=True)
            (base / f"query_{given}").write_bytes(render_page(WORDS[v], v, size=32))
        elif kind == "video":
            given = f"whole{v}/full.mp4"
            _write_frames(base / "video_frames" / clip_key(given), v, num_frames=8)
        positives = clips[:2] if v % 2 else clips[:1]
        rows.append({"query": f"the square moving {('right', 'left')[v % 2]}", "input_frames": given,
                     "positive_frames": [{"output_path": c} for c in positives],
                     "negative_frames": [{"output_path": c} for c in clips[len(positives):len(positives) + 3]]})
    directory = Path(root) / SEEKER_REPO / "data"
    _write(directory, "test", rows, pa.Table.from_pylist(rows).schema)
    return directory


def write_world(root: Path, tasks=TASKS, seed: int = 0, bad: bool = False, image_tasks=IMAGE_TASKS,
                video_tasks=VIDEO_TASKS) -> Path:
    for task in tasks:
        write_task(root, task, seed=seed, bad=bad)
    for task in image_tasks:
        write_image_task(root, task, seed=seed)
    for task in video_tasks:
        write_video_task(root, task)
    return Path(root)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the download root (--data of llave-ds eval --benchmark mmeb-v2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write_world(Path(args.out), seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
