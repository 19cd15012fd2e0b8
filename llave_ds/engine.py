"""The only module that touches DeepSpeed.

It loads and completes a DeepSpeed config, wraps the embedding model in an engine and
exposes it to the gradient cache as a ``StepBackend``. Rules learned the hard way
(docs/DECISIONS.md has the evidence):

* always forward through ``engine(...)``: calling ``engine.module`` or a submodule
  skips DeepSpeed's hooks and gives silently wrong gradients once there is more than
  one backward per step;
* always ``engine.backward``: a plain ``.backward()`` fails inside ZeRO-3;
* ``gradient_accumulation_steps`` is 1: the gradient cache makes N backwards and calls
  ``step()`` once (with GAS = N DeepSpeed would never update);
* reentrant activation checkpointing cannot run two forwards before a backward under
  ZeRO-3: refused as a configuration error.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from llave_ds.gather import is_distributed

DSConfig = Union[str, os.PathLike, dict]


class EngineConfigError(ValueError):
    """A DeepSpeed configuration that cannot work; raised before any engine exists."""


def prepare_cpu_accelerator() -> None:
    """On a CPU-only machine: skip the JIT build of DeepSpeed's shared-memory all-reduce.

    That op (``deepspeed_shm_comm``) only serves inference all-reduces; building it costs
    ~30 s per fresh extensions directory. DeepSpeed documents its compatible-ops dict as
    the place to switch ops off. On CUDA nothing changes.
    """
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def load_ds_config(source: DSConfig) -> dict:
    """A DeepSpeed config from a JSON file path or a dict (copied), with a clear error."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise EngineConfigError(f"DeepSpeed config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def complete_ds_config(ds_config: dict, *, local_batch_size: int, world_size: int,
                       gradient_clipping: Optional[float] = None,
                       activation_checkpointing: str = "off",
                       bf16: Optional[bool] = None) -> dict:
    """Fill the batch-size fields the way the gradient cache needs them, and validate.

    DeepSpeed's own batch bookkeeping sees one "micro batch" per step: the rank's whole
    local batch, with gradient_accumulation_steps = 1 (see the module docstring).
    """
    cfg = copy.deepcopy(ds_config)
    gas = cfg.get("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        raise EngineConfigError(
            f"gradient_accumulation_steps={gas}: the gradient cache accumulates chunks "
            "itself and calls step() once per global batch; set it to 1 (or leave it out)")
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_micro_batch_size_per_gpu"] = local_batch_size
    cfg["train_batch_size"] = local_batch_size * world_size
    if gradient_clipping is not None:
        cfg["gradient_clipping"] = gradient_clipping
    # DeepSpeed 0.19.8 silently clips at 1.0 when this key is absent.
    cfg.setdefault("gradient_clipping", 0.0)
    if bf16 is not None:
        # The model's dtype decides: an fp32 run (CPU, tests) must not be cast to bf16.
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": bool(bf16)}
    if "optimizer" in cfg:
        raise EngineConfigError(
            "remove the 'optimizer' block from the DeepSpeed config: llave-ds builds a "
            "torch.optim optimizer from its own config (a config-declared optimizer JIT-"
            "compiles fused kernels and bypasses llave-ds's parameter groups)")
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise EngineConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if activation_checkpointing not in ("off", "non_reentrant", "reentrant"):
        raise EngineConfigError(f"activation checkpointing must be off, non_reentrant or "
                                f"reentrant, got {activation_checkpointing!r}")
    if activation_checkpointing == "reentrant" and stage == 3:
        raise EngineConfigError(
            "reentrant activation checkpointing cannot be combined with ZeRO-3 and the "
            "gradient cache (two forwards before a backward trip a ZeRO-3 assertion); use "
            "activation_checkpointing: non_reentrant")
    if cfg.get("fp16", {}).get("enabled"):
        raise EngineConfigError("fp16 with dynamic loss scaling is not supported by the "
                                "gradient cache; use bf16 or fp32")
    return cfg


class DeepSpeedStepBackend:
    """A DeepSpeed engine seen through the gradient cache's StepBackend interface."""

    def __init__(self, engine: Any, reduction: str = "coalesced", scheduler=None):
        self.engine = engine
        self.device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
        # DeepSpeed averages gradients over the data-parallel ranks.
        self.gradient_average_divisor = engine.dp_world_size if is_distributed() else 1
        self.scheduler = scheduler
        if reduction == "coalesced" and engine.zero_optimization_stage() == 0:
            reduction = "per_chunk"  # coalescing needs a ZeRO optimizer (stage >= 1)
        self.reduction = reduction

    def encode(self, chunk) -> torch.Tensor:
        return self.engine(**chunk) if isinstance(chunk, dict) else self.engine(chunk)

    def backward(self, surrogate: torch.Tensor, last: bool) -> None:
        if self.reduction == "per_chunk":
            # With gradient_accumulation_steps = 1 every backward would count as an
            # accumulation boundary; ZeRO-2 then restarts its gradient partitions at each
            # one and keeps only the last chunk (measured: 6e-2 parameter error after 3
            # steps). Only the step's last backward is the boundary.
            self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(surrogate)

    def reduction_context(self, mode: str):
        if mode == "coalesced":
            return self.engine.coalesce_grad_reduction()
        return contextlib.nullcontext()

    def step(self) -> dict:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        lr = self.engine.get_lr()[0] if self.engine.get_lr() else float("nan")
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict,
                 lr_scheduler=None):
    """``deepspeed.initialize`` with a client optimizer; returns the engine."""
    prepare_cpu_accelerator()
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lr_scheduler)
    return engine


def gathered_state_dict(engine_or_module) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) parameters as CPU tensors, on every rank.

    Under ZeRO-3 each parameter is gathered on its own, so peak extra memory is one
    parameter, not the model. Call on all ranks together (it is a collective there).
    """
    module = getattr(engine_or_module, "module", engine_or_module)
    out = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            import deepspeed
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                out[name] = param.detach().float().cpu().clone()
        else:
            out[name] = param.detach().float().cpu().clone()
    return out
