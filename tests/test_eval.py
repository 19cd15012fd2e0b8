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
    from llave_ds.eval.mmeb import evaluate
    from llave_ds.eval.mmeb_data import load_eval_subsets
    from llave_ds.model.embedder import LlaveEmbedder
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
    assert len(single) == 6  # llave_ds.toy.synthetic.EVAL_SUBSETS
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


def test_images_are_decoded_batch_by_batch_not_all_before_encoding(assets, monkeypatch):
    """Memory holds the batches in flight, not every image of a role: with the decoding in
    this process, at most one batch is decoded ahead of the encoder (and with workers, their
    prefetch); the results equal the single-process ones above."""
    import llave_ds.media.image as data
    from llave_ds.eval.mmeb import evaluate_subset
    from llave_ds.eval.mmeb_data import load_eval_subsets
    from llave_ds.model.embedder import LlaveEmbedder

    subset = load_eval_subsets(assets["eval"], ["Synth_I2T"], image_root=assets["images"])["Synth_I2T"]
    embedder = LlaveEmbedder.from_pretrained(assets["model"], device="cpu")
    counts = {"decoded": 0, "encoded": 0, "ahead": []}
    real_load, real_encode = data.load_image, embedder.encode_sides

    def load_image(*args, **kwargs):
        counts["decoded"] += 1
        return real_load(*args, **kwargs)

    def encode_sides(sides, **kwargs):
        counts["ahead"].append(counts["decoded"] - counts["encoded"])
        counts["encoded"] += sum(s.image is not None for s in sides)
        return real_encode(sides, **kwargs)

    import llave_ds.eval.mmeb as eval_module
    monkeypatch.setattr(eval_module, "load_image", load_image)  # eval's own reference to data.load_image
    monkeypatch.setattr(embedder, "encode_sides", encode_sides)
    streamed = evaluate_subset(embedder, subset, batch_size=3, progress=False, num_workers=0)
    assert counts["decoded"] > 3 and len(counts["ahead"]) > 2
    assert max(counts["ahead"]) <= 3, counts["ahead"]  # never more than one batch of images
    monkeypatch.setattr(embedder, "encode_sides", real_encode)
    with_workers = evaluate_subset(embedder, subset, batch_size=3, progress=False, num_workers=2)
    assert with_workers["p_at_1"] == streamed["p_at_1"]
    np.testing.assert_allclose(with_workers["scores"][0], streamed["scores"][0], atol=1e-6)


def test_an_unreadable_image_in_a_worker_is_one_clear_error(assets, tmp_path):
    import shutil

    from llave_ds.cli import main
    from llave_ds.eval.mmeb_data import load_eval_subsets
    images = tmp_path / "images"
    shutil.copytree(assets["images"], images)
    row = load_eval_subsets(assets["eval"], ["Synth_I2T"], image_root=assets["images"])["Synth_I2T"][0]
    broken = images / row.qry_img_path
    broken.write_bytes(b"not an image at all")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = main(["eval", "--model", assets["model"], "--data", assets["eval"], "--image-root", str(images),
                     "--subsets", "Synth_I2T", "--no-progress", "--num-workers", "2"])
    assert code == 2, buf.getvalue()
    assert "Synth_I2T" in buf.getvalue() and str(broken) in buf.getvalue(), buf.getvalue()
    assert "Traceback" not in buf.getvalue() and "worker process" not in buf.getvalue(), buf.getvalue()


def test_model_may_be_a_run_directory(tmp_path):
    """`llave-ds eval --model RUN_DIR` evaluates the run's export (where its config put it)."""
    from llave_ds.eval.cli import resolve_model_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run_dir: run\n")
    with pytest.raises(ValueError, match=r"training run directory without an export .*llave-ds export"):
        resolve_model_dir(str(run))
    (run / "export").mkdir()
    (run / "export" / "config.json").write_text("{}")
    assert resolve_model_dir(str(run)) == str(run / "export")
    elsewhere = tmp_path / "exports" / "x"
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text("{}")
    (run / "config.yaml").write_text(f"run_dir: run\nexport:\n  dir: {elsewhere}\n")
    assert resolve_model_dir(str(run)) == str(elsewhere)
    assert resolve_model_dir(str(elsewhere)) == str(elsewhere)  # an export stays itself


def test_eval_dims_scores_every_size_from_one_encoding(assets, tmp_path, capsys):
    """``--dims 3,8,full``: P@1 per size; the full size is the plain P@1 bit for bit, sizes 3
    and 8 equal P@1 on the embeddings' first dims re-normalised by hand (without the
    re-normalisation size 3 ranks Synth_VQA differently: 0.4 instead of 0.8); a re-run with the same
    sizes loads the score files, other sizes encode again; a bad size list is a usage error."""
    from llave_ds.cli import main
    from llave_ds.eval.mmeb import evaluate
    from llave_ds.eval.mmeb_data import load_eval_subsets
    from llave_ds.model.embedder import LlaveEmbedder

    out = tmp_path / "eval.json"
    args = ["eval", "--model", assets["model"], "--data", assets["eval"], "--image-root", assets["images"],
            "--no-progress", "--out", str(out)]
    assert main(args + ["--dims", "3,8,full"]) == 0
    summary = json.loads(out.read_text())
    embedder = LlaveEmbedder.from_pretrained(assets["model"], device="cpu")
    width = embedder.dim
    assert list(summary["by_dim"]) == ["3", "8", str(width)]
    assert summary["by_dim"][str(width)]["per_subset"] == summary["per_subset"]
    assert "P@1 by embedding size" in capsys.readouterr().out

    class FirstDims:  # the same embedder, its vectors cut to `dim` dims and re-normalised here
        def __init__(self, dim):
            self.dim = dim

        def encode_sides(self, *a, **k):
            x = embedder.encode_sides(*a, **k)[:, :self.dim].double()
            return (x / x.norm(dim=1, keepdim=True)).float()

    subsets = load_eval_subsets(assets["eval"], image_root=assets["images"])
    for size in (3, 8):
        cut = evaluate(FirstDims(size), subsets, progress=False, num_workers=0)
        for name in subsets:
            assert summary["by_dim"][str(size)]["per_subset"][name] == pytest.approx(
                cut["details"][name]["p_at_1"], abs=1e-12), (size, name)

    assert main(args + ["--dims", "3,8,full"]) == 0          # resumed: nothing encoded again
    assert len(json.loads(out.read_text())["already_scored"]) == len(subsets)
    assert main(args + ["--dims", "4,8"]) == 0               # other sizes: the fingerprint differs
    again = json.loads(out.read_text())
    assert again["already_scored"] == [] and list(again["by_dim"]) == ["4", "8"]
    assert again["by_dim"]["8"]["per_subset"] == summary["by_dim"]["8"]["per_subset"]
    with pytest.raises(SystemExit):
        main(args + ["--dims", "64,8"])
    assert "--dims must increase" in capsys.readouterr().err
    assert main(args + ["--dims", f"{width + 1}"]) == 2
    assert f"at most {width}" in capsys.readouterr().err
