"""``llave-ds mine``: hard negatives for a training set, mined with a model.

    llave-ds mine --model RUN_DIR_OR_EXPORT --data DIR --out DIR_MINED [--num-negatives 3]
    torchrun --nproc_per_node 8 -m llave_ds.mine.run --model ... --data ... --out ...

1. **rows**: every row of the local training source (`llave_ds.data.row_files`: MMEB-train
   parquet / jsonl, LLaVE's JSON arrays, the synthetic task), its query and positive checked
   by the training reader's rule (`train_row_sides`); a bad row is an error naming the file,
   row and field.
2. **pool**: the distinct positives of the data (by default), or of ``--pool`` (another
   source); with ``--pool-scope subset`` (the default) a query's candidates are its own
   subset's pool.
3. **encoded** by the model with its own roles and instructions (queries as ``query``,
   candidates as ``target``), spread over the ranks and streamed to disk in shards
   (`llave_ds.mine.store`: a killed run resumes where it stopped); the positives' scores come
   from the same embeddings.
4. **searched** exactly, in blocks (`llave_ds.mine.search`), ``--depth`` candidates per query;
5. **filtered** by the positive-aware rule (`llave_ds.mine.select`: copies of the positive,
   rank window, margin, count);
6. **written** by rank 0: the same layout as the input under ``--out`` with ``neg_text``,
   ``neg_image_path`` and ``neg_video_path`` replaced (`write_rows`), ``mining.json`` (the
   provenance: model fingerprint and SHA-256, data, every parameter, date, counts), ``mining_summary.md``
   and ``mining_scores.png`` (positive vs mined-negative scores).

The model is an export, a base model, or a training run directory: its export, or, when the
run has none yet, its latest checkpoint exported by the code of ``llave-ds export`` into
``<out>/.mining/model``. Image and video paths of the negatives are written as the pool's
rows wrote them, so a pool from another source must share ``--image-root``. docs/MINING.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from llave_ds.core import distributed
from llave_ds.data.row_files import RowFile, read_rows, row_files, write_rows
from llave_ds.data.train_rows import train_row_sides
from llave_ds.eval.encoding import eval_process_group, load_embedder, load_on_every_rank, rank0_then_shared
from llave_ds.eval.score_files import model_fingerprint
from llave_ds.files import atomic_write_text
from llave_ds.formats import MINING_RECORD, TRAIN_SIDE_FIELDS
from llave_ds.media.files import MediaError, resolve_under_root
from llave_ds.media.image import load_image
from llave_ds.media.side import Side
from llave_ds.mine.search import topk_blocks
from llave_ds.mine.select import REASONS, MineConfig, select_negatives, side_keys
from llave_ds.mine.store import DEFAULT_SHARD_ROWS, ShardStore, encode_to_store, items_digest

logger = logging.getLogger(__name__)

NEGATIVE_FIELDS = TRAIN_SIDE_FIELDS["negative"]   # neg_text, neg_image_path, neg_video_path
Fields = Tuple[str, str, str]                      # (text, image path, video path) as the row writes them


class MiningError(ValueError):
    """Input that cannot be mined: the message names the file, row and field."""


@dataclasses.dataclass
class Rows:
    """The rows of one source: per file, its rows; per row, its query and positive fields."""
    files: List[RowFile]
    rows: List[List[dict]]
    queries: List[Fields]
    positives: List[Fields]
    subset_of: List[str]

    @classmethod
    def read(cls, source: str, subsets: Optional[Sequence[str]], split: str, what: str) -> "Rows":
        files = row_files(source, subsets, split)
        out = cls(files, [], [], [], [])
        for f in files:
            rows = read_rows(f)
            for i, row in enumerate(rows):
                try:
                    query, positive = train_row_sides(row)
                except ValueError as exc:
                    raise MiningError(f"{what} {f.path}, row {i}: {exc}") from None
                out.queries.append(query)
                out.positives.append(positive)
                out.subset_of.append(f.subset)
            out.rows.append(rows)
        if not out.queries:
            raise MiningError(f"{what} {source}: no rows (files: {', '.join(str(f.path) for f in files) or 'none'})")
        return out


@dataclasses.dataclass
class Pool:
    """The distinct candidates, grouped by subset (contiguous ids), with their copy keys."""
    items: List[Fields]
    subset_of: List[str]
    keys: list
    ranges: Dict[str, range]
    origin: List[str]          # the first row holding each candidate, for error messages

    @classmethod
    def of(cls, rows: Rows) -> "Pool":
        order: Dict[str, Dict[Fields, str]] = {}
        for subset, positive, where in zip(rows.subset_of, rows.positives, _where(rows, "pos")):
            order.setdefault(subset, {}).setdefault(positive, where)
        items, subset_of, ranges, origin = [], [], {}, []
        for subset, distinct in order.items():
            ranges[subset] = range(len(items), len(items) + len(distinct))
            items += list(distinct)
            origin += list(distinct.values())
            subset_of += [subset] * len(distinct)
        return cls(items, subset_of, [side_keys(*item) for item in items], ranges, origin)


class SideDataset(torch.utils.data.Dataset):
    """(text, image path, video path) items as sides: images decoded here (in DataLoader
    workers), videos handed to the embedder as paths (its own frame rule)."""

    def __init__(self, items: Sequence[Fields], image_root: str, where: Sequence[str]):
        self.items, self.image_root, self.where = list(items), image_root, where

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Side:
        text, image, video = self.items[i]
        where = f"{self.where[i]}_{'image' if image else 'video'}_path" if image or video else self.where[i]
        try:
            return Side(text=text, image=load_image(resolve_under_root(self.image_root, image)) if image else None,
                        image_path=image or None,
                        video=resolve_under_root(self.image_root, video) if video else None, video_path=video or None)
        except (MediaError, ValueError, OSError) as exc:
            return Side(text=text, error=f"{where}: {type(exc).__name__}: {exc}")


def _mine_config(args: argparse.Namespace) -> MineConfig:
    cfg = MineConfig(num_negatives=args.num_negatives, depth=args.depth, margin_kind=args.margin_kind,
                     margin=args.margin, skip_top=args.skip_top, window=args.window, sampling=args.sampling,
                     seed=args.seed)
    cfg.validate()
    return cfg


def resolve_model(model: str, work: Path) -> str:
    """``--model`` as a model directory: an export or base model as given; a run directory's
    export, or (none yet) its latest checkpoint exported into ``work/model`` (rank 0; the
    export is reused by a resumed run)."""
    from llave_ds.eval.cli import resolve_model_dir
    from llave_ds.export.model_dir import export_checkpoint

    try:
        return resolve_model_dir(model)
    except ValueError:
        target = work / "model"
        if not (target / "config.json").is_file():
            logger.info("%s is a run without an export: exporting its latest checkpoint to %s", model, target)
            export_checkpoint(model, target, force=True)
        return str(target)


def mine(args: argparse.Namespace, on_shard=None) -> Optional[dict]:
    """The whole run on every rank; rank 0 returns the provenance record (others None)."""
    cfg = _mine_config(args)
    out = Path(args.out)
    if out.expanduser().resolve() == Path(args.data).expanduser().resolve():
        raise MiningError(f"--out {args.out} is the input directory: the mined copy would overwrite the data; "
                          f"write it to another directory")
    work = out / ".mining"
    # every rank reads the rows (a shared file system, as training assumes); all fail together
    data = load_on_every_rank(lambda: Rows.read(args.data, args.subsets, args.split, "data"))
    pool_rows = load_on_every_rank(lambda: Rows.read(args.pool, args.pool_subsets, args.split, "pool")) \
        if args.pool else data
    pool = Pool.of(pool_rows)
    if args.pool_scope == "subset":
        missing = sorted(set(data.subset_of) - set(pool.ranges))
        if missing:
            raise MiningError(f"--pool {args.pool} has no rows for subset(s) {', '.join(missing)} (--pool-scope "
                              f"subset takes each query's candidates from its own subset; use --pool-scope all)")
    model_dir = rank0_then_shared(lambda: resolve_model(args.model, work))
    embedder = load_embedder(model_dir, args.max_length)
    image_root = args.image_root or args.data
    fingerprint_base = {"model": model_fingerprint(model_dir), "max_length": args.max_length,
                        "image_root": str(Path(image_root).expanduser().resolve())}

    # -- encode: the queries, the pool and (when the pool is another source) the positives
    def encode(name: str, items: Sequence[Fields], role: str, where: Sequence[str]) -> ShardStore:
        store = ShardStore(work / "embeddings", name, len(items), args.shard_rows)
        fingerprint = {**fingerprint_base, "role": role, "items": items_digest(items)}
        return encode_to_store(embedder, SideDataset(items, image_root, where), store, fingerprint, role=role,
                               batch_size=args.batch_size, progress=not args.no_progress,
                               num_workers=args.num_workers, where="mining: ", on_shard=on_shard)

    queries = encode("query", data.queries, "query", _where(data, "qry"))
    candidates = encode("pool", pool.items, "target", pool.origin)
    if args.pool:
        own = Pool.of(data)
        positives, positive_id = encode("positive", own.items, "target", own.origin), own
    else:
        positives, positive_id = candidates, pool
    if distributed.rank() != 0:
        return None

    # -- search, filter, write (rank 0)
    lookup = {item: i for i, item in enumerate(positive_id.items)}
    record = _search_and_select(args, cfg, data, pool, queries, candidates, positives,
                                [lookup[p] for p in data.positives])
    written = []
    for f, rows, negs in zip(data.files, data.rows, record.pop("negatives_per_file")):
        # neg_video_path only where the file has it or a negative is a video: the layout stays the input's
        videos = any(NEGATIVE_FIELDS[2] in row for row in rows) or any(pool.items[c][2] for n in negs for c in n)
        fields = NEGATIVE_FIELDS if videos else NEGATIVE_FIELDS[:2]
        new_rows = [{**row, **_negative_fields(pool, chosen, fields)} for row, chosen in zip(rows, negs)]
        written.append(str(write_rows(f, new_rows, out, fields)))
    record.update(model=str(args.model), model_dir=model_dir, model_fingerprint=fingerprint_base["model"],
                  model_sha256=model_digest(model_dir),
                  data=str(args.data), image_root=image_root, pool=str(args.pool) if args.pool else None,
                  pool_scope=args.pool_scope, subsets=sorted(set(data.subset_of)), split=args.split,
                  parameters=dataclasses.asdict(cfg), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"), files=written, ranks=distributed.world_size(),
                  llave_ds_version=_version())
    scores = record.pop("scores")
    atomic_write_text(out / MINING_RECORD, json.dumps(record, indent=1) + "\n")
    table = summary_table(record)
    atomic_write_text(out / "mining_summary.md", table)
    record["histogram"] = _histogram(scores, out / "mining_scores.png")
    return record


def model_digest(model_dir: str) -> str:
    """SHA-256 over the names and bytes of the files `model_fingerprint` lists (weights,
    configs, tokenizer, llave_embedding.json): the model's identity in the provenance, read
    once (~2 GB/s; tens of seconds for an 8B model, small next to the encoding)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(model_fingerprint(model_dir)["files"]):
        h.update(name.encode() + b"\0")
        with open(Path(model_dir) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _where(rows: Rows, prefix: str) -> List[str]:
    out = []
    for f, file_rows in zip(rows.files, rows.rows):
        out += [f"{f.path}, row {i}, {prefix}" for i in range(len(file_rows))]
    return out


def _search_and_select(args, cfg: MineConfig, data: Rows, pool: Pool, queries: ShardStore, candidates: ShardStore,
                       positives: ShardStore, positive_ids: Sequence[int]) -> dict:
    """Per query: its top ``depth`` candidates (in its scope), its positive's score, the chosen
    negatives; the counts per subset and the scores for the histogram."""
    n = len(data.queries)
    chosen: List[List[int]] = [[] for _ in range(n)]
    counts: Dict[str, Counter] = {}
    pos_scores = np.empty(n, dtype=np.float32)
    neg_scores: List[float] = []
    pairs: List[Tuple[float, float]] = []      # (positive, hardest mined negative) of each query with one
    scopes = {s: [i for i in range(n) if data.subset_of[i] == s] for s in dict.fromkeys(data.subset_of)} \
        if args.pool_scope == "subset" else {None: list(range(n))}
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="search + select", unit="query", dynamic_ncols=True, disable=args.no_progress)
    for scope, members in scopes.items():
        span = pool.ranges[scope] if scope is not None else range(len(pool.items))
        for lo in range(0, len(members), args.shard_rows):
            idx = members[lo:lo + args.shard_rows]
            bar.update(len(idx))
            q = queries.rows(idx)
            top_s, top_i = topk_blocks(q, _Reiterable(candidates, span), cfg.depth)
            pos = np.einsum("qd,qd->q", q, positives.rows([positive_ids[i] for i in idx]))
            for row, (qi, scores, ids) in enumerate(zip(idx, top_s, top_i)):
                ids = ids + span.start
                positive_keys = side_keys(*data.positives[qi])
                copies = [bool(pool.keys[c] & positive_keys) for c in ids]
                picked, why = select_negatives(ids, scores, float(pos[row]), copies, cfg, qi)
                chosen[qi] = picked
                pos_scores[qi] = pos[row]
                mined = [float(s) for s, c in zip(scores, ids) if c in picked]
                neg_scores += mined
                if mined:
                    pairs.append((float(pos[row]), max(mined)))
                counts.setdefault(data.subset_of[qi], Counter()).update(why)
                counts[data.subset_of[qi]]["queries"] += 1
                counts[data.subset_of[qi]]["short"] += int(len(picked) < cfg.num_negatives)
    bar.close()
    per_file, start = [], 0
    for rows in data.rows:
        per_file.append(chosen[start:start + len(rows)])
        start += len(rows)
    total = sum(counts.values(), Counter())
    return {"counts": {s: dict(c) for s, c in counts.items()}, "total": dict(total), "negatives_per_file": per_file,
            "scores": np.asarray(pairs, dtype=np.float64).reshape(-1, 2),
            "positive_score": _stats(pos_scores), "negative_score": _stats(np.asarray(neg_scores))}


class _Reiterable:
    """The store's blocks of one id span, iterable again for every query block."""

    def __init__(self, store: ShardStore, span: range):
        self.store, self.span = store, span

    def __iter__(self):
        return self.store.blocks(self.span)


def _negative_fields(pool: Pool, chosen: Sequence[int], fields: Sequence[str]) -> dict:
    return {name: [pool.items[c][k] for c in chosen] for k, name in enumerate(fields)}


def _stats(a: np.ndarray) -> dict:
    a = np.asarray(a, dtype=np.float64)
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max())}


def summary_table(record: dict) -> str:
    """Markdown: per subset and in total, queries, candidates scored, dropped by each reason,
    kept, and queries left short of the count."""
    head = ["queries", "scored", "copy of positive", "above margin (likely false negative)", "outside window",
            "not needed", "kept", "short"]
    keys = ["queries", None, "copy", "above_margin", "outside_window", "not_needed", "kept", "short"]
    lines = ["| subset | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, c in list(record["counts"].items()) + [("**total**", record["total"])]:
        scored = sum(c.get(r, 0) for r in REASONS)
        cells = [str(scored if k is None else c.get(k, 0)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    p, n = record["positive_score"], record["negative_score"]
    lines += ["", f"positive score {p.get('mean', float('nan')):.3f} ± {p.get('std', float('nan')):.3f}; "
                  f"mined negatives {n.get('mean', float('nan')):.3f} ± {n.get('std', float('nan')):.3f} "
                  f"(cosine, mean ± std)"]
    return "\n".join(lines) + "\n"


def _histogram(pairs: np.ndarray, path: Path) -> Optional[str]:
    """Each query's positive score against its hardest mined negative's (queries with one)."""
    if not len(pairs):
        return None
    from llave_ds.eval.analysis import plot_similarity_histograms

    return str(plot_similarity_histograms({"mined": (pairs[:, 0], pairs[:, 1])}, str(path),
                                          title="positive vs hardest mined negative, per query"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llave-ds")
    except PackageNotFoundError:
        return "unknown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="an export, a base model directory, or a training run directory (its export, or "
                             "its latest checkpoint exported as `llave-ds export` does)")
    parser.add_argument("--data", required=True, help="the local training source (MMEB-train layout, LLaVE json arrays)")
    parser.add_argument("--out", required=True, help="the mined copy of the data (same layout) and its reports")
    parser.add_argument("--subsets", nargs="*", help="subsets to mine (default: every subset of --data)")
    parser.add_argument("--split", default="original",
                        help="the split's file stem in <subset>/ layouts (MMEB-train: original, the training default)")
    parser.add_argument("--image-root", help="image and video paths are relative to it (default: --data)")
    parser.add_argument("--pool", help="another local source whose positives are the candidates (default: --data's)")
    parser.add_argument("--pool-subsets", nargs="*", help="subsets of --pool (default: all)")
    parser.add_argument("--pool-scope", choices=("subset", "all"), default="subset",
                        help="a query's candidates: its own subset's (default) or the whole pool's")
    d = MineConfig()
    g = parser.add_argument_group("selection (llave_ds.mine.select)")
    g.add_argument("--num-negatives", type=int, default=d.num_negatives)
    g.add_argument("--depth", type=int, default=d.depth, help="candidates retrieved per query")
    g.add_argument("--margin-kind", choices=("relative", "absolute", "none"), default=d.margin_kind)
    g.add_argument("--margin", type=float, default=d.margin,
                   help="relative: drop candidates scoring above margin x positive (default 0.95); "
                        "absolute: above positive - margin")
    g.add_argument("--skip-top", type=int, default=d.skip_top, help="the rank window starts at this rank (0: the best)")
    g.add_argument("--window", type=int, default=d.window, help="the rank window's length (0: to --depth)")
    g.add_argument("--sampling", choices=("top", "random"), default=d.sampling)
    g.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS,
                        help="rows per embedding shard on disk (the unit of resumption)")
    parser.add_argument("--max-length", type=int, help="override the model's max_length")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        with eval_process_group():
            record = mine(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llave-ds mine: {exc}", file=sys.stderr)
        return 2
    if record is not None:
        print(summary_table(record))
        print(f"wrote {len(record['files'])} file(s) under {args.out}, {Path(args.out) / MINING_RECORD}"
              + (f", {record['histogram']}" if record.get("histogram") else ""))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.mine.run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
