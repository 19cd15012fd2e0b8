"""A deterministic, offline MMEB-format task that a tiny model can learn on CPU.

A scene is 1-3 identical shapes described by four attributes: count, colour, shape and
position (which half of the image they sit in), drawn with PIL on a plain background
("two red circles on the left"). Four subsets mirror MMEB's task kinds:

- ``Synth_I2T`` image -> text retrieval: image + instruction -> caption;
- ``Synth_T2I`` text -> image retrieval: caption -> image;
- ``Synth_CLS`` classification: image + instruction -> shape name;
- ``Synth_VQA`` VQA: image + question -> short answer ("red", "two", "left", "circle").

Two eval-only subsets make hard negatives decide the score (``HARD_EVAL_SUBSETS``):

- ``Synth_I2T_Hard`` / ``Synth_T2I_Hard``: the queries of ``Synth_I2T`` / ``Synth_T2I``, but
  the candidates are the truth and *all ten* of its one-attribute neighbours (2 other
  counts, 3 colours, 2 shapes, 3 positions), no random scene: P@1 there is the fraction of
  queries whose embedding tells the exact scene from every scene one word away.

Every hard negative differs from the truth in exactly one attribute (negative captions
for image->text, negative images for text->image, other labels/answers otherwise). The
train split is MMEB-train (one file per subset; ``neg_text`` / ``neg_image_path`` are
lists, which `llave_ds.data.mmeb_train` accepts next to MMEB's single strings); the eval split is
MMEB-eval (``qry_text``, ``qry_img_path``, ``tgt_text``, ``tgt_img_path``, ground truth
first). Image paths are relative to the output directory. Sidecar files
``attributes/<split>/<subset>.jsonl`` give the scene attributes of every row's positive,
negatives and candidates. Same seed -> byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from llave_ds.data.mmeb_train import TrainDataConfig
from llave_ds.formats import EVAL_FIELDS, IMAGE_PLACEHOLDER, NEGATIVE_FIELDS, REQUIRED_TRAIN_FIELDS

# Written into manifests and part of every seed string: a stable name, not the module path
# (the module moved to llave_ds.toy; renaming this would change every generated dataset).
GENERATOR = "llave_ds.synthetic"
FORMAT_VERSION = 2  # 2: the eval-only hard-negative subsets

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (225, 195, 20)}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3)
ATTRIBUTES = ("count", "colour", "shape", "position")
ATTRIBUTE_VALUES: Dict[str, Tuple[Any, ...]] = {
    "count": COUNTS, "colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}
BACKGROUND = (245, 245, 245)
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}

# Short prompts: the tiny test tokenizer is byte-level, so every character is a token.
I2T_QUERY = IMAGE_PLACEHOLDER + "\nFind a caption for this image."
T2I_QUERY = "Find an image of: {caption}"
IMAGE_TARGET = IMAGE_PLACEHOLDER + "\nRepresent the image."
CLS_QUERY = IMAGE_PLACEHOLDER + "\nClassify the shape."
VQA_QUESTIONS = {"colour": "What colour are the shapes?", "shape": "What shape are they?",
                 "count": "How many shapes are there?", "position": "Where are the shapes?"}

# subset -> (kind, MMEB category)
SUBSETS: Dict[str, Tuple[str, str]] = {
    "Synth_I2T": ("i2t", "retrieval"),
    "Synth_T2I": ("t2i", "retrieval"),
    "Synth_CLS": ("classification", "classification"),
    "Synth_VQA": ("vqa", "vqa"),
}
# Eval-only: retrieval whose candidates are the truth + every one-attribute neighbour.
HARD_EVAL_SUBSETS: Dict[str, Tuple[str, str]] = {
    "Synth_I2T_Hard": ("i2t", "retrieval"),
    "Synth_T2I_Hard": ("t2i", "retrieval"),
}
EVAL_SUBSETS: Dict[str, Tuple[str, str]] = {**SUBSETS, **HARD_EVAL_SUBSETS}
MAX_HARD_NEGATIVES = 2  # classification has 3 shapes, so 2 other labels at most

# The row formats of llave_ds.formats: strings, the negatives and the candidates as lists.
TRAIN_SCHEMA = pa.schema([(name, pa.string()) for name in REQUIRED_TRAIN_FIELDS]
                         + [(name, pa.list_(pa.string())) for name in NEGATIVE_FIELDS])
EVAL_SCHEMA = pa.schema([(name, pa.string()) for name in EVAL_FIELDS[:2]]
                        + [(name, pa.list_(pa.string())) for name in EVAL_FIELDS[2:]])


@dataclass(frozen=True)
class SceneSpec:
    """What a scene shows: ``count`` identical ``colour`` ``shape``s in one half of the image."""
    count: int
    colour: str
    shape: str
    position: str

    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        amount = "a" if self.count == 1 else _COUNT_WORDS[self.count]
        return f"{amount} {self.colour} {noun} {_PLACE_PHRASES[self.position]}"

    def answer(self, attribute: str) -> str:
        """Short answer naming one attribute (VQA / classification label)."""
        if attribute == "count":
            return _COUNT_WORDS[self.count]
        return str(getattr(self, attribute))

    def with_value(self, attribute: str, value: Any) -> "SceneSpec":
        return replace(self, **{attribute: value})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SceneSpec":
        return cls(count=int(d["count"]), colour=d["colour"], shape=d["shape"], position=d["position"])


ALL_SCENES: Tuple[SceneSpec, ...] = tuple(
    SceneSpec(n, c, s, p) for n in COUNTS for c in COLOURS for s in SHAPES for p in POSITIONS)


def differing_attributes(a: SceneSpec, b: SceneSpec) -> List[str]:
    """Names of the attributes in which two scenes differ."""
    return [name for name in ATTRIBUTES if getattr(a, name) != getattr(b, name)]


def one_attribute_neighbours(spec: SceneSpec) -> List[SceneSpec]:
    """Every scene that differs from ``spec`` in exactly one attribute (10 of them), attribute by attribute."""
    return [spec.with_value(a, v) for a in ATTRIBUTES for v in _other_values(spec, a)]


def _other_values(spec: SceneSpec, attribute: str) -> List[Any]:
    return [v for v in ATTRIBUTE_VALUES[attribute] if v != getattr(spec, attribute)]


def render_scene(spec: SceneSpec, size: int = 28, rng: Optional[random.Random] = None) -> Image.Image:
    """Draw a scene; ``rng`` adds a pixel or two of jitter per shape (None: none)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    radius = max(2, round(size * 0.12))
    jitter = max(1, size // 28)
    vertical = spec.position in ("left", "right")  # shapes stack along the half's long side
    across = size * (0.25 if spec.position in ("left", "top") else 0.75)
    for k in range(spec.count):
        along = size * (k + 0.5) / spec.count
        cx, cy = (across, along) if vertical else (along, across)
        if rng is not None:
            cx += rng.randint(-jitter, jitter)
            cy += rng.randint(-jitter, jitter)
        cx = int(min(max(round(cx), radius), size - 1 - radius))
        cy = int(min(max(round(cy), radius), size - 1 - radius))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        colour = COLOURS[spec.colour]
        if spec.shape == "square":
            draw.rectangle(box, fill=colour)
        elif spec.shape == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return img


# --------------------------------------------------------------------------- generation

@dataclass
class SyntheticMMEB:
    """Where a generated dataset lives (absolute paths) and its manifest."""
    root: str
    train_dir: str
    eval_dir: str
    image_root: str
    manifest_path: str
    manifest: Dict[str, Any] = field(default_factory=dict)

    @property
    def subsets(self) -> List[str]:
        return list(self.manifest["subsets"])

    def train_config(self, **overrides: Any) -> TrainDataConfig:
        """A TrainDataConfig reading this dataset's train split (hard negatives on)."""
        options: Dict[str, Any] = dict(source=self.train_dir, source_type="local", image_root=self.image_root,
                                       use_hard_negatives=self.manifest["num_hard_negatives"] > 0,
                                       num_hard_negatives=max(1, self.manifest["num_hard_negatives"]))
        options.update(overrides)
        return TrainDataConfig(**options)


class _ImageWriter:
    def __init__(self, root: str, size: int):
        self.root, self.size = root, size

    def write(self, spec: SceneSpec, rel_path: str, rng: random.Random) -> str:
        full = os.path.join(self.root, rel_path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        render_scene(spec, self.size, rng).save(full, format="PNG")
        return rel_path


def _train_row(kind: str, spec: SceneSpec, rng: random.Random, k: int, images: _ImageWriter,
               prefix: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """One MMEB-train row and its attribute record."""
    attribute: Optional[str] = None
    if kind in ("i2t", "t2i"):
        negatives = [spec.with_value(a, rng.choice(_other_values(spec, a))) for a in rng.sample(ATTRIBUTES, k)]
    else:
        attribute = "shape" if kind == "classification" else rng.choice(ATTRIBUTES)
        negatives = [spec.with_value(attribute, v) for v in rng.sample(_other_values(spec, attribute), k)]
    if kind == "i2t":
        row = dict(qry=I2T_QUERY, qry_image_path=images.write(spec, f"{prefix}_q.png", rng),
                   pos_text=spec.caption(), pos_image_path="",
                   neg_text=[n.caption() for n in negatives], neg_image_path=[""] * k)
    elif kind == "t2i":
        row = dict(qry=T2I_QUERY.format(caption=spec.caption()), qry_image_path="",
                   pos_text=IMAGE_TARGET, pos_image_path=images.write(spec, f"{prefix}_p.png", rng),
                   neg_text=[IMAGE_TARGET] * k,
                   neg_image_path=[images.write(n, f"{prefix}_n{j}.png", rng) for j, n in enumerate(negatives)])
    else:
        query = CLS_QUERY if kind == "classification" else IMAGE_PLACEHOLDER + "\n" + VQA_QUESTIONS[attribute]
        row = dict(qry=query, qry_image_path=images.write(spec, f"{prefix}_q.png", rng),
                   pos_text=spec.answer(attribute), pos_image_path="",
                   neg_text=[n.answer(attribute) for n in negatives], neg_image_path=[""] * k)
    record = dict(kind=kind, attribute=attribute, positive=spec.to_dict(), negatives=[n.to_dict() for n in negatives])
    return row, record


def _eval_row(kind: str, spec: SceneSpec, rng: random.Random, num_candidates: int, images: _ImageWriter,
              prefix: str, hard: bool = False) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """One MMEB-eval row (ground truth first) and its attribute record.

    ``hard`` (retrieval only): the candidates are the truth and all its one-attribute
    neighbours in random order, ``num_candidates`` is ignored."""
    attribute: Optional[str] = None
    if hard:
        neighbours = one_attribute_neighbours(spec)
        rng.shuffle(neighbours)
        candidates = [spec] + neighbours
    elif kind in ("i2t", "t2i"):
        # One hard negative per attribute, then random other scenes up to num_candidates.
        hard = [spec.with_value(a, rng.choice(_other_values(spec, a))) for a in ATTRIBUTES]
        candidates = [spec] + hard[:num_candidates - 1]
        others = [s for s in ALL_SCENES if s not in candidates]
        candidates += rng.sample(others, num_candidates - len(candidates))
    else:
        attribute = "shape" if kind == "classification" else rng.choice(ATTRIBUTES)
        candidates = [spec] + [spec.with_value(attribute, v) for v in _other_values(spec, attribute)]
    if kind == "i2t":
        row = dict(qry_text=I2T_QUERY, qry_img_path=images.write(spec, f"{prefix}_q.png", rng),
                   tgt_text=[c.caption() for c in candidates], tgt_img_path=[""] * len(candidates))
    elif kind == "t2i":
        row = dict(qry_text=T2I_QUERY.format(caption=spec.caption()), qry_img_path="",
                   tgt_text=[IMAGE_TARGET] * len(candidates),
                   tgt_img_path=[images.write(c, f"{prefix}_c{j}.png", rng) for j, c in enumerate(candidates)])
    else:
        query = CLS_QUERY if kind == "classification" else IMAGE_PLACEHOLDER + "\n" + VQA_QUESTIONS[attribute]
        row = dict(qry_text=query, qry_img_path=images.write(spec, f"{prefix}_q.png", rng),
                   tgt_text=[c.answer(attribute) for c in candidates], tgt_img_path=[""] * len(candidates))
    record = dict(kind=kind, attribute=attribute, positive=spec.to_dict(),
                  candidates=[c.to_dict() for c in candidates])
    return row, record


def _write_rows(rows: List[Dict[str, Any]], schema: pa.Schema, path: str, file_format: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if file_format == "parquet":
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    else:
        _write_jsonl(rows, path)


def _write_jsonl(rows: List[Dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


_OWNED = ("manifest.json", "train", "eval", "images", "attributes")


def _clear_output_dir(out_dir: str) -> None:
    """Make ``out_dir`` empty of our files; refuse to touch a directory we did not write."""
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
        return
    entries = os.listdir(out_dir)
    if not entries:
        return
    manifest = os.path.join(out_dir, "manifest.json")
    try:
        with open(manifest, encoding="utf-8") as fh:
            ours = json.load(fh).get("generator") == GENERATOR
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"{out_dir} is not empty and was not written by {GENERATOR}; "
                         "pick an empty or new directory")
    for name in _OWNED:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _result(out_dir: str, manifest: Dict[str, Any]) -> SyntheticMMEB:
    root = os.path.abspath(out_dir)
    return SyntheticMMEB(root=root, train_dir=os.path.join(root, manifest["train_dir"]),
                         eval_dir=os.path.join(root, manifest["eval_dir"]),
                         image_root=os.path.normpath(os.path.join(root, manifest["image_root"])),
                         manifest_path=os.path.join(root, "manifest.json"), manifest=manifest)


def generate_synthetic_mmeb(out_dir: str, *, num_train_per_subset: int = 256, num_eval_per_subset: int = 64,
                            seed: int = 0, image_size: int = 28, subsets: Optional[Sequence[str]] = None,
                            num_hard_negatives: int = 2, num_eval_candidates: int = 16,
                            file_format: str = "parquet") -> SyntheticMMEB:
    """Write the synthetic MMEB-train / MMEB-eval dataset under ``out_dir``.

    Layout: ``manifest.json``; ``train/<subset>.<fmt>``; ``eval/<subset>.<fmt>``;
    ``images/<subset>/<split>/*.png``; ``attributes/<split>/<subset>.jsonl``. Image paths
    in rows are relative to ``out_dir`` (the image root). ``out_dir`` must be empty, new,
    or an earlier output of this function (then it is replaced). ``subsets`` default: all
    of ``EVAL_SUBSETS``; those of ``HARD_EVAL_SUBSETS`` have an eval split only.
    """
    subsets = list(EVAL_SUBSETS) if subsets is None else list(subsets)
    unknown = [s for s in subsets if s not in EVAL_SUBSETS]
    if unknown or not subsets:
        raise ValueError(f"unknown synthetic subset(s) {unknown}; available: {list(EVAL_SUBSETS)}")
    if num_train_per_subset < 1 or num_eval_per_subset < 0:
        raise ValueError("num_train_per_subset must be >= 1 and num_eval_per_subset >= 0")
    if not 0 <= num_hard_negatives <= MAX_HARD_NEGATIVES:
        raise ValueError(f"num_hard_negatives must be in [0, {MAX_HARD_NEGATIVES}], got {num_hard_negatives}")
    if not 2 <= num_eval_candidates <= len(ALL_SCENES):
        raise ValueError(f"num_eval_candidates must be in [2, {len(ALL_SCENES)}], got {num_eval_candidates}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if file_format not in ("parquet", "jsonl"):
        raise ValueError(f"file_format must be 'parquet' or 'jsonl', got {file_format!r}")

    _clear_output_dir(out_dir)
    images = _ImageWriter(out_dir, image_size)
    parameters = generate_parameters(num_train_per_subset=num_train_per_subset, seed=seed,
                                     num_eval_per_subset=num_eval_per_subset, image_size=image_size,
                                     subsets=subsets, num_hard_negatives=num_hard_negatives,
                                     num_eval_candidates=num_eval_candidates, file_format=file_format)
    manifest: Dict[str, Any] = dict(
        generator=GENERATOR, format_version=FORMAT_VERSION, parameters=parameters,
        train_dir="train", eval_dir="eval", image_root=".", file_format=file_format,
        num_hard_negatives=num_hard_negatives, num_eval_candidates=num_eval_candidates,
        attributes={k: list(v) for k, v in ATTRIBUTE_VALUES.items()}, subsets={})
    for subset in subsets:
        kind, category = EVAL_SUBSETS[subset]
        hard = subset in HARD_EVAL_SUBSETS
        entry: Dict[str, Any] = dict(kind=kind, category=category)
        if hard:
            entry["candidates"] = "one_attribute_neighbours"
        splits = (("train", num_train_per_subset, TRAIN_SCHEMA), ("eval", num_eval_per_subset, EVAL_SCHEMA))
        for split, count, schema in splits[1:] if hard else splits:
            # String seeds are hashed with SHA-512 by random.Random: stable across runs.
            rng = random.Random(f"{GENERATOR}/{seed}/{subset}/{split}")
            rows, records = [], []
            for i in range(count):
                spec = rng.choice(ALL_SCENES)
                prefix = f"images/{subset}/{split}/{i:06d}"
                if split == "train":
                    row, record = _train_row(kind, spec, rng, num_hard_negatives, images, prefix)
                else:
                    row, record = _eval_row(kind, spec, rng, num_eval_candidates, images, prefix, hard=hard)
                rows.append(row)
                records.append(dict(row=i, **record))
            data_file = f"{split}/{subset}.{file_format}"
            attributes_file = f"attributes/{split}/{subset}.jsonl"
            _write_rows(rows, schema, os.path.join(out_dir, data_file), file_format)
            _write_jsonl(records, os.path.join(out_dir, attributes_file))
            entry.update({f"{split}_rows": count, f"{split}_file": data_file, f"{split}_attributes": attributes_file})
        manifest["subsets"][subset] = entry
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return _result(out_dir, manifest)


def load_synthetic_manifest(out_dir: str) -> Optional[SyntheticMMEB]:
    """The dataset already generated in ``out_dir``, or None."""
    try:
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return _result(out_dir, manifest) if manifest.get("generator") == GENERATOR else None


def prepare_synthetic_mmeb(out_dir: str, **options: Any) -> Tuple[str, str]:
    """Generate (or reuse an identical earlier generation) and return (train_dir, image_root).

    ``options`` are those of `generate_synthetic_mmeb`; an existing dataset is reused
    only if it was generated with exactly the same parameters.
    """
    wanted = generate_parameters(**options)
    existing = load_synthetic_manifest(out_dir)
    if (existing is not None and existing.manifest.get("parameters") == wanted
            and existing.manifest.get("format_version") == FORMAT_VERSION):
        return existing.train_dir, existing.image_root
    made = generate_synthetic_mmeb(out_dir, **options)
    return made.train_dir, made.image_root


def generate_parameters(*, num_train_per_subset: int = 256, num_eval_per_subset: int = 64, seed: int = 0,
                        image_size: int = 28, subsets: Optional[Sequence[str]] = None, num_hard_negatives: int = 2,
                        num_eval_candidates: int = 16, file_format: str = "parquet") -> Dict[str, Any]:
    """The parameter record `generate_synthetic_mmeb` stores in the manifest."""
    return dict(seed=seed, num_train_per_subset=num_train_per_subset, num_eval_per_subset=num_eval_per_subset,
                image_size=image_size, subsets=list(EVAL_SUBSETS) if subsets is None else list(subsets),
                num_hard_negatives=num_hard_negatives, num_eval_candidates=num_eval_candidates,
                file_format=file_format)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``llave-ds synth`` / ``python -m llave_ds.toy.synthetic``."""
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=256, help="train rows per subset")
    parser.add_argument("--num-eval", type=int, default=64, help="eval rows per subset")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--subsets", default=None, help="comma-separated, default: all of " + ",".join(EVAL_SUBSETS))
    parser.add_argument("--num-hard-negatives", type=int, default=2)
    parser.add_argument("--num-eval-candidates", type=int, default=16)
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print its paths as JSON."""
    try:
        made = generate_synthetic_mmeb(
            args.out_dir, num_train_per_subset=args.num_train, num_eval_per_subset=args.num_eval, seed=args.seed,
            image_size=args.image_size, subsets=args.subsets.split(",") if args.subsets else None,
            num_hard_negatives=args.num_hard_negatives, num_eval_candidates=args.num_eval_candidates,
            file_format=args.format)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(dict(train_dir=made.train_dir, eval_dir=made.eval_dir, image_root=made.image_root,
                          manifest=made.manifest_path), indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.toy.synthetic", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
