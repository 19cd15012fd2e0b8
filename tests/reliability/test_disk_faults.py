"""A full disk while saving a checkpoint: a clear error on every rank, the incomplete
checkpoint removed, the previous one intact and still named by ``latest``.

Two ways to fill the disk: a real tmpfs just too small for the next checkpoint (needs
root; torch then reports only "unexpected pos N vs M"), and a patched ``torch.save`` that
writes half an optimizer shard and raises ENOSPC (runs anywhere)."""
from __future__ import annotations

import os
import subprocess

import pytest

from llave_ds.training import checkpoint as ckpt
from tests.reliability import helpers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def small_disk(tmp_path, reference_run):
    """A tmpfs with room for the step-2 checkpoint plus 512 KiB (the next one needs ~1.8 MiB)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    size = ckpt.dir_size(reference_run / "checkpoints" / ckpt.tag_for_step(2)) + 512 * 1024
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the patched "
                    "variant covers the same path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _check_disk_full_outcome(run, root, failing_rank_text):
    assert len(run.outcomes) == 2 and not run.hung, run.describe()
    previous = root / ckpt.tag_for_step(2)
    for rank in (0, 1):
        error = run.value(rank).get("error", "")
        assert error.startswith(f"CheckpointError: saving checkpoint {root / ckpt.tag_for_step(4)} failed"), error
        assert failing_rank_text in error, error
        assert "looks full" in error and "MiB free" in error, error
        assert f"still names {previous.name}, which is intact" in error, error
    assert (root / ckpt.LATEST).read_text().strip() == previous.name
    assert not (root / ckpt.tag_for_step(4)).exists()        # the incomplete one was removed
    assert ckpt.find_resume_checkpoint(root) == previous
    ckpt.verify_checkpoint(previous, checksums=True)          # every byte as saved


def test_disk_full_on_a_real_small_filesystem(assets, reference_run, tmp_path, small_disk):
    run_dir = tmp_path / "run"
    helpers.clone_at_step(reference_run, run_dir, 2, ckpt_dir=small_disk)
    run = helpers.run_ranks(helpers.train_rank, 2,
                            helpers.overrides(assets, run_dir, **{"checkpoint.dir": str(small_disk)}))
    # Which rank hits the full disk first depends on timing; torch says "unexpected pos".
    _check_disk_full_outcome(run, small_disk, "failed (RuntimeError:")
    assert os.statvfs(small_disk).f_bfree > 0


def test_disk_full_injected_on_one_rank(assets, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    helpers.clone_at_step(reference_run, run_dir, 2)
    run = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir), {"enospc": (4, 0)})
    _check_disk_full_outcome(run, run_dir / "checkpoints", "rank 0: writing ")
    error = run.value(1)["error"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt failed (OSError: [Errno 28] No space left on device" in error
    assert "rank 1:" not in error  # only rank 0 failed; rank 1 reports rank 0's error
