"""Checkpoint faults: a process killed while saving, a missing / truncated / corrupted
shard (an error for an explicit --resume, a loud fallback to the previous checkpoint under
--resume auto), a fresh start over a run's checkpoints, metrics after a resume, a resume
with another number of ranks, a shard DeepSpeed cannot read."""
from __future__ import annotations

import json
import shutil

import pytest

from llave_ds.training import checkpoint as ckpt
from tests.reliability import helpers


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_during_checkpoint_save_keeps_latest_on_the_previous_one_and_resume_is_exact(
        assets, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    helpers.clone_at_step(reference_run, run_dir, 2)
    # Rank 1 dies after DeepSpeed wrote its files of step 4, before its RNG state / marker.
    crash = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir),
                              {"kill_in_save": (4, 1), "marks_dir": str(tmp_path)})
    assert crash.exitcodes[1] == -9 and not crash.hung, crash.describe()
    assert "error" in crash.value(0), crash.value(0)
    root = run_dir / "checkpoints"
    partial = root / ckpt.tag_for_step(4)
    assert partial.is_dir() and any(partial.glob("*optim_states.pt"))   # half written ...
    assert ckpt.read_marker(partial) is None                            # ... never marked complete
    assert (root / ckpt.LATEST).read_text().strip() == ckpt.tag_for_step(2)
    assert ckpt.find_resume_checkpoint(root) == root / ckpt.tag_for_step(2)
    ckpt.verify_checkpoint(root / ckpt.tag_for_step(2), checksums=True)  # the previous one is intact

    resumed = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir))
    assert resumed.all_ok() and resumed.value(0)["steps"] == helpers.STEPS, resumed.describe()
    assert (root / ckpt.LATEST).read_text().strip() == ckpt.tag_for_step(4)
    ckpt.verify_checkpoint(partial, checksums=True)  # re-saved from scratch, complete
    want, got = helpers.last_records(reference_run), helpers.last_records(run_dir)
    assert all(abs(want[s]["loss"] - got[s]["loss"]) <= 1e-6 for s in want), (want, got)
    assert helpers.max_export_diff(helpers.exported(reference_run), helpers.exported(run_dir)) <= 1e-6


def _copy_run(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", run_dir / "checkpoints")
    return run_dir, run_dir / "checkpoints" / ckpt.tag_for_step(helpers.STEPS)


def _argv(assets, run_dir, *extra):
    return ["--config", str(helpers.DEMO_CONFIG), *helpers.overrides(assets, run_dir), *extra]


def _auto_candidates(assets, run_dir, caplog):
    """What ``--resume auto`` would try, best first, and the warnings it logged."""
    from llave_ds.train import run_layout
    from llave_ds.training.run_dir import RunDir
    caplog.clear()
    cfg = helpers._load(helpers.overrides(assets, run_dir))
    with caplog.at_level("WARNING"):
        found = RunDir.from_config(cfg).resume_candidates(cfg.checkpoint.resume, run_layout(cfg, 2),
                                                          cfg.checkpoint.overwrite)
    return found, caplog.text


@pytest.mark.slow  # needs the reference run's checkpoint
def test_missing_shard_is_a_clear_error_naming_the_file(assets, reference_run, tmp_path, monkeypatch, capsys,
                                                        caplog):
    run_dir, latest = _copy_run(reference_run, tmp_path)
    shard = latest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.unlink()
    previous = latest.parent / ckpt.tag_for_step(2)
    # Named explicitly: an error naming the file and what to resume from instead.
    code, err = helpers.train_cli_in_process(_argv(assets, run_dir, "--resume", str(latest)), monkeypatch, capsys,
                                             world_size=2)
    assert code == 2, err
    assert f"is missing {shard}" in err and "llave_complete.json" in err, err
    assert f"checkpoint.resume={previous}" in err, err  # what to do instead
    # --resume auto (an unattended requeue): the damaged newest is skipped, loudly.
    found, log = _auto_candidates(assets, run_dir, caplog)
    assert found == [previous]
    assert f"--resume auto: skipping {latest}" in log and f"is missing {shard}" in log, log


@pytest.mark.slow  # needs the reference run's checkpoint
def test_truncated_shard_is_a_clear_error_naming_the_file(assets, reference_run, tmp_path, monkeypatch, capsys,
                                                          caplog):
    run_dir, latest = _copy_run(reference_run, tmp_path)
    shard = latest / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 3)
    code, err = helpers.train_cli_in_process(_argv(assets, run_dir, "--resume", str(latest)), monkeypatch, capsys,
                                             world_size=2)
    assert code == 2, err
    assert f"checkpoint file {shard} is {size // 3} bytes but was {size} bytes when saved" in err, err
    found, log = _auto_candidates(assets, run_dir, caplog)
    assert found == [latest.parent / ckpt.tag_for_step(2)]
    assert f"{shard} is {size // 3} bytes but was {size} bytes" in log, log
    # Nothing usable at all: an error listing what was wrong with each, never a fresh start.
    for other in latest.parent.glob("step_*/zero_pp_rank_0_mp_rank_00_model_states.pt"):
        other.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="--resume auto: no checkpoint in .* is usable"):
        _auto_candidates(assets, run_dir, caplog)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_corrupted_newest_checkpoint_under_auto_resumes_from_the_previous_one(assets, reference_run, tmp_path):
    """A flipped byte (same size) is found by its CRC, on the rank that reads that share. An
    explicit --resume of it fails on every rank; --resume auto skips it with a warning and
    resumes from the previous checkpoint, reproducing the reference run; the interrupted
    attempt's later metric rows (and a line torn by the crash) move to a side file."""
    run_dir, latest = _copy_run(reference_run, tmp_path)
    shard = latest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    blob = bytearray(shard.read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 64] = bytes(b ^ 0xFF for b in blob[middle:middle + 64])  # same size, other bytes
    shard.write_bytes(bytes(blob))

    explicit = helpers.run_ranks(helpers.train_rank, 2,
                                 helpers.overrides(assets, run_dir, **{"checkpoint.resume": str(latest)}),
                                 timeout_s=150)
    assert len(explicit.outcomes) == 2 and not explicit.hung, explicit.describe()
    for rank in (0, 1):
        error = explicit.value(rank).get("error", "")
        assert error.startswith("CheckpointError: rank 1: checkpoint file"), error  # rank 1 read that share
        assert f"{shard} is corrupted: its CRC-32 is" in error, error
    # Found before the model was built: no step ran, nothing was written.
    assert not (run_dir / "metrics.jsonl").exists()

    # The interrupted attempt had logged steps 1-4, the last line torn by the crash.
    rows = [json.dumps(r) for r in helpers.records(reference_run)]
    (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows) + '{"step": 5, "lo')
    auto = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir), timeout_s=200)
    assert auto.all_ok() and auto.value(0)["steps"] == helpers.STEPS, auto.describe()
    log = (run_dir / "rank0.log").read_text()
    assert f"--resume auto: skipping {latest}, it does not verify" in log and "is corrupted" in log, log
    got = [r["step"] for r in helpers.records(run_dir)]
    assert got == [1, 2, 3, 4], got  # one row per step
    want = {r["step"]: r for r in helpers.records(reference_run)}
    assert all(abs(r["loss"] - want[r["step"]]["loss"]) <= 1e-6 for r in helpers.records(run_dir))
    superseded = [json.loads(line) for line in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in superseded] == [3, 4, None]
    assert all(r["superseded_by_resume_from"] == 2 for r in superseded) and "unreadable_line" in superseded[-1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fresh_start_over_checkpoints_is_refused_unless_asked_and_then_nothing_is_lost(
        assets, reference_run, tmp_path, monkeypatch, capsys):
    run_dir, latest = _copy_run(reference_run, tmp_path)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in helpers.records(reference_run)))
    code, err = helpers.train_cli_in_process(_argv(assets, run_dir, "--resume", "none"), monkeypatch, capsys,
                                             world_size=2)
    assert code == 2, err
    assert f"holds checkpoints up to step {helpers.STEPS}" in err and "--resume none --overwrite" in err, err
    code, err = helpers.train_cli_in_process(_argv(assets, run_dir, "--overwrite"), monkeypatch, capsys,
                                             world_size=2)
    assert code == 2 and "needs checkpoint.resume=none" in err, err

    fresh = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(
        assets, run_dir, **{"checkpoint.resume": "none", "checkpoint.overwrite": "true", "schedule.max_steps": 2}))
    assert fresh.all_ok() and fresh.value(0)["steps"] == 2, fresh.describe()
    (previous,) = run_dir.glob("previous-*")  # the earlier run, moved aside whole
    assert (previous / "checkpoints" / latest.name / ckpt.COMPLETE_MARKER).is_file()
    assert [r["step"] for r in helpers.records(previous)] == list(range(1, helpers.STEPS + 1))
    assert [r["step"] for r in helpers.records(run_dir)] == [1, 2]
    # The saved config resumes: relaunching with it continues this run, it does not restart it.
    from llave_ds.config import load_config
    from llave_ds.train import TrainConfig
    saved = load_config(TrainConfig, run_dir / "config.yaml")
    assert saved.checkpoint.resume == "auto" and saved.checkpoint.overwrite is False


@pytest.mark.slow  # needs the reference run's checkpoint
def test_resume_that_would_change_the_run_is_refused_before_any_process_group(
        assets, reference_run, tmp_path, monkeypatch, capsys):
    """Another rank count continues the run (tests/test_elastic_resume.py); another ZeRO stage
    or another global batch cannot, and is refused before any process group, saying why."""
    run_dir, latest = _copy_run(reference_run, tmp_path)
    code, err = helpers.train_cli_in_process(_argv(assets, run_dir, "deepspeed.config=zero2"), monkeypatch, capsys)
    assert code == 2, err
    assert f"{latest} was written under ZeRO stage 3, this run uses stage 2" in err, err
    code, err = helpers.train_cli_in_process(_argv(assets, run_dir, "global_batch_size=16"), monkeypatch, capsys,
                                             world_size=4)
    assert code == 2 and "global_batch_size=8, this run has 16" in err, err
    assert not (latest / "universal").exists()


class _FailingEngine:
    def load_checkpoint(self, *args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")


def test_unreadable_shard_without_manifest_is_named_when_deepspeed_fails(tmp_path):
    """Checkpoints from before the manifest: DeepSpeed's load error is mapped to the file."""
    import torch

    from llave_ds.training.engine import load_checkpoint
    path = tmp_path / "checkpoints" / ckpt.tag_for_step(3)
    path.mkdir(parents=True)
    torch.save({"ok": torch.zeros(3)}, path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04 not really a zip")
    ckpt.mark_complete(path, {"step": 3, "world_size": 1, "tag": path.name})  # no "files": old format
    with pytest.raises(ckpt.CheckpointError) as info:
        load_checkpoint(_FailingEngine(), path)
    msg = str(info.value)
    assert f"{path / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'} cannot be read" in msg, msg
    assert "central directory" in msg


def test_latest_naming_an_incomplete_checkpoint_falls_back_to_the_newest_complete(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = root / ckpt.tag_for_step(step)
        d.mkdir(parents=True)
        (d / "x.pt").write_bytes(b"x")
        if complete:
            ckpt.mark_complete(d, {"step": step, "files": ckpt.build_manifest(d, ["x.pt"])})
    ckpt.set_latest(root, ckpt.tag_for_step(6))  # as if a crash hit between marker and latest
    with caplog.at_level("WARNING", logger="llave_ds.training.checkpoint"):
        assert ckpt.find_resume_checkpoint(root) == root / ckpt.tag_for_step(4)
    assert any("not a complete checkpoint" in r.getMessage() for r in caplog.records)
    # The half-written save is named, not skipped without a word.
    assert any(f"skipping {root / ckpt.tag_for_step(6)}: it has no {ckpt.COMPLETE_MARKER}, so its save was "
               "interrupted" in r.getMessage() for r in caplog.records), caplog.text
    marker = json.loads((root / ckpt.tag_for_step(4) / ckpt.COMPLETE_MARKER).read_text())
    assert marker["files"] == {"x.pt": {"size": 1}}


@pytest.mark.slow  # needs the reference run's checkpoint
def test_export_refuses_a_corrupted_checkpoint_as_resume_does(assets, reference_run, tmp_path, capsys):
    """A flipped byte in the fp32 master weights: export names the file and its checksum and
    writes nothing (before: exit 0 and a weight off by 7e-2); the previous one still exports."""
    from llave_ds.cli import main as cli_main
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir, ignore=shutil.ignore_patterns("export", "rank*.log"))
    latest = run_dir / "checkpoints" / ckpt.tag_for_step(helpers.STEPS)
    shard = latest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    out = tmp_path / "export"
    capsys.readouterr()
    assert cli_main(["export", str(run_dir), "--out", str(out), "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint file {shard} is corrupted: its CRC-32 is" in err, err
    previous = run_dir / "checkpoints" / ckpt.tag_for_step(2)
    assert f"llave-ds export {previous} --out" in err, err
    assert not out.exists()
    assert cli_main(["export", str(previous), "--out", str(out), "--dtype", "fp32"]) == 0
    assert list(out.glob("*.safetensors"))
