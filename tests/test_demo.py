"""The README's first command, end to end in a reduced size: data -> tiny model -> eval ->
2-rank ZeRO-3 training with the gradient cache -> export -> eval."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llave_ds.toy.synthetic import EVAL_SUBSETS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backbone", ["llava_onevision", "qwen3_vl"])
def test_demo_end_to_end_reduced(tmp_path, backbone):
    out = tmp_path / "demo"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llave_ds.cli", "demo", "--out", str(out), "--ranks", "2", "--backbone", backbone,
         "--train-per-subset", "8", "--eval-per-subset", "4", "--max-steps", "3",
         "--warm-steps", "3", "--cache-dir", str(tmp_path / "warm_cache"),
         "global_batch_size=16", "gradcache.query_chunk_size=3", "gradcache.target_chunk_size=5",
         "checkpoint.every_steps=2"],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "before" in proc.stdout and "after" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        assert set(result[when]["per_subset"]) == set(EVAL_SUBSETS)
        assert 0.0 <= result[when]["overall_p_at_1"] <= 1.0
    assert result["start"]["model"] == "warm_start" and not result["start"]["cached"]
    assert result["start"]["path"].startswith(str(tmp_path / "warm_cache"))
    records = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert list((out / "export").glob("*.safetensors"))
    assert (out / "export" / "llave_embedding.json").is_file()
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert json.loads((out / "export" / "config.json").read_text())["model_type"] == backbone
    if backbone != "llava_onevision":  # every backbone's ST export: tests/test_st_export.py
        return
    check_sentence_transformers(out / "export", sorted((out / "data" / "images").rglob("*.png"))[:2], tmp_path)


def check_sentence_transformers(export, images, tmp_path):
    """The export loads with SentenceTransformer in a fresh process without llave-ds
    (tests/st_client.py) and encodes text, an image and both as LlaveEmbedder does."""
    import torch

    from llave_ds import LlaveEmbedder

    cases = [["a red square on the left", None], [None, "a"], ["<|image_1|>\nWhat shape is this?", "b"]]
    by_name = {"a": str(images[0]), "b": str(images[1])}
    job = {"exports": {"demo": str(export)}, "images": by_name, "cases": cases}
    (tmp_path / "st_job.json").write_text(json.dumps(job))
    client = os.path.join(os.path.dirname(__file__), "st_client.py")
    proc = subprocess.run([sys.executable, client, str(tmp_path / "st_job.json"), str(tmp_path / "st.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "st.pt", weights_only=False)
    assert got["llave_ds_imported"] == []
    embedder = LlaveEmbedder.from_pretrained(export, device="cpu", dtype="float32")
    texts, paths = [t for t, _ in cases], [by_name.get(i) for _, i in cases]
    for key, role in (("query", "query"), ("document", "target")):
        want = embedder.encode(texts=texts, images=paths, role=role, progress=False)
        assert (got["exports"]["demo"][key] - want).abs().max() <= 1e-5, key
