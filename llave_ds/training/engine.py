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

Under ZeRO-3 two defaults make the cached step cheap (docs/PERFORMANCE.md, "Step efficiency"):
``memory_efficient_linear: false`` (plain ``F.linear`` instead of DeepSpeed's Python autograd
function) and *fetch units*: a module may declare ``zero3_fetch_units()`` (class names of
its repeated blocks, e.g. decoder layers); each such block is made a ZeRO-3 leaf, so its
parameters are gathered in one fetch with one hook instead of one per submodule. A config
that sets either key itself is left as it is.

DeepSpeed itself is imported inside the functions that use it, after
``prepare_cpu_accelerator``: its accelerator is chosen once, at its first import, and that
import is slow (seconds), which ``llave-ds train --print-config`` and the config checks
before any process group should not pay.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from llave_ds.config import ConfigError, check_choices, shipped_file
from llave_ds.core import distributed
from llave_ds.core.distributed import is_distributed
from llave_ds.core.gather import all_gather_objects, all_ranks_ok, rank_errors
from llave_ds.training import checkpoint as ckpt
from llave_ds.training.checkpoint import CheckpointError

DSConfig = Union[str, os.PathLike, dict]


class EngineConfigError(ValueError):
    """A DeepSpeed configuration that cannot work; raised before any engine exists."""


@dataclass
class DeepSpeedConfig:
    # A file in ds_configs/ by name (zero2, zero3, zero3_offload) or a path to a JSON file.
    config: str = "zero3"
    gradient_clipping: float = 1.0
    # ZeRO-3: "config" = the file's stage3_param_persistence_threshold; "auto" = the largest
    # threshold whose whole parameters fit the memory budget (llave_ds.training.memory_plan).
    param_persistence: Literal["config", "auto"] = "config"

    def validate(self) -> None:
        check_choices(self, "deepspeed.")


def resolve_ds_config_path(name: str) -> Path:
    """A DeepSpeed JSON file, or the name of a shipped one (zero2, zero3, zero3_offload)."""
    candidate = Path(name)
    if candidate.suffix == ".json" and candidate.is_file():
        return candidate
    if candidate.suffix == ".json":
        raise ValueError(f"deepspeed.config: {name!r} is neither a JSON file nor one of the shipped configs "
                         f"(no such file)")
    try:
        return shipped_file("deepspeed", name)
    except ConfigError as exc:
        raise ValueError(f"deepspeed.config: {exc}") from None


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


# DeepSpeed 0.19 calls these two torch.distributed functions, which torch 2.13 deprecates
# with a FutureWarning on every call (every ZeRO step): noise no user can act on, which
# buries the progress bar. Exactly these, as torch attributes them, are silenced.
DEPRECATED_COLLECTIVE_WARNINGS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
DEPRECATED_COLLECTIVE_MODULE = r"torch\.distributed\.c10d_logger"


def silence_deprecated_collective_warnings() -> None:
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVE_WARNINGS, category=FutureWarning,
                            module=DEPRECATED_COLLECTIVE_MODULE)


def attach_deepspeed_comm() -> None:
    """Make DeepSpeed's communication layer use the process group we already created.

    ``zero.Init`` (ZeRO-3 construction) asks ``deepspeed.comm`` for the world size; until
    it is attached it answers 1 and the batch-size check fails. Attaching reuses the
    torch process group (and its timeout) instead of creating another.
    """
    prepare_cpu_accelerator()
    import deepspeed
    if distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=distributed.backend(), auto_mpi_discovery=False)


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
    if cfg.get("bf16", {}).get("enabled"):
        # A non-finite gradient must skip the step (docs/RELIABILITY.md); under ZeRO-1/2
        # DeepSpeed only checks bf16 gradients when this is on (its default, made explicit).
        if cfg["bf16"].get("check_grad_overflow") is False:
            raise EngineConfigError("bf16.check_grad_overflow=false would let a non-finite gradient into the "
                                    "optimizer under ZeRO-1/2; remove it (llave-ds skips such steps)")
        cfg["bf16"]["check_grad_overflow"] = True
    if "optimizer" in cfg:
        raise EngineConfigError(
            "remove the 'optimizer' block from the DeepSpeed config: llave-ds builds a "
            "torch.optim optimizer from its own config (a config-declared optimizer JIT-"
            "compiles fused kernels and bypasses llave-ds's parameter groups)")
    try:
        stage = zero_stage(cfg)
    except (TypeError, ValueError):
        raise EngineConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got "
                                f"{cfg.get('zero_optimization', {}).get('stage')!r}") from None
    if stage not in (0, 1, 2, 3):
        raise EngineConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    zero = cfg.get("zero_optimization", {})
    if zero.get("offload_param", {}).get("device", "none") not in ("none", None) and stage != 3:
        raise EngineConfigError(f"zero_optimization.offload_param needs ZeRO stage 3, the config has stage {stage}")
    if zero.get("compute_grad_norm") is False:
        raise EngineConfigError("zero_optimization.compute_grad_norm=false switches off DeepSpeed's check for "
                                "non-finite gradients, which llave-ds relies on to skip such steps; remove it")
    if offloads_optimizer(cfg) and stage == 0:
        raise EngineConfigError("zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3, the config "
                                "has stage 0")
    if activation_checkpointing not in ("off", "non_reentrant", "reentrant", "auto"):  # auto: off or non_reentrant
        raise EngineConfigError(f"activation checkpointing must be off, non_reentrant, reentrant or "
                                f"auto, got {activation_checkpointing!r}")
    if activation_checkpointing == "reentrant" and stage == 3:
        raise EngineConfigError(
            "reentrant activation checkpointing cannot be combined with ZeRO-3 and the "
            "gradient cache (two forwards before a backward trip a ZeRO-3 assertion); use "
            "activation_checkpointing: non_reentrant")
    if cfg.get("fp16", {}).get("enabled"):
        raise EngineConfigError("fp16 with dynamic loss scaling is not supported by the "
                                "gradient cache; use bf16 or fp32")
    if stage == 3:
        # Why off: DeepSpeed's memory-efficient linear is a Python autograd function around
        # every matmul (patched into F.linear for the whole process at zero.Init); measured
        # on the CPU proxy it cost 30 % of the cached ZeRO-3 step (1.60 -> 1.12 s, chunk 4).
        # zero.Init reads it while the model is built, so it must be set here.
        cfg.setdefault("zero_optimization", {}).setdefault("memory_efficient_linear", False)
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
        """``engine.step()``; ``"skipped": True`` when the update was dropped because a
        reduced gradient was non-finite.

        What catches it (DeepSpeed 0.19.8): ZeRO-3 (any dtype) marks the step as an
        overflow when the global gradient norm is inf/NaN; ZeRO-1/2 do the same for fp32
        and for bf16 with ``bf16.check_grad_overflow`` (forced on by ``complete_ds_config``);
        bf16 without ZeRO goes through BF16_Optimizer, which checks the norm too. On such an
        overflow DeepSpeed clears the gradients, skips the optimizer and the LR scheduler and
        counts ``engine.skipped_steps``. The flag is all-reduced, so every rank agrees.
        ZeRO-0 in fp32 hands the torch optimizer the gradients unchecked: that case is
        checked here (gradients are already all-reduced) and the step is skipped the same
        way (optimizer and scheduler untouched, gradients cleared).
        """
        before = getattr(self.engine, "skipped_steps", 0)
        if self.engine.zero_optimization_stage() == 0 and not hasattr(self.engine.optimizer, "overflow"):
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                         for p in self.engine.module.parameters())
            if not all_ranks_ok(finite, self.device):
                self._skip_unchecked_step()
            else:
                self.engine.step()
        else:
            self.engine.step()
        skipped = getattr(self.engine, "skipped_steps", 0) > before
        norm = self.engine.get_global_grad_norm()
        lr = self.engine.get_lr()[0] if self.engine.get_lr() else float("nan")
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr, "skipped": skipped}

    def _skip_unchecked_step(self) -> None:
        """Run ``engine.step()`` with the optimizer's update disabled and reported as an
        overflow: DeepSpeed then does its own skip bookkeeping (gradients cleared,
        ``skipped_steps`` + 1, no scheduler step) and its counters stay consistent."""
        opt = self.engine.optimizer
        with _instance_override(opt, "step", lambda *args, **kwargs: None), \
                _instance_override(opt, "overflow", True):
            self.engine.step()


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict,
                 lr_scheduler=None):
    """``deepspeed.initialize`` with a client optimizer; returns the engine.

    Under ZeRO-3 the model's ``zero3_fetch_units()`` become leaf modules (see the module
    docstring) unless the config has its own ``zero_optimization.leaf_module`` block.
    """
    attach_deepspeed_comm()
    import deepspeed
    set_fetch_units(model, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lr_scheduler)
    return engine


def set_fetch_units(model: torch.nn.Module, ds_config: dict) -> list[str]:
    """Make the model's declared fetch units ZeRO-3 leaf modules; returns their class names.

    Why: ZeRO-3 hooks every submodule, and each hook fetches and releases that module's
    parameters in every forward and backward. The gradient cache runs 2-3 passes per chunk,
    so on a deep model the hooks, not the FLOPs, set the step time (issue: 7-12 % MFU on an
    H200). A leaf block is fetched whole on entry and released on exit: one hook per
    decoder layer instead of ~10. Memory: one block's parameters at a time (~0.2 GB bf16 for
    a 7B decoder layer) instead of one linear's.
    """
    zero = ds_config.get("zero_optimization", {})
    if zero_stage(ds_config) != 3 or "leaf_module" in zero or not hasattr(model, "zero3_fetch_units"):
        return []
    classes = list(model.zero3_fetch_units())
    if classes:
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, classes)
    return classes


@contextlib.contextmanager
def count_zero3_fetches():
    """Counts ZeRO-3's module-level parameter fetches while inside: one per hooked module
    entered in a forward (``"forward"``) or a backward (``"backward"``), whatever the
    module's size. Yields the live dict. For benchmarks; nothing else changes."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as coordinator

    counts = {"forward": 0, "backward": 0}
    real = coordinator.fetch_sub_module

    def counting(self, current_submodule, forward):
        counts["forward" if forward else "backward"] += 1
        return real(self, current_submodule, forward)

    coordinator.fetch_sub_module = counting
    try:
        yield counts
    finally:
        coordinator.fetch_sub_module = real


def comms_snapshot() -> dict[str, dict[str, int]]:
    """What DeepSpeed's comms logger (``comms_logger`` on in the DeepSpeed config) counted
    since the last ``comms_reset``: per collective its ``count`` and ``bytes``; empty when
    the logger is not available. For benchmarks."""
    try:
        import deepspeed.comm as dscomm
        raw = dscomm.comms_logger.comms_dict
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for name, sizes in raw.items():
        count = sum(v[0] for v in sizes.values())
        nbytes = sum(size * v[0] for size, v in sizes.items())
        # (the logger's latencies are cumulative timer readings in 0.19.8: not reported)
        out[name] = {"count": count, "bytes": nbytes}
    return out


def comms_reset() -> None:
    """Forget what DeepSpeed's comms logger counted so far (see ``comms_snapshot``)."""
    with contextlib.suppress(Exception):
        import deepspeed.comm as dscomm
        dscomm.comms_logger.comms_dict = {}


def gathered_state_dict(engine_or_module, *, dtype: torch.dtype = torch.float32, keep_on_all_ranks: bool = True,
                        strip_prefix: str = "") -> dict[str, torch.Tensor]:
    """Full (unpartitioned) parameters and persistent buffers as CPU tensors.

    Under ZeRO-3 each parameter is gathered on its own, so the extra device memory is one
    parameter, not the model; with ``keep_on_all_ranks=False`` only rank 0 keeps the CPU
    copies (the export path: a 7B model then costs host memory on one rank only). Call it
    on all ranks together: under ZeRO-3 it is a sequence of collectives.
    """
    module = getattr(engine_or_module, "module", engine_or_module)
    keep = keep_on_all_ranks or distributed.rank() == 0
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


def _guarded_deepspeed_save(engine, root: Path, tag: str, client_state: dict) -> list[str]:
    """``engine.save_checkpoint`` with every file write guarded: a write that fails (full
    disk, quota, I/O error) is recorded and the later writes are skipped, but DeepSpeed's
    collectives (barriers, tag check) still run on this rank, so the ranks stay in step
    and can agree on the failure afterwards. Returns this rank's failure texts."""
    failures: list[str] = []
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    real_save = getattr(checkpoint_engine, "save", None)
    real_copy = getattr(engine, "_copy_recovery_script", None)

    def guarded_save(state_dict, path, *args, **kwargs):
        if failures:
            return None
        try:
            return real_save(state_dict, path, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            failures.append(f"writing {path} failed ({type(exc).__name__}: {exc})")
            return None

    def guarded_copy(save_path, *args, **kwargs):
        if failures:
            return None
        try:
            return real_copy(save_path, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"copying DeepSpeed's recovery scripts to {save_path} failed "
                            f"({type(exc).__name__}: {exc})")
            return None

    with contextlib.ExitStack() as stack:
        if real_save is not None:
            stack.enter_context(_instance_override(checkpoint_engine, "save", guarded_save))
        if real_copy is not None:
            stack.enter_context(_instance_override(engine, "_copy_recovery_script", guarded_copy))
        try:
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        except Exception as exc:  # noqa: BLE001 - a failure outside the guarded writes
            failures.append(f"DeepSpeed's save_checkpoint raised {type(exc).__name__}: {exc}")
    return failures


@contextlib.contextmanager
def _instance_override(obj, name: str, value):
    """Set ``obj.name = value`` for the duration; restore exactly what was there."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def save_checkpoint(engine, root: Path, tag: str, client_state: dict, *, checksums: bool = True) -> Path:
    """Save on every rank; ``latest`` moves only once every rank has written everything.

    Order: rank 0 clears what an interrupted save of the same tag left -> DeepSpeed's files
    (all ranks; write failures recorded, not raised mid-way) -> each rank's RNG state ->
    the ranks agree on success -> each rank checksums a share of the files -> rank 0 writes
    the completion marker (with the file manifest) and then atomically replaces
    ``latest`` -> the ranks agree again.

    Any failure on any rank (a full disk: torch reports it as "unexpected pos") raises
    CheckpointError on every rank, naming the rank, the file and the previous checkpoint,
    which stays intact and named by ``latest``; the incomplete directory is removed.
    """
    root = Path(root)
    path = root / tag
    rank, world = distributed.rank(), distributed.world_size()
    device = torch.device(engine.device) if getattr(engine, "device", None) is not None else None
    barrier = distributed.barrier

    def fail(messages: list[str]):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        barrier()
        raise ckpt.CheckpointError(ckpt.save_failure_message(root, tag, messages))

    local: list[str] = []
    if rank == 0:
        try:
            ckpt.clear_stale_tag(root, tag)
        except OSError as exc:
            local.append(f"cannot clear the leftover {path}: {exc}")
    barrier()
    if not local:
        # Why the marker: DeepSpeed's ds_to_universal.py refuses a checkpoint whose client state
        # lacks it (Megatron-DeepSpeed writes it); our parameters need no pattern info beyond it.
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)
        client_state = {**client_state,
                        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        local = _guarded_deepspeed_save(engine, root, tag, client_state)
    if not local:
        try:
            ckpt.save_rng_state(path, rank)
        except Exception as exc:  # noqa: BLE001
            local.append(f"writing {path / f'rng_rank{rank}.pt'} failed ({type(exc).__name__}: {exc})")
    errors = rank_errors("; ".join(local) if local else None, device)
    if errors:
        fail(errors)

    # Manifest: sizes of every file, CRC-32 of each rank's share (ranks read in parallel).
    crcs: dict = {}
    local_error = None
    try:
        files = ckpt.list_checkpoint_files(path)
        if checksums:
            crcs = {name: ckpt.file_crc32(path / name) for name in files[rank::world]}
    except OSError as exc:
        local_error = f"reading back {path} failed ({exc})"
    errors = rank_errors(local_error, device)
    if errors:
        fail(errors)
    if checksums and world > 1:
        shares = all_gather_objects(crcs)
        crcs = {k: v for share in shares for k, v in share.items()}
    local_error = None
    if rank == 0:
        try:
            manifest = ckpt.build_manifest(path, files, crcs)
            sampler = client_state.get("sampler") or {}
            ckpt.mark_complete(path, {"step": client_state.get("step"), "world_size": client_state.get("world_size"),
                                      "zero_stage": int(engine.zero_optimization_stage()),
                                      "global_batch_size": sampler.get("global_batch_size"),
                                      "tag": tag, "files": manifest})
            ckpt.set_latest(root, tag)
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(OSError):
                (path / ckpt.COMPLETE_MARKER).unlink()
            local_error = f"writing {path / ckpt.COMPLETE_MARKER} or {root / ckpt.LATEST} failed ({exc})"
    errors = rank_errors(local_error, device)
    if errors:
        fail(errors)
    return path


def with_universal_load(ds_config: dict) -> dict:
    """The config of an engine that loads a universal checkpoint (another rank count)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def load_checkpoint(engine, path: Path, universal: Optional[Path] = None) -> dict:
    """Load a checkpoint written by ``save_checkpoint``; returns its client state.

    ``universal``: its universal form (``elastic.prepare_universal``), loaded instead of the
    ZeRO shards by an engine built with ``with_universal_load``. Refuses an incomplete
    checkpoint or one whose files are missing or of the wrong size (naming the file); when
    DeepSpeed cannot read it, names the file torch cannot read.
    """
    path = Path(path)
    ckpt.verify_checkpoint(path, checksums=False)  # refuses an incomplete one, naming it
    source = Path(universal) if universal is not None else path
    try:
        load_path, client_state = engine.load_checkpoint(str(source.parent), tag=source.name,
                                                         load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
    except (FileNotFoundError, RuntimeError, KeyError, EOFError, OSError, ValueError,
            AssertionError) as exc:
        bad = ckpt.find_unreadable_file(source)
        culprit = f"{bad[0]} cannot be read ({bad[1]}); " if bad else ""
        raise ckpt.CheckpointError(f"cannot load checkpoint {source}: {culprit}DeepSpeed said: "
                                   f"{type(exc).__name__}: {exc}") from exc
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
            module_state = ckpt.load_own_file(module_file).get("module") or {}   # tensors and plain values only
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
