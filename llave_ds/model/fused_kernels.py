"""Fused kernels where installed (issue #25, lever 4): Liger-Kernel's RMSNorm, RoPE and SwiGLU
on the language model, GPU only, off by default (``ModelConfig.fused_kernels``).

``apply_fused_kernels(hf_model, backbone, mode)`` patches the language model of one model
instance (LLaVA-OV's Qwen2, the Qwen-VL text models) after it is built:

* RMSNorm: every norm of the language model (the final norm, the two per decoder layer and,
  Qwen3-VL, the per-head q/k norms) runs Liger's Triton RMSNorm. Its ``forward`` is rebound
  on the instance; the module, its class and its parameters stay what they were, so ZeRO-3's
  hooks, the fetch units and the state-dict keys see no difference;
* SwiGLU: every decoder MLP runs ``down(silu(gate(x)) * up(x))`` with ``silu(a) * b`` fused,
  rebound on the instance the same way (the projections stay ``nn.Linear``, LoRA included);
* RoPE: the rotation of q and k. transformers' attention calls a function of its modeling
  module, so that function is replaced in the module: PROCESS-WIDE, for every model of that
  modeling module in the process, built before or after (a run builds one model).

Nothing else: not Liger's fused linear cross-entropy (the embedding never runs the LM head),
nothing on the vision tower. The instance patches go through Liger's own helpers, the ones
its ``apply_liger_kernel_to_<model>(model=...)`` functions call. Those functions are not used:
with transformers 5.23 the Qwen-VL ones do not import (liger-kernel 0.8.5 imports its LM-head
forwards unconditionally, which need output classes transformers has dropped:
``LigerQwen2VLCausalLMOutputWithPast``), they swap classes in the modeling module
process-wide (``Qwen2RMSNorm = LigerRMSNorm``), Qwen3-VL's has no SwiGLU, and Qwen2-VL's
replaces an M-RoPE function that transformers 5.x no longer calls (the rotary embedding now
merges the sections; the attention applies the plain rotation: ``_rope_target`` finds which).

``liger_kernel`` is imported only inside ``apply_fused_kernels`` with mode "liger": the CPU
path never imports it. Equality to the unfused model (float32, every backbone, embeddings
and gradients) is tested on GPU in tests/test_fused_kernels.py (it also passed on CPU under
Triton's interpreter: docs/PERFORMANCE.md, lever 4).
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import types
from typing import Literal, Optional, get_args

import torch
from torch import nn

from llave_ds.model.backbones import language_model

logger = logging.getLogger(__name__)

FusedKernels = Literal["auto", "off", "liger"]
FUSED_KERNELS = get_args(FusedKernels)
INSTALL = "pip install llave-ds[liger] (or pip install liger-kernel)"

# The rotary functions a text attention may call (``_rope_target``).
_MROPE_FN, _ROPE_FN = "apply_multimodal_rotary_pos_emb", "apply_rotary_pos_emb"
# What ``_get_name`` says of a module Liger rebound, and the kernel's name here.
_LIGER_MODULES = {"LigerRMSNorm": "rms_norm", "LigerSwiGLUMLP": "swiglu"}


def resolve_fused_kernels(requested: str) -> str:
    """'auto' -> "liger" when liger_kernel is installed and CUDA is there, else "off".

    An explicit "liger" without either is an error (Liger's kernels are Triton: GPU only)."""
    if requested not in FUSED_KERNELS:
        raise ValueError(f"model.fused_kernels must be one of {', '.join(FUSED_KERNELS)}, got {requested!r}")
    installed = importlib.util.find_spec("liger_kernel") is not None
    cuda = torch.cuda.is_available()
    if requested == "liger" and not (installed and cuda):
        why = " and ".join(reason for reason, ok in (
            ("liger_kernel is not installed", installed),
            ("CUDA is not available (Liger-Kernel's kernels are Triton kernels: GPU only)", cuda)) if not ok)
        raise ValueError(f"model.fused_kernels is 'liger' but {why}. Install it on a CUDA machine with "
                         f"`{INSTALL}`, or set model.fused_kernels to 'auto' (Liger where it runs) or 'off'")
    choice = requested
    if requested == "auto":
        choice = "liger" if installed and cuda else "off"
    logger.info("fused kernels: %s (requested %s)", choice, requested)
    return choice


def _rope_target(text: nn.Module) -> Optional[tuple[types.ModuleType, str]]:
    """(module, name) of the rotary function ``text``'s attention calls: M-RoPE's own one where
    its forward names it (older transformers), else the plain rotation; None if neither."""
    attention = type(text.layers[0].self_attn)
    names = inspect.unwrap(attention.forward).__code__.co_names
    name = next((n for n in (_MROPE_FN, _ROPE_FN) if n in names), None)
    return None if name is None else (sys.modules[attention.__module__], name)


def _is_liger(obj) -> bool:
    return str(getattr(obj, "__module__", "") or "").startswith("liger_kernel")


def _fused_module_counts(text: nn.Module) -> dict[str, int]:
    """How many modules of ``text`` run each Liger module kernel ("rms_norm", "swiglu")."""
    counts: dict[str, int] = {}
    for module in text.modules():
        get_name = module.__dict__.get("_get_name")  # Liger rebinds it beside forward
        kernel = _LIGER_MODULES.get(get_name()) if get_name is not None else None
        if kernel is not None:
            counts[kernel] = counts.get(kernel, 0) + 1
    return counts


def patched_kernels(hf_model: nn.Module) -> list[str]:
    """The kernels Liger runs in ``hf_model``'s language model: "rms_norm", "rope", "swiglu"
    (sorted; empty when unfused). Reads the instance (and, for RoPE, its modeling module)."""
    text = language_model(hf_model)
    found = set(_fused_module_counts(text))
    rope = _rope_target(text)
    if rope is not None and _is_liger(getattr(*rope)):
        found.add("rope")
    return sorted(found)


def _rms_norms(text: nn.Module) -> list[nn.Module]:
    """Every RMSNorm of the language model: final, per layer, and Qwen3's per-head q/k norms."""
    norms = [text.norm]
    for layer in text.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [getattr(layer.self_attn, n) for n in ("q_norm", "k_norm") if hasattr(layer.self_attn, n)]
    odd = sorted({type(m).__name__ for m in norms if not type(m).__name__.endswith("RMSNorm")})
    if odd:
        raise ValueError(f"model.fused_kernels: expected RMSNorm modules in the language model, found {odd}")
    return norms


def _apply_liger(hf_model: nn.Module, backbone: str) -> None:
    from liger_kernel.transformers import monkey_patch
    from liger_kernel.transformers.qwen2vl_mrope import liger_multimodal_rotary_pos_emb
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    patch_norm = getattr(monkey_patch, "_patch_rms_norm_module", None)
    patch_mlp = getattr(monkey_patch, "_patch_swiglu_module", None)
    if patch_norm is None or patch_mlp is None:
        raise ValueError("model.fused_kernels: this liger-kernel lacks the instance patch helpers llave-ds uses "
                         "(read against 0.8.5): pip install 'liger-kernel>=0.8.5'")
    text = language_model(hf_model)
    if backbone == "llava_onevision" and text.config.model_type != "qwen2":
        raise ValueError("model.fused_kernels: 'liger' supports LLaVA-OV with a Qwen2 language model, "
                         f"this one is {text.config.model_type!r}")
    for norm in _rms_norms(text):
        # in_place=False: the backward writes dX to a buffer of its own, not into dY (Liger's
        # choice for its post-norm models); dY is then never overwritten, whoever else reads it.
        patch_norm(norm, in_place=False)
    if getattr(text.config, "hidden_act", None) in ("silu", "swish"):  # Liger's kernel is SiLU's
        for layer in text.layers:
            patch_mlp(layer.mlp, LigerSwiGLUMLP)
    else:
        logger.warning("fused kernels: no SwiGLU (hidden_act is %r, not silu)", text.config.hidden_act)
    # Process-wide: transformers' attention calls this module-level function.
    rope = _rope_target(text)
    if rope is not None:
        module, name = rope
        setattr(module, name, liger_multimodal_rotary_pos_emb if name == _MROPE_FN else liger_rotary_pos_emb)


def apply_fused_kernels(hf_model: nn.Module, backbone: str, mode: str) -> list[str]:
    """Patch ``hf_model``'s language model with fused kernels per ``mode`` ("auto" resolved by
    ``resolve_fused_kernels``); returns what runs fused ("rms_norm", "rope", "swiglu"), [] for "off".

    Call it on the transformers model itself (peft's base model when LoRA is on), before
    ``deepspeed.initialize``; the patch is of ``forward`` methods only, so ZeRO-3's parameter
    hooks and the checkpoint's keys are unchanged. The RoPE part is process-wide (module doc).
    """
    if resolve_fused_kernels(mode) == "off":
        return []
    _apply_liger(hf_model, backbone)
    kernels = patched_kernels(hf_model)
    text = language_model(hf_model)
    counts = _fused_module_counts(text)
    rope = _rope_target(text)
    logger.info("fused kernels (Liger) on the %s language model: %s; RoPE: %s (process-wide)", backbone,
                ", ".join(f"{name} x{n}" for name, n in sorted(counts.items())) or "no module",
                f"{rope[0].__name__}.{rope[1]}" if rope else "none")
    missing = {"rms_norm", "rope", "swiglu"} - set(kernels)
    if missing:
        logger.warning("fused kernels: Liger left %s unfused on %s", ", ".join(sorted(missing)), backbone)
    return kernels


__all__ = ["FUSED_KERNELS", "FusedKernels", "apply_fused_kernels", "patched_kernels", "resolve_fused_kernels"]
