"""The memory plan: activation checkpointing and ZeRO-3 parameter persistence chosen from the
memory model for the run's worst chunk (issue 25, levers 2 and 3; docs/PERFORMANCE.md).

The gradient cache already bounds activations to one chunk, so checkpointing every layer
on top of it often buys memory a step does not need, at the price of one more forward of
the language model (~300 of 1,676 TF in the 2B step). And under ZeRO-3 every decoder weight
is gathered once per chunk pass, although a card with room to spare could keep the small
ones whole. With ``model.gradient_checkpointing: auto`` and/or ``deepspeed.param_persistence:
auto`` the run asks the memory model (`llave_ds.training.cost.predict_memory`, checked
within 1-5 % of measured peaks on the H200) instead:

1. checkpointing: the first policy whose predicted per-rank peak fits the budget, cheapest
   recompute first: off, then every k-th decoder layer for k = L, L-1, ..., 1 (ceil(L/k)
   layers recomputed; `llave_ds.model.checkpointing`). Nothing fits: every layer, and a
   warning that names the predicted peak and the budget.
2. persistence (ZeRO-3): the headroom left under the budget keeps parameters whole,
   smallest first (DeepSpeed keeps every parameter of at most
   ``stage3_param_persistence_threshold`` elements whole): the threshold is the largest size
   such that all parameters of that size or smaller cost (1 - 1/W) x their bytes more than
   partitioned and that sum fits the headroom.

Checkpointing is served first because its cost (recompute FLOPs) is larger than the gathers
persistence saves (docs/DECISIONS.md). The budget is ``memory.budget_gib``, or the
accelerator's total memory x ``memory.budget_fraction``; with neither (a CPU run) there is
nothing to plan against: auto means checkpointing off and the DeepSpeed config's threshold.

`plan_memory` is pure arithmetic on the transformers config and the model's parameter sizes
(no DeepSpeed); `plan_for_model` reads those from a built model, the run's settings and the
smallest card among the ranks.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch

from llave_ds.core.gather import all_reduce_max, is_distributed
from llave_ds.model.checkpointing import checkpointed_layers
from llave_ds.training.cost import GIB, patches_per_tile, predict_memory
from llave_ds.training.cost_qwen3vl import is_qwen3vl

logger = logging.getLogger(__name__)

PLANNED_MODEL_TYPES = ("llava_onevision", "qwen3_vl")  # the architectures the memory model knows
PERSISTENCE_KEY = "stage3_param_persistence_threshold"
ParamPersistence = Literal["config", "auto"]


@dataclass
class MemoryConfig:
    """The ``memory`` section: the per-rank budget the plan fits a step into.

    budget_gib: device memory a rank's step may use (null: the accelerator's total memory x
        ``budget_fraction``; on a CPU run with null there is no plan: auto = off / the config's).
    budget_fraction: the share of the device's memory the step may use; the rest is for the
        CUDA context, the caching allocator's fragmentation and NCCL's buffers, which the
        memory model does not count.
    """
    budget_gib: Optional[float] = None
    budget_fraction: float = 0.9

    def validate(self) -> None:
        if self.budget_gib is not None and self.budget_gib <= 0:
            raise ValueError(f"memory.budget_gib must be > 0 or null, got {self.budget_gib}")
        if not 0 < self.budget_fraction <= 1:
            raise ValueError(f"memory.budget_fraction must be in (0, 1], got {self.budget_fraction}")

    def budget_bytes(self, device_total_bytes: Optional[int]) -> Optional[float]:
        if self.budget_gib is not None:
            return self.budget_gib * GIB
        return device_total_bytes * self.budget_fraction if device_total_bytes else None


@dataclass(frozen=True)
class WorstChunk:
    """The largest chunk a run can meet, as the memory model sizes it: ``rows`` rows of
    ``width`` tokens, LLaVA-OV's ``tiles`` / Qwen3-VL's ``patches`` in its tower call, and
    (Qwen3-VL, frozen-vision cache) the ``held_patches`` of the step's other chunks."""
    rows: int
    width: int
    tiles: int = 0
    patches: int = 0
    held_patches: int = 0


def worst_chunk(config, *, chunk_rows: int, max_length: int, step_rows: int,
                chunk_tokens: Optional[int] = None) -> WorstChunk:
    """An upper bound of a run's chunks: ``chunk_rows`` rows (the larger role's chunk size;
    token-budget chunks: as many ``max_length`` rows as ``chunk_tokens`` holds, at least one)
    padded to ``processing.max_length``, each with an image as long as the sequence (LLaVA-OV:
    ceil(max_length / tokens per tile) tiles; Qwen3-VL: merge^2 patches per token). Qwen3-VL's
    frozen-vision cache holds every other row of the step (``step_rows`` per rank) as such an
    image. Real rows are shorter and text targets have no image, so the plan errs towards
    more checkpointing, never towards an out-of-memory step."""
    rows = chunk_rows if chunk_tokens is None else max(1, min(chunk_rows, chunk_tokens // max_length))
    if is_qwen3vl(config):
        per_row = max_length * config.vision_config.spatial_merge_size ** 2
        return WorstChunk(rows, max_length, patches=rows * per_row,
                          held_patches=max(0, step_rows - rows) * per_row)
    return WorstChunk(rows, max_length, tiles=rows * math.ceil(max_length / patches_per_tile(config)))


@dataclass
class MemoryPlan:
    """What the plan chose and why: the options it weighed with their predicted peaks."""
    checkpointing: str                       # "off" | "non_reentrant" | "reentrant"
    checkpoint_every: int
    persistence_threshold: Optional[int]     # None: the DeepSpeed config's own
    persistent_params: int
    predicted: dict
    budget_bytes: Optional[float]
    options: list[dict] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.predicted["total"] <= self.budget_bytes

    def apply_to(self, ds_config: dict) -> dict:
        """The DeepSpeed config with the planned persistence threshold (ZeRO-3, auto only)."""
        out = copy.deepcopy(ds_config)
        if self.persistence_threshold is not None:
            out.setdefault("zero_optimization", {})[PERSISTENCE_KEY] = self.persistence_threshold
        return out

    def describe(self) -> str:
        budget = f"{self.budget_bytes / GIB:.1f} GiB" if self.budget_bytes else "none (no accelerator memory)"
        ckpt = self.checkpointing if self.checkpointing == "off" else f"{self.checkpointing} every {self.checkpoint_every}"
        tried = ", ".join(f"{o['policy']} {o['predicted_gib']:.1f}" for o in self.options)
        persist = ("the config's" if self.persistence_threshold is None else
                   f"{self.persistence_threshold} ({self.persistent_params / 1e6:.1f} M parameters whole)")
        return (f"memory plan: budget {budget}, predicted peak {self.predicted['total'] / GIB:.1f} GiB; "
                f"checkpointing {ckpt}; persistence threshold {persist}" + (f"; tried (GiB): {tried}" if tried else ""))

    def as_dict(self) -> dict:
        return {"checkpointing": self.checkpointing, "checkpoint_every": self.checkpoint_every,
                "persistence_threshold": self.persistence_threshold, "persistent_params": self.persistent_params,
                "predicted_gib": self.predicted["total"] / GIB,
                "budget_gib": None if self.budget_bytes is None else self.budget_bytes / GIB,
                "fits": self.fits, "options": self.options}


def checkpointing_options(num_layers: int) -> list[tuple[str, int]]:
    """(policy, every) from the least recompute to the most: off, then every k-th layer for
    each distinct number of checkpointed layers (the largest k giving it)."""
    options, seen = [("off", 1)], set()
    for every in range(num_layers, 0, -1):
        n = len(checkpointed_layers(num_layers, every))
        if n not in seen:
            seen.add(n)
            options.append(("non_reentrant", every))
    return options


def persistence_threshold(param_sizes: Sequence[int], headroom: float, param_bytes: int, world: int) -> int:
    """The largest parameter size t such that keeping every parameter of <= t elements whole
    costs at most ``headroom`` bytes more than partitioned (0: none)."""
    extra_per_element = param_bytes * (1.0 - 1.0 / max(1, world))
    best, spent = 0, 0.0
    sizes = sorted(param_sizes)
    i = 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:  # DeepSpeed's rule is <= t: a size goes whole or not at all
            j += 1
        cost = (j - i) * sizes[i] * extra_per_element
        if spent + cost > headroom:
            break
        spent += cost
        best = sizes[i]
        i = j
    return best


def plan_memory(config, counts: dict, param_sizes: Sequence[int], chunk: WorstChunk, *,
                budget_bytes: Optional[float], stage: int, world: int, param_bytes: int, reduction: str,
                ds_config: dict, padding_mask: bool, checkpointing: str, checkpoint_every: int = 1,
                persistence: ParamPersistence = "config") -> MemoryPlan:
    """Resolve ``checkpointing`` ("auto" or a fixed mode) and ``persistence`` ("auto" or the
    config's) against ``budget_bytes`` (None: nothing to plan against); module docstring."""
    if config.model_type not in PLANNED_MODEL_TYPES:
        raise ValueError(f"model.gradient_checkpointing / deepspeed.param_persistence: auto needs the memory "
                         f"model, which knows {', '.join(PLANNED_MODEL_TYPES)}, not {config.model_type!r}; "
                         f"set them explicitly")
    zo = ds_config.get("zero_optimization", {})
    configured = int(zo.get(PERSISTENCE_KEY, 100000)) if stage == 3 else 0
    auto_persist = persistence == "auto" and stage == 3 and budget_bytes is not None

    def predict(policy: str, every: int, threshold: int) -> dict:
        persistent = sum(s for s in param_sizes if s <= threshold) if stage == 3 else 0
        return predict_memory(config, counts, stage=stage, world=world, param_bytes=param_bytes, reduction=reduction,
                              checkpointing=policy != "off", checkpoint_every=every, ds_config=ds_config,
                              chunk_rows=chunk.rows, chunk_width=chunk.width, chunk_tiles=chunk.tiles,
                              chunk_patches=chunk.patches, held_patches=chunk.held_patches,
                              padding_mask=padding_mask, persistent_params=persistent)

    base_threshold = 0 if auto_persist else configured
    options: list[dict] = []
    if checkpointing == "auto" and budget_bytes is not None:
        policy, every = "non_reentrant", 1  # nothing fits: the most memory-frugal policy
        for p, k in checkpointing_options(config.text_config.num_hidden_layers):
            total = predict(p, k, base_threshold)["total"]
            options.append({"policy": p if p == "off" else f"every {k}", "predicted_gib": total / GIB})
            if total <= budget_bytes:
                policy, every = p, k
                break
    elif checkpointing == "auto":
        policy, every = "off", 1
    else:
        policy, every = checkpointing, checkpoint_every
    predicted = predict(policy, every, base_threshold)
    threshold: Optional[int] = None
    if auto_persist:
        headroom = max(0.0, budget_bytes - predicted["total"])
        threshold = persistence_threshold(param_sizes, headroom, param_bytes, world)
        predicted = predict(policy, every, threshold)
    persistent = sum(s for s in param_sizes if s <= (configured if threshold is None else threshold)) \
        if stage == 3 else 0
    plan = MemoryPlan(policy, every, threshold, persistent, predicted, budget_bytes, options)
    if not plan.fits:
        logger.warning("%s: the predicted peak is above the budget even with every layer checkpointed; lower "
                       "gradcache.query_chunk_size / target_chunk_size (or set gradcache.chunk_tokens) or "
                       "processing.max_length", plan.describe())
    return plan


def plan_for_model(model, *, memory: MemoryConfig, checkpointing: str, checkpoint_every: int,
                   persistence: ParamPersistence, ds_config: dict, world: int, reduction: str,
                   chunk_rows: int, max_length: int, step_rows: int, chunk_tokens: Optional[int],
                   padding_mask: bool, device) -> Optional[MemoryPlan]:
    """The plan for a built `EmbeddingModel` (its parameter sizes, dtype and transformers
    config) when anything is ``auto``; None when nothing is."""
    if checkpointing != "auto" and persistence != "auto":
        return None
    sizes = [int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()]
    trainable = sum(s for s, p in zip(sizes, model.parameters()) if p.requires_grad)
    total_device = None
    if device.type == "cuda":
        total_device = torch.cuda.get_device_properties(device).total_memory
    if is_distributed():
        # Why: ranks must plan alike (a checkpointed layer re-gathers its ZeRO-3 parameters in
        # the backward, so different policies would issue different collectives and hang):
        # every rank plans for the smallest card.
        smallest = all_reduce_max(torch.tensor([-(total_device or 0)], dtype=torch.int64, device=device))
        total_device = -int(smallest.item()) or None
    config = model.base_hf_model.config
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    param_bytes = 2 if next(model.parameters()).dtype.itemsize == 2 else 4
    chunk = worst_chunk(config, chunk_rows=chunk_rows, max_length=max_length, step_rows=step_rows,
                        chunk_tokens=chunk_tokens)
    plan = plan_memory(config, {"total": sum(sizes), "trainable": trainable}, sizes, chunk,
                       budget_bytes=memory.budget_bytes(total_device), stage=stage, world=world,
                       param_bytes=param_bytes, reduction=reduction, ds_config=ds_config, padding_mask=padding_mask,
                       checkpointing=checkpointing, checkpoint_every=checkpoint_every, persistence=persistence)
    logger.info("%s", plan.describe())
    return plan


def build_time_ds_config(ds_config: dict, persistence: ParamPersistence) -> dict:
    """The DeepSpeed config the model is built with. zero.Init marks parameters persistent as
    they are created and the engine only ever adds to that mark, so with ``auto`` the model
    is built with threshold 0 and the engine gets the planned one (`MemoryPlan.apply_to`)."""
    if persistence != "auto" or int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return ds_config
    out = copy.deepcopy(ds_config)
    out["zero_optimization"][PERSISTENCE_KEY] = 0
    return out
