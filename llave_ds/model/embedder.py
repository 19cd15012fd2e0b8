"""Use an exported model: ``LlaveEmbedder`` (Python) and ``llave-ds encode`` (files).

``LlaveEmbedder.from_pretrained(dir)`` loads a directory written by ``llave-ds export``
(or a stock LLaVA-OneVision / Qwen2-VL checkpoint directory) together with its processor,
and formats inputs exactly as training did, from the prompt settings in
``llave_embedding.json``. ``encode`` returns float32, L2-normalised ``[N, D]`` embeddings;
the cosine similarity of two rows is their dot product. ``dim=d`` (at load or per call) gives
the first d dimensions re-normalised: a Matryoshka size, which the export declares under
``matryoshka_dims`` when its run trained them (another size works, with a warning).

``llave-ds encode --model DIR --input rows.jsonl --out emb.safetensors`` embeds the rows
of a JSONL / Parquet file (MMEB field names) and writes one row per input row.

A row (a side) is text, an image, a video, or text with one of them. Videos are a video
file or a folder of frame images (read with ``llave_ds.media.video.read_video``, sampled to the
export's ``video_frames``), a ``llave_ds.media.video.Video``, or a list of PIL frames.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from llave_ds.core.objective import truncate
from llave_ds.files import write_atomically
from llave_ds.formats import EMBEDDING_METADATA, QUERY, ROLES, TARGET, TRAIN_SIDE_FIELDS
from llave_ds.media.files import MediaError, resolve_under_root
from llave_ds.media.image import open_image
from llave_ds.media.side import Side
from llave_ds.media.video import sample_clip

logger = logging.getLogger(__name__)

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | None
VideoLike = Any  # str | os.PathLike (file or frame folder) | llave_ds.media.video.Video | list of PIL frames | None


class EncodeError(ValueError):
    """Bad input to encode; the message names the file, row and field when there is one."""


def _open_video(video: VideoLike, num_frames: int, max_side: Optional[int], where: str = ""):
    """The clip the formatter will take (`llave_ds.media.video.sample_clip`, the one frame
    rule), opened here so a bad video is an EncodeError naming the row and the file."""
    if video is None:
        return None
    try:
        return sample_clip(video, num_frames, max_side)
    except (MediaError, TypeError, ValueError) as exc:
        raise EncodeError(f"{where}{exc}") from None


def _open_image(image: ImageLike, where: str = ""):
    """A PIL RGB image (`llave_ds.media.image.open_image`: the rule training uses) from a PIL
    image or a path; None stays None; a bad image is an EncodeError naming the row."""
    try:
        return open_image(image)
    except (MediaError, TypeError) as exc:
        raise EncodeError(f"{where}{exc}") from None


def read_metadata(path: Union[str, Path]) -> Optional[dict]:
    file = Path(path) / EMBEDDING_METADATA
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc


def _resolve_device(device) -> torch.device:
    """None: this rank's GPU (LOCAL_RANK under torchrun / srun launchers), else the CPU."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device(device)


class LlaveEmbedder:
    """An embedding model ready for inference: model + processor + prompt formatter."""

    def __init__(self, model, formatter, device: torch.device, metadata: Optional[dict] = None,
                 dim: Optional[int] = None):
        self.model = model.eval()
        self.formatter = formatter
        self.device = device
        self.metadata = metadata or {}
        self._warned_dims: set[int] = set()
        self.default_dim = None if dim is None else self.check_dim(dim)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None, dtype=None,
                        attn_implementation: str = "auto", dim: Optional[int] = None,
                        **formatter_overrides) -> "LlaveEmbedder":
        """Load an exported directory (or a base model directory).

        device: "cpu", "cuda", "cuda:1", a torch.device, or None (CUDA when available:
            ``cuda:$LOCAL_RANK`` under a distributed launcher; else the CPU).
        dtype: "bfloat16" / "float32" / "float16" or a torch dtype; None: bfloat16 on
            CUDA, float32 on CPU. The embeddings are float32 either way.
        dim: encode's default output size: the first ``dim`` dimensions, re-normalised (None:
            the whole vector). See ``check_dim``.
        formatter_overrides: ``ProcessingConfig`` fields that replace those recorded in
            ``llave_embedding.json`` (max_length, max_image_tokens, query_instruction,
            target_instruction, system_prompt, padding_side, prompt_format, video_frames,
            video_max_side).

        The formatter is ``InputFormatter.from_config`` of the ``ProcessingConfig`` read
        from the ``input_format`` of ``llave_embedding.json`` (the defaults without one),
        the constructor training used: an export formats exactly as its run did.
        """
        from llave_ds.model.backbones import detect_backbone
        from llave_ds.model.dtypes import dtype_name
        from llave_ds.model.embedding import ModelConfig, load_embedding_model
        from llave_ds.model.formatter import InputFormatter, ProcessingConfig, release_processing

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        device = _resolve_device(device)
        if dtype is None:
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        dtype = dtype_name(dtype)
        metadata = read_metadata(path)
        processing = ProcessingConfig.from_metadata((metadata or {}).get("input_format"),
                                                    source=str(path / EMBEDDING_METADATA))
        released = None if metadata is not None else release_processing(path, detect_backbone(path))
        if released is not None:  # e.g. Qwen3-VL-Embedding: its own prompt and image bounds
            processing = released
        unknown = sorted(set(formatter_overrides) - set(ProcessingConfig.field_names()))
        if unknown:
            raise TypeError(f"unknown formatter setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(ProcessingConfig.field_names())}")
        processing = dataclasses.replace(processing, **formatter_overrides)
        model, processor = load_embedding_model(ModelConfig(path=str(path), dtype=dtype,
                                                            attn_implementation=attn_implementation))
        model.requires_grad_(False)
        model.to(device)
        formatter = InputFormatter.from_config(processor, model.backbone, processing)
        if released is not None:
            logger.info("%s has no %s but is a released %s embedding model: using its prompt format %s",
                        path, EMBEDDING_METADATA, model.backbone, released.prompt_format)
        elif metadata is None:
            logger.info("%s has no %s: using the default prompt settings", path, EMBEDDING_METADATA)
        return cls(model, formatter, device, metadata, dim=dim)

    @property
    def full_dim(self) -> int:
        """The width of the whole embedding (the language model's hidden size)."""
        return self.model.hidden_size

    @property
    def dim(self) -> int:
        """The width of what ``encode`` returns by default (``dim`` of ``from_pretrained``)."""
        return self.full_dim if self.default_dim is None else self.default_dim

    @property
    def matryoshka_dims(self) -> Optional[list[int]]:
        """The Matryoshka sizes the export declares (``matryoshka_dims`` of llave_embedding.json)."""
        return self.metadata.get("matryoshka_dims")

    def check_dim(self, dim) -> int:
        """``dim`` checked: an integer from 1 to the width, else a ValueError (EncodeError). A
        size short of the width that the export does not declare (or an export that declares
        none) was not trained as an embedding: it works, and logs one warning per size."""
        width = self.full_dim
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not 1 <= int(dim) <= width:
            raise EncodeError(f"dim must be an integer from 1 to {width} (the embedding width), got {dim!r}")
        dim = int(dim)
        declared = self.matryoshka_dims
        if dim < width and dim not in (declared or ()) and dim not in self._warned_dims:
            self._warned_dims.add(dim)
            if declared:
                logger.warning("dim=%d is not one of the Matryoshka sizes this model was trained at (%s, "
                               "llave_embedding.json): its first %d dimensions were not trained as an embedding",
                               dim, ", ".join(map(str, declared)), dim)
            else:
                logger.warning("dim=%d: this model declares no Matryoshka sizes (no matryoshka_dims in "
                               "llave_embedding.json): its first %d dimensions were not trained as an embedding",
                               dim, dim)
        return dim

    def _formatter_for(self, role: str, instruction: Optional[str]):
        if instruction is None:
            return self.formatter
        fmt = copy.copy(self.formatter)
        setattr(fmt, "query_instruction" if role == "query" else "target_instruction", instruction)
        return fmt

    def encode(self, texts: Optional[Sequence[Optional[str]]] = None,
               images: Optional[Sequence[ImageLike]] = None, instruction: Optional[str] = None,
               role: str = "query", batch_size: int = 16, progress: bool = True,
               videos: Optional[Sequence[VideoLike]] = None, dim: Optional[int] = None) -> torch.Tensor:
        """Embed rows of text, image and/or video: ``[N, D]`` float32, unit norm, on CPU.

        texts / images / videos: lists of the same length where several are given; an image
        is a PIL image, a path or None; a video is a path to a video file or a folder of
        frames, a ``llave_ds.media.video.Video``, a list of PIL frames, or None; a row has at most
        one of image and video; a text may be None or "" (image- or video-only row).
        MMEB's ``<|image_1|>`` (``<|video_1|>``) in a text marks where the image (video) goes.
        instruction: replaces the role's instruction recorded at export for this call.
        dim: the first ``dim`` dimensions, re-normalised (``[N, dim]``); None: the default
            (``from_pretrained``'s ``dim``, else the whole vector).
        """
        given = {name: value for name, value in (("texts", texts), ("images", images), ("videos", videos))
                 if value is not None}
        if not given:
            raise EncodeError("give texts, images, videos or several of them")
        for name, value in given.items():
            if isinstance(value, str):
                raise EncodeError(f"{name} must be a list, not one string")
        lengths = {name: len(value) for name, value in given.items()}
        if len(set(lengths.values())) > 1:
            raise EncodeError("texts, images and videos differ in length (" +
                              ", ".join(f"{name}: {n}" for name, n in lengths.items()) + ")")
        n = next(iter(lengths.values()))
        sides = [Side(texts[i] if texts is not None else "", images[i] if images is not None else None,
                      video=videos[i] if videos is not None else None)
                 for i in range(n)]
        return self.encode_sides(sides, role=role, instruction=instruction, batch_size=batch_size,
                                 progress=progress, dim=dim)

    def encode_sides(self, sides: Sequence[Any], role: str = "query", instruction: Optional[str] = None,
                     batch_size: int = 16, progress: bool = True, dim: Optional[int] = None) -> torch.Tensor:
        """Embed objects with ``.text``, ``.image`` (PIL image, path or None) and optionally
        ``.video`` (see ``encode``); ``.where`` (optional) prefixes error messages."""
        from tqdm.auto import tqdm

        size = self.dim if dim is None else self.check_dim(dim)
        if role not in ROLES:
            raise EncodeError(f"role must be 'query' or 'target', got {role!r}")
        if batch_size < 1:
            raise EncodeError(f"batch_size must be >= 1, got {batch_size}")
        formatter = self._formatter_for(role, instruction)
        sides = list(sides)
        out = []
        self.model.eval()
        batches = range(0, len(sides), batch_size)
        with torch.inference_mode():
            for start in tqdm(batches, total=math.ceil(len(sides) / batch_size), desc=f"encode {role}",
                              unit="batch", disable=not progress, dynamic_ncols=True):
                chunk = []
                for i, s in enumerate(sides[start:start + batch_size]):
                    where = getattr(s, "where", None) or f"row {start + i}: "
                    video = getattr(s, "video", None)
                    if s.image is not None and video is not None:
                        raise EncodeError(f"{where}has both an image and a video; give one of them")
                    chunk.append(Side(s.text if s.text is not None else "", _open_image(s.image, where),
                                      _open_video(video, formatter.video_frames, formatter.video_max_side, where),
                                      where=where))
                batch = formatter(chunk, role)
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out.append(self.model(**batch).float().cpu())
        if not out:
            return torch.empty(0, size, dtype=torch.float32)
        return truncate(torch.cat(out), size)  # the whole vector as it is


# ------------------------------------------------------------------------ encode CLI

ROLE_FIELDS = {role: TRAIN_SIDE_FIELDS[role] for role in (QUERY, TARGET)}
GENERIC_FIELDS = ("text", "image_path", "video_path")


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl or .parquet file (a JSON error names the line)."""
    if not path.is_file():
        raise EncodeError(f"input file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EncodeError(f"{path}, line {lineno}: not valid JSON ({exc})") from exc
                if not isinstance(row, dict):
                    raise EncodeError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - name the file whatever pyarrow raises
            raise EncodeError(f"cannot read parquet file {path}: {exc}") from exc
    raise EncodeError(f"input file {path}: expected a .jsonl or .parquet file")


def row_side(row: dict, role: str, where: str, image_root: Optional[Path]) -> Side:
    """The side of one row for ``role`` (MMEB fields first, then generic
    text/image_path/video_path), checked: field types, a non-empty row, at most one of image
    and video, and that the image file / video file or frame folder exists. Media stay paths
    (decoded batch by batch when encoding), resolved against ``image_root``."""
    fields = ROLE_FIELDS[role]
    if not any(f in row for f in fields):
        fields = GENERIC_FIELDS
        if not any(f in row for f in fields):
            raise EncodeError(f"{where}: no {'/'.join(ROLE_FIELDS[role])} (MMEB {role} fields) and no "
                              f"{'/'.join(GENERIC_FIELDS)} field; fields present: {sorted(row)}")
    text_field, image_field, video_field = fields
    text, image, video = row.get(text_field), row.get(image_field), row.get(video_field)
    if text is not None and not isinstance(text, str):
        raise EncodeError(f"{where}, field {text_field!r}: expected a string, got {type(text).__name__}")
    for field_name, value in ((image_field, image), (video_field, video)):
        if value is not None and not isinstance(value, str):
            raise EncodeError(f"{where}, field {field_name!r}: expected a path string, got {type(value).__name__}")
    if not text and not image and not video:
        raise EncodeError(f"{where}: {text_field!r}, {image_field!r} and {video_field!r} are all empty")
    if image and video:
        raise EncodeError(f"{where}: both {image_field!r} and {video_field!r} are set; a side has at most one")

    def resolve(value: str, field_name: str) -> Path:
        # the training readers' rule (media.files.resolve_under_root): a path that leaves the
        # image root (../, another absolute path) is refused; --image-root / allows any
        if image_root is None:
            return Path(value)
        try:
            return Path(resolve_under_root(str(image_root), value))
        except MediaError as exc:
            raise EncodeError(f"{where}, field {field_name!r}: {exc} (pass --image-root with a folder that holds "
                              f"it, or --image-root / to allow any absolute path)") from None

    if video:
        video_path = resolve(video, video_field)
        if not (video_path.is_file() or video_path.is_dir()):
            raise EncodeError(f"{where}, field {video_field!r}: video file or frame folder not found: {video_path}")
        return Side(text or "", video=video_path, where=f"{where}, field {video_field!r}: ")
    image_path = None
    if image:
        image_path = resolve(image, image_field)
        if not image_path.is_file():
            raise EncodeError(f"{where}, field {image_field!r}: image file not found: {image_path}")
    return Side(text or "", image_path, where=f"{where}, field {image_field!r}: ")


def write_embeddings(embeddings: torch.Tensor, out: Path) -> None:
    """.safetensors (tensor "embeddings") or .npy, written to a temp file then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata={"format": "pt"})
        else:
            import numpy as np

            np.save(tmp, embeddings.numpy())

    write_atomically(out, write)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model directory (llave-ds export)")
    parser.add_argument("--input", required=True,
                        help=".jsonl or .parquet rows (MMEB field names, or text/image_path/video_path)")
    parser.add_argument("--out", required=True, help="output .safetensors (tensor 'embeddings') or .npy")
    parser.add_argument("--role", default="query", choices=["query", "target"],
                        help="query: qry / qry_image_path / qry_video_path; target: pos_text / pos_image_path / "
                             "pos_video_path (default query)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dim", type=int, default=None,
                        help="write the first DIM dimensions of each embedding, re-normalised (a Matryoshka size: "
                             "matryoshka_dims of the export's llave_embedding.json; default: the whole vector)")
    parser.add_argument("--image-root", default=None,
                        help="directory image and video paths are relative to (default: the input file's "
                             "directory)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    inp, out = Path(args.input), Path(args.out)
    try:
        if out.suffix not in (".safetensors", ".npy"):
            raise EncodeError(f"output file {out}: expected a .safetensors or .npy name")
        if args.batch_size < 1:
            raise EncodeError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.dim is not None and args.dim < 1:  # above the width: known once the model is loaded
            raise EncodeError(f"--dim must be >= 1, got {args.dim}")
        image_root = Path(args.image_root) if args.image_root else inp.parent
        if not image_root.is_dir():
            raise EncodeError(f"image root {image_root} is not a directory")
        rows = read_rows(inp)
        if not rows:
            raise EncodeError(f"input file {inp} has no rows")
        line_numbers = _line_numbers(inp) if inp.suffix == ".jsonl" else None

        def where(i: int) -> str:
            return f"{inp}, row {i}" + (f" (line {line_numbers[i]})" if line_numbers else "")

        # Every row is checked (fields, types, image files) before the model loads.
        sides = [row_side(row, args.role, where(i), image_root) for i, row in enumerate(rows)]
        embedder = LlaveEmbedder.from_pretrained(args.model, device=args.device, dtype=args.dtype, dim=args.dim)
        embeddings = embedder.encode_sides(sides, role=args.role, batch_size=args.batch_size,
                                           progress=not args.no_progress)
        write_embeddings(embeddings, out)
    except (EncodeError, FileNotFoundError) as exc:
        print(f"llave-ds encode: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "rows": int(embeddings.shape[0]), "dim": int(embeddings.shape[1])}))
    return 0


def _line_numbers(path: Path) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]
