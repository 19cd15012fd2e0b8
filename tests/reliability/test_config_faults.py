"""Configuration mistakes are clear errors before any process group exists: ``llave-ds
train`` exits with status 2, one line on stderr naming the key, no traceback. In process
the process-group constructor is replaced by a trap (tests/reliability/helpers.py); one
case also runs the real command in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.reliability import helpers


def _ds_file(tmp_path, name, content):
    path = tmp_path / f"{name}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _zero(stage, **extra):
    return {"zero_optimization": {"stage": stage, **extra}, "steps_per_print": 1000000000}


def _bert_dir(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return str(d)


# name -> (overrides builder, world size, expected message fragment)
CASES = {
    "negative_temperature": (lambda t: ["objective.temperature=-0.1"], None, "temperature must be > 0"),
    "negative_alpha": (lambda t: ["objective.alpha=-2"], None, "alpha must be >= 0"),
    "chunk_larger_than_global_batch": (lambda t: ["gradcache.query_chunk_size=999"], None,
                                       "gradcache.query_chunk_size=999 is larger than global_batch_size=8"),
    "chunk_larger_than_per_rank_batch": (lambda t: ["gradcache.target_chunk_size=6"], 2,
                                         "gradcache.target_chunk_size=6 is larger than the per-rank batch 4"),
    "unknown_backbone": (lambda t: ["model.backbone=bert"], None,
                         "Invalid value for 'model.backbone' (from override 'model.backbone=bert'): expected one of "
                         "'auto', 'llava_onevision', 'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl', got 'bert'"),
    "unsupported_model_directory": (lambda t: [f"model.path={_bert_dir(t)}"], None,
                                    "model_type 'bert' is not a supported backbone"),
    "missing_model_directory": (lambda t: [f"model.path={t / 'nowhere'}"], None, "no such directory"),
    "zero_stage_4": (lambda t: [f"deepspeed.config={_ds_file(t, 's4', _zero(4))}"], None,
                     "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    "param_offload_without_zero3": (
        lambda t: [f"deepspeed.config={_ds_file(t, 'off', _zero(2, offload_param={'device': 'cpu'}))}"], None,
        "offload_param needs ZeRO stage 3"),
    "offload_with_fp16": (
        lambda t: [f"deepspeed.config={_ds_file(t, 'fp16', {**_zero(3, offload_optimizer={'device': 'cpu'}), 'fp16': {'enabled': True}})}"],
        None, "fp16 with dynamic loss scaling is not supported"),
    "fp16_model": (lambda t: ["model.dtype=float16"], None, "model.dtype=float16 would train fp16 weights"),
    "optimizer_block": (lambda t: [f"deepspeed.config={_ds_file(t, 'opt', {**_zero(3), 'optimizer': {'type': 'Adam'}})}"],
                        None, "remove the 'optimizer' block"),
    "bf16_overflow_check_off": (
        lambda t: [f"deepspeed.config={_ds_file(t, 'bf16', {**_zero(2), 'bf16': {'check_grad_overflow': False}})}",
                   "model.dtype=bfloat16"], None, "bf16.check_grad_overflow=false"),
    "grad_norm_off": (lambda t: [f"deepspeed.config={_ds_file(t, 'gn', _zero(2, compute_grad_norm=False))}",
                                 "deepspeed.gradient_clipping=0"], None, "compute_grad_norm=false switches off"),
    "missing_deepspeed_config": (lambda t: ["deepspeed.config=/nonexistent/ds.json"], None,
                                 "'/nonexistent/ds.json' is neither a JSON file nor one of the shipped configs"),
    "invalid_deepspeed_json": (lambda t: [f"deepspeed.config={_ds_file(t, 'bad', '{stage: 3,')}"], None,
                               "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_mistake_is_refused_before_any_process_group(assets, tmp_path, monkeypatch, capsys, case):
    build, world, fragment = CASES[case]
    argv = ["--config", str(helpers.DEMO_CONFIG), *helpers.overrides(assets, tmp_path / "run"), *build(tmp_path)]
    code, err = helpers.train_cli_in_process(argv, monkeypatch, capsys, world_size=world)
    assert code == 2, err
    prefix = "[rank 0] " if world and world > 1 else ""  # ranks share a terminal: each line says whose
    assert err.startswith(f"{prefix}llave-ds train: config error:") and fragment in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing was created either


@pytest.mark.slow
def test_cli_exits_2_quickly_with_the_message_and_no_traceback(assets, tmp_path):
    ds = _ds_file(tmp_path, "s4", _zero(4))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llave_ds.cli", "train", "--config", str(helpers.DEMO_CONFIG),
                           *helpers.overrides(assets, tmp_path / "run"), f"deepspeed.config={ds}"],
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error" in proc.stderr and "zero_optimization.stage must be 0, 1, 2 or 3, got 4" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert elapsed < 60, elapsed  # imports only: no model, no process group
    assert not (tmp_path / "run").exists()


def test_each_rank_reports_its_error_in_one_write(monkeypatch):
    """Under a launcher the ranks share stderr; print() writes text and newline separately,
    and two ranks' messages ran together on one line. One os.write per message, prefixed."""
    import os
    import sys

    from llave_ds.train import report_error

    class Terminal:
        def fileno(self):
            return 2

        def flush(self):
            pass

    writes = []
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append((fd, data)) or len(data))
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report_error("checkpoint error: rank 1: checkpoint file X is corrupted")
    assert writes == [(2, b"[rank 1] llave-ds train: checkpoint error: rank 1: checkpoint file X is corrupted\n")]
