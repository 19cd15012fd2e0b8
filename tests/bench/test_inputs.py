"""llave_ds.bench.inputs: the synthesised inputs have exactly the token counts and tensor
shapes the InputFormatter produces, and the model accepts them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llave_ds.bench import inputs, shapes
from llave_ds.bench.cost import SideShape as Side
from llave_ds.bench.inputs import build_chunk, geometry_for, image_tiles_and_tokens, make_sides
from llave_ds.media.side import Side as _Side


@pytest.mark.parametrize("hw", [(28, 28), (56, 56), (40, 70)])
def test_synthesised_chunks_match_the_input_formatter(hw):
    from PIL import Image

    from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config
    from llave_ds.model.formatter import InputFormatter
    from llave_ds.toy.tiny import build_tiny_processor

    cfg = shapes.shape_config("tiny")
    geo = geometry_for(cfg, hw)
    fmt = InputFormatter(build_tiny_processor("llava_onevision"), "llava_onevision", max_length=512)
    image = Image.new("RGB", (hw[1], hw[0]), (120, 30, 200))
    real = fmt([_Side("<|image_1|> what is it?", image), _Side("describe", image)], "query")
    assert (real["input_ids"] == geo.image_token_id).sum(1).tolist() == [geo.tokens_per_image] * 2
    gen = torch.Generator().manual_seed(1)
    sides = [Side(7, True), Side(3, True)]
    synth = build_chunk(sides, geo, gen)
    assert synth["pixel_values"].shape == real["pixel_values"].shape
    assert synth["image_sizes"].tolist() == real["image_sizes"].tolist()
    assert (synth["input_ids"] == geo.image_token_id).sum(1).tolist() == [geo.tokens_per_image] * 2
    assert synth["attention_mask"].sum(1).tolist() == [s.length(geo) for s in sides]
    assert not bool(synth["dummy_image"])
    # text-only chunk: the formatter's blank dummy image, same tensor shapes
    real_t = fmt([_Side("a caption")], "target")
    synth_t = build_chunk([Side(5, False)], geo, gen)
    assert synth_t["pixel_values"].shape == real_t["pixel_values"].shape
    assert synth_t["image_sizes"].tolist() == real_t["image_sizes"].tolist()
    assert bool(synth_t["dummy_image"]) and bool(real_t["dummy_image"])
    assert int((synth_t["input_ids"] == geo.image_token_id).sum()) == 0
    # and the model's own feature count agrees (it raises on a mismatch)
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="llava_onevision", dtype="float32"))
    with torch.no_grad():
        assert model(**synth).shape == (2, cfg.text_config.hidden_size)
        assert model(**synth_t).shape == (1, cfg.text_config.hidden_size)


def test_real_shape_image_geometry():
    cfg = shapes.shape_config("2b")
    # docs/MODELS.md's table of LLaVA-OV <image> tokens
    assert image_tiles_and_tokens(cfg, 384, 384) == (2, 1485)
    assert image_tiles_and_tokens(cfg, 480, 640)[1] == 2929
    geo = geometry_for(cfg, None)
    assert (geo.tiles_per_image, geo.tokens_per_image, geo.dummy_tiles) == (2, 1485, 2)
    assert geo.id_high == shapes.QWEN_ENDOFTEXT_ID  # text ids stay below the special tokens
    side = Side(80, True)
    assert side.length(geo) == 14 + 1485 + 1 + 80 + 5


def test_sides_spread_images_evenly():
    gen = torch.Generator().manual_seed(0)
    sides = make_sides(8, 0.5, (40, 120), gen)
    assert sum(s.has_image for s in sides) == 4
    assert all(40 <= s.text_tokens <= 120 for s in sides)
    assert all(s.has_image for s in make_sides(5, 1.0, (1, 2), gen))
    assert not any(s.has_image for s in make_sides(5, 0.0, (1, 2), gen))


def test_workload_is_per_rank_and_counts_a_trained_tower():
    args = SimpleNamespace(shape="tiny", llm_layers=None, vision_layers=None, train_vision_tower=False,
                           image_size=None, seed=3, pairs_per_rank=6, query_image_fraction=0.5,
                           target_image_fraction=0.0, query_text_tokens=(10, 40), target_text_tokens=(5, 9))
    w0, w0_again, w1 = inputs.build_workload(args, 0), inputs.build_workload(args, 0), inputs.build_workload(args, 1)
    assert len(w0.sides_q) == len(w0.sides_t) == 6
    assert sum(s.has_image for s in w0.sides_q) == 3 and not any(s.has_image for s in w0.sides_t)
    assert all(5 <= s.text_tokens <= 9 for s in w0.sides_t)
    assert w0.sides_q == w0_again.sides_q and w0.sides_q != w1.sides_q   # seeded per rank
    trained = inputs.build_workload(SimpleNamespace(**dict(vars(args), train_vision_tower=True)), 0)
    assert trained.counts["trainable"] == w0.counts["trainable"] + w0.counts["vision_tower"]
    assert inputs.describe(args, w0.geo)["template_tokens"] == 19
