"""MMEB-V2 visual-document tasks (issue 26): the BEIR reader on the synthetic download layout
(the official pool order, graded qrels, the skip rules, clear errors), and the whole
``llave-ds eval --benchmark mmeb-v2`` path with a tiny model: score and prediction files with
the official keys, rankings equal to a brute-force ranking of the same embeddings, resume,
and 2-rank encoding equal to one process."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from llave_ds.eval import mmeb_v2_visdoc as visdoc
from llave_ds.toy import synthetic_mmeb_v2
from tests.distributed_harness import run_distributed
from tests.multimodal import brute_force_embeddings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("visdoc")
    return synthetic_mmeb_v2.write_world(root / "data", image_tasks=(), video_tasks=())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from llave_ds.toy.tiny import build_tiny_model_dir
    return str(build_tiny_model_dir(tmp_path_factory.mktemp("visdoc_model") / "tiny", "qwen2_vl", seed=3))


def test_reader_builds_the_official_queries_and_pool(world):
    vt = visdoc.load_visdoc_task(world, "ViDoRe_esg_reports_v2_multilingual")
    assert len(vt.query_texts) == 6 and vt.query_texts[0].startswith(visdoc.QUERY_INSTRUCTION + " Which page")
    # each query's relevant pages (qrels order) enter the pool first, then the rest of the corpus
    first = []
    for info in vt.infos:
        first += [n for n in info["label_name"] if n not in first]
    assert vt.pool_ids[:len(first)] == first and sorted(vt.pool_ids) == list(range(12))
    assert all(info["rel_scores"][0] == 2 for info in vt.infos)            # graded: the asked page 2
    assert any(info["rel_scores"][1:] == [1] for info in vt.infos)          # its twin 1
    assert vt.skipped == {}
    rag = visdoc.load_visdoc_task(world, "VisRAG_ChartQA")               # file-name ids, split "train"
    assert rag.pool_ids[0].endswith(".png") and rag.infos[0]["cand_names"] == rag.infos[0]["label_name"]
    page = visdoc.PageDataset(rag)[0]
    assert page.error is None and page.image.size == (64, 64) and page.text == visdoc.PAGE_TEXT


def test_what_the_official_code_crashes_on_is_skipped_and_counted(tmp_path, caplog):
    synthetic_mmeb_v2.write_task(tmp_path, "ViDoRe_arxivqa", bad=True)
    with caplog.at_level(logging.WARNING, logger="llave_ds.eval.mmeb_v2_visdoc"):
        vt = visdoc.load_visdoc_task(tmp_path, "ViDoRe_arxivqa")
    assert vt.skipped == {"queries_without_relevant_page": 1, "judgements_for_pages_not_in_corpus": 1}
    assert len(vt.query_texts) == 6 and "skipped 1 queries without relevant page" in caplog.text


def test_bad_downloads_are_clear_errors(tmp_path):
    with pytest.raises(visdoc.VisdocDataError, match=r"ViDoRe_docvqa: no BEIR download found; looked for .*"
                                                     r"vidore/docvqa_test_subsampled_beir"):
        visdoc.load_visdoc_task(tmp_path, "ViDoRe_docvqa")
    d = synthetic_mmeb_v2.write_task(tmp_path, "ViDoRe_arxivqa")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"corpus-id": pa.array([], pa.int64()), "image": pa.array([], pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())]))}), d / "corpus" / "test-00000-of-00001.parquet")
    with pytest.raises(visdoc.VisdocDataError, match="ViDoRe_arxivqa: the corpus in .* is empty"):
        visdoc.load_visdoc_task(tmp_path, "ViDoRe_arxivqa")
    pq.write_table(pa.table({"query-id": [1], "text": ["x"]}), d / "queries" / "test-00000-of-00001.parquet")
    with pytest.raises(visdoc.VisdocDataError, match=r"queries.*test-00000-of-00001.parquet has no column query "):
        visdoc.load_visdoc_task(tmp_path, "ViDoRe_arxivqa")


def _eval(model_dir, world, scores, *extra):
    from llave_ds.eval.cli import main
    return main(["--benchmark", "mmeb-v2", "--model", model_dir, "--data", str(world), "--scores-dir", str(scores),
                 "--batch-size", "3", "--num-workers", "0", "--no-progress", *extra])


def test_eval_writes_official_files_ranks_like_brute_force_and_resumes(model_dir, world, tmp_path, capsys, caplog):
    from llave_ds.model.embedder import LlaveEmbedder

    scores = tmp_path / "scores"
    assert _eval(model_dir, world, scores, "--out", str(tmp_path / "report" / "v2")) == 0
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["num_tasks"] == 3 and last["image"] is None and 0 <= last["visdoc"] <= 1
    task = "ViDoRe_esg_reports_v2_multilingual"
    record = json.loads((scores / f"{task}_score.json").read_text())
    assert list(record)[:3] == ["hit@1", "hit@5", "hit@10"] and record["num_pred"] == 6
    assert record["num_candidates"] == 12 and record["fingerprint"]["model"]["path"]
    preds = [json.loads(line) for line in (scores / f"{task}_pred.jsonl").read_text().splitlines()]
    # brute force: the same embedder, every query against every page, numpy's sort
    vt = visdoc.load_visdoc_task(world, task)
    emb = LlaveEmbedder.from_pretrained(model_dir, device="cpu")
    q, c = brute_force_embeddings(emb, vt)
    want = [[vt.pool_ids[i] for i in np.argsort(-row)] for row in (q @ c.T)]
    assert [p["prediction"] for p in preds] == want
    assert [p["rel_scores"] for p in preds] == [info["rel_scores"] for info in vt.infos]
    # a re-run encodes nothing; removing one score file re-encodes that task only
    mtimes = {p.name: p.stat().st_mtime_ns for p in scores.glob("*_score.json")}
    (scores / "VisRAG_ChartQA_score.json").unlink()
    with caplog.at_level(logging.INFO, logger="llave_ds.eval.mmeb_v2_run"):
        assert _eval(model_dir, world, scores) == 0
    assert "ViDoRe_arxivqa: already scored" in caplog.text and "VisRAG_ChartQA: already" not in caplog.text
    after = {p.name: p.stat().st_mtime_ns for p in scores.glob("*_score.json")}
    assert after["ViDoRe_arxivqa_score.json"] == mtimes["ViDoRe_arxivqa_score.json"]
    assert "VisRAG_ChartQA_score.json" in after
    # a task named with --tasks that the download lacks: a clear refusal naming where it looked
    assert _eval(model_dir, world, scores, "--tasks", "MVBench") == 2
    assert "MMEB-V2 task MVBench: no download found; looked for <sub-dataset>/train-" in capsys.readouterr().err


def _ranked_predictions(rank, world_size, model_dir, root):
    from llave_ds.eval.encoding import embed_dataset
    from llave_ds.eval.mmeb_v2 import prediction_records
    from llave_ds.model.embedder import LlaveEmbedder

    emb = LlaveEmbedder.from_pretrained(model_dir, device="cpu")
    vt = visdoc.load_visdoc_task(root, "ViDoRe_arxivqa")
    kw = dict(batch_size=2, progress=False, num_workers=0)
    q = embed_dataset(emb, visdoc.QueryDataset(vt.query_texts), role="query", desc="q", **kw)
    c = embed_dataset(emb, visdoc.PageDataset(vt), role="target", desc="c", **kw)
    return prediction_records(vt.task, q.numpy(), vt.infos, vt.pool_ids, c.numpy()), q.numpy(), c.numpy()


def test_two_ranks_encode_and_rank_like_one(model_dir, world):
    single, q1, c1 = _ranked_predictions(0, 1, model_dir, world)
    outcomes = run_distributed(_ranked_predictions, 2, model_dir, world, timeout_s=240)
    for out in outcomes:
        records, q, c = out.value
        np.testing.assert_allclose(q, q1, atol=1e-5)
        np.testing.assert_allclose(c, c1, atol=1e-5)
        assert [r["prediction"] for r in records] == [r["prediction"] for r in single]


def _encode_with_one_bad_page(rank, world_size, model_dir, root):
    from llave_ds.eval.encoding import embed_dataset
    from llave_ds.model.embedder import LlaveEmbedder

    vt = visdoc.load_visdoc_task(root, "ViDoRe_arxivqa")
    vt.pages[vt.pool_ids[-1]] = {"bytes": b"not a png", "path": "x.png"}   # on the last rank's shard only
    try:
        embed_dataset(LlaveEmbedder.from_pretrained(model_dir, device="cpu"), vt.candidates, role="target", desc="c",
                      batch_size=2, progress=False, num_workers=0, where="pages: ")
    except ValueError as exc:
        return str(exc)
    return None


def test_bad_input_on_one_rank_fails_every_rank_without_a_hang(model_dir, world):
    outcomes = run_distributed(_encode_with_one_bad_page, 2, model_dir, world, timeout_s=240, collective_timeout_s=60)
    for out in outcomes:
        assert out.value is not None and out.value.startswith("rank 1: pages: MMEB-V2 task ViDoRe_arxivqa: corpus-id")
