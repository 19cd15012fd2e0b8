"""Deterministic, offline synthetic videos for text-video retrieval and (later) video training.

A clip shows 1-3 identical shapes moving together in one direction across a plain
background, described by four attributes: count, colour, shape (the vocabulary of
`llave_ds.toy.synthetic`) and direction (left / right / up / down): "two red squares moving
left". Direction is the video-only attribute: no single frame shows it.

Geometry: the shapes sit in a line across the motion axis and travel half the frame
along it; where the path starts is drawn per clip (``Geometry``). A clip and its
opposite-direction twin share the geometry, so the twin is *exactly* the clip played
backwards (same frames, reversed order): telling them apart needs frame order.

Outputs (under ``out_dir``; every path in a file is relative to ``out_dir``):

- ``test.jsonl``: the retrieval test split, one row per video:
  ``{"video": "videos/test/000000.mp4", "captions": ["two red squares moving left", ...]}``
  (`llave_ds.eval.retrieval_metrics.load_retrieval_split` reads it). It is built of direction pairs:
  for (nearly) every clip its time-reversed twin is also in the split, so R@1 needs the
  direction. Every clip has distinct attributes, so each caption has one right video.
- ``train/SynthVideo_T2V.jsonl`` (caption -> video) and ``train/SynthVideo_V2T.jsonl``
  (video -> caption): MMEB-train rows (``qry``, ``qry_image_path``, ``pos_text``,
  ``pos_image_path``, ``neg_text``, ``neg_image_path``) plus the video fields
  ``qry_video_path``, ``pos_video_path``, ``neg_video_path`` (a list, like
  ``neg_image_path``), "" for a side without video, and the placeholder
  `VIDEO_PLACEHOLDER` in the text of a video side; `llave_ds.data.mmeb_train` reads them (docs/DATA.md,
  "Video rows"). Hard negatives differ from the positive in exactly one attribute; the
  first is always the opposite direction (the time-reversed clip), further ones change
  another attribute (same geometry).
- ``videos/<split>/...``: ``.mp4`` files (H.264, yuv420p, written with PyAV) or, with
  ``video_format="frames"``, folders of PNG frames (``frame_000.png`` ...).
- ``attributes/test.jsonl`` and ``attributes/train/<subset>.jsonl``: the attributes and
  geometry of every clip; ``manifest.json``: parameters and layout.

Same seed and parameters -> byte-identical files (on one PyAV/FFmpeg build: the mp4s carry
the encoder's version string).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from llave_ds.formats import VIDEO_FIELDS, VIDEO_PLACEHOLDER
from llave_ds.toy.synthetic import BACKGROUND, COLOURS, COUNTS, SHAPES, _write_jsonl

# Written into manifests and part of every seed string: a stable name, not the module path
# (the module moved to llave_ds.toy; renaming this would change every generated clip).
GENERATOR = "llave_ds.synthetic_video"
FORMAT_VERSION = 1

DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
OPPOSITE: Dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}
VIDEO_ATTRIBUTES: Tuple[str, ...] = ("count", "colour", "shape", "direction")
VIDEO_ATTRIBUTE_VALUES: Dict[str, Tuple[Any, ...]] = {
    "count": COUNTS, "colour": tuple(COLOURS), "shape": SHAPES, "direction": DIRECTIONS}
VIDEO_FORMATS: Tuple[str, ...] = ("mp4", "frames")
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

# VIDEO_PLACEHOLDER and VIDEO_FIELDS (the MMEB-train row fields carrying a side's video,
# paths relative to the data root) are llave_ds.formats'.
T2V_QUERY = "Find a video of: {caption}"
VIDEO_TARGET = VIDEO_PLACEHOLDER + "\nRepresent the video."
V2T_QUERY = VIDEO_PLACEHOLDER + "\nFind a caption for this video."
# subset -> kind
SUBSETS: Dict[str, str] = {"SynthVideo_T2V": "t2v", "SynthVideo_V2T": "v2t"}
MAX_HARD_NEGATIVES = len(VIDEO_ATTRIBUTES)
MAX_CAPTIONS_PER_VIDEO = 3
TRAVEL = 0.5  # fraction of the frame the shapes travel along the motion axis


@dataclass(frozen=True)
class VideoSpec:
    """What a clip shows: ``count`` identical ``colour`` ``shape``s moving ``direction``."""
    count: int
    colour: str
    shape: str
    direction: str

    def caption(self, template: int = 0) -> str:
        """One of `MAX_CAPTIONS_PER_VIDEO` phrasings, each naming all four attributes."""
        noun = self.shape if self.count == 1 else self.shape + "s"
        amount = "a" if self.count == 1 else _COUNT_WORDS[self.count]
        subject = f"{amount} {self.colour} {noun}"
        if template == 0:
            return f"{subject} moving {self.direction}"
        if template == 1:
            verb = "moves" if self.count == 1 else "move"
            where = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}
            return f"{subject} {verb} {where[self.direction]}"
        if template == 2:
            return f"{subject} going {self.direction}"
        raise ValueError(f"caption template must be in [0, {MAX_CAPTIONS_PER_VIDEO}), got {template}")

    def captions(self, k: int) -> List[str]:
        return [self.caption(t) for t in range(k)]

    def with_value(self, attribute: str, value: Any) -> "VideoSpec":
        return replace(self, **{attribute: value})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VideoSpec":
        return cls(count=int(d["count"]), colour=d["colour"], shape=d["shape"], direction=d["direction"])


ALL_VIDEO_SPECS: Tuple[VideoSpec, ...] = tuple(
    VideoSpec(n, c, s, d) for n in COUNTS for c in COLOURS for s in SHAPES for d in DIRECTIONS)


@dataclass(frozen=True)
class Geometry:
    """Where the path lies: ``start`` in [0, 1] places the path's low end (0: at the frame's
    low edge, 1: as far as the path allows); ``shift`` moves the line of shapes across the
    motion axis by that many pixels."""
    start: float
    shift: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def differing_attributes(a: VideoSpec, b: VideoSpec) -> List[str]:
    """Names of the attributes in which two clips differ."""
    return [name for name in VIDEO_ATTRIBUTES if getattr(a, name) != getattr(b, name)]


def hard_negative(spec: VideoSpec, attribute: str, rng: random.Random) -> VideoSpec:
    """``spec`` with one attribute changed: the opposite direction, or another value drawn by ``rng``."""
    if attribute == "direction":
        return spec.with_value("direction", OPPOSITE[spec.direction])
    if attribute not in VIDEO_ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {list(VIDEO_ATTRIBUTES)}")
    return spec.with_value(attribute, rng.choice([v for v in VIDEO_ATTRIBUTE_VALUES[attribute]
                                                  if v != getattr(spec, attribute)]))


def random_geometry(rng: random.Random, size: int) -> Geometry:
    jitter = max(1, size // 32)
    return Geometry(start=round(rng.random(), 6), shift=rng.randint(-jitter, jitter))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, radius: int, colour) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)


def render_video(spec: VideoSpec, geometry: Geometry = Geometry(0.5), *, size: int = 32,
                 num_frames: int = 8) -> List[Image.Image]:
    """The clip's frames (RGB, ``size`` x ``size``), drawn with `llave_ds.toy.synthetic`'s colours.

    Frame ``t`` of a clip equals frame ``num_frames - 1 - t`` of its opposite-direction
    twin with the same geometry (positions are computed symmetrically, then rounded).
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 to show motion, got {num_frames}")
    radius = max(2, round(size * 0.12))
    lo_min, lo_max = radius, size - 1 - radius          # valid centre coordinates
    travel = size * TRAVEL
    low = lo_min + geometry.start * max(0.0, (lo_max - lo_min) - travel)
    horizontal = spec.direction in ("left", "right")
    increasing = spec.direction in ("right", "down")    # image y grows downwards
    colour = COLOURS[spec.colour]
    frames = []
    for t in range(num_frames):
        step = t if increasing else num_frames - 1 - t
        along = int(round(low + travel * step / (num_frames - 1)))
        along = min(max(along, lo_min), lo_max)
        img = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for k in range(spec.count):
            across = int(round(size * (k + 0.5) / spec.count)) + geometry.shift
            across = min(max(across, lo_min), lo_max)
            cx, cy = (along, across) if horizontal else (across, along)
            _draw_shape(draw, spec.shape, cx, cy, radius, colour)
        frames.append(img)
    return frames


# --------------------------------------------------------------------------- writing clips

# Constant quantiser, fixed B-frame pattern, no scene-cut / weighted-prediction analysis: x264's
# low-resolution lookahead (used by CRF, adaptive B-frames, scene cuts, mb-tree) made the
# bytes of these tiny clips vary from run to run; without it they are stable.
_X264_OPTIONS = {"preset": "medium", "x264-params": "b-adapt=0:scenecut=0:weightp=0"}


def write_mp4(frames: Sequence[Image.Image], path: str, fps: int = 8, qp: int = 10) -> str:
    """Encode RGB frames as an H.264 (yuv420p) mp4 with PyAV; byte-stable (single-threaded x264
    at constant quantiser ``qp``, explicit frame timestamps). Width and height must be even."""
    import av
    import numpy as np

    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"mp4 (yuv420p) needs even frame sizes, got {width}x{height}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = dict(_X264_OPTIONS, qp=str(qp))
        for t, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(img.convert("RGB"), dtype=np.uint8), format="rgb24")
            # Explicit timestamps: left unset, PyAV's stand-ins make the bitstream vary between runs.
            frame.pts, frame.time_base = t, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(frames: Sequence[Image.Image], folder: str) -> str:
    """Write frames as ``folder/frame_000.png`` ... (read back in name order)."""
    os.makedirs(folder, exist_ok=True)
    for t, img in enumerate(frames):
        img.save(os.path.join(folder, f"frame_{t:03d}.png"), format="PNG")
    return folder


class _ClipWriter:
    def __init__(self, root: str, size: int, num_frames: int, fps: int, video_format: str):
        self.root, self.size, self.num_frames, self.fps, self.video_format = root, size, num_frames, fps, video_format

    def write(self, spec: VideoSpec, geometry: Geometry, rel_stem: str) -> str:
        frames = render_video(spec, geometry, size=self.size, num_frames=self.num_frames)
        if self.video_format == "mp4":
            rel = rel_stem + ".mp4"
            write_mp4(frames, os.path.join(self.root, rel), fps=self.fps)
        else:
            rel = rel_stem
            write_frame_folder(frames, os.path.join(self.root, rel))
        return rel


# --------------------------------------------------------------------------- generation

@dataclass
class SyntheticVideos:
    """Where a generated dataset lives (absolute paths) and its manifest."""
    root: str
    test_file: str
    train_dir: str
    manifest_path: str
    manifest: Dict[str, Any] = field(default_factory=dict)


def _test_specs(rng: random.Random, num_test: int) -> List[Tuple[VideoSpec, int]]:
    """``num_test`` distinct clips in direction pairs: (spec, pair id), shuffled."""
    keys = [(n, c, s, axis) for n in COUNTS for c in COLOURS for s in SHAPES for axis in (("left", "right"),
                                                                                       ("up", "down"))]
    chosen = rng.sample(keys, math.ceil(num_test / 2))
    specs: List[Tuple[VideoSpec, int]] = []
    for pair, (n, c, s, axis) in enumerate(chosen):
        first = rng.randrange(2)
        for d in (axis[first], axis[1 - first]):
            specs.append((VideoSpec(n, c, s, d), pair))
    specs = specs[:num_test]
    rng.shuffle(specs)
    return specs


def _train_row(kind: str, spec: VideoSpec, geometry: Geometry, rng: random.Random, k: int, clips: _ClipWriter,
               prefix: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    others = [a for a in VIDEO_ATTRIBUTES if a != "direction"]
    attributes = (["direction"] + rng.sample(others, k - 1)) if k else []
    negatives = [hard_negative(spec, a, rng) for a in attributes]
    caption = spec.caption(rng.randrange(MAX_CAPTIONS_PER_VIDEO))
    if kind == "t2v":
        row = dict(qry=T2V_QUERY.format(caption=caption), qry_image_path="", qry_video_path="",
                   pos_text=VIDEO_TARGET, pos_image_path="", pos_video_path=clips.write(spec, geometry, f"{prefix}_p"),
                   neg_text=[VIDEO_TARGET] * k, neg_image_path=[""] * k,
                   neg_video_path=[clips.write(n, geometry, f"{prefix}_n{j}") for j, n in enumerate(negatives)])
    else:
        template = rng.randrange(MAX_CAPTIONS_PER_VIDEO)
        row = dict(qry=V2T_QUERY, qry_image_path="", qry_video_path=clips.write(spec, geometry, f"{prefix}_q"),
                   pos_text=spec.caption(template), pos_image_path="", pos_video_path="",
                   neg_text=[n.caption(template) for n in negatives], neg_image_path=[""] * k,
                   neg_video_path=[""] * k)
    record = dict(kind=kind, positive=spec.to_dict(), negatives=[n.to_dict() for n in negatives],
                  changed=attributes, geometry=geometry.to_dict())
    return row, record


_OWNED = ("manifest.json", "test.jsonl", "train", "videos", "attributes")


def _clear_output_dir(out_dir: str) -> None:
    """Make ``out_dir`` empty of our files; refuse to touch a directory we did not write."""
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
        return
    if not os.listdir(out_dir):
        return
    try:
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as fh:
            ours = json.load(fh).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
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


def generate_parameters(*, num_test: int = 32, num_train_per_subset: int = 64, seed: int = 0, frame_size: int = 32,
                        num_frames: int = 8, fps: int = 8, video_format: str = "mp4", captions_per_video: int = 1,
                        num_hard_negatives: int = 1, subsets: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The parameter record `generate_synthetic_videos` stores in the manifest."""
    return dict(num_test=num_test, num_train_per_subset=num_train_per_subset, seed=seed, frame_size=frame_size,
                num_frames=num_frames, fps=fps, video_format=video_format, captions_per_video=captions_per_video,
                num_hard_negatives=num_hard_negatives, subsets=list(SUBSETS) if subsets is None else list(subsets))


def generate_synthetic_videos(out_dir: str, *, num_test: int = 32, num_train_per_subset: int = 64, seed: int = 0,
                              frame_size: int = 32, num_frames: int = 8, fps: int = 8, video_format: str = "mp4",
                              captions_per_video: int = 1, num_hard_negatives: int = 1,
                              subsets: Optional[Sequence[str]] = None) -> SyntheticVideos:
    """Write the synthetic video retrieval test split and training rows under ``out_dir``.

    num_test: test videos (<= 144, the distinct attribute combinations; 0: no test split);
    num_train_per_subset: rows per training subset (0: none); captions_per_video: 1-3
    phrasings per test video (MSR-VTT style: 1; MSVD style: several); num_hard_negatives:
    0-4 per training row (the first is always the opposite direction). ``out_dir`` must be
    empty, new, or an earlier output of this function (then it is replaced).
    """
    subsets = list(SUBSETS) if subsets is None else list(subsets)
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ValueError(f"unknown synthetic video subset(s) {unknown}; available: {list(SUBSETS)}")
    if not 0 <= num_test <= len(ALL_VIDEO_SPECS):
        raise ValueError(f"num_test must be in [0, {len(ALL_VIDEO_SPECS)}], got {num_test}")
    if num_train_per_subset < 0:
        raise ValueError(f"num_train_per_subset must be >= 0, got {num_train_per_subset}")
    if frame_size < 16 or frame_size > 256 or frame_size % 2:
        raise ValueError(f"frame_size must be even and in [16, 256], got {frame_size}")
    if not 2 <= num_frames <= 256:
        raise ValueError(f"num_frames must be in [2, 256], got {num_frames}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format must be one of {list(VIDEO_FORMATS)}, got {video_format!r}")
    if not 1 <= captions_per_video <= MAX_CAPTIONS_PER_VIDEO:
        raise ValueError(f"captions_per_video must be in [1, {MAX_CAPTIONS_PER_VIDEO}], got {captions_per_video}")
    if not 0 <= num_hard_negatives <= MAX_HARD_NEGATIVES:
        raise ValueError(f"num_hard_negatives must be in [0, {MAX_HARD_NEGATIVES}], got {num_hard_negatives}")

    _clear_output_dir(out_dir)
    clips = _ClipWriter(out_dir, frame_size, num_frames, fps, video_format)
    parameters = generate_parameters(num_test=num_test, num_train_per_subset=num_train_per_subset, seed=seed,
                                     frame_size=frame_size, num_frames=num_frames, fps=fps,
                                     video_format=video_format, captions_per_video=captions_per_video,
                                     num_hard_negatives=num_hard_negatives, subsets=subsets)
    manifest: Dict[str, Any] = dict(
        generator=GENERATOR, format_version=FORMAT_VERSION, parameters=parameters, test_file="test.jsonl",
        test_attributes="attributes/test.jsonl", train_dir="train", data_root=".", video_format=video_format,
        frame_size=frame_size, num_frames=num_frames, fps=fps, video_placeholder=VIDEO_PLACEHOLDER,
        video_fields=list(VIDEO_FIELDS), integrated=True,
        attributes={k: list(v) for k, v in VIDEO_ATTRIBUTE_VALUES.items()}, subsets={})

    # Test split: direction pairs sharing one geometry (twins are time-reversed copies).
    rng = random.Random(f"{GENERATOR}/{seed}/test")
    geometries: Dict[int, Geometry] = {}
    rows, records = [], []
    for i, (spec, pair) in enumerate(_test_specs(rng, num_test)):
        geometry = geometries.setdefault(pair, random_geometry(rng, frame_size))
        video = clips.write(spec, geometry, f"videos/test/{i:06d}")
        rows.append(dict(video=video, captions=spec.captions(captions_per_video)))
        records.append(dict(row=i, video=video, spec=spec.to_dict(), geometry=geometry.to_dict(), pair=pair))
    twins = {}
    for r in records:
        twins.setdefault(r["pair"], []).append(r["row"])
    for r in records:
        others = [j for j in twins[r["pair"]] if j != r["row"]]
        r["reversed_twin"] = others[0] if others else None
    _write_jsonl(rows, os.path.join(out_dir, "test.jsonl"))
    _write_jsonl(records, os.path.join(out_dir, "attributes", "test.jsonl"))
    manifest["num_test"] = len(rows)

    for subset in subsets:
        kind = SUBSETS[subset]
        rng = random.Random(f"{GENERATOR}/{seed}/train/{subset}")
        rows, records = [], []
        for i in range(num_train_per_subset):
            spec = rng.choice(ALL_VIDEO_SPECS)
            geometry = random_geometry(rng, frame_size)
            row, record = _train_row(kind, spec, geometry, rng, num_hard_negatives, clips,
                                     f"videos/train/{subset}/{i:06d}")
            rows.append(row)
            records.append(dict(row=i, **record))
        data_file = f"train/{subset}.jsonl"
        attributes_file = f"attributes/train/{subset}.jsonl"
        _write_jsonl(rows, os.path.join(out_dir, data_file))
        _write_jsonl(records, os.path.join(out_dir, attributes_file))
        manifest["subsets"][subset] = dict(kind=kind, train_rows=num_train_per_subset, train_file=data_file,
                                           train_attributes=attributes_file)
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
    root = os.path.abspath(out_dir)
    return SyntheticVideos(root=root, test_file=os.path.join(root, "test.jsonl"),
                           train_dir=os.path.join(root, "train"), manifest_path=os.path.join(root, "manifest.json"),
                           manifest=manifest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m llave_ds.toy.synthetic_video``."""
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-test", type=int, default=32, help="test videos (max 144)")
    parser.add_argument("--num-train", type=int, default=64, help="training rows per subset")
    parser.add_argument("--frame-size", type=int, default=32)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--video-format", choices=VIDEO_FORMATS, default="mp4")
    parser.add_argument("--captions-per-video", type=int, default=1)
    parser.add_argument("--num-hard-negatives", type=int, default=1)
    parser.add_argument("--subsets", default=None, help="comma-separated, default: all of " + ",".join(SUBSETS))


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print its paths as JSON."""
    try:
        made = generate_synthetic_videos(
            args.out_dir, num_test=args.num_test, num_train_per_subset=args.num_train, seed=args.seed,
            frame_size=args.frame_size, num_frames=args.num_frames, fps=args.fps, video_format=args.video_format,
            captions_per_video=args.captions_per_video, num_hard_negatives=args.num_hard_negatives,
            subsets=args.subsets.split(",") if args.subsets else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(dict(test_file=made.test_file, train_dir=made.train_dir, manifest=made.manifest_path), indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llave_ds.toy.synthetic_video", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
