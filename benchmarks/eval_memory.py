"""Peak host memory of MMEB evaluation on a subset with many distinct images: decoding every
image of a role before encoding (the code before streaming; reproduced here as "preload")
against the streaming loader of ``llave_ds.eval.mmeb`` (DataLoader workers decode batch by batch).

    python benchmarks/eval_memory.py --images 2000 --size 256 --workers 0 2

Builds a synthetic MMEB-eval subset (one distinct image per query, text candidates) and the
tiny LLaVA-OV model under --work (default: a temporary directory), then runs each mode in
a fresh process and reports its peak RSS (ru_maxrss) and wall time. Prints a table, then
one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(work: Path, n_images: int, size: int, candidates: int) -> tuple[Path, Path, Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from llave_ds.toy.tiny import build_tiny_model_dir

    data, images = work / "eval", work / "images"
    (images / "big").mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        path = images / "big" / f"{i:05d}.png"
        if not path.exists():
            colour = rng.integers(0, 255, 3, dtype=np.uint8)
            Image.fromarray(np.broadcast_to(colour, (size, size, 3)).copy()).save(path)
        picks = [(i + k * 7) % n_images for k in range(candidates)]
        rows.append({"qry_text": "<|image_1|>\nWhat colour is it?", "qry_img_path": f"big/{i:05d}.png",
                     "tgt_text": [f"colour number {j}" for j in picks], "tgt_img_path": [""] * candidates})
    pq.write_table(pa.Table.from_pylist(rows), data / "BigImages.parquet")
    model = work / "tiny"
    if not (model / "config.json").exists():
        build_tiny_model_dir(model, "llava_onevision", seed=0)
    return data, images, model


def child(args) -> None:
    """One evaluation in this (fresh) process; prints a JSON line with its measurements."""
    from llave_ds.eval import mmeb as ev
    from llave_ds.eval.mmeb_data import load_eval_subsets
    from llave_ds.model.embedder import LlaveEmbedder

    subset = load_eval_subsets(args.data, ["BigImages"], image_root=args.images)["BigImages"]
    embedder = LlaveEmbedder.from_pretrained(args.model, device="cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.mode == "preload":
        # The previous code path: every image of a role decoded into a list, then encoded.
        items, _, _ = ev.unique_items(subset.rows)
        for role in sorted({it.role for it in items}):
            group = [it for it in items if it.role == role]
            loader = ev._SideLoader(subset, group)
            sides = [loader[i] for i in range(len(group))]
            embedder.encode_sides(sides, role="target" if role == ev.CANDIDATE else "query", batch_size=args.batch,
                                  progress=False)
            del sides
    else:
        ev.evaluate_subset(embedder, subset, batch_size=args.batch, progress=False, num_workers=args.workers)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"mode": args.mode, "workers": args.workers, "peak_rss_mib": peak / 1024,
                      "rss_before_eval_mib": before / 1024, "peak_worker_rss_mib": children / 1024,
                      "wall_s": wall}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (decoded: size^2 x 3 bytes)")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--work", default=None)
    p.add_argument("--child", choices=("preload", "stream"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--data"), p.add_argument("--model"), p.add_argument("--mode")
    p.add_argument("--images-dir", dest="images_root")
    args = p.parse_args(argv)
    if args.child:
        args.mode, args.images = args.child, args.images_root
        args.workers = args.workers[0]
        child(args)
        return 0

    work = Path(args.work or tempfile.mkdtemp(prefix="eval_memory_"))
    data, images, model = build(work, args.images, args.size, args.candidates)
    runs = [("preload", 0)] + [("stream", w) for w in args.workers]
    rows = []
    for mode, workers in runs:
        cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--images-dir", str(images),
               "--model", str(model), "--batch", str(args.batch), "--workers", str(workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    decoded_mib = args.images * args.size * args.size * 3 / 2 ** 20
    print(f"eval memory: {args.images} distinct {args.size}x{args.size} images ({decoded_mib:.0f} MiB decoded), "
          f"tiny LLaVA-OV, batch {args.batch}")
    print(f"{'mode':<10} {'workers':>7} {'peak RSS MiB':>13} {'RSS before MiB':>15} {'worker peak MiB':>16} {'wall s':>7}")
    for r in rows:
        print(f"{r['mode']:<10} {r['workers']:>7} {r['peak_rss_mib']:>13.0f} {r['rss_before_eval_mib']:>15.0f} "
              f"{r['peak_worker_rss_mib']:>16.0f} {r['wall_s']:>7.1f}")
    print(json.dumps({"benchmark": "eval_memory", "images": args.images, "size": args.size,
                      "decoded_mib": decoded_mib, "batch": args.batch, "runs": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
