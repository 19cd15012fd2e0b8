"""Everything about the distributed environment, in one place.

Where the process learns its rank: torchrun / the deepspeed launcher variables first
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then SLURM's inside an srun
step (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NODELIST / SLURM_JOB_NODELIST,
port 20000 + job id % 20000 unless MASTER_PORT is set: DeepSpeed reads none of these),
then a single process (also in a batch script itself, outside srun). Which backend it
uses: NCCL on CUDA, gloo otherwise. How long a collective may wait: always an explicit
timeout (torch's default is 30 minutes, which turns a rank mismatch into a hung CI job).

Process-level watching lives here too: the preemption flag that SIGUSR1 / SIGTERM (or a
launcher that died) set, and the recognition of a peer that vanished mid-collective.

It is also the only module of the package that calls ``torch.distributed``
(``tests/test_architecture.py`` checks it): the primitives at the end (rank, barrier,
all-gather, all-reduce) are what ``gather.py`` builds the objective's collectives and
the rank-agreement protocol from, and what engine, export, eval and model use.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
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


# ------------------------------------------------------- preemption and vanished peers

class PreemptionFlag:
    """SIGUSR1 / SIGTERM set a flag; the loop checkpoints at the end of the current step.

    A dead launcher counts too (``poll``): SIGUSR1 kills torchrun or the ``deepspeed`` runner
    at once (its default action) and would leave the ranks training unsupervised to the end;
    under a launcher the ranks watch it and stop, checkpointed, at the next step boundary.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self.watched: dict[int, str] = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)
        self.watched = launcher_processes()

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def poll(self) -> bool:
        """Set the flag if a watched launcher process is gone; returns ``requested``."""
        if not self.requested and self.watched:
            alive = _ancestors()
            gone = [f"{name} (pid {pid})" for pid, name in self.watched.items() if pid not in alive]
            if gone:
                self.requested = True
                self.signal_name = f"the launcher exited: {', '.join(gone)}"
        return self.requested


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ancestors() -> list[int]:
    """This process's parent, grandparent, ... (Linux /proc; empty elsewhere)."""
    out, pid = [], os.getppid()
    while pid > 1 and len(out) < 8:
        out.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def launcher_processes() -> dict[int, str]:
    """The launcher processes this rank should outlive only briefly: torchrun (the parent of
    its ranks), or DeepSpeed's per-node ``launch`` process and the ``deepspeed`` runner above
    it. Nothing under srun or a plain process (a shell may exit on purpose, e.g. nohup)."""
    chain = _ancestors()
    if not chain:
        return {}
    parent = chain[0]
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return {parent: "torchrun"}
    if "deepspeed.launcher.launch" in _cmdline(parent):
        watched = {parent: "deepspeed launch"}
        if len(chain) > 1 and "deepspeed" in _cmdline(chain[1]):
            watched[chain[1]] = "deepspeed"
        return watched
    return {}


# Texts of gloo / NCCL / c10d errors when a peer process is gone (not a bug in the step).
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "socket closed",
              "nccl communicator was aborted", "remote process exited", "connection refused", "read timed out",
              "timed out waiting", "watchdog caught collective operation timeout")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the communication layer reporting a peer that went away (torch's
    ``DistError`` family and gloo's plain RuntimeErrors alike are RuntimeErrors)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(p in text for p in _PEER_GONE)


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

