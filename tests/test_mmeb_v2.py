"""MMEB-V2 scoring (issue 26, first part): the task table, the ranking metrics against hand
computations (binary and graded NDCG@5, hit@1, ties), the official candidate construction
(global pool / local lists), the score and prediction files, the summary and the command."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from llave_ds.eval import mmeb_v2
from llave_ds.eval.mmeb_v2_tasks import CATEGORIES, MAIN_METRIC, TASKS, tasks_of
from llave_ds.eval.ranking_metrics import ndcg_at_k, query_metrics, score_predictions

# ------------------------------------------------------------------------------ the tasks


def test_the_78_tasks_by_modality_and_category():
    counts = {m: sum(t.modality == m for t in TASKS.values()) for m in ("image", "video", "visdoc")}
    assert counts == {"image": 36, "video": 18, "visdoc": 24} and len(TASKS) == 78
    per_category = {(t.modality, t.category): 0 for t in TASKS.values()}
    for t in TASKS.values():
        per_category[(t.modality, t.category)] += 1
    assert per_category == {("image", "CLS"): 10, ("image", "QA"): 10, ("image", "RET"): 12, ("image", "VG"): 4,
                            ("video", "CLS"): 5, ("video", "QA"): 5, ("video", "RET"): 5, ("video", "MRET"): 3,
                            ("visdoc", "VDRv1"): 10, ("visdoc", "VDRv2"): 4, ("visdoc", "VR"): 6,
                            ("visdoc", "OOD"): 4}
    assert all(t.category in CATEGORIES[t.modality] for t in TASKS.values())
    assert TASKS["ViDoRe_arxivqa"].main_metric == "ndcg_linear@5" and TASKS["K700"].main_metric == "hit@1"
    assert TASKS["K700"].eval_type == "global" and TASKS["SmthSmthV2"].eval_type == "local"
    assert TASKS["ImageNet-1K"].eval_type == "local" and TASKS["MSR-VTT"].eval_type == "global"
    # the report script's order within a modality
    assert [t.name for t in tasks_of(["video"])][:5] == ["K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast"]
    assert [t.name for t in tasks_of(["image"], ["CIRR", "VisDial"])] == ["VisDial", "CIRR"]
    with pytest.raises(ValueError, match="unknown MMEB-V2 task Foo"):
        tasks_of(None, ["Foo"])
    with pytest.raises(ValueError, match="unknown MMEB-V2 modality audio"):
        tasks_of(["audio"])


# ------------------------------------------------------------------------------ metrics by hand


def test_binary_metrics_by_hand():
    # relevant: a, c; ranking c x a y z b
    m = query_metrics(["c", "x", "a", "y", "z", "b"], ["a", "c"])
    assert m["hit@1"] == 1.0 and m["precision@1"] == 1.0 and m["recall@1"] == 0.5
    assert m["precision@5"] == pytest.approx(2 / 5) and m["recall@5"] == 1.0
    assert m["f1@5"] == pytest.approx(2 * 0.4 * 1.0 / 1.4)
    assert m["map@5"] == pytest.approx((1 / 1 + 2 / 3) / 2) and m["mrr@5"] == 1.0
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg_linear@5"] == pytest.approx(dcg / idcg) and m["ndcg_exponential@5"] == pytest.approx(dcg / idcg)
    miss = query_metrics(["x", "a"], ["a"])
    assert miss["hit@1"] == 0.0 and miss["mrr@10"] == 0.5 and miss["ndcg_linear@1"] == 0.0
    assert miss["ndcg_linear@5"] == pytest.approx(1 / math.log2(3))


def test_graded_ndcg_by_hand_and_each_page_keeps_its_grade():
    # p1 grade 2, p2 grade 1; the ranking puts p2 first and p1 third
    linear = ndcg_at_k(["p2", "x", "p1", "y", "z"], ["p1", "p2"], 5, [2, 1])
    assert linear == pytest.approx((1 / 1 + 2 / 2) / (2 / 1 + 1 / math.log2(3)))
    expo = ndcg_at_k(["p2", "x", "p1", "y", "z"], ["p1", "p2"], 5, [2, 1], exponential=True)
    assert expo == pytest.approx((1 / 1 + 3 / 2) / (3 / 1 + 1 / math.log2(3)))
    # the label order must not matter (the official code pairs grades after a set(): hash order)
    assert ndcg_at_k(["p2", "x", "p1"], ["p2", "p1"], 5, [1, 2]) == pytest.approx(linear)
    # binary qrels given as grades of 1 equal binary relevance
    assert ndcg_at_k(["p2", "x", "p1"], ["p1", "p2"], 5, [1, 1]) == ndcg_at_k(["p2", "x", "p1"], ["p1", "p2"], 5)
    with pytest.raises(ValueError, match="2 grades for 1 relevant"):
        ndcg_at_k(["a"], ["a"], 5, [1, 2])


def test_official_conventions_for_empty_labels_and_duplicates():
    none = query_metrics(["a", "b"], [])
    assert none["hit@1"] == 0.0 and none["recall@5"] == 1.0 and none["precision@5"] == 0.0
    assert none["ndcg_linear@5"] == 0.0 and none["map@5"] == 0.0 and none["mrr@5"] == 0.0
    # a repeated name: counted once by the set-based metrics, at each position by map / ndcg
    dup = query_metrics(["a", "a", "b"], ["a", "a"])
    assert dup["precision@5"] == pytest.approx(1 / 5) and dup["recall@5"] == 1.0
    assert dup["map@5"] == pytest.approx((1 + 1) / 1)
    assert dup["ndcg_linear@5"] == pytest.approx(1 + 1 / math.log2(3))


def test_score_file_keys_are_the_official_ones_in_order():
    scores = score_predictions([{"prediction": ["a", "b"], "label": "a"}, {"prediction": ["b", "a"], "label": ["a"]}])
    keys = [k for k in scores if not k.startswith("num_")]
    assert keys[:3] == ["hit@1", "hit@5", "hit@10"] and keys[3:6] == ["ndcg_linear@1", "ndcg_linear@5",
                                                                       "ndcg_linear@10"]
    assert keys[-3:] == ["mrr@1", "mrr@5", "mrr@10"] and len(keys) == 24
    assert scores["hit@1"] == 0.5 and scores["num_pred"] == scores["num_data"] == 2
    empty = score_predictions([])
    assert empty["hit@1"] == 0.0 and empty["num_pred"] == 0 and len(empty) == 26


# ------------------------------------------------------------------------------ ranking


def unit(rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_global_pool_dedupes_names_and_blocks_rank_like_one_matrix():
    rng = np.random.default_rng(0)
    cands = unit(rng.normal(size=(7, 8)))
    names = ["d0", "d1", "d2", "d1", "d3", "d4", "d5"]   # d1 twice: one candidate, its first occurrence
    pool_names, pool = mmeb_v2.candidate_pool(names, cands)
    assert pool_names == ["d0", "d1", "d2", "d3", "d4", "d5"] and np.array_equal(pool[1], cands[1])
    assert np.array_equal(pool[3], cands[4])
    queries = unit(rng.normal(size=(5, 8)))
    whole = mmeb_v2.rank_global(queries, names, cands, block_rows=1000)
    assert mmeb_v2.rank_global(queries, names, cands, block_rows=2) == whole
    scores = queries @ pool.T
    assert whole == [[pool_names[i] for i in np.argsort(-row)] for row in scores]


def test_local_and_global_records_follow_the_eval_type():
    q = unit([[1, 0], [0, 1]])
    c = unit([[1, 0.1], [0.1, 1], [1, 1]])
    names = ["A", "B", "C"]
    infos = [{"label_name": "A", "cand_names": ["B", "A"]}, {"label_name": ["B"], "cand_names": ["C", "B"]}]
    local = mmeb_v2.prediction_records(TASKS["ImageNet-1K"], q, infos, names, c)
    assert [r["prediction"] for r in local] == [["A", "B"], ["B", "C"]]
    glob = mmeb_v2.prediction_records(TASKS["MSR-VTT"], q, infos, names, c)
    assert [r["prediction"] for r in glob] == [["A", "C", "B"], ["B", "C", "A"]]
    assert glob[0]["label"] == ["A"] and glob[0]["rel_scores"] is None
    with pytest.raises(ValueError, match="ImageNet-1K: query 0 names candidates that were not encoded"):
        mmeb_v2.prediction_records(TASKS["ImageNet-1K"], q[:1], [{"label_name": "A", "cand_names": ["Z"]}], names, c)
    with pytest.raises(ValueError, match="1 query records for 2 query embeddings"):
        mmeb_v2.prediction_records(TASKS["MSR-VTT"], q, infos[:1], names, c)


def test_ties_rank_as_numpy_argsort_does():
    q = unit([[1, 0]])
    c = unit([[1, 0], [1, 0], [0, 1]])   # the first two tie exactly
    ranking = mmeb_v2.rank_global(q, ["t0", "t1", "t2"], c)[0]
    assert ranking == [["t0", "t1", "t2"][i] for i in np.argsort(-(q @ c.T)[0])]


# ------------------------------------------------------------------------------ files, summary, command


def test_files_round_trip_and_rescore(tmp_path):
    task = TASKS["ViDoRe_arxivqa"]
    records = [{"prediction": ["p1", "p2", "p3"], "label": ["p2"], "rel_scores": [1]},
               {"prediction": ["p3", "p1", "p2"], "label": ["p3", "p1"], "rel_scores": [2, 1]}]
    scores = mmeb_v2.write_task_results(tmp_path, task, records, pred_top_k=2, extra={"fingerprint": "x"})
    written = json.loads((tmp_path / "ViDoRe_arxivqa_score.json").read_text())
    assert written["ndcg_linear@5"] == scores["ndcg_linear@5"] and written["fingerprint"] == "x"
    preds = mmeb_v2.read_pred_file(tmp_path / "ViDoRe_arxivqa_pred.jsonl")
    assert preds[0] == {"prediction": ["p1", "p2"], "label": ["p2"], "rel_scores": [1]}
    again = mmeb_v2.rescore_task(tmp_path, task)   # from the top-2 file: top-2 metrics are unchanged
    assert again["hit@1"] == scores["hit@1"] and again["ndcg_linear@1"] == scores["ndcg_linear@1"]
    (tmp_path / "bad_pred.jsonl").write_text('{"prediction": []}\n')
    with pytest.raises(ValueError, match=r"bad_pred.jsonl: line 1 has no 'label' field"):
        mmeb_v2.read_pred_file(tmp_path / "bad_pred.jsonl")


def official_layout(root, scores):
    for name, value in scores.items():
        d = root / TASKS[name].modality
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}_score.json").write_text(value if isinstance(value, str) else json.dumps(value))


def test_summary_means_by_category_modality_and_overall(tmp_path):
    vals = {"ImageNet-1K": 0.8, "N24News": 0.6, "OK-VQA": 0.5, "K700": 0.4, "ViDoRe_arxivqa": 0.9}
    official_layout(tmp_path, {n: {MAIN_METRIC[TASKS[n].modality]: v, "hit@5": 1.0} for n, v in vals.items()})
    official_layout(tmp_path, {"MSR-VTT": "{not json", "DiDeMo": {"hit@5": 0.3}})   # unreadable / no main metric
    summary = mmeb_v2.summarize(mmeb_v2.read_score_dir(tmp_path, list(TASKS.values())))
    assert summary.task_scores == vals
    assert summary.category_mean("image", "CLS") == pytest.approx(0.7)
    assert summary.modality_mean("image") == pytest.approx((0.8 + 0.6 + 0.5) / 3)   # unweighted over tasks
    assert summary.overall() == pytest.approx(sum(vals.values()) / 5)
    assert "MSR-VTT" in summary.missing and "DiDeMo" in summary.missing and len(summary.missing) == 73
    assert not summary.complete("video") and summary.category_mean("video", "MRET") is None
    md = mmeb_v2.markdown_table(summary, "m")
    assert "| ImageNet-1K | image | CLS | hit@1 | 80.0 |" in md and "Missing (73)" in md


def test_command_summarizes_an_official_output_directory(tmp_path):
    official_layout(tmp_path / "scores", {"ImageNet-1K": {"hit@1": 0.25}, "ViDoRe_docvqa": {"ndcg_linear@5": 0.5}})
    (tmp_path / "scores" / "visdoc" / "ViDoRe_docvqa_pred.jsonl").write_text(
        json.dumps({"prediction": ["a", "b"], "label": ["b"], "rel_scores": None}) + "\n")
    out = tmp_path / "report" / "v2"
    cmd = [sys.executable, "-m", "llave_ds.eval", "--benchmark", "mmeb-v2", "--scores-dir", str(tmp_path / "scores"),
           "--rescore-preds", "--out", str(out), "--label", "toy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    ndcg_b_second = 1 / math.log2(3)   # rescored from the prediction file: b at rank 2
    assert last["image"] == 0.25 and last["visdoc"] == pytest.approx(ndcg_b_second)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["modalities"]["visdoc"]["categories"]["VDRv1"] == pytest.approx(ndcg_b_second)
    assert out.with_suffix(".png").stat().st_size > 1000 and "| toy |" in out.with_suffix(".md").read_text()
    bad = subprocess.run([sys.executable, "-m", "llave_ds.eval", "--benchmark", "mmeb-v2", "--modalities", "audio",
                          "--scores-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown MMEB-V2 modality audio" in bad.stderr
    few = subprocess.run([sys.executable, "-m", "llave_ds.eval", "--benchmark", "mmeb-v2", "--pred-top-k", "5",
                          "--scores-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert few.returncode == 2 and "keep at least the top 10" in few.stderr
    nodir = subprocess.run([sys.executable, "-m", "llave_ds.eval", "--benchmark", "mmeb-v2"],
                           capture_output=True, text=True, timeout=120)
    assert nodir.returncode == 2 and "--scores-dir" in nodir.stderr
