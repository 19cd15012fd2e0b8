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


def write_world(root: Path, tasks=TASKS, seed: int = 0, bad: bool = False) -> Path:
    for task in tasks:
        write_task(root, task, seed=seed, bad=bad)
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
