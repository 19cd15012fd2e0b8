"""llave_ds.bench.shapes: the real shapes have the published sizes, and the analytic
parameter counts (llave_ds.bench.cost) equal models built on the meta device (no memory,
no download)."""
from __future__ import annotations

import pytest
import torch

from llave_ds.bench import cost, shapes


@pytest.mark.parametrize("name, d, layers, heads, kv, ffn, vocab, tied", [
    ("llava-ov-0.5b", 896, 24, 14, 2, 4864, 151936, True),
    ("aquila-vl-2b", 1536, 28, 12, 2, 8960, 151936, True),
    ("llava-ov-7b", 3584, 28, 28, 4, 18944, 152064, False),
])
def test_real_shapes_have_the_published_sizes(name, d, layers, heads, kv, ffn, vocab, tied):
    cfg = shapes.shape_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size) == (d, layers, heads, kv, ffn, vocab)
    assert bool(cfg.tie_word_embeddings) is tied
    # SigLIP so400m/14-384 as LLaVA-OV runs it (27 layers, the last one dropped: 26).
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.image_size, v.patch_size,
            v.num_hidden_layers, v.vision_use_head) == (1152, 4304, 16, 384, 14, 26, False)
    assert cfg.image_grid_pinpoints[0] == [384, 384] and cfg.image_grid_pinpoints[-1] == [2304, 2304]
    assert shapes.resolve_shape({"llava-ov-0.5b": "0.5b", "aquila-vl-2b": "2b",
                                 "llava-ov-7b": "7b"}[name]).name == name


def test_unknown_shape_and_bad_layer_counts_are_refused():
    with pytest.raises(ValueError, match="unknown shape '13b'"):
        shapes.resolve_shape("13b")
    with pytest.raises(ValueError, match="layer counts must be >= 1"):
        shapes.shape_config("tiny", llm_layers=0)


@pytest.mark.parametrize("name, kw", [("tiny", {}), ("tiny", dict(llm_layers=3, vision_layers=1)),
                                      ("0.5b", {}), ("2b", {}), ("7b", {}),
                                      ("2b", dict(llm_layers=2, vision_layers=1))])
def test_param_counts_equal_a_meta_model(name, kw):
    from transformers import LlavaOnevisionForConditionalGeneration

    cfg = shapes.shape_config(name, **kw)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(cfg)
    counts = cost.param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision_tower"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    if kw:
        assert cfg.text_config.num_hidden_layers == kw["llm_layers"]
        assert cfg.vision_config.num_hidden_layers == kw["vision_layers"]


def test_trainable_count_matches_the_embedding_models_freezing():
    from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config, trainable_parameters

    cfg = shapes.shape_config("tiny")
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="llava_onevision", dtype="float32"))
    assert cost.param_counts(cfg)["trainable"] == sum(p.numel() for p in trainable_parameters(model))
