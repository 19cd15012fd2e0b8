"""The backbones llave-ds trains: their names, how a checkpoint says which one it is, and
the transformers classes that load them.

Add a backbone here first (its name, its model class); the processor, the formatter's token
layout and the embedding model's forward follow (docs/MODELS.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Union, get_args

from llave_ds.config import ConfigError

Backbone = Literal["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
SUPPORTED_BACKBONES = get_args(Backbone)
# Backbones with Qwen2-VL-style inputs: <|vision_start|> <|image_pad|>*n <|vision_end|>,
# flattened patches + image_grid_thw, M-RoPE positions (Qwen2.5-VL and Qwen3-VL share the
# image processor; Qwen3-VL's patches are 16 px, so 32 px per merged token).
QWEN_BACKBONES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Backbones whose vision tower also feeds features of intermediate layers, each through its own
# merger, into the first decoder layers (Qwen3-VL's DeepStack).
DEEPSTACK_BACKBONES = ("qwen3_vl",)


def language_model(hf_model):
    """The decoder stack of a ForConditionalGeneration model: ``model.language_model`` for every
    supported backbone in transformers 5 (LLaVA-OV's Qwen2, the Qwen-VL text models)."""
    return hf_model.model.language_model


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



def model_class(backbone: str):
    """The transformers ``*ForConditionalGeneration`` class of a backbone (its LM head is
    never run; the class is the one checkpoints are saved with)."""
    from transformers import (LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration)

    return {"llava_onevision": LlavaOnevisionForConditionalGeneration,
            "qwen2_vl": Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": Qwen3VLForConditionalGeneration}[check_backbone(backbone)]


def check_model_path(raw: str, backbone: str = "auto") -> None:
    """Fail early (a `ConfigError` naming ``model.path``) on a model directory that cannot be
    loaded: missing, without config.json, or of an unsupported or other backbone than
    ``backbone``. Hub ids pass (they resolve when the model loads)."""
    if not raw:
        raise ConfigError("model.path is empty: give a checkpoint directory or a hub id")
    path = Path(raw).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={raw}: {path} has no config.json (not a transformers checkpoint directory)")
        try:
            found = detect_backbone(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"model.path={raw}: {exc}") from None
        if backbone != "auto" and backbone != found:
            raise ConfigError(f"model.backbone={backbone!r} but {path} is a {found!r} checkpoint")
    elif path.exists() or path.is_absolute() or raw.startswith((".", "~")):
        raise ConfigError(f"model.path={raw}: no such directory")
