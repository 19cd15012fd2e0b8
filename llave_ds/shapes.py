"""Real architecture shapes as transformers configs, and the arithmetic of their cost.

The benchmark (``llave_ds.bench``) builds models of these shapes with random weights, so
no checkpoint is needed. Every shape is the LLaVA-OneVision architecture: a SigLIP
so400m/14-384 vision tower, a 2-layer GELU MLP projector plus the ``image_newline``
vector, and a Qwen2 language model; ``anyres_max_9`` tiling over 384-px tiles.

| shape | LLM | vision | source |
|---|---|---|---|
| ``llava-ov-0.5b`` | Qwen2-0.5B: d 896, 24 layers, 14 heads, 2 kv, ffn 4864, vocab 151936, tied | SigLIP so400m | llava-hf/llava-onevision-qwen2-0.5b-ov-hf |
| ``aquila-vl-2b`` | Qwen2.5-1.5B: d 1536, 28 layers, 12 heads, 2 kv, ffn 8960, vocab 151936, tied | SigLIP so400m | BAAI/Aquila-VL-2B-llava-qwen (LLaVA-OV architecture) |
| ``llava-ov-7b`` | Qwen2-7B: d 3584, 28 layers, 28 heads, 4 kv, ffn 18944, vocab 152064, untied | SigLIP so400m | lmms-lab/llava-onevision-qwen2-7b-ov |
| ``tiny`` | ``llave_ds.tiny.tiny_config("llava_onevision")`` | toy | for CPU runs and CI |

SigLIP so400m/14-384 has 27 encoder layers (hidden 1152, MLP 4304, 16 heads). LLaVA-OV reads
the *penultimate* layer's output, so the transformers-format checkpoints (the converter in
``transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py``) keep
only **26** layers and select the last one. That is what runs, so 26 is the default here
(``vision_layers=27`` gives the full so400m tower). The original LLaVA-NeXT checkpoints
have the vocabulary sizes above; the llava-hf conversions add ``<image>``/``<video>``/pad
and round the embedding up to a multiple of 64 (e.g. 152000 for 0.5B), a 0.04 % change
that does not matter for cost.

Cost arithmetic (all of it written out in docs/PERFORMANCE.md):

* ``param_counts(config)``: exact parameter counts per part (checked against a model
  built on the meta device in tests/test_bench.py);
* ``llm_forward_flops``, ``vision_forward_flops``, ``projector_forward_flops``: forward
  FLOPs of matrix products (2 per multiply-add); norms, activations, RoPE, softmax and
  biases are not counted (<1 %).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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
    "tiny": Shape("tiny", "llave_ds.tiny toy LLaVA-OV (2+2 layers, ~150K parameters): CPU and CI",
                  source="llave_ds.tiny.tiny_config('llava_onevision')"),
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
    from transformers import LlavaOnevisionConfig

    shape = resolve_shape(name)
    if shape.name == "tiny":
        from llave_ds.tiny import tiny_config

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


# ---------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------

def _dims(config) -> dict:
    t, v = config.text_config, config.vision_config
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    return dict(
        d=t.hidden_size, f=t.intermediate_size, L=t.num_hidden_layers, h=heads,
        kv=t.num_key_value_heads * head_dim, q=heads * head_dim, V=t.vocab_size,
        dv=v.hidden_size, fv=v.intermediate_size, Lv=v.num_hidden_layers,
        S=v.image_size, P=v.patch_size, C=getattr(v, "num_channels", 3),
        tied=bool(config.tie_word_embeddings),
    )


def patches_per_tile(config) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


def param_counts(config) -> dict[str, int]:
    """Exact parameter counts of ``LlavaOnevisionForConditionalGeneration(config)``.

    Keys: vision_tower, projector (MLP + image_newline), llm_embedding, llm_layers
    (decoder layers + final norm), lm_head (0 when tied), total, and
    trainable (everything but the vision tower and an untied LM head: the paper's
    setting and llave_ds.model's default freezing).
    """
    g = _dims(config)
    d, f, L, kv, q, V = g["d"], g["f"], g["L"], g["kv"], g["q"], g["V"]
    dv, fv, Lv, S, P, C = g["dv"], g["fv"], g["Lv"], g["S"], g["P"], g["C"]
    n = (S // P) ** 2
    siglip_layer = (2 * dv) + 4 * (dv * dv + dv) + (2 * dv) + (dv * fv + fv) + (fv * dv + dv)
    vision = (C * P * P * dv + dv) + n * dv + Lv * siglip_layer + 2 * dv  # + post_layernorm
    projector = (dv * d + d) + (d * d + d) + d                          # linear_1, linear_2, newline
    qwen_layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d
    llm_layers = L * qwen_layer + d
    embedding = V * d
    lm_head = 0 if g["tied"] else V * d
    total = vision + projector + embedding + llm_layers + lm_head
    return dict(vision_tower=vision, projector=projector, llm_embedding=embedding,
                llm_layers=llm_layers, lm_head=lm_head, total=total,
                trainable=projector + embedding + llm_layers)


# ---------------------------------------------------------------------------------------
# Forward FLOPs (2 FLOPs per multiply-add; matrix products only)
# ---------------------------------------------------------------------------------------

def llm_forward_flops(config, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs of the Qwen2 decoder on one sequence of ``seq_len`` tokens.

    linear    = 2 * s * L * (d*q + 2*d*kv + q*d + 3*d*f)      (q/k/v/o projections, SwiGLU MLP)
    attention = 2 * 2 * s^2 * q * L * (1/2 if causal)          (Q K^T and A V; q = heads * head_dim)

    The LM head is never run by the embedding model, so it is not counted.
    """
    g = _dims(config)
    d, f, L, kv, q = g["d"], g["f"], g["L"], g["kv"], g["q"]
    s = float(seq_len)
    linear = 2.0 * s * L * (d * q + 2 * d * kv + q * d + 3 * d * f)
    attention = 4.0 * s * s * q * L * (0.5 if causal else 1.0)
    return {"linear": linear, "attention": attention, "total": linear + attention}


def vision_forward_flops(config, tiles: int) -> float:
    """Forward FLOPs of the SigLIP tower on ``tiles`` tiles of n = (S/P)^2 patches each.

    per tile = 2*n*(C*P^2)*dv  (patch embedding)
             + Lv * [2*n*(4*dv^2 + 2*dv*fv) + 4*n^2*dv]   (projections, MLP, full attention)
    """
    g = _dims(config)
    dv, fv, Lv, P, C = g["dv"], g["fv"], g["Lv"], g["P"], g["C"]
    n = float(patches_per_tile(config))
    per_tile = 2 * n * C * P * P * dv + Lv * (2 * n * (4 * dv * dv + 2 * dv * fv) + 4 * n * n * dv)
    return tiles * per_tile


def projector_forward_flops(config, tiles: int) -> float:
    """Forward FLOPs of the projector on every tile's n features: 2*n*(dv*d + d*d) per tile."""
    g = _dims(config)
    n = float(patches_per_tile(config))
    return tiles * 2 * n * (g["dv"] * g["d"] + g["d"] * g["d"])


def activation_bytes_per_token(config, checkpointing: bool, seq_len: int, act_bytes: int = 2) -> dict[str, float]:
    """Bytes autograd keeps per token of one chunk in the language model (pass 2).

    Measured with saved-tensor hooks on the real widths (tests/test_bench.py; exact at
    bf16 for the tiny, 0.5B and 2B widths): one Qwen2 decoder layer under SDPA keeps

        24*d + 8*f + 4*h + 8 + 2*s   bytes per token

    (two RMSNorms with their fp32 upcasts 2*(4d + 2d + 2d + 4), q and the head-repeated k, v
    and the attention output 4*2d, the SwiGLU MLP 4*2f, the fp32 log-sum-exp 4h, and the
    additive padding mask, materialised per layer: 2*s per token at s = padded length),
    plus 6*d + 4*head_dim + 12 once (final norm, rotary cos/sin, ids). With non-reentrant
    checkpointing per layer only the layer input (2*d) stays, and one layer is recomputed
    at a time during backward ("transient"). ``act_bytes`` = 4 scales everything (fp32
    runs keep no separate upcast copies, so that is an upper bound).
    """
    g = _dims(config)
    d, f, h, L = g["d"], g["f"], g["h"], g["L"]
    head_dim = g["q"] // h
    scale = act_bytes / 2.0
    layer = (24 * d + 8 * f + 4 * h + 8 + 2 * seq_len) * scale
    once = (6 * d + 4 * head_dim + 12) * scale
    if checkpointing:
        kept, transient = L * 2 * d * scale + once, layer
    else:
        kept, transient = L * layer + once, 0.0
    return {"per_layer": layer, "once": once, "kept": kept, "transient": transient}


__all__ = [
    "SHAPES", "ALIASES", "Shape", "shape_names", "resolve_shape", "shape_config", "param_counts",
    "patches_per_tile", "llm_forward_flops", "vision_forward_flops", "projector_forward_flops",
    "activation_bytes_per_token", "LLAVA_OV_PINPOINTS", "LLAVA_IMAGE_TOKEN_ID", "QWEN_ENDOFTEXT_ID",
]
