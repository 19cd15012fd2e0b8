"""Shared pieces of the multimodal tests: a duck-typed side and deterministic images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

BACKBONES = ["llava_onevision", "qwen2_vl"]


@dataclass
class Side:
    """What the InputFormatter reads: ``.text`` and ``.image`` (PIL or None)."""
    text: str
    image: Optional[Image.Image] = None


def noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))
