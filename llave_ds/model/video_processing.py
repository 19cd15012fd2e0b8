"""Video tensors without torchvision: what a backbone's own video processor gives for the
same sampled frames.

transformers' video processors (LlavaOnevisionVideoProcessor, Qwen2VLVideoProcessor) need
torchvision, which the CPU torch build here has no matching wheel for and GPU clusters bring
in their own builds. The steps are short and are reproduced here: resize (the same
``F.interpolate(antialias=True)`` call torchvision's CPU kernel makes), fused rescale +
normalise in float32, and Qwen's ``patchify``; tests compare them with the PIL image
processors where the two must agree (docs/DECISIONS.md). Which frames are sampled is
`llave_ds.media.video.sample_clip`'s rule, not this module's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from llave_ds.model.backbones import QWEN_BACKBONES
from llave_ds.model.processors import VIDEO_CONFIG_ATTR

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
    # Qwen3VLVideoProcessor: 16-px patches, IMAGENET_STANDARD mean/std (0.5), and its size
    # bounds count the pixels of all frames together (its own smart_resize).
    "qwen3": dict(size={"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}, resample=3,
                  image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), patch_size=16, temporal_patch_size=2,
                  merge_size=2, max_video_tokens=768),
}



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
        family = "qwen3" if backbone == "qwen3_vl" else "qwen" if backbone in QWEN_BACKBONES else "llava_onevision"
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
        factor = self.patch_size * self.merge_size
        if self.backbone == "qwen3_vl":  # Qwen3VLVideoProcessor.resize: bounds over all frames
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_smart_resize

            max_pixels = self.max_pixels
            if self.cap_pixels_per_frame:
                per_frame = max(min(self.max_video_tokens * factor * factor, self.max_pixels // num_frames),
                                int(self.min_pixels * 1.05))
                max_pixels = per_frame * num_frames
            return tuple(qwen3_smart_resize(num_frames=num_frames, height=height, width=width, factor=factor,
                                            temporal_factor=self.temporal_patch_size, min_pixels=self.min_pixels,
                                            max_pixels=max_pixels))
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

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

