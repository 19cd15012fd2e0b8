"""model.fused_kernels (issue #25, lever 4): Liger-Kernel's RMSNorm / RoPE / SwiGLU on the LM.

On CPU: the choice ("auto" is off without CUDA, an explicit "liger" without CUDA or without
liger_kernel is a clear error, a bad value is refused) and "off" leaves every module alone
without importing liger_kernel. Where liger_kernel is installed: which modules it patches
(the language model's only). On a GPU with liger_kernel: the fused model gives the unfused
one's embeddings and gradients, every backbone, float32.
"""
import importlib
import importlib.util
import logging
import sys

import pytest
import torch

from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config
from llave_ds.model.formatter import InputFormatter
from llave_ds.model.backbones import language_model
from llave_ds.model.fused_kernels import apply_fused_kernels, patched_kernels, resolve_fused_kernels
from llave_ds.toy import tiny
from tests.multimodal import ALL_BACKBONES, Side, noise_image

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
MODELING = ["qwen2.modeling_qwen2", "qwen2_vl.modeling_qwen2_vl", "qwen2_5_vl.modeling_qwen2_5_vl",
            "qwen3_vl.modeling_qwen3_vl"]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_liger(monkeypatch):
    """liger_kernel absent: find_spec says so and importing it raises ImportError."""
    monkeypatch.setitem(sys.modules, "liger_kernel", None)


@pytest.fixture
def modeling_modules_restored():
    """Liger's RoPE is set in transformers' modeling modules (process-wide): put them back."""
    modules = [importlib.import_module(f"transformers.models.{name}") for name in MODELING]
    saved = [(m, dict(vars(m))) for m in modules]
    yield
    for module, before in saved:
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def module_state(hf_model):
    """What a patch could change: each module's class and instance-bound methods, and the
    module-level functions of transformers' modeling modules."""
    modules = {name: (type(m), {k: v for k, v in vars(m).items() if callable(v)})
               for name, m in hf_model.named_modules()}
    functions = {name: dict(vars(importlib.import_module(f"transformers.models.{name}"))) for name in MODELING}
    return modules, functions


# ------------------------------------------------------------------------------ the choice

def test_auto_is_off_without_cuda(no_cuda, caplog):
    with caplog.at_level(logging.INFO, logger="llave_ds.model.fused_kernels"):
        assert resolve_fused_kernels("auto") == "off"
    assert "fused kernels: off (requested auto)" in caplog.text
    assert resolve_fused_kernels("off") == "off"


def test_auto_is_liger_with_liger_kernel_and_cuda(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    assert resolve_fused_kernels("auto") == "liger"
    assert resolve_fused_kernels("liger") == "liger"


def test_auto_is_off_without_liger_kernel_even_with_cuda(monkeypatch, no_liger):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_fused_kernels("auto") == "off"


def test_liger_without_cuda_is_a_clear_error(no_cuda):
    with pytest.raises(ValueError, match=r"model\.fused_kernels.*CUDA is not available.*pip install llave-ds\[liger\]"):
        resolve_fused_kernels("liger")


def test_liger_without_liger_kernel_is_a_clear_error(monkeypatch, no_liger):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"model\.fused_kernels.*liger_kernel is not installed.*pip install liger-k"):
        resolve_fused_kernels("liger")


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="model.fused_kernels must be one of auto, off, liger"):
        ModelConfig(fused_kernels="triton")
    with pytest.raises(ValueError, match="model.fused_kernels must be one of"):
        resolve_fused_kernels("on")
    assert ModelConfig().fused_kernels == "off"  # off until a GPU measurement says otherwise


def test_liger_in_the_config_fails_at_build_without_cuda(no_cuda):
    with pytest.raises(ValueError, match=r"model\.fused_kernels is 'liger'"):
        build_embedding_model_from_config(tiny.tiny_config("qwen2_vl"),
                                          ModelConfig(dtype="float32", fused_kernels="liger"))


# ------------------------------------------------------------------------------ off: untouched

@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_off_and_auto_without_cuda_leave_the_model_untouched(backbone, no_cuda, no_liger):
    """No liger_kernel import (it would raise here), no module or function changed."""
    hf_model = tiny.build_tiny_model(backbone)
    before = module_state(hf_model)
    assert apply_fused_kernels(hf_model, backbone, "off") == []
    assert apply_fused_kernels(hf_model, backbone, "auto") == []
    assert module_state(hf_model) == before
    assert patched_kernels(hf_model) == []
    model = build_embedding_model_from_config(tiny.tiny_config(backbone), ModelConfig(dtype="float32"))
    assert patched_kernels(model.base_hf_model) == []


# ------------------------------------------------------------------------------ liger: what it patches

needs_liger = pytest.mark.skipif(not HAS_LIGER, reason="liger_kernel not installed (pip install llave-ds[liger])")


@needs_liger
@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_liger_patches_the_language_model_only(backbone, monkeypatch, modeling_modules_restored):
    """Patching runs nothing, so it is checked wherever liger_kernel imports (CUDA faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hf_model = tiny.build_tiny_model(backbone)
    modules, functions = module_state(hf_model)
    assert apply_fused_kernels(hf_model, backbone, "liger") == ["rms_norm", "rope", "swiglu"]
    after, after_functions = module_state(hf_model)
    changed = {name for name in modules if modules[name] != after[name]}
    assert changed and all(".language_model." in f".{name}." for name in changed), sorted(changed)
    assert all(after[name][0] is modules[name][0] for name in modules)  # classes unchanged: hooks, keys
    text = language_model(hf_model)
    norms = [n for n, m in text.named_modules() if type(m).__name__.endswith("RMSNorm")]
    assert {n for n, m in text.named_modules() if m._get_name() == "LigerRMSNorm"} == set(norms)
    assert all(layer.mlp._get_name() == "LigerSwiGLUMLP" for layer in text.layers)
    # The one process-wide change: the rotary function of this backbone's modeling module.
    moved = {(mod, name) for mod in functions for name in functions[mod]
             if after_functions[mod].get(name) is not functions[mod][name]}
    assert moved == {(type(text).__module__.removeprefix("transformers.models."), "apply_rotary_pos_emb")}


# ------------------------------------------------------------------------------ GPU: equality

def image_sides():
    return [Side("<|image_1|>\nwhat is shown here, in detail?", noise_image(40, 50, 1)),
            Side("a text-only row of medium length"),
            Side("x", noise_image(56, 28, 2))]


def embed_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    emb = model(**batch)
    weights = torch.linspace(-1.0, 1.0, emb.numel(), device=emb.device).view_as(emb)  # a non-degenerate loss
    (emb * weights).sum().backward()
    return emb.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's kernels are Triton kernels: CUDA only")
@needs_liger
@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_liger_gives_the_unfused_embeddings_and_gradients(backbone, monkeypatch, modeling_modules_restored):
    """The same weights, float32, SDPA, TF32 off: unfused first (Liger's RoPE is process-wide,
    so the reference runs before the fused model is built), then ``fused_kernels: liger``.

    Tolerance rtol 1e-4, atol 1e-5 (gradients: atol scaled to the tensor's largest value):
    Liger computes the same functions in float32 in another order (a Triton reduction for the
    mean of squares, SiLU inside the fused kernel), so the results differ by rounding, a few
    ulps per op carried through the layers (Triton's CPU interpreter gave 2.5e-7 on the
    embeddings, 1.3e-6 relative on the gradients); a wrong kernel (a misplaced rotary section,
    a missed eps) moves them by 1e-2 or more."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    device = torch.device("cuda")
    fmt = InputFormatter(tiny.build_tiny_processor(backbone), backbone)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in fmt(image_sides(), "query").items()}
    common = dict(dtype="float32", attn_implementation="sdpa", cache_frozen_vision=False)

    ref = build_embedding_model_from_config(tiny.tiny_config(backbone), ModelConfig(**common)).to(device)
    assert patched_kernels(ref.base_hf_model) == []
    want_emb, want = embed_and_grads(ref, batch)
    state = ref.state_dict()
    del ref

    fused = build_embedding_model_from_config(tiny.tiny_config(backbone), ModelConfig(fused_kernels="liger", **common))
    fused.load_state_dict(state)
    fused.to(device)
    assert patched_kernels(fused.base_hf_model) == ["rms_norm", "rope", "swiglu"]
    got_emb, got = embed_and_grads(fused, batch)

    torch.testing.assert_close(got_emb, want_emb, rtol=1e-4, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        atol = 1e-5 * max(1.0, float(want[name].abs().max()))
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
