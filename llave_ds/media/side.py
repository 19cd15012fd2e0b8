"""`Side`: one input of the formatter, the one type every reader hands to it.

A side is text, an image, a video, or text with one of them (never both). Training rows
(`llave_ds.data`), evaluation rows (`llave_ds.eval`), ``LlaveEmbedder.encode`` and the warm
start all build this type; the formatter (`llave_ds.model.formatter.InputFormatter`) reads
``.text``, ``.image`` and ``.video`` (and accepts any object that has them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Side:
    """One side of a pair, a query, a candidate or a row to embed.

    text: may hold ``<|image_1|>`` / ``<|video_1|>`` where the image / video goes.
    image: a decoded PIL image; ``LlaveEmbedder`` also takes a path here and decodes it.
    video: a `llave_ds.media.video.Video`, a list of PIL frames, or a path to a video file or
        a folder of frames (decoded by the formatter).
    image_path / video_path: the path as written in the data (relative to its image root),
        kept for counting and messages; None means none.
    where: names the row in error messages (``"file x, row 3: "``).
    error: why the media could not be loaded (set in a DataLoader worker, raised by the main
        process with the row's name instead of a worker traceback).
    """
    text: str = ""
    image: Any = None
    video: Any = None
    image_path: Optional[str] = None
    video_path: Optional[str] = None
    where: str = ""
    error: Optional[str] = None

    @property
    def has_image(self) -> bool:
        return self.image is not None or bool(self.image_path)

    @property
    def has_video(self) -> bool:
        return self.video is not None or bool(self.video_path)
