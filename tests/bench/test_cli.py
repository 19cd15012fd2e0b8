"""llave_ds.bench.cli: the ``llave-ds bench`` subcommand and ``--predict-only`` (no model,
no process group, no device)."""
from __future__ import annotations

import json


def test_cli_has_the_bench_subcommand():
    from llave_ds.cli import build_parser

    args = build_parser().parse_args(["bench", "--shape", "tiny", "--device", "cpu", "--chunk-sizes", "2", "4",
                                      "--query-text-tokens", "10-20", "--image-size", "56x28"])
    assert args.command == "bench" and args.chunk_sizes == [2, 4]
    assert args.query_text_tokens == (10, 20) and args.image_size == (56, 28)


def test_predict_only_needs_no_model_or_device(capsys):
    from llave_ds.cli import main

    assert main(["bench", "--predict-only", "--shape", "2b", "--pairs-per-rank", "64", "--chunk-sizes", "16",
                 "--stages", "3", "--ckpt", "non_reentrant", "off", "--ranks", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["benchmark"] == "throughput-prediction" and result["world_size"] == 8
    on, off = result["rows"]
    # the cache re-runs every forward: cached/uncached hardware FLOPs between 1 and 1.5,
    # and checkpointing (a recompute in both) lowers the ratio and the MFU ceiling
    assert 1.2 < on["cached_over_uncached_flops"] < off["cached_over_uncached_flops"] < 1.5
    assert on["mfu_ceiling"] < off["mfu_ceiling"] < 0.75
    assert on["predicted_memory_gib"] < off["predicted_memory_gib"]


def test_python_m_entry_point_writes_the_json(tmp_path, capsys):
    from llave_ds.bench.cli import main

    out = tmp_path / "sub" / "pred.json"
    assert main(["--predict-only", "--shape", "tiny", "--pairs-per-rank", "4", "--chunk-sizes", "2",
                 "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert "prediction: tiny" in printed[0]
    assert json.loads(printed[-1]) == json.loads(out.read_text())


def test_predict_only_qwen3vl(capsys):
    from llave_ds.cli import main

    assert main(["bench", "--predict-only", "--shape", "qwen3-vl-2b", "--pairs-per-rank", "32", "--chunk-sizes",
                 "4", "16", "32", "--stages", "3", "--ckpt", "non_reentrant", "--ranks", "8",
                 "--image-size", "1024x1280"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "prediction: qwen3-vl-2b" in out[0] and "5120 patches / 1280 tokens" in out[0]
    result = json.loads(out[-1])
    assert result["deepstack_taps"] == [5, 11, 17] and result["deepstack_taps_dropped"] == []
    assert result["inputs"]["patches_per_image"] == 5120 and result["inputs"]["tokens_per_image"] == 1280
    rows = result["rows"]
    assert [r["chunk"] for r in rows] == [4, 16, 32]
    mem = [r["predicted_memory_gib"] for r in rows]
    assert mem == sorted(mem) and len(set(mem)) == 3
    # the frozen-vision cache holds the other chunks' features: less of them as chunks grow
    cache = [r["predicted_memory"]["vision_cache"] for r in rows]
    assert cache[0] > cache[1] > cache[2] > 0
    # the tower is a large share of a 1280-token image's forward; the cache pass skips it
    split = rows[0]["forward_split_tflop"]
    assert split["vision"] > split["llm"] and split["proj1"] == 0 and split["proj2"] > 0
    assert 1.0 < rows[0]["cached_over_uncached_flops"] < 1.3
