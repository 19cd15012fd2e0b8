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

The cost of a shape (parameter counts, FLOPs, activation bytes) is ``llave_ds.bench.cost``;
tests/bench/test_shapes.py checks the published sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import LlavaOnevisionConfig

from llave_ds.toy.tiny import tiny_config

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


@dataclass(frozen=True)
class Shape:
    name: str
    description: str
    text: dict = field(default_factory=dict)     # Qwen2 config kwargs
    vision: dict = field(default_factory=dict)   # SigLIP vision config kwargs
    tie_word_embeddings: bool = True
    source: str = ""


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
ALIASES = {"0.5b": "llava-ov-0.5b", "2b": "aquila-vl-2b", "7b": "llava-ov-7b"}


def shape_names() -> list[str]:
    return list(SHAPES) + list(ALIASES)


def resolve_shape(name: str) -> Shape:
    key = ALIASES.get(name, name)
    if key not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(shape_names())}")
    return SHAPES[key]


def shape_config(name: str, llm_layers: Optional[int] = None, vision_layers: Optional[int] = None):
    """The ``LlavaOnevisionConfig`` of a shape, optionally with fewer (or more) layers.

    ``llm_layers`` / ``vision_layers`` replace the Qwen2 / SigLIP layer counts: the
    reduced-layer shapes keep every width of the real model, so per-layer costs,
    activation sizes and the vocabulary are real while a step fits a CPU.
    """
    shape = resolve_shape(name)
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
    "SHAPES", "ALIASES", "Shape", "shape_names", "resolve_shape", "shape_config",
    "LLAVA_OV_PINPOINTS", "LLAVA_IMAGE_TOKEN_ID", "LLAVA_VIDEO_TOKEN_ID", "QWEN_ENDOFTEXT_ID",
]
