"""``llave-ds eval``: MMEB (``--task mmeb``, the default), MMEB-V2 (``--benchmark mmeb-v2``) or
text-video retrieval (``--task video-retrieval``). The arguments of both, the choice of task, and which model
directory ``--model`` names (an export, a base model, or a training run's export)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from llave_ds.core.objective import check_matryoshka
from llave_ds.eval import mmeb, mmeb_v2_run, video_retrieval
from llave_ds.training.run_dir import RunDir

logger = logging.getLogger(__name__)


def resolve_model_dir(path: str) -> str:
    """A model directory as given, or, for a training run directory, the run's export
    (``RunDir.export_dir``); ValueError naming what to do when the run has no export yet."""
    given = Path(path)
    if (given / "config.json").is_file() or not given.is_dir():
        return path  # a model directory, or something the loader will report
    run = RunDir.open(given)
    if not run.is_run():
        return path
    if (run.export_dir / "config.json").is_file():
        logger.info("--model %s is a training run: evaluating its export %s", path, run.export_dir)
        return str(run.export_dir)
    raise ValueError(f"--model {path} is a training run directory without an export ({run.export_dir} has no "
                     f"config.json): export it first with `llave-ds export {path} --out DIR` and evaluate DIR")


def _dims(text: str) -> list:
    """``--dims 64,256,full`` -> [64, 256, "full"] (the rule: `check_matryoshka`)."""
    try:
        return check_matryoshka([part.strip() for part in text.split(",")], name="--dims")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", "--benchmark", dest="task", choices=("mmeb", "mmeb-v2", "video-retrieval"),
                        default="mmeb",
                        help="mmeb (default): MMEB(-V1)'s P@1 per subset; mmeb-v2: MMEB-V2 per-task score and "
                             "prediction files in --scores-dir (encoded with --model/--data: the visual-document "
                             "tasks so far) and their summary; video-retrieval: text<->video Recall@1/5/10 and median rank "
                             "on a split file of video paths and captions (docs/EVALUATION.md)")
    parser.add_argument("--model",
                        help="exported model directory, a base model directory, or a training run directory "
                             "(its export: RUN_DIR/export or the run's export.dir); required but for mmeb-v2")
    parser.add_argument("--data", help="MMEB-eval directory (per-subset parquet/jsonl) or hub id; "
                                       "with --task video-retrieval: the split's .jsonl / .csv; required but for mmeb-v2")
    parser.add_argument("--image-root", help="directory image paths are relative to (default: --data)")
    parser.add_argument("--subsets", nargs="*",
                        help="subset names (default: the official and synthetic subsets found locally, or the 36 "
                             "official ones of a hub id); a subset without a known category is reported on its own")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-rows", type=int, help="evaluate only the first N queries of each subset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="DataLoader workers decoding images while the model encodes (0: in this process)")
    parser.add_argument("--tie-policy", choices=("first", "strict"),
                        help="equal similarities: first (MMEB default: the lower index wins, as the official code) "
                             "or strict (video-retrieval default: the correct item ranks after its ties)")
    parser.add_argument("--max-length", type=int, help="override the formatter's max_length")
    parser.add_argument("--strict-empty", action="store_true",
                        help="refuse a query or candidate with no text and no image (default: embed it as \"\", "
                             "like the official eval, and count it)")
    parser.add_argument("--out", help="write the JSON result here (and a .md table beside it)")
    parser.add_argument("--scores-dir",
                        help="write <subset>_score.json here as each subset finishes; a re-run loads the matching "
                             "ones instead of encoding again (default: <out dir>/<out stem>_subsets with --out)")
    parser.add_argument("--rescore", action="store_true",
                        help="evaluate every subset again even when its score file matches")
    parser.add_argument("--dims", type=_dims,
                        help="Matryoshka sizes, e.g. 64,256,full: also score each prefix of the embedding "
                             "(re-normalised) from the same encoding: P@1 per size (mmeb) or the retrieval metrics "
                             "per size (video-retrieval)")
    parser.add_argument("--analysis-dir", help="also write the similarity histogram PNG and gap table here")
    parser.add_argument("--no-progress", action="store_true")
    video_retrieval.add_arguments(parser)
    g = parser.add_argument_group("MMEB-V2 (--benchmark mmeb-v2)")
    g.add_argument("--modalities", help="comma-separated: image,video,visdoc (default: all three)")
    g.add_argument("--tasks", nargs="*", help="MMEB-V2 task names (default: every task of the modalities)")
    g.add_argument("--pred-top-k", type=int, default=None,
                   help="keep each query's top N names in <task>_pred.jsonl (default: the whole ranking, as the "
                        "official eval; the metrics read the top 10)")
    g.add_argument("--rescore-preds", action="store_true",
                   help="score every <task>_pred.jsonl in --scores-dir again (rewrites <task>_score.json)")
    g.add_argument("--label", help="the model's name in the summary (default: the --scores-dir name)")
    g.add_argument("--no-plot", action="store_true", help="with --out: no per-category PNG")




def run(args: argparse.Namespace) -> int:
    if args.task == "mmeb-v2":
        if getattr(args, "dims", None):
            print("llave-ds eval: --dims is not built for --benchmark mmeb-v2 yet (it scores --task mmeb and "
                  "video-retrieval)", file=sys.stderr)
            return 2
        if args.model:
            try:
                args.model = resolve_model_dir(args.model)
            except ValueError as exc:
                print(f"llave-ds eval: {exc}", file=sys.stderr)
                return 2
        return mmeb_v2_run.run(args)
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if not value]
    if missing:
        print(f"llave-ds eval: {' and '.join(missing)} required with --task {args.task}", file=sys.stderr)
        return 2
    try:
        args.model = resolve_model_dir(args.model)
    except ValueError as exc:
        print(f"llave-ds eval: {exc}", file=sys.stderr)
        return 2
    if args.task == "video-retrieval":
        return video_retrieval.run(args)
    return mmeb.run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.eval", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
