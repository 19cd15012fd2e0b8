"""The backbones' processors without their video processors (so without torchvision).

The stock LLaVA-OneVision / Qwen2-VL / Qwen2.5-VL processors insist on a video processor,
which needs torchvision; these are the same classes without it. They load both their own
saves and stock hub checkpoint directories, and save under the stock class names, so
``AutoProcessor.from_pretrained(export)`` builds the stock class. ``load_processor(path)``
picks the right one from the directory's config.json and records the checkpoint's video
processor settings on it (`llave_ds.model.video_processing` reads them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

from llave_ds.model.backbones import check_backbone, detect_backbone

# Attribute of a loaded processor holding its checkpoint's video processor config (or None).
VIDEO_CONFIG_ATTR = "llave_video_processor_config"


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


class Qwen3VLImageTextProcessor(_SavedAsStockProcessor, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor (so without torchvision); its image
    processor is Qwen2-VL's (16-px patches in Qwen3-VL checkpoints). Saved directories name
    ``Qwen3VLProcessor``."""

    stock_class = Qwen3VLProcessor

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


PROCESSOR_CLASSES = {
    "llava_onevision": LlavaOnevisionImageTextProcessor,
    "qwen2_vl": Qwen2VLImageTextProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageTextProcessor,
    "qwen3_vl": Qwen3VLImageTextProcessor,
}


def load_processor(path: Union[str, Path], backbone: str = "auto", **kwargs):
    """Load the video-free processor of a checkpoint directory (or hub id).

    Works on directories written by ``llave_ds.toy.tiny`` and on stock transformers-format
    LLaVA-OneVision / Qwen2-VL checkpoints (their video processor config is ignored).
    """
    backbone = detect_backbone(path) if backbone == "auto" else check_backbone(backbone)
    processor = PROCESSOR_CLASSES[backbone].from_pretrained(str(path), **kwargs)
    setattr(processor, VIDEO_CONFIG_ATTR, read_video_processor_config(path))
    return processor



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

