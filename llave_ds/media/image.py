"""Images: a path (or a PIL image) -> a fully decoded RGB PIL image, or a `MediaError`.

``load_image`` is what training rows, evaluation rows and the embedder decode with: the file
checks of `llave_ds.media.files`, a decompression-bomb guard (``max_pixels``), a full decode
(so a truncated file fails here, not inside a processor), RGB with transparent areas
composited on white (`to_rgb`, also used for video frames), and an optional downscale so the
longer side fits ``max_side`` (JPEGs are decoded at reduced scale first).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, BinaryIO, Optional

from PIL import Image, UnidentifiedImageError

from llave_ds.media.files import (DEFAULT_MAX_PIXELS, IMAGE_TOO_LARGE, UNREADABLE_IMAGE, MediaError, check_image_file,
                                  resolve_under_root)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent areas composited on white (one rule for images and video frames)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def load_image(path: str, *, image_root: Optional[str] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_side: Optional[int] = None) -> Image.Image:
    """Fully decode one image file to RGB, or raise `MediaError` (``reason`` set) saying why not.

    ``image_root``: resolve ``path`` under it (refusing paths that leave it).
    """
    full = resolve_under_root(image_root, path) if image_root is not None else os.fspath(path)
    check_image_file(full)
    try:
        fh = open(full, "rb")
    except OSError as exc:
        raise MediaError(f"cannot open image file {full} ({exc})", path=full, reason=UNREADABLE_IMAGE) from None
    with fh:
        return decode_image(fh, full, max_pixels=max_pixels, max_side=max_side)


def decode_image(source: BinaryIO, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: Optional[int] = None) -> Image.Image:
    """Fully decode an open image file (a file, or the bytes of a shard member in a BytesIO) to
    RGB, or raise `MediaError` naming ``name``: what `load_image` does once the file is open."""
    full = name
    # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that. Make the
    # warning an error only when our own limit is not higher than PIL's.
    bomb_filter = "error" if max_pixels <= Image.MAX_IMAGE_PIXELS else "ignore"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(bomb_filter, Image.DecompressionBombWarning)
            img = Image.open(source)
            width, height = img.size
            if width * height > max_pixels:
                raise MediaError(f"image {full} is {width}x{height} = {width * height} pixels, above the "
                                 f"limit of {max_pixels}", path=full, reason=IMAGE_TOO_LARGE)
            if max_side is not None:
                img.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale
            img.load()  # full decode: truncated files fail here, not in the model
            rgb = to_rgb(img)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"image {full} is too large ({exc})", path=full, reason=IMAGE_TOO_LARGE) from None
    except UnidentifiedImageError:
        raise MediaError(f"not a recognised image file: {full}", path=full, reason=UNREADABLE_IMAGE) from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL decoders raise many types on corrupt data
        raise MediaError(f"image file is corrupt or truncated: {full} ({type(exc).__name__}: {exc})", path=full,
                         reason=UNREADABLE_IMAGE) from None
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return rgb


def open_image(image: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[Image.Image]:
    """A PIL image (converted to RGB) or a path (decoded with `load_image`); None stays None."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(os.fspath(image), max_pixels=max_pixels)
    raise TypeError(f"an image must be a PIL image, a path or None, got {type(image).__name__}")
