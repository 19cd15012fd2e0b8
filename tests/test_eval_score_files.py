"""`llave-ds eval` on a directory in the hub download's layout: default subset selection
(official + synthetic, CIFAR-100 skipped), per-subset score files written as each subset
finishes and reused on a re-run, a named unknown subset reported on its own, and empty
texts embedded as "" by default (refused with --strict-empty)."""
from __future__ import annotations

import json
import logging
import os

import pytest

from tests.distributed_harness import run_distributed
from tests.test_eval_data import row, write_parquet

OFFICIAL = ("ImageNet-1K", "OK-VQA", "MSCOCO_t2i")   # benchmark order
SYNTHETIC = ("Synth_CLS",)
EXTRA = "CIFAR-100"


def _png(path, color):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (24, 24), color).save(path)


def build_mmeb_eval_dir(root) -> dict:
    """A small MMEB-eval download: ``<Subset>/test-00000-of-00001.parquet`` per subset plus
    ``eval_images/``; OK-VQA has one empty query and two empty candidates."""
    root = str(root)
    images = os.path.join(root, "eval_images")
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, c in enumerate(colors):
        _png(os.path.join(images, "imgs", f"{i}.png"), c)
    labels = ("red", "green", "blue", "yellow")

    def cls_rows(n):   # image query, label candidates, ground truth first
        return [row(q="<|image_1|>\nWhat colour is it?", qi=f"imgs/{i}.png",
                    tt=(labels[i],) + tuple(label for label in labels if label != labels[i]), ti=("",) * 4)
                for i in range(n)]

    subsets = {
        "ImageNet-1K": cls_rows(4),
        "MSCOCO_t2i": [row(q=f"a {labels[i]} square", qi="", tt=("<|image_1|>",) * 3,
                           ti=tuple(f"imgs/{(i + k) % 4}.png" for k in range(3))) for i in range(3)],
        "OK-VQA": [row(q="<|image_1|>\nWhat is shown?", qi="imgs/0.png", tt=("red", "", "blue"), ti=("",) * 3),
                   row(q="", qi="", tt=("green", "red", ""), ti=("",) * 3),
                   row(q="<|image_1|>\nColour?", qi="imgs/2.png", tt=("blue", "green"), ti=("", ""))],
        "Synth_CLS": cls_rows(3),
        EXTRA: cls_rows(2),
    }
    for name, rows in subsets.items():
        write_parquet(os.path.join(root, name, "test-00000-of-00001.parquet"), rows)
    return {"data": root, "images": images}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from llave_ds.toy.tiny import build_tiny_model_dir
    return str(build_tiny_model_dir(tmp_path_factory.mktemp("eval_tiny") / "tiny", "llava_onevision", seed=2))


@pytest.fixture
def data(tmp_path):
    return build_mmeb_eval_dir(tmp_path / "MMEB-eval")


@pytest.fixture
def encoded(monkeypatch):
    """Every side the embedder encodes: (role, text, has image), one list per call."""
    from llave_ds.model.embedder import LlaveEmbedder

    calls: list[list[tuple[str, str, bool]]] = []
    original = LlaveEmbedder.encode_sides

    def counting(self, sides, role="query", **kwargs):
        sides = list(sides)
        calls.append([(role, s.text, s.image is not None) for s in sides])
        return original(self, sides, role=role, **kwargs)

    monkeypatch.setattr(LlaveEmbedder, "encode_sides", counting)
    return calls


def _eval(model_dir, data, out, *extra):
    from llave_ds.cli import main
    return main(["eval", "--model", model_dir, "--data", data["data"], "--image-root", data["images"],
                 "--out", str(out), "--no-progress", "--batch-size", "4", *extra])


def _num_sides(calls) -> int:
    return sum(len(c) for c in calls)


def test_default_run_scores_official_and_synthetic_skips_cifar_and_writes_as_it_goes(model_dir, data, tmp_path,
                                                                                     encoded, caplog):
    caplog.set_level(logging.INFO, logger="llave_ds.eval.mmeb")
    out = tmp_path / "res" / "eval.json"
    assert _eval(model_dir, data, out) == 0
    summary = json.loads(out.read_text())
    assert list(summary["per_subset"]) == list(OFFICIAL) + list(SYNTHETIC)   # benchmark order, then synthetic
    assert summary["not_evaluated"] == [EXTRA] and summary["other"] == {}
    assert "CIFAR-100" in caplog.text and "not evaluated" in caplog.text
    assert summary["counts"]["overall"] == 4 and summary["counts"]["synthetic"] == 1
    assert summary["missing_official"] and not summary["comparable_to_mmeb"]
    md = out.with_suffix(".md").read_text()
    assert "Not evaluated" in md and EXTRA in md and "OK-VQA" in md

    scores_dir = tmp_path / "res" / "eval_subsets"
    assert summary["scores_dir"] == str(scores_dir)
    assert sorted(os.listdir(scores_dir)) == sorted(f"{n}_score.json" for n in OFFICIAL + SYNTHETIC)
    embedded = 0
    for name in OFFICIAL + SYNTHETIC:
        rec = json.loads((scores_dir / f"{name}_score.json").read_text())
        assert rec["subset"] == name and rec["p_at_1"] == summary["per_subset"][name]
        assert rec["num_queries"] == summary["num_queries"][name] == len(rec["per_query"]["hit"])
        assert rec["p_at_1"] == pytest.approx(sum(rec["per_query"]["hit"]) / rec["num_queries"])
        assert rec["gap"] == summary["gap"][name]
        assert set(rec["fingerprint"]) == {"model", "data", "options"}
        embedded += rec["num_embedded"]
    assert embedded == _num_sides(encoded)               # every distinct side encoded exactly once
    # Score files are written as each subset finishes: in evaluation order, before the summary.
    written = [os.stat(scores_dir / f"{n}_score.json").st_mtime_ns for n in OFFICIAL + SYNTHETIC]
    assert written == sorted(written) and written[-1] <= os.stat(out).st_mtime_ns


def test_rerun_loads_matching_score_files_and_reencodes_only_what_changed(model_dir, data, tmp_path, encoded,
                                                                          caplog):
    out = tmp_path / "eval.json"
    assert _eval(model_dir, data, out) == 0
    first = json.loads(out.read_text())
    assert _num_sides(encoded) > 0
    encoded.clear()
    caplog.set_level(logging.INFO, logger="llave_ds.eval.mmeb")
    assert _eval(model_dir, data, out) == 0
    assert encoded == []                                  # nothing encoded again
    second = json.loads(out.read_text())
    assert second["already_scored"] == list(OFFICIAL + SYNTHETIC)
    for key in ("per_subset", "overall", "by_category", "by_distribution", "gap", "num_queries"):
        assert second[key] == first[key], key
    assert caplog.text.count("skipped, already scored") == len(OFFICIAL + SYNTHETIC)

    # Changed data of one subset: only that one is encoded again.
    path = os.path.join(data["data"], "ImageNet-1K", "test-00000-of-00001.parquet")
    write_parquet(path, [row(q="<|image_1|>\nColour?", qi="imgs/1.png", tt=("green", "red"), ti=("", ""))])
    caplog.clear()
    assert _eval(model_dir, data, out) == 0
    third = json.loads(out.read_text())
    assert third["already_scored"] == ["OK-VQA", "MSCOCO_t2i", "Synth_CLS"]
    assert _num_sides(encoded) == third["num_embedded"]["ImageNet-1K"] == 3
    assert "ImageNet-1K" in caplog.text and "computed with something else" in caplog.text

    # Different options (max_rows) do not match either; --rescore encodes everything.
    encoded.clear()
    assert _eval(model_dir, data, out, "--max-rows", "2") == 0
    assert json.loads(out.read_text())["already_scored"] == []
    encoded.clear()
    assert _eval(model_dir, data, out, "--max-rows", "2") == 0
    assert encoded == []
    assert _eval(model_dir, data, out, "--max-rows", "2", "--rescore") == 0
    assert _num_sides(encoded) == sum(json.loads(out.read_text())["num_embedded"].values())

    # A damaged score file is not trusted.
    (tmp_path / "eval_subsets" / "OK-VQA_score.json").write_text("{not json")
    encoded.clear()
    assert _eval(model_dir, data, out, "--max-rows", "2") == 0
    assert json.loads(out.read_text())["already_scored"] == ["ImageNet-1K", "MSCOCO_t2i", "Synth_CLS"]
    assert _num_sides(encoded) == json.loads(out.read_text())["num_embedded"]["OK-VQA"]


def test_named_unknown_subset_is_scored_on_its_own(model_dir, data, tmp_path, encoded):
    out = tmp_path / "eval.json"
    scores_dir = tmp_path / "scores"
    assert _eval(model_dir, data, out, "--subsets", "OK-VQA", EXTRA, "Synth_CLS", "--scores-dir",
                 str(scores_dir)) == 0
    summary = json.loads(out.read_text())
    assert set(summary["per_subset"]) == {"OK-VQA", "Synth_CLS"}
    assert list(summary["other"]) == [EXTRA] and 0.0 <= summary["other"][EXTRA] <= 1.0
    assert summary["overall"] == pytest.approx((summary["per_subset"]["OK-VQA"]
                                                + summary["per_subset"]["Synth_CLS"]) / 2)
    assert summary["counts"]["overall"] == 2 and summary["num_queries"][EXTRA] == 2
    rec = json.loads((scores_dir / f"{EXTRA}_score.json").read_text())
    assert rec["category"] is None and rec["p_at_1"] == summary["other"][EXTRA]
    md = out.with_suffix(".md").read_text()
    assert "Other subsets (1" in md and f"| {EXTRA} |" in md
    assert not (tmp_path / "eval_subsets").exists()       # --scores-dir replaces the default place
    # Only the unknown subset named: no aggregate, still a result.
    assert _eval(model_dir, data, tmp_path / "only.json", "--subsets", EXTRA, "--scores-dir", str(scores_dir)) == 0
    only = json.loads((tmp_path / "only.json").read_text())
    assert only["overall"] is None and only["other"] == {EXTRA: rec["p_at_1"]}


def test_empty_texts_are_embedded_as_empty_strings_and_refused_when_strict(model_dir, data, tmp_path, encoded,
                                                                           capsys):
    out = tmp_path / "eval.json"
    assert _eval(model_dir, data, out, "--subsets", "OK-VQA") == 0
    summary = json.loads(out.read_text())
    assert summary["empty_sides"]["OK-VQA"] == {"query": 1, "candidate": 2}
    sides = [s for call in encoded for s in call]
    assert ("query", "", False) in sides and ("target", "", False) in sides   # embedded as "", text-only
    assert sum(1 for s in sides if s[1:] == ("", False)) == 2                  # deduplicated: one per role
    rec = json.loads((tmp_path / "eval_subsets" / "OK-VQA_score.json").read_text())
    assert rec["empty_sides"] == {"query": 1, "candidate": 2}
    encoded.clear()
    capsys.readouterr()
    assert _eval(model_dir, data, tmp_path / "strict.json", "--subsets", "OK-VQA", "--strict-empty") == 2
    err = capsys.readouterr().err
    assert "OK-VQA" in err and "test-00000-of-00001.parquet" in err and "field 'tgt_text[1]'" in err
    assert "empty candidate 1" in err and encoded == []


def test_no_official_or_synthetic_subset_is_a_clear_error(model_dir, tmp_path, capsys):
    from llave_ds.cli import main
    root = tmp_path / "only_extra"
    write_parquet(str(root / EXTRA / "test-00000-of-00001.parquet"), [row(qi="")])
    assert main(["eval", "--model", model_dir, "--data", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no official or synthetic MMEB subset" in err and EXTRA in err and "--subsets" in err


def _eval_ranked(rank, world, model_dir, data, out):
    from llave_ds.eval.cli import main

    # Rank 1 is given an --out whose score directory is empty: deciding alone it would encode
    # every subset (and mismatch rank 0's collectives); it must follow rank 0 and write nothing.
    out = out if rank == 0 else out.replace("eval.json", "rank1.json")
    return main(["--model", model_dir, "--data", data["data"], "--image-root", data["images"], "--out", out,
                 "--no-progress", "--batch-size", "2"])


def test_two_ranks_agree_on_stored_subsets_and_only_rank0_writes(model_dir, data, tmp_path):
    out = tmp_path / "eval.json"
    assert _eval(model_dir, data, out, "--subsets", "OK-VQA", "Synth_CLS", "MSCOCO_t2i") == 0
    single = json.loads(out.read_text())
    scores_dir = tmp_path / "eval_subsets"
    os.remove(scores_dir / "Synth_CLS_score.json")          # one stored subset is missing
    kept = {n: os.stat(scores_dir / f"{n}_score.json").st_mtime_ns for n in ("OK-VQA", "MSCOCO_t2i")}
    outcomes = run_distributed(_eval_ranked, 2, model_dir, data, str(out), timeout_s=240)
    assert [o.value for o in outcomes] == [0, 0]
    summary = json.loads(out.read_text())
    assert set(summary["already_scored"]) == {"OK-VQA", "MSCOCO_t2i"}
    assert set(summary["per_subset"]) == set(OFFICIAL + SYNTHETIC)
    for name in ("OK-VQA", "MSCOCO_t2i", "Synth_CLS"):
        assert summary["per_subset"][name] == pytest.approx(single["per_subset"][name]), name
    assert {n: os.stat(scores_dir / f"{n}_score.json").st_mtime_ns for n in kept} == kept
    assert sorted(os.listdir(scores_dir)) == sorted(f"{n}_score.json" for n in OFFICIAL + SYNTHETIC)
    assert not [f for f in os.listdir(scores_dir) if ".tmp" in f]
    assert not (tmp_path / "rank1.json").exists() and not (tmp_path / "rank1_subsets").exists()
