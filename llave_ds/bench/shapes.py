"""Real architecture shapes as transformers configs.

The benchmark (``llave_ds.bench``) builds models of these shapes with random weights, so
no checkpoint is needed. Every shape is the LLaVA-OneVision architecture: a SigLIP
so400m/14-384 vision tower, a 2-layer GELU MLP projector plus the ``image_newline``
vector, and a Qwen2 language model; ``anyres_max_9`` tiling over 384-px tiles.

| shape | LLM | vision | source |
|---|---|---|---|
| ``llava-ov-0.5b`` | Qwen2-0.5B: d 896, 24 layers, 14 heads, 2 kv, ffn 4864, vocab 151936, tied | SigLIP so400m | llava-hf/llava-onevision-qwen2-0.5b-ov-hf |
| ``aquila-vl-2b`` | Qwen2.5-1.5B: d 1536, 28 layers, 12 heads, 2 kv, ffn 8960, vocab 151936, tied | SigLIP so400m | BAAI/Aquila-VL-2B-llava-qwen (LLaVA-OV architecture) |
| ``llava-ov-7b`` | Qwen2-7B: d 3584, 28 layers, 28 heads, 4 kv, ffn 18944, vocab 152064, untied | SigLIP so400m | lmms-lab/llava-onevision-qwen2-7b-ov |
| ``tiny`` | ``llave_ds.toy.tiny.tiny_config("llava_onevision")`` | toy | for CPU runs and CI |

SigLIP so400m/14-384 has 27 encoder layers (hidden 1152, MLP 4304, 16 heads). LLaVA-OV reads
the *penultimate* layer's output, so the transformers-format checkpoints (the converter in
``transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py``) keep
only **26** layers and select the last one. That is what runs, so 26 is the default here
(``vision_layers=27`` gives the full so400m tower). The original LLaVA-NeXT checkpoints
have the vocabulary sizes above; the llava-hf conversions add ``<image>``/``<video>``/pad
and round the embedding up to a multiple of 64 (e.g. 152000 for 0.5B), a 0.04 % change
that does not matter for cost.

Qwen3-VL shapes (``model_type`` qwen3_vl): a ViT on 16-px patches with a learned 48x48
position grid, a main merger plus one DeepStack merger per tap, and a Qwen3 LM (q/k RMS norms,
head_dim 128); images of dynamic resolution (see ``llave_ds.bench.inputs``), bounded here by
the training configs' ``processing`` section: 4..1280 image tokens (configs/qwen3vl_*.yaml).

| shape | LLM | vision | source |
|---|---|---|---|
| ``qwen3-vl-2b`` | d 2048, 28 layers, 16 heads, 8 kv, head 128, ffn 6144, vocab 151936, tied | depth 24, d 1024, MLP 4096, 16 heads, taps 5/11/17 | Qwen/Qwen3-VL-2B-Instruct (see ``source``) |
| ``qwen3-vl-8b`` | d 4096, 36 layers, 32 heads, 8 kv, head 128, ffn 12288, vocab 151936, untied | depth 27, d 1152, MLP 4304, 16 heads, taps 8/16/24 | Qwen/Qwen3-VL-8B-Instruct (see ``source``) |
| ``qwen3-tiny`` | ``llave_ds.toy.tiny.tiny_config("qwen3_vl")`` | toy | for CPU runs and CI |

``vision_layers`` below a DeepStack tap drops that tap (and its merger), and a tap needs a
decoder layer to feed (tap k feeds decoder layer k), so ``llm_layers`` below the number of taps
drops the last ones: transformers would compute their features and use none, leaving their
mergers without a gradient. ``dropped_deepstack_taps`` says which were dropped; the benchmark
logs it and records ``deepstack_taps`` in its JSON.

The cost of a shape (parameter counts, FLOPs, activation bytes) is ``llave_ds.training.cost``;
tests/bench/test_shapes.py checks the published sizes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from transformers import LlavaOnevisionConfig, Qwen3VLConfig

from llave_ds.toy.tiny import TINY_QWEN3_MAX_PIXELS, TINY_QWEN3_MIN_PIXELS, tiny_config

logger = logging.getLogger(__name__)

# LLaVA-OV / Qwen2 token ids (the LLaVA-NeXT checkpoints and their llava-hf conversions).
QWEN_ENDOFTEXT_ID = 151643          # also the pad token
LLAVA_IMAGE_TOKEN_ID = 151646
LLAVA_VIDEO_TOKEN_ID = 151647

# anyres pinpoints of every LLaVA-OV checkpoint: 384..2304 px in steps of 384, both sides.
LLAVA_OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

SIGLIP_SO400M_384 = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
    num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
    vision_use_head=False,  # LLaVA-OV has no pooling head (and SigLIP's breaks ZeRO-3)
    hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)

_QWEN_COMMON = dict(
    model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768,
    rope_theta=1000000.0, use_sliding_window=False, bos_token_id=QWEN_ENDOFTEXT_ID,
    eos_token_id=151645, pad_token_id=QWEN_ENDOFTEXT_ID,
)


# Qwen3-VL token ids (Qwen3VLConfig's defaults, as in the released config.json files).
QWEN3VL_IMAGE_TOKEN_ID = 151655
QWEN3VL_VIDEO_TOKEN_ID = 151656
QWEN3VL_VISION_START_ID = 151652
QWEN3VL_VISION_END_ID = 151653
# Image bounds in image tokens (32x32 px each): configs/qwen3vl_*.yaml `processing`
# (min_image_tokens 4, max_image_tokens 1280); the released processors' own are 64..16384.
QWEN3VL_IMAGE_TOKENS = (4, 1280)
QWEN3VL_PX_PER_TOKEN = 32

_QWEN3_TEXT = dict(
    model_type="qwen3_vl_text", hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=262144,
    head_dim=128, attention_bias=False, vocab_size=151936, bos_token_id=QWEN_ENDOFTEXT_ID, eos_token_id=151645,
    pad_token_id=QWEN_ENDOFTEXT_ID,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
_QWEN3_VISION = dict(
    model_type="qwen3_vl_vision", hidden_act="gelu_pytorch_tanh", num_heads=16, in_channels=3, patch_size=16,
    temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
)


@dataclass(frozen=True)
class Shape:
    name: str
    description: str
    text: dict = field(default_factory=dict)     # Qwen2 / Qwen3-VL text config kwargs
    vision: dict = field(default_factory=dict)   # SigLIP / Qwen3-VL vision config kwargs
    tie_word_embeddings: bool = True
    source: str = ""
    arch: str = "llava_onevision"                # or "qwen3_vl"
    # Qwen3-VL: the processor's pixel bounds (min, max) the inputs are resized into
    image_pixels: tuple[int, int] = (0, 0)

    @property
    def flattened(self) -> bool:
        return self.arch == "qwen3_vl"


SHAPES: dict[str, Shape] = {
    "tiny": Shape("tiny", "llave_ds.toy.tiny toy LLaVA-OV (2+2 layers, ~150K parameters): CPU and CI",
                  source="llave_ds.toy.tiny.tiny_config('llava_onevision')"),
    "llava-ov-0.5b": Shape(
        "llava-ov-0.5b", "LLaVA-OneVision-Qwen2-0.5B (LLaVE-0.5B's backbone)",
        text=dict(_QWEN_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                  tie_word_embeddings=True),
        vision=dict(SIGLIP_SO400M_384), tie_word_embeddings=True,
        source="Qwen/Qwen2-0.5B config.json; llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
    "aquila-vl-2b": Shape(
        "aquila-vl-2b", "Aquila-VL-2B: LLaVA-OV architecture with Qwen2.5-1.5B (LLaVE-2B's backbone)",
        text=dict(_QWEN_COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                  tie_word_embeddings=True),
        vision=dict(SIGLIP_SO400M_384), tie_word_embeddings=True,
        source="Qwen/Qwen2.5-1.5B config.json; BAAI/Aquila-VL-2B-llava-qwen"),
    "llava-ov-7b": Shape(
        "llava-ov-7b", "LLaVA-OneVision-Qwen2-7B (LLaVE-7B's backbone)",
        text=dict(_QWEN_COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                  tie_word_embeddings=False),
        vision=dict(SIGLIP_SO400M_384), tie_word_embeddings=False,
        source="lmms-lab/llava-onevision-qwen2-7b-ov config.json (Qwen2-7B)"),
}
_Q3_PIXELS = tuple(n * QWEN3VL_PX_PER_TOKEN ** 2 for n in QWEN3VL_IMAGE_TOKENS)
SHAPES.update({
    "qwen3-tiny": Shape("qwen3-tiny", "llave_ds.toy.tiny toy Qwen3-VL (3 vision blocks, 2 DeepStack taps, 3 "
                        "decoder layers): CPU and CI", source="llave_ds.toy.tiny.tiny_config('qwen3_vl')",
                        arch="qwen3_vl", image_pixels=(TINY_QWEN3_MIN_PIXELS, TINY_QWEN3_MAX_PIXELS)),
    "qwen3-vl-2b": Shape(
        "qwen3-vl-2b", "Qwen3-VL-2B (configs/qwen3vl_2b.yaml: Qwen3-VL-Embedding-2B / Qwen3-VL-2B-Instruct)",
        text=dict(_QWEN3_TEXT, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
        vision=dict(_QWEN3_VISION, depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                    deepstack_visual_indexes=[5, 11, 17]),
        tie_word_embeddings=True, arch="qwen3_vl", image_pixels=_Q3_PIXELS,
        source="Qwen/Qwen3-VL-2B-Instruct config.json (not readable offline). Checked in public third-party "
               "text: LM d 2048, 28 layers, 16/8 heads, head_dim 128, vocab 151936, rope 5e6; vision d 1024, "
               "24 blocks, 16 heads, patch 16, MLP 4x1024, 2304 positions, merger 4096->2048, 3 DeepStack "
               "mergers; ffn 6144, taps [5, 11, 17], tied embeddings: the Qwen3-VL-Embedding-2B config.json "
               "printed in xorbitsai/inference#4592."),
    "qwen3-vl-8b": Shape(
        "qwen3-vl-8b", "Qwen3-VL-8B (configs/qwen3vl_8b.yaml: Qwen3-VL-Embedding-8B / Qwen3-VL-8B-Instruct)",
        text=dict(_QWEN3_TEXT, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
        vision=dict(_QWEN3_VISION, depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                    deepstack_visual_indexes=[8, 16, 24]),
        tie_word_embeddings=False, arch="qwen3_vl", image_pixels=_Q3_PIXELS,
        source="Qwen/Qwen3-VL-8B-Instruct config.json (not readable offline). Checked in a public fine-tune's "
               "config.json (Qwen3VLForConditionalGeneration, transformers 4.57): LM d 4096, ffn 12288, 36 "
               "layers, 32/8 heads, head_dim 128, vocab 151936, untied, taps [8, 16, 24]; vision depth 27, d "
               "1152, MLP 4304, 16 heads, patch 16, 2304 positions: transformers' Qwen3VLVisionConfig defaults "
               "and other Qwen3-VL config.json files (not the 8B's own)."),
})
ALIASES = {"0.5b": "llava-ov-0.5b", "2b": "aquila-vl-2b", "7b": "llava-ov-7b"}


def shape_names() -> list[str]:
    return list(SHAPES) + list(ALIASES)


def resolve_shape(name: str) -> Shape:
    key = ALIASES.get(name, name)
    if key not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(shape_names())}")
    return SHAPES[key]


def _check_layers(llm_layers: Optional[int], vision_layers: Optional[int]) -> None:
    for value in (llm_layers, vision_layers):
        if value is not None and value < 1:
            raise ValueError(f"layer counts must be >= 1, got {value}")


def dropped_deepstack_taps(name: str, llm_layers: Optional[int] = None,
                           vision_layers: Optional[int] = None) -> list[int]:
    """The DeepStack taps (vision block indexes) of a Qwen3-VL shape that ``llm_layers`` /
    ``vision_layers`` drop: taps at or beyond the vision depth, and taps past the first
    ``llm_layers`` (tap k feeds decoder layer k). Empty for LLaVA-OV shapes."""
    shape = resolve_shape(name)
    if not shape.flattened:
        return []
    base = _qwen3vl_base(shape)
    taps = list(base["vision_config"]["deepstack_visual_indexes"])
    depth = vision_layers if vision_layers is not None else base["vision_config"]["depth"]
    kept = _kept_taps(taps, depth, llm_layers if llm_layers is not None else base["text_config"]["num_hidden_layers"])
    return [t for t in taps if t not in kept]


def _kept_taps(taps: list[int], depth: int, llm_layers: int) -> list[int]:
    return [t for t in taps if t < depth][:llm_layers]


def _qwen3vl_base(shape: Shape) -> dict:
    if shape.name == "qwen3-tiny":
        data = tiny_config("qwen3_vl").to_dict()
    else:
        data = dict(
            vision_config=dict(shape.vision), text_config=dict(shape.text),
            image_token_id=QWEN3VL_IMAGE_TOKEN_ID, video_token_id=QWEN3VL_VIDEO_TOKEN_ID,
            vision_start_token_id=QWEN3VL_VISION_START_ID, vision_end_token_id=QWEN3VL_VISION_END_ID,
            tie_word_embeddings=shape.tie_word_embeddings,
        )
    data.pop("transformers_version", None)
    return data


def _qwen3vl_config(shape: Shape, llm_layers: Optional[int], vision_layers: Optional[int]):
    data = _qwen3vl_base(shape)
    text, vision = dict(data["text_config"]), dict(data["vision_config"])
    if llm_layers is not None:
        text["num_hidden_layers"] = int(llm_layers)
        text.pop("layer_types", None)
    if vision_layers is not None:
        vision["depth"] = int(vision_layers)
    taps = list(vision["deepstack_visual_indexes"])
    vision["deepstack_visual_indexes"] = _kept_taps(taps, vision["depth"], text["num_hidden_layers"])
    dropped = dropped_deepstack_taps(shape.name, llm_layers, vision_layers)
    if dropped:
        logger.warning("%s with %s vision blocks and %s decoder layers: DeepStack taps %s dropped (kept %s)",
                       shape.name, vision["depth"], text["num_hidden_layers"], dropped,
                       vision["deepstack_visual_indexes"])
    data.update(text_config=text, vision_config=vision)
    return Qwen3VLConfig.from_dict(data)


def shape_config(name: str, llm_layers: Optional[int] = None, vision_layers: Optional[int] = None):
    """The ``LlavaOnevisionConfig`` (or ``Qwen3VLConfig``) of a shape, optionally with fewer
    (or more) layers.

    ``llm_layers`` / ``vision_layers`` replace the LM / vision layer counts: the
    reduced-layer shapes keep every width of the real model, so per-layer costs,
    activation sizes and the vocabulary are real while a step fits a CPU. Qwen3-VL: taps
    the new depths cannot serve are dropped (``dropped_deepstack_taps``, logged).
    """
    shape = resolve_shape(name)
    _check_layers(llm_layers, vision_layers)
    if shape.flattened:
        return _qwen3vl_config(shape, llm_layers, vision_layers)
    if shape.name == "tiny":
        data = tiny_config("llava_onevision").to_dict()
    else:
        data = dict(
            vision_config=dict(shape.vision), text_config=dict(shape.text),
            image_token_index=LLAVA_IMAGE_TOKEN_ID, video_token_index=LLAVA_VIDEO_TOKEN_ID,
            image_grid_pinpoints=[list(p) for p in LLAVA_OV_PINPOINTS],
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu",
            multimodal_projector_bias=True, tie_word_embeddings=shape.tie_word_embeddings,
        )
    for key, value in (("text_config", llm_layers), ("vision_config", vision_layers)):
        if value is not None:
            if value < 1:
                raise ValueError(f"layer counts must be >= 1, got {value}")
            data[key] = dict(data[key], num_hidden_layers=int(value))
            data[key].pop("layer_types", None)  # Qwen2 derives it from num_hidden_layers
    data.pop("transformers_version", None)
    return LlavaOnevisionConfig.from_dict(data)


__all__ = [
    "SHAPES", "ALIASES", "Shape", "shape_names", "resolve_shape", "shape_config", "dropped_deepstack_taps",
    "LLAVA_OV_PINPOINTS", "LLAVA_IMAGE_TOKEN_ID", "LLAVA_VIDEO_TOKEN_ID", "QWEN_ENDOFTEXT_ID",
    "QWEN3VL_IMAGE_TOKEN_ID", "QWEN3VL_VISION_START_ID", "QWEN3VL_VISION_END_ID", "QWEN3VL_IMAGE_TOKENS",
]
