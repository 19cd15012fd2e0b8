"""`llave-ds eval`: distributed encoding equals single-process encoding; the CLI writes its
JSON, markdown and analysis files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.assets import build_demo_assets
from tests.distributed_harness import run_distributed


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("eval_assets"), train_per_subset=4, eval_per_subset=5,
                             data_seed=11, model_seed=4)


def _evaluate(model_dir, eval_dir, image_root):
    from llave_ds.embedder import LlaveEmbedder
    from llave_ds.eval import evaluate
    from llave_ds.eval_data import load_eval_subsets
    subsets = load_eval_subsets(eval_dir, image_root=image_root)
    result = evaluate(LlaveEmbedder.from_pretrained(model_dir, device="cpu"), subsets, batch_size=3,
                      progress=False)
    return {name: {"p": d["p_at_1"], "scores": d["scores"]} for name, d in result["details"].items()}


def _evaluate_ranked(rank, world, model_dir, eval_dir, image_root):
    return _evaluate(model_dir, eval_dir, image_root)


def test_distributed_eval_equals_single_process(assets):
    single = _evaluate(assets["model"], assets["eval"], assets["images"])
    outcomes = run_distributed(_evaluate_ranked, 2, assets["model"], assets["eval"], assets["images"],
                               timeout_s=240)
    assert len(single) == 4
    for out in outcomes:
        for name, want in single.items():
            got = out.value[name]
            assert got["p"] == want["p"], name
            for g, w in zip(got["scores"], want["scores"]):
                np.testing.assert_allclose(g, w, atol=1e-5)


def test_eval_cli_writes_json_table_and_analysis(assets, tmp_path):
    from llave_ds.cli import main
    out = tmp_path / "res" / "eval.json"
    code = main(["eval", "--model", assets["model"], "--data", assets["eval"], "--image-root", assets["images"],
                 "--out", str(out), "--analysis-dir", str(tmp_path / "analysis"), "--no-progress",
                 "--subsets", "Synth_CLS", "Synth_T2I"])
    assert code == 0
    summary = json.loads(out.read_text())
    assert set(summary["per_subset"]) == {"Synth_CLS", "Synth_T2I"}
    assert 0.0 <= summary["overall"] <= 1.0
    assert abs(summary["overall"] - np.mean(list(summary["per_subset"].values()))) < 1e-12
    assert "Synth_T2I" in out.with_suffix(".md").read_text()
    png = tmp_path / "analysis" / "similarity_histogram.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_unknown_subset_is_a_clear_error(assets, capsys):
    from llave_ds.cli import main
    code = main(["eval", "--model", assets["model"], "--data", assets["eval"], "--image-root", assets["images"],
                 "--subsets", "Synth_XYZ", "--no-progress"])
    assert code == 2
    assert "Synth_XYZ" in capsys.readouterr().err
