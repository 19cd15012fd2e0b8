"""The prompt formats: their names, the tail whose last token is pooled, the system turn,
and where an image or video goes in a side's content (``content_segments``).

``qwen_chat`` (the default): the Qwen chat prompt up to the generation prompt, the image
where the placeholder is; ``llave``: LLaVE's own prompt; ``qwen3_vl_embedding``:
Qwen3-VL-Embedding's. ``InputFormatter`` lays rows out with them and the sentence-transformers
export writes them as a chat template; docs/MODELS.md "Prompt formats" has each token by token.
"""
from __future__ import annotations

import unicodedata
from typing import Literal, Optional, get_args

from llave_ds.formats import PLACEHOLDERS

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_FORMAT = "qwen_chat"  # the default prompt format
# qwen_chat: the Qwen chat prompt up to the generation prompt, image where the placeholder is.
# llave: LLaVE's training/eval prompt (DeepLearnXMU/LLaVE llava/train/train.py): the image
# moved to the front of the user turn, then an assistant turn "\n" closed by <|im_end|>\n.
# qwen3_vl_embedding: Qwen3-VL-Embedding's own prompt (QwenLM/Qwen3-VL-Embedding,
# src/models/qwen3_vl_embedding.py, Qwen3VLEmbedder.format_model_input): the role's instruction
# is the system turn (default "Represent the user's input.", a "." added when it does not end in
# punctuation), the user turn is the video or image then the text, "NULL" when a side has
# neither, and the generation prompt follows; its final "\n" is pooled.
# docs/MODELS.md "Prompt formats" spells out each token by token.
PromptFormat = Literal["qwen_chat", "llave", "qwen3_vl_embedding"]
PROMPT_FORMATS = get_args(PromptFormat)
# What follows the user content; the last token of it is the pooled one.
TEMPLATE_TAILS = {"qwen_chat": "<|im_end|>\n<|im_start|>assistant\n",
                  "llave": "<|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n",
                  "qwen3_vl_embedding": "<|im_end|>\n<|im_start|>assistant\n"}
# qwen3_vl_embedding: the system turn when a role has no instruction, and the user turn of a
# side with no text, image or video.
DEFAULT_EMBEDDING_INSTRUCTION = "Represent the user's input."
EMPTY_SIDE_TEXT = "NULL"


# The settings of Qwen3-VL-Embedding's own encoder (Qwen3VLEmbedder: MAX_LENGTH 8192,
# MIN_PIXELS 4 * 32 * 32, MAX_PIXELS 1800 * 32 * 32, right padding, its prompt).
QWEN3_VL_EMBEDDING_SETTINGS = dict(prompt_format="qwen3_vl_embedding", max_length=8192, min_image_tokens=4,
                                   max_image_tokens=1800, padding_side="right")


def embedding_instruction(instruction: Optional[str]) -> str:
    """Qwen3-VL-Embedding's system turn: the instruction, stripped and ending in punctuation
    (a "." is added otherwise), or the default one."""
    text = (instruction or "").strip()
    if not text:
        return DEFAULT_EMBEDDING_INSTRUCTION
    return text if unicodedata.category(text[-1]).startswith("P") else text + "."


def check_prompt_format(prompt_format: str, field: str = "prompt_format") -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"{field} must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    return prompt_format


def content_segments(prompt_format: str, content: str, kind: Optional[str]) -> tuple[str, str]:
    """(text before, text after) the side's image or video (``kind`` "image" / "video"; None:
    text only, everything is "before") under ``prompt_format``. ``content`` is the
    instruction (where the format puts it in the user turn) plus the side's text."""
    if prompt_format == "llave":
        return llave_segments(content, kind)
    if prompt_format == "qwen3_vl_embedding":
        return qwen3_embedding_segments(content, kind)
    if kind is None:
        return strip_placeholders(content), ""
    if PLACEHOLDERS[kind] in content:
        before, after = content.split(PLACEHOLDERS[kind], 1)
        return strip_placeholders(before), strip_placeholders(after)
    return "", "\n" + strip_placeholders(content)  # media first, LLaVA style


def llave_segments(content: str, kind: Optional[str]) -> tuple[str, str]:
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
        return strip_placeholders(content), ""
    placeholder = PLACEHOLDERS[kind]
    count = content.count(placeholder)
    if count == 0 or (count == 1 and not content.startswith(placeholder)):
        rest = strip_placeholders(content).strip()
        return "", ("\n" + rest if rest else "")
    before, after = content.split(placeholder, 1)
    return strip_placeholders(before), strip_placeholders(after)


def qwen3_embedding_segments(content: str, kind: Optional[str]) -> tuple[str, str]:
    """(before, after) the image or video for the qwen3_vl_embedding format: the media
    first and the text after it with nothing between (the Qwen3-VL chat template renders a
    user turn's parts in order: video, image, text); MMEB's placeholders are removed and,
    beside media, the text is stripped (their eval passes the instruction-free text apart
    from the image); a side with nothing at all is the text "NULL"."""
    text = strip_placeholders(content)
    if kind is None:
        return (text if text else EMPTY_SIDE_TEXT), ""
    return "", text.strip()


def strip_placeholders(text: str) -> str:
    for placeholder in PLACEHOLDERS.values():
        text = text.replace(placeholder, "")
    return text
