"""benchmarks/video_retrieval_demo.py runs end to end (a smoke test with tiny settings: the
numbers of the real run are in docs/VIDEO.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_video_retrieval_demo_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "video_retrieval_demo.py"), "--out",
                           str(tmp_path / "out"), "--steps", "2", "--train-rows", "8", "--num-test", "4",
                           "--batch", "8", "--frames", "4"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["num_videos"] == 4 and summary["chance_R@1"] == 0.25
    for side in ("before", "after"):
        assert 0.0 <= summary[side]["t2v_R@1"] <= 1.0 and 0.0 <= summary[side]["direction_accuracy"] <= 1.0
    assert "| after training |" in proc.stdout
    assert (tmp_path / "out" / "run" / "export" / "llave_embedding.json").is_file()
