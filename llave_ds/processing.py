"""From (text, image) sides to the tensors one forward of the embedding model takes.

Four things live here:

* ``ProcessingConfig``: the ``processing`` section of a run config, which is also the
  ``input_format`` block of an export's ``llave_embedding.json``;
* the video-free processors (``LlavaOnevisionImageTextProcessor``,
  ``Qwen2VLImageTextProcessor``): the stock ones insist on a video processor, which needs
  torchvision; these are the same classes without it, and load both their own saves and
  stock hub checkpoint directories;
* ``load_processor(path)``: picks the right one from the directory's config.json;
* ``InputFormatter``: Qwen chat prompt, MMEB ``<|image_1|>`` / ``<|video_1|>`` -> the
  backbone's own image / video tokens, instruction prefixes, truncation that never cuts
  image or video tokens or the pooled (last) token, an image-token cap, and the blank
  "dummy" image (and, with ``video_slot``, dummy video) that keeps every chunk running the
  same vision-tower calls (every rank and chunk must run the same modules under ZeRO-3);
* video tensors made without torchvision (``VideoSettings``, ``video_pixel_values``):
  the values the backbone's own (torchvision-based) video processor gives for the same
  sampled frames.
  ``InputFormatter.from_config(processor, backbone, processing_config)`` is the one way
  training, ``llave-ds export`` and ``LlaveEmbedder`` build it, so all three format alike.

Sequence layout of one side (the pooled token is the last one, the ``\\n`` after
``assistant``)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n

That is ``prompt_format="qwen_chat"`` (the default). ``prompt_format="llave"`` is LLaVE's
own prompt (what the released LLaVE checkpoints expect): a lone placeholder not at the start
moves the image to the front of the content, and an assistant turn ``\\n`` closed by
``<|im_end|>\\n`` follows; its final ``\\n`` is pooled (docs/MODELS.md "Prompt formats").

Text is tokenized per segment between special tokens (the chat markers and the image
tokens), which is how the tokenizer splits a whole prompt anyway.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union, get_args

import torch
from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

from llave_ds.config import check_choices, config_from_dict

logger = logging.getLogger("llave_ds.processing")

Backbone = Literal["llava_onevision", "qwen2_vl", "qwen2_5_vl"]
SUPPORTED_BACKBONES = get_args(Backbone)
# Backbones with Qwen2-VL-style inputs: <|vision_start|> <|image_pad|>*n <|vision_end|>,
# flattened patches + image_grid_thw, M-RoPE positions (Qwen2.5-VL shares the image processor).
QWEN_BACKBONES = ("qwen2_vl", "qwen2_5_vl")
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
# Where a video goes in a side's text (the counterpart of MMEB's image placeholder).
MMEB_VIDEO_PLACEHOLDER = "<|video_1|>"
PLACEHOLDERS = {"image": MMEB_IMAGE_PLACEHOLDER, "video": MMEB_VIDEO_PLACEHOLDER}
# Frames sampled per video: the LLaVA-OneVision model card's 8 (docs/DECISIONS.md).
DEFAULT_VIDEO_FRAMES = 8
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("query", "target")
PROMPT_FORMAT = "qwen_chat"  # the default prompt format
# qwen_chat: the Qwen chat prompt up to the generation prompt, image where the placeholder is.
# llave: LLaVE's training/eval prompt (DeepLearnXMU/LLaVE llava/train/train.py): the image
# moved to the front of the user turn, then an assistant turn "\n" closed by <|im_end|>\n.
# docs/MODELS.md "Prompt formats" spells out both token by token.
PromptFormat = Literal["qwen_chat", "llave"]
PROMPT_FORMATS = get_args(PromptFormat)
# What follows the user content; the last token of it is the pooled one.
TEMPLATE_TAILS = {"qwen_chat": "<|im_end|>\n<|im_start|>assistant\n",
                  "llave": "<|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n"}


def check_prompt_format(prompt_format: str, field: str = "prompt_format") -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"{field} must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    return prompt_format


def check_backbone(backbone: str) -> str:
    if backbone not in SUPPORTED_BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; supported: {', '.join(SUPPORTED_BACKBONES)}")
    return backbone


def backbone_from_model_type(model_type: str) -> str:
    """Map a transformers ``config.model_type`` to a supported backbone name."""
    if model_type in SUPPORTED_BACKBONES:
        return model_type
    raise ValueError(f"model_type {model_type!r} is not a supported backbone; supported: "
                     f"{', '.join(SUPPORTED_BACKBONES)} (checkpoints must be in transformers format)")


def detect_backbone(path: Union[str, Path]) -> str:
    """Backbone of a checkpoint directory (or hub id) from its config.json ``model_type``."""
    local = Path(path) / "config.json"
    if local.is_file():
        model_type = json.loads(local.read_text()).get("model_type", "")
    else:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(path)).model_type
    return backbone_from_model_type(model_type)


# ---------------------------------------------------------------------------------------
# Processing config
# ---------------------------------------------------------------------------------------

@dataclass
class ProcessingConfig:
    """How sides become token sequences (the arguments of ``InputFormatter``).

    The ``processing`` section of a training config; an export records the same fields in
    the ``input_format`` block of ``llave_embedding.json`` (``InputFormatter.metadata``)
    and ``LlaveEmbedder`` reads them back with ``from_metadata``.
    """
    max_length: int = 1024
    max_image_tokens: Optional[int] = None
    query_instruction: Optional[str] = None
    target_instruction: Optional[str] = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    padding_side: Literal["left", "right"] = "right"
    prompt_format: PromptFormat = PROMPT_FORMAT  # "llave" for LLaVE checkpoints
    # Videos: frames sampled uniformly per video (llave_ds.video.sample_frame_indices), and
    # an optional cap on the longer side of a frame, applied before the processor's resize.
    video_frames: int = DEFAULT_VIDEO_FRAMES
    video_max_side: Optional[int] = None

    def validate(self) -> None:
        check_choices(self, "processing.")
        if self.max_length < 8:
            raise ValueError(f"processing.max_length must be >= 8, got {self.max_length}")
        if self.max_image_tokens is not None and self.max_image_tokens < 1:
            raise ValueError(f"processing.max_image_tokens must be >= 1 or null, got {self.max_image_tokens}")
        if self.video_frames < 1:
            raise ValueError(f"processing.video_frames must be >= 1, got {self.video_frames}")
        if self.video_max_side is not None and self.video_max_side < 1:
            raise ValueError(f"processing.video_max_side must be >= 1 or null, got {self.video_max_side}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_metadata(cls, input_format: Optional[Mapping], source: str) -> "ProcessingConfig":
        """From the ``input_format`` block of ``llave_embedding.json`` (``source`` names the
        file in errors). Fields it lacks keep their defaults; its descriptive keys
        (``prompt_format``, ``pooled_token``, ...) are checked or ignored."""
        if input_format is None:
            return cls()
        if not isinstance(input_format, Mapping):
            raise ValueError(f"{source}: input_format must be a mapping, got {type(input_format).__name__}")
        prompt_format = input_format.get("prompt_format", PROMPT_FORMAT)
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"{source}: input_format.prompt_format is {prompt_format!r}; this version of "
                             f"llave-ds formats {', '.join(repr(f) for f in PROMPT_FORMATS)} prompts")
        settings = {key: input_format[key] for key in cls.field_names() if key in input_format}
        try:
            return config_from_dict(cls, settings, source=f"{source} (input_format)")
        except ValueError as exc:
            if getattr(exc, "source", None):
                raise  # a type error: the message already names the file and the field
            raise ValueError(f"{source} (input_format): {exc}") from exc


# ---------------------------------------------------------------------------------------
# Video-free processors
# ---------------------------------------------------------------------------------------

class _SavedAsStockProcessor:
    """Save under the stock class name, so the directory is a stock one.

    ``processor_config.json`` and ``tokenizer_config.json`` name the backbone's own
    processor class (``LlavaOnevisionProcessor`` / ``Qwen2VLProcessor``), so that
    ``transformers.AutoProcessor.from_pretrained(dir)`` builds that class (video processor
    included, derived from ``preprocessor_config.json`` by transformers, which needs
    torchvision) instead of falling back to a bare tokenizer. llave-ds itself loads such a
    directory with ``load_processor``, which picks the class from ``config.json``.
    """

    stock_class: type

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = self.stock_class.__name__
        return out

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # The tokenizer records the class of the processor that saved it.
        tokenizer_config = Path(save_directory) / "tokenizer_config.json"
        if tokenizer_config.is_file():
            config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            if config.get("processor_class") == type(self).__name__:
                config["processor_class"] = self.stock_class.__name__
                tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        return files


class LlavaOnevisionImageTextProcessor(_SavedAsStockProcessor, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without the video processor (so without torchvision).

    Only ``image_processor`` and ``tokenizer`` are sub-processors (transformers derives
    them from this ``__init__`` signature), so save/load never touch a video processor.
    Saved directories name ``LlavaOnevisionProcessor`` (see ``_SavedAsStockProcessor``).
    """

    stock_class = LlavaOnevisionProcessor

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token,
                         video_token=video_token, vision_aspect_ratio=vision_aspect_ratio, **kwargs)


class Qwen2VLImageTextProcessor(_SavedAsStockProcessor, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (so without torchvision).
    Saved directories name ``Qwen2VLProcessor``."""

    stock_class = Qwen2VLProcessor

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageTextProcessor(_SavedAsStockProcessor, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (so without torchvision); its
    image processor is Qwen2-VL's. Saved directories name ``Qwen2_5_VLProcessor``."""

    stock_class = Qwen2_5_VLProcessor

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


PROCESSOR_CLASSES = {
    "llava_onevision": LlavaOnevisionImageTextProcessor,
    "qwen2_vl": Qwen2VLImageTextProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageTextProcessor,
}


def load_processor(path: Union[str, Path], backbone: str = "auto", **kwargs):
    """Load the video-free processor of a checkpoint directory (or hub id).

    Works on directories written by ``llave_ds.tiny`` and on stock transformers-format
    LLaVA-OneVision / Qwen2-VL checkpoints (their video processor config is ignored).
    """
    backbone = detect_backbone(path) if backbone == "auto" else check_backbone(backbone)
    processor = PROCESSOR_CLASSES[backbone].from_pretrained(str(path), **kwargs)
    setattr(processor, VIDEO_CONFIG_ATTR, read_video_processor_config(path))
    return processor


# ---------------------------------------------------------------------------------------
# Video tensors without torchvision
# ---------------------------------------------------------------------------------------

# Attribute of a loaded processor holding its checkpoint's video processor config (or None).
VIDEO_CONFIG_ATTR = "llave_video_processor_config"
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The class defaults of transformers' LlavaOnevisionVideoProcessor / Qwen2VLVideoProcessor
# (Qwen2.5-VL uses Qwen2-VL's): what a video processor config that lacks a key gets.
_VIDEO_CLASS_DEFAULTS = {
    "llava_onevision": dict(size={"height": 384, "width": 384}, resample=3, image_mean=_OPENAI_CLIP_MEAN,
                            image_std=_OPENAI_CLIP_STD),
    "qwen": dict(size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, resample=3,
                 image_mean=_OPENAI_CLIP_MEAN, image_std=_OPENAI_CLIP_STD, patch_size=14,
                 temporal_patch_size=2, merge_size=2),
}


def read_video_processor_config(path: Union[str, Path]) -> Optional[dict]:
    """The settings transformers would build a checkpoint's video processor from, in its own
    order: ``processor_config.json``'s nested ``video_processor``, else
    ``video_preprocessor_config.json``; None when neither exists (transformers then falls
    back to ``preprocessor_config.json``, i.e. the image processor's settings)."""
    root = Path(path)
    nested = root / "processor_config.json"
    if nested.is_file():
        video = json.loads(nested.read_text(encoding="utf-8")).get("video_processor")
        if isinstance(video, dict):
            return video
    plain = root / "video_preprocessor_config.json"
    if plain.is_file():
        return json.loads(plain.read_text(encoding="utf-8"))
    return None


def _size_field(size: Any, key: str) -> Optional[int]:
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return None if value is None else int(value)


@dataclass(frozen=True)
class VideoSettings:
    """What the backbone's own video processor does to sampled frames.

    Built by ``from_processor``: from the checkpoint's video processor config when it has
    one (missing keys take transformers' class defaults), else from the image processor,
    which is what transformers derives a video processor from when a checkpoint has only
    ``preprocessor_config.json`` (the tiny checkpoints, and the original Qwen2-VL ones).
    """
    backbone: str
    resample: int                      # PIL code: 0 nearest, 2 bilinear, 3 bicubic
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    height: Optional[int] = None       # LLaVA-OV: every frame resized to height x width
    width: Optional[int] = None
    min_pixels: Optional[int] = None   # Qwen: smart_resize bounds
    max_pixels: Optional[int] = None
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    @classmethod
    def from_processor(cls, processor, backbone: str) -> "VideoSettings":
        ip = processor.image_processor
        config = getattr(processor, VIDEO_CONFIG_ATTR, None)
        family = "qwen" if backbone in QWEN_BACKBONES else "llava_onevision"
        if config is None:  # derived from the image processor, as transformers does
            source = {key: getattr(ip, key) for key in ("size", "resample", "image_mean", "image_std",
                                                         "rescale_factor", "do_resize", "do_rescale",
                                                         "do_normalize", "patch_size", "temporal_patch_size",
                                                         "merge_size") if getattr(ip, key, None) is not None}
        else:
            source = dict(_VIDEO_CLASS_DEFAULTS[family], **{k: v for k, v in config.items() if v is not None})
        get = source.get
        size = get("size") or _VIDEO_CLASS_DEFAULTS[family]["size"]
        common = dict(backbone=backbone, resample=int(get("resample", 3)),
                      image_mean=tuple(float(x) for x in get("image_mean", _OPENAI_CLIP_MEAN)),
                      image_std=tuple(float(x) for x in get("image_std", _OPENAI_CLIP_STD)),
                      rescale_factor=float(get("rescale_factor", 1 / 255)),
                      do_resize=bool(get("do_resize", True)), do_rescale=bool(get("do_rescale", True)),
                      do_normalize=bool(get("do_normalize", True)))
        if family == "llava_onevision":
            return cls(height=_size_field(size, "height"), width=_size_field(size, "width"), **common)
        # Qwen2VLVideoProcessor.__init__: min_pixels / max_pixels override the size dict.
        min_pixels = get("min_pixels") or _size_field(size, "shortest_edge")
        max_pixels = get("max_pixels") or _size_field(size, "longest_edge")
        return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), patch_size=int(get("patch_size", 14)),
                   temporal_patch_size=int(get("temporal_patch_size", 2)), merge_size=int(get("merge_size", 2)),
                   cap_pixels_per_frame=bool(get("cap_pixels_per_frame") or False),
                   max_video_tokens=int(get("max_video_tokens", 128000)), **common)

    def target_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) the frames are resized to (``Qwen2VLVideoProcessor.resize`` /
        the fixed size of LLaVA-OV's)."""
        if not self.do_resize:
            return height, width
        if self.backbone not in QWEN_BACKBONES:
            return int(self.height), int(self.width)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            total_pixels = int(self.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total_pixels * self.temporal_patch_size // num_frames),
                             int(self.min_pixels * 1.05))
        return tuple(smart_resize(height, width, factor=factor, min_pixels=self.min_pixels,
                                  max_pixels=max_pixels))


def _resize_uint8(frames: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize of a uint8 [T, 3, H, W] tensor on the CPU
    (antialias=True, what transformers' video processors call), without torchvision: the same
    ``torch.nn.functional.interpolate`` call, natively in uint8 where torchvision does so
    (bicubic; bilinear only on AVX2 CPUs), else in float32, clamped and rounded back."""
    import torch.nn.functional as F

    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    modes = {0: "nearest", 2: "bilinear", 3: "bicubic"}
    if resample not in modes:
        raise ValueError(f"video resize: resample={resample} is not supported (nearest, bilinear or bicubic)")
    mode = modes[resample]
    if mode == "nearest":
        return F.interpolate(frames, size=list(size), mode="nearest")
    native = mode == "bicubic" or "AVX2" in torch.backends.cpu.get_cpu_capability()
    x = frames if native else frames.to(torch.float32)
    x = F.interpolate(x, size=list(size), mode=mode, align_corners=False, antialias=True)
    if not native:
        if mode == "bicubic":
            x = x.clamp_(min=0, max=255)
        x = x.round_().to(torch.uint8)
    return x


def video_pixel_values(frames: Sequence[Any], settings: VideoSettings) -> dict[str, torch.Tensor]:
    """The tensors the backbone's video processor gives for one video of sampled frames
    (PIL images of one size), without torchvision.

    LLaVA-OV: ``pixel_values_videos`` ``[1, T, 3, H, W]`` (every frame resized to the
    processor's size). Qwen2-VL / Qwen2.5-VL: ``pixel_values_videos`` ``[t*h*w, 3*Tp*P*P]``
    and ``video_grid_thw`` ``[1, 3]``, the frame count padded to a multiple of the temporal
    patch size by repeating the last frame. Same steps as transformers'
    ``video_processing_*.py``: uint8 [T, 3, H, W] -> resize (antialiased, in uint8) ->
    float32 ``(x - 255*mean) / (255*std)`` -> (Qwen) ``patchify``.
    """
    import numpy as np

    if not frames:
        raise ValueError("a video needs at least one frame")
    arrays = [np.asarray(f.convert("RGB") if getattr(f, "mode", "RGB") != "RGB" else f, dtype=np.uint8)
              for f in frames]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"the frames of a video must share one size, got {sorted({a.shape[:2] for a in arrays})}")
    video = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    num_frames, _, height, width = video.shape
    video = _resize_uint8(video, settings.target_size(num_frames, height, width), settings.resample) \
        if settings.do_resize else video
    if settings.do_normalize:
        scale = 1.0 / settings.rescale_factor if settings.do_rescale else 1.0
        mean = (torch.tensor(settings.image_mean) * scale).view(-1, 1, 1)
        std = (torch.tensor(settings.image_std) * scale).view(-1, 1, 1)
        pixels = (video.to(torch.float32) - mean) / std
    elif settings.do_rescale:
        pixels = video.to(torch.float32) * settings.rescale_factor
    else:
        pixels = video.to(torch.float32)
    if settings.backbone not in QWEN_BACKBONES:
        return {"pixel_values_videos": pixels.unsqueeze(0)}
    tp, patch, merge = settings.temporal_patch_size, settings.patch_size, settings.merge_size
    if pad := -pixels.shape[0] % tp:
        pixels = torch.cat((pixels, pixels[-1:].expand(pad, -1, -1, -1)))
    frames_n, channel, h, w = pixels.shape
    grid_t, grid_h, grid_w = frames_n // tp, h // patch, w // patch
    patches = pixels.view(1, grid_t, tp, channel, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * tp * patch * patch)
    return {"pixel_values_videos": flat, "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]])}


# ---------------------------------------------------------------------------------------
# Prompt formatting
# ---------------------------------------------------------------------------------------

class InputFormatter:
    """Turn a list of sides (duck-typed: ``.text: str``, ``.image: PIL.Image | None`` and,
    optionally, ``.video``) into the keyword arguments of ``EmbeddingModel.forward``.

    A side is text, an image, a video, or text with one of them (not both). ``.video`` is a
    ``llave_ds.video.Video``, a list of PIL frames (the whole clip, already decoded: training
    decodes in its DataLoader workers), or a path to a video file / frame folder (decoded
    here with ``llave_ds.video.read_video``). Every video is sampled to ``video_frames``
    frames (``llave_ds.video.sample_frame_indices``; a Video read with that count is kept
    as it is) and its frames downscaled to ``video_max_side`` when set.

    Output keys:

    * llava_onevision: ``input_ids``, ``attention_mask``, ``pixel_values``
      ``[n_images, n_tiles, 3, H, W]``, ``image_sizes`` ``[n_images, 2]``, ``dummy_image``;
      with videos: ``pixel_values_videos`` ``[n_videos, frames, 3, H, W]``, ``dummy_video``;
    * qwen2_vl / qwen2_5_vl: ``input_ids``, ``attention_mask``, ``pixel_values`` ``[n_patches, C*T*P*P]``,
      ``image_grid_thw`` ``[n_images, 3]``, ``dummy_image``; with videos:
      ``pixel_values_videos`` ``[n_video_patches, C*T*P*P]``, ``video_grid_thw``
      ``[n_videos, 3]``, ``dummy_video``, and for qwen2_5_vl ``second_per_grid_ts``
      ``[n_videos]`` (temporal patch size / sampled fps, 24 fps when unknown, as transformers).

    Video tensors are what the backbone's own video processor gives for the same sampled
    frames (``video_pixel_values``; no torchvision needed). Video tokens: LLaVA-OV
    ``<video>`` x (frames x pooled patches + 1 newline); Qwen ``<|vision_start|>``
    ``<|video_pad|>`` x (t*h*w / merge**2) ``<|vision_end|>``.

    Dummy rule (every rank and chunk must run the same vision-tower calls under ZeRO-3):

    * every chunk carries an image: when no side has one, the pixel tensors hold one blank
      image, ``dummy_image`` is True and the text holds no image token;
    * with ``video_slot=True`` every chunk also carries a video: when no side has one, one
      blank video (LLaVA-OV: one blank frame; Qwen: ``temporal_patch_size`` blank frames),
      ``dummy_video`` True, no video token. Training sets it when its data has videos, so
      every chunk runs the tower twice, images first, then videos.
    * with ``video_slot=False`` (default; inference) video keys appear only in chunks that
      have videos. Under ZeRO-3 training that would make chunks differ: use the slot there.

    The model runs the tower on a dummy only to keep the module sequence identical and
    adds ``0 * features.sum()`` to its output.

    The image tensors are not row-aligned (tiles / patches of all images concatenated), so
    format each GradCache chunk separately instead of slicing one formatted batch.

    Args:
        processor: a processor from ``load_processor`` (or any with ``.tokenizer`` and
            ``.image_processor`` of the backbone).
        backbone: "llava_onevision", "qwen2_vl" or "qwen2_5_vl".
        max_length: longest sequence in tokens, image tokens and chat markers included.
            Longer sides get their text content cut from the end (counted in
            ``num_truncated``); image tokens and the closing template never are.
        max_image_tokens: cap on image tokens per image. Qwen2-VL: sets the image
            processor's max pixels to ``max_image_tokens * (patch_size * merge_size)**2``.
            LLaVA-OV: images whose anyres tiling would exceed the cap are downscaled
            (keeping aspect ratio) before tiling, so fewer tiles are chosen. None: the
            processor's own settings.
        query_instruction / target_instruction: text put verbatim before the content of
            query / target sides (e.g. ``"Instruct: ...\\nQuery: "``). None: nothing.
        system_prompt: the system turn of the Qwen chat template.
        padding_side: "right" (default; no fully-masked attention rows) or "left". The
            model pools the last attended token either way.
        video_frames: frames sampled per video (``ProcessingConfig.video_frames``).
        video_max_side: cap on a frame's longer side before the processor's resize.
        video_slot: every chunk carries a (dummy if needed) video (see the dummy rule).
            A run setting, not a prompt setting: not in ``ProcessingConfig``.
        prompt_format: "qwen_chat" (default): the prompt ends with the generation prompt
            ``<|im_start|>assistant\n`` and the image sits where the placeholder is.
            "llave": LLaVE's own prompt, what the released LLaVE checkpoints were trained
            and evaluated with: a lone placeholder that is not at the start of the content
            moves to the front (``<image>\n`` + the stripped rest), and the prompt ends with
            the assistant turn ``<|im_start|>assistant\n\n<|im_end|>\n``, whose final
            ``\n`` is pooled. See docs/MODELS.md "Prompt formats".

    Build it with ``InputFormatter.from_config(processor, backbone, ProcessingConfig)``
    wherever the settings come from a config or an export (training, ``llave-ds export``,
    ``LlaveEmbedder``): one constructor, so no setting is dropped on the way.
    """

    def __init__(self, processor, backbone: str, max_length: int = 1024,
                 max_image_tokens: Optional[int] = None, query_instruction: Optional[str] = None,
                 target_instruction: Optional[str] = None,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, padding_side: str = "right",
                 prompt_format: str = PROMPT_FORMAT, video_frames: int = DEFAULT_VIDEO_FRAMES,
                 video_max_side: Optional[int] = None, video_slot: bool = False):
        self.processor = processor
        self.backbone = check_backbone(backbone)
        self.prompt_format = check_prompt_format(prompt_format)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_image_tokens is not None and max_image_tokens < 1:
            raise ValueError(f"max_image_tokens must be >= 1 or None, got {max_image_tokens}")
        self.max_length = int(max_length)
        self.max_image_tokens = max_image_tokens
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction
        self.system_prompt = system_prompt
        self.padding_side = padding_side
        if int(video_frames) < 1:
            raise ValueError(f"video_frames must be >= 1, got {video_frames}")
        if video_max_side is not None and video_max_side < 1:
            raise ValueError(f"video_max_side must be >= 1 or None, got {video_max_side}")
        self.video_frames = int(video_frames)
        self.video_max_side = video_max_side
        self.video_slot = bool(video_slot)

        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_token_id = int(self.tokenizer.pad_token_id)

        tok = self.tokenizer.convert_tokens_to_ids
        if backbone == "llava_onevision":
            self.image_token_id = int(processor.image_token_id)
            self.video_token_id = int(processor.video_token_id)
            self.vision_start_id = self.vision_end_id = None
        else:
            self.image_token_id = int(tok(processor.image_token))
            self.video_token_id = int(tok(processor.video_token))
            self.vision_start_id = int(tok("<|vision_start|>"))
            self.vision_end_id = int(tok("<|vision_end|>"))
        self.image_kwargs = self._image_processor_kwargs()
        self.video_settings = VideoSettings.from_processor(processor, self.backbone)

        self.head_ids = self._encode_template(
            f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n")
        self.tail_ids = self._encode_template(TEMPLATE_TAILS[self.prompt_format])
        min_len = len(self.head_ids) + len(self.tail_ids) + 1
        if self.max_length < min_len:
            raise ValueError(f"max_length={self.max_length} leaves no room: the chat template "
                             f"alone takes {min_len - 1} tokens")

        self.num_formatted = 0   # sides formatted so far
        self.num_truncated = 0   # of which had their text cut to fit max_length
        self._dummy: Optional[dict[str, torch.Tensor]] = None
        self._dummy_video: Optional[dict[str, torch.Tensor]] = None

    @classmethod
    def from_config(cls, processor, backbone: str, config: ProcessingConfig,
                    video_slot: bool = False) -> "InputFormatter":
        """The formatter of a ``ProcessingConfig``: every field of it, validated.
        ``video_slot``: see the class docstring (training sets it when its data has videos)."""
        if not isinstance(config, ProcessingConfig):
            raise TypeError(f"config must be a ProcessingConfig, got {type(config).__name__}")
        config.validate()
        return cls(processor, backbone, video_slot=video_slot, **dataclasses.asdict(config))

    @property
    def config(self) -> ProcessingConfig:
        """The ``ProcessingConfig`` this formatter formats with."""
        return ProcessingConfig(**{name: getattr(self, name) for name in ProcessingConfig.field_names()})

    # -- public --------------------------------------------------------------------------

    def __call__(self, sides: Sequence[Any], role: str) -> dict[str, torch.Tensor]:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if len(sides) == 0:
            raise ValueError("cannot format an empty chunk")
        instruction = self.query_instruction if role == "query" else self.target_instruction
        kinds = [self._media_kind(side) for side in sides]

        images = [self._fit_image(s.image) for s, k in zip(sides, kinds) if k == "image"]
        if images:
            vision = self._process_images(images)
            image_token_counts = iter(self._image_token_counts(vision, len(images)))
        else:
            vision = self._dummy_vision()
        videos = [self.prepare_video(s.video) for s, k in zip(sides, kinds) if k == "video"]
        if videos:
            video_vision, video_token_counts = self._process_videos(videos)
            video_token_counts = iter(video_token_counts)
        elif self.video_slot:
            video_vision = self._dummy_video_vision()

        # Text around the (single) image or video of each side: before / after the placeholder.
        segments: list[tuple[str, str]] = []
        for side, kind in zip(sides, kinds):
            content = (instruction or "") + (side.text or "")
            if self.prompt_format == "llave":
                segments.append(self._llave_segments(content, kind))
            elif kind is None:
                segments.append((_strip_placeholders(content), ""))
            elif PLACEHOLDERS[kind] in content:
                before, after = content.split(PLACEHOLDERS[kind], 1)
                segments.append((_strip_placeholders(before), _strip_placeholders(after)))
            else:
                segments.append(("", "\n" + _strip_placeholders(content)))  # media first, LLaVA style
        flat = [piece for pair in segments for piece in pair]
        # split_special_tokens: user text spelling "<image>" or "<|im_end|>" stays plain text.
        # verbose=False: over-long text is expected here, _fit_row truncates it.
        encoded = self.tokenizer(flat, add_special_tokens=False, split_special_tokens=True,
                                 verbose=False)["input_ids"]

        rows = []
        for i, kind in enumerate(kinds):
            before, after = encoded[2 * i], encoded[2 * i + 1]
            if kind == "image":
                media_ids = self._image_ids(next(image_token_counts))
            elif kind == "video":
                media_ids = self._video_ids(next(video_token_counts))
            else:
                media_ids = []
            rows.append(self._fit_row(before, media_ids, after))
        self.num_formatted += len(sides)

        out = self._pad(rows)
        out.update(vision)
        out["dummy_image"] = torch.tensor(not images)
        if videos or self.video_slot:
            out.update(video_vision)
            out["dummy_video"] = torch.tensor(not videos)
        return out

    def metadata(self) -> dict:
        """How prompts are built, for export next to the weights (the ``input_format`` of
        ``llave_embedding.json``): every ``ProcessingConfig`` field, plus descriptions."""
        return {
            "prompt_format": self.prompt_format,
            "system_prompt": self.system_prompt,
            "pooled_token": f"last token of {TEMPLATE_TAILS[self.prompt_format]!r}",
            "image_placeholder": MMEB_IMAGE_PLACEHOLDER,
            "video_placeholder": MMEB_VIDEO_PLACEHOLDER,
            "image_without_placeholder": ("image tokens first, then '\\n' and the text"
                                          if self.prompt_format == PROMPT_FORMAT else
                                          "image tokens first, then '\\n' and the stripped text "
                                          "(as for one placeholder not at the start)"),
            "video_frames": self.video_frames,
            "video_max_side": self.video_max_side,
            "video_frame_sampling": "i * total // video_frames for i in range(video_frames) "
                                    "(transformers' default_sample_indices_fn; llave_ds.video)",
            "query_instruction": self.query_instruction,
            "target_instruction": self.target_instruction,
            "max_length": self.max_length,
            "max_image_tokens": self.max_image_tokens,
            "padding_side": self.padding_side,
        }

    # -- text ----------------------------------------------------------------------------

    @staticmethod
    def _media_kind(side: Any) -> Optional[str]:
        """"image", "video" or None (text only); a side with both is an error."""
        has_image = getattr(side, "image", None) is not None
        has_video = getattr(side, "video", None) is not None
        if has_image and has_video:
            raise ValueError("a side has both an image and a video; give one of them")
        return "image" if has_image else "video" if has_video else None

    @staticmethod
    def _llave_segments(content: str, kind: Optional[str]) -> tuple[str, str]:
        """(before, after) the image (or video: the same rules with ``<|video_1|>``) for the
        llave format: LLaVE's ``preprocess_multimodal``
        (DeepLearnXMU/LLaVE llava/train/train.py and llava/eval/model_embed.py).

        * one placeholder, not at the very start: it is removed, the rest is ``strip()``-ed
          and the image goes first: ``<image>\\n{rest}`` (``<image>`` alone if rest is empty);
        * placeholder at the very start: the text stays as it is (``<image> Represent ...``);
        * an image but no placeholder: LLaVE would drop the image; here it is placed as in
          the first case;
        * two or more placeholders (LLaVE keeps them all in place): the image takes the
          first one, the others are removed;
        * no image: placeholders are removed.

        Placeholders of the other kind (``<|video_1|>`` on an image side and vice versa) are
        removed everywhere.
        """
        if kind is None:
            return _strip_placeholders(content), ""
        placeholder = PLACEHOLDERS[kind]
        count = content.count(placeholder)
        if count == 0 or (count == 1 and not content.startswith(placeholder)):
            rest = _strip_placeholders(content).strip()
            return "", ("\n" + rest if rest else "")
        before, after = content.split(placeholder, 1)
        return _strip_placeholders(before), _strip_placeholders(after)

    def _encode_template(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _image_ids(self, n_tokens: int) -> list[int]:
        if self.backbone in QWEN_BACKBONES:
            return [self.vision_start_id] + [self.image_token_id] * n_tokens + [self.vision_end_id]
        return [self.image_token_id] * n_tokens

    def _video_ids(self, n_tokens: int) -> list[int]:
        if self.backbone in QWEN_BACKBONES:
            return [self.vision_start_id] + [self.video_token_id] * n_tokens + [self.vision_end_id]
        return [self.video_token_id] * n_tokens

    def _fit_row(self, before: list[int], image_ids: list[int], after: list[int]) -> list[int]:
        """head + before + image (or video) + after + tail, cutting text from the end of the content."""
        fixed = len(self.head_ids) + len(self.tail_ids) + len(image_ids)
        budget = self.max_length - fixed
        if budget < 0:
            raise ValueError(f"an image or video takes {len(image_ids)} tokens, which with the chat "
                             f"template ({fixed - len(image_ids)}) exceeds max_length="
                             f"{self.max_length}; raise max_length, or lower max_image_tokens / "
                             f"video_frames / video_max_side")
        if len(before) + len(after) > budget:
            original_length = fixed + len(before) + len(after)
            before = before[:budget]
            after = after[:budget - len(before)]
            self.num_truncated += 1
            if self.num_truncated == 1:
                logger.warning("a %s-token side exceeded max_length=%d: its text was truncated "
                               "(image tokens and the pooled end of the template are kept); "
                               "further truncations are only counted (InputFormatter.num_truncated)",
                               original_length, self.max_length)
        return self.head_ids + list(before) + image_ids + list(after) + self.tail_ids

    def _pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if self.padding_side == "right" else slice(width - len(row), width)
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # -- images --------------------------------------------------------------------------

    def _image_processor_kwargs(self) -> dict:
        if self.backbone not in QWEN_BACKBONES or self.max_image_tokens is None:
            return {}
        ip = self.image_processor
        pixels_per_token = (ip.patch_size * ip.merge_size) ** 2
        max_pixels = self.max_image_tokens * pixels_per_token
        min_pixels = min(int(ip.size["shortest_edge"]), max_pixels)
        return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}

    def _process_images(self, images: list) -> dict[str, torch.Tensor]:
        out = self.image_processor(images, return_tensors="pt", **self.image_kwargs)
        if self.backbone in QWEN_BACKBONES:
            return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        # batch_num_images is dropped: one image per side is the single-image (anyres) case.
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def _image_token_counts(self, vision: dict[str, torch.Tensor], n_images: int) -> list[int]:
        if self.backbone in QWEN_BACKBONES:
            merge = self.image_processor.merge_size
            return [int(thw.prod()) // merge ** 2 for thw in vision["image_grid_thw"]]
        inputs = {**vision, "batch_num_images": [1] * n_images}
        token = self.processor.image_token
        return [len(self.processor.replace_image_token(inputs, i)) // len(token) for i in range(n_images)]

    def _llava_image_tokens(self, height: int, width: int) -> int:
        # transformers' own count (the one vLLM uses) for an image of this size.
        return int(self.processor._get_num_multimodal_tokens(
            image_sizes=[[height, width]])["num_image_tokens"][0])

    def _fit_image(self, image):
        """LLaVA-OV token cap: downscale until the anyres tiling fits max_image_tokens."""
        if self.backbone != "llava_onevision" or self.max_image_tokens is None:
            return image
        width, height = image.size
        if self._llava_image_tokens(height, width) <= self.max_image_tokens:
            return image
        scale = 1.0
        while True:
            scale *= 0.9
            h, w = max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
            if self._llava_image_tokens(h, w) <= self.max_image_tokens:
                from PIL import Image

                return image.convert("RGB").resize((w, h), Image.BICUBIC)
            if h == 1 or w == 1:
                raise ValueError(f"max_image_tokens={self.max_image_tokens} is below what one "
                                 f"{self.image_processor.size} tile takes on this backbone")

    def _dummy_vision(self) -> dict[str, torch.Tensor]:
        """Pixel tensors of one blank image (computed once): what text-only chunks carry."""
        if self._dummy is None:
            from PIL import Image

            if self.backbone in QWEN_BACKBONES:
                side = self.image_processor.patch_size * self.image_processor.merge_size
                size = (side, side)  # resized up to the processor's minimum
            else:
                size = (int(self.image_processor.size["width"]), int(self.image_processor.size["height"]))
            self._dummy = self._process_images([Image.new("RGB", size)])
        return {k: v.clone() for k, v in self._dummy.items()}

    # -- videos --------------------------------------------------------------------------

    def prepare_video(self, video: Any):
        """A side's ``.video`` -> its frames as this formatter samples them, plus the sampled
        fps (None when unknown): ``(frames, fps)``.

        A path is read with ``llave_ds.video.read_video`` (``VideoError`` names the file); a
        ``Video`` or a list of frames is the whole clip, sampled to ``video_frames`` frames
        (a Video read with that count is taken as it is)."""
        import os

        from llave_ds.video import Video, read_video, sample_frame_indices

        if isinstance(video, (str, os.PathLike)):
            video = read_video(video, self.video_frames, max_side=self.video_max_side)
        if isinstance(video, Video):
            frames, fps, total = list(video.frames), video.info.fps, video.info.total_frames
        elif isinstance(video, (list, tuple)):
            frames, fps, total = list(video), None, len(video)
        else:
            raise TypeError(f"a video must be a path, a llave_ds.video.Video or a list of PIL frames, "
                            f"got {type(video).__name__}")
        if not frames:
            raise ValueError("a video has no frames")
        if len(frames) != self.video_frames:
            frames = [frames[i] for i in sample_frame_indices(len(frames), self.video_frames)]
        if self.video_max_side is not None:
            frames = _downscale_frames(frames, self.video_max_side)
        # transformers' VideoMetadata.sampled_fps: sampled / total * fps (24 when unknown).
        sampled_fps = len(frames) / total * fps if fps and total else None
        return frames, sampled_fps

    def _process_videos(self, videos: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        """(tensors, video tokens per video) of prepared videos (``prepare_video``)."""
        parts = [video_pixel_values(frames, self.video_settings) for frames, _ in videos]
        out = {"pixel_values_videos": torch.cat([p["pixel_values_videos"] for p in parts])}
        if self.backbone in QWEN_BACKBONES:
            grid = torch.cat([p["video_grid_thw"] for p in parts])
            out["video_grid_thw"] = grid
            counts = [int(thw.prod()) // self.video_settings.merge_size ** 2 for thw in grid]
            if self.backbone == "qwen2_5_vl":
                tp = self.video_settings.temporal_patch_size
                out["second_per_grid_ts"] = torch.tensor([tp / (fps or 24) for _, fps in videos],
                                                         dtype=torch.float32)
        else:
            counts = [self._llava_video_tokens(p["pixel_values_videos"].shape[1]) for p in parts]
        return out, counts

    def _llava_video_tokens(self, num_frames: int) -> int:
        """LlavaOnevisionProcessor.replace_video_token: frames x pooled patches + 1 newline
        (the model pools each frame's patch grid 2x2, rounding up)."""
        patches_per_side = int(math.isqrt(int(self.processor.num_image_tokens)))
        pooled = math.ceil(patches_per_side / 2)
        return num_frames * pooled * pooled + 1

    def _dummy_video_vision(self) -> dict[str, torch.Tensor]:
        """Tensors of one blank video (computed once): what chunks without videos carry when
        ``video_slot`` is on. LLaVA-OV: one frame; Qwen: ``temporal_patch_size`` frames of
        the smallest size (one temporal patch)."""
        if self._dummy_video is None:
            from PIL import Image

            settings = self.video_settings
            if self.backbone in QWEN_BACKBONES:
                side = settings.patch_size * settings.merge_size
                frames = [Image.new("RGB", (side, side))] * settings.temporal_patch_size
            else:
                frames = [Image.new("RGB", (int(settings.width), int(settings.height)))]
            self._dummy_video, _ = self._process_videos([(frames, None)])
        return {k: v.clone() for k, v in self._dummy_video.items()}


def _strip_placeholders(text: str) -> str:
    for placeholder in PLACEHOLDERS.values():
        text = text.replace(placeholder, "")
    return text


def _downscale_frames(frames: list, max_side: int) -> list:
    """``llave_ds.video.read_video``'s ``max_side`` rule, for frames given as a list."""
    from llave_ds.video import downscale_frames

    return downscale_frames(frames, max_side)
