"""llave_ds.eval.mmeb_data: MMEB-eval loading, row checks, image root, dedup, sharding, synthetic split."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llave_ds.eval import mmeb_data as ed
from llave_ds.eval.mmeb_data import (EvalDataError, EvalItem, list_eval_subsets, load_eval_subset, load_eval_subsets,
                                     reassemble, shard, shard_padded_size, shard_range, unique_items)
from llave_ds.eval.mmeb_metrics import candidate_scores, precision_at_1

SCHEMA = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                    ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])


def row(q="<|image_1|>\nWhat is it?", qi="imgs/q0.png", tt=("cat", "dog", "bird"), ti=("", "", "")):
    def as_list(v):
        return list(v) if isinstance(v, (list, tuple)) else v   # keep wrong types as given

    return dict(qry_text=q, qry_img_path=qi, tgt_text=as_list(tt), tgt_img_path=as_list(ti))


def write_parquet(path, rows, schema=SCHEMA):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_jsonl(path, rows, raw_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in raw_lines:
            fh.write(line + "\n")


def make_images(root, names):
    for n in names:
        p = os.path.join(root, n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(b"\x89PNG fake")


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "eval_images"
    make_images(str(root), ["imgs/q0.png", "imgs/q1.png", "imgs/c0.png", "imgs/c1.png"])
    return str(root)


# --------------------------------------------------------------------------- loading

def test_load_flat_parquet_and_jsonl(tmp_path, images):
    src = tmp_path / "mmeb"
    rows = [row(), row(qi="imgs/q1.png", tt=("dog", "cat", "bird"))]
    write_parquet(str(src / "SetA.parquet"), rows)
    write_jsonl(str(src / "SetB.jsonl"), [row(q="find it", qi="", tt=("x", "y"), ti=("imgs/c0.png", "imgs/c1.png"))])
    assert list_eval_subsets(str(src)) == ["SetA", "SetB"]
    subs = load_eval_subsets(str(src), image_root=images)
    a, b = subs["SetA"], subs["SetB"]
    assert len(a) == 2 and a[1].tgt_text == ("dog", "cat", "bird") and a[1].qry_img_path == "imgs/q1.png"
    assert a.num_candidates == [3, 3] and a[0].row == 0 and a[1].row == 1
    assert b[0].qry_img_path == "" and b[0].tgt_img_path == ("imgs/c0.png", "imgs/c1.png")
    assert b.image_path("imgs/c1.png") == os.path.join(images, "imgs", "c1.png")
    assert b.image_path("") is None
    assert b.locations == [(str(src / "SetB.jsonl"), 0, 1)]


def test_hub_snapshot_layout_and_split_selection(tmp_path, images):
    src = tmp_path / "MMEB-eval"
    write_parquet(str(src / "ImageNet-1K" / "test-00000-of-00002.parquet"), [row()])
    write_parquet(str(src / "ImageNet-1K" / "test-00001-of-00002.parquet"), [row(qi="imgs/q1.png")])
    write_parquet(str(src / "ImageNet-1K" / "dev-00000-of-00001.parquet"), [row()] * 5)
    write_parquet(str(src / "OK-VQA" / "test-00000-of-00001.parquet"), [row()])
    os.makedirs(src / ".cache" / "huggingface")
    os.makedirs(src / "eval_images")
    assert list_eval_subsets(str(src)) == ["ImageNet-1K", "OK-VQA"]
    sub = load_eval_subset(str(src), "ImageNet-1K", image_root=images)
    assert len(sub) == 2 and sub[1].qry_img_path == "imgs/q1.png"
    assert sub.locations[1] == (str(src / "ImageNet-1K" / "test-00001-of-00002.parquet"), 0, None)
    assert len(load_eval_subset(str(src), "ImageNet-1K", split="dev", image_root=images)) == 5
    with pytest.raises(EvalDataError, match=r"split 'val' not found.*available splits: dev, test"):
        load_eval_subset(str(src), "ImageNet-1K", split="val", image_root=images)
    sub = load_eval_subset(str(src), "ImageNet-1K", image_root=images, max_rows=1)
    assert len(sub) == 1


def test_subset_typo_lists_available_subsets(tmp_path, images):
    src = tmp_path / "MMEB-eval"
    for name in ("ImageNet-1K", "ImageNet-A", "OK-VQA"):
        write_parquet(str(src / name / "test-00000-of-00001.parquet"), [row()])
    with pytest.raises(EvalDataError) as err:
        load_eval_subset(str(src), "ImageNet1K", image_root=images)
    msg = str(err.value)
    assert "unknown MMEB-eval subset 'ImageNet1K'" in msg and "did you mean 'ImageNet-1K'" in msg
    assert "available subsets: ImageNet-1K, ImageNet-A, OK-VQA" in msg
    with pytest.raises(EvalDataError, match=r"'OKVQA'.*'Nope'.*available subsets: ImageNet-1K, ImageNet-A, OK-VQA"):
        load_eval_subsets(str(src), ["OK-VQA", "OKVQA", "Nope"], image_root=images)
    with pytest.raises(EvalDataError, match="does not exist"):
        load_eval_subset(str(tmp_path / "nowhere"), "OK-VQA")


def test_hub_id_goes_through_the_same_row_checks(monkeypatch, images):
    import datasets

    calls = []

    def fake_load(source, subset, split=None, cache_dir=None):
        calls.append((source, subset, split))
        return [row(), row(tt=("a", "b"), ti=("", ""))]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda source: ["OK-VQA", "GQA"])
    sub = load_eval_subset("TIGER-Lab/MMEB-eval", "OK-VQA", image_root=images)
    assert calls == [("TIGER-Lab/MMEB-eval", "OK-VQA", "test")]
    assert len(sub) == 2 and sub[1].tgt_text == ("a", "b")
    with pytest.raises(EvalDataError, match=r"did you mean 'GQA'.*available subsets: OK-VQA, GQA"):
        load_eval_subset("TIGER-Lab/MMEB-eval", "GQA ", image_root=images)
    with pytest.raises(ValueError, match="image_root is required"):
        load_eval_subset("TIGER-Lab/MMEB-eval", "OK-VQA")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [row(), row(ti=("", ""))])
    with pytest.raises(EvalDataError, match=r"row 1, field 'tgt_img_path'"):
        load_eval_subset("TIGER-Lab/MMEB-eval", "OK-VQA", image_root=images)


# --------------------------------------------------------------------------- malformed rows

@pytest.mark.parametrize("bad, field, message", [
    (row(ti=("", "")), "tgt_img_path", "has 2 entries but tgt_text has 3"),
    (row(tt="cat"), "tgt_text", "expected a list of strings, got str"),
    (row(tt=("cat", 3)), "tgt_text[1]", "expected a string, got int"),
    (row(q=5), "qry_text", "expected a string, got int"),
    (row(tt=(), ti=()), "tgt_text", "empty candidate list"),
    (row(q="", qi=""), "qry_text", "empty query"),
    (row(tt=("cat", ""), ti=("", "")), "tgt_text[1]", "empty candidate 1"),
    ({k: v for k, v in row().items() if k != "tgt_img_path"}, "tgt_img_path", "missing required field"),
])
def test_malformed_jsonl_rows_name_file_row_and_field(tmp_path, images, bad, field, message):
    path = tmp_path / "src" / "Bad.jsonl"
    write_jsonl(str(path), [row(), row(), bad])
    with pytest.raises(EvalDataError) as err:   # strict_empty: empty sides are refused too
        load_eval_subset(str(tmp_path / "src"), "Bad", image_root=images, strict_empty=True)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "line 3" in msg and f"field {field!r}" in msg and message in msg
    assert (err.value.file, err.value.row, err.value.field, err.value.subset) == (str(path), 2, field, "Bad")
    assert isinstance(err.value, ValueError)


def test_malformed_parquet_row_and_missing_column(tmp_path, images):
    path = tmp_path / "src" / "Bad.parquet"
    write_parquet(str(path), [row(), row(tt=("a", "b"), ti=("",))])
    with pytest.raises(EvalDataError, match=rf"file {path}, row 1, field 'tgt_img_path': has 1 entries"):
        load_eval_subset(str(tmp_path / "src"), "Bad", image_root=images)
    schema = pa.schema([f for f in SCHEMA if f.name != "qry_img_path"])
    write_parquet(str(path), [{k: v for k, v in row().items() if k != "qry_img_path"}], schema=schema)
    with pytest.raises(EvalDataError, match=r"all rows, field 'qry_img_path': missing required column"):
        load_eval_subset(str(tmp_path / "src"), "Bad", image_root=images)


def test_invalid_json_line_and_empty_subset(tmp_path, images):
    write_jsonl(str(tmp_path / "src" / "Bad.jsonl"), [row()], raw_lines=["", "{not json"])
    with pytest.raises(EvalDataError, match=r"Bad.jsonl, line 3, row 1: invalid JSON"):
        load_eval_subset(str(tmp_path / "src"), "Bad", image_root=images)
    write_jsonl(str(tmp_path / "src2" / "Empty.jsonl"), [])
    with pytest.raises(EvalDataError, match="has no rows"):
        load_eval_subset(str(tmp_path / "src2"), "Empty", image_root=images)


def test_image_paths_must_stay_inside_the_root_and_exist(tmp_path, images):
    src = tmp_path / "src"
    write_jsonl(str(src / "Esc.jsonl"), [row(), row(ti=("", "../../secret.png", ""))])
    with pytest.raises(EvalDataError, match=r"row 1, field 'tgt_img_path\[1\]': image path '../../secret.png' points "
                                            r"outside the image root"):
        load_eval_subset(str(src), "Esc", image_root=images)
    write_jsonl(str(src / "Abs.jsonl"), [row(qi="/etc/passwd")])
    with pytest.raises(EvalDataError, match="field 'qry_img_path'.*outside"):
        load_eval_subset(str(src), "Abs", image_root=images, check_images=False)   # lexical check still runs
    write_jsonl(str(src / "Missing.jsonl"), [row(qi="imgs/nope.png")])
    with pytest.raises(EvalDataError, match=r"row 0, field 'qry_img_path': image file not found: .*nope.png"):
        load_eval_subset(str(src), "Missing", image_root=images)
    assert len(load_eval_subset(str(src), "Missing", image_root=images, check_images=False)) == 1
    sub = load_eval_subset(str(src), "Esc", image_root=images, max_rows=1)
    with pytest.raises(ValueError, match="outside"):
        sub.image_path("../x.png")


# --------------------------------------------------------------------------- dedup

def test_unique_items_dedups_candidates_and_keeps_roles_apart():
    rows = [row(q="q", qi="a.png", tt=("cat", "dog", "cat"), ti=("", "", "")),
            row(q="q", qi="b.png", tt=("dog", "cat", "bird"), ti=("", "", "")),
            row(q="q", qi="a.png", tt=("cat", "x"), ti=("", "x.png")),
            row(q="cat", qi="", tt=("q",), ti=("a.png",))]
    items, qi, ci = unique_items(rows)
    assert items[:3] == [EvalItem("query", "q", "a.png"), EvalItem("query", "q", "b.png"),
                         EvalItem("query", "cat", "")]
    assert qi.tolist() == [0, 1, 0, 2]
    cand = {items[i]: i for i in range(3, len(items))}
    assert len(cand) == len(items) - 3 == 5   # cat, dog, bird, (x, x.png), (q, a.png)
    assert all(it.role == "candidate" for it in cand)
    cat, dog = cand[EvalItem("candidate", "cat", "")], cand[EvalItem("candidate", "dog", "")]
    assert ci[0].tolist() == [cat, dog, cat]
    assert ci[1][1] == ci[0][0] and ci[2][0] == ci[0][0]
    # The query "cat" and the candidate "cat" are different items; so are query and candidate ("q", "a.png").
    assert ci[3][0] != qi[0] and items[ci[3][0]] == EvalItem("candidate", "q", "a.png")


def test_reassembled_item_embeddings_give_the_naive_scores():
    rng = np.random.default_rng(0)
    rows = [row(q=f"q{i % 3}", qi="", tt=[f"c{rng.integers(6)}" for _ in range(4)], ti=[""] * 4) for i in range(7)]
    items, qi, ci = unique_items(rows)
    table = {}

    def embed(item):  # a deterministic fake encoder
        if item not in table:
            v = rng.normal(size=8)
            table[item] = v / np.linalg.norm(v)
        return table[item]

    world = 3
    gathered = [np.stack([embed(it) for it in shard(items, r, world)]) if shard(items, r, world) else np.zeros((0, 8))
                for r in range(world)]
    emb = reassemble(gathered, len(items))
    scores = candidate_scores(emb, qi, ci)
    for q, r in enumerate(rows):
        naive = [embed(EvalItem("query", r["qry_text"], "")) @ embed(EvalItem("candidate", t, "")) for t in r["tgt_text"]]
        np.testing.assert_allclose(scores[q], naive)
    assert precision_at_1(scores, candidate_ids=np.stack(ci)).shape == (7,)


# --------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n", [0, 1, 5, 10, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_and_reassemble_round_trip(n, world):
    items = list(range(n))
    parts = [shard(items, r, world) for r in range(world)]
    assert [x for p in parts for x in p] == items                    # contiguous, in order, complete
    size = shard_padded_size(n, world)
    lengths = [len(p) for p in parts]
    assert lengths == sorted(lengths, reverse=True) and max(lengths, default=0) == size
    assert sum(0 < k < size for k in lengths) <= 1                    # only one short shard
    emb = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    local = [emb[slice(*shard_range(n, r, world))] for r in range(world)]
    np.testing.assert_array_equal(reassemble(local, n), emb)                              # unpadded
    padded = [ed.pad_shard(x, n, world) for x in local]
    assert all(len(p) == size for p in padded)
    np.testing.assert_array_equal(reassemble(padded, n), emb)                             # padded (all_gather)
    np.testing.assert_array_equal(reassemble(np.stack(padded), n), emb)                   # stacked [world, size, D]
    t = [ed.pad_shard(torch.from_numpy(x), n, world) for x in local]
    assert torch.equal(reassemble(t, n), torch.from_numpy(emb))
    assert reassemble(parts, n) == items


def test_shard_errors():
    with pytest.raises(ValueError, match="rank 2 / world size 2"):
        shard([1, 2, 3], 2, 2)
    with pytest.raises(ValueError, match="rank 1 returned 1 rows, its shard has 2"):
        reassemble([np.zeros((2, 1)), np.zeros((1, 1))], 4)
    with pytest.raises(ValueError, match="more than the per-rank size"):
        reassemble([np.zeros((5, 1)), np.zeros((5, 1))], 4)
    assert shard_range(10, 3, 4) == (9, 10) and shard_range(9, 3, 4) == (9, 9)


# --------------------------------------------------------------------------- synthetic split

def test_synthetic_eval_split_loads(tmp_path):
    from llave_ds.toy.synthetic import EVAL_SUBSETS, SceneSpec, generate_synthetic_mmeb

    made = generate_synthetic_mmeb(str(tmp_path / "syn"), num_train_per_subset=1, num_eval_per_subset=3,
                                   num_eval_candidates=4, image_size=16)
    subs = load_eval_subsets(made.eval_dir, image_root=made.image_root)
    assert set(subs) == set(EVAL_SUBSETS)
    i2t = subs["Synth_I2T"]
    assert len(i2t) == 3 and i2t.num_candidates == [4, 4, 4]
    with open(os.path.join(made.root, made.manifest["subsets"]["Synth_I2T"]["eval_attributes"])) as fh:
        records = [json.loads(line) for line in fh]
    for r, rec in zip(i2t, records):
        assert r.tgt_text[0] == SceneSpec.from_dict(rec["positive"]).caption()   # ground truth first
        assert os.path.isfile(i2t.image_path(r.qry_img_path))
    t2i = subs["Synth_T2I"]
    assert all(len(set(r.tgt_img_path)) == 4 for r in t2i)
    items, qi, ci = unique_items(subs["Synth_CLS"])
    assert len(qi) == 3 and all(len(c) == 3 for c in ci)   # 3 shape labels per query
    assert len({items[i] for c in ci for i in c}) <= 3     # labels shared across queries embedded once
    # The default image root (the eval directory itself) is wrong for the synthetic layout.
    with pytest.raises(EvalDataError, match="image file not found"):
        load_eval_subset(made.eval_dir, "Synth_T2I")


# --------------------------------------------------------------------------- empty sides

def test_empty_sides_are_kept_counted_and_logged_by_default(tmp_path, images, caplog):
    src = tmp_path / "src"
    rows = [row(), row(q="", qi="", tt=("cat", "", "bird")), row(tt=("", "", "x"))]
    write_parquet(str(src / "Holes" / "test-00000-of-00001.parquet"), rows)
    with caplog.at_level("WARNING", logger="llave_ds.eval.mmeb_data"):
        sub = load_eval_subset(str(src), "Holes", image_root=images)
    assert len(sub) == 3 and sub[1].qry_text == "" and sub[1].tgt_text == ("cat", "", "bird")
    assert sub.empty_sides == {"query": 1, "candidate": 3}
    assert "Holes: 1 empty query and 3 empty candidates" in caplog.text
    # An empty candidate is one item (candidate, "", ""), shared across queries.
    items, _, ci = unique_items(sub)
    empty = items.index(EvalItem("candidate", "", ""))
    assert ci[1][1] == ci[2][0] == ci[2][1] == empty
    assert EvalItem("query", "", "") in items
    with pytest.raises(EvalDataError, match=r"Holes.*row 1, field 'qry_text': empty query") as err:
        load_eval_subsets(str(src), ["Holes"], image_root=images, strict_empty=True)
    assert err.value.file.endswith("test-00000-of-00001.parquet")
    # A subset without empty sides logs nothing about them.
    write_parquet(str(src / "Full" / "test-00000-of-00001.parquet"), [row()])
    caplog.clear()
    with caplog.at_level("WARNING", logger="llave_ds.eval.mmeb_data"):
        assert load_eval_subset(str(src), "Full", image_root=images, strict_empty=True).empty_sides == \
            {"query": 0, "candidate": 0}
    assert "empty" not in caplog.text
