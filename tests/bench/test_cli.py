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
