"""The README's first command, end to end in a reduced size: data -> tiny model -> eval ->
2-rank ZeRO-3 training with the gradient cache -> export -> eval."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_end_to_end_reduced(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llave_ds.cli", "demo", "--out", str(out), "--ranks", "2",
         "--train-per-subset", "8", "--eval-per-subset", "4", "--max-steps", "3",
         "global_batch_size=16", "gradcache.query_chunk_size=3", "gradcache.target_chunk_size=5",
         "checkpoint.every_steps=2"],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "before" in proc.stdout and "after" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        assert set(result[when]["per_subset"]) == {"Synth_I2T", "Synth_T2I", "Synth_CLS", "Synth_VQA"}
        assert 0.0 <= result[when]["overall_p_at_1"] <= 1.0
    records = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert list((out / "export").glob("*.safetensors"))
    assert (out / "export" / "llave_embedding.json").is_file()
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
