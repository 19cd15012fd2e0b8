"""``llave-ds shard``: a local training source -> tar shards and ``index.json`` (docs/DATA.md).

    llave-ds shard --data DIR [--image-root R] --out SHARDS [--shard-size 256MB] [--skip-bad-rows]

Reads every layout training reads (MMEB-train parquet / jsonl, LLaVE's JSON arrays, the
synthetic task, ``llave-ds mine``'s output); writes `llave_ds.data.shards.writer`'s shards with
a progress bar over the rows and one summary line. ``--out`` must not be the source, and must
be empty, new, or an earlier shard set (which is replaced).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Optional, Sequence

from llave_ds.data.row_files import row_files
from llave_ds.data.shards.layout import DEFAULT_PREFIX, INDEX_NAME
from llave_ds.data.shards.writer import check_output_dir, count_rows, write_shards

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text: str) -> int:
    """``256MB`` -> 256,000,000 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, a bare number: bytes)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GiB, 500000)")
    return int(float(match.group(1)) * _UNITS[unit])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="the local training source (MMEB-train layout, LLaVE json arrays, synthetic, mined)")
    parser.add_argument("--out", required=True, help="directory for the shards and index.json (not --data)")
    parser.add_argument("--image-root", help="image and video paths are relative to it (default: --data)")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("256MB"),
                        help="target bytes per shard (default 256MB; a larger sample gets a shard of its own)")
    parser.add_argument("--subsets", nargs="*", help="subsets to write (default: every subset of --data)")
    parser.add_argument("--split", default="original",
                        help="the split's file stem in <subset>/ layouts (MMEB-train: original)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="shard names: PREFIX-00000.tar, ...")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip (count, log) bad rows instead of stopping at the first")
    parser.add_argument("--max-skip-fraction", type=float, default=0.1,
                        help="even when skipping, stop if more of a subset than this is bad")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    started = time.monotonic()
    try:
        check_output_dir(args.out, args.data)
        files = row_files(args.data, args.subsets, args.split)
        with tqdm(total=count_rows(files), desc="shard", unit="row", dynamic_ncols=True,
                  disable=args.no_progress) as bar:
            index = write_shards(args.data, args.out, image_root=args.image_root, split=args.split,
                                 shard_size=args.shard_size, prefix=args.prefix, skip_bad_rows=args.skip_bad_rows,
                                 max_skip_fraction=args.max_skip_fraction, files=files, progress=bar.update)
    except (ValueError, OSError) as exc:
        print(f"llave-ds shard: {exc}", file=sys.stderr)
        return 2
    rows = sum(s["rows"] for s in index.subsets.values())
    skipped = sum(sum(s["skipped"].values()) for s in index.subsets.values())
    megabytes = sum(s.bytes for s in index.shards) / 1e6
    print(f"wrote {index.num_samples} samples of {rows} rows ({len(index.subsets)} subset(s)"
          + (f", {skipped} bad rows skipped" if skipped else "")
          + f") into {len(index.shards)} shard(s), {megabytes:.1f} MB, and {args.out.rstrip('/')}/{INDEX_NAME} "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.data.shards.command", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
