"""llave_ds.data.mmeb_train: MMEB-train loading, bad-input policy, sampler, collator, DataLoader."""
from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from llave_ds.data.batching import GlobalBatchSampler, PairCollator, TrainBatch
from llave_ds.data.errors import DataError
from llave_ds.data.mmeb_train import MMEBTrainDataset, Pair, TrainDataConfig
from llave_ds.media.files import MediaError
from llave_ds.media.image import load_image
from llave_ds.media.side import Side

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


# --------------------------------------------------------------------------- fixtures

def write_png(path, colour=(255, 0, 0), size=(8, 6), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour).save(path, format="PNG")


def mmeb_row(subset, i, *, negatives=0, list_negatives=False):
    """Even rows: image query -> text target; odd rows: text query -> image target."""
    if i % 2 == 0:
        row = dict(qry=f"<|image_1|>\n{subset} question {i}", qry_image_path=f"images/{subset}/{i}.png",
                   pos_text=f"{subset} answer {i}", pos_image_path="")
    else:
        row = dict(qry=f"{subset} caption {i}", qry_image_path="",
                   pos_text="<|image_1|>\nRepresent the image.", pos_image_path=f"images/{subset}/{i}.png")
    if negatives:
        texts = [f"{subset} wrong {i}.{j}" for j in range(negatives)]
        paths = [f"images/{subset}/neg{i}.{j}.png" for j in range(negatives)]
        if list_negatives:
            row.update(neg_text=texts, neg_image_path=paths)
        else:  # MMEB-train: one negative as plain strings
            row.update(neg_text=texts[0], neg_image_path=paths[0])
    return row


def write_images_for(root, rows):
    for i, row in enumerate(rows):
        paths = [row.get("qry_image_path"), row.get("pos_image_path")]
        neg = row.get("neg_image_path")
        paths += neg if isinstance(neg, list) else [neg]
        for p in paths:
            if isinstance(p, str) and p and not os.path.isabs(p) and ".." not in p:
                full = os.path.join(root, p)
                if not os.path.exists(full):
                    write_png(full, COLOURS[i % len(COLOURS)], size=(8 + i % 5, 6))


def write_subset(root, subset, rows, fmt="parquet", layout="flat", split="original"):
    if layout == "flat":
        path = os.path.join(root, f"{subset}.{fmt}")
    elif layout == "split":
        path = os.path.join(root, subset, f"{split}.{fmt}")
    elif layout == "hf_shards":
        path = os.path.join(root, subset, f"{split}-00000-of-00001.{fmt}")
    else:  # "dir": <S>/*.parquet not named after a split
        path = os.path.join(root, subset, f"part0.{fmt}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return path


def make_source(tmp_path, sizes=None, fmt="parquet", layout="flat", negatives=0, list_negatives=False):
    root = tmp_path / "mmeb"
    root.mkdir(exist_ok=True)
    sizes = sizes or {"Alpha": 6, "Beta": 4}
    for subset, n in sizes.items():
        rows = [mmeb_row(subset, i, negatives=negatives, list_negatives=list_negatives) for i in range(n)]
        write_subset(str(root), subset, rows, fmt, layout)
        write_images_for(str(root), rows)
    return root


def config(tmp_path, root, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "hf_cache"))
    return TrainDataConfig(source=str(root), **kw)


def fake_formatter(sides, role):
    """Stands in for llave_ds.model.formatter: text lengths, first char code, image pixel sums."""
    return {
        "text_len": torch.tensor([len(s.text) for s in sides]),
        "first_char": torch.tensor([ord(s.text[0]) if s.text else 0 for s in sides]),
        "pixel_sum": torch.tensor([int(np.asarray(s.image).sum()) if s.image is not None else -1 for s in sides]),
        "is_query": torch.tensor([role == "query"] * len(sides)),
    }


class RecordingFormatter:
    def __init__(self):
        self.calls = []

    def __call__(self, sides, role):
        self.calls.append((role, [s.text for s in sides]))
        return {"n": torch.tensor([len(sides)])}


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_loads_both_formats_with_lazy_rgb_images(tmp_path, fmt):
    root = make_source(tmp_path, fmt=fmt)
    ds = MMEBTrainDataset(config(tmp_path, root))
    assert len(ds) == 10
    assert ds.subset_ranges == {"Alpha": (0, 6), "Beta": (6, 10)}
    p0 = ds[0]
    assert isinstance(p0, Pair) and (p0.subset, p0.row) == ("Alpha", 0)
    assert p0.query.text == "<|image_1|>\nAlpha question 0" and p0.query.image_path == "images/Alpha/0.png"
    assert p0.query.image.mode == "RGB" and p0.query.image.size == (8, 6)
    assert p0.query.image.getpixel((0, 0)) == COLOURS[0]
    assert p0.target == Side(text="Alpha answer 0", image_path=None, image=None)
    assert p0.negatives == []
    p7 = ds[7]  # Beta row 1: text query, image target
    assert (p7.subset, p7.row) == ("Beta", 1)
    assert p7.query.image is None and p7.query.image_path is None
    assert p7.target.image.size == (9, 6) and p7.target.image.getpixel((0, 0)) == COLOURS[1]
    assert ds.locate(7) == ("Beta", 1)
    with pytest.raises(IndexError):
        ds[10]


@pytest.mark.parametrize("layout", ["split", "hf_shards", "dir"])
def test_directory_layouts(tmp_path, layout):
    root = make_source(tmp_path, layout=layout, sizes={"Alpha": 3})
    ds = MMEBTrainDataset(config(tmp_path, root))
    assert len(ds) == 3 and ds.subsets == ["Alpha"]
    assert ds[1].target.image is not None


def test_hf_tree_picks_the_requested_split(tmp_path):
    """MMEB-train from the hub: <S>/original-*.parquet and <S>/diverse_instruction-*.parquet."""
    root = tmp_path / "mmeb"
    write_subset(str(root), "Alpha", [mmeb_row("Alpha", 0)], layout="hf_shards", split="original")
    rows = [dict(mmeb_row("Alpha", 0), qry="<|image_1|>\nreworded"), mmeb_row("Alpha", 2)]
    write_subset(str(root), "Alpha", rows, layout="hf_shards", split="diverse_instruction")
    write_images_for(str(root), rows)
    (root / "images_zip").mkdir()  # present in a real download; not a subset
    assert len(MMEBTrainDataset(config(tmp_path, root))) == 1
    ds = MMEBTrainDataset(config(tmp_path, root, split="diverse_instruction"))
    assert len(ds) == 2 and ds[0].query.text == "<|image_1|>\nreworded"
    with pytest.raises(DataError, match=r"split 'test' not found.*available splits: diverse_instruction, original"):
        MMEBTrainDataset(config(tmp_path, root, split="test"))


def test_subset_selection_and_typo(tmp_path):
    root = make_source(tmp_path, sizes={"Alpha": 2, "Beta": 2, "Gamma": 2})
    ds = MMEBTrainDataset(config(tmp_path, root, subsets=["Gamma", "Alpha"]))
    assert list(ds.subset_ranges) == ["Gamma", "Alpha"]
    assert ds[0].subset == "Gamma"
    assert MMEBTrainDataset(config(tmp_path, root, subsets="Beta")).subsets == ["Beta"]
    with pytest.raises(DataError, match=r"unknown subset 'Betta' in .*did you mean 'Beta'.*available subsets: Alpha, Beta, Gamma"):
        MMEBTrainDataset(config(tmp_path, root, subsets=["Alpha", "Betta"]))
    with pytest.raises(ValueError, match="more than once"):
        MMEBTrainDataset(config(tmp_path, root, subsets=["Alpha", "Alpha"]))


def official_layout(tmp_path):
    """A local MMEB-train download in the hub's layout: two of the 20 training subsets, and
    two directories the hub repository also holds that are evaluation tasks, one without an
    'original' split (as ImageNet-A there) and one with it."""
    root = tmp_path / "mmeb"
    for name, n in (("ImageNet_1K", 3), ("CIRR", 2)):
        rows = [mmeb_row(name, i) for i in range(n)]
        write_subset(str(root), name, rows, layout="hf_shards", split="original")
        write_images_for(str(root), rows)
    write_subset(str(root), "ImageNet-A", [mmeb_row("ImageNet-A", 1)], layout="hf_shards", split="test")
    rows = [mmeb_row("FashionIQ", 1)]
    write_subset(str(root), "FashionIQ", rows, layout="hf_shards", split="original")
    write_images_for(str(root), rows)
    return root


def test_default_subsets_are_the_official_training_subsets(tmp_path, caplog):
    root = official_layout(tmp_path)
    with caplog.at_level(logging.INFO, logger="llave_ds.data.mmeb_train"):
        ds = MMEBTrainDataset(config(tmp_path, root))
    # The official order (VLM2Vec's and LLaVE's scripts), not the directory order.
    assert ds.subsets == ["ImageNet_1K", "CIRR"] and len(ds) == 5
    assert "skipped (not MMEB-train training subsets; name them in data.subsets to train on them): " \
           "FashionIQ, ImageNet-A" in caplog.text
    assert "18 of the 20 official MMEB-train subsets are not in" in caplog.text
    # Named explicitly, an evaluation directory is read (and one without the split says so).
    assert MMEBTrainDataset(config(tmp_path, root, subsets=["FashionIQ"])).subsets == ["FashionIQ"]
    with pytest.raises(DataError, match=r"subset 'ImageNet-A': split 'original' not found"):
        MMEBTrainDataset(config(tmp_path, root, subsets=["CIRR", "ImageNet-A"]))


def test_default_subsets_of_data_without_official_names_is_everything(tmp_path, caplog):
    root = make_source(tmp_path, sizes={"Alpha": 2, "Beta": 2})
    with caplog.at_level(logging.INFO, logger="llave_ds.data.mmeb_train"):
        assert MMEBTrainDataset(config(tmp_path, root)).subsets == ["Alpha", "Beta"]
    assert "no official MMEB-train subset" in caplog.text


def test_official_training_subsets_are_the_in_distribution_eval_subsets():
    from llave_ds.data.mmeb_files import official_train_subsets
    from llave_ds.eval.mmeb_metrics import official_subsets
    train = official_train_subsets()
    ind = [n for n, info in official_subsets().items() if info.distribution == "IND"]
    assert len(train) == 20 == len(set(train))
    # Same tasks; MMEB-train spells one of them differently.
    assert sorted(n.replace("ImageNet_1K", "ImageNet-1K") for n in train) == sorted(ind)


def test_hub_default_subsets_skip_the_evaluation_configs(tmp_path, monkeypatch):
    import datasets
    root = make_source(tmp_path, sizes={"CIRR": 2})
    local = datasets.load_dataset("parquet", data_files=str(root / "CIRR.parquet"), split="train",
                                  cache_dir=str(tmp_path / "hf_cache"))
    loaded = []
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda path: ["CIFAR_100", "CIRR", "ImageNet-R"])
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name=None, split=None, cache_dir=None: loaded.append(name) or local)
    ds = MMEBTrainDataset(TrainDataConfig(source="TIGER-Lab/MMEB-train", image_root=str(root)))
    assert loaded == ["CIRR"] and ds.subsets == ["CIRR"]


def test_llave_json_array_subsets(tmp_path):
    """LLaVE's local layout: <data_path>/<subset>.json holding a JSON array of rows."""
    root = tmp_path / "llave"
    rows = [mmeb_row("Alpha", i) for i in range(3)]
    root.mkdir()
    (root / "Alpha.json").write_text(json.dumps(rows, indent=1))
    (root / "dataset_infos.json").write_text("{}")  # metadata beside the data: not a subset
    write_images_for(str(root), rows)
    ds = MMEBTrainDataset(config(tmp_path, root))
    assert ds.subsets == ["Alpha"] and len(ds) == 3
    assert ds[0].query.text == rows[0]["qry"] and ds[0].query.image is not None
    # Not an array of objects: the file and the expected layout are named.
    (root / "Alpha.json").write_text(json.dumps({"rows": rows}))
    with pytest.raises(DataError, match=r"Alpha\.json: expected a JSON array of row objects"):
        MMEBTrainDataset(config(tmp_path, root))
    (root / "Alpha.json").write_text('[{"qry": "a",}]')
    with pytest.raises(DataError, match=r"Alpha\.json: invalid JSON at line 1, column 14"):
        MMEBTrainDataset(config(tmp_path, root))
    (root / "Alpha.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="keep one"):
        MMEBTrainDataset(config(tmp_path, root))


def test_cap_first_n_and_seeded_random(tmp_path):
    root = make_source(tmp_path, sizes={"Alpha": 20, "Beta": 20})
    first = MMEBTrainDataset(config(tmp_path, root, max_per_subset=5))
    assert first.subset_ranges == {"Alpha": (0, 5), "Beta": (5, 10)}
    assert [first.locate(i)[1] for i in range(5)] == [0, 1, 2, 3, 4]

    def rows(**kw):
        ds = MMEBTrainDataset(config(tmp_path, root, max_per_subset=5, cap_mode="random", **kw))
        return [ds.locate(i) for i in range(len(ds))]

    a, b, other = rows(seed=1), rows(seed=1), rows(seed=2)
    assert a == b and a != other
    alpha_rows = [r for s, r in a if s == "Alpha"]
    assert len(alpha_rows) == 5 and alpha_rows == sorted(set(alpha_rows)) and alpha_rows != [0, 1, 2, 3, 4]
    # The draw for a subset does not depend on which other subsets are loaded.
    assert [r for _, r in rows(seed=1, subsets=["Alpha"])] == alpha_rows
    assert MMEBTrainDataset(config(tmp_path, root, max_per_subset=50)).subset_ranges["Alpha"] == (0, 20)


@pytest.mark.parametrize("list_negatives,k", [(False, 1), (True, 1), (True, 2)])
def test_hard_negatives(tmp_path, list_negatives, k):
    root = make_source(tmp_path, negatives=2, list_negatives=list_negatives, sizes={"Alpha": 4})
    ds = MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True, num_hard_negatives=k))
    pair = ds[1]
    assert [n.text for n in pair.negatives] == [f"Alpha wrong 1.{j}" for j in range(k)]
    assert all(n.image is not None and n.image.mode == "RGB" for n in pair.negatives)
    # Without use_hard_negatives the columns are ignored.
    assert MMEBTrainDataset(config(tmp_path, root))[1].negatives == []


def test_too_few_negatives_is_an_error_or_a_counted_skip(tmp_path, caplog):
    root = make_source(tmp_path, negatives=1, sizes={"Alpha": 4})
    with pytest.raises(DataError, match=r"subset 'Alpha'.*row 0, field 'neg_text'.*1 hard negative\(s\), 2 required"):
        MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True, num_hard_negatives=2))
    rows = [mmeb_row("Beta", i, negatives=1) for i in range(5)]
    rows[3].update(neg_text="", neg_image_path="")
    write_subset(str(root), "Beta", rows)
    write_images_for(str(root), rows)
    with caplog.at_level(logging.WARNING, logger="llave_ds.data.mmeb_train"):
        ds = MMEBTrainDataset(config(tmp_path, root, subsets=["Beta"], use_hard_negatives=True, skip_bad_rows=True,
                                     max_skip_fraction=0.5))
    assert len(ds) == 4 and ds.skip_counts == {"missing_negatives": 1}
    assert [ds.locate(i)[1] for i in range(4)] == [0, 1, 2, 4]
    assert any("row 3" in r.getMessage() and "neg_text" in r.getMessage() for r in caplog.records)


def test_subset_without_negative_fields_with_hard_negatives_requested(tmp_path):
    root = make_source(tmp_path, sizes={"Alpha": 2})
    with pytest.raises(DataError, match=r"subset 'Alpha'.*use_hard_negatives is set but the subset has no neg_text"):
        MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True, skip_bad_rows=True))


def test_hub_source_uses_load_dataset(tmp_path, monkeypatch):
    """No network here: check the hub path calls load_dataset(id, subset, split=...) and shares the rest."""
    import datasets

    root = make_source(tmp_path, sizes={"Alpha": 3})
    local = datasets.load_dataset("parquet", data_files=str(root / "Alpha.parquet"), split="train",
                                  cache_dir=str(tmp_path / "hf_cache"))
    calls = []

    def fake_load_dataset(path, name=None, split=None, cache_dir=None):
        calls.append((path, name, split))
        if name != "Alpha":
            raise ValueError(f"BuilderConfig '{name}' not found. Available: ['Alpha']")
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda path: ["Alpha"])
    cfg = TrainDataConfig(source="TIGER-Lab/MMEB-train", image_root=str(root), split="diverse_instruction")
    ds = MMEBTrainDataset(cfg)
    assert calls == [("TIGER-Lab/MMEB-train", "Alpha", "diverse_instruction")]
    assert len(ds) == 3 and ds[2].query.image is not None
    with pytest.raises(DataError, match=r"subset 'Alpah' of hub dataset 'TIGER-Lab/MMEB-train'.*Available"):
        MMEBTrainDataset(TrainDataConfig(source="TIGER-Lab/MMEB-train", image_root=str(root), subsets=["Alpah"]))
    with pytest.raises(ValueError, match="image_root is required"):
        MMEBTrainDataset(TrainDataConfig(source="TIGER-Lab/MMEB-train"))


def test_config_validation():
    with pytest.raises(ValueError, match="source is empty"):
        TrainDataConfig().validate()
    with pytest.raises(ValueError, match="cap_mode"):
        TrainDataConfig(source="x", cap_mode="last").validate()
    with pytest.raises(ValueError, match="num_hard_negatives"):
        TrainDataConfig(source="x", use_hard_negatives=True, num_hard_negatives=0).validate()
    with pytest.raises(DataError, match="does not exist"):
        MMEBTrainDataset(TrainDataConfig(source="/nonexistent/mmeb"))


# --------------------------------------------------------------------------- bad input

def _corrupt(root, rel, how):
    full = os.path.join(root, rel)
    if how == "missing":
        os.remove(full)
    elif how == "empty":
        open(full, "wb").close()
    elif how == "truncated":
        write_png(full, size=(64, 64))
        blob = open(full, "rb").read()
        open(full, "wb").write(blob[: len(blob) // 2])
    elif how == "junk":
        open(full, "wb").write(b"this is not an image" * 10)
    elif how == "large":
        write_png(full, size=(40, 40))


# (row edit or file corruption, reason, field, message fragment). Row 2 of subset Alpha.
LOAD_TIME_CASES = {
    "missing_file": (("file", "missing"), "missing_image", "qry_image_path", "image file not found"),
    "zero_bytes": (("file", "empty"), "empty_image_file", "qry_image_path", "empty (0 bytes)"),
    "dotdot_path": (("row", dict(qry_image_path="../../etc/passwd")), "path_outside_root", "qry_image_path",
                    "outside the image root"),
    "absolute_path": (("row", dict(pos_image_path="/etc/passwd")), "path_outside_root", "pos_image_path",
                      "outside the image root"),
    "empty_query": (("row", dict(qry="  ", qry_image_path="")), "empty_side", "qry", "neither text"),
    "empty_target": (("row", dict(pos_text="", pos_image_path=None)), "empty_side", "pos_text", "neither text"),
    "number_text": (("row", dict(qry=5)), "wrong_type", "qry", "expected a string, got int"),
    "list_text": (("row", dict(pos_text=["a", "b"])), "wrong_type", "pos_text", "expected a string, got list"),
    "dict_path": (("row", dict(qry_image_path={"p": 1})), "wrong_type", "qry_image_path", "got dict"),
}


def _bad_source(tmp_path, change, fmt="jsonl", n=12):
    """Subset Alpha with row 2 made bad; jsonl so one row can carry a wrong type."""
    root = tmp_path / "mmeb"
    rows = [mmeb_row("Alpha", i) for i in range(n)]
    kind, what = change
    if kind == "row":
        rows[2] = dict(rows[2], **what)
    write_subset(str(root), "Alpha", rows, fmt)
    write_images_for(str(root), rows)
    if kind == "file":
        _corrupt(str(root), rows[2]["qry_image_path"], what)
    return root


@pytest.mark.parametrize("case", sorted(LOAD_TIME_CASES))
def test_load_time_bad_rows_raise_naming_subset_row_field(tmp_path, case):
    change, reason, field, fragment = LOAD_TIME_CASES[case]
    root = _bad_source(tmp_path, change)
    with pytest.raises(DataError) as info:
        MMEBTrainDataset(config(tmp_path, root))
    msg = str(info.value)
    assert "subset 'Alpha'" in msg and "Alpha.jsonl" in msg and "row 2," in msg and f"field {field!r}" in msg
    assert fragment in msg and "skip_bad_rows" in msg
    assert (info.value.reason, info.value.subset, info.value.row, info.value.field) == (reason, "Alpha", 2, field)


@pytest.mark.parametrize("case", sorted(LOAD_TIME_CASES))
def test_load_time_bad_rows_are_skipped_counted_and_logged(tmp_path, caplog, case):
    change, reason, field, fragment = LOAD_TIME_CASES[case]
    root = _bad_source(tmp_path, change)
    with caplog.at_level(logging.WARNING, logger="llave_ds.data.mmeb_train"):
        ds = MMEBTrainDataset(config(tmp_path, root, skip_bad_rows=True))
    assert len(ds) == 11 and ds.skip_counts == {reason: 1} and ds.subset_skip_counts["Alpha"] == {reason: 1}
    assert [ds.locate(i)[1] for i in range(3)] == [0, 1, 3]
    messages = [r.getMessage() for r in caplog.records if r.name == "llave_ds.data.mmeb_train"]
    assert any("row 2," in m and field in m and fragment in m for m in messages)
    assert any("skipped 1 of 12 rows" in m and reason in m for m in messages)


LAZY_CASES = {
    "truncated": ("truncated", {}, "unreadable_image", "corrupt or truncated"),
    "junk": ("junk", {}, "unreadable_image", "not a recognised image"),
    "over_pixel_limit": ("large", {"max_image_pixels": 1000}, "image_too_large", "above the limit of 1000"),
}


@pytest.mark.parametrize("case", sorted(LAZY_CASES))
def test_decode_problems_raise_in_getitem(tmp_path, case):
    how, extra, reason, fragment = LAZY_CASES[case]
    root = _bad_source(tmp_path, ("file", how), fmt="parquet")
    ds = MMEBTrainDataset(config(tmp_path, root, **extra))  # the cheap up-front pass cannot see these
    assert len(ds) == 12
    with pytest.raises(DataError) as info:
        ds[2]
    msg = str(info.value)
    assert "subset 'Alpha'" in msg and "row 2," in msg and "field 'qry_image_path'" in msg and fragment in msg
    assert info.value.reason == reason
    # Other rows are fine.
    assert ds[3].target.image is not None


@pytest.mark.parametrize("case", sorted(LAZY_CASES))
def test_decode_problems_with_skip_are_replaced_counted_and_logged(tmp_path, caplog, case):
    how, extra, reason, fragment = LAZY_CASES[case]
    root = _bad_source(tmp_path, ("file", how), fmt="parquet")
    ds = MMEBTrainDataset(config(tmp_path, root, skip_bad_rows=True, **extra))
    with caplog.at_level(logging.WARNING, logger="llave_ds.data.mmeb_train"):
        pair = ds[2]
    assert (pair.subset, pair.row, pair.replaced) == ("Alpha", 3, [reason])  # next row stands in
    assert ds.skip_counts == {}  # load-time drops only; a replacement travels with its pair
    assert any("row 2," in r.getMessage() and fragment in r.getMessage() for r in caplog.records)
    batch = PairCollator(fake_formatter, 2, 2)([ds[0], pair, ds[4]])
    assert batch.num_pairs == 3 and batch.skipped == {reason: 1}


def test_replacements_in_dataloader_workers_reach_the_main_process(tmp_path):
    """A worker's copy of the dataset is never seen by the training process: the count must
    come back with the batch."""
    root = _bad_source(tmp_path, ("file", "truncated"), fmt="parquet")
    ds = MMEBTrainDataset(config(tmp_path, root, skip_bad_rows=True))
    for workers in (0, 1):  # the same counts whether the rows are read here or in a worker
        loader = torch.utils.data.DataLoader(ds, batch_sampler=[[0, 2, 4], [1, 2]], num_workers=workers,
                                             collate_fn=PairCollator(fake_formatter, 2, 2))
        assert [batch.skipped for batch in loader] == [{"unreadable_image": 1}, {"unreadable_image": 1}]
        assert ds.skip_counts == {}, workers  # not counted twice (load-time drops + replacements)


def test_verify_images_upfront_turns_decode_problems_into_load_time_skips(tmp_path):
    root = _bad_source(tmp_path, ("file", "truncated"), fmt="parquet")
    with pytest.raises(DataError, match=r"row 2, field 'qry_image_path'.*corrupt or truncated"):
        MMEBTrainDataset(config(tmp_path, root, verify_images_upfront=True))
    ds = MMEBTrainDataset(config(tmp_path, root, verify_images_upfront=True, skip_bad_rows=True))
    assert len(ds) == 11 and ds.skip_counts == {"unreadable_image": 1}


def test_pil_decompression_bomb_guard_becomes_data_error(tmp_path, monkeypatch):
    path = str(tmp_path / "img.png")
    write_png(path, size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 400 px: PIL warns above 150, raises above 300
    with pytest.raises(MediaError, match="too large") as info:
        load_image(path, max_pixels=10_000)
    assert info.value.reason == "image_too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL only warns; our limit is lower, so the warning counts
    with pytest.raises(MediaError, match="too large"):
        load_image(path, max_pixels=200)
    assert load_image(path, max_pixels=10_000).size == (20, 20)


def test_image_conversion_and_downscale(tmp_path):
    path = str(tmp_path / "rgba.png")
    img = Image.new("RGBA", (40, 20), (0, 0, 255, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    assert load_image(path, max_side=10).size == (10, 5)
    write_png(str(tmp_path / "gray.png"), colour=128, mode="L")
    assert load_image(str(tmp_path / "gray.png")).getpixel((0, 0)) == (128, 128, 128)


def test_too_many_bad_rows_even_when_skipping(tmp_path):
    root = make_source(tmp_path, sizes={"Alpha": 6})
    with pytest.raises(DataError, match=r"6 of 6 rows are bad.*check image_root"):
        MMEBTrainDataset(config(tmp_path, root, image_root=str(tmp_path), skip_bad_rows=True))


def test_substitution_gives_up_with_a_clear_error(tmp_path):
    root = make_source(tmp_path, sizes={"Alpha": 6})
    for i in range(6):
        _corrupt(str(root), f"images/Alpha/{i}.png", "junk")
    ds = MMEBTrainDataset(config(tmp_path, root, skip_bad_rows=True, max_substitute_attempts=3))
    with pytest.raises(DataError, match=r"4 consecutive bad rows.*giving up"):
        ds[0]


def test_schema_errors(tmp_path, caplog):
    root = tmp_path / "mmeb"
    write_subset(str(root), "Alpha", [dict(qry="q", qry_image_path="", pos_text="a")])
    with pytest.raises(DataError, match=r"subset 'Alpha'.*missing required field\(s\) \['pos_image_path'\].*"
                                        r"expected fields \['qry', 'qry_image_path', 'pos_text', 'pos_image_path'\]"):
        MMEBTrainDataset(config(tmp_path, root, skip_bad_rows=True))
    # Extra fields are harmless: a warning names them.
    write_subset(str(root), "Alpha", [dict(mmeb_row("Alpha", 1), source_id="x")])
    write_images_for(str(root), [mmeb_row("Alpha", 1)])
    with caplog.at_level(logging.WARNING, logger="llave_ds.data.mmeb_train"):
        assert len(MMEBTrainDataset(config(tmp_path, root))) == 1
    assert any("ignoring unknown field(s) ['source_id']" in r.getMessage() for r in caplog.records)
    # A whole column of the wrong type (parquet int64).
    write_subset(str(root), "Alpha", [dict(qry=7, qry_image_path="", pos_text="a", pos_image_path="")])
    with pytest.raises(DataError, match=r"row 0, field 'qry': expected a string, got int"):
        MMEBTrainDataset(config(tmp_path, root))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    root = tmp_path / "mmeb"
    root.mkdir()
    (root / "Alpha.jsonl").write_text(json.dumps(mmeb_row("Alpha", 1)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"subset 'Alpha': cannot read .*Alpha\.jsonl, line 2: invalid JSON"):
        MMEBTrainDataset(config(tmp_path, root))


def test_data_error_survives_pickling():
    err = DataError("subset 'A', row 3, field 'qry': bad", reason="wrong_type", subset="A", row=3, field="qry")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and (back.reason, back.subset, back.row, back.field) == ("wrong_type", "A", 3, "qry")
    assert DataError("plain").reason is None  # how DataLoader re-raises worker errors


# --------------------------------------------------------------------------- sampler

def all_rank_batches(sizes, g, world, **kw):
    samplers = [GlobalBatchSampler(sizes, g, rank=r, world_size=world, **kw) for r in range(world)]
    return samplers, [list(s) for s in samplers]


def test_sampler_equal_disjoint_and_complete():
    samplers, per_rank = all_rank_batches(103, 12, 4, seed=3)
    assert all(len(s) == 103 // 12 for s in samplers)
    assert all(len(batches) == 8 for batches in per_rank)
    seen = []
    for step in range(8):
        slices = [per_rank[r][step] for r in range(4)]
        assert all(len(x) == 3 for x in slices)
        flat = [i for x in slices for i in x]
        assert len(set(flat)) == 12 and flat == samplers[0].global_batch(step)
        seen += flat
    assert len(set(seen)) == 96 and all(0 <= i < 103 for i in seen)


def test_sampler_deterministic_per_seed_and_epoch():
    a = GlobalBatchSampler(50, 10, seed=1)
    b = GlobalBatchSampler(50, 10, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(GlobalBatchSampler(50, 10, seed=2)) != first


def test_sampler_homogeneous_batches_come_from_one_subset():
    ranges = {"A": (0, 40), "B": (40, 47), "C": (47, 80)}
    samplers, per_rank = all_rank_batches(ranges, 8, 2, seed=0, homogeneous=True)
    steps = len(samplers[0])
    assert steps == 40 // 8 + 0 + 33 // 8
    used = set()
    for step in range(steps):
        batch = per_rank[0][step] + per_rank[1][step]
        owners = {name for i in batch for name, (s, e) in ranges.items() if s <= i < e}
        assert len(owners) == 1 and len(set(batch)) == 8
        used |= owners
    assert used == {"A", "C"}  # B (7 < 8 samples) is never drawn
    order = [name for step in range(steps) for name, (s, e) in ranges.items() if s <= per_rank[0][step][0] < e]
    assert order != sorted(order)  # batches of different subsets are interleaved


def test_sampler_resume_mid_epoch_reproduces_remaining_batches():
    full = list(GlobalBatchSampler({"A": (0, 30), "B": (30, 64)}, 8, rank=1, world_size=2, seed=5,
                                   homogeneous=True))
    s = GlobalBatchSampler({"A": (0, 30), "B": (30, 64)}, 8, rank=1, world_size=2, seed=5, homogeneous=True)
    it = iter(s)
    consumed = [next(it) for _ in range(3)]
    state = s.state_dict()
    assert (state["epoch"], state["step"]) == (0, 3) and consumed == full[:3]

    resumed = GlobalBatchSampler({"A": (0, 30), "B": (30, 64)}, 8, rank=1, world_size=2, seed=5, homogeneous=True)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a training loop's usual call keeps the resume point of the same epoch
    assert list(resumed) == full[3:]
    assert list(resumed) == full  # the next pass over the epoch is whole again

    # Resume in a later epoch, via an explicit consumed-step count (DataLoader prefetch runs ahead).
    s.set_epoch(2)
    epoch2 = list(s)
    s2 = GlobalBatchSampler({"A": (0, 30), "B": (30, 64)}, 8, rank=1, world_size=2, seed=5, homogeneous=True)
    s2.load_state_dict(s.state_dict(consumed_steps=1))
    assert s2.epoch == 2 and list(s2) == epoch2[1:]


def test_sampler_resume_checks_and_world_size_independence():
    s = GlobalBatchSampler(64, 8, seed=0)
    with pytest.raises(ValueError, match="global_batch_size=8, this one has 16"):
        GlobalBatchSampler(64, 16, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="cannot resume at step 9"):
        s.load_state_dict({"epoch": 0, "step": 9})
    # The global plan does not depend on world_size: 2 ranks resume what 4 ranks started.
    four = [GlobalBatchSampler(64, 8, rank=r, world_size=4) for r in range(4)]
    two = [GlobalBatchSampler(64, 8, rank=r, world_size=2) for r in range(2)]
    for step in range(8):
        assert four[0].global_batch(step) == two[1].global_batch(step)


def test_sampler_errors_and_padding():
    with pytest.raises(ValueError, match="not divisible by world_size 4"):
        GlobalBatchSampler(100, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        GlobalBatchSampler(100, 10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no complete global batch of 16 can be drawn from 10 samples"):
        GlobalBatchSampler(10, 16)
    padded = list(GlobalBatchSampler(10, 4, drop_last=False))
    assert len(padded) == 3 and all(len(b) == 4 for b in padded)
    assert set(i for b in padded for i in b) == set(range(10))


# --------------------------------------------------------------------------- collator

def _pairs(n, k):
    return [Pair(query=Side(f"q{i}"), target=Side(f"t{i}"),
                 negatives=[Side(f"n{i}.{j}") for j in range(k)], subset="S" if i % 2 else "T", row=i)
            for i in range(n)]


def test_collator_chunks_and_negative_order():
    rec = RecordingFormatter()
    batch = PairCollator(rec, query_chunk_size=2, target_chunk_size=3, negative_chunk_size=4)(_pairs(5, 2))
    assert isinstance(batch, TrainBatch)
    assert (batch.num_pairs, batch.num_negatives_per_pair) == (5, 2)
    assert batch.subsets == ["T", "S", "T", "S", "T"] and batch.rows == [0, 1, 2, 3, 4]
    assert [c["n"].item() for c in batch.query_chunks] == [2, 2, 1]
    assert [c["n"].item() for c in batch.target_chunks] == [3, 2]
    assert [c["n"].item() for c in batch.negative_chunks] == [4, 4, 2]
    queries = [t for role, texts in rec.calls if role == "query" for t in texts]
    targets = [t for role, texts in rec.calls if role == "target" for t in texts]
    assert queries == ["q0", "q1", "q2", "q3", "q4"]
    assert targets[:5] == ["t0", "t1", "t2", "t3", "t4"]
    assert targets[5:] == [f"n{i}.{j}" for i in range(5) for j in range(2)]
    assert batch.skipped == {}


def test_collator_defaults_and_errors():
    batch = PairCollator(fake_formatter, 4, 4)(_pairs(4, 0))
    assert len(batch.query_chunks) == 1 and batch.negative_chunks == [] and batch.num_negatives_per_pair == 0
    assert batch.query_chunks[0]["is_query"].all() and not batch.target_chunks[0]["is_query"].any()
    pairs = _pairs(3, 1)
    pairs[2].negatives = []
    with pytest.raises(DataError, match=r"different numbers of hard negatives.*subset 'T' row 2 has 0"):
        PairCollator(fake_formatter, 2, 2)(pairs)
    with pytest.raises(ValueError, match="None in the batch"):
        PairCollator(fake_formatter, 2, 2)(_pairs(2, 0) + [None])
    with pytest.raises(ValueError, match="query_chunk_size must be >= 1"):
        PairCollator(fake_formatter, 0, 2)
    with pytest.raises(TypeError, match="dict of tensors"):
        PairCollator(lambda sides, role: [1], 2, 2)(_pairs(2, 0))


# --------------------------------------------------------------------------- token-budget chunks

def test_token_budget_chunks_by_hand():
    from llave_ds.data.batching import token_budget_chunks
    # lengths by position: 5, 30, 10, 10, 40, 5; sorted: 4 (40), 1 (30), 2, 3 (10), 0, 5 (5)
    chunks, over = token_budget_chunks([5, 30, 10, 10, 40, 5], budget=60, max_rows=8)
    # 40 alone (2 x 40 > 60); 30 + 10 (2 x 30 = 60); then 10 + 5 + 5 (3 x 10 = 30) fit together
    assert chunks == [[4], [1, 2], [3, 0, 5]] and over == 0
    assert token_budget_chunks([5, 30, 10, 10, 40, 5], budget=60, max_rows=2)[0] == [[4], [1, 2], [3, 0], [5]]
    assert token_budget_chunks([7, 7, 7], budget=21, max_rows=8)[0] == [[0, 1, 2]]  # ties in position order
    chunks, over = token_budget_chunks([50, 80, 3], budget=40, max_rows=8)
    assert chunks == [[1], [0], [2]] and over == 2     # rows over the budget: one chunk each, counted
    assert token_budget_chunks([], budget=10, max_rows=2) == ([], 0)


class LengthFormatter:
    """A formatter whose row length is its text length (a row of ``n`` characters is ``n``
    tokens): chunks are padded to their longest row, as the real one pads them."""

    def __call__(self, sides, role):
        width = max(len(s.text) for s in sides)
        return {"text_len": torch.tensor([len(s.text) for s in sides]),
                "attention_mask": torch.tensor([[1] * len(s.text) + [0] * (width - len(s.text)) for s in sides])}

    def row_lengths(self, sides, role):
        return [len(s.text) for s in sides]


def test_collator_token_budget_chunks_carry_their_rows(caplog):
    from llave_ds.core.gradcache import ROW_INDEX
    lengths = [12, 3, 40, 5, 5, 22, 3, 8]
    pairs = [Pair(query=Side("q" * n), target=Side("t" * (n % 4 + 1)), negatives=[Side("n" * 60)], row=i)
             for i, n in enumerate(lengths)]
    collator = PairCollator(LengthFormatter(), query_chunk_size=4, target_chunk_size=8, chunk_tokens=48)
    with caplog.at_level("WARNING"):
        batch = collator(pairs)
    for chunks, want_lengths in ((batch.query_chunks, lengths), (batch.target_chunks, [n % 4 + 1 for n in lengths])):
        rows = torch.cat([c[ROW_INDEX] for c in chunks])
        assert sorted(rows.tolist()) == list(range(len(pairs)))   # every row once
        for c in chunks:
            assert c["text_len"].tolist() == [want_lengths[i] for i in c[ROW_INDEX].tolist()]  # rows match
            assert len(c["text_len"]) <= (4 if chunks is batch.query_chunks else 8)
            assert len(c["text_len"]) == 1 or c["attention_mask"].numel() <= 48  # within the budget
    # 22 + 12: 2 x 22 = 44 tokens; then 8, 5, 5, 3 (the 4-row cap), then the last 3
    assert [c["text_len"].tolist() for c in batch.query_chunks] == [[40], [22, 12], [8, 5, 5, 3], [3]]
    assert len(batch.target_chunks) == 1  # eight short rows: one chunk (8 x 4 tokens)
    # a 60-token negative exceeds the budget on its own: a chunk each, counted, logged once
    assert len(batch.negative_chunks) == 8 and collator.rows_over_budget == 8
    assert sum("longer than gradcache.chunk_tokens" in r.message for r in caplog.records) == 1
    with pytest.raises(TypeError, match="row_lengths"):
        PairCollator(fake_formatter, 2, 2, chunk_tokens=10)


# --------------------------------------------------------------------------- DataLoader

def _run_loader(ds, num_workers):
    sampler = GlobalBatchSampler(ds.subset_ranges, 4, rank=1, world_size=2, seed=7, homogeneous=True)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=PairCollator(fake_formatter, 1, 2),
                                         num_workers=num_workers)
    return list(loader)


def test_dataloader_with_workers_matches_single_process(tmp_path):
    root = make_source(tmp_path, negatives=1, sizes={"Alpha": 8, "Beta": 6})
    ds = MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True))
    plain, workers = _run_loader(ds, 0), _run_loader(ds, 2)
    assert len(plain) == len(workers) == 8 // 4 + 6 // 4
    for a, b in zip(plain, workers):
        assert a.subsets == b.subsets and len(set(a.subsets)) == 1 and a.rows == b.rows
        assert len(a.query_chunks) == 2 and len(a.target_chunks) == 1 and len(a.negative_chunks) == 1
        for ca, cb in zip(a.query_chunks + a.target_chunks + a.negative_chunks,
                          b.query_chunks + b.target_chunks + b.negative_chunks):
            assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    assert any((c["pixel_sum"] > 0).any() for batch in plain for c in batch.query_chunks + batch.target_chunks)


def test_dataset_and_collator_pickle_for_spawned_workers(tmp_path):
    root = make_source(tmp_path, negatives=1, sizes={"Alpha": 4})
    ds = MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.subset_ranges == ds.subset_ranges and clone.locate(3) == ds.locate(3)
    a, b = ds[2], clone[2]
    assert a.query.text == b.query.text and np.array_equal(np.asarray(a.query.image), np.asarray(b.query.image))
    collate = pickle.loads(pickle.dumps(PairCollator(fake_formatter, 2, 2)))
    assert collate([a, b]).num_pairs == 2
    sampler = GlobalBatchSampler(ds, 2, seed=1)  # a dataset stands for its subset ranges
    assert list(pickle.loads(pickle.dumps(sampler))) == list(sampler)


# --------------------------------------------------------------------------- video rows

def _video_source(tmp_path, extra_rows=(), negatives=True):
    """Subset "Vid" (jsonl): row 0 mp4 query -> text; row 1 text -> frame-folder target; row 2
    text -> text with a video hard negative; plus an image subset "Alpha" (make_source)."""
    from llave_ds.toy.synthetic_video import VideoSpec, render_video, write_frame_folder, write_mp4
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = make_source(tmp_path, sizes={"Alpha": 4}, negatives=1 if negatives else 0)
    frames = render_video(VideoSpec(2, "red", "square", "left"), size=32, num_frames=8)
    write_mp4(frames, str(root / "videos" / "clip.mp4"))
    write_frame_folder(frames[::-1], str(root / "videos" / "clip_frames"))
    rows = [
        dict(qry="<|video_1|>\nWhat moves?", qry_image_path="", qry_video_path="videos/clip.mp4",
             pos_text="two red squares moving left", pos_image_path="", pos_video_path=""),
        dict(qry="two red squares moving right", qry_image_path="", qry_video_path="",
             pos_text="<|video_1|>\nRepresent the video.", pos_image_path="", pos_video_path="videos/clip_frames"),
        dict(qry="a caption", qry_image_path="", qry_video_path="", pos_text="the caption", pos_image_path="",
             pos_video_path=""),
    ]
    if negatives:
        for row in rows:
            row.update(neg_text=["<|video_1|>\nRepresent the video."], neg_image_path=[""],
                       neg_video_path=["videos/clip_frames"])
    changes = list(extra_rows) + [{}] * (len(rows) - len(extra_rows))
    write_subset(str(root), "Vid", [dict(r, **c) for r, c in zip(rows, changes)], fmt="jsonl")
    return root


def test_video_rows_load_mp4_and_frame_folders_with_the_callers_frame_count(tmp_path):
    root = _video_source(tmp_path)
    ds = MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True), video_frames=4, video_max_side=16)
    assert ds.has_videos and ds.subset_ranges == {"Alpha": (0, 4), "Vid": (4, 7)}
    q = ds[4].query  # the mp4
    assert q.video_path == "videos/clip.mp4" and q.image is None and q.has_video and not q.has_image
    assert q.video.num_frames == 4 and q.video.indices == [0, 2, 4, 6] and q.video.info.kind == "file"
    assert q.video.frames[0].mode == "RGB" and q.video.frames[0].size == (16, 16)  # video_max_side
    assert q.video.info.fps == 8 and ds[4].target.video is None
    t = ds[5].target  # the frame folder
    assert t.video.info.kind == "frames" and t.video.num_frames == 4 and t.video_path == "videos/clip_frames"
    neg = ds[6].negatives[0]
    assert neg.video.num_frames == 4 and neg.image is None
    # An image row keeps .image; its sides have no video.
    assert ds[0].query.image is not None and ds[0].query.video is None
    # Default: the processing default of 8 frames (training passes processing.video_frames).
    from llave_ds.media.video import DEFAULT_VIDEO_FRAMES
    from llave_ds.media.video import DEFAULT_VIDEO_FRAMES as DATA_DEFAULT
    assert DATA_DEFAULT == DEFAULT_VIDEO_FRAMES
    assert MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True))[4].query.video.num_frames == 8
    # Decoded in DataLoader workers: the clip travels pickled with its pair.
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[4, 5, 0]], num_workers=1,
                                         collate_fn=PairCollator(lambda sides, role: {
                                             "frames": torch.tensor([s.video.num_frames if s.video else 0
                                                                     for s in sides])}, 3, 3))
    batch = next(iter(loader))
    assert batch.query_chunks[0]["frames"].tolist() == [4, 0, 0]
    assert batch.target_chunks[0]["frames"].tolist() == [0, 4, 0]
    with pytest.raises(ValueError, match="video_frames"):
        MMEBTrainDataset(config(tmp_path, root), video_frames=0)


def test_has_videos_is_about_the_sides_the_run_reads(tmp_path):
    (tmp_path / "img").mkdir()
    image_only = make_source(tmp_path / "img")
    assert MMEBTrainDataset(config(tmp_path, image_only)).has_videos is False
    # Only the hard negatives have a video: videos only when negatives are read.
    root = _video_source(tmp_path, negatives=True)
    rows = [json.loads(line) for line in open(root / "Vid.jsonl")]
    for row in rows:
        row.update(qry_video_path="", pos_video_path="", qry="q", pos_text="p")
    write_subset(str(root), "Vid", rows, fmt="jsonl")
    assert MMEBTrainDataset(config(tmp_path, root)).has_videos is False
    assert MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True)).has_videos is True
    # Only the subsets trained on count.
    assert MMEBTrainDataset(config(tmp_path, root, subsets=["Alpha"], use_hard_negatives=True)).has_videos is False


def test_synthetic_video_training_rows_load(tmp_path):
    from llave_ds.toy.synthetic_video import generate_synthetic_videos
    out = tmp_path / "sv"
    generate_synthetic_videos(str(out), num_test=4, num_train_per_subset=4, num_frames=8)
    ds = MMEBTrainDataset(config(tmp_path, out / "train", image_root=str(out), use_hard_negatives=True),
                          video_frames=4)
    assert ds.subsets == ["SynthVideo_T2V", "SynthVideo_V2T"] and len(ds) == 8 and ds.has_videos
    t2v, v2t = ds[0], ds[4]
    assert t2v.query.video is None and t2v.target.video.num_frames == 4 and t2v.negatives[0].video is not None
    assert v2t.query.video.num_frames == 4 and v2t.target.video is None and v2t.negatives[0].video is None
    # Opposite-direction negative = the positive played backwards.
    pos, neg = t2v.target.video.to_array().astype(int), t2v.negatives[0].video.to_array().astype(int)
    assert not np.array_equal(pos, neg)


def test_video_on_a_side_with_an_image_is_refused(tmp_path):
    root = _video_source(tmp_path, extra_rows=[dict(qry_image_path="images/Alpha/0.png")])
    with pytest.raises(DataError) as info:
        MMEBTrainDataset(config(tmp_path, root))
    msg = str(info.value)
    assert "subset 'Vid'" in msg and "Vid.jsonl" in msg and "row 0," in msg and "field 'qry_video_path'" in msg
    assert "both an image" in msg and "images/Alpha/0.png" in msg and "videos/clip.mp4" in msg
    assert (info.value.reason, info.value.row) == ("image_and_video", 0)
    # A negative too, named by its index in the row's lists.
    root = _video_source(tmp_path / "neg", extra_rows=[{}, {}, dict(neg_image_path=["images/Alpha/0.png"])])
    with pytest.raises(DataError, match=r"row 2, field 'neg_video_path\[0\]'.*both an image"):
        MMEBTrainDataset(config(tmp_path, root, use_hard_negatives=True))


@pytest.mark.parametrize("how, reason, fragment", [
    ("missing", "missing_video", "video not found"),
    ("empty", "empty_video_file", "empty (0 bytes)"),
])
def test_missing_or_empty_video_is_a_load_time_problem(tmp_path, caplog, how, reason, fragment):
    root = _video_source(tmp_path, negatives=False)
    full = root / "videos" / "clip.mp4"
    os.remove(full) if how == "missing" else open(full, "wb").close()
    with pytest.raises(DataError) as info:
        MMEBTrainDataset(config(tmp_path, root))
    msg = str(info.value)
    assert "row 0," in msg and "field 'qry_video_path'" in msg and fragment in msg and str(full) in msg
    assert info.value.reason == reason
    ds = MMEBTrainDataset(config(tmp_path, root, skip_bad_rows=True, max_skip_fraction=0.5))
    assert ds.skip_counts == {reason: 1} and len(ds) == 4 + 2


def test_unreadable_video_raises_in_getitem_or_is_a_counted_replacement(tmp_path, caplog):
    root = _video_source(tmp_path, negatives=False)
    full = root / "videos" / "clip.mp4"
    full.write_bytes(b"this is not a video" * 20)
    ds = MMEBTrainDataset(config(tmp_path, root))  # the cheap load-time pass cannot see it
    with pytest.raises(DataError) as info:
        ds[4]
    msg = str(info.value)
    assert "subset 'Vid'" in msg and "row 0," in msg and "field 'qry_video_path'" in msg and str(full) in msg
    assert info.value.reason == "unreadable_video"
    ds = MMEBTrainDataset(config(tmp_path, root, skip_bad_rows=True))
    with caplog.at_level(logging.WARNING, logger="llave_ds.data.mmeb_train"):
        pair = ds[4]
    assert (pair.row, pair.replaced) == (1, ["unreadable_video"])
    assert any("qry_video_path" in r.getMessage() and str(full) in r.getMessage() for r in caplog.records)
    assert PairCollator(fake_formatter, 2, 2)([pair, ds[5]]).skipped == {"unreadable_video": 1}
    # verify_images_upfront decodes videos too: a load-time skip, exact counts.
    with pytest.raises(DataError, match=r"row 0, field 'qry_video_path'"):
        MMEBTrainDataset(config(tmp_path, root, verify_images_upfront=True))
    ds = MMEBTrainDataset(config(tmp_path, root, verify_images_upfront=True, skip_bad_rows=True,
                                 max_skip_fraction=0.5))
    assert ds.skip_counts == {"unreadable_video": 1}
