"""The Qwen3-VL part of the cost model: per-image and per-token arithmetic on a
``Qwen3VLConfig`` (pure arithmetic, like ``llave_ds.training.cost``, which dispatches here for
``model_type == "qwen3_vl"`` and combines these terms per chunk and step).

What differs from LLaVA-OneVision (docs/PERFORMANCE.md, "Qwen3-VL"):

* images are not tiles: an image resized to H x W px (multiples of 32) is one sequence of
  n = (H/16)(W/16) patches of 3*2*16*16 values (the frame repeated over the temporal patch
  of 2), attended *fully per image*; 2x2 patches are merged into one image token, so an
  image has n/4 tokens in the text;
* the projector is a set of mergers: the main one (LayerNorm over dv, then 4dv -> 4dv ->
  d) and one more per DeepStack tap (LayerNorm over 4dv, same MLP), each on the n/4 merged
  tokens; the DeepStack features are added to the hidden states of the first decoder layers
  (no matrix product);
* the LM is Qwen3: no q/k/v biases, RMSNorms over each head's q and k (``q_norm``,
  ``k_norm``), its own ``head_dim`` (q width = heads x head_dim need not be d).

Symbols: dv, fv, Lv = tower width, MLP width, blocks; P = patch size (16), T = temporal
patch (2), C = channels (3), m = merge size (2), h4 = dv m^2 (the merged width), taps =
DeepStack taps; d, f, L, q, kv, h, kvh, head_dim = the LM's.
"""
from __future__ import annotations


def is_qwen3vl(config) -> bool:
    return getattr(config, "model_type", "") == "qwen3_vl"


def dims(config) -> dict:
    t, v = config.text_config, config.vision_config
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    m = int(v.spatial_merge_size)
    return dict(
        d=t.hidden_size, f=t.intermediate_size, L=t.num_hidden_layers, h=heads, kvh=t.num_key_value_heads,
        head_dim=head_dim, q=heads * head_dim, kv=t.num_key_value_heads * head_dim, V=t.vocab_size,
        bias=bool(getattr(t, "attention_bias", False)),
        dv=v.hidden_size, fv=v.intermediate_size, Lv=v.depth, P=v.patch_size, T=v.temporal_patch_size,
        C=getattr(v, "in_channels", 3), m=m, h4=v.hidden_size * m * m, dout=v.out_hidden_size,
        npos=v.num_position_embeddings, taps=len(v.deepstack_visual_indexes),
        tied=bool(config.tie_word_embeddings),
    )


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------

def param_counts(config) -> dict[str, int]:
    """Exact parameter counts of ``Qwen3VLForConditionalGeneration(config)``.

    vision_tower  patch embedding (Conv3d C x T x P x P -> dv, bias) + learned position grid
                  (npos x dv) + Lv blocks (2 LayerNorms, qkv and proj with bias, MLP with bias)
    projector     main merger (LayerNorm dv, fc1 h4 -> h4, fc2 h4 -> d, biases) + one DeepStack
                  merger per tap (the same with a LayerNorm over h4)
    llm_layers    L x (q/k/v/o without bias, q_norm and k_norm over head_dim, SwiGLU, 2 RMSNorms)
                  + the final RMSNorm
    The keys are ``cost.param_counts``'s, plus ``merger`` and ``deepstack_mergers``.
    """
    g = dims(config)
    dv, fv, Lv, h4, dout = g["dv"], g["fv"], g["Lv"], g["h4"], g["dout"]
    d, f, L, q, kv = g["d"], g["f"], g["L"], g["q"], g["kv"]
    block = 2 * (2 * dv) + (dv * 3 * dv + 3 * dv) + (dv * dv + dv) + (dv * fv + fv) + (fv * dv + dv)
    vision = (g["C"] * g["T"] * g["P"] ** 2 * dv + dv) + g["npos"] * dv + Lv * block
    mlp = (h4 * h4 + h4) + (h4 * dout + dout)
    merger = 2 * dv + mlp
    deepstack = g["taps"] * (2 * h4 + mlp)
    biases = (q + 2 * kv + d) if g["bias"] else 0
    layer = d * q + 2 * d * kv + q * d + biases + 2 * g["head_dim"] + 3 * d * f + 2 * d
    llm_layers = L * layer + d
    embedding = g["V"] * d
    lm_head = 0 if g["tied"] else g["V"] * d
    projector = merger + deepstack
    total = vision + projector + embedding + llm_layers + lm_head
    return dict(vision_tower=vision, projector=projector, merger=merger, deepstack_mergers=deepstack,
                llm_embedding=embedding, llm_layers=llm_layers, lm_head=lm_head, total=total,
                trainable=projector + embedding + llm_layers)


# ---------------------------------------------------------------------------------------
# Forward FLOPs (2 per multiply-add, matrix products only)
# ---------------------------------------------------------------------------------------

def vision_forward_flops(config, patches: int) -> float:
    """The tower on one image of ``patches`` 16-px patches (attention over the whole image):

        2 n (C T P^2) dv  +  Lv [ 2 n (4 dv^2 + 2 dv fv) + 4 n^2 dv ]

    (the position-grid interpolation and the rotary embedding are element-wise, not counted)."""
    g = dims(config)
    dv, n = g["dv"], float(patches)
    embed = 2 * n * g["C"] * g["T"] * g["P"] ** 2 * dv
    return embed + g["Lv"] * (2 * n * (4 * dv * dv + 2 * dv * g["fv"]) + 4 * n * n * dv)


def merger_forward_flops(config, patches: int) -> float:
    """Every merger (main + one per DeepStack tap) on the n/m^2 merged tokens of ``patches``:
    (1 + taps) x 2 (n/m^2) (h4^2 + h4 d)."""
    g = dims(config)
    tokens = float(patches) / g["m"] ** 2
    return (1 + g["taps"]) * 2 * tokens * (g["h4"] * g["h4"] + g["h4"] * g["dout"])


# ---------------------------------------------------------------------------------------
# Activation memory
# ---------------------------------------------------------------------------------------

def llm_layer_activation_bytes(config, seq_len: int, act_bytes: int = 2,
                               padding_mask: bool = True) -> tuple[float, float]:
    """(bytes per token of one decoder layer, bytes per token once) autograd keeps in the
    Qwen3 LM (pass 2; `cost.activation_bytes_per_token` adds checkpointing); measured with saved-tensor
    hooks (tests/bench/test_cost.py; exact at bf16 for the tiny Qwen3-VL and the 2B widths,
    for GQA with more than one kv head). One decoder layer under SDPA with a padding mask:

        16 d + 14 q + 6 kv + 8 h + 4 kvh + 8 f + 8 + 2 s   bytes per token

    two RMSNorms with their fp32 upcasts and the projections' shared input 2 (4d + 4 + 2d + 2d);
    q_norm: fp32 q 4q, its rsqrt 4h, the normalised q 2q; k_norm: 4kv + 4kvh + 2kv; SDPA: the
    rotated q, the head-repeated k and v and the output 4 x 2q, the fp32 log-sum-exp 4h; the
    SwiGLU MLP 4 x 2f; the additive padding mask 2 s. (Rotary: the products with cos/sin keep
    only cos/sin, which are shared by every layer.) Once per token: 6 d + 4 head_dim + 12 (ids,
    cos/sin, the final norm), as for Qwen2.
    """
    g = dims(config)
    d, q, kv, h, kvh, f = g["d"], g["q"], g["kv"], g["h"], g["kvh"], g["f"]
    scale = act_bytes / 2.0
    layer = (16 * d + 14 * q + 6 * kv + 8 * h + 4 * kvh + 8 * f + 8 + 2 * seq_len) * scale
    if not padding_mask:  # SDPA's causal GQA path: no mask, k and v not repeated (exact, as for Qwen2)
        layer -= (2 * seq_len + 4 * (q - kv)) * scale
    once = (6 * d + 4 * g["head_dim"] + 12) * scale
    return layer, once


def merger_activation_bytes(config, patches: int, act_bytes: int = 2, stats_bytes: int = 4) -> float:
    """Bytes the mergers keep for their backward over ``patches`` (pass 2), *without* their
    inputs (the tower features: `feature_bytes`). Per merged token, every merger keeps its fc1
    input, GELU input and fc2 input (3 x h4 x b) and its LayerNorm's mean and rstd
    (``stats_bytes`` each: fp32 on CUDA, the input dtype on CPU): per patch for the main merger
    (m^2 rows), per merged token for a DeepStack merger (1 row)."""
    g = dims(config)
    tokens = float(patches) / g["m"] ** 2
    per_token = (1 + g["taps"]) * 3 * g["h4"] * act_bytes + 2 * stats_bytes * (g["m"] ** 2 + g["taps"])
    return tokens * per_token


def feature_bytes(config, patches: int, act_bytes: int = 2) -> float:
    """The tower features the mergers read: the last block's output and each tapped block's,
    (1 + taps) x dv x b per patch. Pass 2 keeps them as the mergers' saved inputs; with the
    frozen-vision cache they are the cache entries, alive for every chunk of the step."""
    g = dims(config)
    return float(patches) * (1 + g["taps"]) * g["dv"] * act_bytes
