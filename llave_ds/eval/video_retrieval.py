"""Zero-shot text-video retrieval: ``llave-ds eval --task video-retrieval``.

The LLaVE paper trains on image-text pairs only and reports text-video retrieval on
MSR-VTT and MSVD. Here a test split (JSONL or CSV of video paths and captions, read by
`llave_ds.eval.retrieval_metrics.load_retrieval_split`) is embedded with the exported model: every
caption as a query-role text, every video as a target-role video (frames sampled as the
export's ``video_frames`` says), and scored by cosine similarity in both directions with
`llave_ds.eval.retrieval_metrics.retrieval_metrics` (Recall@1/5/10, median and mean rank; the
multi-caption protocol is in that module's docstring and docs/EVALUATION.md).

One process: the embedder encodes captions and videos batch by batch (a distributed
launch is refused with a clear message; MSR-VTT 1k-A is 1,000 videos).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from llave_ds.core import distributed
from llave_ds.core.objective import matryoshka_sizes, truncate
from llave_ds.eval.retrieval_metrics import (DEFAULT_KS, DEFAULT_TIE_POLICY, RetrievalSplit, load_retrieval_split,
                                             markdown_table, retrieval_metrics, similarity_matrix)
from llave_ds.media.side import Side
from llave_ds.model.embedder import LlaveEmbedder

logger = logging.getLogger(__name__)


def evaluate_video_retrieval(embedder, split: RetrievalSplit, *, batch_size: int = 16, progress: bool = True,
                             tie_policy: str = DEFAULT_TIE_POLICY, v2t_protocol: str = "caption",
                             text_instruction: Optional[str] = None, video_instruction: Optional[str] = None,
                             ks=DEFAULT_KS, dims: Optional[Sequence[Union[int, str]]] = None) -> dict[str, Any]:
    """Embed the split's captions (query role) and videos (target role) and score both
    directions. ``*_instruction`` replace the export's recorded instructions for this run
    (None: the recorded ones). ``dims``: Matryoshka sizes (``[64, "full"]``) also scored from
    the same embeddings (each prefix re-normalised): ``result["by_dim"][str(size)]``."""
    texts = embedder.encode_sides([Side(text=c, where=f"caption {i}: ") for i, c in enumerate(split.captions)],
                                  role="query", instruction=text_instruction, batch_size=batch_size,
                                  progress=progress)
    videos = embedder.encode_sides([Side(video=v, where=f"video {split.video_keys[i]!r}: ")
                                    for i, v in enumerate(split.videos)],
                                   role="target", instruction=video_instruction, batch_size=batch_size,
                                   progress=progress)
    sim = similarity_matrix(texts.numpy(), videos.numpy())
    result = retrieval_metrics(sim, split.caption_to_video, ks=ks, tie_policy=tie_policy, v2t_protocol=v2t_protocol)
    if dims:
        result["by_dim"] = {
            str(size): retrieval_metrics(similarity_matrix(truncate(texts, size).numpy(), truncate(videos, size).numpy()),
                                         split.caption_to_video, ks=ks, tie_policy=tie_policy, v2t_protocol=v2t_protocol)
            for size, _ in matryoshka_sizes(dims, None, texts.shape[1])}
    result["split"] = split.source
    result["similarity"] = {"mean": float(np.mean(sim)), "std": float(np.std(sim))}
    return result


def by_dim_table(result: Mapping[str, Any], digits: int = 1) -> str:
    """Markdown: the recalls x100 and median rank of both directions per Matryoshka size."""
    ks = result["ks"]
    head = [f"{d} R@{k}" for d in ("t2v", "v2t") for k in ks] + ["t2v MdR", "v2t MdR"]
    lines = ["| size | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for size, r in result["by_dim"].items():
        cells = [f"{r[d][f'R@{k}'] * 100:.{digits}f}" for d in ("t2v", "v2t") for k in ks]
        cells += [f"{r['t2v']['median_rank']:g}", f"{r['v2t']['median_rank']:g}"]
        lines.append(f"| d={size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("video retrieval (--task video-retrieval; --data is the split file)")
    g.add_argument("--video-root", help="folder relative video paths are resolved against (default: the split "
                                        "file's folder)")
    g.add_argument("--video-column", help="the split's video field (default: video or video_path)")
    g.add_argument("--caption-column", help="the split's caption field (default: captions or caption)")
    g.add_argument("--video-pattern", default="{}",
                   help="format a video value into a path, e.g. 'videos/{}.mp4' for bare MSR-VTT ids")
    g.add_argument("--v2t-protocol", choices=("caption", "group"), default="caption",
                   help="video->text with several captions per video: best-ranked correct caption among all "
                        "captions (caption, default) or CLIP4Clip's per-video grouping (group)")
    g.add_argument("--text-instruction", help="instruction before each caption (default: the export's query one)")
    g.add_argument("--video-instruction", help="instruction with each video (default: the export's target one)")


def run(args: argparse.Namespace) -> int:
    """The video-retrieval branch of ``llave-ds eval`` (called by ``eval.run``)."""
    if distributed.detect_env().world_size > 1:
        print("llave-ds eval: --task video-retrieval runs in one process; launch it without torchrun / srun "
              "ranks", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tie_policy = args.tie_policy or DEFAULT_TIE_POLICY
    try:
        split = load_retrieval_split(args.data, video_root=args.video_root, video_column=args.video_column,
                                     caption_column=args.caption_column, video_pattern=args.video_pattern)
        overrides = {"max_length": args.max_length} if args.max_length else {}
        embedder = LlaveEmbedder.from_pretrained(args.model, **overrides)
        result = evaluate_video_retrieval(embedder, split, batch_size=args.batch_size,
                                          progress=not args.no_progress, tie_policy=tie_policy,
                                          v2t_protocol=args.v2t_protocol, text_instruction=args.text_instruction,
                                          video_instruction=args.video_instruction, dims=getattr(args, "dims", None))
    except (ValueError, FileNotFoundError) as exc:
        print(f"llave-ds eval: {exc}", file=sys.stderr)
        return 2
    result["task"] = "video-retrieval"
    result["model"] = str(args.model)
    table = markdown_table(result)
    if "by_dim" in result:
        table += "\n" + by_dim_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=float))
        out.with_suffix(".md").write_text(table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
