"""Training throughput of the gradient-cached step at real architecture shapes.

    llave-ds bench --shape aquila-vl-2b --pairs-per-rank 64 --chunk-sizes 8 16 32
    python benchmarks/throughput.py --shape tiny --device cpu --ranks 2 --steps 2

Builds an embedding model of a real shape (``llave_ds.shapes``) with random weights,
synthesises the tensors the processor would produce for MMEB-like pairs (below), wraps it
in a DeepSpeed engine and times ``gradcache_step``: warm-up steps, then ``--steps`` timed
steps per configuration. Configurations: every ZeRO stage of ``--stages`` x activation
checkpointing mode of ``--ckpt`` (one engine each) x chunk size of ``--chunk-sizes``. Per
engine it also times the *uncached* step at the same local batch (one forward with
autograd over the whole local batch per role, loss, backward, step) where it fits.

Reported per configuration: samples/s and tokens/s (total and per rank), model FLOPs
per step, MFU and HFU against ``--peak-tflops`` or a measured matmul peak, peak memory per
rank against the memory model, the time split (no-grad encode, loss + gather, re-encode +
backward, gradient reduction, optimizer step, rest) and the cached/uncached ratio. The FLOP
formula and the memory model are written out in docs/PERFORMANCE.md. Output: a table, then
one JSON line last (also written to ``--json-out``).

Inputs (no tokenizer or image files needed). Each side is the Qwen chat prompt that
``llave_ds.processing.InputFormatter`` builds: 14 template tokens in front
(``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n`` in
Qwen's BPE), then for a side with an image the ``<image>`` tokens and ``\\n``, then the text,
then 5 closing tokens (``<|im_end|>\\n<|im_start|>assistant\\n``). Text tokens are random
ids, their count drawn uniformly from ``--query-text-tokens`` / ``--target-text-tokens``.
The image token count and the tile tensor shape come from transformers' own LLaVA-OV
processor classes for an image of ``--image-size`` (384x384 -> 2 tiles, 1485 tokens);
pixel values are random. A chunk without any image carries the blank dummy image, exactly
as the formatter does (tests/test_bench.py checks the synthesis against the formatter on
the tiny model).

Launch: ``--ranks N`` > 1 re-launches under torchrun (N local processes); under an
existing launcher (RANK set) it runs as one of the ranks.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from llave_ds import shapes

logger = logging.getLogger("llave_ds.bench")

TEMPLATE_HEAD_TOKENS = 14  # <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
TEMPLATE_TAIL_TOKENS = 5   # <|im_end|>\n<|im_start|>assistant\n
GIB = 2 ** 30

TARGETS = {
    "mfu_2b_min": 0.45,
    "cached_over_uncached_max": 1.40,
    "bookkeeping_frac_max": 0.02,
    "memory_rel_err_max": 0.15,
}


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------

def _int_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if lo_i < 0 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"expected LO-HI with 0 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def _image_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--shape", default="tiny", choices=shapes.shape_names(),
                   help="architecture shape (llave_ds.shapes); tiny for CPU")
    g.add_argument("--llm-layers", type=int, default=None, help="override the LLM's layer count")
    g.add_argument("--vision-layers", type=int, default=None, help="override the vision tower's layer count")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    g.add_argument("--train-vision-tower", action="store_true", help="unfreeze the tower (paper: frozen)")

    g = p.add_argument_group("inputs (per rank)")
    g.add_argument("--pairs-per-rank", type=int, default=8, help="local batch (pairs) per rank")
    g.add_argument("--image-size", type=_image_size, default=None,
                   help="HxW of every image (default: one tile, e.g. 384x384 -> 1485 tokens)")
    g.add_argument("--query-image-fraction", type=float, default=1.0)
    g.add_argument("--target-image-fraction", type=float, default=0.0)
    g.add_argument("--query-text-tokens", type=_int_range, default=(40, 120), help="LO-HI")
    g.add_argument("--target-text-tokens", type=_int_range, default=(10, 60), help="LO-HI")

    g = p.add_argument_group("what to run")
    g.add_argument("--ranks", type=int, default=1, help="local processes (torchrun re-launch when > 1)")
    g.add_argument("--stages", type=int, nargs="+", default=[3], choices=(0, 1, 2, 3))
    g.add_argument("--ckpt", nargs="+", default=["non_reentrant"], choices=("off", "non_reentrant"),
                   help="activation checkpointing modes to sweep")
    g.add_argument("--chunk-sizes", type=int, nargs="+", default=[4], help="query = target chunk size")
    g.add_argument("--reduction", choices=("coalesced", "per_chunk"), default="coalesced")
    g.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    g.add_argument("--uncached-steps", type=int, default=None,
                   help="timed uncached steps per engine (default: --steps; 0 = skip)")
    g.add_argument("--no-skip-predicted-oom", dest="skip_predicted_oom", action="store_false",
                   help="try configurations the memory model says will not fit")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads per rank on CPU (more than the free cores slows a run down badly)")

    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--ds-config", default=None,
                   help="base DeepSpeed JSON (default: ds_configs/zero<stage>.json)")
    g.add_argument("--persistence-threshold", type=float, default=None,
                   help="stage3_param_persistence_threshold override")
    g.add_argument("--prefetch-bucket", type=float, default=None, help="stage3_prefetch_bucket_size override")
    g.add_argument("--max-live", type=float, default=None, help="stage3_max_live_parameters override")
    g.add_argument("--max-reuse", type=float, default=None, help="stage3_max_reuse_distance override")
    g.add_argument("--no-fetch-units", action="store_true",
                   help="ZeRO-3: hook every submodule (no leaf decoder/vision blocks; the pre-#13 behaviour)")
    g.add_argument("--deepspeed-linear", action="store_true",
                   help="ZeRO-3: memory_efficient_linear true (DeepSpeed's default; llave-ds sets false)")
    g.add_argument("--no-vision-cache", action="store_true",
                   help="run the frozen tower again in pass 2 instead of reusing pass 1's features")
    g.add_argument("--count-comms", action="store_true",
                   help="DeepSpeed comms logger on: count collectives and bytes per step "
                        "(synchronises after every collective: do not read times from such a run)")

    g.add_argument("--predict-only", action="store_true",
                   help="print the FLOP and memory predictions for these settings (no model, no "
                        "process group, no device needed; --ranks is taken as the world size)")

    g = p.add_argument_group("reporting")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak of the device in the model dtype (default: measured with a matmul)")
    g.add_argument("--json-out", default=None, help="also write the JSON result here")
    g.add_argument("--label", default="", help="free text copied into the JSON")


# ---------------------------------------------------------------------------------------
# Inputs: what the processor would produce
# ---------------------------------------------------------------------------------------

@dataclass
class Geometry:
    image_hw: tuple[int, int]
    tiles_per_image: int
    tokens_per_image: int
    dummy_tiles: int
    tile_px: int
    id_high: int         # random text ids are drawn from [0, id_high)
    image_token_id: int
    pad_token_id: int


def _llava_processor(config):
    """transformers' LLaVA-OV image processor + processor for ``config``'s tiling, with the
    byte-level tokenizer of llave_ds.tiny (only its ``<image>`` token is used here)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from llave_ds.processing import LlavaOnevisionImageTextProcessor
    from llave_ds.tiny import build_tiny_tokenizer

    size = int(config.vision_config.image_size)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints)
    return LlavaOnevisionImageTextProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(),
        num_image_tokens=shapes.patches_per_tile(config),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio)


def image_tiles_and_tokens(config, height: int, width: int, processor=None) -> tuple[int, int]:
    """(tiles the vision tower runs, ``<image>`` tokens in the text) for one image, from
    the same transformers code the InputFormatter uses."""
    from PIL import Image

    processor = processor or _llava_processor(config)
    out = processor.image_processor([Image.new("RGB", (width, height))], return_tensors="pt")
    inputs = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"], "batch_num_images": [1]}
    tokens = len(processor.replace_image_token(inputs, 0)) // len(processor.image_token)
    return int(out["pixel_values"].shape[1]), int(tokens)


def geometry_for(config, image_hw: Optional[tuple[int, int]]) -> Geometry:
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


@dataclass
class Side:
    text_tokens: int
    has_image: bool

    def length(self, geo: Geometry) -> int:
        image = geo.tokens_per_image + 1 if self.has_image else 0  # "<image>"*n + "\n"
        return TEMPLATE_HEAD_TOKENS + image + self.text_tokens + TEMPLATE_TAIL_TOKENS


def make_sides(n: int, image_fraction: float, text_range: tuple[int, int], gen: torch.Generator) -> list[Side]:
    """n sides; side i has an image iff floor((i+1)f) > floor(i f) (evenly spread)."""
    lo, hi = text_range
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    frac = min(max(float(image_fraction), 0.0), 1.0)
    return [Side(int(t), math.floor((i + 1) * frac + 1e-9) > math.floor(i * frac + 1e-9))
            for i, t in enumerate(lengths)]


def build_chunk(sides: list[Side], geo: Geometry, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The keyword arguments of EmbeddingModel.forward for these sides (right padding)."""
    rows = []
    for side in sides:
        head = torch.randint(0, geo.id_high, (TEMPLATE_HEAD_TOKENS,), generator=gen)
        text = torch.randint(0, geo.id_high, (side.text_tokens,), generator=gen)
        tail = torch.randint(0, geo.id_high, (TEMPLATE_TAIL_TOKENS,), generator=gen)
        parts = [head]
        if side.has_image:
            parts.append(torch.full((geo.tokens_per_image,), geo.image_token_id, dtype=torch.long))
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
    px = geo.tile_px
    if n_images:
        pixel_values = torch.randn(n_images, geo.tiles_per_image, 3, px, px, generator=gen)
        image_sizes = torch.tensor([list(geo.image_hw)] * n_images, dtype=torch.long)
    else:  # InputFormatter's blank dummy image (one base-size image) and no image token
        pixel_values = torch.zeros(1, geo.dummy_tiles, 3, px, px)
        image_sizes = torch.tensor([[px, px]], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": image_sizes, "dummy_image": torch.tensor(n_images == 0)}


def to_device(chunk: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in chunk.items()}


def chunked(sides: list[Side], size: int) -> list[list[Side]]:
    return [sides[i:i + size] for i in range(0, len(sides), size)]


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------

def chunk_forward_flops(config, sides: list[Side], geo: Geometry) -> dict[str, float]:
    """Forward FLOPs of one chunk, split by part; 'llm_pad' is the extra of padded rows."""
    n_img = sum(s.has_image for s in sides)
    d, dv = config.text_config.hidden_size, config.vision_config.hidden_size
    n = shapes.patches_per_tile(config)
    width = max(s.length(geo) for s in sides)
    llm = sum(shapes.llm_forward_flops(config, s.length(geo))["total"] for s in sides)
    llm_padded = len(sides) * shapes.llm_forward_flops(config, width)["total"]
    tiles = n_img * geo.tiles_per_image
    dummy_tiles = 0 if n_img else geo.dummy_tiles
    return {
        "vision": shapes.vision_forward_flops(config, tiles),
        "proj1": tiles * 2.0 * n * dv * d, "proj2": tiles * 2.0 * n * d * d,
        "llm": llm, "llm_pad": llm_padded - llm,
        "vision_dummy": shapes.vision_forward_flops(config, dummy_tiles),
        "proj_dummy": dummy_tiles * 2.0 * n * (dv * d + d * d),
        "tokens": float(sum(s.length(geo) for s in sides)), "padded_tokens": float(len(sides) * width),
    }


def _sum_parts(parts: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


def step_flops(fwd: dict[str, float], cached: bool, checkpointing: bool, vision_trained: bool = False,
               vision_cached: bool = False) -> dict[str, float]:
    """Model and hardware FLOPs of one step from the summed chunk forward FLOPs.

    model    = V * (3 if the tower trains else 1) + 2*P1 + 3*P2 + 3*LLM
               (frozen tower: forward only; projector layer 1: forward + weight gradient, its
               input needs none; layer 2 and the LLM: forward + 2x for backward)
    hardware = model + padding waste + dummy images + [cache: one more no-grad forward of
               everything] + [checkpointing: one more LLM forward]
               - [frozen-vision cache: pass 2 reuses pass 1's tower output, so the tower
               (real and dummy images) runs once, not twice]
    """
    v, p1, p2, llm, pad = fwd["vision"], fwd["proj1"], fwd["proj2"], fwd["llm"], fwd["llm_pad"]
    vd, pd = fwd["vision_dummy"], fwd["proj_dummy"]
    vision_factor = 3.0 if vision_trained else 1.0
    model = vision_factor * v + 2 * p1 + 3 * p2 + 3 * llm
    forward_all = v + p1 + p2 + llm + pad + vd + pd
    hardware = (vision_factor * (v + vd) + 2 * p1 + 3 * p2 + 2.5 * pd + 3 * (llm + pad))
    extra_cache = forward_all if cached else 0.0
    if cached and vision_cached and not vision_trained:
        extra_cache -= v + vd
    extra_ckpt = (llm + pad) if checkpointing else 0.0
    hardware += extra_cache + extra_ckpt
    return {"model": model, "hardware": hardware, "cache_extra_forward": extra_cache,
            "checkpoint_recompute": extra_ckpt, "padding_waste": 3 * pad + (pad if cached else 0) +
            (pad if checkpointing else 0), "dummy": vd + pd}


# ---------------------------------------------------------------------------------------
# Memory model
# ---------------------------------------------------------------------------------------

def predict_memory(config, counts: dict, *, stage: int, world: int, param_bytes: int,
                   reduction: str, checkpointing: bool, ds_config: dict,
                   chunk_rows: int, chunk_width: int, chunk_tiles: int,
                   persistent_params: int = 0) -> dict[str, float]:
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
                (shapes.activation_bytes_per_token) + one layer recomputed (checkpointing)
                + the projector's saved inputs (tiles * n * (dv + 2d) * b)
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
    act = shapes.activation_bytes_per_token(config, checkpointing, chunk_width, act_bytes=b)
    n = shapes.patches_per_tile(config)
    d, dv = config.text_config.hidden_size, config.vision_config.hidden_size
    tokens = chunk_rows * chunk_width
    activations = tokens * (act["kept"] + act["transient"]) + chunk_tiles * n * (dv + 2 * d) * b
    total = params + grads + optim + coalesced + buffers + activations
    return {"params": params, "grads": grads, "optimizer": optim, "coalesced_grads": coalesced,
            "buffers": buffers, "activations": activations, "total": total}


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedBackend:
    """A StepBackend wrapper that marks phase boundaries with a device synchronisation.

    gradcache_step's own timings read the host clock without synchronising, so on a GPU
    they measure kernel launches; here each boundary waits for the device: end of the
    no-grad pass (after the expected number of no-grad encodes), start of pass 2 (first
    encode with autograd), end of the last backward, start and end of ``step()``.
    """

    def __init__(self, inner, no_grad_encodes: int = 0):
        self.inner = inner
        self.device = inner.device
        self.gradient_average_divisor = inner.gradient_average_divisor
        self.no_grad_encodes = no_grad_encodes
        self.marks: dict[str, float] = {}
        self._n_no_grad = 0

    @property
    def reduction(self) -> str:
        return getattr(self.inner, "reduction", "coalesced")

    def _mark(self, name: str) -> None:
        _sync(self.device)
        self.marks[name] = time.perf_counter()

    def begin(self) -> None:
        self.marks = {}
        self._n_no_grad = 0
        self._mark("start")

    def encode(self, chunk):
        grad = torch.is_grad_enabled()
        if grad and "pass2_start" not in self.marks:
            self._mark("pass2_start")
        elif not grad and self._n_no_grad == 0:
            self._mark("pass1_start")
        out = self.inner.encode(chunk)
        if not grad:
            self._n_no_grad += 1
            if self._n_no_grad == self.no_grad_encodes:
                self._mark("pass1_end")
        return out

    def backward(self, surrogate, last: bool) -> None:
        self.inner.backward(surrogate, last)
        if last:
            self._mark("backward_end")

    def reduction_context(self, mode: str):
        return self.inner.reduction_context(mode)

    def step(self) -> dict:
        self._mark("step_start")
        info = self.inner.step()
        self._mark("step_end")
        return info

    def cached_phases(self, end: float) -> dict[str, float]:
        """Phase durations of the last cached step. A step that gradcache_step skipped (a
        non-finite loss: no pass 2) has only encode and loss; the rest counts as 'rest'."""
        m = self.marks
        order = [("encode", "pass1_start", "pass1_end"), ("loss", "pass1_end", "pass2_start"),
                 ("reencode_backward", "pass2_start", "backward_end"),
                 ("reduce", "backward_end", "step_start"), ("step", "step_start", "step_end")]
        phases = {name: (m[b] - m[a]) if (a in m and b in m) else 0.0 for name, a, b in order}
        phases["rest"] = (end - m["start"]) - sum(phases.values())
        return phases


def plain_step(backend: TimedBackend, query: dict, target: dict, objective) -> dict[str, float]:
    """The uncached step: both roles forward with autograd over the whole local batch, the
    loss (with the same cross-rank gather), one backward, one optimizer step."""
    from llave_ds.gather import is_distributed
    from llave_ds.objective import hardness_weighted_loss

    backend.begin()
    q = backend.encode(query).float()
    t = backend.encode(target).float()
    backend._mark("forward_end")
    out = hardness_weighted_loss(
        q, t, temperature=objective.temperature, alpha=objective.alpha, symmetric=objective.symmetric,
        gather_mode=objective.gather_mode if is_distributed() else None)
    backend._mark("loss_end")
    with backend.reduction_context(backend.reduction):
        backend.backward(out.loss * float(backend.gradient_average_divisor), last=True)
    backend.step()
    end = time.perf_counter()
    m = backend.marks
    return {"forward": m["forward_end"] - m["start"], "loss": m["loss_end"] - m["forward_end"],
            "backward": m["backward_end"] - m["loss_end"], "reduce": m["step_start"] - m["backward_end"],
            "step": m["step_end"] - m["step_start"], "total": end - m["start"]}


# ---------------------------------------------------------------------------------------
# Device facts
# ---------------------------------------------------------------------------------------

def measure_peak_tflops(device: torch.device, dtype: torch.dtype, trials: int = 5) -> float:
    """Matmul rate on this device, random operands: 8192^3 (CUDA, 10 products per trial) or
    1024^3 (CPU, 5 per trial), after 3 warm-ups; the best of ``trials`` trials (a shared
    CPU is slowed by other jobs at moments; the best trial is the least disturbed one)."""
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    del a, b
    return 2.0 * n ** 3 / best / 1e12


def _read_status_kib(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of this rank over a window: CUDA allocator peak, or on CPU the process's
    peak RSS (VmHWM, reset through /proc/self/clear_refs where the kernel allows it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_rss = (_read_status_kib("VmRSS") or 0) * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"peak_allocated": float(torch.cuda.max_memory_allocated(self.device)),
                    "peak_reserved": float(torch.cuda.max_memory_reserved(self.device)),
                    "kind": "cuda_max_memory_allocated"}
        hwm = (_read_status_kib("VmHWM") or 0) * 1024
        return {"peak_allocated": float(hwm - self.baseline_rss), "peak_rss": float(hwm),
                "kind": "host_rss_minus_baseline"}


# ---------------------------------------------------------------------------------------
# One engine
# ---------------------------------------------------------------------------------------

def ds_config_for(args, stage: int, local_batch: int, world: int, ckpt: str, bf16: bool) -> dict:
    from llave_ds.engine import complete_ds_config, load_ds_config

    from llave_ds.config import shipped_file

    path = args.ds_config or shipped_file("deepspeed", f"zero{stage if stage in (2, 3) else 2}")
    cfg = load_ds_config(path)
    zo = cfg.setdefault("zero_optimization", {})
    zo["stage"] = stage
    overrides = {"stage3_param_persistence_threshold": args.persistence_threshold,
                 "stage3_prefetch_bucket_size": args.prefetch_bucket,
                 "stage3_max_live_parameters": args.max_live,
                 "stage3_max_reuse_distance": args.max_reuse}
    if stage == 3:
        for key, value in overrides.items():
            if value is not None:
                zo[key] = int(value)
        if args.no_fetch_units:
            zo["leaf_module"] = {"classes": []}  # a config of its own: llave-ds adds no fetch units
        if args.deepspeed_linear:
            zo["memory_efficient_linear"] = True
    else:
        for key in list(zo):
            if key.startswith("stage3_"):
                zo.pop(key)
    if args.count_comms:
        cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    cfg["steps_per_print"] = 10 ** 9
    cfg["wall_clock_breakdown"] = False
    return complete_ds_config(cfg, local_batch_size=local_batch, world_size=world, gradient_clipping=1.0,
                              activation_checkpointing=ckpt, bf16=bf16)


def build_model(hf_config, args, dtype_name: str, ckpt: str, ds_cfg: dict, device: torch.device):
    from llave_ds.model import ModelConfig, build_embedding_model_from_config

    mcfg = ModelConfig(backbone="llava_onevision", dtype=dtype_name, attn_implementation=args.attn,
                       freeze_vision_tower=not args.train_vision_tower, gradient_checkpointing=ckpt,
                       cache_frozen_vision=not args.no_vision_cache)
    stage3 = int(ds_cfg.get("zero_optimization", {}).get("stage", 0)) == 3
    if device.type == "cuda" and not stage3:
        # Initialise on the GPU (seconds instead of a minute of CPU init for 2B+ shapes).
        try:
            with torch.device(device):
                model = build_embedding_model_from_config(hf_config, mcfg, deepspeed_config=ds_cfg)
            if any(p.is_meta for p in model.parameters()):
                raise RuntimeError("parameters left on the meta device")
            return model
        except Exception as exc:  # noqa: BLE001 - fall back to the ordinary CPU build
            logger.warning("building on %s failed (%r); building on the CPU", device, exc)
            _free(device)
    return build_embedding_model_from_config(hf_config, mcfg, deepspeed_config=ds_cfg)


def _comms_snapshot() -> dict:
    try:
        import deepspeed.comm as dscomm
        raw = dscomm.comms_logger.comms_dict
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for name, sizes in raw.items():
        count = sum(v[0] for v in sizes.values())
        nbytes = sum(size * v[0] for size, v in sizes.items())
        # (the logger's latencies are cumulative timer readings in 0.19.8: not reported)
        out[name] = {"count": count, "bytes": nbytes}
    return out


def _comms_reset() -> None:
    with contextlib.suppress(Exception):
        import deepspeed.comm as dscomm
        dscomm.comms_logger.comms_dict = {}


def _persistent_numel(module) -> int:
    return sum(p.ds_numel for p in module.parameters() if getattr(p, "ds_persist", False))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_engine(args, env, hf_config, counts, geo, sides_q, sides_t, stage, ckpt, dtype_name,
               device, peak_tflops, probe, on_row=None) -> list[dict]:
    from llave_ds.engine import DeepSpeedStepBackend, build_engine, build_optimizer, count_zero3_fetches
    from llave_ds.gradcache import gradcache_step
    from llave_ds.model import trainable_parameters
    from llave_ds.objective import ObjectiveConfig

    world = env.world_size
    B = args.pairs_per_rank
    bf16 = dtype_name == "bfloat16"
    pbytes = 2 if bf16 else 4
    ds_cfg = ds_config_for(args, stage, B, world, ckpt, bf16)
    objective = ObjectiveConfig()
    gen = torch.Generator().manual_seed(args.seed * 7919 + env.rank)
    checkpointing = ckpt != "off"
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None

    def predicted_for(chunk_sides_lists, together: bool = False):
        """Peak over chunks (cached: one chunk at a time), or all lists alive at once
        (uncached: both roles' activations are kept until the backward)."""
        preds = []
        for c in chunk_sides_lists:
            tiles = sum(s.has_image for s in c) * geo.tiles_per_image or geo.dummy_tiles
            preds.append(predict_memory(
                hf_config, counts, stage=stage, world=world, param_bytes=pbytes,
                reduction=args.reduction, checkpointing=checkpointing, ds_config=ds_cfg,
                chunk_rows=len(c), chunk_width=max(s.length(geo) for s in c), chunk_tiles=tiles,
                persistent_params=persistent))
        if not together:
            return max(preds, key=lambda p: p["total"])
        out = dict(preds[0])
        extra = sum(p["activations"] for p in preds[1:])
        out["activations"] += extra
        out["total"] += extra
        return out

    rows_out: list[dict] = []
    persistent = 0
    t_build = time.perf_counter()
    model = build_model(hf_config, args, dtype_name, ckpt, ds_cfg, device)
    optimizer = build_optimizer(trainable_parameters(model), ds_cfg, lr=1e-5, weight_decay=0.0)
    engine = build_engine(model, optimizer, ds_cfg)
    build_s = time.perf_counter() - t_build
    vision_cached = model.vision_cache is not None
    fetch_units = model.zero3_fetch_units() if stage == 3 and not args.no_fetch_units else []
    optimizations = {"fetch_units": fetch_units, "vision_cache": vision_cached,
                     "memory_efficient_linear": bool(ds_cfg["zero_optimization"].get("memory_efficient_linear", True))
                     if stage == 3 else None}
    if stage == 3:
        persistent = _persistent_numel(engine.module)
    backend = DeepSpeedStepBackend(engine, reduction=args.reduction)
    broken = ""  # after an out-of-memory inside a step the engine's state is not trusted
    try:
        for chunk in args.chunk_sizes:
            if broken:
                rows_out.append({"stage": stage, "ckpt": ckpt, "chunk": chunk, "reduction": args.reduction,
                                 "skipped": f"not run: {broken}"})
                continue
            q_lists, t_lists = chunked(sides_q, chunk), chunked(sides_t, chunk)
            pred = predicted_for(q_lists + t_lists)
            row = {"stage": stage, "ckpt": ckpt, "chunk": chunk, "reduction": args.reduction,
                   "build_s": build_s, "predicted_memory": pred}
            if args.skip_predicted_oom and capacity and pred["total"] > 0.95 * capacity:
                row["skipped"] = f"predicted {pred['total'] / GIB:.1f} GiB > 95% of {capacity / GIB:.1f} GiB"
                rows_out.append(row)
                if on_row:
                    on_row(row)
                continue
            q_chunks = [to_device(build_chunk(c, geo, gen), device) for c in q_lists]
            t_chunks = [to_device(build_chunk(c, geo, gen), device) for c in t_lists]
            fwd = _sum_parts([chunk_forward_flops(hf_config, c, geo) for c in q_lists + t_lists])
            timed = TimedBackend(backend, no_grad_encodes=len(q_chunks) + len(t_chunks))
            times, phases, comms, skipped_steps = [], [], [], 0
            try:
                # Fetches are counted over every step, warm-up included: each step runs the same chunks.
                with (count_zero3_fetches() if stage == 3 else contextlib.nullcontext({})) as fetches:
                    for i in range(args.warmup + args.steps):
                        if i == args.warmup:
                            probe.reset()
                            _comms_reset()
                        timed.begin()
                        res = gradcache_step(timed, q_chunks, t_chunks, objective)
                        end = time.perf_counter()
                        if i >= args.warmup:
                            skipped_steps += int(bool(getattr(res, "skipped", False)))
                            times.append(end - timed.marks["start"])
                            phases.append({**timed.cached_phases(end),
                                           **{f"gc_{k}": v for k, v in res.timings.items()}})
                loss = float(res.output.loss.detach())
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise
                row["skipped"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
                broken = f"an earlier configuration of this engine ran out of memory (chunk {chunk})"
            if broken:
                rows_out.append(row)
                if on_row:
                    on_row(row)
                res = timed = q_chunks = t_chunks = None
                _free(device)
                continue
            mem = probe.peak()
            if args.count_comms and args.steps:
                snap = _comms_snapshot()
                comms = {k: {key: val / args.steps for key, val in v.items()} for k, v in snap.items()}
            step_s = statistics.median(times)
            median_phases = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
            flops = step_flops(fwd, cached=True, checkpointing=checkpointing,
                               vision_trained=args.train_vision_tower, vision_cached=vision_cached)
            bookkeeping = median_phases["loss"] + median_phases["rest"]
            row.update({
                "step_s": step_s, "step_s_all": times, "loss": loss,
                "samples_per_s": B * world / step_s, "samples_per_s_per_rank": B / step_s,
                "tokens_per_step_per_rank": fwd["tokens"], "padded_tokens_per_step_per_rank": fwd["padded_tokens"],
                "tokens_per_s": fwd["tokens"] * world / step_s, "tokens_per_s_per_rank": fwd["tokens"] / step_s,
                "model_tflop_per_step_per_rank": flops["model"] / 1e12,
                "hardware_tflop_per_step_per_rank": flops["hardware"] / 1e12,
                "flops_split_tflop": {k: v / 1e12 for k, v in flops.items()},
                "forward_split_tflop": {k: v / 1e12 for k, v in fwd.items() if k not in ("tokens", "padded_tokens")},
                "mfu": flops["model"] / step_s / (peak_tflops * 1e12),
                "hfu": flops["hardware"] / step_s / (peak_tflops * 1e12),
                "phases_s": median_phases,
                "bookkeeping_frac": bookkeeping / step_s,
                "memory": mem, "peak_memory_gib": mem["peak_allocated"] / GIB,
                "predicted_memory_gib": pred["total"] / GIB,
                "memory_rel_err": (mem["peak_allocated"] - pred["total"]) / pred["total"],
                "chunks_per_role": len(q_chunks), "skipped_steps": skipped_steps,
                "comms_per_step": comms, "optimizations": optimizations,
                "zero3_fetches_per_step": {k: v / (args.warmup + args.steps) for k, v in fetches.items()},
                "zero3_fetches_per_chunk_pass": (sum(fetches.values()) / (args.warmup + args.steps)
                                                 / (3 * (len(q_chunks) + len(t_chunks)))) if fetches else None,
            })
            rows_out.append(row)
            if on_row:
                on_row(row)
            res = timed = q_chunks = t_chunks = None
        # ---- the uncached step at the same local batch (one chunk per role) ------------
        n_unc = args.steps if args.uncached_steps is None else args.uncached_steps
        uncached = None
        if n_unc > 0:
            pred_u = predicted_for([sides_q, sides_t], together=True)
            uncached = {"predicted_memory_gib": pred_u["total"] / GIB}
            if broken:
                uncached["skipped"] = f"not run: {broken}"
            elif args.skip_predicted_oom and capacity and pred_u["total"] > 0.95 * capacity:
                uncached["skipped"] = f"predicted {pred_u['total'] / GIB:.1f} GiB > 95% of {capacity / GIB:.1f} GiB"
            else:
                q_all = to_device(build_chunk(sides_q, geo, gen), device)
                t_all = to_device(build_chunk(sides_t, geo, gen), device)
                timed = TimedBackend(backend)
                try:
                    results = []
                    for i in range(args.warmup + n_unc):
                        if i == args.warmup:
                            probe.reset()
                        r = plain_step(timed, q_all, t_all, objective)
                        if i >= args.warmup:
                            results.append(r)
                    mem = probe.peak()
                    fwd_u = _sum_parts([chunk_forward_flops(hf_config, sides_q, geo),
                                        chunk_forward_flops(hf_config, sides_t, geo)])
                    fl_u = step_flops(fwd_u, cached=False, checkpointing=checkpointing,
                                      vision_trained=args.train_vision_tower)
                    uncached.update({
                        "step_s": statistics.median(r["total"] for r in results),
                        "phases_s": {k: statistics.median(r[k] for r in results) for k in results[0]},
                        "peak_memory_gib": mem["peak_allocated"] / GIB,
                        "hardware_tflop_per_step_per_rank": fl_u["hardware"] / 1e12,
                        "mfu": fl_u["model"] / statistics.median(r["total"] for r in results) / (peak_tflops * 1e12),
                    })
                except Exception as exc:  # noqa: BLE001
                    if not _is_oom(exc):
                        raise
                    uncached["skipped"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
                del q_all, t_all
        for row in rows_out:
            if uncached is None or "step_s" not in row:
                continue
            row["uncached"] = uncached
            if "step_s" in uncached:
                row["cached_over_uncached"] = row["step_s"] / uncached["step_s"]
                row["cached_over_uncached_flops"] = (row["hardware_tflop_per_step_per_rank"]
                                                     / uncached["hardware_tflop_per_step_per_rank"])
    finally:
        with contextlib.suppress(Exception):
            engine.destroy()
        del backend, engine, optimizer, model
        _free(device)
        with contextlib.suppress(Exception):
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
    return rows_out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def _fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def format_table(result: dict) -> str:
    lines = []
    r = result
    lines.append(f"llave-ds bench: {r['shape']} ({r['params']['total'] / 1e6:.1f} M params, "
                 f"{r['params']['trainable'] / 1e6:.1f} M trained; {r['llm_layers']} LLM + "
                 f"{r['vision_layers']} vision layers) on {r['device_name']} x{r['world_size']}, "
                 f"{r['dtype']}, {r['pairs_per_rank']} pairs/rank, image {r['inputs']['image_hw'][0]}x"
                 f"{r['inputs']['image_hw'][1]} = {r['inputs']['tiles_per_image']} tiles / "
                 f"{r['inputs']['tokens_per_image']} tokens; peak {r['peak_tflops']:.4g} TFLOP/s ({r['peak_source']})")
    head = (f"{'zero':>4} {'ckpt':>5} {'chunk':>5} {'step s':>8} {'samp/s':>8} {'tok/s/rank':>10} "
            f"{'MFU':>6} {'HFU':>6} {'enc':>6} {'loss':>6} {'re+bwd':>6} {'red':>6} {'opt':>6} {'rest':>6} "
            f"{'bk %':>5} {'mem GiB':>8} {'pred':>6} {'c/u':>5} {'c/u fl':>6}")
    lines.append(head)
    for row in r["rows"]:
        ck = "on" if row["ckpt"] != "off" else "off"
        if "step_s" not in row:
            lines.append(f"{row['stage']:>4} {ck:>5} {row['chunk']:>5}  skipped: {row.get('skipped', '?')}")
            continue
        ph = row["phases_s"]
        lines.append(
            f"{row['stage']:>4} {ck:>5} {row['chunk']:>5} {row['step_s']:>8.3f} {row['samples_per_s']:>8.2f} "
            f"{row['tokens_per_s_per_rank']:>10.0f} {row['mfu'] * 100:>5.1f}% {row['hfu'] * 100:>5.1f}% "
            f"{ph['encode']:>6.3f} {ph['loss']:>6.3f} {ph['reencode_backward']:>6.3f} {ph['reduce']:>6.3f} "
            f"{ph['step']:>6.3f} {ph['rest']:>6.3f} {row['bookkeeping_frac'] * 100:>5.1f} "
            f"{row['peak_memory_gib']:>8.2f} {row['predicted_memory_gib']:>6.2f} "
            f"{_fmt(row.get('cached_over_uncached'), '.2f'):>5} {_fmt(row.get('cached_over_uncached_flops'), '.2f'):>6}")
    for row in r["rows"]:
        f, opt = row.get("zero3_fetches_per_step"), row.get("optimizations")
        if f:
            lines.append(f"zero3 chunk={row['chunk']}: {f['forward']:.0f} forward + {f['backward']:.0f} backward "
                         f"module fetches per step ({row['zero3_fetches_per_chunk_pass']:.1f} per chunk pass)")
        if opt:
            units = ", ".join(opt["fetch_units"]) or "none"
            lines.append(f"zero{row['stage']} chunk={row['chunk']}: fetch units {units}; vision cache "
                         f"{'on' if opt['vision_cache'] else 'off'}; memory_efficient_linear "
                         f"{opt['memory_efficient_linear']}")
    unc = [(row["stage"], row["ckpt"], row.get("uncached")) for row in r["rows"] if row.get("uncached")]
    seen = set()
    for stage, ckpt, u in unc:
        if (stage, ckpt) in seen:
            continue
        seen.add((stage, ckpt))
        if "step_s" in u:
            lines.append(f"uncached (zero {stage}, ckpt {ckpt}): step {u['step_s']:.3f} s, MFU {u['mfu'] * 100:.1f}%, "
                         f"peak {u['peak_memory_gib']:.2f} GiB (predicted {u['predicted_memory_gib']:.2f})")
        else:
            lines.append(f"uncached (zero {stage}, ckpt {ckpt}): {u.get('skipped')}")
    lines.append("MFU = model FLOPs (frozen tower forward + projector + 3x LLM forward, no cache, no "
                 "recompute) / (step time x peak); HFU counts every FLOP run (cache pass, recompute, "
                 "padding, dummy images). bk % = loss + gather + bookkeeping share of the step. "
                 "c/u = cached / uncached step time; c/u fl = the same ratio in hardware FLOPs.")
    if r["device"] == "cpu":
        lines.append("CPU: memory columns are host RSS growth over the pre-build baseline (not the device "
                     "memory the model predicts).")
    return "\n".join(lines)


def evaluate_targets(result: dict) -> dict:
    """Which of the issue's targets the measured rows meet (reported, never asserted)."""
    out = {}
    rows = [r for r in result["rows"] if "step_s" in r]
    if not rows:
        return out
    best = max(rows, key=lambda r: r["mfu"])
    out["best_mfu"] = {"value": best["mfu"], "target": TARGETS["mfu_2b_min"], "applies": result["shape"] in (
        "aquila-vl-2b", "2b") and result["device"] == "cuda", "met": best["mfu"] >= TARGETS["mfu_2b_min"]}
    ratios = [r["cached_over_uncached"] for r in rows if "cached_over_uncached" in r]
    if ratios:
        out["cached_over_uncached"] = {"value": min(ratios), "target": TARGETS["cached_over_uncached_max"],
                                       "met": min(ratios) <= TARGETS["cached_over_uncached_max"]}
    bk = min(r["bookkeeping_frac"] for r in rows)
    out["bookkeeping_frac"] = {"value": bk, "target": TARGETS["bookkeeping_frac_max"],
                               "met": bk <= TARGETS["bookkeeping_frac_max"]}
    z3 = [r for r in rows if r["stage"] == 3]
    if z3 and result["device"] == "cuda":
        err = max(abs(r["memory_rel_err"]) for r in z3)
        out["zero3_memory_rel_err"] = {"value": err, "target": TARGETS["memory_rel_err_max"],
                                       "met": err <= TARGETS["memory_rel_err_max"]}
    return out


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------

def _quiet_logs(rank: int) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR if rank else logging.WARNING)
    with contextlib.suppress(Exception):
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.ERROR if rank else logging.WARNING)
    with contextlib.suppress(Exception):
        import transformers
        transformers.logging.set_verbosity_error()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return torch.device(name)


def worker(args) -> dict:
    from llave_ds import distributed

    device_kind = resolve_device(args.device)
    if device_kind.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if device_kind.type == "cuda" else "gloo"
    env = distributed.init_distributed(timeout_s=900, backend=backend)
    _quiet_logs(env.rank)
    if device_kind.type == "cuda":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, args.cpu_threads))
        device_name = f"cpu ({os.cpu_count()} cores visible, {torch.get_num_threads()} threads/rank)"
    from llave_ds.engine import attach_deepspeed_comm
    attach_deepspeed_comm()
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    torch.manual_seed(args.seed)

    hf_config = shapes.shape_config(args.shape, args.llm_layers, args.vision_layers)
    counts = shapes.param_counts(hf_config)
    if args.train_vision_tower:
        counts = dict(counts, trainable=counts["trainable"] + counts["vision_tower"])
    geo = geometry_for(hf_config, args.image_size)
    gen = torch.Generator().manual_seed(args.seed * 1000 + env.rank)
    sides_q = make_sides(args.pairs_per_rank, args.query_image_fraction, args.query_text_tokens, gen)
    sides_t = make_sides(args.pairs_per_rank, args.target_image_fraction, args.target_text_tokens, gen)

    if args.peak_tflops:
        peak, peak_source = float(args.peak_tflops), "given"
    else:
        peak, peak_source = measure_peak_tflops(device, dtype), f"measured {dtype_name} matmul"
    probe = MemoryProbe(device)

    rows: list[dict] = []      # rows of finished engines
    pending: list[dict] = []   # every row so far (the uncached numbers join at each engine's end)
    result: dict = {}

    def dump_partial() -> None:
        """The rows so far in --json-out, marked partial: a run killed by a time limit still
        leaves what it measured (the final write replaces it)."""
        if env.rank == 0 and args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(dict(result, rows=pending, partial=True), default=float) + "\n")

    def collect(row: dict) -> None:
        pending.append(row)
        if env.rank != 0:
            return
        if "step_s" in row:
            msg = (f"step {row['step_s']:.3f} s, {row['samples_per_s']:.2f} samples/s, MFU {row['mfu'] * 100:.1f}%, "
                   f"peak {row['peak_memory_gib']:.2f} GiB (predicted {row['predicted_memory_gib']:.2f})")
        else:
            msg = f"skipped: {row.get('skipped')}"
        print(f"[bench] zero{row['stage']} ckpt={row['ckpt']} chunk={row['chunk']}: {msg}", file=sys.stderr, flush=True)
        dump_partial()

    result.update({
        "benchmark": "throughput", "label": args.label, "shape": args.shape,
        "shape_source": shapes.resolve_shape(args.shape).source,
        "llm_layers": hf_config.text_config.num_hidden_layers,
        "vision_layers": hf_config.vision_config.num_hidden_layers,
        "params": counts, "device": device.type, "device_name": device_name,
        "world_size": env.world_size, "dtype": dtype_name, "attn": args.attn,
        "pairs_per_rank": args.pairs_per_rank, "global_batch": args.pairs_per_rank * env.world_size,
        "steps": args.steps, "warmup": args.warmup,
        "peak_tflops": peak, "peak_source": peak_source,
        "inputs": {"image_hw": list(geo.image_hw), "tiles_per_image": geo.tiles_per_image,
                   "tokens_per_image": geo.tokens_per_image, "dummy_tiles": geo.dummy_tiles,
                   "query_image_fraction": args.query_image_fraction,
                   "target_image_fraction": args.target_image_fraction,
                   "query_text_tokens": list(args.query_text_tokens),
                   "target_text_tokens": list(args.target_text_tokens),
                   "template_tokens": TEMPLATE_HEAD_TOKENS + TEMPLATE_TAIL_TOKENS},
        "versions": _versions(),
    })
    for stage in args.stages:
        for ckpt in args.ckpt:
            rows += run_engine(args, env, hf_config, counts, geo, sides_q, sides_t, stage, ckpt,
                               dtype_name, device, peak, probe, on_row=collect)
            dump_partial()
    result["rows"] = rows
    result["targets"] = evaluate_targets(result)
    distributed.shutdown_distributed()
    return result if env.rank == 0 else {}


def predict_only(args) -> dict:
    """The analytic side of the benchmark for ``args``: per configuration the FLOPs of a
    cached and an uncached step, their ratio, the MFU ceiling (model / hardware FLOPs) and
    the memory model, for a world of ``--ranks``. Persistent ZeRO-3 parameters are not
    known without a model and counted as partitioned."""
    hf_config = shapes.shape_config(args.shape, args.llm_layers, args.vision_layers)
    counts = shapes.param_counts(hf_config)
    if args.train_vision_tower:
        counts = dict(counts, trainable=counts["trainable"] + counts["vision_tower"])
    geo = geometry_for(hf_config, args.image_size)
    gen = torch.Generator().manual_seed(args.seed * 1000)
    sides_q = make_sides(args.pairs_per_rank, args.query_image_fraction, args.query_text_tokens, gen)
    sides_t = make_sides(args.pairs_per_rank, args.target_image_fraction, args.target_text_tokens, gen)
    world = args.ranks
    dtype_name = args.dtype if args.dtype != "auto" else "bfloat16"
    pbytes = 2 if dtype_name == "bfloat16" else 4
    rows = []
    for stage in args.stages:
        for ckpt in args.ckpt:
            ds_cfg = ds_config_for(args, stage, args.pairs_per_rank, world, ckpt, pbytes == 2)
            checkpointing = ckpt != "off"
            fwd_u = _sum_parts([chunk_forward_flops(hf_config, sides_q, geo),
                                chunk_forward_flops(hf_config, sides_t, geo)])
            unc = step_flops(fwd_u, cached=False, checkpointing=checkpointing,
                             vision_trained=args.train_vision_tower)

            def mem(lists, together=False):
                preds = [predict_memory(hf_config, counts, stage=stage, world=world, param_bytes=pbytes,
                                        reduction=args.reduction, checkpointing=checkpointing, ds_config=ds_cfg,
                                        chunk_rows=len(c), chunk_width=max(x.length(geo) for x in c),
                                        chunk_tiles=sum(x.has_image for x in c) * geo.tiles_per_image
                                        or geo.dummy_tiles) for c in lists]
                if together:
                    out = dict(preds[0])
                    out["activations"] = sum(p["activations"] for p in preds)
                    out["total"] = preds[0]["total"] - preds[0]["activations"] + out["activations"]
                    return out
                return max(preds, key=lambda p: p["total"])

            mem_u = mem([sides_q, sides_t], together=True)
            for chunk in args.chunk_sizes:
                lists = chunked(sides_q, chunk) + chunked(sides_t, chunk)
                fwd = _sum_parts([chunk_forward_flops(hf_config, c, geo) for c in lists])
                fl = step_flops(fwd, cached=True, checkpointing=checkpointing,
                                vision_trained=args.train_vision_tower, vision_cached=not args.no_vision_cache)
                m = mem(lists)
                rows.append({
                    "stage": stage, "ckpt": ckpt, "chunk": chunk,
                    "model_tflop_per_step_per_rank": fl["model"] / 1e12,
                    "hardware_tflop_per_step_per_rank": fl["hardware"] / 1e12,
                    "uncached_hardware_tflop_per_step_per_rank": unc["hardware"] / 1e12,
                    "cached_over_uncached_flops": fl["hardware"] / unc["hardware"],
                    "mfu_ceiling": fl["model"] / fl["hardware"],
                    "forward_split_tflop": {k: v / 1e12 for k, v in fwd.items()
                                            if k not in ("tokens", "padded_tokens")},
                    "tokens_per_step_per_rank": fwd["tokens"],
                    "predicted_memory": m, "predicted_memory_gib": m["total"] / GIB,
                    "uncached_predicted_memory_gib": mem_u["total"] / GIB,
                })
    return {"benchmark": "throughput-prediction", "shape": args.shape, "params": counts,
            "world_size": world, "dtype": dtype_name, "pairs_per_rank": args.pairs_per_rank,
            "llm_layers": hf_config.text_config.num_hidden_layers,
            "vision_layers": hf_config.vision_config.num_hidden_layers,
            "inputs": {"image_hw": list(geo.image_hw), "tiles_per_image": geo.tiles_per_image,
                       "tokens_per_image": geo.tokens_per_image,
                       "query_text_tokens": list(args.query_text_tokens),
                       "target_text_tokens": list(args.target_text_tokens)},
            "rows": rows}


def format_prediction(result: dict) -> str:
    r = result
    lines = [f"prediction: {r['shape']} ({r['params']['total'] / 1e9:.3f} B params, {r['params']['trainable'] / 1e9:.3f} B "
             f"trained), W={r['world_size']}, {r['dtype']}, {r['pairs_per_rank']} pairs/rank, "
             f"{r['inputs']['tokens_per_image']} tokens/image",
             f"{'zero':>4} {'ckpt':>5} {'chunk':>5} {'model TF':>9} {'hw TF':>8} {'unc hw TF':>9} {'c/u fl':>6} "
             f"{'MFU max':>7} {'mem GiB':>8} {'unc GiB':>8}  memory split GiB (params/grads/optim/coal/buf/act)"]
    for row in r["rows"]:
        m = row["predicted_memory"]
        split = "/".join(f"{m[k] / GIB:.1f}" for k in ("params", "grads", "optimizer", "coalesced_grads",
                                                          "buffers", "activations"))
        lines.append(f"{row['stage']:>4} {'on' if row['ckpt'] != 'off' else 'off':>5} {row['chunk']:>5} "
                     f"{row['model_tflop_per_step_per_rank']:>9.1f} {row['hardware_tflop_per_step_per_rank']:>8.1f} "
                     f"{row['uncached_hardware_tflop_per_step_per_rank']:>9.1f} {row['cached_over_uncached_flops']:>6.3f} "
                     f"{row['mfu_ceiling'] * 100:>6.1f}% {row['predicted_memory_gib']:>8.1f} "
                     f"{row['uncached_predicted_memory_gib']:>8.1f}  {split}")
    return "\n".join(lines)


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("transformers", "deepspeed"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def _relaunch(args, argv: list[str]) -> int:
    from llave_ds.distributed import free_port

    env = dict(os.environ)
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        env.setdefault("DS_ACCELERATOR", "cpu")
    if env.get("DS_ACCELERATOR") == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, args.cpu_threads)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "llave_ds.bench", *argv]
    return subprocess.call(cmd, env=env)


def _report(table: str, result: dict, json_out: Optional[str]) -> None:
    """The human table, then the one JSON line last (also written to ``json_out``)."""
    print(table, flush=True)
    line = json.dumps(result, default=float)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(line + "\n")
    print(line, flush=True)


def run(args, argv: Optional[list[str]] = None) -> int:
    if args.predict_only:
        result = predict_only(args)
        _report(format_prediction(result), result, args.json_out)
        return 0
    if args.ranks > 1 and "RANK" not in os.environ:
        if argv is None:
            argv = sys.argv[1:]
            if argv and argv[0] == "bench":  # called as `llave-ds bench ...`
                argv = argv[1:]
        return _relaunch(args, argv)
    result = worker(args)
    if result:
        _report(format_table(result), result, args.json_out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llave-ds bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
