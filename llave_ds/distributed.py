"""Everything about the distributed environment, in one place.

Where the process learns its rank: torchrun / the deepspeed launcher variables first
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then SLURM's inside an srun
step (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NODELIST / SLURM_JOB_NODELIST,
port 20000 + job id % 20000 unless MASTER_PORT is set: DeepSpeed reads none of these),
then a single process (also in a batch script itself, outside srun). Which backend it
uses: NCCL on CUDA, gloo otherwise. How long a collective may wait: always an explicit
timeout (torch's default is 30 minutes, which turns a rank mismatch into a hung CI job).

It is also the only module of the package that calls ``torch.distributed``
(``tests/test_architecture.py`` checks it): the primitives at the end (rank, barrier,
all-gather, all-reduce) are what ``gather.py`` builds the objective's collectives and
the rank-agreement protocol from, and what engine, export, eval and model use.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[003-005,7],cpu1``.

    Prefers ``scontrol show hostnames`` (exact SLURM semantics) and falls back to a
    parser of the common forms when scontrol is not on PATH.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if not m:
        return first
    prefix, ranges = m.groups()
    lo = ranges.split(",")[0].split("-")[0]
    return prefix + lo


def _in_slurm_batch_step(env: Mapping[str, str]) -> bool:
    """True in a batch script itself (a job id but no step id): there SLURM_NTASKS is the
    job's task count, yet only this one process runs; the ranks exist only under srun."""
    return "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env


def detect_env(environ: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    """Read rank / world size from torchrun variables, then SLURM, else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), source="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and not _in_slurm_batch_step(env):
        # The step's nodes, not the job's: `srun -N1 -w node2` inside a two-node job runs
        # rank 0 on node2 while SLURM_JOB_NODELIST still starts with node1.
        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                    or env.get("SLURM_NODELIST") or "127.0.0.1")
        master = env.get("MASTER_ADDR") or _first_slurm_host(nodelist)
        # A port derived from the job id keeps two jobs sharing a node from colliding.
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = int(env.get("MASTER_PORT") or 20000 + job_id % 20000)
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        return DistributedEnv(
            rank=int(env["SLURM_PROCID"]), world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", "0")), master_addr=master,
            master_port=port, source="slurm")
    # One process: any free port will do (a fixed default collides with parallel jobs).
    return DistributedEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                          master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port(),
                          source="single")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_device(env: DistributedEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: Optional[str] = None,
                     environ: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    """Initialise torch.distributed (even for one process, so collectives are uniform).

    Exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT so that DeepSpeed,
    which only reads those, sees the same environment whatever launched us.
    """
    env = detect_env(environ)
    os.environ.update({
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })
    if dist.is_initialized():
        return env
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(default_device(env))
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return env


def shutdown_distributed() -> None:
    """Barrier then destroy: ending workers without it occasionally aborts at exit."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on this host (for single-node launches)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------- the process group's primitives
# Each works without a process group too (one process: rank 0 of a world of 1), so callers
# need no "if initialised" of their own.

def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed(group=None) -> bool:
    """More than one rank in ``group`` (the default group when None)."""
    return is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def backend() -> Optional[str]:
    """The default group's backend ("gloo", "nccl"), None without a process group."""
    return dist.get_backend() if is_initialized() else None


def barrier(group=None) -> None:
    """Wait for every rank (no-op with one rank); bounded by the group's timeout."""
    if is_distributed(group):
        dist.barrier(group=group)


def all_gather_into_list(out: list, x: torch.Tensor, group=None) -> None:
    """``out[r]`` <- rank r's ``x`` (same shape on every rank)."""
    dist.all_gather(out, x, group=group)


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce_(t: torch.Tensor, op: str, group=None) -> torch.Tensor:
    """In-place all-reduce with ``op`` "sum" or "max" (identity with one rank)."""
    if is_distributed(group):
        dist.all_reduce(t, op=_REDUCE_OPS[op], group=group)
    return t


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` with one rank)."""
    if not is_distributed(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out

