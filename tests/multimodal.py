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


def check_cached_second_pass(model, ref, formatter, images: list, tau: float = 0.1, alpha: float = 4.0) -> set:
    """The gradient cache on ``model`` (frozen tower, vision cache on) against ``ref``, the same
    weights without the cache, trained on the global batch with plain autograd: query chunks of
    images, a target chunk mixing text and an image and a text-only one (the dummy image). Pass
    2 never runs the tower (4 cache hits), the loss agrees within 8 float32 eps of the logit
    scale 1/tau + alpha (an ulp of it is legitimate rounding: test_vision_cache.py) and every
    gradient within rtol 1e-4 and an atol of 1e-6 scaled to the tensor's magnitude. Returns the
    names of the parameters with a gradient."""
    import torch

    from llave_ds.core.gradcache import gradcache_step
    from llave_ds.core.objective import ObjectiveConfig
    from tests.reference_loss import reference_loss

    assert ref.vision_cache is None
    texts = [Side(f"caption {i}") for i in range(4)]
    q = [formatter(images[k:k + 2], "query") for k in (0, 2)]
    t = [formatter([texts[0], images[1]], "target"), formatter(texts[2:], "target")]  # the last: dummy image
    calls = []
    model.base_hf_model.model.visual.patch_embed.register_forward_hook(
        lambda *_: calls.append(torch.is_grad_enabled()))
    backend, got = gradient_keeping_backend(model)
    res = gradcache_step(backend, q, t, ObjectiveConfig(temperature=tau, alpha=alpha))
    assert calls == [False] * 4 and model.vision_cache.hits == 4  # pass 2 never ran the tower

    ref.train()
    loss = reference_loss(torch.cat([ref(**c) for c in q]).double(), torch.cat([ref(**c) for c in t]).double(),
                          tau, alpha, True)
    loss.backward()
    got_loss, want_loss = float(res.output.loss.detach()), float(loss.detach())
    loss_tol = 8 * torch.finfo(torch.float32).eps * (1 / tau + alpha)
    assert abs(got_loss - want_loss) <= loss_tol, (got_loss, want_loss, loss_tol)
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys()
    # atol scaled to the tensor's magnitude: a merger's bias gradient reaches 9.5, where 1e-6
    # is about one ulp (measured 2.6e-6 on one element of Qwen2.5-VL's).
    for name in want:
        atol = 1e-6 * max(1.0, float(want[name].abs().max()))
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return set(want)


def brute_force_embeddings(embedder, task):
    """(queries, candidates) of an MMEB-V2 task's datasets, embedded one process, in order,
    without the sharded encoder: the reference the evaluation's rankings are checked against."""
    def embed(dataset, role):
        return embedder.encode_sides([dataset[i] for i in range(len(dataset))], role=role, progress=False).numpy()

    return embed(task.queries, "query"), embed(task.candidates, "target")
