"""llave_ds.bench.shapes: the real shapes have the published sizes, and the analytic
parameter counts (llave_ds.training.cost) equal models built on the meta device (no memory,
no download); Qwen3-VL's DeepStack taps follow reduced layer counts."""
from __future__ import annotations

import pytest
import torch

from llave_ds.bench import shapes
from llave_ds.training import cost


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


# ---------------------------------------------------------------------------- Qwen3-VL

@pytest.mark.parametrize("name, d, layers, heads, kv, ffn, tied, depth, dv, fv, taps, total", [
    ("qwen3-vl-2b", 2048, 28, 16, 8, 6144, True, 24, 1024, 4096, [5, 11, 17], 2_127_532_032),
    ("qwen3-vl-8b", 4096, 36, 32, 8, 12288, False, 27, 1152, 4304, [8, 16, 24], 8_767_123_696),
])
def test_qwen3vl_shapes_have_the_published_sizes(name, d, layers, heads, kv, ffn, tied, depth, dv, fv, taps, total):
    cfg = shapes.shape_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert cfg.model_type == "qwen3_vl"
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, t.vocab_size) == (d, layers, heads, kv, 128, ffn, 151936)
    assert bool(cfg.tie_word_embeddings) is tied
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size, v.temporal_patch_size,
            v.spatial_merge_size, v.out_hidden_size, v.num_position_embeddings) == \
        (depth, dv, fv, 16, 16, 2, 2, d, 2304)
    assert list(v.deepstack_visual_indexes) == taps
    # "2B" and "8B" (the 8B's 8.8 B is the count its model cards give)
    assert cost.param_counts(cfg)["total"] == total


def test_deepstack_taps_the_layer_counts_cannot_serve_are_dropped_and_said(caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="llave_ds.bench.shapes")
    assert shapes.dropped_deepstack_taps("qwen3-vl-2b") == []
    assert shapes.dropped_deepstack_taps("qwen3-vl-2b", vision_layers=12) == [17]   # taps 5, 11 < 12
    assert shapes.dropped_deepstack_taps("qwen3-vl-2b", llm_layers=2) == [17]       # tap k feeds decoder layer k
    assert shapes.dropped_deepstack_taps("qwen3-vl-8b", llm_layers=1, vision_layers=4) == [8, 16, 24]
    assert shapes.dropped_deepstack_taps("qwen3-tiny", llm_layers=28, vision_layers=24) == []
    assert shapes.dropped_deepstack_taps("2b", vision_layers=1) == []               # LLaVA-OV has no taps
    cfg = shapes.shape_config("qwen3-vl-2b", llm_layers=28, vision_layers=12)
    assert list(cfg.vision_config.deepstack_visual_indexes) == [5, 11]
    assert "DeepStack taps [17] dropped" in caplog.text
    assert list(shapes.shape_config("qwen3-vl-8b", vision_layers=4).vision_config.deepstack_visual_indexes) == []
    with pytest.raises(ValueError, match="layer counts must be >= 1"):
        shapes.shape_config("qwen3-tiny", vision_layers=0)


@pytest.mark.parametrize("name, kw", [("qwen3-tiny", {}), ("qwen3-tiny", dict(llm_layers=28, vision_layers=24)),
                                      ("qwen3-vl-2b", {}), ("qwen3-vl-8b", {}),
                                      ("qwen3-vl-2b", dict(llm_layers=2, vision_layers=12)),
                                      ("qwen3-vl-8b", dict(llm_layers=1, vision_layers=9))])
def test_qwen3vl_param_counts_equal_a_meta_model(name, kw):
    from transformers import Qwen3VLForConditionalGeneration

    from llave_ds.model.embedding import vision_modules

    cfg = shapes.shape_config(name, **kw)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    counts = cost.param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    tower, projector = vision_modules(model, "qwen3_vl")  # what the embedding model freezes / trains
    assert counts["vision_tower"] == sum(p.numel() for m in tower for p in m.parameters())
    assert counts["projector"] == sum(p.numel() for m in projector for p in m.parameters())
    assert counts["deepstack_mergers"] == sum(p.numel() for p in model.model.visual.deepstack_merger_list.parameters())
    assert counts["llm_layers"] + counts["llm_embedding"] == sum(
        p.numel() for p in model.model.language_model.parameters())
    if kw:
        assert (cfg.text_config.num_hidden_layers, cfg.vision_config.depth) == (kw["llm_layers"], kw["vision_layers"])


def test_qwen3vl_trainable_count_matches_the_embedding_models_freezing():
    from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config, trainable_parameters

    cfg = shapes.shape_config("qwen3-tiny")
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="qwen3_vl", dtype="float32"))
    assert cost.param_counts(cfg)["trainable"] == sum(p.numel() for p in trainable_parameters(model))
