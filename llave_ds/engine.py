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


def attach_deepspeed_comm() -> None:
    """Make DeepSpeed's communication layer use the process group we already created.

    ``zero.Init`` (ZeRO-3 construction) asks ``deepspeed.comm`` for the world size; until
    it is attached it answers 1 and the batch-size check fails. Attaching reuses the
    torch process group (and its timeout) instead of creating another.
    """
    prepare_cpu_accelerator()
    import deepspeed
    import torch.distributed as dist
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


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
    attach_deepspeed_comm()
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lr_scheduler)
    return engine


def gathered_state_dict(engine_or_module, *, dtype: torch.dtype = torch.float32, keep_on_all_ranks: bool = True,
                        strip_prefix: str = "") -> dict[str, torch.Tensor]:
    """Full (unpartitioned) parameters and persistent buffers as CPU tensors.

    Under ZeRO-3 each parameter is gathered on its own, so the extra device memory is one
    parameter, not the model; with ``keep_on_all_ranks=False`` only rank 0 keeps the CPU
    copies (the export path: a 7B model then costs host memory on one rank only). Call it
    on all ranks together: under ZeRO-3 it is a sequence of collectives.
    """
    import torch.distributed as dist

    module = getattr(engine_or_module, "module", engine_or_module)
    keep = keep_on_all_ranks or not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}

    def name_of(name: str) -> str:
        return name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name

    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            import deepspeed
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if keep:
                    out[name_of(name)] = param.detach().to("cpu", dtype).clone()
        elif keep:
            out[name_of(name)] = param.detach().to("cpu", dtype).clone()
    if keep:
        persistent = module.state_dict(keep_vars=True)
        for name, buf in module.named_buffers():
            if name in persistent:
                out[name_of(name)] = buf.detach().to("cpu", dtype if buf.is_floating_point() else buf.dtype).clone()
    return out


def offloads_optimizer(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")


def build_optimizer(params, ds_config: dict, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; DeepSpeed's CPU Adam when the optimizer state is
    offloaded (DeepSpeed refuses a torch optimizer there)."""
    params = list(params)
    if not params:
        raise EngineConfigError("the model has no trainable parameters (everything frozen?)")
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def save_checkpoint(engine, root: Path, tag: str, client_state: dict) -> Path:
    """Save on every rank; ``latest`` moves only once every rank has written everything.

    Order: DeepSpeed's files (all ranks) -> each rank's RNG state -> barrier -> rank 0
    writes the completion marker and then atomically replaces ``latest``.
    """
    import torch.distributed as dist

    from llave_ds import checkpoint as ckpt

    root = Path(root)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    path = root / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt.save_rng_state(path, rank)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        ckpt.mark_complete(path, {"step": client_state.get("step"), "world_size": client_state.get("world_size"),
                                  "tag": tag})
        ckpt.set_latest(root, tag)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_checkpoint(engine, path: Path) -> dict:
    """Load a checkpoint written by ``save_checkpoint``; returns its client state."""
    from llave_ds import checkpoint as ckpt

    path = Path(path)
    ckpt.describe(path)  # refuses an incomplete one, naming it
    try:
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                         load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
    except (FileNotFoundError, RuntimeError, KeyError, EOFError, OSError) as exc:
        raise ckpt.CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc
    if load_path is None:
        raise ckpt.CheckpointError(f"DeepSpeed found no checkpoint at {path}")
    return client_state


def consolidate_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a DeepSpeed checkpoint directory, on one CPU process.

    ``ckpt_dir`` is one checkpoint (``.../checkpoints/step_XXXXXXXX``), written by any
    number of ranks under ZeRO-1/2/3 (or without ZeRO). Uses DeepSpeed's ``zero_to_fp32``
    utilities: the trainable parameters come from the fp32 master copies in the optimizer
    shards (so a bf16 run exports its fp32 masters). Keys are the engine module's names
    (``hf_model.`` ...). Needs no GPU and no process group.

    ZeRO-1 does not record frozen parameters with the optimizer shards; they are taken from
    the module state in ``mp_rank_00_model_states.pt`` (they never change, so that copy is
    exact). Without ZeRO that module state is the whole model.
    """
    import contextlib
    import sys

    from llave_ds.checkpoint import CheckpointError

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    prepare_cpu_accelerator()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    zero_optim = sorted(ckpt_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    module_file = ckpt_dir / "mp_rank_00_model_states.pt"
    module_state: dict[str, torch.Tensor] = {}
    if module_file.is_file():  # ZeRO-0/1/2: the (model-dtype) module state dict of rank 0
        try:
            module_state = torch.load(module_file, map_location="cpu", weights_only=False).get("module") or {}
        except Exception as exc:  # noqa: BLE001 - name the file whatever torch raises
            raise CheckpointError(f"cannot read {module_file}: {exc}") from exc
    if not zero_optim:
        if not module_state:
            raise CheckpointError(f"{ckpt_dir} holds no DeepSpeed model or optimizer states "
                                  "(*_model_states.pt / *_optim_states.pt): not a DeepSpeed checkpoint")
        return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in module_state.items()}
    try:
        # zero_to_fp32 reports progress with print(): keep stdout for the caller's output.
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot consolidate the DeepSpeed checkpoint {ckpt_dir}: {exc}") from exc
    for name, tensor in module_state.items():
        if name not in state:
            state[name] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    return dict(state)
