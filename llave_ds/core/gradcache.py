"""Gradient caching: one optimizer step over a global batch far larger than memory.

    pass 1  encode every chunk without autograd (recording the RNG state before each)
    loss    objective + cross-rank gather on the cached embeddings -> d loss / d embedding
    pass 2  per chunk: replay its RNG state, re-encode with autograd and backpropagate
            <embedding, cached gradient>; then one optimizer step

The step knows the objective and an abstract ``StepBackend`` (encode / backward / step),
not DeepSpeed: ``TorchStepBackend`` below drives a plain module on one process, and
``llave_ds.training.engine.DeepSpeedStepBackend`` drives a DeepSpeed engine (ZeRO 0-3).

Ranks must agree on every collective (ZeRO-3 all-gathers parameters in every forward
and reduces gradients in every backward; NCCL hangs where gloo aborts): every rank runs
the same number of chunks per role, in the same order, padding with repeated chunks
whose gradient is multiplied by zero.

Chunk order: a chunk may carry ``ROW_INDEX``, the positions of its rows among the role's rows
on this rank (token-budget chunks hold rows sorted by length, `llave_ds.data.batching`); the
cached embeddings are put back in row order before the loss and each chunk's gradient rows
are taken from those positions in pass 2, so the loss and every gradient are those of the
unsorted batch. Without it, chunks hold consecutive rows in order.

Non-finite values: a non-finite loss or cached embedding gradient on any rank skips the
step on every rank *before* pass 2 (one small all-reduce decides), so no reduction is
ever half done; a non-finite parameter gradient after pass 2 is caught by the backend's
step (DeepSpeed's overflow check; see ``engine.DeepSpeedStepBackend.step``). Either way
parameters and optimizer state are untouched and ``StepResult.skipped`` is set.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Protocol, Sequence

import torch

from llave_ds.config import check_choices
from llave_ds.core.gather import all_ranks_ok, all_reduce_max, is_distributed, rank_codes
from llave_ds.core.objective import ContrastiveOutput, ObjectiveConfig, hardness_weighted_loss

Chunk = Any  # whatever the backend's encode() accepts (a dict of tensors for the LMM)
# The key of a chunk's row positions (an int64 tensor; optional): popped before encode().
ROW_INDEX = "row_index"


class GradCacheError(RuntimeError):
    """A step could not run on every rank; raised on all ranks together."""


def check_chunk_size(name: str, value: int, local_batch: Optional[int] = None, share: str = "") -> int:
    """The one check of a chunk size: an int >= 1 and, given the rank's batch, not above it
    (``share`` words that batch in the error). Used by the config and by the collator."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"gradcache.{name} must be >= 1 (an integer), got {value!r}")
    if local_batch is not None and value > local_batch:
        raise ValueError(f"gradcache.{name}={value} is larger than {share or f'the per-rank batch {local_batch}'}")
    return int(value)


@dataclass
class GradCacheConfig:
    """How a global batch is cut: chunks of ``query_chunk_size`` queries and
    ``target_chunk_size`` targets (hard negatives use the target size) are encoded at a time;
    the collator cuts the batch with these sizes (`chunk_sizes`).

    ``chunk_tokens`` (default None: off): token-budget chunks. Each role's rows are sorted by
    length (longest first) and a chunk takes rows while rows x its longest row stays within
    this many tokens, and at most the role's chunk size of rows; so short text rows make
    few large chunks and long image rows small ones. Exact like any chunking (the rows'
    positions travel with each chunk, ``ROW_INDEX``); a row longer than the budget alone is
    a chunk of its own (counted, logged once)."""
    query_chunk_size: int = 8
    target_chunk_size: int = 8
    chunk_tokens: Optional[int] = None
    # "coalesced": one gradient reduction per step (DeepSpeed ZeRO 1-3 keep the full local
    # gradient until the flush); "per_chunk": reduce after every chunk's backward
    # (ZeRO-2/3 keep only their partition). See docs/GRADCACHE.md for the measurements.
    reduction: Literal["coalesced", "per_chunk"] = "coalesced"

    def validate(self, local_batch: Optional[int] = None, share: str = "") -> None:
        """Sizes >= 1 and (``local_batch`` given: a rank's pairs per step) not above it."""
        for name in ("query_chunk_size", "target_chunk_size"):
            check_chunk_size(name, getattr(self, name), local_batch, share)
        if self.chunk_tokens is not None:
            check_chunk_size("chunk_tokens", self.chunk_tokens)
        check_choices(self, "gradcache.")

    def chunk_sizes(self) -> dict[str, Any]:
        """Keyword arguments of the collator (``PairCollator(formatter, **sizes)``)."""
        return {"query_chunk_size": self.query_chunk_size, "target_chunk_size": self.target_chunk_size,
                "chunk_tokens": self.chunk_tokens}


class StepBackend(Protocol):
    """What the gradient cache needs from whatever holds the model and optimizer."""

    device: torch.device
    # The factor by which the backend divides summed gradients over ranks (DeepSpeed
    # averages: world size; a single process: 1).
    gradient_average_divisor: int

    def encode(self, chunk: Chunk) -> torch.Tensor: ...
    def backward(self, surrogate: torch.Tensor, last: bool) -> None: ...
    def reduction_context(self, mode: str) -> contextlib.AbstractContextManager: ...
    def step(self) -> dict: ...


class RngState:
    """CPU and accelerator generator states, captured before a chunk and replayed later
    so dropout draws the same masks in both passes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@dataclass
class StepResult:
    output: ContrastiveOutput
    timings: dict = field(default_factory=dict)
    backend_info: dict = field(default_factory=dict)
    chunks: dict = field(default_factory=dict)
    # True when the optimizer step was skipped on every rank (non-finite values); the
    # parameters and optimizer state are then those before the step.
    skipped: bool = False
    skip_reason: str = ""

    def metrics(self) -> dict:
        return {**self.output.stats(), **self.backend_info,
                **{f"time_{k}": v for k, v in self.timings.items()}}


@dataclass
class _Role:
    name: str
    chunks: list
    padded_count: int = 0
    embeddings: list = field(default_factory=list)
    rng: list = field(default_factory=list)
    rows: list = field(default_factory=list)    # per real chunk: its rows' positions (LongTensor)
    order: Optional[torch.Tensor] = None        # all rows' positions, chunk by chunk (set when sorted)


def _model_inputs(chunk: Chunk) -> Chunk:
    """What the backend encodes: the chunk without its ``ROW_INDEX``."""
    if isinstance(chunk, dict) and ROW_INDEX in chunk:
        return {k: v for k, v in chunk.items() if k != ROW_INDEX}
    return chunk


def _place_rows(role: _Role) -> Optional[str]:
    """Each real chunk's row positions (its ``ROW_INDEX``, else the next consecutive rows) and
    ``role.order`` when any chunk carried an index; a description of what is wrong, or None."""
    given = [isinstance(c, dict) and ROW_INDEX in c for c in role.chunks]
    start = 0
    for chunk, emb, has in zip(role.chunks, role.embeddings, given):
        n = emb.shape[0]
        rows = chunk[ROW_INDEX].to(torch.int64).flatten().cpu() if has else torch.arange(start, start + n)
        if rows.numel() != n:
            return f"a {role.name} chunk has {n} rows but {rows.numel()} {ROW_INDEX} entries"
        role.rows.append(rows)
        start += n
    if any(given):
        order = torch.cat(role.rows) if role.rows else torch.zeros(0, dtype=torch.int64)
        if not torch.equal(order.sort().values, torch.arange(order.numel())):
            return f"the {role.name} chunks' {ROW_INDEX} values are not a permutation of 0..{order.numel() - 1}"
        role.order = order
    return None


def _agree_chunk_counts(roles: Sequence[_Role], device: torch.device) -> None:
    """Every rank runs max-over-ranks chunks per role (one small all-reduce)."""
    counts = torch.tensor([len(r.chunks) for r in roles], dtype=torch.int64, device=device)
    maxima = all_reduce_max(counts)
    for role, m in zip(roles, maxima.tolist()):
        role.padded_count = int(m)


_NON_FINITE = {1: "non-finite loss", 2: "non-finite embedding gradient"}


def _padded_chunks(role: _Role, fallback: Chunk) -> Iterator[tuple[Chunk, bool]]:
    """The role's chunks, then repeats (flagged as padding) up to the agreed count."""
    for i in range(role.padded_count):
        if i < len(role.chunks):
            yield role.chunks[i], False
        else:
            yield (role.chunks[0] if role.chunks else fallback), True


def gradcache_step(backend: StepBackend, query_chunks: Sequence[Chunk],
                   target_chunks: Sequence[Chunk], objective: ObjectiveConfig,
                   negative_chunks: Sequence[Chunk] = (), negatives_per_pair: int = 0) -> StepResult:
    """One optimizer step on this rank's pairs (all ranks call it together).

    ``query_chunks`` / ``target_chunks``: this rank's pairs, chunked in order (the chunk
    sizes are the caller's: they need not divide the batch). ``negative_chunks``: the
    hard-negative targets, ``negatives_per_pair`` per pair, pair-major order.
    """
    t0 = time.perf_counter()
    device = backend.device
    roles = [_Role("query", list(query_chunks)), _Role("target", list(target_chunks)),
             _Role("negative", list(negative_chunks))]
    local_ok = bool(roles[0].chunks) and bool(roles[1].chunks)
    if not all_ranks_ok(local_ok, device):
        raise GradCacheError("a rank has no query or target chunk for this step; every rank "
                             "needs at least one pair (check the sampler / skip_bad_rows)")
    _agree_chunk_counts(roles, device)
    fallback = roles[1].chunks[0]

    # ---- pass 1: no-grad encode, RNG state recorded per chunk -------------------------
    error: Optional[BaseException] = None
    try:
        with torch.no_grad():
            for role in roles:
                for chunk, is_pad in _padded_chunks(role, fallback):
                    role.rng.append(RngState(device))
                    emb = backend.encode(_model_inputs(chunk))
                    if not is_pad:
                        role.embeddings.append(emb.detach().float())
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    if not all_ranks_ok(error is None, device):
        raise GradCacheError(f"the no-grad encode pass failed on "
                             f"{'this rank' if error else 'another rank'}: {error!r}") from error
    # Sorted chunks: every rank checks its row positions, and all agree before the loss's collectives.
    problem = next((p for p in (_place_rows(role) for role in roles) if p), None)
    if not all_ranks_ok(problem is None, device):
        raise GradCacheError(f"bad chunk row positions on {'this rank: ' + problem if problem else 'another rank'}")
    t1 = time.perf_counter()

    # ---- loss on the cached embeddings, gradient w.r.t. each cached embedding ---------
    cached = {}
    for role in roles:
        if not role.embeddings:
            cached[role.name] = None
            continue
        stacked = torch.cat(role.embeddings)
        if role.order is not None:  # back to row order: the loss sees the unsorted batch
            stacked = torch.empty_like(stacked).index_copy_(0, role.order.to(stacked.device), stacked)
        cached[role.name] = stacked.requires_grad_(True)
    query, target = cached["query"], cached["target"]
    if query.shape != target.shape:
        raise GradCacheError(f"{query.shape[0]} query embeddings but {target.shape[0]} target "
                             "embeddings: chunks must cover the same pairs")
    hard = None
    if cached["negative"] is not None and negatives_per_pair > 0:
        hard = cached["negative"].view(query.shape[0], negatives_per_pair, query.shape[1])
    output = hardness_weighted_loss(
        query, target, temperature=objective.temperature, alpha=objective.alpha,
        symmetric=objective.symmetric, hard_negatives=hard,
        false_negative_threshold=objective.false_negative_threshold,
        gather_mode=objective.gather_mode if is_distributed() else None,
        matryoshka=objective.matryoshka(query.shape[1]))
    # The objective's loss is this rank's share of the global mean, so these gradients
    # are exactly the global-batch loss's gradients w.r.t. this rank's embeddings.
    output.loss.backward()
    t2 = time.perf_counter()

    # ---- non-finite loss or cached gradient on any rank: every rank skips, before pass 2
    code = 0
    if not bool(torch.isfinite(output.loss.detach()).all()):
        code = 1
    elif any(c is not None and c.grad is not None and not bool(torch.isfinite(c.grad).all())
             for c in cached.values()):
        code = 2
    bad = rank_codes(code, device)  # every rank's finiteness code (0 fine, 1 loss, 2 gradients)
    if bad:
        where = ", ".join(f"{_NON_FINITE[c]} on rank {r}" for r, c in sorted(bad.items()))
        return StepResult(
            output=output, timings={"encode": t1 - t0, "loss": t2 - t1},
            backend_info={"grad_norm": float("nan")},
            chunks={r.name: (len(r.chunks), r.padded_count) for r in roles},
            skipped=True, skip_reason=f"{where}: step skipped before the backward pass")

    # ---- pass 2: replay RNG, re-encode with autograd, backprop the cached gradient ----
    # Why the multiplier: the surrogate's parameter gradient on this rank is the sum over
    # its embeddings of dL/de * de/dtheta, i.e. this rank's part of the *sum* over ranks.
    # DeepSpeed then divides the all-reduced sum by the world size (it averages), so we
    # multiply by that divisor once here: the reduced result is exactly dL/dtheta for the
    # global batch, whatever the chunk sizes, chunk counts or number of ranks.
    multiplier = float(backend.gradient_average_divisor)
    total_chunks = sum(r.padded_count for r in roles)
    done = 0
    with backend.reduction_context(_reduction_mode(backend)):
        for role in roles:
            grads = cached[role.name].grad if cached[role.name] is not None else None
            for i, (chunk, is_pad) in enumerate(_padded_chunks(role, fallback)):
                role.rng[i].restore()
                emb = backend.encode(_model_inputs(chunk)).float()
                if is_pad:
                    # Same collectives as a real chunk, zero contribution.
                    surrogate = emb.sum() * 0.0
                else:
                    rows = role.rows[i]  # this chunk's rows of the (row-ordered) cached gradient
                    g = grads[int(rows[0]):int(rows[0]) + len(rows)] if role.order is None else \
                        grads.index_select(0, rows.to(grads.device))
                    surrogate = (emb * g).sum() * multiplier
                done += 1
                backend.backward(surrogate, last=done == total_chunks)
    t3 = time.perf_counter()
    info = dict(backend.step())
    t4 = time.perf_counter()
    # The backend skipped the update (non-finite parameter gradient): same on every rank,
    # since the check runs on the reduced gradients (DeepSpeed all-reduces its overflow flag).
    skipped = bool(info.pop("skipped", False))
    return StepResult(
        output=output,
        timings={"encode": t1 - t0, "loss": t2 - t1, "reencode_backward": t3 - t2, "step": t4 - t3},
        backend_info=info,
        chunks={r.name: (len(r.chunks), r.padded_count) for r in roles},
        skipped=skipped,
        skip_reason=(f"non-finite parameter gradient (global norm {info.get('grad_norm')}): the optimizer "
                     "step was skipped" if skipped else ""),
    )


def _reduction_mode(backend) -> str:
    return getattr(backend, "reduction", "coalesced")


class TorchStepBackend:
    """A plain ``nn.Module`` + ``torch.optim`` optimizer on one process."""

    gradient_average_divisor = 1

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 grad_clip: Optional[float] = None, scheduler=None,
                 device: Optional[torch.device] = None):
        if is_distributed():
            raise GradCacheError("TorchStepBackend is single-process; use the DeepSpeed backend "
                                 "(llave_ds.training.engine) for several ranks")
        self.model, self.optimizer, self.grad_clip, self.scheduler = model, optimizer, grad_clip, scheduler
        self.device = device or next(model.parameters()).device
        self.reduction = "coalesced"

    def encode(self, chunk: Chunk) -> torch.Tensor:
        return self.model(**chunk) if isinstance(chunk, dict) else self.model(chunk)

    def backward(self, surrogate: torch.Tensor, last: bool) -> None:
        surrogate.backward()

    def reduction_context(self, mode: str):
        return contextlib.nullcontext()

    def step(self) -> dict:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else math.inf)
        if not bool(torch.isfinite(norm)):
            # Same policy as DeepSpeed's overflow check: no update, no scheduler step.
            self.optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": float(norm), "lr": self.optimizer.param_groups[0]["lr"], "skipped": True}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return {"grad_norm": float(norm), "lr": self.optimizer.param_groups[0]["lr"]}
