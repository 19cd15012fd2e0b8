"""Run a function on N local CPU ranks over gloo, in bounded time.

Each rank is a fresh spawned process with the torchrun variables set, so the code under
test goes through the same ``llave_ds.core.distributed.init_distributed`` as a real launch.
Results travel back pickled; a rank that raises sends its traceback; a run that exceeds
``timeout_s`` is killed and reported, so a collective mismatch can never hang the suite.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from llave_ds.core.distributed import free_port


@dataclass
class RankOutcome:
    rank: int
    ok: bool
    value: Any = None
    error: str = ""


def _worker(fn, rank, world_size, port, collective_timeout_s, env_extra, queue, args):
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    os.environ.update(env_extra or {})
    import torch
    torch.set_num_threads(1)
    from llave_ds.core import distributed
    ok = False
    try:
        distributed.init_distributed(timeout_s=collective_timeout_s, backend="gloo")
        value = fn(rank, world_size, *args)
        queue.put((rank, True, pickle.dumps(value), ""))
        ok = True
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put((rank, False, None, traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            if ok:
                try:
                    dist.barrier()
                except Exception:  # noqa: BLE001 - a peer failed; we are exiting anyway
                    pass
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, *args, timeout_s: float = 180.0,
                    collective_timeout_s: float = 60.0, env: Optional[dict] = None,
                    expect_errors: bool = False) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks.

    Returns the per-rank outcomes; unless ``expect_errors`` a failing rank raises
    ``AssertionError`` carrying every failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, collective_timeout_s, env,
                                               queue, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, RankOutcome] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, payload, err = queue.get(timeout=0.5)
        except Exception:  # queue.Empty: check whether a rank died without reporting
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        outcomes[rank] = RankOutcome(rank, ok, pickle.loads(payload) if ok else None, err)
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if len(outcomes) < world_size:
        missing = sorted(set(range(world_size)) - set(outcomes))
        raise AssertionError(f"ranks {missing} did not report within {timeout_s:.0f}s "
                             f"(still running: {hung}; exit codes "
                             f"{[p.exitcode for p in procs]})\n" +
                             "\n".join(o.error for o in outcomes.values() if not o.ok))
    result = [outcomes[r] for r in range(world_size)]
    if not expect_errors and not all(o.ok for o in result):
        raise AssertionError("\n".join(f"--- rank {o.rank} ---\n{o.error}" for o in result if not o.ok))
    return result


def values(outcomes: list[RankOutcome]) -> list[Any]:
    return [o.value for o in outcomes]
