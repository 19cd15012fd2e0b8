"""Shared pieces of the multimodal tests: the side type, deterministic images and videos."""
from __future__ import annotations

from typing import List

import numpy as np
from PIL import Image

from llave_ds.media.side import Side  # noqa: F401  (the package's one side type, re-exported)

BACKBONES = ["llava_onevision", "qwen2_vl"]
# Qwen2.5-VL came third, Qwen3-VL fourth. ALL_BACKBONES is every backbone (test_tiny, test_model use it).
# BACKBONES stays the first two: test_processing's parametrized tests key per-backbone
# expectations on those two names (its Qwen2.5-VL tests are separate). test_vision_cache and
# test_embedder also pass on ALL_BACKBONES (checked when Qwen2.5-VL was added).
ALL_BACKBONES = BACKBONES + ["qwen2_5_vl", "qwen3_vl"]


def noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def moving_video(seed: int, num_frames: int = 4, size: int = 28) -> List[Image.Image]:
    """A deterministic clip: a noisy background with a bright block moving right, one
    frame per step (``size`` x ``size``; 28 is what the tiny processors keep unresized)."""
    rng = np.random.RandomState(seed)
    background = rng.randint(0, 120, (size, size, 3)).astype(np.uint8)
    colour = rng.randint(130, 255, 3).astype(np.uint8)
    frames = []
    for t in range(num_frames):
        arr = background.copy()
        x = (3 + t * (size - 10) // max(num_frames - 1, 1)) % (size - 6)
        arr[8:16, x:x + 6] = colour
        frames.append(Image.fromarray(arr))
    return frames


def gradient_keeping_backend(model):
    """A plain-torch StepBackend whose step() keeps the gradients (``name -> tensor``, in the
    returned dict) instead of applying them, so a cached step can be compared with a reference."""
    import torch

    from llave_ds.core.gradcache import TorchStepBackend

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    backend, grads = TorchStepBackend(model, opt), {}

    def keep_grads():
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.zero_grad(set_to_none=True)
        return {"grad_norm": 0.0, "lr": 0.0}

    backend.step = keep_grads
    return backend, grads
