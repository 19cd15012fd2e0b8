"""llave_ds.training.cost: the FLOP and memory model.

* hand computations on a toy config (every multiply-add counted by hand, written out as
  literal numbers): the LLM, tower and projector forwards, a chunk, a step;
* the FLOP formula equals PyTorch's FlopCounterMode on real forwards (eager attention, so
  attention products are counted too): the tiny model and the 0.5B widths at 1+1 layers;
* the frozen-vision cache removes exactly the second pass's tower FLOPs;
* the activation-memory formula equals the bytes autograd saves (saved-tensor hooks, bf16);
* the memory model's states scale with the world size as ZeRO partitions them, and its
  peak grows with the chunk size while the states stay put.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llave_ds.bench import shapes
from llave_ds.bench.inputs import build_chunk, chunked, geometry_for, make_sides
from llave_ds.training import cost
from llave_ds.training.cost import Geometry
from llave_ds.training.cost import SideShape as Side

# A toy LLaVA-OV config as plain attributes (the cost model reads nothing else):
# LLM d=4, ffn 8, 2 layers, 2 heads of 2 (q width 4), 1 kv head (kv width 2);
# tower d=3, ffn 5, 1 layer, 4x4 tiles of 2x2 patches (n = 4 patches), 3 channels.
TOY = SimpleNamespace(
    text_config=SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=10),
    vision_config=SimpleNamespace(hidden_size=3, intermediate_size=5, num_hidden_layers=1, image_size=4,
                                  patch_size=2, num_channels=3),
    tie_word_embeddings=True)
# Its image geometry, given rather than derived: 2 tiles and 5 <image> tokens per image.
TOY_GEO = Geometry(image_hw=(4, 4), tiles_per_image=2, tokens_per_image=5, dummy_tiles=1, tile_px=4,
                   id_high=8, image_token_id=9, pad_token_id=0)

# ---------------------------------------------------------------------------- hand computations

# LLM, per token and layer, multiply-adds: q 4x4=16, k 4x2=8, v 4x2=8, o 4x4=16,
# gate 4x8=32, up 4x8=32, down 8x4=32 -> 144; x2 FLOPs x 2 layers = 576 FLOPs per token.
# Attention over s tokens, per layer: Q K^T s*s*4 + A V s*s*4 multiply-adds.
TOY_LLM_PER_TOKEN = 576


def test_llm_forward_flops_by_hand():
    f = cost.llm_forward_flops(TOY, 3)
    assert f["linear"] == 3 * 576 == 1728
    # 3 tokens: 2 x (9*4 + 9*4) multiply-adds per layer = 144 FLOPs, x 2 layers = 288; causal half
    assert f["attention"] == 144 and f["total"] == 1872
    assert cost.llm_forward_flops(TOY, 3, causal=False)["total"] == 1728 + 288
    # 26 tokens, causal: 26 * 576 + 2 layers * 2 * 2 * 26*26*4 / 2
    assert cost.llm_forward_flops(TOY, 26)["total"] == 14976 + 10816


def test_tower_and_projector_flops_by_hand():
    assert cost.patches_per_tile(TOY) == 4
    # per tile: patch embedding 4 patches x (3*2*2 -> 3) = 144 multiply-adds = 288 FLOPs;
    # the layer: q/k/v/o 4 x 3x3 + MLP 3x5 + 5x3 = 66 per patch x 4 = 264 MACs = 528 FLOPs,
    # attention Q K^T + A V 2 x 4*4*3 = 96 MACs = 192 FLOPs -> 288 + 528 + 192 = 1008 per tile
    assert cost.vision_forward_flops(TOY, 1) == 1008
    assert cost.vision_forward_flops(TOY, 3) == 3024
    assert cost.vision_forward_flops(TOY, 0) == 0
    # projector: 4 features x (3x4 + 4x4) = 112 MACs = 224 FLOPs per tile
    assert cost.projector_forward_flops(TOY, 2) == 448


def test_chunk_forward_flops_by_hand():
    # an image side: 14 template + 5 image tokens + "\n" + 1 text + 5 closing = 26 tokens;
    # a text side: 14 + 3 + 5 = 22 tokens, padded to 26
    img, txt = Side(1, True), Side(3, False)
    assert (img.length(TOY_GEO), txt.length(TOY_GEO)) == (26, 22)
    f = cost.chunk_forward_flops(TOY, [img, txt], TOY_GEO)
    llm26 = 26 * 576 + 2 * 2 * 2 * 26 * 26 * 4 / 2    # 25792
    llm22 = 22 * 576 + 2 * 2 * 2 * 22 * 22 * 4 / 2    # 20416
    assert f["llm"] == llm26 + llm22 == 46208
    assert f["llm_pad"] == 2 * llm26 - f["llm"] == 5376
    assert f["vision"] == 2 * 1008 and f["vision_dummy"] == 0       # one image of 2 tiles
    assert f["proj1"] == 2 * 2 * 4 * 3 * 4 and f["proj2"] == 2 * 2 * 4 * 4 * 4 and f["proj_dummy"] == 0
    assert (f["tokens"], f["padded_tokens"]) == (48, 52)
    # text only: no image tiles, the blank dummy image (1 tile) runs instead
    t = cost.chunk_forward_flops(TOY, [txt], TOY_GEO)
    assert t["vision"] == t["proj1"] == t["proj2"] == t["llm_pad"] == 0
    assert t["vision_dummy"] == 1008 and t["proj_dummy"] == 224 and t["llm"] == llm22


def test_step_flops_by_hand():
    # a step of one image chunk and one text-only chunk
    fwd = cost.sum_parts([cost.chunk_forward_flops(TOY, [Side(1, True), Side(3, False)], TOY_GEO),
                          cost.chunk_forward_flops(TOY, [Side(3, False)], TOY_GEO)])
    v, p1, p2, llm, pad, vd, pd = 2016, 192, 256, 66624, 5376, 1008, 224  # p1 + p2 = 448 (2 tiles)
    assert (fwd["vision"], fwd["proj1"], fwd["proj2"], fwd["llm"], fwd["llm_pad"], fwd["vision_dummy"],
            fwd["proj_dummy"]) == (v, p1, p2, llm, pad, vd, pd)
    plain = cost.step_flops(fwd, cached=False, checkpointing=False)
    # frozen tower forward only; projector layer 1 forward + weight gradient (2x), layer 2 and
    # the LLM forward + backward (3x); the dummy image's projector runs forward + half a backward
    assert plain["model"] == v + 2 * p1 + 3 * p2 + 3 * llm
    assert plain["hardware"] == v + vd + 2 * p1 + 3 * p2 + 2.5 * pd + 3 * (llm + pad)
    cached = cost.step_flops(fwd, cached=True, checkpointing=True)
    one_forward = v + p1 + p2 + llm + pad + vd + pd
    assert cached["hardware"] == plain["hardware"] + one_forward + (llm + pad)
    assert cached["model"] == plain["model"]
    assert cached["padding_waste"] == 5 * pad and cached["dummy"] == vd + pd


def test_vision_cache_removes_exactly_the_second_pass_tower_flops():
    fwd = cost.sum_parts([cost.chunk_forward_flops(TOY, [Side(1, True), Side(2, True)], TOY_GEO),
                          cost.chunk_forward_flops(TOY, [Side(3, False)], TOY_GEO)])
    for ckpt in (False, True):
        on = cost.step_flops(fwd, cached=True, checkpointing=ckpt, vision_cached=True)
        off = cost.step_flops(fwd, cached=True, checkpointing=ckpt, vision_cached=False)
        # 2 images x 2 tiles + the text chunk's dummy tile = 5 tower tiles of 1008 FLOPs
        assert off["hardware"] - on["hardware"] == 5 * 1008
        assert off["cache_extra_forward"] - on["cache_extra_forward"] == 5 * 1008
        assert on["model"] == off["model"]
        # the projector and the LLM still run twice
        assert on["cache_extra_forward"] == fwd["proj1"] + fwd["proj2"] + fwd["proj_dummy"] + fwd["llm"] \
            + fwd["llm_pad"]
    # no cache pass, or a tower that trains (its output needs autograd): the flag changes nothing
    assert cost.step_flops(fwd, cached=False, checkpointing=False, vision_cached=True) == \
        cost.step_flops(fwd, cached=False, checkpointing=False)
    assert cost.step_flops(fwd, cached=True, checkpointing=False, vision_trained=True, vision_cached=True) == \
        cost.step_flops(fwd, cached=True, checkpointing=False, vision_trained=True)


def test_step_flops_bookkeeping():
    fwd = {"vision": 10.0, "proj1": 1.0, "proj2": 2.0, "llm": 100.0, "llm_pad": 0.0,
           "vision_dummy": 0.0, "proj_dummy": 0.0}
    plain = cost.step_flops(fwd, cached=False, checkpointing=False)
    cached = cost.step_flops(fwd, cached=True, checkpointing=False)
    assert plain["model"] == cached["model"] == 10 + 2 * 1 + 3 * 2 + 3 * 100
    assert plain["hardware"] == plain["model"]
    assert cached["hardware"] - plain["hardware"] == 10 + 1 + 2 + 100  # one more forward
    ckpt = cost.step_flops(fwd, cached=True, checkpointing=True)
    assert ckpt["hardware"] - cached["hardware"] == 100
    # Frozen-vision cache: pass 2 does not run the tower (real or dummy images) again.
    fwd_dummy = dict(fwd, vision_dummy=4.0)
    vc = cost.step_flops(fwd_dummy, cached=True, checkpointing=False, vision_cached=True)
    no_vc = cost.step_flops(fwd_dummy, cached=True, checkpointing=False)
    assert no_vc["hardware"] - vc["hardware"] == 10 + 4 and vc["model"] == no_vc["model"]
    trained = cost.step_flops(fwd, cached=True, checkpointing=False, vision_trained=True, vision_cached=True)
    assert trained == cost.step_flops(fwd, cached=True, checkpointing=False, vision_trained=True)


def test_utilization():
    # 2 TFLOP in 2 s on a 1 TFLOP/s device: 100 %; half the speed, half the utilization
    assert cost.utilization(2e12, 2.0, 1.0) == 1.0
    assert cost.utilization(2e12, 4.0, 1.0) == 0.5
    assert cost.utilization(3e12, 1.0, 989.0) == pytest.approx(3 / 989)


# ---------------------------------------------------------------------------- against PyTorch

@pytest.mark.parametrize("name, kw", [("tiny", {}), ("0.5b", dict(llm_layers=1, vision_layers=1))])
def test_flop_formula_equals_flop_counter(name, kw):
    from torch.utils.flop_counter import FlopCounterMode

    from llave_ds.model.embedding import ModelConfig, build_embedding_model_from_config

    cfg = shapes.shape_config(name, **kw)
    if name != "tiny":  # a small vocabulary: the LM head never runs, so FLOPs do not depend on it
        data = cfg.to_dict()
        data["text_config"] = dict(data["text_config"], vocab_size=1024, pad_token_id=1000,
                                   bos_token_id=None, eos_token_id=None)
        data.update(image_token_index=1010, video_token_index=1011)
        data.pop("transformers_version", None)
        cfg = cfg.__class__.from_dict(data)
    geo = geometry_for(cfg, None)
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="llava_onevision", dtype="float32",
                                                               attn_implementation="eager"))
    gen = torch.Generator().manual_seed(0)
    rows = 2 if name == "tiny" else 1
    for frac in (1.0, 0.0):  # with images; text-only (dummy image)
        sides = make_sides(rows, frac, (10, 30), gen)
        chunk = build_chunk(sides, geo, gen)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**chunk)
        width = chunk["input_ids"].shape[1]  # the model runs padded rows
        tiles = sum(s.has_image for s in sides) * geo.tiles_per_image or geo.dummy_tiles
        expected = (len(sides) * cost.llm_forward_flops(cfg, width, causal=False)["total"]
                    + cost.vision_forward_flops(cfg, tiles) + cost.projector_forward_flops(cfg, tiles))
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------- memory model

@pytest.mark.parametrize("padding_mask", [True, False])
@pytest.mark.parametrize("name", ["tiny", "0.5b"])
def test_activation_formula_equals_saved_tensor_bytes(name, padding_mask):
    """With the padding mask (``model.padding_mask: always``), and without it (right padding
    under ``auto``: the model passes no mask and positions that run on through the padding)."""
    from transformers import Qwen2Model

    text = shapes.shape_config(name, llm_layers=1).text_config
    saved = {}
    B, s = 2, 48
    for layers in (1, 2):
        cfg = text.__class__.from_dict({**text.to_dict(), "num_hidden_layers": layers, "layer_types": None,
                                        "vocab_size": 300, "pad_token_id": 0, "bos_token_id": None,
                                        "eos_token_id": None})
        model = Qwen2Model._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").train()
        params = {p.data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 250, (B, s))
        mask = torch.ones(B, s, dtype=torch.long)
        mask[1, 30:] = 0  # padding: the additive mask is materialised
        if padding_mask:
            inputs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        else:
            inputs = dict(attention_mask=None, position_ids=torch.arange(s).expand(B, s))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False, **inputs)
        saved[layers] = sum(storages.values()) / (B * s)
    one = shapes.shape_config(name, llm_layers=1)
    act = cost.activation_bytes_per_token(one, checkpointing=False, seq_len=s, padding_mask=padding_mask)
    assert saved[2] - saved[1] == act["per_layer"]
    assert saved[1] == act["kept"]


def test_memory_model_components():
    cfg = shapes.shape_config("2b")
    counts = cost.param_counts(cfg)
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 2e8, "stage3_max_live_parameters": 1e9,
                                "stage3_prefetch_bucket_size": 2e8}}
    kw = dict(param_bytes=2, reduction="per_chunk", checkpointing=True, ds_config=ds, chunk_rows=16,
              chunk_width=1600, chunk_tiles=32)
    one = cost.predict_memory(cfg, counts, stage=3, world=1, **kw)
    eight = cost.predict_memory(cfg, counts, stage=3, world=8, **kw)
    P, T = counts["total"], counts["trainable"]
    assert one["params"] == 2 * P and eight["params"] == 2 * P / 8
    assert one["optimizer"] == 12 * T and eight["optimizer"] == 12 * T / 8
    assert one["activations"] == eight["activations"] > 0
    coalesced = cost.predict_memory(cfg, counts, stage=3, world=8, **dict(kw, reduction="coalesced"))
    assert coalesced["total"] - eight["total"] == 2 * T


@pytest.mark.parametrize("stage, ckpt", [(2, True), (3, True), (3, False)])
def test_memory_model_grows_with_the_chunk_size(stage, ckpt):
    cfg = shapes.shape_config("2b")
    counts = cost.param_counts(cfg)
    geo = Geometry(image_hw=(384, 384), tiles_per_image=2, tokens_per_image=1485, dummy_tiles=2, tile_px=384,
                   id_high=151643, image_token_id=151646, pad_token_id=151643)
    sides = [Side(40 + 5 * i, i % 2 == 0) for i in range(16)]
    ds = {"zero_optimization": {"stage": stage, "reduce_bucket_size": 2e8}}
    settings = dict(stage=stage, world=8, param_bytes=2, reduction="coalesced", checkpointing=ckpt, ds_config=ds)
    preds = [cost.predict_chunks_memory(cfg, counts, chunked(sides, c), geo, **settings) for c in (1, 2, 4, 8, 16)]
    totals = [p["total"] for p in preds]
    assert totals == sorted(totals) and len(set(totals)) == len(totals), totals   # strictly increasing
    for key in ("params", "grads", "optimizer", "coalesced_grads", "buffers"):   # the states do not move
        assert len({p[key] for p in preds}) == 1, key
    assert all(p["total"] - p["activations"] == preds[0]["total"] - preds[0]["activations"] for p in preds)
    # the cached step's peak is its largest chunk's; the uncached step keeps everything at once
    every = [cost.predict_memory(cfg, counts, chunk_rows=len(c), chunk_width=max(s.length(geo) for s in c),
                                 chunk_tiles=sum(s.has_image for s in c) * 2 or 2, **settings)
             for c in chunked(sides, 4)]
    assert preds[2]["total"] == max(p["total"] for p in every)
    together = cost.predict_chunks_memory(cfg, counts, [sides[:8], sides[8:]], geo, together=True, **settings)
    assert together["total"] > preds[3]["total"]


def test_checkpointing_lowers_the_predicted_activations():
    cfg = shapes.shape_config("0.5b")
    counts = cost.param_counts(cfg)
    kw = dict(stage=3, world=4, param_bytes=2, reduction="coalesced", ds_config={}, chunk_rows=8,
              chunk_width=1600, chunk_tiles=16)
    on = cost.predict_memory(cfg, counts, checkpointing=True, **kw)
    off = cost.predict_memory(cfg, counts, checkpointing=False, **kw)
    assert on["activations"] < off["activations"] and on["params"] == off["params"]
