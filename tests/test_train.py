"""The training entry point: config validation, the single-process path, exact resume
after a preemption signal, and checkpoint pointer safety."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llave_ds.config import ConfigError, load_config
from llave_ds.train import TrainConfig
from tests.assets import build_demo_assets, official_train_layout
from tests.distributed_harness import run_distributed

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("train_assets"))


def overrides_for(assets, run_dir, **extra) -> list[str]:
    base = {"model.path": assets["model"], "data.source": assets["train"], "data.image_root": assets["images"],
            "run_dir": str(run_dir), "global_batch_size": 16, "num_workers": 0,
            "gradcache.query_chunk_size": 3, "gradcache.target_chunk_size": 5,
            "schedule.epochs": 2, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
            "logging.progress": False, "export.dtype": "float32", "collective_timeout_s": 120}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ------------------------------------------------------------------ config validation

@pytest.mark.parametrize("override,message", [
    ("objective.temperature=-0.1", "temperature must be > 0"),
    ("objective.alpha=-2", "alpha must be >= 0"),
    ("gradcache.query_chunk_size=999", "larger than global_batch_size"),
    ("deepspeed.config=/nonexistent/ds.json", "neither a JSON file nor one of the shipped"),
    ("objective.temprature=0.1", "Did you mean 'objective.temperature'"),
    ("schedule.kind=exponential", "schedule.kind"),
    ("model.gradient_checkpointing=sometimes", "gradient_checkpointing"),
    ("objective.matryoshka_dims=[64,32]", "matryoshka_dims must increase"),
    ("objective.matryoshka_weights=[1,2]", "matryoshka_dims is not"),
])
def test_config_errors_are_clear(assets, tmp_path, override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(TrainConfig, DEMO_CONFIG, overrides_for(assets, tmp_path) + [override])


def test_chunk_larger_than_per_rank_batch_is_refused_before_any_process_group(assets, tmp_path):
    cfg = load_config(TrainConfig, DEMO_CONFIG, overrides_for(assets, tmp_path, **{"gradcache.query_chunk_size": 12}))
    with pytest.raises(ConfigError, match="per-rank batch 8"):
        cfg.validate_for_world(2)
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        cfg.validate_for_world(3)


def test_reentrant_checkpointing_with_zero3_is_refused(assets, tmp_path):
    from llave_ds.training.engine import EngineConfigError, complete_ds_config, load_ds_config, resolve_ds_config_path
    with pytest.raises(EngineConfigError, match="reentrant"):
        complete_ds_config(load_ds_config(resolve_ds_config_path("zero3")), local_batch_size=8, world_size=2,
                           activation_checkpointing="reentrant")


def test_shipped_configs_load(assets, tmp_path):
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(TrainConfig, path, [f"model.path={assets['model']}", f"data.source={assets['train']}"])
        assert cfg.objective.temperature > 0, path
        header = path.read_text().splitlines()[:12]
        assert any("llave_ds.train" in line or "llave-ds" in line for line in header), f"{path}: no launch command"


def test_shipped_configs_read_an_official_layout_download_without_naming_subsets(assets, tmp_path):
    """The paper's configs set no data.subsets: on a hub-layout MMEB-train download they take
    the official training subsets found and skip the evaluation directories beside them."""
    from llave_ds.data.mmeb_train import MMEBTrainDataset
    source = official_train_layout(assets, tmp_path / "MMEB-train")
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name == "demo_cpu.yaml":
            continue
        cfg = load_config(TrainConfig, path, [f"model.path={assets['model']}", f"data.source={source}",
                                              f"data.image_root={assets['images']}"])
        assert cfg.data.subsets is None, path
        assert MMEBTrainDataset(cfg.data).subsets == ["ImageNet_1K", "CIRR"], path


def test_paper_config_trains_on_an_official_layout_download(assets, tmp_path):
    """configs/llave_0.5b.yaml, unchanged but for paths, sizes and CPU precision, trains on it."""
    source = official_train_layout(assets, tmp_path / "MMEB-train")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    overrides = {"model.path": assets["model"], "model.dtype": "float32", "model.attn_implementation": "sdpa",
                 "data.source": str(source), "data.image_root": assets["images"], "run_dir": str(run_dir),
                 "global_batch_size": 8, "num_workers": 0, "gradcache.query_chunk_size": 4,
                 "gradcache.target_chunk_size": 4, "schedule.max_steps": 2, "processing.max_length": 128,
                 "logging.progress": False, "collective_timeout_s": 120}
    proc = subprocess.run([sys.executable, "-m", "llave_ds.train", "--config", str(REPO / "configs" / "llave_0.5b.yaml"),
                           *[f"{k}={v}" for k, v in overrides.items()]],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 2
    assert "skipped (not MMEB-train training subsets" in proc.stderr and "FashionIQ, ImageNet-A" in proc.stderr


# ------------------------------------------------------------------ single process

def test_single_process_path_trains_checkpoints_and_exports(assets, tmp_path):
    """`python -m llave_ds.train` with no launcher variables: one rank, same code path."""
    run_dir = tmp_path / "single"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "llave_ds.train", "--config", str(DEMO_CONFIG),
               *overrides_for(assets, run_dir, **{"schedule.max_steps": 3})]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and not summary["stopped_early"]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "pos_sim", "hardest_neg_sim", "gap", "lr", "grad_norm", "samples_per_s",
                "tokens_per_s", "peak_mem_gb"):
        assert all(isinstance(r[key], float) for r in records), key
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert list((run_dir / "export").glob("*.safetensors"))
    # Relaunched with nothing left to do: the summary is JSON with the run's last logged loss.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    line = again.stdout.strip().splitlines()[-1]
    assert "NaN" not in line, line
    assert json.loads(line)["steps"] == 3 and json.loads(line)["final_loss"] == records[-1]["loss"], line


# ------------------------------------------------------------------ exact resume

def _train_rank(rank, world, overrides, preempt_at):
    from llave_ds.train import train
    cfg = load_config(TrainConfig, DEMO_CONFIG, overrides)

    def hook(step, result):
        if preempt_at and step == preempt_at and rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal would
    res = train(cfg, on_step_end=hook)
    return {"steps": res.steps, "stopped_early": res.stopped_early}


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((run_dir / "export").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_matryoshka_run_logs_every_size_and_refuses_a_size_above_the_width(assets, tmp_path):
    """One process, 2 steps with sizes 8, 16 and the full width (64): the metrics hold each
    size's loss and the loss is their sum (weights 1); a size above the width stops the run
    before any step with a message naming the sizes and the model."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

    def command(run_dir, dims):
        return [sys.executable, "-m", "llave_ds.train", "--config", str(DEMO_CONFIG),
                *overrides_for(assets, run_dir, **{"schedule.max_steps": 2, "checkpoint.every_steps": 0,
                                                   "objective.matryoshka_dims": dims})]

    bad = subprocess.run(command(tmp_path / "bad", "[16,128]"), env=env, capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0 and "for embeddings of width 64: each must be at most 64" in bad.stderr
    assert assets["model"] in bad.stderr and not (tmp_path / "bad" / "metrics.jsonl").exists()
    proc = subprocess.run(command(tmp_path / "ok", "[8,16,full]"), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["loss"] == pytest.approx(r["loss_d8"] + r["loss_d16"] + r["loss_d64"], rel=1e-5)


def test_preempted_and_resumed_run_equals_uninterrupted(assets, tmp_path):
    """2 ranks, ZeRO-3: SIGUSR1 at step 3 -> checkpoint, stop; --resume auto continues
    (across the epoch boundary) to the same losses and final parameters (fp32, 1e-6)."""
    steps = 6  # 48 pairs / 16 per step = 3 steps per epoch, 2 epochs
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full = run_distributed(_train_rank, 2, overrides_for(assets, full_dir), 0, timeout_s=300)
    assert full[0].value == {"steps": steps, "stopped_early": False}

    first = run_distributed(_train_rank, 2, overrides_for(assets, split_dir), 3, timeout_s=300)
    assert all(o.value == {"steps": 3, "stopped_early": True} for o in first)
    assert (split_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (split_dir / "export").exists()  # a preempted run does not export
    second = run_distributed(_train_rank, 2, overrides_for(assets, split_dir), 0, timeout_s=300)
    assert second[0].value == {"steps": steps, "stopped_early": False}

    want, got = losses(full_dir), losses(split_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step in want:
        assert abs(want[step] - got[step]) <= 1e-6, (step, want[step], got[step])
    a, b = exported(full_dir), exported(split_dir)
    assert a.keys() == b.keys() and a
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    # keep_last=2: only the two newest complete checkpoints remain.
    kept = sorted(p.name for p in (split_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"], kept


def _train_qwen(rank, world, overrides):
    from llave_ds.train import train
    res = train(load_config(TrainConfig, DEMO_CONFIG, overrides))
    return res.steps


def test_qwen2vl_backbone_trains_on_synthetic_data_under_zero3(assets, tmp_path):
    """The second backbone through the same entry point: 2 ranks, ZeRO-3, gradient cache,
    synthetic data with hard negatives (one rank's chunks may be text-only), and token-budget
    chunks (``gradcache.chunk_tokens``: rows sorted by length, their positions with each chunk)."""
    from llave_ds.toy.tiny import build_tiny_model_dir
    qwen = build_tiny_model_dir(tmp_path / "qwen", "qwen2_vl", seed=1)
    run_dir = tmp_path / "qwen_run"
    over = overrides_for(assets, run_dir, **{"model.path": str(qwen), "schedule.max_steps": 2,
                                             "checkpoint.every_steps": 0, "export.at_end": False,
                                             "gradcache.chunk_tokens": 150})
    outcomes = run_distributed(_train_qwen, 2, over, timeout_s=300)
    assert [o.value for o in outcomes] == [2, 2]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in records)  # finite, and it learned something


def test_auto_memory_plan_is_written_and_applied_under_zero3(assets, tmp_path):
    """``model.gradient_checkpointing: auto`` and ``deepspeed.param_persistence: auto`` with a
    budget (a CPU run has no device memory to plan against): 2 ranks agree on the plan, the
    run records it in memory_plan.json and trains with it (ample budget: checkpointing off and
    every parameter whole; the arithmetic itself: tests/test_memory_plan.py)."""
    run_dir = tmp_path / "auto_run"
    over = overrides_for(assets, run_dir, **{"schedule.max_steps": 2, "checkpoint.every_steps": 0,
                                             "export.at_end": False, "model.gradient_checkpointing": "auto",
                                             "deepspeed.param_persistence": "auto", "memory.budget_gib": 1000})
    outcomes = run_distributed(_train_qwen, 2, over, timeout_s=300)
    assert [o.value for o in outcomes] == [2, 2]
    plan = json.loads((run_dir / "memory_plan.json").read_text())
    assert plan["checkpointing"] == "off" and plan["fits"] and plan["budget_gib"] == 1000
    assert plan["persistence_threshold"] > 0 and plan["persistent_params"] > 0
    assert plan["options"][0]["policy"] == "off"


def _result(skipped: bool):
    return types.SimpleNamespace(skipped=skipped)


def test_train_state_round_trips_and_counts():
    """One object saves and restores where the run is: step, data position, skip counters."""
    from llave_ds.data.batching import GlobalBatchSampler
    from llave_ds.train import TrainState

    state = TrainState(GlobalBatchSampler(40, 8, rank=1, world_size=2, seed=3), world_size=2)
    assert state.steps_per_epoch == 5
    for skipped in (False, True, True, False, True, False, False):
        state.record(_result(skipped), skipped_rows=2, truncated_sides=1)
    assert (state.step, state.epoch, state.skipped_steps, state.consecutive_skips, state.skipped_rows,
            state.truncated_sides) == (7, 1, 3, 0, 14, 7)
    state.record(_result(True), skipped_rows=0, truncated_sides=0)
    saved = state.state_dict()
    assert saved["sampler"]["epoch"] == 1 and saved["sampler"]["step"] == 3  # step 8 = epoch 1, 3 batches in

    fresh = TrainState(GlobalBatchSampler(40, 8, rank=1, world_size=2, seed=3), world_size=2)
    fresh.load_state_dict(saved, Path("ckpt"))
    assert fresh.state_dict() == saved and fresh.consecutive_skips == 1
    fresh.sampler.set_epoch(fresh.epoch)
    reference = GlobalBatchSampler(40, 8, rank=1, world_size=2, seed=3)
    reference.set_epoch(1)
    assert list(fresh.sampler) == list(reference)[3:]  # the data continues where it stopped


def test_train_state_refuses_another_rank_count_and_another_sampler():
    from llave_ds.data.batching import GlobalBatchSampler
    from llave_ds.train import TrainState
    from llave_ds.training.checkpoint import CheckpointError

    saved = TrainState(GlobalBatchSampler(40, 8, rank=0, world_size=2, seed=3), world_size=2).state_dict()
    with pytest.raises(CheckpointError, match=r"ckpt was written by 2 ranks, this run has 4"):
        TrainState(GlobalBatchSampler(40, 8, rank=0, world_size=4, seed=3), world_size=4).load_state_dict(
            saved, Path("ckpt"))
    with pytest.raises(ValueError, match="seed=3, this one has 4"):
        TrainState(GlobalBatchSampler(40, 8, rank=0, world_size=2, seed=4), world_size=2).load_state_dict(
            saved, Path("ckpt"))


def test_print_config_reads_back_equal(tmp_path, capsys):
    """--print-config prints what load_config reads back to the same config (a string that
    looks like a number stays a string)."""
    from llave_ds.config import load_config
    from llave_ds.train import TrainConfig, main

    overrides = ["run_dir=1e3", "data.subsets=A,B", "objective.alpha=4.5", "processing.system_prompt=yes"]
    assert main(["--config", "demo_cpu", "--print-config", *overrides]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    want = load_config(TrainConfig, str(__import__("llave_ds.config").config.shipped_file("train", "demo_cpu")),
                       overrides)
    assert load_config(TrainConfig, str(printed)) == want
    assert want.run_dir == "1e3" and want.processing.system_prompt == "yes"
