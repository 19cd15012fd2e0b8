"""How fast the training loaders deliver formatted batches: the folder layout vs shards, local and over HTTP.

    python benchmarks/shard_loading.py [--rows 1000] [--workers 0,2,4] [--warmup 4] [--steps 8] [--out DIR]
                                       [--config configs/demo_cpu.yaml]

What training iterates (`llave_ds.data.loading.open_train_data` + `train_loader`, rank 0 of
world 1, global batch ``--global-batch``, 64: the H200 bench's pairs per GPU step): every pair
decoded AND formatted by the collator training builds (`CountingCollator(PairCollator(
InputFormatter.from_config(processor, ...)))`, chunk sizes from ``gradcache``), with the real
processor of a tiny LLaVA-OneVision model directory (`llave_ds.toy.tiny`) and the
``processing`` section of ``--config``. Three sources of the same rows:

* ``folder``: the parquet files and JPEG files on disk (``data.source_type: local``);
* ``shards_local``: ``llave-ds shard``'s output of them (`write_shards`, ~16 shards) on disk;
* ``shards_http``: the same shards from ``python -m http.server`` in a subprocess on 127.0.0.1.

The data set is made here: ``--rows`` MMEB-train rows in three subsets (half image->text,
a quarter text->image, a quarter image->image), one hard negative each (an image where the
target is one), JPEG images of 384-768 px on the longer side and ~20-110 KB (blurred colour
fields plus grain: sized like MMEB-train's photos, not like the synthetic task's 28-px PNGs).

Each (source, workers) pair gets a fresh loader; ``--warmup`` steps (worker start-up
included) are not timed, then ``--steps`` steps are: pairs/s = pairs / seconds. Both are
kept multiples of the worker count by default: the folder DataLoader's workers finish their
first batches together, so a warm-up that ended inside such a burst would count batches
made before the clock started. ``headroom`` is pairs/s over what one H200 consumes at the
2B shape (docs/PERFORMANCE.md: 13.6 pairs/s uncached, the faster step; 9.2 cached): below
1 the loader would be the bottleneck of that rank. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List

import numpy as np

H200_2B_PAIRS_PER_S = {"uncached": 13.6, "cached": 9.2}   # docs/PERFORMANCE.md, 64 pairs per GPU step
SUBSET = "bench_mixed"
KINDS = ("i2t", "t2i", "i2t", "i2i")   # 1.75 images per pair with the negative
DATA_VERSION = 1


# --------------------------------------------------------------------------- the data set

def _jpeg(rng: np.random.Generator) -> bytes:
    """A photo-sized JPEG: a blurred random colour field plus 2x2 grain (~20-110 KB)."""
    from PIL import Image

    long = int(rng.integers(384, 769))
    short = int(long * rng.uniform(0.6, 1.0))
    w, h = (long, short) if rng.random() < 0.7 else (short, long)
    cells = rng.integers(0, 256, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(cells).resize((w, h), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 9, (-(-h // 2), -(-w // 2), 3))
    grain = np.repeat(np.repeat(grain, 2, 0), 2, 1)[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _words(rng: np.random.Generator, n: int) -> str:
    vocab = ("a", "the", "red", "small", "dog", "man", "street", "two", "people", "sitting", "on", "bench", "near",
             "water", "blue", "car", "parked", "building", "with", "tree", "holding", "umbrella", "in", "rain")
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))


def make_dataset(root: str, rows: int, seed: int = 0) -> Dict[str, Any]:
    """MMEB-train parquet files under ``root/train`` and their JPEGs under ``root/images``
    (paths relative to ``root``, the image root). Reused when ``root`` holds the same set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llave_ds.toy.synthetic import TRAIN_SCHEMA

    params = {"rows": rows, "seed": seed, "version": DATA_VERSION}
    manifest_path = os.path.join(root, "bench_manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        if manifest.get("params") == params:
            return manifest
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    sizes: List[int] = []

    def image(rel: str) -> str:
        data = _jpeg(rng)
        full = os.path.join(root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as fh:
            fh.write(data)
        sizes.append(len(data))
        return rel

    table, row_bytes = [], []
    for i in range(rows):
        kind = KINDS[i % len(KINDS)]
        p = f"images/{i // 1000:03d}/{i:06d}"
        before = len(sizes)
        if kind == "i2t":
            row = dict(qry="<|image_1|>\nRepresent the given image with the following question: what is in it?",
                       qry_image_path=image(p + "_q.jpg"), pos_text=_words(rng, 12), pos_image_path="",
                       neg_text=[_words(rng, 12)], neg_image_path=[""])
        elif kind == "t2i":
            row = dict(qry="Find me an everyday image that matches the given caption: " + _words(rng, 12),
                       qry_image_path="", pos_text="<|image_1|>\nRepresent the given image.",
                       pos_image_path=image(p + "_p.jpg"), neg_text=["<|image_1|>\nRepresent the given image."],
                       neg_image_path=[image(p + "_n0.jpg")])
        else:
            row = dict(qry="<|image_1|>\nFind a day-to-day image that looks similar to the provided image.",
                       qry_image_path=image(p + "_q.jpg"), pos_text="<|image_1|>\nRepresent the given image.",
                       pos_image_path=image(p + "_p.jpg"), neg_text=["<|image_1|>\nRepresent the given image."],
                       neg_image_path=[image(p + "_n0.jpg")])
        table.append(row)
        # what the sample takes in a tar (512-byte header + padded data per member, the JSON ~1.5 KB)
        row_bytes.append(sum(512 + -(-n // 512) * 512 for n in sizes[before:]) + 2048)
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table, schema=TRAIN_SCHEMA), os.path.join(root, "train", f"{SUBSET}.parquet"))
    kb = np.array(sizes) / 1000
    manifest = {"params": params, "images": len(sizes), "images_per_pair": round(len(sizes) / rows, 2),
                "image_kb": {"p5": round(float(np.percentile(kb, 5))), "median": round(float(np.median(kb))),
                             "p95": round(float(np.percentile(kb, 95)))},
                "image_mb": round(float(kb.sum()) / 1000, 1), "row_bytes": row_bytes}
    with open(manifest_path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh)
    return manifest


def _cut(row_bytes: List[int], size: int) -> List[int]:
    """Samples per shard as `write_shards` cuts them (a shard is closed before it would exceed ``size``)."""
    counts, current = [0], 0
    for n in row_bytes:
        if counts[-1] and current + n > size:
            counts.append(0)
            current = 0
        counts[-1] += 1
        current += n
    return counts


def balanced_shard_size(row_bytes: List[int], shards: int) -> int:
    """A ``--shard-size`` giving ``shards`` shards whose smallest holds the most samples: lanes
    of even length stay in step through their deals (any sizes work; even ones repeat least)."""
    total = sum(row_bytes)
    candidates = [int(total / shards * (1 + k / 1000)) for k in range(0, 80)]
    return max(candidates, key=lambda size: (len(_cut(row_bytes, size)) == shards, min(_cut(row_bytes, size))))


def make_shards(data_root: str, out: str, row_bytes: List[int], target_shards: int = 16) -> Dict[str, Any]:
    """``llave-ds shard`` of the data set into ``target_shards`` shards of balanced sample counts
    (reused when present)."""
    from llave_ds.data.shards.layout import INDEX_NAME
    from llave_ds.data.shards.writer import write_shards

    index_path = os.path.join(out, INDEX_NAME)
    if not os.path.isfile(index_path) or os.path.getmtime(index_path) < os.path.getmtime(
            os.path.join(data_root, "bench_manifest.json")):
        write_shards(os.path.join(data_root, "train"), out, image_root=data_root,
                     shard_size=balanced_shard_size(row_bytes, target_shards))
    with open(index_path, encoding="utf-8") as fh:
        index = json.load(fh)
    counts = [s["num_samples"] for s in index["shards"]]
    return {"shards": len(counts), "MB": round(sum(s["bytes"] for s in index["shards"]) / 1e6, 1),
            "samples_per_shard": f"{min(counts)}..{max(counts)}"}


# --------------------------------------------------------------------------- the HTTP server

class HttpServer:
    """``python -m http.server`` serving ``directory`` on 127.0.0.1, in a child process."""

    def __init__(self, directory: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "index.json", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"the HTTP server on {self.url} did not start")
                time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- the measurement

def measure(cfg, processor, source: str, source_type: str, image_root: str, workers: int, warmup: int,
            steps: int) -> Dict[str, Any]:
    """Pairs/s of ``train_loader`` over ``source``: ``warmup`` untimed steps, then ``steps`` timed."""
    import dataclasses

    from llave_ds.data.batching import CountingCollator, PairCollator
    from llave_ds.data.loading import open_train_data, train_loader
    from llave_ds.model.formatter import InputFormatter

    data_cfg = dataclasses.replace(cfg.data, source=source, source_type=source_type,
                                   image_root=image_root if source_type == "local" else None)
    start = time.perf_counter()
    dataset, sampler = open_train_data(data_cfg, global_batch_size=cfg.global_batch_size, rank=0, world_size=1,
                                       seed=cfg.seed, video_frames=cfg.processing.video_frames,
                                       video_max_side=cfg.processing.video_max_side)
    opened = time.perf_counter() - start
    if len(sampler) < warmup + steps:
        raise SystemExit(f"{source_type} {source}: an epoch has {len(sampler)} steps, fewer than --warmup {warmup} + "
                         f"--steps {steps}: raise --rows")
    formatter = InputFormatter.from_config(processor, "llava_onevision", cfg.processing, video_slot=dataset.has_videos)
    loader = train_loader(dataset, sampler, CountingCollator(PairCollator(formatter, **cfg.gradcache.chunk_sizes())),
                          workers)
    sampler.set_epoch(0)
    pairs, chunks, t0 = 0, 0, time.perf_counter()
    first = None
    batches = iter(loader)
    for step in range(warmup + steps):
        batch, _ = next(batches)
        if batch.num_pairs != cfg.global_batch_size:
            raise RuntimeError(f"step {step}: {batch.num_pairs} pairs, expected {cfg.global_batch_size}")
        if step == 0:
            first = time.perf_counter() - t0
        if step == warmup - 1:
            t0 = time.perf_counter()
        if step >= warmup:
            pairs += batch.num_pairs
            chunks += len(batch.query_chunks) + len(batch.target_chunks) + len(batch.negative_chunks)
    elapsed = time.perf_counter() - t0
    del batches, loader
    rate = pairs / elapsed
    out = {"pairs_per_s": round(rate, 1), "s_per_step": round(elapsed / steps, 3), "first_step_s": round(first, 2),
           "open_s": round(opened, 2), "chunks_per_step": chunks // steps}
    out.update({f"headroom_{k}": round(rate / v, 2) for k, v in H200_2B_PAIRS_PER_S.items()})
    if hasattr(sampler, "lanes"):
        out["lanes"] = sampler.lanes
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows of the data set (default 1000)")
    parser.add_argument("--workers", default="0,2,4", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per config (default: 4, rounded up to a multiple of the worker count)")
    parser.add_argument("--steps", type=int, default=8,
                        help="timed steps per config (default 8, rounded up to a multiple of the worker count)")
    parser.add_argument("--config", default="configs/demo_cpu.yaml",
                        help="training config whose processing, gradcache and seed are used")
    parser.add_argument("--global-batch", type=int, default=64, help="global batch (1 rank: pairs per step)")
    parser.add_argument("--sources", default="folder,shards_local,shards_http")
    parser.add_argument("--image-processor", choices=("tiny", "llava384"), default="tiny",
                        help="tiny: the tiny model's own (28-px tiles, up to 2x2); llava384: the same processor with "
                             "LLaVA-OneVision's real image settings (384-px tiles, pinpoints up to 2304 px, 729 "
                             "tokens a tile) and processing.max_length=4096 (a 640x480 image is ~2.8K tokens)")
    parser.add_argument("--out", default=None,
                        help="directory for the data set, shards and tiny model, kept and reused (default: a "
                             "temporary directory, removed)")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()

    from llave_ds.config import load_config
    from llave_ds.model.processors import load_processor
    from llave_ds.toy.tiny import build_tiny_model_dir
    from llave_ds.train import TrainConfig

    workers = [int(w) for w in args.workers.split(",")]
    sources = args.sources.split(",")
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="llave-shard-loading-")
        out = tmp.name
    else:
        out = os.path.abspath(args.out)
        os.makedirs(out, exist_ok=True)
    server = None
    try:
        t = time.perf_counter()
        data_root = os.path.join(out, "data")
        data = make_dataset(data_root, args.rows)
        shards_dir = os.path.join(out, "shards")
        shards = make_shards(data_root, shards_dir, data.pop("row_bytes"))
        model_dir = os.path.join(out, "tiny_llava_ov")
        if not os.path.isfile(os.path.join(model_dir, "llave_ds_tiny.json")):
            build_tiny_model_dir(model_dir, "llava_onevision")
        cfg = load_config(TrainConfig, args.config, [
            "data.source=" + os.path.join(data_root, "train"), "data.image_root=" + data_root,
            "data.use_hard_negatives=true", "data.num_hard_negatives=1", "data.max_per_subset=null",
            "data.subsets=null", "data.homogeneous_batches=false", "model.path=" + model_dir,
            f"global_batch_size={args.global_batch}"]
            + (["processing.max_length=4096"] if args.image_processor == "llava384" else []))
        processor = load_processor(model_dir, "llava_onevision")
        if args.image_processor == "llava384":
            processor.image_processor.size = {"height": 384, "width": 384}
            processor.image_processor.image_grid_pinpoints = [[384 * i, 384 * j] for i in range(1, 7)
                                                              for j in range(1, 7)]
            processor.num_image_tokens = 729
        prepared = round(time.perf_counter() - t, 1)
        print(f"# data: {args.rows} rows, {data['images']} JPEGs ({data['images_per_pair']} per pair with the "
              f"negative), {data['image_mb']} MB, KB p5/median/p95 {data['image_kb']['p5']}/"
              f"{data['image_kb']['median']}/{data['image_kb']['p95']}; shards: {shards['shards']}, {shards['MB']} MB, "
              f"{shards['samples_per_shard']} samples each; "
              f"prepared in {prepared} s", flush=True)
        print(f"# config {args.config}: global batch {cfg.global_batch_size}, processing {cfg.processing}, chunks "
              f"{cfg.gradcache.chunk_sizes()}; tiny LLaVA-OneVision processor "
              f"({args.image_processor} image settings); rank 0 of 1; cpus {os.cpu_count()}",
              flush=True)
        if "shards_http" in sources:
            server = HttpServer(shards_dir)
        where = {"folder": (os.path.join(data_root, "train"), "local"), "shards_local": (shards_dir, "shards"),
                 "shards_http": (server.url if server else None, "shards")}
        results: Dict[str, Dict[str, Any]] = {}
        header = (f"{'source':<13} {'workers':>7} {'pairs/s':>8} {'s/step':>7} {'1st step s':>10} "
                  f"{'headroom 13.6':>13} {'headroom 9.2':>12}")
        print(header, flush=True)
        for name in sources:
            for w in workers:
                unit = max(1, w)
                warmup = args.warmup if args.warmup is not None else -(-4 // unit) * unit
                steps = -(-args.steps // unit) * unit
                source, source_type = where[name]
                r = measure(cfg, processor, source, source_type, data_root, w, warmup, steps)
                r.update(warmup=warmup, steps=steps)
                results[f"{name}/w{w}"] = r
                print(f"{name:<13} {w:>7} {r['pairs_per_s']:>8} {r['s_per_step']:>7} {r['first_step_s']:>10} "
                      f"{r['headroom_uncached']:>13} {r['headroom_cached']:>12}", flush=True)
    finally:
        if server is not None:
            server.close()
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps({"shard_loading": results, "data": {**data, **shards, "rows": args.rows}, "config": args.config,
                      "image_processor": args.image_processor,
                      "global_batch_size": cfg.global_batch_size, "h200_2b_pairs_per_s": H200_2B_PAIRS_PER_S,
                      "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
