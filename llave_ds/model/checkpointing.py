"""Activation checkpointing of the language model: all decoder layers, or every k-th.

The gradient cache and activation checkpointing solve the same memory problem: the cache
bounds activations to one chunk, checkpointing shrinks a chunk's activations to one layer
input per checkpointed layer, at the price of running those layers' forward once more in the
backward. Selective checkpointing (``every`` = k) recomputes layers 0, k, 2k, ... only, so a
chunk that almost fits pays for the few layers it needs, not for all of them
(`llave_ds.training.memory_plan` picks k from the memory model; the rule
`checkpointed_layers` is the one the memory model counts).

transformers' own ``every_n_layers`` counts every checkpointing-capable block of the model,
the vision tower's first, so which language-model layers it picks depends on the tower's
depth; here only the language model's layers are counted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

from llave_ds.model.backbones import language_model

if TYPE_CHECKING:
    from torch import nn

GradientCheckpointing = Literal["off", "non_reentrant", "reentrant", "auto"]
GRADIENT_CHECKPOINTING = get_args(GradientCheckpointing)


def checkpointed_layers(num_layers: int, every: int) -> list[int]:
    """The decoder layers recomputed when every ``every``-th is checkpointed: 0, k, 2k, ...
    (``every`` = 1: all of them)."""
    if every < 1:
        raise ValueError(f"model.checkpoint_every must be >= 1, got {every}")
    return list(range(0, num_layers, every))


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers."""
    return language_model(hf_model).layers


def apply_gradient_checkpointing(hf_model: nn.Module, mode: str, every: int = 1) -> list[int]:
    """Checkpoint the language model's layers 0, k, 2k, ... (``every`` = k) with
    ``use_reentrant`` per ``mode`` ("non_reentrant" / "reentrant"; "off": nothing); returns
    the checkpointed layer indices. The vision tower's blocks follow transformers' default
    (all checkpointed when enabled: with the tower frozen its forward needs no recompute
    anyway). "auto" must have been resolved first (`llave_ds.training.memory_plan`)."""
    if mode == "auto":
        raise ValueError("model.gradient_checkpointing: auto must be resolved by the memory plan before the "
                         "model is checkpointed")
    if mode == "off":
        return []
    layers = decoder_layers(hf_model)
    chosen = checkpointed_layers(len(layers), every)
    kwargs = {"use_reentrant": mode == "reentrant"}
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    wanted = set(chosen)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in wanted
    return chosen
