"""A throwaway two-node Slurm cluster on this machine, for the launch-script tests.

Debian's Slurm 22.05 runs without systemd: a private ``munged``, ``slurmctld`` and two
``slurmd`` (``node1``, ``node2``, both at 127.0.0.1: Debian builds Slurm with
MULTIPLE_SLURMD) give a real two-node allocation. Everything lives in one private
directory with its own ``slurm.conf``, munge socket and ports, so it neither touches nor
collides with a Slurm (or another test session's cluster) already on the machine; clients
find it through ``SLURM_CONF``. Daemons run in the foreground as our children and are
stopped by PID.

Needs Linux and root (slurmd launches jobs as the submitting user, SlurmUser=root); the
packages are installed with apt when missing. Where that is impossible the fixture skips
with the reason; a cluster that is installed but does not come up is an error.

    @pytest.fixture(scope="module")
    def slurm_cluster():
        yield from running_cluster()
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
NODES = ("node1", "node2")
MARKER = "LLAVE_DS_TEST_SLURM"  # in the environment of every process this cluster starts


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the test cluster (the reason is the message)."""


def _free_port(exclude: Sequence[int] = ()) -> int:
    # Below the Linux ephemeral range (32768+), so a client socket cannot take it later.
    for _ in range(200):
        port = random.randint(24000, 32000)
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise ClusterUnavailable("no free TCP port for the Slurm daemons")


def ensure_slurm_installed(timeout_s: float = 180) -> None:
    """Install Debian's Slurm and munge with apt if any binary is missing."""
    if not sys.platform.startswith("linux"):
        raise ClusterUnavailable("the Slurm test cluster needs Linux")
    if all(shutil.which(b) for b in BINARIES):
        return
    missing = [b for b in BINARIES if not shutil.which(b)]
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and we are not "
                                 "root to apt-get install it")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    tail = ""
    for attempt in ("install", "update", "install"):
        cmd = ["apt-get", "update", "-q"] if attempt == "update" else install
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {exc}") from exc
        tail = (proc.stdout + proc.stderr)[-1500:]
        if attempt == "install" and proc.returncode == 0 and all(shutil.which(b) for b in BINARIES):
            return
    raise ClusterUnavailable(f"apt-get could not install {' '.join(PACKAGES)}: {tail}")


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all from ``root`` (a private directory)."""

    def __init__(self, root: Path, nodes: Sequence[str] = NODES, cpus_per_node: int = 2):
        self.root = Path(root)
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        # A pytest run inside a Slurm job (or with SBATCH_* defaults set) must not leak its
        # own job's variables into this cluster's commands and jobs.
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env.update({"SLURM_CONF": str(self.conf), MARKER: str(self.root)})

    # ---------------------------------------------------------------------------- setup
    def _write_config(self) -> None:
        used: list[int] = []
        for _ in range(1 + len(self.nodes)):
            used.append(_free_port(used))
        ctld_port, node_ports = used[0], used[1:]
        for d in ("state", "spool", "munge", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        # Job ids start at a random point: the launch scripts derive the rendezvous port
        # from the job id, and two test clusters on one machine must not share ports.
        first_job_id = random.randint(1000, 11000)
        lines = [
            "ClusterName=llavetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again
            # (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",  # advertise more CPUs than the machine has
            "MinJobAge=5",  # else `sbatch --wait` polls slowly
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # a requeued job restarts promptly
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            f"FirstJobId={first_job_id}",
            "KillWait=10",
            "InactiveLimit=0",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting the Slurm test "
                                   f"cluster:\n{self.logs_tail()}")

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged insists that every directory above its socket is world-executable
        self._write_config()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'seed'}",
                               f"--log-file={m / 'munged.log'}"])
        deadline = time.monotonic() + timeout_s
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket:\n{self.logs_tail()}")
            time.sleep(0.1)
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        while True:
            self._check_alive()
            states = self.node_states()
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle after {timeout_s:.0f} s (sinfo: {states}):\n"
                                   f"{self.logs_tail()}")
            time.sleep(0.3)

    # ----------------------------------------------------------------------- commands
    def run(self, args: Sequence[str], timeout_s: float = 30, check: bool = False,
            env: Optional[dict] = None, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s, check=check,
                              env=env or self.env, cwd=cwd)

    def node_states(self) -> dict[str, str]:
        try:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout_s=10).stdout
        except subprocess.TimeoutExpired:
            return {}
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def job_ids(self, name: Optional[str] = None) -> list[str]:
        args = ["squeue", "-h", "-o", "%i"] + (["-n", name] if name else [])
        try:
            return self.run(args, timeout_s=10).stdout.split()
        except subprocess.TimeoutExpired:
            return []

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once the record is gone: MinJobAge=5 s)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout_s=10).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def cancel_all(self, wait_s: float = 20) -> None:
        ids = self.job_ids()
        if not ids:
            return
        self.run(["scancel", *ids], timeout_s=10)
        deadline = time.monotonic() + wait_s
        while self.job_ids() and time.monotonic() < deadline:
            time.sleep(0.5)

    # ------------------------------------------------------------------------ teardown
    def _leftover_pids(self) -> list[int]:
        """Processes started by this cluster (slurmstepd, job tasks) that outlived it:
        everything whose environment carries our marker."""
        needle = f"{MARKER}={self.root}".encode() + b"\0"
        mine = {os.getpid(), os.getppid()}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in mine:
                continue
            try:
                if needle in (entry / "environ").read_bytes() + b"\0":
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.cancel_all()
        except Exception:  # noqa: BLE001 - teardown goes on whatever happened
            pass
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for log in self._logs:
            log.close()

    def logs_tail(self, chars: int = 1500) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                text = path.read_text(errors="replace")[-chars:]
                parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)


def start_cluster(timeout_s: float = 60) -> SlurmCluster:
    """Install if needed and start a cluster in a fresh directory (ClusterUnavailable if
    this machine cannot run one)."""
    ensure_slurm_installed()
    if os.geteuid() != 0:
        raise ClusterUnavailable("the Slurm test cluster runs slurmd as root (SlurmUser=root): run as root")
    # Not pytest's tmp_path: munged needs every directory above its socket to be
    # world-executable, and a short path keeps the socket under the 108-byte limit.
    root = Path(tempfile.mkdtemp(prefix="llave-slurm-", dir="/tmp"))
    cluster = SlurmCluster(root)
    try:
        return cluster.start(timeout_s)
    except BaseException:
        cluster.stop()
        raise


def running_cluster():
    """Generator behind a (module-scoped) fixture: yields a running cluster, skips the
    tests with the reason where this machine cannot run one, and stops it afterwards (jobs
    cancelled, daemons and leftovers terminated by PID, directory removed)::

        @pytest.fixture(scope="module")
        def slurm_cluster():
            yield from running_cluster()
    """
    try:
        cluster = start_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(f"no Slurm test cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
