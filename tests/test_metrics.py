"""llave_ds.eval.mmeb_metrics: precision@1 conventions, aggregation, markdown, similarity gaps, subset file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llave_ds.eval import mmeb_metrics as M
from llave_ds.eval.mmeb_metrics import (aggregate, candidate_scores, markdown_table, official_subsets, precision_at_1,
                                        similarity_gap_stats, subset_registry)

# FIELD_NOTES §2, the benchmark paper's grouping.
EXPECTED = {
    "classification": (["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"],
                       ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"]),
    "vqa": (["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"],
            ["ScienceQA", "VizWiz", "GQA", "TextVQA"]),
    "retrieval": (["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                   "WebQA"], ["OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"]),
    "grounding": (["MSCOCO"], ["RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"]),
}


# --------------------------------------------------------------------------- subsets file

def test_official_subsets_match_the_benchmark_table():
    info = official_subsets()
    assert len(info) == 36
    for category, (ind, ood) in EXPECTED.items():
        for name in ind:
            assert (info[name].category, info[name].distribution) == (category, "IND"), name
        for name in ood:
            assert (info[name].category, info[name].distribution) == (category, "OOD"), name
    counts = {c: sum(i.category == c for i in info.values()) for c in M.CATEGORIES}
    assert counts == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    assert sum(i.distribution == "IND" for i in info.values()) == 20
    assert all(i.official for i in info.values())
    with open(M.SUBSETS_FILE, encoding="utf-8") as fh:
        assert list(json.load(fh)["official"]) == list(info)


def test_synthetic_subsets_follow_the_generator():
    from llave_ds.toy.synthetic import EVAL_SUBSETS

    synth = M.synthetic_subsets()
    assert set(synth) == set(EVAL_SUBSETS)
    for name, (_, category) in EVAL_SUBSETS.items():
        assert synth[name].category == category
        assert synth[name].distribution == "synthetic" and not synth[name].official


def test_registry_user_subsets_and_refusal_to_redefine_official():
    reg = subset_registry({"MyRet": "retrieval", "MyOOD": {"category": "vqa", "distribution": "OOD"}})
    assert (reg["MyRet"].category, reg["MyRet"].distribution) == ("retrieval", None)
    assert (reg["MyOOD"].category, reg["MyOOD"].distribution) == ("vqa", "OOD")
    with pytest.raises(ValueError, match="official"):
        subset_registry({"ImageNet-1K": "retrieval"})
    with pytest.raises(ValueError, match="category"):
        subset_registry({"X": "captioning"})


# --------------------------------------------------------------------------- precision@1

def test_ties_first_vs_strict():
    s = np.array([[0.5, 0.5, 0.1],    # tie with the ground truth
                  [0.2, 0.9, 0.1],    # miss
                  [0.3, 0.1, 0.2],    # clean hit
                  [0.4, 0.4, 0.4]])   # all tied
    assert precision_at_1(s).tolist() == [True, False, True, True]
    assert precision_at_1(s, tie_policy="first").tolist() == [True, False, True, True]
    assert precision_at_1(s, tie_policy="strict").tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="tie_policy"):
        precision_at_1(s, tie_policy="random")


def test_ground_truth_not_first_follows_argmax():
    s = np.array([[0.5, 0.5, 0.1],    # tie before the ground truth at 1: argmax picks 0 -> miss
                  [0.1, 0.5, 0.5]])   # tie after the ground truth at 1: argmax picks 1 -> hit
    assert precision_at_1(s, ground_truth_index=1).tolist() == [False, True]
    assert precision_at_1(s, ground_truth_index=[0, 1]).tolist() == [True, True]
    assert precision_at_1(s, ground_truth_index=[0, 1], tie_policy="strict").tolist() == [False, False]
    with pytest.raises(ValueError, match="out of range"):
        precision_at_1(s, ground_truth_index=3)


def test_duplicate_candidates():
    # Candidate 2 is the same item as the ground truth (embedded once -> identical score);
    # candidate 1 duplicates a negative.
    s = np.array([[0.7, 0.3, 0.7, 0.3]])
    ids = np.array([[10, 11, 10, 11]])
    assert precision_at_1(s, tie_policy="strict").tolist() == [False]       # scores alone: a tie
    assert precision_at_1(s, tie_policy="strict", candidate_ids=ids).tolist() == [True]
    assert precision_at_1(s, candidate_ids=ids).tolist() == [True]
    # A duplicated negative that beats the ground truth is still a miss.
    s2 = np.array([[0.2, 0.6, 0.6]])
    assert precision_at_1(s2, candidate_ids=np.array([[1, 2, 2]])).tolist() == [False]
    # Ground truth at 1 with its duplicate at 0 winning the argmax: counts as the ground truth.
    s3 = np.array([[0.8, 0.8, 0.1]])
    assert precision_at_1(s3, ground_truth_index=1).tolist() == [False]
    assert precision_at_1(s3, ground_truth_index=1, candidate_ids=np.array([[5, 5, 6]])).tolist() == [True]


def test_single_candidate_is_always_a_hit():
    assert precision_at_1(np.array([[-0.3], [0.9]])).tolist() == [True, True]
    assert precision_at_1(np.array([[-0.3]]), tie_policy="strict").tolist() == [True]
    assert precision_at_1([np.array([0.1])], tie_policy="strict").tolist() == [True]


def test_variable_candidate_counts_match_the_matrix_path():
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=n) for n in (1, 3, 7, 2, 5)]
    rows[2][0] = rows[2].max() + 1.0
    rows[2][4] = rows[2][0]  # a tie with the ground truth at the top
    hits = precision_at_1(rows)
    strict = precision_at_1(rows, tie_policy="strict")
    for q, r in enumerate(rows):
        assert hits[q] == (np.argmax(r) == 0)
        assert strict[q] == bool(all(r[0] > r[j] for j in range(1, len(r))))
    assert hits[2] and not strict[2]
    # Same answers through the matrix path when counts agree.
    mat = rng.normal(size=(6, 4))
    assert precision_at_1(list(mat)).tolist() == precision_at_1(mat).tolist()
    assert precision_at_1(torch.tensor(mat, dtype=torch.bfloat16)).shape == (6,)


def test_nan_and_empty_errors_name_the_query():
    s = np.zeros((4, 3))
    s[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"query 2: score of candidate 1 is NaN"):
        precision_at_1(s)
    with pytest.raises(ValueError, match=r"query 1: score of candidate 0 is NaN"):
        precision_at_1([np.array([0.1, 0.2]), np.array([np.nan, 0.2])])
    with pytest.raises(ValueError, match=r"query 1 has no candidates"):
        precision_at_1([np.array([0.1, 0.2]), np.array([])])
    with pytest.raises(ValueError, match="single query"):
        precision_at_1(np.array([0.1, 0.2]))
    assert precision_at_1(np.zeros((0, 3))).shape == (0,)


def test_candidate_scores_from_deduplicated_items():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(6, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    qi = np.array([0, 1])
    ci = [np.array([2, 3, 4]), np.array([5, 2, 3])]
    s = candidate_scores(emb, qi, ci)
    assert s.shape == (2, 3)
    np.testing.assert_allclose(s[1], [emb[1] @ emb[5], emb[1] @ emb[2], emb[1] @ emb[3]])
    ragged = candidate_scores(emb * 3, qi, [np.array([2, 3]), np.array([5])], normalize=True)
    assert isinstance(ragged, list) and ragged[1].shape == (1,)
    np.testing.assert_allclose(ragged[0], [emb[0] @ emb[2], emb[0] @ emb[3]])


# --------------------------------------------------------------------------- aggregation

PER_SUBSET = {
    "ImageNet-1K": 0.80,   # classification IND
    "Place365": 0.40,      # classification OOD
    "OK-VQA": 0.60,        # vqa IND
    "MSCOCO_i2t": 0.70,    # retrieval IND
    "OVEN": 0.50,          # retrieval OOD
    "RefCOCO": 0.90,       # grounding OOD
}


def test_aggregate_hand_computed():
    r = aggregate(PER_SUBSET)
    assert r["overall"] == pytest.approx((0.8 + 0.4 + 0.6 + 0.7 + 0.5 + 0.9) / 6)
    assert r["by_category"]["classification"] == pytest.approx(0.6)
    assert r["by_category"]["vqa"] == pytest.approx(0.6)
    assert r["by_category"]["retrieval"] == pytest.approx(0.6)
    assert r["by_category"]["grounding"] == pytest.approx(0.9)
    assert r["by_distribution"]["IND"] == pytest.approx((0.8 + 0.6 + 0.7) / 3)
    assert r["by_distribution"]["OOD"] == pytest.approx((0.4 + 0.5 + 0.9) / 3)
    assert "synthetic" not in r["by_distribution"]
    assert r["counts"] == {"overall": 6, "classification": 2, "vqa": 1, "retrieval": 2, "grounding": 1,
                           "IND": 3, "OOD": 3}
    assert len(r["missing_official"]) == 30 and "N24News" in r["missing_official"]
    assert "ImageNet-1K" not in r["missing_official"] and not r["comparable_to_mmeb"]


def test_aggregate_unweighted_mean_and_absent_categories():
    # Overall is the mean of subset scores, not of category means.
    r = aggregate({"ImageNet-1K": 1.0, "N24News": 1.0, "SUN397": 1.0, "OK-VQA": 0.0})
    assert r["overall"] == pytest.approx(0.75)
    assert r["by_category"]["retrieval"] is None and r["counts"]["retrieval"] == 0
    assert r["by_distribution"]["OOD"] is None


def test_aggregate_user_and_synthetic_subsets():
    r = aggregate({"Synth_I2T": 0.5, "Synth_CLS": 1.0, "Mine": 0.25}, {"Mine": "retrieval"})
    assert r["by_category"]["retrieval"] == pytest.approx(0.375)
    assert r["by_distribution"]["synthetic"] == pytest.approx(0.75)
    assert r["by_distribution"]["IND"] is None
    assert r["overall"] == pytest.approx(1.75 / 3)
    with pytest.raises(ValueError, match=r"no category known for subset\(s\) \['Mine'\]"):
        aggregate({"Mine": 0.5})
    with pytest.raises(ValueError, match="percentage"):
        aggregate({"ImageNet-1K": 65.2})


def test_aggregate_full_benchmark_is_comparable():
    scores = {name: (i % 10) / 10 for i, name in enumerate(official_subsets())}
    r = aggregate(scores)
    assert r["comparable_to_mmeb"] and r["missing_official"] == []
    assert r["overall"] == pytest.approx(np.mean(list(scores.values())))
    assert r["counts"]["IND"] == 20 and r["counts"]["OOD"] == 16
    assert "comparable to published MMEB scores" in markdown_table(r)


def test_markdown_table_contains_the_numbers():
    r = aggregate(PER_SUBSET)
    md = markdown_table(r)
    assert "| score | 65.0 | 60.0 | 60.0 | 60.0 | 90.0 | 70.0 | 60.0 |" in md
    assert "| subsets | 6 | 2 | 1 | 2 | 1 | 3 | 3 |" in md
    assert "| RefCOCO | grounding | OOD | 90.0 |" in md
    assert "30 of 36 official subsets missing" in md
    md_frac = markdown_table(r, percent=False, digits=3, per_subset=False)
    assert "| score | 0.650 | 0.600 |" in md_frac and "RefCOCO |" not in md_frac
    md_empty = markdown_table(aggregate({"OK-VQA": 0.5}))
    assert "| score | 50.0 | – | 50.0 | – | – | 50.0 | – |" in md_empty


# --------------------------------------------------------------------------- similarity gaps

def test_similarity_gap_stats_hand_computed():
    s = np.array([[0.9, 0.2, 0.5],    # gap 0.4
                  [0.6, 0.58, 0.1],   # gap 0.02
                  [0.3, 0.7, 0.0],    # gap -0.4
                  [0.8, 0.72, 0.1]])  # gap 0.08
    st = similarity_gap_stats(s, margins=(0.0, 0.05, 0.1))
    assert st.num_queries == 4 and st.num_without_negative == 0
    assert st.mean_pos == pytest.approx(0.65)
    assert st.mean_hardest_neg == pytest.approx((0.5 + 0.58 + 0.7 + 0.72) / 4)
    assert st.mean_gap == pytest.approx((0.4 + 0.02 - 0.4 + 0.08) / 4)
    assert st.frac_beaten_by == pytest.approx({0.0: 0.75, 0.05: 0.5, 0.1: 0.25})
    assert st.pos_hist.sum() == 4 and st.neg_hist.sum() == 4
    assert len(st.hist_edges) == len(st.pos_hist) + 1 and st.hist_edges[0] == -1.0
    assert json.dumps(st.to_dict())


def test_similarity_gap_ties_single_candidates_and_nan():
    st = similarity_gap_stats([np.array([0.5, 0.5]), np.array([0.3]), np.array([0.4, 0.1, 0.2])])
    assert st.num_queries == 2 and st.num_without_negative == 1
    assert st.frac_beaten_by[0.0] == pytest.approx(0.5)   # a tie does not beat the negative
    assert st.mean_gap == pytest.approx(0.1)
    with pytest.raises(ValueError, match="query 0"):
        similarity_gap_stats(np.array([[np.nan, 0.1]]))


def test_candidate_scores_dense_and_per_query_paths_agree():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(20, 8)).astype(np.float32)
    qi = np.arange(5)
    ci = [rng.integers(5, 20, size=6) for _ in range(5)]
    dense = candidate_scores(emb, qi, ci, normalize=True)
    looped = candidate_scores(emb, qi, ci, normalize=True, max_dense=0)
    assert dense.dtype == np.float32 and dense.shape == (5, 6)
    np.testing.assert_allclose(dense, looped, rtol=1e-5, atol=1e-6)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(dense[3], unit[ci[3]] @ unit[3], rtol=1e-5, atol=1e-6)


def test_aggregate_separates_unknown_subsets_on_request():
    scores = {"OK-VQA": 0.5, "CIFAR-100": 0.9, "GQA": 0.25}
    with pytest.raises(ValueError, match=r"\['CIFAR-100'\].*unknown='separate'"):
        aggregate(scores)
    r = aggregate(scores, unknown="separate")
    assert r["other"] == {"CIFAR-100": 0.9}
    assert r["per_subset"] == {"OK-VQA": 0.5, "GQA": 0.25}
    assert r["overall"] == pytest.approx(0.375) and r["by_category"]["vqa"] == pytest.approx(0.375)
    assert r["counts"]["overall"] == 2 and "CIFAR-100" not in r["subsets"]
    md = markdown_table(r)
    assert "Other subsets (1; no known category" in md and "| CIFAR-100 | 90.0 |" in md
    assert "other" not in aggregate({"OK-VQA": 0.5}) and "Other subsets" not in markdown_table(aggregate({"OK-VQA": 0.5}))
    only = aggregate({"CIFAR-100": 0.9}, unknown="separate")      # nothing known: empty aggregates, no error
    assert only["overall"] is None and only["other"] == {"CIFAR-100": 0.9}
    assert "CIFAR-100" in markdown_table(only)
    with pytest.raises(ValueError, match="percentage"):
        aggregate({"CIFAR-100": 90.0}, unknown="separate")
    with pytest.raises(ValueError, match="unknown must be one of"):
        aggregate(scores, unknown="drop")
