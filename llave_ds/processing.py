"""From (text, image) sides to the tensors one forward of the embedding model takes.

Four things live here:

* ``ProcessingConfig``: the ``processing`` section of a run config, which is also the
  ``input_format`` block of an export's ``llave_embedding.json``;
* the video-free processors (``LlavaOnevisionImageTextProcessor``,
  ``Qwen2VLImageTextProcessor``): the stock ones insist on a video processor, which needs
  torchvision; these are the same classes without it, and load both their own saves and
  stock hub checkpoint directories;
* ``load_processor(path)``: picks the right one from the directory's config.json;
* ``InputFormatter``: Qwen chat prompt, MMEB ``<|image_1|>`` -> the backbone's own image
  tokens, instruction prefixes, truncation that never cuts image tokens or the pooled
  (last) token, an image-token cap, and the blank "dummy" image that keeps text-only chunks
  running the vision tower (every rank and chunk must run the same modules under ZeRO-3).
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
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

logger = logging.getLogger("llave_ds.processing")

SUPPORTED_BACKBONES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")
# Backbones with Qwen2-VL-style inputs: <|vision_start|> <|image_pad|>*n <|vision_end|>,
# flattened patches + image_grid_thw, M-RoPE positions (Qwen2.5-VL shares the image processor).
QWEN_BACKBONES = ("qwen2_vl", "qwen2_5_vl")
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("query", "target")
PROMPT_FORMAT = "qwen_chat"  # the default prompt format
# qwen_chat: the Qwen chat prompt up to the generation prompt, image where the placeholder is.
# llave: LLaVE's training/eval prompt (DeepLearnXMU/LLaVE llava/train/train.py): the image
# moved to the front of the user turn, then an assistant turn "\n" closed by <|im_end|>\n.
# docs/MODELS.md "Prompt formats" spells out both token by token.
PROMPT_FORMATS = ("qwen_chat", "llave")
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
    padding_side: str = "right"
    prompt_format: str = PROMPT_FORMAT  # "qwen_chat" or "llave" (LLaVE checkpoints)

    def validate(self) -> None:
        check_prompt_format(self.prompt_format, "processing.prompt_format")
        if self.max_length < 8:
            raise ValueError(f"processing.max_length must be >= 8, got {self.max_length}")
        if self.max_image_tokens is not None and self.max_image_tokens < 1:
            raise ValueError(f"processing.max_image_tokens must be >= 1 or null, got {self.max_image_tokens}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"processing.padding_side must be left or right, got {self.padding_side!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_metadata(cls, input_format: Optional[Mapping], source: str) -> "ProcessingConfig":
        """From the ``input_format`` block of ``llave_embedding.json`` (``source`` names the
        file in errors). Fields it lacks keep their defaults; its descriptive keys
        (``prompt_format``, ``pooled_token``, ...) are checked or ignored."""
        from llave_ds.config import config_from_dict

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
    return PROCESSOR_CLASSES[backbone].from_pretrained(str(path), **kwargs)


# ---------------------------------------------------------------------------------------
# Prompt formatting
# ---------------------------------------------------------------------------------------

class InputFormatter:
    """Turn a list of sides (duck-typed: ``.text: str``, ``.image: PIL.Image | None``) into the
    keyword arguments of ``EmbeddingModel.forward``.

    Output keys:

    * llava_onevision: ``input_ids``, ``attention_mask``, ``pixel_values``
      ``[n_images, n_tiles, 3, H, W]``, ``image_sizes`` ``[n_images, 2]``, ``dummy_image``;
    * qwen2_vl / qwen2_5_vl: ``input_ids``, ``attention_mask``, ``pixel_values`` ``[n_patches, C*T*P*P]``,
      ``image_grid_thw`` ``[n_images, 3]``, ``dummy_image``.

    ``dummy_image`` is a 0-dim bool tensor. When no side of the chunk has an image, the
    pixel tensors hold one blank image, ``dummy_image`` is True, and the text holds no image
    token: the model runs the vision tower on it only to keep the module sequence identical
    across ranks and chunks, and adds ``0 * features.sum()`` to its output.

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
                 prompt_format: str = PROMPT_FORMAT):
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

        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_token_id = int(self.tokenizer.pad_token_id)

        tok = self.tokenizer.convert_tokens_to_ids
        if backbone == "llava_onevision":
            self.image_token_id = int(processor.image_token_id)
            self.vision_start_id = self.vision_end_id = None
        else:
            self.image_token_id = int(tok(processor.image_token))
            self.vision_start_id = int(tok("<|vision_start|>"))
            self.vision_end_id = int(tok("<|vision_end|>"))
        self.image_kwargs = self._image_processor_kwargs()

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

    @classmethod
    def from_config(cls, processor, backbone: str, config: ProcessingConfig) -> "InputFormatter":
        """The formatter of a ``ProcessingConfig``: every field of it, validated."""
        if not isinstance(config, ProcessingConfig):
            raise TypeError(f"config must be a ProcessingConfig, got {type(config).__name__}")
        config.validate()
        return cls(processor, backbone, **dataclasses.asdict(config))

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

        images = [self._fit_image(s.image) for s in sides if s.image is not None]
        if images:
            vision = self._process_images(images)
            image_token_counts = iter(self._image_token_counts(vision, len(images)))
        else:
            vision = self._dummy_vision()

        # Text around the (single) image of each side: before / after the placeholder.
        segments: list[tuple[str, str]] = []
        for side in sides:
            content = (instruction or "") + (side.text or "")
            if self.prompt_format == "llave":
                segments.append(self._llave_segments(content, side.image is not None))
            elif side.image is None:
                segments.append((content.replace(MMEB_IMAGE_PLACEHOLDER, ""), ""))
            elif MMEB_IMAGE_PLACEHOLDER in content:
                before, after = content.split(MMEB_IMAGE_PLACEHOLDER, 1)
                segments.append((before, after.replace(MMEB_IMAGE_PLACEHOLDER, "")))
            else:
                segments.append(("", "\n" + content))  # image first, LLaVA style
        flat = [piece for pair in segments for piece in pair]
        # split_special_tokens: user text spelling "<image>" or "<|im_end|>" stays plain text.
        # verbose=False: over-long text is expected here, _fit_row truncates it.
        encoded = self.tokenizer(flat, add_special_tokens=False, split_special_tokens=True,
                                 verbose=False)["input_ids"]

        rows = []
        for i, side in enumerate(sides):
            before, after = encoded[2 * i], encoded[2 * i + 1]
            image_ids = self._image_ids(next(image_token_counts)) if side.image is not None else []
            rows.append(self._fit_row(before, image_ids, after))
        self.num_formatted += len(sides)

        out = self._pad(rows)
        out.update(vision)
        out["dummy_image"] = torch.tensor(not images)
        return out

    def metadata(self) -> dict:
        """How prompts are built, for export next to the weights (the ``input_format`` of
        ``llave_embedding.json``): every ``ProcessingConfig`` field, plus descriptions."""
        return {
            "prompt_format": self.prompt_format,
            "system_prompt": self.system_prompt,
            "pooled_token": f"last token of {TEMPLATE_TAILS[self.prompt_format]!r}",
            "image_placeholder": MMEB_IMAGE_PLACEHOLDER,
            "image_without_placeholder": ("image tokens first, then '\\n' and the text"
                                          if self.prompt_format == PROMPT_FORMAT else
                                          "image tokens first, then '\\n' and the stripped text "
                                          "(as for one placeholder not at the start)"),
            "query_instruction": self.query_instruction,
            "target_instruction": self.target_instruction,
            "max_length": self.max_length,
            "max_image_tokens": self.max_image_tokens,
            "padding_side": self.padding_side,
        }

    # -- text ----------------------------------------------------------------------------

    @staticmethod
    def _llave_segments(content: str, has_image: bool) -> tuple[str, str]:
        """(before, after) the image for the llave format: LLaVE's ``preprocess_multimodal``
        (DeepLearnXMU/LLaVE llava/train/train.py and llava/eval/model_embed.py).

        * one placeholder, not at the very start: it is removed, the rest is ``strip()``-ed
          and the image goes first: ``<image>\\n{rest}`` (``<image>`` alone if rest is empty);
        * placeholder at the very start: the text stays as it is (``<image> Represent ...``);
        * an image but no placeholder: LLaVE would drop the image; here it is placed as in
          the first case;
        * two or more placeholders (LLaVE keeps them all in place): the image takes the
          first one, the others are removed;
        * no image: placeholders are removed.
        """
        placeholder = MMEB_IMAGE_PLACEHOLDER
        count = content.count(placeholder)
        if not has_image:
            return content.replace(placeholder, ""), ""
        if count == 0 or (count == 1 and not content.startswith(placeholder)):
            rest = content.replace(placeholder, "").strip()
            return "", ("\n" + rest if rest else "")
        before, after = content.split(placeholder, 1)
        return before, after.replace(placeholder, "")

    def _encode_template(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _image_ids(self, n_tokens: int) -> list[int]:
        if self.backbone in QWEN_BACKBONES:
            return [self.vision_start_id] + [self.image_token_id] * n_tokens + [self.vision_end_id]
        return [self.image_token_id] * n_tokens

    def _fit_row(self, before: list[int], image_ids: list[int], after: list[int]) -> list[int]:
        """head + before + image + after + tail, cutting text from the end of the content."""
        fixed = len(self.head_ids) + len(self.tail_ids) + len(image_ids)
        budget = self.max_length - fixed
        if budget < 0:
            raise ValueError(f"an image takes {len(image_ids)} tokens, which with the chat "
                             f"template ({fixed - len(image_ids)}) exceeds max_length="
                             f"{self.max_length}; raise max_length or lower max_image_tokens")
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
