"""The frozen-vision cache (llave_ds/model/vision_cache.py), one process, tiny backbones.

The gradient cache's second pass must reuse the first pass's tower features (the tower
runs once per chunk, not twice) and give exactly the gradients of running it again; the
tower must run as usual wherever no first pass happened (evaluation, the uncached step) or
when the tower trains.
"""
from __future__ import annotations

import pytest
import torch

from llave_ds.core.gradcache import gradcache_step
from llave_ds.core.objective import ObjectiveConfig
from tests.multimodal import BACKBONES, Side, gradient_keeping_backend, noise_image
from tests.reference_loss import reference_loss

TAU, ALPHA = 0.1, 4.0


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from llave_ds.toy.tiny import build_tiny_model_dir
    root = tmp_path_factory.mktemp("vc")
    return {bb: str(build_tiny_model_dir(root / bb, bb, seed=3)) for bb in BACKBONES}


def load(model_dir: str, **overrides):
    from llave_ds.model.embedding import ModelConfig, load_embedding_model
    from llave_ds.model.formatter import InputFormatter
    cfg = ModelConfig(path=model_dir, dtype="float32", attn_implementation="sdpa", **overrides)
    model, processor = load_embedding_model(cfg)
    return model, InputFormatter(processor, model.backbone, max_length=96, system_prompt="E")


def tower_call_counter(model):
    """Counts real runs of the tower's first parameterised block (the patch embedding)."""
    inner = model.base_hf_model.model
    if model.backbone == "llava_onevision":
        target = inner.vision_tower.embeddings
    else:
        target = inner.visual.patch_embed
    calls = []
    target.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


def batch(formatter, n=4, text_only_targets=True):
    queries = [Side(f"describe picture {i}", noise_image(28, 28, seed=i)) for i in range(n)]
    targets = [Side(f"caption {i}") if text_only_targets else Side(f"c {i}", noise_image(28, 28, 50 + i))
               for i in range(n)]
    q = [formatter(queries[k:k + 2], "query") for k in range(0, n, 2)]
    t = [formatter(targets[k:k + 2], "target") for k in range(0, n, 2)]
    return q, t


@pytest.mark.parametrize("backbone", BACKBONES)
def test_second_pass_reuses_tower_and_gradients_are_exact(model_dirs, backbone):
    torch.manual_seed(0)
    model, formatter = load(model_dirs[backbone])
    assert model.vision_cache is not None  # tower frozen by default: the cache is on
    ref, _ = load(model_dirs[backbone], cache_frozen_vision=False)
    assert ref.vision_cache is None
    ref.load_state_dict(model.state_dict())
    q, t = batch(formatter, text_only_targets=False)

    calls = tower_call_counter(model)
    # Keep the gradients: intercept the step, then compare with the plain-torch reference.
    backend, grads = gradient_keeping_backend(model)
    res = gradcache_step(backend, q, t, ObjectiveConfig(temperature=TAU, alpha=ALPHA))
    # Pass 1: each of the 4 chunks (2 query, 2 target) runs the tower once without autograd;
    # pass 2 never runs it.
    assert calls == [False] * 4, calls
    assert model.vision_cache.hits == 4

    ref.train()
    qe = torch.cat([ref(**c) for c in q]).double()
    te = torch.cat([ref(**c) for c in t]).double()
    loss = reference_loss(qe, te, TAU, ALPHA, True)
    loss.backward()
    # A float32 loss against the float64 reference: the float32 loss is a log-sum-exp of logits
    # s/TAU + ALPHA*s of magnitude up to 1/TAU + ALPHA = 14, each rounded at float32's eps
    # (1.19e-7; one ulp at 14 is 9.5e-7), so machine-dependent rounding of about an ulp at that
    # scale is legitimate (measured 1.2e-6 on qwen2_vl at a loss of 4.42). 8 eps of the logit
    # scale (1.3e-5) leaves ~10x margin; a real loss bug (a lost term, a wrong weight or
    # temperature, other embeddings) moves the loss by orders of magnitude more.
    got_loss, want_loss = float(res.output.loss.detach()), float(loss.detach())
    loss_tol = 8 * torch.finfo(torch.float32).eps * max(1.0, abs(want_loss), 1 / TAU + ALPHA)
    assert abs(got_loss - want_loss) <= loss_tol, (got_loss, want_loss, loss_tol)
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert want.keys() == grads.keys()
    # The projector (right after the tower) receives its gradient through the cached features.
    assert any("projector" in n or "merger" in n for n in grads)
    # atol: 1e-6 (~8 float32 eps) of the tensor's scale, not of 1. A gradient element is a sum
    # of terms as large as the tensor's largest elements, so its rounding is relative to that
    # scale: in test_model.py's qwen2.5-VL twin of this test an element near 0 of a bias
    # gradient reaching 9.5 differs by 2.6e-6 (~3 ulps of 9.5). Still 1e-6 within [-1, 1].
    for name in want:
        atol = 1e-6 * max(1.0, float(want[name].abs().max()))
        torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_tower_runs_when_nothing_was_cached(model_dirs, backbone):
    model, formatter = load(model_dirs[backbone])
    q, _ = batch(formatter)
    calls = tower_call_counter(model)
    model.train()
    out = model(**q[0])  # autograd on, no first pass: the uncached step
    out.sum().backward()
    model.eval()
    with torch.no_grad():
        again = model(**q[0])  # evaluation: runs (and keeps an entry while the chunk lives)
    assert calls == [True, False]
    assert model.vision_cache.hits == 0
    torch.testing.assert_close(out.detach(), again)
    with torch.inference_mode():  # the embedder's mode: inference tensors, nothing stored
        chunk = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in q[0].items()}
        model.vision_cache._entries.clear()
        third = model(**chunk)
    assert not model.vision_cache._entries
    torch.testing.assert_close(third, again)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_an_entry_is_not_used_for_other_pixels_or_after_an_in_place_change(model_dirs, backbone):
    model, formatter = load(model_dirs[backbone])
    q, _ = batch(formatter)
    with torch.no_grad():
        model(**q[0])
    assert len(model.vision_cache._entries) == 1
    q[0]["pixel_values"].mul_(0.5)  # same tensor, new contents: the entry is stale
    calls = tower_call_counter(model)
    model(**q[0])
    assert calls == [True] and model.vision_cache.hits == 0
    q.clear()  # the chunk's tensors die: their entry goes with them
    import gc
    gc.collect()
    assert not model.vision_cache._entries


def test_off_when_the_tower_trains(model_dirs):
    model, _ = load(model_dirs["llava_onevision"], freeze_vision_tower=False)
    assert model.vision_cache is None


def test_dropout_after_the_tower_draws_the_same_masks(model_dirs):
    """Skipping the tower in pass 2 must leave the RNG where running it would have: with
    dropout in the tower and the LLM, the cached and uncached gradients still agree."""
    model, formatter = load(model_dirs["llava_onevision"])
    inner = model.base_hf_model.model
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.2
    inner.config.text_config.attention_dropout = 0.2
    for layer in inner.language_model.layers:
        layer.self_attn.attention_dropout = 0.2
    for layer in inner.vision_tower.encoder.layers:
        layer.self_attn.dropout = 0.2
    model.train()  # from_pretrained leaves it in eval mode, where dropout is off
    q, t = batch(formatter)
    results = {}
    for use_cache in (True, False):
        if not use_cache:
            model.vision_cache.remove()
            model.vision_cache = None
        backend, grads = gradient_keeping_backend(model)
        torch.manual_seed(7)
        res = gradcache_step(backend, q, t, ObjectiveConfig(temperature=TAU, alpha=ALPHA))
        results[use_cache] = (float(res.output.loss.detach()), grads)
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-7)
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
