"""DeepSpeed config defaults for the cached step (engine.py) and the fetch units the
embedding model declares. The exactness of the step with them on is tested in
tests/test_gradcache_lmm.py; their speed is measured by the benchmark."""
from __future__ import annotations

import pytest
import torch

from llave_ds.training import engine as eng


def complete(zero: dict) -> dict:
    return eng.complete_ds_config({"zero_optimization": zero}, local_batch_size=4, world_size=1)


def test_zero3_gets_plain_linear_unless_the_config_says_otherwise():
    assert complete({"stage": 3})["zero_optimization"]["memory_efficient_linear"] is False
    assert complete({"stage": 3, "memory_efficient_linear": True})["zero_optimization"][
        "memory_efficient_linear"] is True
    assert "memory_efficient_linear" not in complete({"stage": 2})["zero_optimization"]


@pytest.mark.parametrize("backbone,want", [
    ("llava_onevision", ["Qwen2DecoderLayer", "SiglipEncoderLayer"]),
    ("qwen2_vl", ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]),
])
def test_fetch_units_are_the_repeated_blocks(backbone, want):
    from llave_ds.model.embedding import EmbeddingModel
    from llave_ds.toy.tiny import build_tiny_model
    model = EmbeddingModel(build_tiny_model(backbone), backbone)
    # transformers declares the vision embeddings unsplittable too; they occur once and, as a
    # leaf, broke a trainable tower's gradient under ZeRO-3: left out.
    assert model.zero3_fetch_units() == want


class _Declares(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])

    def zero3_fetch_units(self):
        return ["Linear"]


def test_set_fetch_units_marks_leaves_only_under_zero3_and_without_a_user_block():
    from deepspeed.utils import get_z3_leaf_modules
    eng.prepare_cpu_accelerator()
    model = _Declares()
    assert eng.set_fetch_units(model, complete({"stage": 2})) == []
    assert eng.set_fetch_units(model, complete({"stage": 3, "leaf_module": {"classes": []}})) == []
    assert get_z3_leaf_modules(model) == []
    assert eng.set_fetch_units(model, complete({"stage": 3})) == ["Linear"]
    assert get_z3_leaf_modules(model) == list(model.blocks)
    assert eng.set_fetch_units(torch.nn.Linear(2, 2), complete({"stage": 3})) == []  # declares none


def test_only_the_deprecated_collective_warnings_are_silenced():
    """Exactly torch's FutureWarnings for the two collectives DeepSpeed calls, attributed
    as torch attributes them; the same text from elsewhere, or another warning, still shows."""
    import warnings

    def shown(message, module, category=FutureWarning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng.silence_deprecated_collective_warnings()
            warnings.warn_explicit(message, category, "c10d_logger.py", 83, module=module)
        return len(caught)

    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        text = f"`torch.distributed.{name}` is deprecated. Please use `torch.distributed.x` instead."
        assert shown(text, "torch.distributed.c10d_logger") == 0
        assert shown(text, "my_module") == 1
        assert shown(text, "torch.distributed.c10d_logger", DeprecationWarning) == 1
    assert shown("`torch.distributed.all_reduce` is deprecated.", "torch.distributed.c10d_logger") == 1
