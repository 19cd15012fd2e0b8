"""The throughput benchmark (llave_ds.bench) and the shape arithmetic it rests on (llave_ds.shapes).

* the real shapes have the published sizes, and the analytic parameter counts equal models
  built on the meta device (no memory, no download);
* the FLOP formula equals PyTorch's FlopCounterMode on real forwards (eager attention, so
  attention products are counted too): the tiny model and the 0.5B widths at 1+1 layers;
* the activation-memory formula equals the bytes autograd saves (saved-tensor hooks, bf16);
* the synthesised inputs have exactly the token counts and tensor shapes the InputFormatter
  produces, and the model accepts them;
* CPU smoke test: the benchmark on 2 gloo ranks with the tiny shape prints a table and one
  JSON line last with every reported field (no timing assertions).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from llave_ds import bench, shapes

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name, d, layers, heads, kv, ffn, vocab, tied", [
    ("llava-ov-0.5b", 896, 24, 14, 2, 4864, 151936, True),
    ("aquila-vl-2b", 1536, 28, 12, 2, 8960, 151936, True),
    ("llava-ov-7b", 3584, 28, 28, 4, 18944, 152064, False),
])
def test_real_shapes_have_the_published_sizes(name, d, layers, heads, kv, ffn, vocab, tied):
    cfg = shapes.shape_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size) == (d, layers, heads, kv, ffn, vocab)
    assert bool(cfg.tie_word_embeddings) is tied
    # SigLIP so400m/14-384 as LLaVA-OV runs it (27 layers, the last one dropped: 26).
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.image_size, v.patch_size,
            v.num_hidden_layers, v.vision_use_head) == (1152, 4304, 16, 384, 14, 26, False)
    assert cfg.image_grid_pinpoints[0] == [384, 384] and cfg.image_grid_pinpoints[-1] == [2304, 2304]
    assert shapes.resolve_shape({"llava-ov-0.5b": "0.5b", "aquila-vl-2b": "2b",
                                 "llava-ov-7b": "7b"}[name]).name == name


@pytest.mark.parametrize("name, kw", [("tiny", {}), ("tiny", dict(llm_layers=3, vision_layers=1)),
                                      ("0.5b", {}), ("2b", {}), ("7b", {}),
                                      ("2b", dict(llm_layers=2, vision_layers=1))])
def test_param_counts_equal_a_meta_model(name, kw):
    from transformers import LlavaOnevisionForConditionalGeneration

    cfg = shapes.shape_config(name, **kw)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(cfg)
    counts = shapes.param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision_tower"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    if kw:
        assert cfg.text_config.num_hidden_layers == kw["llm_layers"]
        assert cfg.vision_config.num_hidden_layers == kw["vision_layers"]


def test_trainable_count_matches_the_embedding_models_freezing():
    from llave_ds.model import ModelConfig, build_embedding_model_from_config, trainable_parameters

    cfg = shapes.shape_config("tiny")
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="llava_onevision", dtype="float32"))
    assert shapes.param_counts(cfg)["trainable"] == sum(p.numel() for p in trainable_parameters(model))


# ---------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("name, kw", [("tiny", {}), ("0.5b", dict(llm_layers=1, vision_layers=1))])
def test_flop_formula_equals_flop_counter(name, kw):
    from torch.utils.flop_counter import FlopCounterMode

    from llave_ds.model import ModelConfig, build_embedding_model_from_config

    cfg = shapes.shape_config(name, **kw)
    if name != "tiny":  # a small vocabulary: the LM head never runs, so FLOPs do not depend on it
        data = cfg.to_dict()
        data["text_config"] = dict(data["text_config"], vocab_size=1024, pad_token_id=1000,
                                   bos_token_id=None, eos_token_id=None)
        data.update(image_token_index=1010, video_token_index=1011)
        data.pop("transformers_version", None)
        cfg = cfg.__class__.from_dict(data)
    geo = bench.geometry_for(cfg, None)
    model = build_embedding_model_from_config(cfg, ModelConfig(backbone="llava_onevision", dtype="float32",
                                                               attn_implementation="eager"))
    gen = torch.Generator().manual_seed(0)
    rows = 2 if name == "tiny" else 1
    for frac in (1.0, 0.0):  # with images; text-only (dummy image)
        sides = bench.make_sides(rows, frac, (10, 30), gen)
        chunk = bench.build_chunk(sides, geo, gen)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**chunk)
        width = chunk["input_ids"].shape[1]  # the model runs padded rows
        tiles = sum(s.has_image for s in sides) * geo.tiles_per_image or geo.dummy_tiles
        expected = (len(sides) * shapes.llm_forward_flops(cfg, width, causal=False)["total"]
                    + shapes.vision_forward_flops(cfg, tiles) + shapes.projector_forward_flops(cfg, tiles))
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_step_flops_bookkeeping():
    fwd = {"vision": 10.0, "proj1": 1.0, "proj2": 2.0, "llm": 100.0, "llm_pad": 0.0,
           "vision_dummy": 0.0, "proj_dummy": 0.0}
    plain = bench.step_flops(fwd, cached=False, checkpointing=False)
    cached = bench.step_flops(fwd, cached=True, checkpointing=False)
    assert plain["model"] == cached["model"] == 10 + 2 * 1 + 3 * 2 + 3 * 100
    assert plain["hardware"] == plain["model"]
    assert cached["hardware"] - plain["hardware"] == 10 + 1 + 2 + 100  # one more forward
    ckpt = bench.step_flops(fwd, cached=True, checkpointing=True)
    assert ckpt["hardware"] - cached["hardware"] == 100
    # Frozen-vision cache: pass 2 does not run the tower (real or dummy images) again.
    fwd_dummy = dict(fwd, vision_dummy=4.0)
    vc = bench.step_flops(fwd_dummy, cached=True, checkpointing=False, vision_cached=True)
    no_vc = bench.step_flops(fwd_dummy, cached=True, checkpointing=False)
    assert no_vc["hardware"] - vc["hardware"] == 10 + 4 and vc["model"] == no_vc["model"]
    trained = bench.step_flops(fwd, cached=True, checkpointing=False, vision_trained=True, vision_cached=True)
    assert trained == bench.step_flops(fwd, cached=True, checkpointing=False, vision_trained=True)


# ---------------------------------------------------------------------------- memory model

@pytest.mark.parametrize("name", ["tiny", "0.5b"])
def test_activation_formula_equals_saved_tensor_bytes(name):
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
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                  use_cache=False)
        saved[layers] = sum(storages.values()) / (B * s)
    one = shapes.shape_config(name, llm_layers=1)
    act = shapes.activation_bytes_per_token(one, checkpointing=False, seq_len=s)
    assert saved[2] - saved[1] == act["per_layer"]
    assert saved[1] == act["kept"]


def test_memory_model_components():
    cfg = shapes.shape_config("2b")
    counts = shapes.param_counts(cfg)
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 2e8, "stage3_max_live_parameters": 1e9,
                                "stage3_prefetch_bucket_size": 2e8}}
    kw = dict(param_bytes=2, reduction="per_chunk", checkpointing=True, ds_config=ds, chunk_rows=16,
              chunk_width=1600, chunk_tiles=32)
    one = bench.predict_memory(cfg, counts, stage=3, world=1, **kw)
    eight = bench.predict_memory(cfg, counts, stage=3, world=8, **kw)
    P, T = counts["total"], counts["trainable"]
    assert one["params"] == 2 * P and eight["params"] == 2 * P / 8
    assert one["optimizer"] == 12 * T and eight["optimizer"] == 12 * T / 8
    assert one["activations"] == eight["activations"] > 0
    coalesced = bench.predict_memory(cfg, counts, stage=3, world=8, **dict(kw, reduction="coalesced"))
    assert coalesced["total"] - eight["total"] == 2 * T


# ---------------------------------------------------------------------------- inputs

@dataclass
class _Side:
    text: str
    image: Optional[object] = None


@pytest.mark.parametrize("hw", [(28, 28), (56, 56), (40, 70)])
def test_synthesised_chunks_match_the_input_formatter(hw):
    from PIL import Image

    from llave_ds.model import ModelConfig, build_embedding_model_from_config
    from llave_ds.processing import InputFormatter
    from llave_ds.tiny import build_tiny_processor

    cfg = shapes.shape_config("tiny")
    geo = bench.geometry_for(cfg, hw)
    fmt = InputFormatter(build_tiny_processor("llava_onevision"), "llava_onevision", max_length=512)
    image = Image.new("RGB", (hw[1], hw[0]), (120, 30, 200))
    real = fmt([_Side("<|image_1|> what is it?", image), _Side("describe", image)], "query")
    assert (real["input_ids"] == geo.image_token_id).sum(1).tolist() == [geo.tokens_per_image] * 2
    gen = torch.Generator().manual_seed(1)
    sides = [bench.Side(7, True), bench.Side(3, True)]
    synth = bench.build_chunk(sides, geo, gen)
    assert synth["pixel_values"].shape == real["pixel_values"].shape
    assert synth["image_sizes"].tolist() == real["image_sizes"].tolist()
    assert (synth["input_ids"] == geo.image_token_id).sum(1).tolist() == [geo.tokens_per_image] * 2
    assert synth["attention_mask"].sum(1).tolist() == [s.length(geo) for s in sides]
    assert not bool(synth["dummy_image"])
    # text-only chunk: the formatter's blank dummy image, same tensor shapes
    real_t = fmt([_Side("a caption")], "target")
    synth_t = bench.build_chunk([bench.Side(5, False)], geo, gen)
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
    assert bench.image_tiles_and_tokens(cfg, 384, 384) == (2, 1485)
    assert bench.image_tiles_and_tokens(cfg, 480, 640)[1] == 2929
    geo = bench.geometry_for(cfg, None)
    assert (geo.tiles_per_image, geo.tokens_per_image, geo.dummy_tiles) == (2, 1485, 2)
    assert geo.id_high == shapes.QWEN_ENDOFTEXT_ID  # text ids stay below the special tokens
    side = bench.Side(80, True)
    assert side.length(geo) == 14 + 1485 + 1 + 80 + 5


def test_sides_spread_images_evenly():
    gen = torch.Generator().manual_seed(0)
    sides = bench.make_sides(8, 0.5, (40, 120), gen)
    assert sum(s.has_image for s in sides) == 4
    assert all(40 <= s.text_tokens <= 120 for s in sides)
    assert all(s.has_image for s in bench.make_sides(5, 1.0, (1, 2), gen))
    assert not any(s.has_image for s in bench.make_sides(5, 0.0, (1, 2), gen))


def test_cli_has_the_bench_subcommand():
    from llave_ds.cli import build_parser

    args = build_parser().parse_args(["bench", "--shape", "tiny", "--device", "cpu", "--chunk-sizes", "2", "4",
                                      "--query-text-tokens", "10-20", "--image-size", "56x28"])
    assert args.command == "bench" and args.chunk_sizes == [2, 4]
    assert args.query_text_tokens == (10, 20) and args.image_size == (56, 28)


# ---------------------------------------------------------------------------- CPU smoke run

REQUIRED_ROW_FIELDS = (
    "stage", "ckpt", "chunk", "step_s", "samples_per_s", "samples_per_s_per_rank", "tokens_per_s",
    "tokens_per_s_per_rank", "model_tflop_per_step_per_rank", "hardware_tflop_per_step_per_rank",
    "mfu", "hfu", "phases_s", "bookkeeping_frac", "peak_memory_gib", "predicted_memory_gib",
    "predicted_memory", "uncached", "cached_over_uncached", "cached_over_uncached_flops",
)


def test_bench_cpu_smoke_two_ranks(tmp_path):
    json_out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--shape", "tiny", "--device", "cpu",
           "--ranks", "2", "--stages", "3", "--chunk-sizes", "2", "--pairs-per-rank", "4", "--steps", "2",
           "--warmup", "1", "--query-text-tokens", "10-30", "--target-text-tokens", "5-15",
           "--json-out", str(json_out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    assert result == json.loads(json_out.read_text())
    assert "zero" in proc.stdout and "MFU" in proc.stdout  # the human table came first
    assert result["benchmark"] == "throughput" and result["world_size"] == 2
    assert result["shape"] == "tiny" and result["device"] == "cpu"
    for key in ("params", "peak_tflops", "peak_source", "inputs", "targets", "versions", "global_batch"):
        assert key in result
    assert result["global_batch"] == 8
    (row,) = result["rows"]
    for key in REQUIRED_ROW_FIELDS:
        assert key in row, key
    assert set(row["phases_s"]) >= {"encode", "loss", "reencode_backward", "reduce", "step", "rest"}
    assert row["samples_per_s"] == pytest.approx(2 * row["samples_per_s_per_rank"])
    assert row["tokens_per_s"] == pytest.approx(2 * row["tokens_per_s_per_rank"])
    assert "step_s" in row["uncached"]
    assert row["model_tflop_per_step_per_rank"] > 0 and row["hardware_tflop_per_step_per_rank"] > \
        row["model_tflop_per_step_per_rank"]
    # ZeRO-3 with the defaults: blocks fetched whole, tower reused in pass 2, plain F.linear;
    # every hooked module fetch counted (2 chunks per role: 4 forwards, 4 re-forwards, 4 backwards).
    assert row["optimizations"] == {"fetch_units": ["Qwen2DecoderLayer", "SiglipEncoderLayer"],
                                    "vision_cache": True, "memory_efficient_linear": False}
    fetches = row["zero3_fetches_per_step"]
    assert fetches["forward"] > 0 and fetches["backward"] > 0
    assert row["zero3_fetches_per_chunk_pass"] == pytest.approx(sum(fetches.values()) / 12)
    assert "zero3 chunk=2:" in proc.stdout and "module fetches per step" in proc.stdout
    print(f"bench smoke run: {wall:.1f} s")


def test_predict_only_needs_no_model_or_device(capsys):
    from llave_ds.cli import main

    assert main(["bench", "--predict-only", "--shape", "2b", "--pairs-per-rank", "64", "--chunk-sizes", "16",
                 "--stages", "3", "--ckpt", "non_reentrant", "off", "--ranks", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["benchmark"] == "throughput-prediction" and result["world_size"] == 8
    on, off = result["rows"]
    # the cache re-runs every forward: cached/uncached hardware FLOPs between 1 and 1.5,
    # and checkpointing (a recompute in both) lowers the ratio and the MFU ceiling
    assert 1.2 < on["cached_over_uncached_flops"] < off["cached_over_uncached_flops"] < 1.5
    assert on["mfu_ceiling"] < off["mfu_ceiling"] < 0.75
    assert on["predicted_memory_gib"] < off["predicted_memory_gib"]
