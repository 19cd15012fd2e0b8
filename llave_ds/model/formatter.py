"""From sides to the tensors one forward of the embedding model takes.

* ``ProcessingConfig``: the ``processing`` section of a run config, which is also the
  ``input_format`` block of an export's ``llave_embedding.json``;
* ``InputFormatter``: Qwen chat prompt, MMEB ``<|image_1|>`` / ``<|video_1|>`` -> the
  backbone's own image / video tokens, instruction prefixes, truncation that never cuts
  image or video tokens or the pooled (last) token, an image-token cap, and the blank
  "dummy" image (and, with ``video_slot``, dummy video) that keeps every chunk running the
  same vision-tower calls (every rank and chunk must run the same modules under ZeRO-3).
  ``InputFormatter.from_config(processor, backbone, processing_config)`` is the one way
  training, ``llave-ds export`` and ``LlaveEmbedder`` build it, so all three format alike.

The prompt layouts are `llave_ds.model.prompt_formats`; the processors it drives are
`llave_ds.model.processors`; video tensors are
`llave_ds.model.video_processing`; which frames a video contributes is
`llave_ds.media.video.sample_clip`.

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
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import torch

from llave_ds.config import check_choices, config_from_dict
from llave_ds.formats import IMAGE_PLACEHOLDER, ROLES, VIDEO_PLACEHOLDER
from llave_ds.media.video import DEFAULT_VIDEO_FRAMES, sample_clip
from llave_ds.model.backbones import QWEN_BACKBONES, check_backbone
from llave_ds.model.prompt_formats import (DEFAULT_SYSTEM_PROMPT, PROMPT_FORMAT, PROMPT_FORMATS,
                                           QWEN3_VL_EMBEDDING_SETTINGS, TEMPLATE_TAILS, PromptFormat,
                                           check_prompt_format, content_segments, embedding_instruction)
from llave_ds.model.video_processing import VideoSettings, video_pixel_values

logger = logging.getLogger(__name__)


def release_processing(path: Any, backbone: str) -> Optional["ProcessingConfig"]:
    """The processing settings of a released embedding checkpoint that llave-ds did not export
    (no llave_embedding.json), when its layout says which model it is; else None.

    Qwen3-VL-Embedding (and models fine-tuned from it with sentence-transformers): a Qwen3-VL
    checkpoint whose sentence-transformers files pool the last token. A plain Qwen3-VL
    (Instruct) directory has no such files and gets the defaults. docs/MODELS.md says what
    of the released layout could be checked offline."""
    import json
    from pathlib import Path

    root = Path(path)
    if backbone != "qwen3_vl" or not (root / "modules.json").is_file():
        return None
    try:
        modules = json.loads((root / "modules.json").read_text())
        pooling = next(m for m in modules if "Pooling" in str(m.get("type", "")))
        mode = json.loads((root / pooling.get("path", "") / "config.json").read_text()).get("pooling_mode")
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None
    if mode != "lasttoken":
        return None
    return ProcessingConfig(**QWEN3_VL_EMBEDDING_SETTINGS)


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
    # Qwen backbones: images smaller than this many tokens are upscaled to it (None: the
    # processor's own minimum). Qwen3-VL-Embedding encodes with 4..1800 tokens per image.
    min_image_tokens: Optional[int] = None
    query_instruction: Optional[str] = None
    target_instruction: Optional[str] = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    padding_side: Literal["left", "right"] = "right"
    prompt_format: PromptFormat = PROMPT_FORMAT  # "llave" for LLaVE checkpoints
    # Videos: frames sampled uniformly per video (llave_ds.media.video.sample_clip), and
    # an optional cap on the longer side of a frame, applied before the processor's resize.
    video_frames: int = DEFAULT_VIDEO_FRAMES
    video_max_side: Optional[int] = None

    def validate(self) -> None:
        check_choices(self, "processing.")
        if self.max_length < 8:
            raise ValueError(f"processing.max_length must be >= 8, got {self.max_length}")
        if self.max_image_tokens is not None and self.max_image_tokens < 1:
            raise ValueError(f"processing.max_image_tokens must be >= 1 or null, got {self.max_image_tokens}")
        if self.min_image_tokens is not None and self.min_image_tokens < 1:
            raise ValueError(f"processing.min_image_tokens must be >= 1 or null, got {self.min_image_tokens}")
        if None not in (self.min_image_tokens, self.max_image_tokens) and self.min_image_tokens > self.max_image_tokens:
            raise ValueError(f"processing.min_image_tokens={self.min_image_tokens} is above "
                             f"max_image_tokens={self.max_image_tokens}")
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
# Prompt formatting
# ---------------------------------------------------------------------------------------

class InputFormatter:
    """Turn a list of sides (duck-typed: ``.text: str``, ``.image: PIL.Image | None`` and,
    optionally, ``.video``) into the keyword arguments of ``EmbeddingModel.forward``.

    A side is text, an image, a video, or text with one of them (not both). ``.video`` is a
    ``llave_ds.media.video.Video`` (training decodes clips in its DataLoader workers), a list of
    PIL frames (the whole clip), or a path to a video file / frame folder. Every video goes
    through ``llave_ds.media.video.sample_clip`` with ``video_frames`` / ``video_max_side``
    (a clip already read with those settings passes through untouched).

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
        min_image_tokens: Qwen only: the processor's min pixels become
            ``min_image_tokens * (patch_size * merge_size)**2`` (smaller images are upscaled).
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
                 max_image_tokens: Optional[int] = None, min_image_tokens: Optional[int] = None,
                 query_instruction: Optional[str] = None,
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
        if min_image_tokens is not None and (min_image_tokens < 1 or check_backbone(backbone) not in QWEN_BACKBONES):
            raise ValueError(f"min_image_tokens={min_image_tokens}: must be >= 1, and applies to the Qwen "
                             f"backbones ({', '.join(QWEN_BACKBONES)}), not {backbone}")
        self.min_image_tokens = min_image_tokens
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

        self._heads: dict[str, list[int]] = {}
        self.tail_ids = self._encode_template(TEMPLATE_TAILS[self.prompt_format])
        min_len = max(len(self.head_for(role)) for role in ROLES) + len(self.tail_ids) + 1
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
    def head_ids(self) -> list[int]:
        """The chat template up to the user content, for queries (``head_for``)."""
        return self.head_for("query")

    def system_text(self, role: str) -> str:
        """The system turn of ``role``'s sides: ``system_prompt``, or with the
        ``qwen3_vl_embedding`` format the role's instruction (`embedding_instruction`)."""
        if self.prompt_format == "qwen3_vl_embedding":
            return embedding_instruction(self.query_instruction if role == "query" else self.target_instruction)
        return self.system_prompt

    def head_for(self, role: str) -> list[int]:
        """The token ids of the chat template up to the user content (cached per system text)."""
        system = self.system_text(role)
        if system not in self._heads:
            self._heads[system] = self._encode_template(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        return self._heads[system]

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
        if self.prompt_format == "qwen3_vl_embedding":
            instruction = None  # it is the system turn (head_for)
        head = self.head_for(role)
        kinds = [self._media_kind(side) for side in sides]

        images = [self._fit_image(s.image) for s, k in zip(sides, kinds) if k == "image"]
        if images:
            vision = self._process_images(images)
            image_token_counts = iter(self._image_token_counts(vision, len(images)))
        else:
            vision = self._dummy_vision()
        videos = [self.prepare_video(s.video) for s, k in zip(sides, kinds) if k == "video"]
        if videos:
            video_vision, video_layouts = self._process_videos(videos)
            video_layouts = iter(video_layouts)
        elif self.video_slot:
            video_vision = self._dummy_video_vision()

        # Text around the (single) image or video of each side: before / after the placeholder.
        segments = [content_segments(self.prompt_format, (instruction or "") + (side.text or ""), kind)
                    for side, kind in zip(sides, kinds)]
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
                media_ids = next(video_layouts)
            else:
                media_ids = []
            rows.append(self._fit_row(before, media_ids, after, head))
        self.num_formatted += len(sides)

        out = self._pad(rows)
        out.update(vision)
        out["dummy_image"] = torch.tensor(not images)
        if videos or self.video_slot:
            out.update(video_vision)
            out["dummy_video"] = torch.tensor(not videos)
        return out

    def row_lengths(self, sides: Sequence[Any], role: str) -> list[int]:
        """Each side's token count as this formatter lays it out: a row's length does not depend
        on the other rows of its chunk (each row is fitted to ``max_length`` alone, media token
        counts are per image or clip), so this formats each side alone (images and videos
        included: a second formatting pass, the price of token-budget chunks). The formatting
        counters are left as they were."""
        counters = (self.num_formatted, self.num_truncated)
        try:
            return [int(self([side], role)["attention_mask"].sum()) for side in sides]
        finally:
            self.num_formatted, self.num_truncated = counters

    def metadata(self) -> dict:
        """How prompts are built, for export next to the weights (the ``input_format`` of
        ``llave_embedding.json``): every ``ProcessingConfig`` field, plus descriptions."""
        return {
            "prompt_format": self.prompt_format,
            "system_prompt": self.system_prompt,
            "pooled_token": f"last token of {TEMPLATE_TAILS[self.prompt_format]!r}",
            "image_placeholder": IMAGE_PLACEHOLDER,
            "video_placeholder": VIDEO_PLACEHOLDER,
            "image_without_placeholder": ("image tokens first, then '\\n' and the text"
                                          if self.prompt_format == PROMPT_FORMAT else
                                          "image tokens first, then '\\n' and the stripped text "
                                          "(as for one placeholder not at the start)"),
            "video_frames": self.video_frames,
            "video_max_side": self.video_max_side,
            "video_frame_sampling": "i * total // video_frames for i in range(video_frames) "
                                    "(transformers' default_sample_indices_fn; llave_ds.media.video)",
            "query_instruction": self.query_instruction,
            "target_instruction": self.target_instruction,
            "max_length": self.max_length,
            "max_image_tokens": self.max_image_tokens,
            "min_image_tokens": self.min_image_tokens,
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

    def _fit_row(self, before: list[int], image_ids: list[int], after: list[int],
                 head: Optional[list[int]] = None) -> list[int]:
        """head + before + image (or video) + after + tail, cutting text from the end of the content."""
        head = self.head_ids if head is None else head
        fixed = len(head) + len(self.tail_ids) + len(image_ids)
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
        return head + list(before) + image_ids + list(after) + self.tail_ids

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
        """Qwen: the processor's pixel bounds from max_image_tokens / min_image_tokens
        (``tokens * (patch_size * merge_size)**2``), the processor's own where one is None."""
        if self.backbone not in QWEN_BACKBONES or (self.max_image_tokens is None and self.min_image_tokens is None):
            return {}
        ip = self.image_processor
        pixels_per_token = (ip.patch_size * ip.merge_size) ** 2
        max_pixels = (self.max_image_tokens * pixels_per_token if self.max_image_tokens is not None
                      else int(ip.size["longest_edge"]))
        min_pixels = (self.min_image_tokens * pixels_per_token if self.min_image_tokens is not None
                      else int(ip.size["shortest_edge"]))
        return {"size": {"shortest_edge": min(min_pixels, max_pixels), "longest_edge": max_pixels}}

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
        """A side's ``.video`` -> the clip this formatter encodes (a ``Video``), by the one clip
        rule (``llave_ds.media.video.sample_clip``; a bad path raises its ``VideoError``)."""
        return sample_clip(video, self.video_frames, self.video_max_side)

    def _process_videos(self, clips: list) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """(tensors, the token ids of each video) of prepared clips (``prepare_video``)."""
        parts = [video_pixel_values(clip.frames, self.video_settings) for clip in clips]
        out = {"pixel_values_videos": torch.cat([p["pixel_values_videos"] for p in parts])}
        if self.backbone not in QWEN_BACKBONES:
            return out, [self._video_ids(self._llava_video_tokens(p["pixel_values_videos"].shape[1])) for p in parts]
        grid = torch.cat([p["video_grid_thw"] for p in parts])
        out["video_grid_thw"] = grid
        merge = self.video_settings.merge_size
        if self.backbone == "qwen3_vl":
            return out, [self._qwen3_video_ids(thw, clip) for thw, clip in zip(grid, clips)]
        if self.backbone == "qwen2_5_vl":
            tp = self.video_settings.temporal_patch_size
            out["second_per_grid_ts"] = torch.tensor([tp / (clip.sampled_fps or 24) for clip in clips],
                                                     dtype=torch.float32)
        return out, [self._video_ids(int(thw.prod()) // merge ** 2) for thw in grid]

    def _qwen3_video_ids(self, thw: torch.Tensor, clip) -> list[int]:
        """Qwen3-VL's video layout: per temporal patch, the text ``<{t:.1f} seconds>`` (the mean
        time of its frames: the processor's ``_calculate_timestamps`` of the clip's frame indices
        and fps, 24 when unknown, as transformers) and then ``<|vision_start|>``, its tokens and
        ``<|vision_end|>``. No second start/end pair around the whole video: that is the layout
        Qwen3-VL was trained with (transformers 4.57); transformers 5.2x's processor leaves the
        chat template's pair around it (docs/VIDEO.md)."""
        per_patch = int(thw[1] * thw[2]) // self.video_settings.merge_size ** 2
        times = self.processor._calculate_timestamps(list(clip.indices), clip.info.fps or 24,
                                                     self.video_settings.temporal_patch_size)
        ids: list[int] = []
        for t in range(int(thw[0])):
            ids += self._encode_template(f"<{times[t]:.1f} seconds>")
            ids += [self.vision_start_id] + [self.video_token_id] * per_patch + [self.vision_end_id]
        return ids

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
            self._dummy_video, _ = self._process_videos([sample_clip(frames, len(frames))])
        return {k: v.clone() for k, v in self._dummy_video.items()}
