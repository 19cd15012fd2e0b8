"""The Slurm launch scripts on a real (throwaway) two-node Slurm cluster, CPU ranks.

1. launch/train.sbatch, 2 nodes x 1 rank (gloo): trains, checkpoints, exports; per-job logs.
2. launch/train_deepspeed_slurm.sbatch (`deepspeed --launcher slurm`) on the same
   allocation shape: the same run, the same losses.
3. Preemption: SIGUSR1 to the batch shell mid-run (as `#SBATCH --signal=B:USR1@...` sends
   it) -> the trainer checkpoints, exits 3, the script requeues the job, the requeued run
   resumes and ends with the losses and fp32 parameters of the uninterrupted run (1e-6).
4. Another allocation: preempted on 2 nodes, not requeued, resubmitted on 1 node -> the
   run continues through the universal checkpoint to the uninterrupted run's result (1e-5).

Every wait is bounded and every job is cancelled at the end; the cluster (munged,
slurmctld, two slurmd) is started once for the module by tests/integration/slurm_cluster.py
and skipped with the reason where it cannot run (not root, no apt).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.assets import build_demo_assets
from tests.integration.slurm_cluster import running_cluster
from tests.test_elastic_resume import STABLE_ADAM, parameter_difference

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "launch" / "train.sbatch"
DS_SBATCH = REPO / "launch" / "train_deepspeed_slurm.sbatch"
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"
STEPS = 9  # 4 synthetic subsets x 12 pairs = 48 pairs, 16 per step: 3 steps per epoch, 3 epochs
JOB_TIMEOUT_S = 240
TOL = 1e-6


@pytest.fixture(scope="module")
def slurm_cluster():
    """One two-node cluster for the module (skips the module where none can run)."""
    yield from running_cluster()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("slurm_assets"))


def overrides(assets, run_dir: Path) -> list[str]:
    values = {"model.path": assets["model"], "data.source": assets["train"], "data.image_root": assets["images"],
              "run_dir": str(run_dir), "global_batch_size": 16, "num_workers": 0,
              "gradcache.query_chunk_size": 3, "gradcache.target_chunk_size": 5,
              "schedule.epochs": STEPS // 3, "checkpoint.every_steps": 0, "logging.progress": "false",
              "export.dtype": "float32", "collective_timeout_s": 120,
              "optim.eps": STABLE_ADAM}   # why: tests/test_elastic_resume.py
    return [f"{k}={v}" for k, v in values.items()]


class Job:
    """One `sbatch --wait` of a launch script in its own working directory (the submit dir,
    where logs/ lives), 2 nodes x 1 CPU rank."""

    def __init__(self, cluster, script: Path, workdir: Path, name: str, assets, nodes: int = 2,
                 env: dict | None = None):
        self.cluster, self.name, self.workdir = cluster, name, workdir
        self.run_dir = workdir / "run"
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.env = {**cluster.env, "LLAVE_DS_CPU": "1", "LLAVE_DS_PYTHON": sys.executable,
                    "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": "1", **(env or {})}
        # The script's #SBATCH header asks for GPUs on a partition called gpu: a CPU run
        # overrides exactly what launch/README.md says to.
        self.cmd = ["sbatch", "--wait", f"--job-name={name}", "--partition=debug", f"--nodes={nodes}",
                    "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
                    str(script), str(DEMO_CONFIG), *overrides(assets, self.run_dir)]
        self.stdout_path = workdir / "sbatch.out"
        self.proc = None
        self.job_id = ""

    def submit(self) -> "Job":
        self._out = open(self.stdout_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=self.workdir, env=self.env, stdout=self._out,
                                     stderr=subprocess.STDOUT, text=True)
        return self

    def find_job_id(self, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.job_id and time.monotonic() < deadline:
            ids = self.cluster.job_ids(self.name)
            if ids:
                self.job_id = ids[0]
            else:
                time.sleep(0.2)
        return self.job_id

    def wait(self, timeout_s: float = JOB_TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.cluster.run(["scancel", f"--name={self.name}"], timeout_s=10)
            self.proc.kill()
            self.proc.wait(timeout=10)
            pytest.fail(f"job {self.name} did not finish within {timeout_s} s\n{self.diagnostics()}")
        finally:
            self._out.close()
        m = re.search(r"Submitted batch job (\d+)", self.stdout_path.read_text())
        self.job_id = self.job_id or (m.group(1) if m else "")
        return rc

    def run(self, timeout_s: float = JOB_TIMEOUT_S) -> "Job":
        rc = self.submit().wait(timeout_s)
        assert rc == 0, f"sbatch --wait exited {rc}\n{self.diagnostics()}"
        return self

    # -- results ------------------------------------------------------------------------
    @property
    def batch_log(self) -> Path:
        return self.workdir / "logs" / f"{self.name}-{self.job_id}.out"

    @property
    def rank_log_dir(self) -> Path:
        return self.workdir / "logs" / f"{self.name}-{self.job_id}"

    def summaries(self) -> list[dict]:
        """The trainer's JSON summary lines (rank 0), one per run of the job."""
        text = (self.rank_log_dir / "rank0.log").read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith('{"run_dir"')]

    def losses(self) -> dict[int, float]:
        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records]
        assert steps == list(range(1, STEPS + 1)), f"metrics.jsonl steps {steps}"
        return {r["step"]: r["loss"] for r in records}

    def exported(self) -> dict[str, torch.Tensor]:
        files = sorted((self.run_dir / "export").glob("*.safetensors"))
        assert files, f"no safetensors in {self.run_dir / 'export'}"
        tensors = {}
        for f in files:
            tensors.update(load_file(str(f)))
        return tensors

    def diagnostics(self) -> str:
        parts = [f"$ {' '.join(self.cmd)}", self.stdout_path.read_text(errors="replace")[-2000:]
                 if self.stdout_path.exists() else ""]
        for path in sorted((self.workdir / "logs").rglob("*")):
            if path.is_file():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
        parts.append(self.cluster.logs_tail(800))
        return "\n".join(parts)


def assert_same_run(job: Job, reference: Job) -> None:
    got, want = job.losses(), reference.losses()
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= TOL, f"losses differ from the uninterrupted run by up to {worst}: {got} vs {want}"
    a, b = job.exported(), reference.exported()
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == torch.float32
        diff = (a[k].double() - b[k].double()).abs().max().item()
        assert diff <= TOL, f"{k}: exported parameters differ by {diff}"


@pytest.fixture(scope="module")
def reference(slurm_cluster, assets, tmp_path_factory):
    """The uninterrupted run through launch/train.sbatch (test 1 checks it, tests 2-3
    compare with it)."""
    return Job(slurm_cluster, TRAIN_SBATCH, tmp_path_factory.mktemp("slurm_ref"), "llave-ref", assets).run()


def test_train_sbatch_two_nodes_trains_checkpoints_exports(reference):
    job = reference
    assert len(job.losses()) == STEPS
    assert (job.run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert job.exported()
    assert (job.run_dir / "export" / "config.json").is_file()
    # Per-job logs: the batch shell's file and one file per rank in a per-job directory.
    log = job.batch_log.read_text()
    assert f"job {job.job_id} (restart 0) on 2 node(s)" in log, log
    assert "2 ranks, CPU/gloo" in log and "training step exited with code 0" in log, log
    assert sorted(p.name for p in job.rank_log_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    [summary] = job.summaries()
    assert summary["steps"] == STEPS and not summary["stopped_early"]
    assert Path(summary["export"]) == job.run_dir / "export"


def test_deepspeed_launcher_two_nodes_matches_srun(slurm_cluster, assets, reference, tmp_path):
    job = Job(slurm_cluster, DS_SBATCH, tmp_path, "llave-dsl", assets).run()
    log = job.batch_log.read_text()
    assert "hostfile: node1 slots=1 node2 slots=1" in log, log
    assert "cmd = srun -n 2 " in log, log  # DeepSpeed's slurm runner started the ranks with srun
    assert "deepspeed launcher exited with code 0" in log, log
    assert sorted(p.name for p in job.rank_log_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    [summary] = job.summaries()
    assert summary["steps"] == STEPS and not summary["stopped_early"]
    assert_same_run(job, reference)


def preempt_at_step_2(slurm_cluster, job: Job) -> int:
    """Submit ``job``, send SIGUSR1 to its batch shell once step 2 is logged; its exit code."""
    job.submit()
    try:
        metrics = job.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            if job.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the job never reached step 2\n{job.diagnostics()}")
            time.sleep(0.1)
        assert job.find_job_id(), f"job not in squeue\n{job.diagnostics()}"
        # What `#SBATCH --signal=B:USR1@300` does at the time limit: SIGUSR1 to the batch shell.
        signalled = slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job.job_id], timeout_s=10)
        assert signalled.returncode == 0, signalled.stderr
        return job.wait()
    finally:
        if job.proc.poll() is None:
            slurm_cluster.run(["scancel", f"--name={job.name}"], timeout_s=10)
            job.proc.kill()


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, assets, reference, tmp_path):
    job = Job(slurm_cluster, TRAIN_SBATCH, tmp_path, "llave-preempt", assets)
    rc = preempt_at_step_2(slurm_cluster, job)
    assert rc == 0, f"sbatch --wait exited {rc}\n{job.diagnostics()}"

    log = job.batch_log.read_text()
    assert "SIGUSR1 received" in log, log
    assert "training step exited with code 3" in log and "preempted: requeueing" in log, log
    assert f"job {job.job_id} (restart 1)" in log, log  # the same job id ran again
    rank0 = (job.rank_log_dir / "rank0.log").read_text(errors="replace")
    stops = re.findall(r"preemption requested \(SIGUSR1\): checkpointing at step (\d+)", rank0)
    assert len(stops) == 1, rank0[-3000:]
    stop = int(stops[0])
    assert 2 <= stop < STEPS, f"stopped at step {stop} of {STEPS}: the signal came too late"
    checkpoint = job.run_dir / "checkpoints" / f"step_{stop:08d}"
    assert f"resumed from {checkpoint} at step {stop}" in rank0, rank0[-3000:]
    final = job.summaries()[-1]
    assert final["steps"] == STEPS and not final["stopped_early"], final
    assert_same_run(job, reference)


def test_a_run_stopped_on_two_nodes_continues_exactly_on_one(slurm_cluster, assets, reference, tmp_path):
    """A requeue on another allocation: the job is preempted on 2 nodes and not requeued
    (LLAVE_DS_MAX_RESTARTS=0: it ends with exit 3), then the same command is submitted on 1
    node. The trainer converts the checkpoint to DeepSpeed's universal form and ends with the
    uninterrupted 2-node run's losses and fp32 parameters (1e-5: one rank sums float32 in
    another order than two)."""
    first = Job(slurm_cluster, TRAIN_SBATCH, tmp_path, "llave-two-nodes", assets,
                env={"LLAVE_DS_MAX_RESTARTS": "0"})
    rc = preempt_at_step_2(slurm_cluster, first)
    assert rc != 0 and "not requeueing" in first.batch_log.read_text(), first.diagnostics()
    stop = first.summaries()[-1]["steps"]
    assert first.summaries()[-1]["stopped_early"] and 2 <= stop < STEPS, first.summaries()
    second = Job(slurm_cluster, TRAIN_SBATCH, tmp_path, "llave-one-node", assets, nodes=1).run()
    rank0 = (second.rank_log_dir / "rank0.log").read_text(errors="replace")
    checkpoint = second.run_dir / "checkpoints" / f"step_{stop:08d}"
    assert f"resumed from {checkpoint} at step {stop} (its universal form" in rank0, rank0[-3000:]
    assert second.summaries()[-1]["steps"] == STEPS
    got, want = second.losses(), reference.losses()
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-5, (got, want)
    assert parameter_difference(second.exported(), reference.exported()) <= 1e-5
