"""Process faults: a rank killed mid-step, a rank whose data loader raises, ranks with
unequal data. Never a hang: the survivors stop with an error well within the collective
timeout, and ``--resume auto`` then ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import json

import pytest
import torch

from llave_ds.training import checkpoint as ckpt
from tests.reliability import helpers

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_kill_9_mid_step_ends_the_other_rank_in_time_and_resume_is_exact(assets, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    helpers.clone_at_step(reference_run, run_dir, 2)
    # Resumed at step 2; rank 1 is SIGKILLed in the middle of step 3's backward passes.
    crash = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir),
                              {"kill_in_step": (3, 1), "marks_dir": str(tmp_path)})
    assert crash.exitcodes[1] == -9 and 1 not in crash.outcomes, crash.describe()
    assert not crash.hung, crash.describe()
    survivor = crash.value(0)
    # Rank 0 stops with one clear line, not gloo's error: what, where, how to go on ...
    assert survivor.get("error", "").startswith(
        "PeerStoppedError: another rank stopped (killed, crashed or stuck) during step 3;"), survivor
    assert f"last complete checkpoint is {run_dir / 'checkpoints' / ckpt.tag_for_step(2)}" in survivor["error"]
    assert "relaunch with --resume auto" in survivor["error"]
    killed_at = json.loads((tmp_path / "killed_rank1.json").read_text())
    assert "step 3" in killed_at["what"]
    # ... well within the collective timeout (gloo sees the closed connection at once).
    detected_after = crash.outcomes[0]["wall"] - killed_at["t"]
    assert 0 <= detected_after < helpers.COLLECTIVE_TIMEOUT_S, (detected_after, crash.describe())
    assert (run_dir / "checkpoints" / ckpt.LATEST).read_text().strip() == ckpt.tag_for_step(2)

    resumed = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir))
    assert resumed.all_ok() and resumed.value(0)["steps"] == helpers.STEPS, resumed.describe()
    want, got = helpers.last_records(reference_run), helpers.last_records(run_dir)
    assert sorted(got) == list(range(1, helpers.STEPS + 1))
    for step in want:
        assert abs(want[step]["loss"] - got[step]["loss"]) <= 1e-6, (step, want[step]["loss"], got[step]["loss"])
    assert helpers.max_export_diff(helpers.exported(reference_run), helpers.exported(run_dir)) <= 1e-6


@pytest.mark.timeout(300)
def test_a_rank_whose_data_loader_raises_stops_every_rank_with_its_error(assets, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    helpers.clone_at_step(reference_run, run_dir, 2)
    run = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir), {"loader_error": 1})
    assert len(run.outcomes) == 2 and not run.hung, run.describe()
    for rank in (0, 1):
        error = run.value(rank).get("error", "")
        # Every rank raises TrainingError carrying rank 1's DataError text.
        assert error.startswith("TrainingError: loading the batch of step 3 failed"), error
        assert "rank 1: DataError: injected: image for index" in error, error
    assert "on another rank" in run.value(0)["error"] and "on this rank" in run.value(1)["error"]
    assert run.wall_s < 120, run.describe()
    assert (run_dir / "checkpoints" / ckpt.LATEST).read_text().strip() == ckpt.tag_for_step(2)


def _uneven_rank(rank, world, overrides_list):
    """Three ways ranks can disagree on data; each must raise on both ranks, no hang."""
    from llave_ds import train as tr
    out = {}
    # 1. rank 1 reads fewer rows: refused before the model is built.
    out["different_data"] = helpers.train_rank(rank, world, overrides_list, {"different_data": 1})
    # 2. rank 0's loader is exhausted one step before rank 1's.
    batches = iter(range(2 if rank == 0 else 3))
    try:
        for step in range(1, 5):
            if tr.next_batch_agreed(batches, torch.device("cpu"), step) is None:
                out["uneven_end"] = f"ended together at step {step}"
                break
    except tr.TrainingError as exc:
        out["uneven_end"] = str(exc)
    # 3. both end together: no error.
    batches = iter(range(2))
    got = [tr.next_batch_agreed(batches, torch.device("cpu"), s) for s in (1, 2, 3)]
    out["even_end"] = got
    return out


@pytest.mark.timeout(200)
def test_ranks_with_unequal_data_stop_together_instead_of_hanging(assets, tmp_path):
    run = helpers.run_ranks(_uneven_rank, 2, helpers.overrides(assets, tmp_path / "run"), timeout_s=150)
    assert run.all_ok() and not run.hung, run.describe()
    for rank in (0, 1):
        value = run.value(rank)
        error = value["different_data"].get("error", "")
        assert error.startswith("DataError: the ranks see different training data"), error
        assert "rank 0: 48 pairs / 6 steps per epoch, rank 1: 40 pairs / 5 steps per epoch" in error
        assert value["uneven_end"].startswith("at step 3 rank 0 ran out of data while the other ranks"), value
        assert value["even_end"] == [0, 1, None]
    assert run.wall_s < 90, run.describe()
