"""llave_ds.bench.inputs: the synthesised inputs have exactly the token counts and tensor
shapes the InputFormatter produces (LLaVA-OV and Qwen3-VL), and the model accepts them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llave_ds.bench import inputs, shapes
from llave_ds.bench.inputs import build_chunk, geometry_for, image_tiles_and_tokens, make_sides
from llave_ds.media.side import Side as _Side
from llave_ds.training.cost import TEMPLATE_HEAD_TOKENS, TEMPLATE_TAIL_TOKENS
from llave_ds.training.cost import SideShape as Side


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


# ---------------------------------------------------------------------------- Qwen3-VL

@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (40, 70), (200, 90)])
def test_synthesised_qwen3vl_chunks_match_the_input_formatter(hw):
    from PIL import Image

    from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config
    from llave_ds.model.formatter import InputFormatter
    from llave_ds.toy.tiny import build_tiny_processor

    cfg = shapes.shape_config("qwen3-tiny")
    geo = geometry_for(cfg, hw, "qwen3-tiny")
    fmt = InputFormatter(build_tiny_processor("qwen3_vl"), "qwen3_vl", max_length=512)
    image = Image.new("RGB", (hw[1], hw[0]), (120, 30, 200))
    # the image before the text, as the bench lays it out: "describe" has no placeholder
    real = fmt([_Side("describe", image), _Side("what is it?", image)], "query")
    gen = torch.Generator().manual_seed(1)
    sides = [Side(7, True), Side(3, True)]
    synth = build_chunk(sides, geo, gen)
    assert set(synth) == set(real) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "dummy_image"}
    assert synth["pixel_values"].shape == real["pixel_values"].shape
    assert synth["image_grid_thw"].tolist() == real["image_grid_thw"].tolist()
    assert tuple(geo.image_hw) == tuple(16 * x for x in real["image_grid_thw"][0].tolist()[1:])
    for ids in (real["input_ids"], synth["input_ids"]):
        assert (ids == geo.image_token_id).sum(1).tolist() == [geo.tokens_per_image] * 2
        assert (ids == geo.vision_start_id).sum(1).tolist() == (ids == geo.vision_end_id).sum(1).tolist() == [1, 1]
    # the same layout around the image: start, the tokens, end, then "\n" before the text (the
    # tiny tokenizer is byte-level, so only the layout is compared, not the template's length)
    # closing "<|im_end|>\n<|im_start|>assistant\n": 13 byte-level tokens here, 5 in Qwen's BPE
    for ids, mask, text_len, closing in ((real["input_ids"][0], real["attention_mask"][0], len("describe"), 13),
                                         (synth["input_ids"][0], synth["attention_mask"][0], sides[0].text_tokens,
                                          TEMPLATE_TAIL_TOKENS)):
        row = ids[mask.bool()].tolist()
        start = row.index(geo.vision_start_id)
        end = start + 1 + geo.tokens_per_image
        assert row[start + 1:end] == [geo.image_token_id] * geo.tokens_per_image and row[end] == geo.vision_end_id
        assert len(row) - end - 1 - 1 - text_len == closing   # after "\n" and the text
    assert real["input_ids"][0][real["input_ids"][0].tolist().index(geo.vision_end_id) + 1] == ord("\n")
    assert synth["input_ids"][0].tolist().index(geo.vision_start_id) == TEMPLATE_HEAD_TOKENS
    assert synth["attention_mask"].sum(1).tolist() == [s.length(geo) for s in sides]
    assert not bool(synth["dummy_image"])
    # text-only chunk: the formatter's blank dummy image, same tensor shapes, no vision tokens
    real_t = fmt([_Side("a caption")], "target")
    synth_t = build_chunk([Side(5, False)], geo, gen)
    assert synth_t["pixel_values"].shape == real_t["pixel_values"].shape == (geo.dummy_patches, 1536)
    assert synth_t["image_grid_thw"].tolist() == real_t["image_grid_thw"].tolist() == [list(geo.dummy_grid_thw)]
    assert bool(synth_t["dummy_image"]) and bool(real_t["dummy_image"])
    assert int((synth_t["input_ids"] >= geo.id_high).sum()) == 0
    # and the model accepts them (it raises on a token / feature mismatch)
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="qwen3_vl", dtype="float32"))
    with torch.no_grad():
        assert model(**synth).shape == (2, cfg.text_config.hidden_size)
        assert model(**synth_t).shape == (1, cfg.text_config.hidden_size)


def test_real_qwen3vl_image_geometry():
    cfg = shapes.shape_config("qwen3-vl-2b")
    # resized to multiples of 32 px within 4..1280 tokens (configs/qwen3vl_*.yaml)
    geo = geometry_for(cfg, (1024, 1280), "qwen3-vl-2b")   # exactly the 1280-token cap
    assert (geo.image_hw, geo.patches_per_image, geo.tokens_per_image, geo.grid_thw) == ((1024, 1280), 5120, 1280,
                                                                                          (1, 64, 80))
    big = geometry_for(cfg, (1152, 1152), "qwen3-vl-2b")   # 36 x 36 = 1296 tokens: over the cap, scaled down
    assert (big.image_hw, big.tokens_per_image) == ((1120, 1120), 1225)
    small = geometry_for(cfg, (20, 20), "qwen3-vl-2b")     # under 4 tokens: scaled up
    assert (small.image_hw, small.tokens_per_image) == ((64, 64), 4)
    # the dummy: a blank 32x32 image scaled up to the 4-token minimum (16 patches)
    assert (geo.dummy_patches, geo.dummy_grid_thw, geo.patch_dim) == (16, (1, 4, 4), 3 * 2 * 16 * 16)
    assert geo.id_high == shapes.QWEN_ENDOFTEXT_ID and geo.image_token_id == shapes.QWEN3VL_IMAGE_TOKEN_ID
    # 14 template + <|vision_start|> + 1280 + <|vision_end|> + "\n" + 80 text + 5 closing
    assert Side(80, True).length(geo) == 14 + 1 + 1280 + 1 + 1 + 80 + 5
    assert Side(80, False).length(geo) == 14 + 80 + 5
    tiny = geometry_for(shapes.shape_config("qwen3-tiny"), None, "qwen3-tiny")   # 384 px into the tiny's 64 px cap
    assert (tiny.image_hw, tiny.tokens_per_image, tiny.dummy_patches) == ((64, 64), 4, 4)


def test_token_budget_chunks_of_the_bench_are_trainings():
    """``chunked(..., chunk_tokens=)`` groups the synthetic sides as training's collator would
    (``token_budget_chunks`` on their lengths): longest first, within the budget and the row cap."""
    from llave_ds.bench.inputs import chunked
    from llave_ds.data.batching import token_budget_chunks

    geo = geometry_for(shapes.shape_config("tiny"), (28, 28), "tiny")
    sides = [Side(n, has_image=n % 3 == 0) for n in (5, 40, 12, 30, 3, 21, 8, 60)]
    lengths = [s.length(geo) for s in sides]
    lists = chunked(sides, 4, geo, chunk_tokens=150)
    groups, _ = token_budget_chunks(lengths, 150, 4)
    assert lists == [[sides[i] for i in g] for g in groups]
    assert sorted(id(s) for c in lists for s in c) == sorted(id(s) for s in sides)
    for c in lists:
        widths = [s.length(geo) for s in c]
        assert widths == sorted(widths, reverse=True) and len(c) <= 4
        assert len(c) == 1 or len(c) * widths[0] <= 150
    assert chunked(sides, 3) == [sides[0:3], sides[3:6], sides[6:8]]

