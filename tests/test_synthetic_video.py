"""llave_ds.toy.synthetic_video: determinism, one-attribute hard negatives, decodable clips whose pixels
match their captions, and a test split that needs the direction of motion."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from llave_ds.eval.retrieval_metrics import load_retrieval_split, retrieval_metrics
from llave_ds.media.video import read_video
from llave_ds.toy.synthetic import BACKGROUND, COLOURS
from llave_ds.toy.synthetic_video import (ALL_VIDEO_SPECS, OPPOSITE, VIDEO_ATTRIBUTES, VIDEO_FIELDS, Geometry,
                                          VideoSpec, differing_attributes, generate_synthetic_videos, render_video)

SMALL = dict(num_test=8, num_train_per_subset=4, num_hard_negatives=2, captions_per_video=2)


def tree_hashes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return generate_synthetic_videos(str(tmp_path_factory.mktemp("sv") / "out"), seed=3, **SMALL)


def motion(frames):
    """(colour name, mean displacement dx, dy) of the foreground across the clip, from pixels."""
    centres, colours = [], []
    for img in frames:
        arr = np.asarray(img).astype(int)
        fg = np.abs(arr - np.array(BACKGROUND)).sum(axis=2) > 60
        ys, xs = np.nonzero(fg)
        centres.append((xs.mean(), ys.mean()))
        colours.append(arr[fg].mean(axis=0))
    mean = np.mean(colours, axis=0)
    colour = min(COLOURS, key=lambda c: np.abs(mean - np.array(COLOURS[c])).sum())
    (x0, y0), (x1, y1) = centres[0], centres[-1]
    return colour, x1 - x0, y1 - y0


def direction_of(dx, dy):
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def test_same_seed_same_bytes_other_seed_differs(tmp_path, made):
    again = generate_synthetic_videos(str(tmp_path / "again"), seed=3, **SMALL)
    assert tree_hashes(again.root) == tree_hashes(made.root)
    other = generate_synthetic_videos(str(tmp_path / "other"), seed=4, **SMALL)
    assert tree_hashes(other.root) != tree_hashes(made.root)
    # a rerun into its own output replaces it; a foreign directory is refused
    generate_synthetic_videos(again.root, seed=3, **SMALL)
    assert tree_hashes(again.root) == tree_hashes(made.root)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not written by"):
        generate_synthetic_videos(str(foreign), **SMALL)


def test_reversed_twin_is_the_clip_played_backwards():
    g = Geometry(start=0.3, shift=1)
    for spec in ALL_VIDEO_SPECS[:16]:
        fwd = [np.asarray(f) for f in render_video(spec, g, num_frames=6)]
        back = [np.asarray(f) for f in render_video(spec.with_value("direction", OPPOSITE[spec.direction]), g,
                                                    num_frames=6)]
        assert all(np.array_equal(a, b) for a, b in zip(fwd, back[::-1]))
        assert not np.array_equal(fwd[0], fwd[-1])          # it does move


def test_clips_decode_and_show_their_caption(made):
    split = load_retrieval_split(made.test_file)
    records = read_jsonl(os.path.join(made.root, "attributes", "test.jsonl"))
    assert split.num_videos == 8 and split.num_captions == 16
    assert len(set(split.captions)) == 16                      # every caption has one right video
    specs = [VideoSpec.from_dict(r["spec"]) for r in records]
    assert len(set(specs)) == 8
    for v, spec in enumerate(specs):
        assert split.captions_of(v) == [spec.caption(0), spec.caption(1)]
        clip = read_video(split.videos[v])
        assert clip.info.total_frames == 8 and clip.info.fps == 8 and clip.frames[0].size == (32, 32)
        colour, dx, dy = motion(clip.frames)
        assert colour == spec.colour and direction_of(dx, dy) == spec.direction
        assert max(abs(dx), abs(dy)) >= 12                     # travels about half the frame


def test_test_split_is_built_of_direction_pairs(made):
    records = read_jsonl(os.path.join(made.root, "attributes", "test.jsonl"))
    for r in records:
        twin = records[r["reversed_twin"]]
        assert differing_attributes(VideoSpec.from_dict(r["spec"]), VideoSpec.from_dict(twin["spec"])) == ["direction"]
        assert twin["geometry"] == r["geometry"] and twin["reversed_twin"] == r["row"]
    # A scorer that sees everything but the direction cannot separate twins: strict ties -> R@1 = 0;
    # one that also sees the direction is perfect.
    split = load_retrieval_split(made.test_file)
    specs = [VideoSpec.from_dict(r["spec"]) for r in records]
    caption_specs = [specs[v] for v in split.caption_to_video]

    def score(attributes):
        return np.array([[sum(getattr(c, a) == getattr(v, a) for a in attributes) for v in specs]
                         for c in caption_specs], dtype=float)

    assert retrieval_metrics(score(VIDEO_ATTRIBUTES), split.caption_to_video)["t2v"]["R@1"] == 1.0
    blind = retrieval_metrics(score(("count", "colour", "shape")), split.caption_to_video)
    assert blind["t2v"]["R@1"] == 0.0 and blind["t2v"]["R@5"] == 1.0


def test_training_rows_and_one_attribute_hard_negatives(made):
    manifest = made.manifest
    assert manifest["integrated"] is True and manifest["video_fields"] == list(VIDEO_FIELDS)
    for subset, info in manifest["subsets"].items():
        rows = read_jsonl(os.path.join(made.root, info["train_file"]))
        records = read_jsonl(os.path.join(made.root, info["train_attributes"]))
        assert len(rows) == len(records) == 4
        for row, rec in zip(rows, records):
            assert set(row) == {"qry", "qry_image_path", "qry_video_path", "pos_text", "pos_image_path",
                                "pos_video_path", "neg_text", "neg_image_path", "neg_video_path"}
            pos = VideoSpec.from_dict(rec["positive"])
            negs = [VideoSpec.from_dict(n) for n in rec["negatives"]]
            assert len(negs) == 2 and rec["changed"][0] == "direction"
            for neg, changed in zip(negs, rec["changed"]):
                assert differing_attributes(pos, neg) == [changed]
            assert negs[0].direction == OPPOSITE[pos.direction]
            if info["kind"] == "t2v":
                paths = [row["pos_video_path"]] + row["neg_video_path"]
                assert row["qry_video_path"] == "" and row["qry"].startswith("Find a video of: ")
                assert any(row["qry"].endswith(pos.caption(t)) for t in range(3))
                for path, spec in zip(paths, [pos] + negs):
                    colour, dx, dy = motion(read_video(os.path.join(made.root, path)).frames)
                    assert (colour, direction_of(dx, dy)) == (spec.colour, spec.direction)
            else:
                assert os.path.isfile(os.path.join(made.root, row["qry_video_path"]))
                assert row["pos_video_path"] == "" and row["neg_video_path"] == ["", ""]
                t = [pos.caption(k) for k in range(3)].index(row["pos_text"])
                assert row["neg_text"] == [n.caption(t) for n in negs]


def test_frame_folders_are_exact(tmp_path):
    out = generate_synthetic_videos(str(tmp_path / "f"), num_test=2, num_train_per_subset=0, video_format="frames",
                                    num_frames=6, frame_size=48, seed=1)
    split = load_retrieval_split(out.test_file)
    a, b = (read_video(p) for p in split.videos)
    assert a.info.kind == "frames" and a.num_frames == 6 and a.frames[0].size == (48, 48)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.frames, b.frames[::-1]))
    assert not os.path.exists(os.path.join(out.root, "train", "SynthVideo_T2V.jsonl")) or \
        read_jsonl(os.path.join(out.root, "train", "SynthVideo_T2V.jsonl")) == []


@pytest.mark.parametrize("bad", [dict(num_test=145), dict(frame_size=33), dict(num_frames=1),
                                 dict(video_format="gif"), dict(captions_per_video=4), dict(num_hard_negatives=5),
                                 dict(subsets=["Nope"])])
def test_bad_parameters(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_synthetic_videos(str(tmp_path / "x"), **bad)
