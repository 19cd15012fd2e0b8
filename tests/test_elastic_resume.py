"""Resume on another number of ranks (``llave_ds.training.elastic``).

A run stopped on 2 ranks and continued on 1 or 3 ranks (and back to 2), through DeepSpeed's
universal checkpoint, is the same run: its per-step losses and its final parameters equal
those of the uninterrupted 2-rank run (fp32, 1e-5: the rank count changes the order of
float32 sums, not the mathematics). What cannot continue as the same run (another global
batch, another ZeRO stage) is refused before any process group, with the reason.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llave_ds.config import load_config
from llave_ds.train import TrainConfig, preflight
from llave_ds.training.checkpoint import CheckpointError
from llave_ds.training.elastic import UNIVERSAL, UNIVERSAL_MARKER, Layout, resume_route, written_layout
from tests.assets import build_demo_assets
from tests.distributed_harness import run_distributed
from tests.test_train import DEMO_CONFIG, _train_rank, exported, losses

STEPS = 6          # 48 pairs / 12 per step = 4 steps per epoch: the run crosses an epoch boundary
TOLERANCE = 1e-5   # float32 sums in another order (per-rank partial sums, gradient all-reduce)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("elastic_assets"))


def overrides(assets, run_dir: Path, stage: int) -> list[str]:
    values = {"model.path": assets["model"], "data.source": assets["train"], "data.image_root": assets["images"],
              "run_dir": str(run_dir), "global_batch_size": 12, "num_workers": 0,
              "gradcache.query_chunk_size": 2, "gradcache.target_chunk_size": 3,
              "schedule.max_steps": STEPS, "checkpoint.every_steps": 0, "checkpoint.keep_last": 3,
              "logging.progress": False, "export.dtype": "float32", "collective_timeout_s": 120,
              "deepspeed.config": f"zero{stage}", "optim.eps": STABLE_ADAM}
    return [f"{k}={v}" for k, v in values.items()]


def launch(ranks: int, assets, run_dir: Path, stage: int, stop_at: int = 0) -> None:
    outcomes = run_distributed(_train_rank, ranks, overrides(assets, run_dir, stage), stop_at, timeout_s=420)
    want = {"steps": stop_at or STEPS, "stopped_early": bool(stop_at)}
    assert all(o.value == want for o in outcomes), [o.value for o in outcomes]


# Why optim.eps=1e-6 in these runs: some gradients are 0 in exact arithmetic (the attention key
# biases: softmax ignores a shift shared by every key of a query; an embedding row whose token's
# gradient cancels) and get only rounding noise, which Adam at eps=1e-8 turns into steps of
# about the learning rate with the noise's sign. Measured on 2 vs 3 ranks: such entries differed
# by 1.1e-5 to 2.1e-5 while every other agreed within 1.3e-7; at eps=1e-6 (no effect on gradients
# above ~1e-5) all agree within 4e-7.
STABLE_ADAM = "1e-6"


def parameter_difference(a: dict, b: dict) -> float:
    """The largest difference between two exports' parameters."""
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_same_run(reference: Path, continued: Path, steps: int = STEPS) -> None:
    want, got = losses(reference), losses(continued)
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    worst_loss = max(abs(want[s] - got[s]) for s in want)
    worst_param = parameter_difference(exported(reference), exported(continued))
    print(f"{continued.name}: max loss difference {worst_loss:.2e}, max parameter difference {worst_param:.2e}")
    assert worst_loss <= TOLERANCE, (want, got)
    assert worst_param <= TOLERANCE, worst_param


def branch(run_dir: Path, name: str) -> Path:
    """A copy of a stopped run, to continue it another way."""
    out = run_dir.parent / name
    shutil.copytree(run_dir, out)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_a_run_continues_exactly_on_another_rank_count(assets, tmp_path, stage):
    """2 ranks -> stop at step 2 -> 3 ranks -> stop at step 4 -> 2 ranks to the end; and
    2 ranks -> stop at step 2 -> 1 rank to the end. Both equal the uninterrupted 2-rank run."""
    full = tmp_path / "full"
    launch(2, assets, full, stage)

    split = tmp_path / "two_three_two"
    launch(2, assets, split, stage, stop_at=2)
    one = branch(split, "two_one")
    launch(3, assets, split, stage, stop_at=4)
    step2 = split / "checkpoints" / "step_00000002"
    marker = json.loads((step2 / UNIVERSAL / UNIVERSAL_MARKER).read_text())
    print(f"ZeRO-{stage}: universal conversion of the 2-rank checkpoint took {marker['seconds']} s "
          f"({marker['bytes'] / 2 ** 20:.1f} MiB)")
    assert marker["source"] == "step_00000002" and not (step2 / ".universal-build").exists()
    launch(2, assets, split, stage)   # written by 3 ranks: converted again, back on 2
    assert (split / "checkpoints" / "step_00000004" / UNIVERSAL / UNIVERSAL_MARKER).is_file()
    assert_same_run(full, split)

    launch(1, assets, one, stage)
    assert_same_run(full, one)


def test_what_cannot_continue_as_the_same_run_is_refused_before_any_process_group(assets, tmp_path):
    run = tmp_path / "run"
    launch(2, assets, run, 3, stop_at=2)
    step = run / "checkpoints" / "step_00000002"
    assert written_layout(step, json.loads((step / "llave_complete.json").read_text())) == Layout(2, 3, 12)
    assert resume_route(step, Layout(2, 3, 12)) == "direct"
    assert resume_route(step, Layout(4, 3, 12)) == "universal"
    with pytest.raises(CheckpointError, match="ZeRO stage 3, this run uses stage 2"):
        resume_route(step, Layout(1, 2, 12))

    def refused(*extra: str) -> str:
        cfg = load_config(TrainConfig, DEMO_CONFIG, overrides(assets, run, 3) + list(extra))
        with pytest.raises(CheckpointError) as info:
            preflight(cfg, 2)
        return str(info.value)

    message = refused("global_batch_size=24")
    assert "global_batch_size=12, this run has 24" in message and "not be the same run" in message
    message = refused("deepspeed.config=zero2")
    assert "ZeRO stage 3, this run uses stage 2" in message and "optimizer state cannot move" in message
    # A rank count that does not divide the global batch: the config check, before anything else.
    cfg = load_config(TrainConfig, DEMO_CONFIG, overrides(assets, run, 3))
    with pytest.raises(Exception, match="not divisible by the 5 ranks"):
        preflight(cfg, 5)
    assert not (step / UNIVERSAL).exists()   # nothing was converted for a refused relaunch


def test_markers_written_before_the_layout_was_recorded_are_read_from_file_names(tmp_path):
    """Older markers hold world_size only: the stage is read off the files they list."""
    zero3 = {"world_size": 2, "files": {"zero_pp_rank_0_mp_rank_00_model_states.pt": {},
                                        "zero_pp_rank_0_mp_rank_00_optim_states.pt": {}}}
    zero2 = {"world_size": 2, "files": {"mp_rank_00_model_states.pt": {},
                                        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": {}}}
    zero0 = {"world_size": 2, "files": {"mp_rank_00_model_states.pt": {}}}
    assert written_layout(tmp_path, zero3) == Layout(2, 3, 0)
    assert written_layout(tmp_path, zero2) == Layout(2, 2, 0)
    assert written_layout(tmp_path, zero0) == Layout(2, 0, 0)


def test_stage_zero_refuses_another_rank_count_and_zero_1_and_2_are_one_family(tmp_path, monkeypatch):
    import llave_ds.training.elastic as elastic
    marker = {"world_size": 2, "zero_stage": 0, "global_batch_size": 12}
    monkeypatch.setattr(elastic.ckpt, "describe", lambda path: marker)
    assert resume_route(tmp_path, Layout(2, 0, 12)) == "direct"
    with pytest.raises(CheckpointError, match="without ZeRO \\(stage 0\\), this run has 4"):
        resume_route(tmp_path, Layout(4, 0, 12))
    marker.update(zero_stage=1)
    assert resume_route(tmp_path, Layout(2, 2, 12)) == "direct"
    assert resume_route(tmp_path, Layout(3, 2, 12)) == "universal"
