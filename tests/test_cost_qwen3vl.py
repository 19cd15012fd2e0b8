"""llave_ds.training.cost_qwen3vl (and cost.py's Qwen3-VL dispatch): the Qwen3-VL cost model.

* hand computations on a toy Qwen3-VL config (every multiply-add counted by hand, written out
  as literal numbers): parameters, the tower, the mergers, a chunk, a step;
* the FLOP formula equals PyTorch's FlopCounterMode on real forwards (eager attention): the
  tiny Qwen3-VL and the 2B widths at 1 LLM + 6 vision layers (one DeepStack tap), a chunk with
  images and a text-only chunk with the dummy image;
* the LM's activation formula equals the bytes autograd saves (saved-tensor hooks, bf16) at the
  tiny and 2B widths, and a whole pass-2 chunk forward of the tiny model (vision cache on)
  saves exactly what the memory model counts, plus the pooled rows;
* the memory model: the vision cache holds every other chunk's features, the peak grows with
  the chunk size, checkpointing lowers it, the uncached step holds everything.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llave_ds.bench import shapes
from llave_ds.bench.inputs import build_chunk, chunked, geometry_for, make_sides
from llave_ds.training import cost, cost_qwen3vl
from llave_ds.training.cost import Geometry
from llave_ds.training.cost import SideShape as Side

# A toy Qwen3-VL config as plain attributes: LM d=4, ffn 8, 2 layers, 2 heads of head_dim 3
# (q width 6), 1 kv head (kv width 3); tower d=2, MLP 3, 1 block, 1-px patches of 1 channel x
# temporal 2 (2 values per patch), merge 2 (h4 = 8), one DeepStack tap, 4 learned positions.
TOY = SimpleNamespace(
    model_type="qwen3_vl",
    text_config=SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=3, vocab_size=10, attention_bias=False),
    vision_config=SimpleNamespace(hidden_size=2, intermediate_size=3, depth=1, patch_size=1, temporal_patch_size=2,
                                  in_channels=1, spatial_merge_size=2, out_hidden_size=4, num_position_embeddings=4,
                                  deepstack_visual_indexes=[0]),
    tie_word_embeddings=True)
# An image is a 2x2 patch grid (4 patches, 1 token); the dummy image too.
TOY_GEO = Geometry(image_hw=(2, 2), tiles_per_image=1, tokens_per_image=1, dummy_tiles=1, tile_px=0, id_high=8,
                   image_token_id=9, pad_token_id=0, image_extra_tokens=3, patches_per_image=4, dummy_patches=4,
                   grid_thw=(1, 2, 2), dummy_grid_thw=(1, 2, 2), patch_dim=2, vision_start_id=6, vision_end_id=7)


# ---------------------------------------------------------------------------- hand computations

def test_param_counts_by_hand():
    c = cost.param_counts(TOY)
    # tower: patch embedding 2 x 2 + 2 bias = 6; positions 4 x 2 = 8; the block: 2 LayerNorms 2 x 4,
    # qkv 2x6 + 6, proj 2x2 + 2, fc1 2x3 + 3, fc2 3x2 + 2 = 49 -> 63
    assert c["vision_tower"] == 63
    # main merger: LayerNorm over dv (4), fc1 8x8 + 8, fc2 8x4 + 4 = 112; the DeepStack merger's
    # LayerNorm is over h4 = 8 (16): 124
    assert (c["merger"], c["deepstack_mergers"], c["projector"]) == (112, 124, 236)
    # a decoder layer: q 4x6, k 4x3, v 4x3, o 6x4, q_norm 3, k_norm 3, SwiGLU 3 x 4x8, 2 RMSNorms 4
    # = 182; 2 layers + the final norm = 368; tied embedding 10 x 4
    assert (c["llm_layers"], c["llm_embedding"], c["lm_head"]) == (368, 40, 0)
    assert c["total"] == 63 + 236 + 40 + 368 == 707 and c["trainable"] == 236 + 40 + 368
    untied = cost.param_counts(SimpleNamespace(**{**vars(TOY), "tie_word_embeddings": False}))
    assert untied["lm_head"] == 40 and untied["total"] == 747 and untied["trainable"] == c["trainable"]


def test_tower_and_merger_flops_by_hand():
    # patch embedding 4 patches x (2 -> 2) = 16 MACs = 32 FLOPs; the block: qkv 2x6 + proj 2x2 +
    # fc1 2x3 + fc2 3x2 = 28 MACs per patch x 4 = 224 FLOPs; attention over the image's 4 patches:
    # Q K^T + A V 2 x 4*4*2 MACs = 128 FLOPs -> 384
    assert cost_qwen3vl.vision_forward_flops(TOY, 4) == 384
    # 16 patches (4x4 grid): 128 + 896 + 2 x 2 x 16*16*2 = 3072 FLOPs (attention grows as n^2)
    assert cost_qwen3vl.vision_forward_flops(TOY, 16) == 128 + 896 + 2048
    # mergers: 1 merged token per 4 patches, fc1 8x8 + fc2 8x4 = 96 MACs, main + 1 DeepStack = 384
    assert cost_qwen3vl.merger_forward_flops(TOY, 4) == 384
    assert cost_qwen3vl.merger_forward_flops(TOY, 16) == 4 * 384


def test_chunk_and_step_flops_by_hand():
    # an image side: 14 template + <|vision_start|> 1 token <|vision_end|> "\n" + 1 text + 5 closing
    # = 24 tokens; a text side 14 + 3 + 5 = 22 tokens, padded to 24
    img, txt = Side(1, True), Side(3, False)
    assert (img.length(TOY_GEO), txt.length(TOY_GEO)) == (24, 22)
    # LM per token: q 4x6, k 4x3, v 4x3, o 6x4, MLP 3 x 4x8 = 168 MACs x 2 layers = 672 FLOPs;
    # attention 2 layers x 2 x 2 x s^2 x 6 / 2 (causal)
    llm24, llm22 = 24 * 672 + 2 * 2 * 24 * 24 * 6, 22 * 672 + 2 * 2 * 22 * 22 * 6   # 29952, 26400
    f = cost.chunk_forward_flops(TOY, [img, txt], TOY_GEO)
    assert f["llm"] == llm24 + llm22 == 56352 and f["llm_pad"] == 2 * llm24 - 56352 == 3552
    assert (f["vision"], f["proj1"], f["proj2"]) == (384, 0, 384)
    assert f["vision_dummy"] == f["proj2_dummy"] == f["proj_dummy"] == 0
    t = cost.chunk_forward_flops(TOY, [txt], TOY_GEO)   # text only: the dummy image, all mergers
    assert (t["vision"], t["proj2"], t["vision_dummy"], t["proj2_dummy"]) == (0, 0, 384, 384)
    fwd = cost.sum_parts([f, t])
    v, p2, llm, pad, vd, p2d = 384, 384, 56352 + 26400, 3552, 384, 384
    plain = cost.step_flops(fwd, cached=False, checkpointing=False)
    # frozen tower forward only; every merger linear forward + backward (3x: the mergers'
    # LayerNorms train, so fc1 needs its input gradient); the dummy's mergers too (zero gradient)
    assert plain["model"] == v + 3 * p2 + 3 * llm
    assert plain["hardware"] == v + vd + 3 * p2 + 3 * p2d + 3 * (llm + pad)
    cached = cost.step_flops(fwd, cached=True, checkpointing=True, vision_cached=True)
    # pass 1 runs everything once more but the tower (cached); the recompute runs the LM once more
    assert cached["hardware"] == plain["hardware"] + (p2 + p2d + llm + pad) + (llm + pad)
    assert cached["dummy"] == vd + p2d


def test_memory_terms_by_hand():
    act = cost.activation_bytes_per_token(TOY, checkpointing=False, seq_len=10)
    # 16 d + 14 q + 6 kv + 8 h + 4 kvh + 8 f + 8 + 2 s = 64 + 84 + 18 + 16 + 4 + 64 + 8 + 20
    assert act["per_layer"] == 278 and act["once"] == 6 * 4 + 4 * 3 + 12
    assert act["kept"] == 2 * 278 + 48 and act["transient"] == 0
    ck = cost.activation_bytes_per_token(TOY, checkpointing=True, seq_len=10)
    assert ck["kept"] == 2 * 2 * 4 + 48 and ck["transient"] == 278
    # per merged token: 2 mergers x (fc1 in, GELU in, fc2 in) 3 x 8 x 2 bytes + LayerNorm mean/rstd
    # 2 x 4 bytes per row (4 patch rows for the main merger, 1 for the DeepStack one)
    assert cost_qwen3vl.merger_activation_bytes(TOY, 8) == 2 * (96 + 8 * 5)
    # features: last block + 1 tap, 2 x 2 bytes per patch
    assert cost_qwen3vl.feature_bytes(TOY, 8) == 8 * 8


# ---------------------------------------------------------------------------- against PyTorch

def _small_vocab(cfg):
    data = cfg.to_dict()
    data["text_config"] = dict(data["text_config"], vocab_size=1024, pad_token_id=1000, bos_token_id=None,
                               eos_token_id=None)
    data.update(image_token_id=1010, video_token_id=1011, vision_start_token_id=1012, vision_end_token_id=1013)
    data.pop("transformers_version", None)
    return cfg.__class__.from_dict(data)


@pytest.mark.parametrize("name, kw, hw", [("qwen3-tiny", {}, (64, 96)),
                                          ("qwen3-vl-2b", dict(llm_layers=1, vision_layers=6), (64, 96))])
def test_flop_formula_equals_flop_counter(name, kw, hw):
    from torch.utils.flop_counter import FlopCounterMode

    from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config

    cfg = shapes.shape_config(name, **kw)
    if name != "qwen3-tiny":  # a small vocabulary: the LM head never runs, FLOPs do not depend on it
        cfg = _small_vocab(cfg)
        assert cfg.vision_config.deepstack_visual_indexes == [5]   # one tap left: one DeepStack merger
    geo = geometry_for(cfg, hw, name)
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="qwen3_vl", dtype="float32",
                                                               attn_implementation="eager"))
    gen = torch.Generator().manual_seed(0)
    for frac in (1.0, 0.0):  # with images; text-only (dummy image)
        sides = make_sides(2, frac, (10, 30), gen)
        chunk = build_chunk(sides, geo, gen)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**chunk)
        width = chunk["input_ids"].shape[1]
        n_img = sum(s.has_image for s in sides)
        per_image = geo.patches_per_image if n_img else geo.dummy_patches
        expected = (len(sides) * cost.llm_forward_flops(cfg, width, causal=False)["total"]
                    + max(n_img, 1) * (cost_qwen3vl.vision_forward_flops(cfg, per_image)
                                       + cost_qwen3vl.merger_forward_flops(cfg, per_image)))
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def _saved_bytes(run, exclude=frozenset()) -> tuple[float, dict]:
    """Bytes of the distinct storages autograd saves while ``run()`` runs (parameters and the
    storages in ``exclude`` left out)."""
    storages: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in exclude:
            storages[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values()), storages


@pytest.mark.parametrize("padding_mask", [True, False])
@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-vl-2b"])
def test_llm_activation_formula_equals_saved_tensor_bytes(name, padding_mask):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    text = shapes.shape_config(name, llm_layers=1, vision_layers=1).text_config
    saved = {}
    B, s = 2, 48
    for layers in (1, 2):
        cfg = text.__class__.from_dict({**text.to_dict(), "num_hidden_layers": layers, "vocab_size": 300,
                                        "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None})
        model = Qwen3VLTextModel._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").train()
        params = frozenset(p.untyped_storage().data_ptr() for p in model.parameters())
        ids = torch.randint(0, 250, (B, s))
        mask = torch.ones(B, s, dtype=torch.long)
        mask[1, 30:] = 0  # padding: the additive mask is materialised
        inputs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)) if padding_mask else \
            dict(attention_mask=None, position_ids=torch.arange(s).expand(B, s))
        total, _ = _saved_bytes(lambda: model(input_ids=ids, use_cache=False, **inputs), params)
        saved[layers] = total / (B * s)
    one = shapes.shape_config(name, llm_layers=1, vision_layers=1)
    act = cost.activation_bytes_per_token(one, checkpointing=False, seq_len=s, padding_mask=padding_mask)
    assert saved[2] - saved[1] == act["per_layer"]
    assert saved[1] == act["kept"]


@pytest.mark.parametrize("padding_mask", ["auto", "always"])
def test_a_pass_2_chunk_saves_what_the_memory_model_counts(padding_mask):
    """The tiny Qwen3-VL in bf16, tower frozen, vision cache on: pass 1 (no grad) fills the
    cache, pass 2's saved tensors are the LM's (kept bytes per padded token), the image-token
    mask (1 byte per token), the mergers' (`merger_activation_bytes`; CPU keeps LayerNorm
    statistics in bf16: 2 bytes, CUDA in fp32) and their inputs, which are the cache's
    entries (`feature_bytes`), plus the pooling of each row (4 d + 24 bytes: the pooled fp32 row,
    its norm and the norm broadcast, two int64 indices; not modelled)."""
    from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config

    cfg = shapes.shape_config("qwen3-tiny")
    geo = geometry_for(cfg, (64, 96), "qwen3-tiny")
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="qwen3_vl", dtype="bfloat16",
                                                               attn_implementation="sdpa",
                                                               padding_mask=padding_mask)).train()
    assert model.vision_cache is not None
    params = frozenset(p.untyped_storage().data_ptr() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    sides = [Side(12, True), Side(25, True), Side(3, True)]
    chunk = build_chunk(sides, geo, gen)
    chunk["pixel_values"] = chunk["pixel_values"].bfloat16()
    with torch.no_grad():
        model(**chunk)
    entry = next(iter(model.vision_cache._entries.values()))
    hidden, taps = entry.features
    cached = {t.untyped_storage().data_ptr() for t in [hidden, *taps]}
    total, storages = _saved_bytes(lambda: model(**chunk), params)
    assert model.vision_cache.hits == 1                      # pass 2 read the cache
    rows, width = chunk["input_ids"].shape
    patches = len(sides) * geo.patches_per_image
    features = sum(storages[k] for k in cached)
    assert features == cost_qwen3vl.feature_bytes(cfg, patches)
    # the bench's chunks are right-padded: "auto" drops the mask
    act = cost.activation_bytes_per_token(cfg, checkpointing=False, seq_len=width,
                                          padding_mask=padding_mask == "always")
    d = cfg.text_config.hidden_size
    expected = (rows * width * (act["kept"] + 1) + cost_qwen3vl.merger_activation_bytes(cfg, patches, stats_bytes=2)
                + features + rows * (4 * d + 24))
    assert total == expected


# ---------------------------------------------------------------------------- memory model

Q_SETTINGS = dict(stage=3, world=8, param_bytes=2, reduction="coalesced", checkpointing=True,
                  ds_config={"zero_optimization": {"stage": 3, "reduce_bucket_size": 2e8,
                                                   "stage3_prefetch_bucket_size": 2e8}})


def _q2b():
    cfg = shapes.shape_config("qwen3-vl-2b")
    return cfg, cost.param_counts(cfg), geometry_for(cfg, (1024, 1280), "qwen3-vl-2b")


def test_vision_cache_holds_every_other_chunks_features():
    cfg, counts, geo = _q2b()
    queries = [Side(40 + 5 * i, True) for i in range(8)]
    targets = [Side(20, False) for _ in range(8)]
    chunks = chunked(queries, 4) + chunked(targets, 4)
    peak = cost.predict_chunks_memory(cfg, counts, chunks, geo, **Q_SETTINGS)
    # the peak is a query chunk's; the cache then holds the other query chunk (4 images) and the
    # two target chunks' dummy images
    held = 4 * geo.patches_per_image + 2 * geo.dummy_patches
    assert peak["vision_cache"] == cost_qwen3vl.feature_bytes(cfg, held)
    assert geo.patches_per_image == 5120 and peak["vision_cache"] == 4 * (5120 * 4 * 1024 * 2) + 2 * 16 * 4 * 2048
    off = cost.predict_chunks_memory(cfg, counts, chunks, geo, vision_cached=False, **Q_SETTINGS)
    assert off["vision_cache"] == 0 and off["total"] == peak["total"] - peak["vision_cache"]
    # the uncached step keeps every chunk's activations, features included, and no cache
    together = cost.predict_chunks_memory(cfg, counts, [queries, targets], geo, together=True, **Q_SETTINGS)
    assert together["vision_cache"] == 0 and together["total"] > peak["total"]


@pytest.mark.parametrize("ckpt", [True, False])
def test_memory_model_grows_with_the_chunk_size(ckpt):
    cfg, counts, geo = _q2b()
    sides = [Side(40 + 5 * i, i % 2 == 0) for i in range(16)]
    settings = dict(Q_SETTINGS, checkpointing=ckpt)
    preds = [cost.predict_chunks_memory(cfg, counts, chunked(sides, c), geo, **settings) for c in (1, 2, 4, 8, 16)]
    totals = [p["total"] for p in preds]
    assert totals == sorted(totals) and len(set(totals)) == len(totals), totals
    for key in ("params", "grads", "optimizer", "coalesced_grads", "buffers"):
        assert len({p[key] for p in preds}) == 1, key


def test_checkpointing_lowers_the_predicted_activations():
    cfg, counts, geo = _q2b()
    kw = dict(Q_SETTINGS, chunk_rows=8, chunk_width=1400, chunk_tiles=8, chunk_patches=8 * 5120)
    on = cost.predict_memory(cfg, counts, **kw)
    off = cost.predict_memory(cfg, counts, **dict(kw, checkpointing=False))
    assert on["activations"] < off["activations"] and on["params"] == off["params"]
