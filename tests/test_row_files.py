"""llave_ds.data.row_files: a local training source read file by file and written back in the
same layout with the hard negatives replaced, readable by the training reader."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llave_ds.data.errors import DataError
from llave_ds.data.mmeb_train import MMEBTrainDataset, TrainDataConfig
from llave_ds.data.row_files import RowFile, read_rows, row_files, write_rows
from llave_ds.formats import NEGATIVE_FIELDS
from llave_ds.toy.synthetic import prepare_synthetic_mmeb

NEG = list(NEGATIVE_FIELDS)
# SubA has negatives (lists, some rows without any) and an int64 column; SubB has no negative fields.
PARQUET_SCHEMAS = {
    "SubA": pa.schema([("qry", pa.string()), ("qry_image_path", pa.string()), ("neg_text", pa.list_(pa.string())),
                       ("pos_text", pa.string()), ("pos_image_path", pa.string()),
                       ("neg_image_path", pa.list_(pa.string())), ("idx", pa.int64())]),
    "SubB": pa.schema([("qry", pa.string()), ("qry_image_path", pa.string()), ("pos_text", pa.string()),
                       ("pos_image_path", pa.string()), ("score", pa.float32())]),
}
# (relative path of each file, rows of each file) per layout, for a subset; 3 rows per subset.
LAYOUTS = {
    "flat_parquet": lambda s: [(f"{s}.parquet", [0, 1, 2])],
    "flat_jsonl": lambda s: [(f"{s}.jsonl", [0, 1, 2])],
    "llave_json": lambda s: [(f"{s}.json", [0, 1, 2])],
    "sharded_parquet": lambda s: [(f"{s}/train-00000-of-00002.parquet", [0, 1]),
                                  (f"{s}/train-00001-of-00002.parquet", [2])],
}


def source_row(subset, i):
    if subset == "SubA":
        negs = [] if i == 1 else [f"old neg {i}.{j}" for j in range(i + 1)]
        return dict(qry=f"query {subset} {i}", qry_image_path="", neg_text=negs, pos_text=f"answer {subset} {i}",
                    pos_image_path="", neg_image_path=[""] * len(negs), idx=10 * i)
    return dict(qry=f"query {subset} {i}", qry_image_path="", pos_text=f"answer {subset} {i}", pos_image_path="",
                score=0.5 * i)


def make_source(root: Path, layout: str):
    """Write the two-subset source; return {relative path: rows} as written."""
    written = {}
    for subset in ("SubA", "SubB"):
        for rel, idx in LAYOUTS[layout](subset):
            rows = [source_row(subset, i) for i in idx]
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".parquet"):
                pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMAS[subset]), path)
            elif rel.endswith(".jsonl"):
                path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            else:
                path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
            written[rel] = rows
    return written


def mined(row):
    return [f"mined for {row['qry']}"]


def non_negative(row):
    return {k: v for k, v in row.items() if k not in NEG}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_replace_negatives_in_every_layout(tmp_path, layout):
    src, out_root = tmp_path / "src", tmp_path / "out"
    written = make_source(src, layout)
    (src / "images").mkdir()  # not data: not listed, not copied
    (src / "images" / "x.png").write_bytes(b"png")
    (src / "README.md").write_text("notes")
    files = row_files(str(src), split="train")
    assert [(f.subset, f.relative.as_posix()) for f in files] == [(rel[:4], rel) for rel in written]
    fmt = {"flat_parquet": "parquet", "flat_jsonl": "jsonl", "llave_json": "json", "sharded_parquet": "parquet"}
    assert {f.format for f in files} == {fmt[layout]}
    for f in files:
        rows = read_rows(f)
        assert rows == written[f.relative.as_posix()]  # native values, file order
        new = [dict(r, neg_text=mined(r), neg_image_path=[""]) for r in rows]
        assert write_rows(f, new, out_root, NEG) == out_root / f.relative

    # (1) the output mirrors the input's data files, nothing else
    out_files = sorted(p.relative_to(out_root).as_posix() for p in out_root.rglob("*") if p.is_file())
    assert out_files == sorted(written)
    assert [(f.subset, f.relative, f.format) for f in row_files(str(out_root), split="train")] == \
           [(f.subset, f.relative, f.format) for f in files]

    # (2) the training reader sees the new negatives
    data = MMEBTrainDataset(TrainDataConfig(source=str(out_root), image_root=str(tmp_path), split="train",
                                            use_hard_negatives=True, num_hard_negatives=1))
    assert data.subsets == ["SubA", "SubB"] and len(data) == 6
    for k in range(len(data)):
        pair = data[k]
        assert [n.text for n in pair.negatives] == [f"mined for {pair.query.text}"]
        assert pair.negatives[0].image_path is None

    # (3) every other field, and every parquet column type, as in the input
    for f in files:
        out = RowFile(f.subset, out_root / f.relative, f.relative, f.format)
        back = read_rows(out)
        original = written[f.relative.as_posix()]
        assert [non_negative(r) for r in back] == [non_negative(r) for r in original]
        assert [r["neg_text"] for r in back] == [mined(r) for r in original]
        if f.format == "parquet":
            before, after = pq.read_schema(f.path), pq.read_schema(out.path)
            for field in before:
                assert after.field(field.name).type == (pa.list_(pa.string()) if field.name in NEG else field.type)
            assert after.names[:len(before.names)] == before.names  # negatives kept in place or appended
            assert after.field("neg_image_path").type == pa.list_(pa.string())
        elif f.format == "jsonl":
            keys = [list(json.loads(line)) for line in out.path.read_text().splitlines()]
            assert keys == [list(r) + [n for n in NEG if n not in r] for r in original]


def test_a_row_without_a_negative_field_gets_an_empty_list(tmp_path):
    make_source(tmp_path / "src", "flat_jsonl")
    f = row_files(str(tmp_path / "src"), ["SubB"])[0]
    rows = [dict(r, neg_text=["x"]) for r in read_rows(f)]
    path = write_rows(f, rows, tmp_path / "out", NEG)
    assert [(r["neg_text"], r["neg_image_path"]) for r in read_rows(RowFile("SubB", path, f.relative, "jsonl"))] \
        == [(["x"], [])] * 3
    bad = [dict(r, neg_text="not a list") for r in read_rows(f)]
    with pytest.raises(DataError, match=r"row|neg_text"):
        write_rows(f, bad, tmp_path / "out2", NEG)


def test_mmeb_train_string_negatives_become_lists_with_the_datasets_record(tmp_path):
    """The hub's MMEB-train: neg_text / neg_image_path are strings and the file carries the
    datasets feature record, which must describe the new list columns."""
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    rows = [dict(qry=f"q{i}", qry_image_path="", pos_text=f"p{i}", pos_image_path="", neg_text=f"n{i}",
                 neg_image_path="") for i in range(3)]
    (src / "SubA").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(src / "SubA" / "original-00000-of-00001.parquet"))
    f, = row_files(str(src), split="original")
    assert read_rows(f) == rows
    path = write_rows(f, [dict(r, neg_text=[r["neg_text"] + "!"], neg_image_path=[""]) for r in read_rows(f)],
                      tmp_path / "out", NEG)
    record = json.loads(pq.read_schema(path).metadata[b"huggingface"])["info"]["features"]
    features = datasets.Features.from_dict(record)
    assert features.arrow_schema.field("neg_text").type == pa.list_(pa.string())
    data = MMEBTrainDataset(TrainDataConfig(source=str(tmp_path / "out"), use_hard_negatives=True))
    assert [data[k].negatives[0].text for k in range(3)] == ["n0!", "n1!", "n2!"]


def test_pandas_written_parquet_stays_readable_by_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    (tmp_path / "src").mkdir()
    pd.DataFrame(dict(qry=["q0", "q1"], qry_image_path="", pos_text=["p0", "p1"], pos_image_path="",
                      neg_text=["n0", "n1"])).to_parquet(tmp_path / "src" / "SubA.parquet")
    f, = row_files(str(tmp_path / "src"))
    path = write_rows(f, [dict(r, neg_text=["m"]) for r in read_rows(f)], tmp_path / "out", NEG)
    frame = pq.read_table(path).to_pandas()
    assert frame["neg_text"].map(list).tolist() == [["m"], ["m"]] and frame["qry"].tolist() == ["q0", "q1"]


@pytest.mark.parametrize("file_format", ["parquet", "jsonl"])
def test_synthetic_train_split_round_trips_unchanged(tmp_path, file_format):
    train_dir, _ = prepare_synthetic_mmeb(str(tmp_path / "synth"), num_train_per_subset=4, num_eval_per_subset=2,
                                          subsets=["Synth_I2T", "Synth_CLS"], file_format=file_format)
    files = row_files(train_dir)
    assert [f.relative.as_posix() for f in files] == [f"Synth_CLS.{file_format}", f"Synth_I2T.{file_format}"]
    for f in files:
        rows = read_rows(f)
        assert len(rows) == 4 and all(len(r["neg_text"]) == 2 for r in rows)
        out = write_rows(f, rows, tmp_path / "out", NEG)
        assert read_rows(RowFile(f.subset, out, f.relative, f.format)) == rows
        if file_format == "parquet":
            assert pq.read_schema(out) == pq.read_schema(f.path)
        else:
            assert out.read_bytes() == f.path.read_bytes()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="local directory"):
        row_files("TIGER-Lab/MMEB-train")
    with pytest.raises(DataError, match="does not exist.*local directory"):
        row_files(str(tmp_path / "nowhere"))
    src = tmp_path / "src"
    make_source(src, "flat_jsonl")
    with pytest.raises(DataError, match="unknown subset 'SubC'.*SubA, SubB"):
        row_files(str(src), ["SubA", "SubC"])
    with pytest.raises(DataError, match="no subsets found"):
        os.mkdir(tmp_path / "empty")
        row_files(str(tmp_path / "empty"))

    path = src / "SubA.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"qry": "cut off', lines[2]]) + "\n")
    f = row_files(str(src), ["SubA"])[0]
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: invalid JSON")) as err:
        read_rows(f)
    assert err.value.file == str(path) and err.value.subset == "SubA"
    path.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        read_rows(f)

    (src / "SubB.jsonl").unlink()
    (src / "SubB.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"SubB\.parquet: cannot read it as parquet"):
        read_rows(row_files(str(src), ["SubB"])[0])
    (src / "SubC.json").write_text('{"qry": "an object, not an array"}')
    with pytest.raises(DataError, match=r"SubC\.json: expected a JSON array"):
        read_rows(row_files(str(src), ["SubC"])[0])
