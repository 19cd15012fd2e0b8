"""The benchmark's inputs: the tensors the processor would produce for MMEB-like pairs.

No tokenizer or image file is needed. Each side is the Qwen chat prompt that
``llave_ds.model.formatter.InputFormatter`` builds: 14 template tokens in front
(``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n`` in
Qwen's BPE), then for a side with an image the ``<image>`` tokens and ``\\n``, then the text,
then 5 closing tokens (``<|im_end|>\\n<|im_start|>assistant\\n``). Text tokens are random
ids, their count drawn uniformly from a range. The image token count and the tile tensor
shape come from transformers' own LLaVA-OV processor classes (``geometry_for``); pixel
values are random. A chunk without any image carries the blank dummy image, exactly as the
formatter does (tests/bench/test_inputs.py checks the synthesis against the formatter on
the tiny model).

Qwen3-VL shapes: an image side is ``<|vision_start|>`` + ``<|image_pad|>`` x n +
``<|vision_end|>`` + ``\n`` before the text; the image is resized by transformers' Qwen2-VL
image processor (what Qwen3-VL checkpoints ship; ``smart_resize`` to multiples of 32 px within
the shape's pixel bounds), giving (H/16)(W/16) flattened patches of 3*2*16*16 values and
(H/32)(W/32) tokens; ``pixel_values`` [patches of all images, 1536] and ``image_grid_thw``
[images, 3]. A text-only chunk carries the formatter's blank 32x32 image resized to the lower
bound (1 token for ``qwen3-tiny``, 4 for the real shapes' ``min_image_tokens`` 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from PIL import Image
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from llave_ds.bench import shapes
from llave_ds.data.batching import token_budget_chunks
from llave_ds.model.processors import LlavaOnevisionImageTextProcessor
from llave_ds.toy.tiny import build_tiny_tokenizer
from llave_ds.training import cost
from llave_ds.training.cost import TEMPLATE_HEAD_TOKENS, TEMPLATE_TAIL_TOKENS, Geometry, SideShape


def _llava_processor(config):
    """transformers' LLaVA-OV image processor + processor for ``config``'s tiling, with the
    byte-level tokenizer of llave_ds.toy.tiny (only its ``<image>`` token is used here)."""
    size = int(config.vision_config.image_size)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints)
    return LlavaOnevisionImageTextProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(),
        num_image_tokens=cost.patches_per_tile(config),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio)


def image_tiles_and_tokens(config, height: int, width: int, processor=None) -> tuple[int, int]:
    """(tiles the vision tower runs, ``<image>`` tokens in the text) for one image, from
    the same transformers code the InputFormatter uses."""
    processor = processor or _llava_processor(config)
    out = processor.image_processor([Image.new("RGB", (width, height))], return_tensors="pt")
    inputs = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"], "batch_num_images": [1]}
    tokens = len(processor.replace_image_token(inputs, 0)) // len(processor.image_token)
    return int(out["pixel_values"].shape[1]), int(tokens)


def qwen3vl_image_processor(shape_name: str):
    """transformers' Qwen2-VL image processor (the one Qwen3-VL checkpoints ship) with the
    shape's pixel bounds, 16-px patches, temporal patch 2, merge 2 and Qwen3-VL's 0.5 mean/std."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    lo, hi = shapes.resolve_shape(shape_name).image_pixels
    return Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi, patch_size=16, temporal_patch_size=2,
                                    merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def qwen3vl_image_grid(processor, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of an image of height x width px after the processor's resize."""
    out = processor([Image.new("RGB", (width, height))], return_tensors="pt")
    return tuple(int(x) for x in out["image_grid_thw"][0])


def _qwen3vl_geometry(config, shape_name: str, image_hw: Optional[tuple[int, int]]) -> Geometry:
    processor = qwen3vl_image_processor(shape_name)
    hw = tuple(image_hw) if image_hw else (384, 384)
    grid = qwen3vl_image_grid(processor, hw[0], hw[1])
    side = processor.patch_size * processor.merge_size  # InputFormatter's blank dummy image
    dummy = qwen3vl_image_grid(processor, side, side)
    patch, merge = processor.patch_size, processor.merge_size
    specials = [int(config.image_token_id), int(config.video_token_id), int(config.vision_start_token_id),
                int(config.vision_end_token_id)]
    pad = config.text_config.pad_token_id
    # Qwen: every id from <|endoftext|> (the pad token) up is a special token
    id_high = min([int(config.text_config.vocab_size)] + specials + ([int(pad)] if pad is not None else []))
    n = grid[0] * grid[1] * grid[2]
    return Geometry(image_hw=(grid[1] * patch, grid[2] * patch), tiles_per_image=1, tokens_per_image=n // merge ** 2,
                    dummy_tiles=1, tile_px=0, id_high=id_high, image_token_id=int(config.image_token_id),
                    pad_token_id=int(pad) if pad is not None else 0, image_extra_tokens=3, patches_per_image=n,
                    dummy_patches=dummy[0] * dummy[1] * dummy[2], grid_thw=grid, dummy_grid_thw=dummy,
                    patch_dim=3 * processor.temporal_patch_size * patch * patch,
                    vision_start_id=int(config.vision_start_token_id), vision_end_id=int(config.vision_end_token_id))


def geometry_for(config, image_hw: Optional[tuple[int, int]], shape_name: str = "") -> Geometry:
    """The image geometry of ``config`` for images of ``image_hw`` (H, W) px; None: one tile
    (LLaVA-OV) or 384x384 (Qwen3-VL, resized into the bounds of ``shape_name``)."""
    if cost.is_qwen3vl(config):
        return _qwen3vl_geometry(config, shape_name or "qwen3-tiny", image_hw)
    tile = int(config.vision_config.image_size)
    hw = tuple(image_hw) if image_hw else (tile, tile)
    processor = _llava_processor(config)
    tiles, tokens = image_tiles_and_tokens(config, hw[0], hw[1], processor)
    dummy_tiles, _ = image_tiles_and_tokens(config, tile, tile, processor)  # the formatter's blank image
    image_id = int(config.image_token_index)
    specials = [image_id, int(config.video_token_index)]
    vocab = int(config.text_config.vocab_size)
    pad = config.text_config.pad_token_id
    id_high = min([vocab] + specials)
    if pad is not None and int(pad) < id_high and int(pad) > id_high - 8:
        id_high = int(pad)  # Qwen: ids from <|endoftext|> (151643) up are special tokens
    return Geometry(image_hw=hw, tiles_per_image=tiles, tokens_per_image=tokens,
                    dummy_tiles=dummy_tiles, tile_px=tile, id_high=id_high, image_token_id=image_id,
                    pad_token_id=int(pad) if pad is not None else 0)


def make_sides(n: int, image_fraction: float, text_range: tuple[int, int], gen: torch.Generator) -> list[SideShape]:
    """n sides; side i has an image iff floor((i+1)f) > floor(i f) (evenly spread)."""
    lo, hi = text_range
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    frac = min(max(float(image_fraction), 0.0), 1.0)
    return [SideShape(int(t), math.floor((i + 1) * frac + 1e-9) > math.floor(i * frac + 1e-9))
            for i, t in enumerate(lengths)]


def build_chunk(sides: list[SideShape], geo: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The keyword arguments of EmbeddingModel.forward for these sides (right padding)."""
    rows = []
    for side in sides:
        head = torch.randint(0, geo.id_high, (TEMPLATE_HEAD_TOKENS,), generator=gen)
        text = torch.randint(0, geo.id_high, (side.text_tokens,), generator=gen)
        tail = torch.randint(0, geo.id_high, (TEMPLATE_TAIL_TOKENS,), generator=gen)
        parts = [head]
        if side.has_image:
            if geo.flattened:
                parts.append(torch.tensor([geo.vision_start_id]))
            parts.append(torch.full((geo.tokens_per_image,), geo.image_token_id, dtype=torch.long))
            if geo.flattened:
                parts.append(torch.tensor([geo.vision_end_id]))
            parts.append(torch.randint(0, geo.id_high, (1,), generator=gen))  # the "\n"
        parts += [text, tail]
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), geo.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    n_images = sum(s.has_image for s in sides)
    mask = {"input_ids": input_ids, "attention_mask": attention_mask}
    if geo.flattened:
        return {**mask, **_qwen3vl_pixels(n_images, geo, gen), "dummy_image": torch.tensor(n_images == 0)}
    px = geo.tile_px
    if n_images:
        pixel_values = torch.randn(n_images, geo.tiles_per_image, 3, px, px, generator=gen)
        image_sizes = torch.tensor([list(geo.image_hw)] * n_images, dtype=torch.long)
    else:  # InputFormatter's blank dummy image (one base-size image) and no image token
        pixel_values = torch.zeros(1, geo.dummy_tiles, 3, px, px)
        image_sizes = torch.tensor([[px, px]], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": image_sizes, "dummy_image": torch.tensor(n_images == 0)}


def _qwen3vl_pixels(n_images: int, geo: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Flattened patches and their grids: random pixels per image, or the blank dummy image."""
    if n_images:
        return {"pixel_values": torch.randn(n_images * geo.patches_per_image, geo.patch_dim, generator=gen),
                "image_grid_thw": torch.tensor([list(geo.grid_thw)] * n_images, dtype=torch.long)}
    return {"pixel_values": torch.zeros(geo.dummy_patches, geo.patch_dim),
            "image_grid_thw": torch.tensor([list(geo.dummy_grid_thw)], dtype=torch.long)}


def to_device(chunk: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in chunk.items()}


def chunked(sides: list[SideShape], size: int, geo: Optional[Geometry] = None,
            chunk_tokens: Optional[int] = None) -> list[list[SideShape]]:
    """Chunks of ``size`` sides in order, or with ``chunk_tokens`` the token-budget chunks
    training makes (``llave_ds.data.batching.token_budget_chunks``: longest first, at most
    ``size`` rows and ``chunk_tokens`` padded tokens). The bench's pairs are synthetic, so
    its sorted chunks carry no row positions: the step's work is the same."""
    if not chunk_tokens:
        return [sides[i:i + size] for i in range(0, len(sides), size)]
    groups, _ = token_budget_chunks([s.length(geo) for s in sides], chunk_tokens, size)
    return [[sides[i] for i in group] for group in groups]


@dataclass
class Workload:
    """What one rank benchmarks: the model's config and parameter counts, the image
    geometry and the local batch (query and target sides)."""
    config: Any          # LlavaOnevisionConfig or Qwen3VLConfig
    counts: dict         # cost.param_counts (trainable includes the tower when it trains)
    geo: Geometry
    sides_q: list[SideShape]
    sides_t: list[SideShape]


def build_workload(args, rank: int = 0) -> Workload:
    """The workload of the command line ``args`` on ``rank`` (its own random text lengths)."""
    config = shapes.shape_config(args.shape, args.llm_layers, args.vision_layers)
    counts = cost.param_counts(config)
    if args.train_vision_tower:
        counts = dict(counts, trainable=counts["trainable"] + counts["vision_tower"])
    geo = geometry_for(config, args.image_size, args.shape)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    sides_q = make_sides(args.pairs_per_rank, args.query_image_fraction, args.query_text_tokens, gen)
    sides_t = make_sides(args.pairs_per_rank, args.target_image_fraction, args.target_text_tokens, gen)
    return Workload(config, counts, geo, sides_q, sides_t)


def describe(args, geo: Geometry) -> dict:
    """The ``inputs`` entry of the benchmark's JSON."""
    out = {"image_hw": list(geo.image_hw), "tiles_per_image": geo.tiles_per_image,
           "tokens_per_image": geo.tokens_per_image, "dummy_tiles": geo.dummy_tiles}
    if geo.flattened:
        out.update(patches_per_image=geo.patches_per_image, dummy_patches=geo.dummy_patches,
                   grid_thw=list(geo.grid_thw))
    return {**out,
            "query_image_fraction": args.query_image_fraction,
            "target_image_fraction": args.target_image_fraction,
            "query_text_tokens": list(args.query_text_tokens),
            "target_text_tokens": list(args.target_text_tokens),
            "template_tokens": TEMPLATE_HEAD_TOKENS + TEMPLATE_TAIL_TOKENS}
