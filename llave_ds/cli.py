"""The ``llave-ds`` command: one subcommand per job, each living in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, help line)
SUBCOMMANDS = {
    "demo": ("llave_ds.toy.demo", "the offline demo: synthetic data, tiny model, train -> eval -> export on CPU"),
    "train": ("llave_ds.train", "train an embedding model (YAML config + dotted overrides)"),
    "eval": ("llave_ds.eval.cli", "MMEB evaluation (precision@1 per subset, category, IND/OOD, overall), or "
                                  "--task video-retrieval (text<->video Recall@K)"),
    "synth": ("llave_ds.toy.synthetic", "generate the offline synthetic MMEB-format dataset"),
    "tiny": ("llave_ds.toy.tiny", "write a tiny offline model directory of any supported backbone (smoke tests)"),
    "synth-video": ("llave_ds.toy.synthetic_video", "generate synthetic moving-shape videos: a retrieval test split "
                                                    "and video training rows"),
    "mine": ("llave_ds.mine.run", "mine hard negatives for a training set with a model (positive-aware filter), "
                                  "written into a copy of the data"),
    "shard": ("llave_ds.data.shards.command", "write a local training source as tar shards (WebDataset layout) with "
                                              "an index, for streaming from object storage"),
    "export": ("llave_ds.export.model_dir", "consolidate a training checkpoint into a transformers model directory"),
    "encode": ("llave_ds.model.embedder", "embed the rows of a .jsonl / .parquet file with an exported model"),
    "bench": ("llave_ds.bench.cli", "training throughput (samples/s, MFU, memory) of the cached step at real shapes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llave-ds",
        description="Train universal multimodal embedding models (LLaVE) with gradient "
                    "caching inside DeepSpeed ZeRO.")
    from llave_ds import __version__
    parser.add_argument("--version", action="version", version=f"llave-ds {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
