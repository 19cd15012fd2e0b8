"""Preemption through the real launchers, 2 CPU ranks: torchrun and the deepspeed launcher,
SIGTERM and SIGUSR1.

* sent to ``launch/run_with_status.sh`` (the documented wrapper): passed on as SIGTERM, the
  ranks checkpoint at the end of their step, and the wrapper exits 3 ("preempted") — where
  torchrun alone exits 1;
* SIGUSR1 sent to the launcher itself kills it at once (its default action): the ranks see
  their launcher gone at the next step boundary, checkpoint and stop instead of training on
  unsupervised, and write ``exit_status.json`` saying "preempted".
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llave_ds.core.distributed import free_port
from llave_ds.training import checkpoint as ckpt
from tests.reliability import helpers

pytestmark = pytest.mark.slow
WRAPPER = helpers.REPO / "launch" / "run_with_status.sh"
MAX_STEPS = 200  # far more than run before the signal: the run must stop because of it


def _launcher(kind: str) -> list[str]:
    bindir = Path(sys.executable).parent
    port = str(free_port())
    if kind == "torchrun":
        return [str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "llave_ds.train"]
    return [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--no_local_rank",
            "--module", "llave_ds.train"]


def _start(assets, run_dir: Path, kind: str, wrapped: bool) -> subprocess.Popen:
    args = ["--config", str(helpers.DEMO_CONFIG), *helpers.overrides(
        assets, run_dir, **{"schedule.max_steps": MAX_STEPS, "checkpoint.every_steps": 1000, "export.at_end": False})]
    cmd = _launcher(kind) + args
    if wrapped:
        cmd = ["bash", str(WRAPPER), str(run_dir), "--"] + cmd
    env = dict(os.environ, **helpers.RANK_ENV, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    run_dir.mkdir(parents=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(helpers.REPO))


def _wait_for_steps(proc, run_dir: Path, n: int, timeout_s: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, _log(run_dir)
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout_s}s\n{_log(run_dir)}")


def _log(run_dir: Path) -> str:
    path = run_dir.parent / f"{run_dir.name}.log"
    return path.read_text()[-4000:] if path.is_file() else ""


def _status(run_dir: Path, timeout_s: float = 90) -> dict:
    path = run_dir / "exit_status.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise AssertionError(f"no {path}\n{_log(run_dir)}")


def _check_preempted(run_dir: Path, status: dict) -> None:
    assert status["status"] == "preempted" and status["exit_code"] == 3, status
    stopped = status["step"]
    assert 2 <= stopped < MAX_STEPS, status
    root = run_dir / "checkpoints"
    assert (root / ckpt.LATEST).read_text().strip() == ckpt.tag_for_step(stopped)
    ckpt.verify_checkpoint(root / ckpt.tag_for_step(stopped), checksums=True)
    assert [r["step"] for r in helpers.records(run_dir)] == list(range(1, stopped + 1))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["torchrun", "deepspeed"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_the_wrapper_checkpoints_and_exits_3(assets, tmp_path, kind, sig):
    run_dir = tmp_path / "run"
    proc = _start(assets, run_dir, kind, wrapped=True)
    try:
        _wait_for_steps(proc, run_dir, 2)
        proc.send_signal(sig)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 3, _log(run_dir)
    _check_preempted(run_dir, _status(run_dir, timeout_s=1))
    assert "preempted, checkpointed" in _log(run_dir)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["torchrun", "deepspeed"])
def test_sigusr1_killing_the_launcher_stops_the_ranks_with_a_checkpoint(assets, tmp_path, kind):
    """SIGUSR1's default action kills torchrun (or the deepspeed runner) at once; before,
    its ranks went on training unsupervised to the end."""
    run_dir = tmp_path / "run"
    proc = _start(assets, run_dir, kind, wrapped=False)
    try:
        _wait_for_steps(proc, run_dir, 2)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) != 0
        status = _status(run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
    _check_preempted(run_dir, status)
    assert "the launcher exited" in _log(run_dir), _log(run_dir)


@pytest.mark.timeout(120)
def test_a_failure_under_the_wrapper_ends_with_the_trainers_one_line_reason(assets, tmp_path):
    """torchrun prints its own ChildFailedError traceback when a rank fails; what the user
    reads last is the trainer's reason (from exit_status.json) and its exit code."""
    run_dir = tmp_path / "run"
    args = ["--config", str(helpers.DEMO_CONFIG), *helpers.overrides(assets, run_dir),
            "model.path=/nonexistent/model"]
    cmd = ["bash", str(WRAPPER), str(run_dir), "--"] + _launcher("torchrun") + args
    env = dict(os.environ, **helpers.RANK_ENV, LLAVE_DS_PYTHON=sys.executable)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    run_dir.mkdir(parents=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100, cwd=str(helpers.REPO))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("run_with_status: training failed (exit 2): config error:"), proc.stderr[-3000:]
    assert "/nonexistent/model" in last, last
