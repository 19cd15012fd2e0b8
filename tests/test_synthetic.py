"""llave_ds.toy.synthetic: determinism, one-attribute hard negatives, MMEB-eval rows, loading."""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llave_ds.data.mmeb_train import MMEBTrainDataset
from llave_ds.toy import synthetic as syn
from llave_ds.toy.synthetic import (ALL_SCENES, ATTRIBUTES, BACKGROUND, COLOURS, EVAL_SUBSETS, HARD_EVAL_SUBSETS,
                                    SHAPES, SUBSETS, SceneSpec, differing_attributes, generate_synthetic_mmeb,
                                    one_attribute_neighbours, prepare_synthetic_mmeb, render_scene)


def tree_hashes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def read_rows(path):
    if path.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def read_records(made, split, subset):
    return read_rows(os.path.join(made.root, made.manifest["subsets"][subset][f"{split}_attributes"]))


def spec(d):
    return SceneSpec.from_dict(d)


def scene_summary(path):
    """(dominant colour name, half of the image holding the shapes) read back from pixels."""
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    fg = np.abs(arr - np.array(BACKGROUND)).sum(axis=2) > 30
    ys, xs = np.nonzero(fg)
    mean = arr[fg].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.abs(mean - np.array(COLOURS[c])).sum())
    h, w = fg.shape
    cx, cy = xs.mean() / w, ys.mean() / h
    if abs(cx - 0.5) > abs(cy - 0.5):
        half = "left" if cx < 0.5 else "right"
    else:
        half = "top" if cy < 0.5 else "bottom"
    return colour, half


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return generate_synthetic_mmeb(str(tmp_path_factory.mktemp("synth")), num_train_per_subset=48,
                                   num_eval_per_subset=16, seed=11)


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    kw = dict(num_train_per_subset=12, num_eval_per_subset=4)
    a = tree_hashes(generate_synthetic_mmeb(str(tmp_path / "a"), seed=3, **kw).root)
    b = tree_hashes(generate_synthetic_mmeb(str(tmp_path / "b"), seed=3, **kw).root)
    c = tree_hashes(generate_synthetic_mmeb(str(tmp_path / "c"), seed=4, **kw).root)
    assert len(a) > 50 and a == b
    assert a != c
    differing = {k for k in a if a[k] != c.get(k)}
    assert "train/Synth_I2T.parquet" in differing and "eval/Synth_T2I.parquet" in differing
    # Regenerating into a directory it wrote before gives the same tree (stale files removed).
    generate_synthetic_mmeb(str(tmp_path / "a"), seed=3, num_train_per_subset=20, num_eval_per_subset=4)
    assert tree_hashes(generate_synthetic_mmeb(str(tmp_path / "a"), seed=3, **kw).root) == a


def test_default_size_is_fast_and_manifest_counts(tmp_path):
    start = time.perf_counter()
    made = generate_synthetic_mmeb(str(tmp_path / "d"), seed=0)  # 4 subsets x (256 train + 64 eval)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"generation took {elapsed:.1f}s"
    manifest = json.load(open(made.manifest_path))
    assert manifest == made.manifest
    assert set(manifest["subsets"]) == set(EVAL_SUBSETS) == set(SUBSETS) | set(HARD_EVAL_SUBSETS)
    for subset, entry in manifest["subsets"].items():
        assert entry["kind"] == EVAL_SUBSETS[subset][0]
        assert entry["eval_rows"] == 64
        assert len(read_rows(os.path.join(made.root, entry["eval_file"]))) == 64
        if subset in HARD_EVAL_SUBSETS:  # eval only
            assert "train_rows" not in entry and not os.path.exists(os.path.join(made.train_dir, subset + ".parquet"))
        else:
            assert entry["train_rows"] == 256
            assert len(read_rows(os.path.join(made.root, entry["train_file"]))) == 256
    assert not any(os.path.isabs(str(v)) for e in manifest["subsets"].values() for v in e.values())


def test_train_negatives_differ_in_exactly_one_attribute(made):
    for subset, (kind, _) in SUBSETS.items():
        rows = read_rows(os.path.join(made.train_dir, f"{subset}.parquet"))
        records = read_records(made, "train", subset)
        assert len(rows) == len(records) == 48
        changed = set()
        for row, rec in zip(rows, records):
            pos = spec(rec["positive"])
            negs = [spec(n) for n in rec["negatives"]]
            assert len(negs) == 2 and len(set(negs)) == 2
            for neg in negs:
                diff = differing_attributes(pos, neg)
                assert len(diff) == 1, (subset, rec)
                changed.add(diff[0])
                if kind in ("classification", "vqa"):
                    assert diff == [rec["attribute"]]
            # The row's texts and images are those of the recorded scenes.
            if kind == "i2t":
                assert row["pos_text"] == pos.caption() and row["neg_text"] == [n.caption() for n in negs]
                assert scene_summary(os.path.join(made.image_root, row["qry_image_path"])) == (pos.colour,
                                                                                              pos.position)
            elif kind == "t2i":
                assert pos.caption() in row["qry"] and row["qry_image_path"] == ""
                for path, scene in zip([row["pos_image_path"]] + row["neg_image_path"], [pos] + negs):
                    assert scene_summary(os.path.join(made.image_root, path)) == (scene.colour, scene.position)
            else:
                assert row["pos_text"] == pos.answer(rec["attribute"])
                assert row["neg_text"] == [n.answer(rec["attribute"]) for n in negs]
                assert row["qry"].startswith("<|image_1|>") and row["qry_image_path"]
        if kind in ("i2t", "t2i", "vqa"):
            assert changed == set(ATTRIBUTES), (subset, changed)
        else:
            assert changed == {"shape"}


def test_eval_split_is_mmeb_eval_with_ground_truth_first(made):
    for subset, (kind, _) in SUBSETS.items():
        rows = read_rows(os.path.join(made.eval_dir, f"{subset}.parquet"))
        records = read_records(made, "eval", subset)
        assert len(rows) == 16
        for row, rec in zip(rows, records):
            assert set(row) == {"qry_text", "qry_img_path", "tgt_text", "tgt_img_path"}
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) == len(rec["candidates"])
            cands = [spec(c) for c in rec["candidates"]]
            pos = spec(rec["positive"])
            assert cands[0] == pos and len(set(cands)) == len(cands)
            if kind in ("i2t", "t2i"):
                assert len(cands) == 16
                one_off = [c for c in cands[1:] if len(differing_attributes(pos, c)) == 1]
                assert {differing_attributes(pos, c)[0] for c in one_off} == set(ATTRIBUTES)
            if kind == "i2t":
                assert row["tgt_text"] == [c.caption() for c in cands] and row["qry_img_path"]
            elif kind == "t2i":
                assert pos.caption() in row["qry_text"] and row["qry_img_path"] == ""
                assert scene_summary(os.path.join(made.image_root, row["tgt_img_path"][0])) == (pos.colour,
                                                                                               pos.position)
            elif kind == "classification":
                assert row["tgt_text"][0] == pos.shape and sorted(row["tgt_text"]) == sorted(SHAPES)
            else:
                answers = row["tgt_text"]
                assert answers[0] == pos.answer(rec["attribute"]) and len(set(answers)) == len(answers)
                assert len(answers) == len(syn.ATTRIBUTE_VALUES[rec["attribute"]])


def test_hard_eval_subsets_are_the_truth_and_all_its_one_attribute_neighbours(made):
    """Synth_I2T_Hard / Synth_T2I_Hard: every negative candidate differs from the truth in
    exactly one attribute, all ten such scenes are there, no random scene is."""
    assert len(one_attribute_neighbours(ALL_SCENES[5])) == 10
    for subset, (kind, _) in HARD_EVAL_SUBSETS.items():
        assert made.manifest["subsets"][subset]["candidates"] == "one_attribute_neighbours"
        rows = read_rows(os.path.join(made.eval_dir, f"{subset}.parquet"))
        records = read_records(made, "eval", subset)
        assert len(rows) == len(records) == 16
        orders = set()
        for row, rec in zip(rows, records):
            pos = spec(rec["positive"])
            cands = [spec(c) for c in rec["candidates"]]
            assert cands[0] == pos and len(cands) == 11 and len(set(cands)) == 11
            assert all(len(differing_attributes(pos, c)) == 1 for c in cands[1:])
            assert set(cands[1:]) == set(one_attribute_neighbours(pos))
            assert sorted(differing_attributes(pos, c)[0] for c in cands[1:]) == sorted(
                ["count"] * 2 + ["colour"] * 3 + ["shape"] * 2 + ["position"] * 3)
            orders.add(tuple(differing_attributes(pos, c)[0] for c in cands[1:]))
            if kind == "i2t":
                assert row["qry_text"] == syn.I2T_QUERY and row["qry_img_path"]
                assert row["tgt_text"] == [c.caption() for c in cands]
                assert scene_summary(os.path.join(made.image_root, row["qry_img_path"])) == (pos.colour, pos.position)
            else:
                assert row["qry_text"] == syn.T2I_QUERY.format(caption=pos.caption()) and row["qry_img_path"] == ""
                assert row["tgt_text"] == [syn.IMAGE_TARGET] * 11 and len(set(row["tgt_img_path"])) == 11
                for path, scene in zip(row["tgt_img_path"], cands):
                    assert scene_summary(os.path.join(made.image_root, path)) == (scene.colour, scene.position)
        assert len(orders) > 1  # the neighbours are shuffled, not in a fixed order after the truth


@pytest.mark.parametrize("file_format", ["parquet", "jsonl"])
def test_train_split_loads_through_mmeb_train_dataset(tmp_path, file_format):
    made = generate_synthetic_mmeb(str(tmp_path / "s"), num_train_per_subset=8, num_eval_per_subset=2, seed=1,
                                   file_format=file_format)
    ds = MMEBTrainDataset(made.train_config(cache_dir=str(tmp_path / "cache")))
    assert len(ds) == 32 and list(ds.subset_ranges) == sorted(SUBSETS)
    assert ds.skip_counts == {}
    for start, _ in ds.subset_ranges.values():
        pair = ds[start]
        assert len(pair.negatives) == 2
        sides = [pair.query, pair.target] + pair.negatives
        assert any(s.image is not None for s in sides)
        assert all(s.image.size == (28, 28) for s in sides if s.image is not None)
    t2i = ds[ds.subset_ranges["Synth_T2I"][0]]
    assert t2i.query.image is None and t2i.target.image is not None and all(n.image for n in t2i.negatives)


def test_render_scene_draws_the_attributes():
    for scene in ALL_SCENES[::7]:
        img = render_scene(scene, 56)
        assert img.size == (56, 56) and img.mode == "RGB"
        arr = np.asarray(img).astype(int)
        fg = np.abs(arr - np.array(BACKGROUND)).sum(axis=2) > 30
        assert fg.any()
    one = np.asarray(render_scene(SceneSpec(1, "red", "square", "left"), 28)).astype(int)
    three = np.asarray(render_scene(SceneSpec(3, "red", "square", "left"), 28)).astype(int)
    count = lambda a: int((np.abs(a - np.array(BACKGROUND)).sum(axis=2) > 30).sum())  # noqa: E731
    assert count(three) == 3 * count(one)
    assert SceneSpec(2, "blue", "circle", "top").caption() == "two blue circles at the top"
    assert SceneSpec(1, "red", "triangle", "left").caption() == "a red triangle on the left"


def test_refuses_foreign_directories_and_bad_options(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and was not written by"):
        generate_synthetic_mmeb(str(foreign), num_train_per_subset=2, num_eval_per_subset=1)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="num_hard_negatives"):
        generate_synthetic_mmeb(str(tmp_path / "x"), num_hard_negatives=3)
    with pytest.raises(ValueError, match=r"unknown synthetic subset\(s\) \['Nope'\]"):
        generate_synthetic_mmeb(str(tmp_path / "x"), subsets=["Nope"])


def test_prepare_reuses_identical_generation_and_cli(tmp_path, capsys):
    out = str(tmp_path / "p")
    train_dir, image_root = prepare_synthetic_mmeb(out, num_train_per_subset=4, num_eval_per_subset=2, seed=5)
    assert train_dir == os.path.join(out, "train") and image_root == out
    stamp = os.stat(os.path.join(out, "manifest.json")).st_mtime_ns
    assert prepare_synthetic_mmeb(out, num_train_per_subset=4, num_eval_per_subset=2, seed=5) == (train_dir, image_root)
    assert os.stat(os.path.join(out, "manifest.json")).st_mtime_ns == stamp
    prepare_synthetic_mmeb(out, num_train_per_subset=4, num_eval_per_subset=2, seed=6)
    assert json.load(open(os.path.join(out, "manifest.json")))["parameters"]["seed"] == 6

    assert syn.main([str(tmp_path / "cli"), "--num-train", "3", "--num-eval", "1", "--subsets", "Synth_VQA",
                     "--format", "jsonl"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert os.path.isfile(os.path.join(printed["train_dir"], "Synth_VQA.jsonl"))
    assert syn.main([str(tmp_path / "cli2"), "--subsets", "Nope"]) == 2
