"""Sharded, streamed encoding for evaluation: a dataset of sides embedded in order, each rank
embedding one contiguous shard while DataLoader workers decode the next batches, the shards
gathered back on every rank (MMEB-V1 subsets, MMEB-V2 queries and page corpora); and the two
ways ranks agree before encoding: rank 0 decides and shares (`rank0_then_shared`), or every
rank loads and all fail together (`load_on_every_rank`)."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from llave_ds.core import distributed
from llave_ds.core.gather import GatherMode, all_gather_objects, all_gather_rows
from llave_ds.eval.mmeb_data import shard_range


class _Shard(torch.utils.data.Dataset):
    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        return self.dataset[self.start + i]


def _as_list(batch: list) -> list:
    return batch


def embed_dataset(embedder, dataset: Sequence[Any], *, role: str, desc: str, batch_size: int, progress: bool,
                  num_workers: int = 2, where: str = "") -> torch.Tensor:
    """``[len(dataset), dim]`` float32 embeddings of ``dataset[i]`` (a `Side`; one whose
    ``error`` is set stops the run with ``where`` and the error) as ``role``.

    With several ranks each rank embeds its contiguous shard (`shard_range`) and one gather
    puts them back in order on every rank: every rank runs exactly the same two collectives per
    call (agree on errors, gather), also with an empty shard, so ranks never wait on each
    other; bad input on any rank is raised on every rank, naming the rank."""
    from tqdm.auto import tqdm

    rank, world = distributed.rank(), distributed.world_size()
    start, stop = shard_range(len(dataset), rank, world)
    if num_workers and multiprocessing.current_process().daemon:
        num_workers = 0  # a daemonic process (e.g. a multiprocessing pool worker) may not start workers
    loader = torch.utils.data.DataLoader(
        _Shard(dataset, start, stop), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_as_list, prefetch_factor=2 if num_workers else None)
    out = torch.empty(stop - start, embedder.dim, dtype=torch.float32)
    done, error = 0, None
    try:
        for sides in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=not (progress and rank == 0)):
            bad = next((s.error for s in sides if getattr(s, "error", None)), None)
            if bad:
                raise ValueError(f"{where}{bad}")
            emb = embedder.encode_sides(sides, role=role, batch_size=len(sides), progress=False)
            out[done:done + len(sides)] = emb.float().cpu()
            done += len(sides)
    except ValueError as exc:  # a bad input on this rank's shard
        if world == 1:
            raise
        error = str(exc)
    if world > 1:
        # Why: a rank that stopped on bad input would leave the others waiting in the gather
        # below until the collective timeout; the ranks agree first and all raise the same error.
        errors = [f"rank {r}: {e}" for r, e in enumerate(all_gather_objects(error)) if e is not None]
        if errors:
            raise ValueError("; ".join(errors))
        gathered, _ = all_gather_rows(out.to(embedder.device), GatherMode.STOP_GRAD)
        out = gathered.cpu()
    return out


def rank0_then_shared(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only, its result (or its error) handed to every rank in one
    collective that every rank runs: ranks never decide differently, nor hang on a failure."""
    value, error, exc = None, None, None
    if distributed.rank() == 0:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - passed on to the other ranks, then re-raised
            exc, error = e, f"{type(e).__name__}: {e}"
    if distributed.world_size() > 1:
        value, error = all_gather_objects((value, error))[0]
    if exc is not None:
        raise exc
    if error is not None:
        raise ValueError(f"rank 0 failed: {error}")
    return value


def load_on_every_rank(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it fails on any rank, every rank raises (one collective)."""
    value, error, exc = None, None, None
    try:
        value = fn()
    except (ValueError, FileNotFoundError) as e:
        exc, error = e, str(e)
    if distributed.world_size() > 1:
        errors = [f"rank {r}: {e}" for r, e in enumerate(all_gather_objects(error)) if e is not None]
    else:
        errors = []
    if exc is not None:
        raise exc
    if errors:
        raise ValueError("; ".join(errors))
    return value


@contextlib.contextmanager
def eval_process_group(timeout_s: float = 1800) -> Iterator[None]:
    """The process group of one ``llave-ds eval`` launch: started when launched with several
    ranks (torchrun / srun), logging at INFO on rank 0 only, shut down however the body ends."""
    multi = distributed.detect_env().world_size > 1
    if multi:
        distributed.init_distributed(timeout_s=timeout_s)
    logging.basicConfig(level=logging.INFO if distributed.detect_env().rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        yield
    finally:
        if multi:
            distributed.shutdown_distributed()


def load_embedder(model: str, max_length: Optional[int] = None):
    """The `LlaveEmbedder` of ``--model`` (``--max-length`` overriding its formatter's)."""
    from llave_ds.model.embedder import LlaveEmbedder

    return LlaveEmbedder.from_pretrained(model, **({"max_length": max_length} if max_length else {}))
