"""llave_ds.bench.runner: the benchmark on 2 gloo ranks with the tiny shape prints a table
and one JSON line last with every reported field (no timing assertions); the DeepSpeed
comms counters it reads through llave_ds.training.engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llave_ds.training import engine

ROOT = Path(__file__).resolve().parent.parent.parent


def test_comms_counters_sum_the_loggers_calls_and_bytes():
    import deepspeed.comm as dscomm

    saved = dscomm.comms_logger.comms_dict
    try:
        # the comms logger's layout: op -> message size -> [count, latencies, ...]
        dscomm.comms_logger.comms_dict = {"all_reduce": {8: [2, [0.1, 0.2]], 1024: [1, [0.3]]},
                                          "broadcast": {16: [3, [0.0, 0.0, 0.0]]}}
        assert engine.comms_snapshot() == {"all_reduce": {"count": 3, "bytes": 2 * 8 + 1024},
                                           "broadcast": {"count": 3, "bytes": 48}}
        engine.comms_reset()
        assert engine.comms_snapshot() == {}
    finally:
        dscomm.comms_logger.comms_dict = saved


REQUIRED_ROW_FIELDS = (
    "stage", "ckpt", "chunk", "step_s", "samples_per_s", "samples_per_s_per_rank", "tokens_per_s",
    "tokens_per_s_per_rank", "model_tflop_per_step_per_rank", "hardware_tflop_per_step_per_rank",
    "mfu", "hfu", "phases_s", "bookkeeping_frac", "peak_memory_gib", "predicted_memory_gib",
    "predicted_memory", "uncached", "cached_over_uncached", "cached_over_uncached_flops",
)


def test_bench_cpu_smoke_two_ranks(tmp_path):
    json_out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "llave_ds.bench", "--shape", "tiny", "--device", "cpu",
           "--ranks", "2", "--stages", "3", "--chunk-sizes", "2", "--pairs-per-rank", "4", "--steps", "2",
           "--warmup", "1", "--query-text-tokens", "10-30", "--target-text-tokens", "5-15",
           "--profile", "--json-out", str(json_out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    assert result == json.loads(json_out.read_text())
    assert "zero" in proc.stdout and "MFU" in proc.stdout  # the human table came first
    assert result["benchmark"] == "throughput" and result["world_size"] == 2
    assert result["shape"] == "tiny" and result["device"] == "cpu"
    for key in ("params", "peak_tflops", "peak_source", "inputs", "targets", "versions", "global_batch"):
        assert key in result
    assert result["global_batch"] == 8
    (row,) = result["rows"]
    for key in REQUIRED_ROW_FIELDS:
        assert key in row, key
    assert set(row["phases_s"]) >= {"encode", "loss", "reencode_backward", "reduce", "step", "rest"}
    assert row["samples_per_s"] == pytest.approx(2 * row["samples_per_s_per_rank"])
    assert row["tokens_per_s"] == pytest.approx(2 * row["tokens_per_s_per_rank"])
    assert "step_s" in row["uncached"]
    assert row["model_tflop_per_step_per_rank"] > 0 and row["hardware_tflop_per_step_per_rank"] > \
        row["model_tflop_per_step_per_rank"]
    # ZeRO-3 with the defaults: blocks fetched whole, tower reused in pass 2, plain F.linear;
    # every hooked module fetch counted (2 chunks per role: 4 forwards, 4 re-forwards, 4 backwards).
    assert row["optimizations"] == {"fetch_units": ["Qwen2DecoderLayer", "SiglipEncoderLayer"],
                                    "vision_cache": True, "memory_efficient_linear": False,
                                    "padding_mask_dropped": True, "checkpoint_every": 1, "memory_plan": None,
                                    "fused_kernels": []}
    fetches = row["zero3_fetches_per_step"]
    assert fetches["forward"] > 0 and fetches["backward"] > 0
    assert row["zero3_fetches_per_chunk_pass"] == pytest.approx(sum(fetches.values()) / 12)
    # --profile: one more step under torch.profiler, after the counted ones (fetches per step unchanged)
    prof = row["profile"]
    assert prof["time"] == "self CPU time" and prof["top"] and prof["total_ms"] > 0
    assert sum(e["share"] for e in prof["top"]) <= 1.0 + 1e-9
    assert any("scaled_dot_product" in e["name"] for e in prof["attention"]), prof["attention"]
    assert prof["collectives_ms"] > 0 and any("all_gather" in e["name"] or "allgather" in e["name"].lower()
                                              for e in prof["collectives"]), prof["collectives"]
    assert "profile zero3 chunk=2" in proc.stdout and "attention:" in proc.stdout
    assert "zero3 chunk=2:" in proc.stdout and "module fetches per step" in proc.stdout
    print(f"bench smoke run: {wall:.1f} s")


@pytest.mark.parametrize("budget_gib, ckpt, every, fits", [(1e-6, "non_reentrant", 1, False),
                                                        (1000, "off", None, True)])
def test_bench_memory_plan_auto(tmp_path, budget_gib, ckpt, every, fits):
    """--ckpt auto --persistence-threshold auto under a budget (what training does with auto):
    nothing fits 1 KiB, so every layer is checkpointed; 1000 GiB leaves checkpointing off. On
    one rank a whole parameter costs nothing more than its partition: all are kept whole."""
    json_out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "llave_ds.bench", "--shape", "tiny", "--device", "cpu", "--stages", "3",
           "--chunk-sizes", "2", "--pairs-per-rank", "4", "--steps", "1", "--warmup", "1", "--uncached-steps", "0",
           "--query-text-tokens", "10-30", "--target-text-tokens", "5-15", "--ckpt", "auto",
           "--persistence-threshold", "auto", "--memory-budget-gib", str(budget_gib), "--json-out", str(json_out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(json_out.read_text())
    (row,) = result["rows"]
    plan = row["optimizations"]["memory_plan"]
    assert (row["ckpt"], row["checkpoint_every"]) == (ckpt, every)
    assert plan["fits"] == fits and plan["persistent_params"] == result["params"]["total"]
    assert row["predicted_memory"]["params"] < row["predicted_memory"]["grads"] * 10  # sanity: a real prediction


def test_bench_cpu_smoke_qwen3vl_one_rank(tmp_path):
    """The tiny Qwen3-VL, ZeRO-2 and ZeRO-3 on one gloo rank: DeepStack taps reported, the
    Qwen3-VL blocks as ZeRO-3 fetch units, the vision cache on, every row field present."""
    json_out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "llave_ds.bench", "--shape", "qwen3-tiny", "--device", "cpu",
           "--stages", "2", "3", "--chunk-sizes", "2", "--pairs-per-rank", "4", "--steps", "1", "--warmup", "1",
           "--query-text-tokens", "10-30", "--target-text-tokens", "5-15", "--image-size", "64x64",
           "--peak-tflops", "0.05", "--json-out", str(json_out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(json_out.read_text())
    assert "64x64 = 16 patches / 4 tokens; DeepStack taps [0, 1]" in proc.stdout
    assert result["shape"] == "qwen3-tiny" and result["deepstack_taps"] == [0, 1]
    assert result["inputs"]["patches_per_image"] == 16 and result["inputs"]["dummy_patches"] == 4
    z2, z3 = result["rows"]
    for row in (z2, z3):
        for key in REQUIRED_ROW_FIELDS:
            assert key in row, key
        assert row["forward_split_tflop"]["proj2_dummy"] > 0   # the target chunks' dummy image
    assert z3["optimizations"] == {"fetch_units": ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"],
                                   "vision_cache": True, "memory_efficient_linear": False, "padding_mask_dropped": True,
                                   "checkpoint_every": 1, "memory_plan": None, "fused_kernels": []}
    assert z3["predicted_memory"]["vision_cache"] > 0
