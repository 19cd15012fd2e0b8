"""Tiny, randomly initialised LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints built offline.

``build_tiny_model_dir`` writes an ordinary transformers model directory (config.json,
model.safetensors, tokenizer files, processor + preprocessor config, chat template) whose
model loads with plain ``from_pretrained`` and whose processor loads with
``llave_ds.model.processors.load_processor``. Nothing is downloaded: the tokenizer is a byte-level
``Qwen2Tokenizer`` (one token per byte, no merges) plus the special tokens the
backbones use, and the architectures are the real ones at toy sizes (~150-280K parameters,
images of 28-112 pixels) so a forward of 8 pairs takes a few hundredths of a second on CPU.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from llave_ds.model.backbones import SUPPORTED_BACKBONES, check_backbone
from llave_ds.model.processors import (LlavaOnevisionImageTextProcessor, Qwen2_5_VLImageTextProcessor,
                                       Qwen2VLImageTextProcessor, Qwen3VLImageTextProcessor)

# One shared token layout for all backbones: ids 0-255 are the bytes, then these.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<image>", "<video>",                                             # LLaVA-OneVision
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",  # Qwen2(.5)-VL
)
TINY_VOCAB_SIZE = 272  # 256 bytes + 10 special tokens, rounded up to a multiple of 16


def special_token_id(token: str) -> int:
    return 256 + SPECIAL_TOKENS.index(token)


# Qwen chat template (the one Qwen2 / LLaVA-OV-Qwen2 / Qwen2-VL checkpoints ship, text-only
# content form): a default system turn, then <|im_start|>role\ncontent<|im_end|>\n per message.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}{{ '<|image_1|>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_symbols() -> dict[int, str]:
    """The byte -> printable character table that byte-level BPE tokenizers (GPT-2, Qwen) use.

    Printable Latin-1 bytes stand for themselves; the others are shifted above U+0100 in
    order, so every byte has a visible, whitespace-free symbol.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def build_tiny_tokenizer():
    """Byte-level Qwen2Tokenizer: 256 byte tokens (no merges) + SPECIAL_TOKENS."""
    from transformers import Qwen2Tokenizer

    symbols = _byte_symbols()
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({tok: special_token_id(tok) for tok in SPECIAL_TOKENS})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    return tokenizer


# Why 0.1 and not transformers' 0.02: at hidden size 64 the 0.02 init makes attention and
# MLP outputs ~6x smaller than the token embedding, so the pooled last token (the same
# template token for every input) gives nearly identical embeddings (cosine ~0.99) and
# contrastive training crawls. Measured on the synthetic task: see docs/DECISIONS.md.
TINY_INITIALIZER_RANGE = 0.1


def _tiny_text_config(tie_word_embeddings: bool) -> dict:
    return dict(initializer_range=TINY_INITIALIZER_RANGE,
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=special_token_id("<|im_end|>"),
        pad_token_id=special_token_id("<|endoftext|>"), tie_word_embeddings=tie_word_embeddings,
    )


# LLaVA-OV tiles: a 28-px base view plus up to 2x2 tiles of 28 px (same scheme as the real
# 384-px SigLIP with its 384..2304 pinpoints, scaled down).
TINY_LLAVA_IMAGE_SIZE = 28
TINY_LLAVA_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
# Qwen2-VL: images resized to 28..56 px per side -> 1..4 image tokens after the 2x2 merge.
TINY_QWEN_MIN_PIXELS = 28 * 28
TINY_QWEN_MAX_PIXELS = 56 * 56
# Qwen2.5-VL: window attention over 2x2 merged tokens (the real 112-px windows are 4x4 merged
# tokens of 28 px), with block 0 windowed and block 1 full (like fullatt_block_indexes
# 7/15/23/31 of 32). Images are resized to 84..112 px per side, so every image (and the
# blank dummy) has a merged grid of at least 3x3 = 9 tokens and so more than one window:
# the window permutation that ``visual`` applies and undoes is never the identity.
TINY_QWEN25_WINDOW_SIZE = 56
TINY_QWEN25_MIN_PIXELS = 84 * 84
TINY_QWEN25_MAX_PIXELS = 112 * 112
# Qwen3-VL: 16-px patches merged 2x2, so 32 px per image token; images resized to 32..64 px per
# side -> 1..4 tokens. Three vision blocks with DeepStack taps after blocks 0 and 1 (the real
# 2B taps 5, 11, 17 of 24), each through its own merger into decoder layers 0 and 1. The
# learned position grid is 8x8 (the real one 48x48), resampled to each image's patch grid.
# Real checkpoints normalise with mean = std = 0.5; so does the tiny one.
TINY_QWEN3_MIN_PIXELS = 32 * 32
TINY_QWEN3_MAX_PIXELS = 64 * 64
TINY_QWEN3_DEEPSTACK = [0, 1]


def tiny_config(backbone: str):
    """The transformers config of the tiny model for ``backbone``.

    The LLaVA-OV one has an untied LM head (like LLaVA-OV-7B), the Qwen2-VL, Qwen2.5-VL and
    Qwen3-VL ones a tied head (like Qwen2-VL-2B, Qwen2.5-VL-3B and Qwen3-VL-2B), so both code
    paths of the embedding model get exercised.
    """
    check_backbone(backbone)
    if backbone == "llava_onevision":
        from transformers import LlavaOnevisionConfig

        text = _tiny_text_config(tie_word_embeddings=False)
        return LlavaOnevisionConfig(
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, image_size=TINY_LLAVA_IMAGE_SIZE,
                patch_size=14, vision_use_head=False),  # the attention-pool head breaks ZeRO-3
            text_config=dict(model_type="qwen2", **text),
            image_token_index=special_token_id("<image>"),
            video_token_index=special_token_id("<video>"),
            image_grid_pinpoints=TINY_LLAVA_PINPOINTS, vision_feature_select_strategy="full",
            vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
        )
    text = _tiny_text_config(tie_word_embeddings=True)
    # M-RoPE splits head_dim/2 = 8 rotary frequencies over (time, height, width).
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    qwen_tokens = dict(
        image_token_id=special_token_id("<|image_pad|>"),
        video_token_id=special_token_id("<|video_pad|>"),
        vision_start_token_id=special_token_id("<|vision_start|>"),
        vision_end_token_id=special_token_id("<|vision_end|>"),
    )
    if backbone == "qwen3_vl":
        from transformers import Qwen3VLConfig

        # Qwen3's attention has its own head_dim (q/k RMS-normed per head); interleaved M-RoPE
        # splits head_dim/2 = 8 frequencies over (time, height, width) as [4, 2, 2].
        # Three decoder layers: DeepStack adds its features to the outputs of layers 0 and 1, and
        # only a later layer carries them to the pooled (last, text) token.
        text.update(num_hidden_layers=3, head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                     "mrope_interleaved": True})
        return Qwen3VLConfig(
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                               temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=text["hidden_size"],
                               num_position_embeddings=64, deepstack_visual_indexes=TINY_QWEN3_DEEPSTACK,
                               initializer_range=TINY_INITIALIZER_RANGE),
            text_config=text, tie_word_embeddings=True, **qwen_tokens,
        )
    if backbone == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        # Qwen2.5-VL's vision ``hidden_size`` is the tower width (Qwen2-VL's ``embed_dim``);
        # ``out_hidden_size`` is what the merger projects to, the LM's hidden size.
        return Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=text["hidden_size"], patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2,
                               window_size=TINY_QWEN25_WINDOW_SIZE, fullatt_block_indexes=[1]),
            text_config=text, tie_word_embeddings=True, **qwen_tokens,
        )
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=text, tie_word_embeddings=True, **qwen_tokens,
    )


def build_tiny_processor(backbone: str):
    """A video-free processor (no torchvision needed) matching ``tiny_config(backbone)``."""
    check_backbone(backbone)
    tokenizer = build_tiny_tokenizer()
    if backbone == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
            LlavaOnevisionImageProcessorPil

        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": TINY_LLAVA_IMAGE_SIZE, "width": TINY_LLAVA_IMAGE_SIZE},
            image_grid_pinpoints=TINY_LLAVA_PINPOINTS)
        patches_per_side = TINY_LLAVA_IMAGE_SIZE // 14
        return LlavaOnevisionImageTextProcessor(
            image_processor=image_processor, tokenizer=tokenizer,
            num_image_tokens=patches_per_side ** 2, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", chat_template=QWEN_CHAT_TEMPLATE)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if backbone == "qwen3_vl":  # Qwen3-VL checkpoints ship Qwen2-VL's image processor too
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=TINY_QWEN3_MIN_PIXELS, max_pixels=TINY_QWEN3_MAX_PIXELS, patch_size=16, temporal_patch_size=2,
            merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return Qwen3VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=QWEN_CHAT_TEMPLATE)
    if backbone == "qwen2_5_vl":  # Qwen2.5-VL checkpoints ship Qwen2-VL's image processor
        min_pixels, max_pixels = TINY_QWEN25_MIN_PIXELS, TINY_QWEN25_MAX_PIXELS
        processor_cls = Qwen2_5_VLImageTextProcessor
    else:
        min_pixels, max_pixels = TINY_QWEN_MIN_PIXELS, TINY_QWEN_MAX_PIXELS
        processor_cls = Qwen2VLImageTextProcessor
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                         chat_template=QWEN_CHAT_TEMPLATE)


def build_tiny_model(backbone: str, seed: int = 0):
    """The tiny ForConditionalGeneration model, deterministic given ``seed``.

    Uses a forked RNG so the caller's global torch random state is left untouched.
    """
    from llave_ds.model.backbones import model_class

    config = tiny_config(backbone)
    model_cls = model_class(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def build_tiny_model_dir(out_dir: Union[str, Path], backbone: str, seed: int = 0) -> Path:
    """Write a complete tiny checkpoint directory for ``backbone`` and return its path.

    ``backbone`` is one of ``SUPPORTED_BACKBONES``. The model loads with
    ``AutoModelForImageTextToText.from_pretrained(out_dir)``; the processor with
    ``llave_ds.model.processors.load_processor(out_dir)`` (the stock processors also want a video
    processor, which needs torchvision).
    """
    if backbone not in SUPPORTED_BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; supported: {', '.join(SUPPORTED_BACKBONES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(backbone, seed)
    model.save_pretrained(out)
    processor = build_tiny_processor(backbone)
    processor.save_pretrained(out)
    # Also the classic standalone preprocessor_config.json that hub checkpoints carry, so
    # AutoImageProcessor.from_pretrained(out) works on its own.
    processor.image_processor.save_pretrained(out)
    (out / "llave_ds_tiny.json").write_text(json.dumps({"backbone": backbone, "seed": seed}) + "\n")
    return out


# ------------------------------------------------------------------------------ CLI

def add_arguments(parser) -> None:
    """``llave-ds tiny --backbone NAME --out DIR``."""
    parser.add_argument("--backbone", required=True, choices=SUPPORTED_BACKBONES,
                        help="which architecture (the real one at toy sizes, random weights)")
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing directory")


def run(args) -> int:
    """Write a tiny offline model directory (weights, config, tokenizer, processor): what the
    tests train, and what a config can be smoke-tested with before a real checkpoint is
    downloaded (``model.path=DIR``)."""
    import shutil
    import sys

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.force:
            print(f"llave-ds tiny: {out} exists and is not empty; pass --force to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    path = build_tiny_model_dir(out, args.backbone, seed=args.seed)
    params = sum(p.numel() for p in build_tiny_model(args.backbone, args.seed).parameters())
    print(json.dumps({"model": str(path), "backbone": args.backbone, "seed": args.seed, "parameters": params}))
    return 0
