"""Frozen vision-tower features: computed once per image in the gradient cache's no-grad
pass, reused by its autograd pass.

With the tower frozen (the paper's setting) the cache's pass 2 would run the tower again on
the same pixels with the same weights, for nothing: the tower has no gradient, and only the
projector after it trains. At the 2B shape the tower is ~5 % of a step's FLOPs and, under
ZeRO-3, a whole model's worth of parameter fetches and hooks per chunk.

How: the tower module's ``forward`` is replaced on the instance (parameters, state-dict
keys and DeepSpeed's hooks stay where they are). ``EmbeddingModel.forward`` names the
chunk's ``pixel_values`` tensor as the key; then

* no autograd (pass 1): run the tower and keep what the backbone reads of its output
  (LLaVA-OV: the selected hidden states; Qwen2-VL: the patch features before the trained
  merger; Qwen2.5-VL: the same, still in window order, plus the index that undoes the
  window order after the merger; Qwen3-VL: the patch features before the merger and the
  inputs of each trained DeepStack merger), plus the RNG state after the tower;
* autograd on, an entry for this very tensor (same object, not modified in place since):
  return the kept output without running the tower, and set the RNG state to what it was
  after the tower in pass 1, so dropout anywhere after it draws the same masks;
* anything else (the uncached step, a chunk never seen, tensors made under
  ``torch.inference_mode``): run the tower.

A chunk with videos calls the tower twice (images, then videos): ``EmbeddingModel`` keys
each call by its own tensor (``pixel_values``, ``pixel_values_videos``), so each is cached
and replayed on its own (tests/test_video_inputs.py checks the gradients).

The chunk's tensor is the key because the gradient cache passes the same chunk objects to
both passes; an entry goes away with its tensor (a weak reference), so memory is bounded by
the chunks alive (2B: 3.4 MB per 384-px image in bf16). Evaluation (no autograd either)
stores too, and frees each entry with its batch. Exactness is tested against the
plain-torch reference (tests/test_gradcache_lmm.py, frozen-tower scenarios).
"""
from __future__ import annotations

import contextlib
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn


@dataclass
class _Entry:
    tensor: "weakref.ref[torch.Tensor]"
    version: int
    features: Any
    cpu_rng: torch.Tensor
    cuda_rng: Optional[torch.Tensor]


class FrozenVisionCache:
    """Installs itself on a backbone's vision tower; see the module docstring."""

    def __init__(self, tower: nn.Module, keep: Callable[..., Any], replay: Callable[[Any], Any],
                 keep_inputs: bool = False, record: Optional[Callable[[], Any]] = None,
                 handles: tuple = ()):
        """``keep(output) -> features`` picks what to store from the tower's output (with
        ``keep_inputs``: ``keep(output, *args, **kwargs)``, also given the tower's call
        arguments); ``replay(features) -> output`` rebuilds what the backbone reads (may run
        trained modules such as Qwen2-VL's merger). ``record()``: a context manager around a
        tower run whose features are stored (Qwen3-VL records its DeepStack mergers' inputs
        there); ``handles``: hooks the installer registered, removed by `remove`."""
        self.tower = tower
        self._keep, self._replay = keep, replay
        self._keep_inputs = keep_inputs
        self._record = record
        self._handles = handles
        self._original = tower.forward
        self._entries: dict[int, _Entry] = {}
        self._key: Optional[torch.Tensor] = None
        self.hits = 0
        self.runs = 0
        tower.forward = types.MethodType(self._forward, tower)

    def remove(self) -> None:
        """Put the tower's own forward back."""
        self.tower.__dict__.pop("forward", None)
        for handle in self._handles:
            handle.remove()
        self._entries.clear()

    @contextlib.contextmanager
    def keyed(self, pixel_values: Optional[torch.Tensor]):
        """Within it, tower calls belong to the chunk whose pixels are ``pixel_values``."""
        self._key = pixel_values
        try:
            yield
        finally:
            self._key = None

    def _lookup(self, key: torch.Tensor) -> Optional[_Entry]:
        entry = self._entries.get(id(key))
        if entry is None or entry.tensor() is not key or entry.version != key._version:
            return None
        return entry

    def _forget(self, key_id: int) -> None:
        self._entries.pop(key_id, None)

    def _forward(self, tower: nn.Module, *args, **kwargs):
        key = self._key
        if key is not None and key.is_inference():
            key = None  # inference mode (evaluation): no version counter, and no pass 2 to serve
        if key is not None and torch.is_grad_enabled():
            entry = self._lookup(key)
            if entry is not None:
                self.hits += 1
                torch.set_rng_state(entry.cpu_rng)
                if entry.cuda_rng is not None:
                    torch.cuda.set_rng_state(entry.cuda_rng, key.device)
                return self._replay(entry.features)
        self.runs += 1
        storing = key is not None and not torch.is_grad_enabled()
        with self._record() if storing and self._record is not None else contextlib.nullcontext():
            output = self._original(*args, **kwargs)
        if storing:
            key_id = id(key)
            self._entries[key_id] = _Entry(
                tensor=weakref.ref(key, lambda _ref, k=key_id: self._forget(k)), version=key._version,
                features=self._keep(output, *args, **kwargs) if self._keep_inputs else self._keep(output),
                cpu_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state(key.device) if key.device.type == "cuda" else None)
        return output


def install_llava_onevision(inner: nn.Module) -> FrozenVisionCache:
    """LLaVA-OV: the tower's output is read only at ``config.vision_feature_layer``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    layers = inner.config.vision_feature_layer
    wanted = [layers] if isinstance(layers, int) else list(layers)

    def keep(output):
        hidden = output.hidden_states
        n = len(hidden)
        picked = {i % n for i in wanted}
        return n, {i: hidden[i] for i in picked}

    def replay(features):
        n, picked = features
        return BaseModelOutputWithPooling(hidden_states=tuple(picked.get(i) for i in range(n)))

    return FrozenVisionCache(inner.vision_tower, keep, replay)


def install_qwen2_vl(inner: nn.Module) -> FrozenVisionCache:
    """Qwen2-VL: the frozen part is everything in ``visual`` before the (trained) merger, so
    the patch features are kept and the merger runs on them in pass 2."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    visual = inner.visual

    def keep(output):
        return output.last_hidden_state

    def replay(hidden):
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=visual.merger(hidden))

    return FrozenVisionCache(visual, keep, replay)


def _qwen2_5_vl_window_index(visual: nn.Module, grid_thw: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The ``window_index`` that ``visual.forward`` ordered the patches by (a precomputed one
    passed in ``kwargs`` wins, as in the forward itself)."""
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size, kwargs=dict(kwargs))
    return window_index


def install_qwen2_5_vl(inner: nn.Module) -> FrozenVisionCache:
    """Qwen2.5-VL: like Qwen2-VL, but ``visual`` reorders the patches into attention windows
    and its ``last_hidden_state`` stays in that order, while ``pooler_output`` is
    ``merger(last_hidden_state)[argsort(window_index)]``. Pass 1 keeps the pre-merger states
    and that reverse index; pass 2 runs the same two operations on them."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    visual = inner.visual

    def keep(output, hidden_states=None, grid_thw=None, **kwargs):
        if grid_thw is None:
            raise TypeError("Qwen2.5-VL vision cache: the tower was called without grid_thw")
        reverse = torch.argsort(_qwen2_5_vl_window_index(visual, grid_thw, kwargs))
        return output.last_hidden_state, reverse.to(output.last_hidden_state.device)

    def replay(features):
        hidden, reverse = features
        return BaseModelOutputWithPooling(last_hidden_state=hidden,
                                          pooler_output=visual.merger(hidden)[reverse, :])

    return FrozenVisionCache(visual, keep, replay, keep_inputs=True)


def install_qwen3_vl(inner: nn.Module) -> FrozenVisionCache:
    """Qwen3-VL: like Qwen2-VL (the frozen part is ``visual`` before its mergers), and DeepStack:
    the hidden states after the tapped blocks go through their own trained mergers into the
    first decoder layers. The output holds only the merged features, so pass 1 records each
    DeepStack merger's input (a forward pre-hook, active only while a stored run is recorded)
    and pass 2 runs all the mergers again on what was kept."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    visual = inner.visual
    mergers = list(visual.deepstack_merger_list)
    recorded: dict[int, torch.Tensor] = {}
    recording: list[bool] = []

    def hook_for(k: int):
        def hook(module, args):
            if recording:
                recorded[k] = args[0]
        return hook

    handles = tuple(m.register_forward_pre_hook(hook_for(k)) for k, m in enumerate(mergers))

    @contextlib.contextmanager
    def record():
        recorded.clear()
        recording.append(True)
        try:
            yield
        finally:
            recording.clear()

    def keep(output):
        taps = [recorded.pop(k) for k in range(len(mergers))]
        return output.last_hidden_state, taps

    def replay(features):
        hidden, taps = features
        return BaseModelOutputWithDeepstackFeatures(
            last_hidden_state=hidden, pooler_output=visual.merger(hidden),
            deepstack_features=[merger(tap) for merger, tap in zip(mergers, taps)])

    return FrozenVisionCache(visual, keep, replay, record=record, handles=handles)


INSTALLERS = {"llava_onevision": install_llava_onevision, "qwen2_vl": install_qwen2_vl,
              "qwen2_5_vl": install_qwen2_5_vl, "qwen3_vl": install_qwen3_vl}
