"""The benchmark's cost model: parameter counts, FLOPs, the memory model and MFU.

Pure arithmetic on a transformers config (and on the synthesised sides of
``llave_ds.bench.inputs``, described by `SideShape` and `Geometry`, defined here): no
torch, no process group, no DeepSpeed. Every formula is written out in
docs/PERFORMANCE.md and checked in tests/bench/test_cost.py (against a model built on
the meta device, PyTorch's FlopCounterMode, saved-tensor hooks and hand computations).

* ``param_counts(config)``: exact parameter counts per part;
* ``llm_forward_flops``, ``vision_forward_flops``, ``projector_forward_flops``: forward
  FLOPs of matrix products (2 per multiply-add); norms, activations, RoPE, softmax and
  biases are not counted (<1 %);
* ``chunk_forward_flops`` and ``step_flops``: one chunk's forward split by part, and the
  model / hardware FLOPs of a whole (cached or uncached) step;
* ``activation_bytes_per_token``, ``predict_memory``, ``predict_chunks_memory``: the
  per-rank peak memory of a step;
* ``utilization``: MFU / HFU from FLOPs, step time and the device peak.

Two architectures: LLaVA-OneVision (SigLIP tiles, written out here) and Qwen3-VL (flattened
patches, DeepStack mergers, the Qwen3 LM: ``llave_ds.training.cost_qwen3vl``, which the
functions here dispatch to when ``config.model_type == "qwen3_vl"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from llave_ds.model.checkpointing import checkpointed_layers
from llave_ds.training import cost_qwen3vl as q3
from llave_ds.training.cost_qwen3vl import is_qwen3vl

GIB = 2 ** 30
TEMPLATE_HEAD_TOKENS = 14  # <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
TEMPLATE_TAIL_TOKENS = 5   # <|im_end|>\n<|im_start|>assistant\n


@dataclass
class Geometry:
    """What the processor makes of an image at a shape: tiles, tokens, ids (`inputs.geometry_for`).

    Qwen3-VL (``patches_per_image`` > 0): an image is one sequence of 16-px patches, so
    ``tiles_per_image`` = ``dummy_tiles`` = 1 (one tower sequence per image), ``image_hw`` is
    the size after the processor's resize, the dummy image has ``dummy_patches`` patches, and
    an image side carries ``<|vision_start|>`` + tokens + ``<|vision_end|>`` + "\n"
    (``image_extra_tokens`` = 3; LLaVA-OV: the "\n" after the ``<image>`` tokens, 1).
    """
    image_hw: tuple[int, int]
    tiles_per_image: int
    tokens_per_image: int
    dummy_tiles: int
    tile_px: int
    id_high: int         # random text ids are drawn from [0, id_high)
    image_token_id: int
    pad_token_id: int
    image_extra_tokens: int = 1
    patches_per_image: int = 0       # Qwen3-VL only, from here on
    dummy_patches: int = 0
    grid_thw: tuple[int, int, int] = (0, 0, 0)
    dummy_grid_thw: tuple[int, int, int] = (0, 0, 0)
    patch_dim: int = 0               # C x T x P x P values per patch
    vision_start_id: int = -1
    vision_end_id: int = -1

    @property
    def flattened(self) -> bool:
        """Qwen-style inputs: flattened patches + image_grid_thw (no tiles)."""
        return self.patches_per_image > 0

    def chunk_patches(self, n_images: int) -> int:
        """Patches the tower runs for a chunk with ``n_images`` images (or the dummy)."""
        return n_images * self.patches_per_image if n_images else self.dummy_patches



@dataclass
class SideShape:
    """The shape of one synthetic side: its text tokens and whether it has an image."""
    text_tokens: int
    has_image: bool

    def length(self, geo: Geometry) -> int:
        # LLaVA-OV "<image>"*n + "\n"; Qwen "<|vision_start|>" + "<|image_pad|>"*n + "<|vision_end|>" + "\n"
        image = geo.tokens_per_image + geo.image_extra_tokens if self.has_image else 0
        return TEMPLATE_HEAD_TOKENS + image + self.text_tokens + TEMPLATE_TAIL_TOKENS


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
    setting and llave_ds.model.embedding's default freezing). Qwen3-VL: `cost_qwen3vl.param_counts`.
    """
    if is_qwen3vl(config):
        return q3.param_counts(config)
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

    The LM head is never run by the embedding model, so it is not counted. The same for the
    Qwen3 LM of Qwen3-VL (its q/k RMSNorms are not matrix products).
    """
    g = q3.dims(config) if is_qwen3vl(config) else _dims(config)
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


def chunk_forward_flops(config, sides: Sequence[SideShape], geo: Geometry) -> dict[str, float]:
    """Forward FLOPs of one chunk, split by part; 'llm_pad' is the extra of padded rows.

    Qwen3-VL: 'vision' is the tower on every image (full attention per image), 'proj2' every
    merger on every image ('proj1' is 0: the mergers' LayerNorms train, so every merger linear
    needs its input gradient), 'vision_dummy' / 'proj2_dummy' the blank image of a text-only chunk.
    """
    if is_qwen3vl(config):
        return _qwen3vl_chunk_forward_flops(config, sides, geo)
    n_img = sum(s.has_image for s in sides)
    d, dv = config.text_config.hidden_size, config.vision_config.hidden_size
    n = patches_per_tile(config)
    width = max(s.length(geo) for s in sides)
    llm = sum(llm_forward_flops(config, s.length(geo))["total"] for s in sides)
    llm_padded = len(sides) * llm_forward_flops(config, width)["total"]
    tiles = n_img * geo.tiles_per_image
    dummy_tiles = 0 if n_img else geo.dummy_tiles
    return {
        "vision": vision_forward_flops(config, tiles),
        "proj1": tiles * 2.0 * n * dv * d, "proj2": tiles * 2.0 * n * d * d,
        "llm": llm, "llm_pad": llm_padded - llm,
        "vision_dummy": vision_forward_flops(config, dummy_tiles),
        "proj_dummy": dummy_tiles * 2.0 * n * (dv * d + d * d),
        "tokens": float(sum(s.length(geo) for s in sides)), "padded_tokens": float(len(sides) * width),
    }


def _qwen3vl_chunk_forward_flops(config, sides: Sequence[SideShape], geo: Geometry) -> dict[str, float]:
    n_img = sum(s.has_image for s in sides)
    width = max(s.length(geo) for s in sides)
    llm = sum(llm_forward_flops(config, s.length(geo))["total"] for s in sides)
    llm_padded = len(sides) * llm_forward_flops(config, width)["total"]
    dummy = 0 if n_img else geo.dummy_patches
    return {
        "vision": n_img * q3.vision_forward_flops(config, geo.patches_per_image),
        "proj1": 0.0, "proj2": n_img * q3.merger_forward_flops(config, geo.patches_per_image),
        "llm": llm, "llm_pad": llm_padded - llm,
        "vision_dummy": q3.vision_forward_flops(config, dummy) if dummy else 0.0,
        "proj_dummy": 0.0, "proj2_dummy": q3.merger_forward_flops(config, dummy),
        "tokens": float(sum(s.length(geo) for s in sides)), "padded_tokens": float(len(sides) * width),
    }


def sum_parts(parts: list[dict]) -> dict[str, float]:
    """Key-wise sum of ``chunk_forward_flops`` results (the forward of a whole step)."""
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


def step_flops(fwd: dict[str, float], cached: bool, checkpointing: bool | float, vision_trained: bool = False,
               vision_cached: bool = False) -> dict[str, float]:
    """Model and hardware FLOPs of one step from the summed chunk forward FLOPs.

    ``checkpointing``: True / False, or the share of decoder layers checkpointed (selective
    checkpointing of every k-th layer: `checkpointed_share`), whose forward runs once more.

    model    = V * (3 if the tower trains else 1) + 2*P1 + 3*P2 + 3*LLM
               (frozen tower: forward only; projector layer 1: forward + weight gradient, its
               input needs none; layer 2 and the LLM: forward + 2x for backward)
    hardware = model + padding waste + dummy images + [cache: one more no-grad forward of
               everything] + [checkpointing: one more LLM forward]
               - [frozen-vision cache: pass 2 reuses pass 1's tower output, so the tower
               (real and dummy images) runs once, not twice]
    A dummy image's projector runs forward and backward with a zero gradient: 2.5x for
    LLaVA-OV's ('proj_dummy': linear_1 without, linear_2 with an input gradient), 3x for
    Qwen3-VL's mergers ('proj2_dummy', absent for LLaVA-OV).
    """
    v, p1, p2, llm, pad = fwd["vision"], fwd["proj1"], fwd["proj2"], fwd["llm"], fwd["llm_pad"]
    vd, pd, p2d = fwd["vision_dummy"], fwd["proj_dummy"], fwd.get("proj2_dummy", 0.0)
    vision_factor = 3.0 if vision_trained else 1.0
    model = vision_factor * v + 2 * p1 + 3 * p2 + 3 * llm
    forward_all = v + p1 + p2 + llm + pad + vd + pd + p2d
    hardware = (vision_factor * (v + vd) + 2 * p1 + 3 * p2 + 2.5 * pd + 3 * p2d + 3 * (llm + pad))
    extra_cache = forward_all if cached else 0.0
    if cached and vision_cached and not vision_trained:
        extra_cache -= v + vd
    share = float(checkpointing)
    extra_ckpt = (llm + pad) * share
    hardware += extra_cache + extra_ckpt
    return {"model": model, "hardware": hardware, "cache_extra_forward": extra_cache,
            "checkpoint_recompute": extra_ckpt, "padding_waste": 3 * pad + (pad if cached else 0) +
            pad * share, "dummy": vd + pd + p2d}


def checkpointed_share(config, every: int) -> float:
    """The share of the language model's decoder layers checkpointed at ``every`` (the rule:
    `llave_ds.model.checkpointing.checkpointed_layers`)."""
    num_layers = config.text_config.num_hidden_layers
    return len(checkpointed_layers(num_layers, every)) / num_layers


def utilization(flops: float, step_s: float, peak_tflops: float) -> float:
    """FLOPs per second of a step as a fraction of the device peak: MFU for model FLOPs,
    HFU for hardware FLOPs."""
    return flops / step_s / (peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------
# Memory model
# ---------------------------------------------------------------------------------------

def activation_bytes_per_token(config, checkpointing: bool, seq_len: int, act_bytes: int = 2,
                               padding_mask: bool = True, checkpoint_every: int = 1) -> dict[str, float]:
    """Bytes autograd keeps per token of one chunk in the language model (pass 2).

    Measured with saved-tensor hooks on the real widths (tests/bench/test_cost.py; exact at
    bf16 for the tiny, 0.5B and 2B widths): one Qwen2 decoder layer under SDPA keeps

        24*d + 8*f + 4*h + 8 + 2*s   bytes per token

    (two RMSNorms with their fp32 upcasts 2*(4d + 2d + 2d + 4), q and the head-repeated k, v
    and the attention output 4*2d, the SwiGLU MLP 4*2f, the fp32 log-sum-exp 4h, and the
    additive padding mask, materialised per layer: 2*s per token at s = padded length),
    plus 6*d + 4*head_dim + 12 once (final norm, rotary cos/sin, ids). Without the padding
    mask (``padding_mask=False``: right padding under ``model.padding_mask: auto``) SDPA takes
    its causal path with GQA: no mask and k, v not repeated over the heads, so a layer keeps
    2*s + 4*(q - kv) bytes less (q, kv: the query and key/value widths; exact). With non-reentrant
    checkpointing per layer only the layer input (2*d) stays, and one layer is recomputed
    at a time during backward ("transient"); selective checkpointing (``checkpoint_every`` = k)
    does that for layers 0, k, 2k, ... (`checkpointed_layers`) and the others keep their
    activations. ``act_bytes`` = 4 scales everything (fp32
    runs keep no separate upcast copies, so that is an upper bound). Qwen3-VL's Qwen3 LM:
    `cost_qwen3vl.llm_layer_activation_bytes`.
    """
    if is_qwen3vl(config):
        layer, once = q3.llm_layer_activation_bytes(config, seq_len, act_bytes, padding_mask)
    else:
        g = _dims(config)
        d, f, h = g["d"], g["f"], g["h"]
        scale = act_bytes / 2.0
        layer = (24 * d + 8 * f + 4 * h + 8 + 2 * seq_len) * scale
        if not padding_mask:
            layer -= (2 * seq_len + 4 * (g["q"] - g["kv"])) * scale
        once = (6 * d + 4 * (g["q"] // h) + 12) * scale
    return kept_activation_bytes(config, layer, once, checkpointing, checkpoint_every, act_bytes)


def kept_activation_bytes(config, layer: float, once: float, checkpointing: bool, every: int,
                          act_bytes: int) -> dict[str, float]:
    """Per token: a checkpointed layer keeps its input (2 d bytes at bf16) and one of them is
    recomputed at a time ("transient"); every other layer keeps ``layer`` bytes."""
    t = config.text_config
    num_layers, d = t.num_hidden_layers, t.hidden_size
    n_ckpt = len(checkpointed_layers(num_layers, every)) if checkpointing else 0
    kept = n_ckpt * 2 * d * act_bytes / 2.0 + (num_layers - n_ckpt) * layer + once
    return {"per_layer": layer, "once": once, "kept": kept, "transient": layer if n_ckpt else 0.0,
            "checkpointed_layers": float(n_ckpt)}


def predict_memory(config, counts: dict, *, stage: int, world: int, param_bytes: int,
                   reduction: str, checkpointing: bool, ds_config: dict,
                   chunk_rows: int, chunk_width: int, chunk_tiles: int,
                   persistent_params: int = 0, chunk_patches: int = 0, held_patches: int = 0,
                   chunk_has_images: bool = True, padding_mask: bool = True,
                   checkpoint_every: int = 1) -> dict[str, float]:
    """Per-rank peak device memory (bytes) of one cached step; docs/PERFORMANCE.md.

    states      params b*P (/W under ZeRO-3, persistent ones whole), grads b*T (/W under
                ZeRO-2/3), fp32 master + Adam m, v 12*T (/W under ZeRO-1+)
    coalesced   the full local gradient b*T held until the flush (reduction=coalesced)
    buffers     ZeRO-2/3 reduce bucket (two under ZeRO-2 with overlap_comm); ZeRO-3 gathered
                parameters: the largest module's (the token embedding) plus one prefetch
                bucket, at most every non-persistent parameter. (The cache's alternating
                forward-only and forward+backward passes keep ZeRO-3 releasing parameters
                after every use: measured on CPU, docs/PERFORMANCE.md.)
    activations one chunk of rows x width (padded) tokens: tokens * kept bytes/token
                (activation_bytes_per_token; ``padding_mask``: whether the LM gets one)
                + one layer recomputed (checkpointing; ``checkpoint_every`` = k: layers 0, k, 2k, ...)
                + the projector's saved inputs (tiles * n * (dv + 2d) * b)

    Qwen3-VL (``chunk_patches``: the patches of the chunk's tower call; ``held_patches``:
    those of every other chunk whose features the frozen-vision cache keeps meanwhile):
    activations the Qwen3 LM's tokens * (kept + transient) + the mergers' saved tensors and
                their inputs, the tower features (`cost_qwen3vl`) + the image-token mask (1 byte
                per token, chunks with images)
    vision_cache the other chunks' cached features, (1 + taps) * dv * b per patch
    """
    P, T = counts["total"], counts["trainable"]
    b = param_bytes
    W = max(1, world)
    zo = ds_config.get("zero_optimization", {})
    params = b * (P - persistent_params) / W + b * persistent_params if stage == 3 else b * P
    grads = b * T / W if stage >= 2 else b * T
    optim = 12.0 * T / W if stage >= 1 else 12.0 * T
    coalesced = b * T if (reduction == "coalesced" and stage >= 1) else 0.0
    buffers = 0.0
    if stage >= 2:  # contiguous-gradient reduce buckets (torch.empty of the full bucket size)
        n_buckets = 2 if (stage == 2 and zo.get("overlap_comm", False)) else 1
        buffers += b * float(zo.get("reduce_bucket_size", 5e8)) * n_buckets
    if stage == 3:
        t = config.text_config
        largest = float(t.vocab_size * t.hidden_size)
        live = min(largest + float(zo.get("stage3_prefetch_bucket_size", 5e7)),
                   float(zo.get("stage3_max_live_parameters", 1e9)))
        buffers += b * min(float(P - persistent_params), live)
    act = activation_bytes_per_token(config, checkpointing, chunk_width, act_bytes=b, padding_mask=padding_mask,
                                     checkpoint_every=checkpoint_every)
    tokens = chunk_rows * chunk_width
    vision_cache = 0.0
    if is_qwen3vl(config):
        activations = (tokens * (act["kept"] + act["transient"]) + (tokens if chunk_has_images else 0)
                       + q3.merger_activation_bytes(config, chunk_patches, act_bytes=b)
                       + q3.feature_bytes(config, chunk_patches, act_bytes=b))
        vision_cache = q3.feature_bytes(config, held_patches, act_bytes=b)
    else:
        n = patches_per_tile(config)
        d, dv = config.text_config.hidden_size, config.vision_config.hidden_size
        activations = tokens * (act["kept"] + act["transient"]) + chunk_tiles * n * (dv + 2 * d) * b
    total = params + grads + optim + coalesced + buffers + activations + vision_cache
    return {"params": params, "grads": grads, "optimizer": optim, "coalesced_grads": coalesced,
            "buffers": buffers, "activations": activations, "vision_cache": vision_cache, "total": total}


def predict_chunks_memory(config, counts: dict, chunks: Sequence[Sequence[SideShape]], geo: Geometry, *,
                          together: bool = False, vision_cached: bool = True, **settings) -> dict[str, float]:
    """``predict_memory`` of a step over these chunks (each a list of sides): the peak over
    chunks (cached: one chunk's activations alive at a time), or with ``together`` every
    chunk's activations alive at once (uncached: both roles' are kept until the backward).
    ``settings`` are ``predict_memory``'s keywords other than the chunk's own sizes.
    ``vision_cached`` (Qwen3-VL; cached step): the frozen-vision cache holds every chunk's
    tower features for the whole step (LLaVA-OV's, 3.4 MB per 384-px image, are not counted)."""
    patches = [geo.chunk_patches(sum(s.has_image for s in c)) for c in chunks]
    preds = []
    for c, n_patches in zip(chunks, patches):
        n_img = sum(s.has_image for s in c)
        tiles = n_img * geo.tiles_per_image or geo.dummy_tiles
        held = sum(patches) - n_patches if (vision_cached and not together) else 0
        preds.append(predict_memory(config, counts, chunk_rows=len(c), chunk_width=max(s.length(geo) for s in c),
                                    chunk_tiles=tiles, chunk_patches=n_patches, held_patches=held,
                                    chunk_has_images=n_img > 0, **settings))
    if not together:
        return max(preds, key=lambda p: p["total"])
    out = dict(preds[0])
    extra = sum(p["activations"] for p in preds[1:])
    out["activations"] += extra
    out["total"] += extra
    return out
