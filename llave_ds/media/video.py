"""Reading videos: a video file (decoded with PyAV) or a folder of frame images -> sampled RGB frames.

This module knows nothing of models, processors or training: it turns a path into a few
uniformly sampled RGB frames plus metadata, or raises `VideoError` saying which file is
wrong and how. See docs/VIDEO.md.

Sources
    * a video file (``.mp4``, ``.avi``, ``.mkv``, ``.webm``, ... anything FFmpeg reads),
      decoded with PyAV (``av``; its wheels bundle FFmpeg). The first video stream is used;
    * a folder of frame images (``.png``, ``.jpg``, ...), in natural name order
      (``f2.png`` before ``f10.png``; hidden files ignored). Its fps is unknown (None).

Frame sampling (`sample_frame_indices`)
    ``num_frames`` frames at ``i * total // num_frames`` for ``i = 0 .. num_frames - 1``:
    the first frame of each of ``num_frames`` equal segments. This is transformers'
    ``video_utils.default_sample_indices_fn`` (and the Qwen2-VL / LLaVA-OneVision video
    processors' ``arange(0, total, total / num_frames)``, computed here in exact integer
    arithmetic), so frames sampled here are the frames the backbones' own video processors
    would pick. A video with fewer frames than asked for, where transformers raises, gets
    the same formula: each frame repeated (in order) about ``num_frames / total`` times,
    e.g. 3 frames, 8 asked -> ``[0, 0, 0, 1, 1, 1, 2, 2]``; the clip length stays fixed.

Decoding
    A file is decoded sequentially from the start and decoding stops after the last
    sampled frame; only sampled frames are converted to RGB (no seeking: frame-accurate
    seeking needs exact, constant-rate timestamps, which many files lack). The container's
    frame count is trusted; when it is missing, packets are counted first (no decoding);
    when decoding ends before it, the frames actually decoded are counted and sampled again.
    A folder only opens the sampled images.

The clip rule (`sample_clip`)
    The one place that decides which frames of a video a side gets: ``num_frames`` frames by
    `sample_frame_indices`, downscaled to ``max_side``. Training reads its clips with it in
    DataLoader workers; the formatter and ``LlaveEmbedder`` call it too, and a clip already
    read with the same settings passes through untouched (no second sampling or resize).

Errors
    A missing, empty, unreadable, corrupt, stream-less or frame-less video raises
    `VideoError` (a `llave_ds.media.files.MediaError`, so a ValueError) whose message names
    the file (for a folder: the frame file) and the problem, and whose ``reason`` is one of
    `REASONS` (for counting skips); no PyAV/FFmpeg traceback is chained to it.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from llave_ds.media.files import (BAD_FRAME, DEFAULT_MAX_PIXELS, EMPTY_VIDEO_FILE, MISSING_VIDEO,  # noqa: F401
                                  NO_FRAMES, NO_VIDEO_STREAM, UNREADABLE_VIDEO, VIDEO_REASONS, VIDEO_TOO_LARGE,
                                  MediaError, check_video_source)
from llave_ds.media.image import to_rgb

PathLike = Union[str, "os.PathLike[str]"]

VIDEO_EXTENSIONS: Tuple[str, ...] = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                                     ".flv", ".3gp", ".ts")
FRAME_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Frames sampled per video when nobody says (the LLaVA-OneVision model card's count;
# processing.video_frames overrides it; docs/DECISIONS.md).
DEFAULT_VIDEO_FRAMES = 8
# VideoError.reason values (keys for skip counters; defined in llave_ds.media.files).
REASONS: Tuple[str, ...] = VIDEO_REASONS


class VideoError(MediaError):
    """A video that cannot be used; the message names the file and the problem.

    ``path``: the video file or frame folder; ``reason``: one of `REASONS`.
    """


def _fail(path: str, reason: str, problem: str) -> VideoError:
    return VideoError(f"video {path}: {problem}", path=path, reason=reason)


# --------------------------------------------------------------------------- sampling

def sample_frame_indices(num_total: int, num_frames: Optional[int]) -> List[int]:
    """Indices of ``num_frames`` uniformly sampled frames out of ``num_total`` (sorted).

    ``i * num_total // num_frames`` for ``i in range(num_frames)``: the first frame of each
    of ``num_frames`` equal segments (always frame 0), as transformers'
    ``default_sample_indices_fn``. ``num_frames > num_total`` repeats frames in order
    (3 of 8 -> ``[0, 0, 0, 1, 1, 1, 2, 2]``) instead of raising. ``num_frames=None``: all
    frames. Pure integer arithmetic: deterministic and exact.
    """
    if isinstance(num_total, bool) or not isinstance(num_total, (int, np.integer)) or num_total < 1:
        raise ValueError(f"num_total must be a positive int, got {num_total!r}")
    if num_frames is None:
        return list(range(int(num_total)))
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int or None, got {num_frames!r}")
    total, n = int(num_total), int(num_frames)
    return [i * total // n for i in range(n)]


def _plan(total: int, num_frames: Optional[int], max_frames: Optional[int]) -> List[int]:
    if num_frames is None and max_frames is not None and total > max_frames:
        num_frames = max_frames
    return sample_frame_indices(total, num_frames)


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class VideoInfo:
    """What a video is, read without decoding frames.

    ``kind``: "file" or "frames" (a folder); ``total_frames``: frames in the video (a
    container's count; for a folder, its images); ``fps``: average frame rate (None for a
    folder or when the container has none); ``width`` / ``height``: frame size as stored;
    ``duration``: seconds (None when unknown); ``frame_files``: a folder's frame paths in order.
    """
    source: str
    kind: str
    total_frames: int
    fps: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    duration: Optional[float] = None
    frame_files: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return dict(source=self.source, kind=self.kind, total_frames=self.total_frames, fps=self.fps,
                    width=self.width, height=self.height, duration=self.duration)


@dataclass(frozen=True)
class Video:
    """Sampled frames of a video: ``frames[k]`` is frame ``indices[k]`` (PIL RGB, resized to
    ``max_side`` if asked; repeated indices share one image object). ``max_side``: the cap
    the frames were downscaled to (None: as stored)."""
    frames: List[Image.Image]
    indices: List[int]
    info: VideoInfo
    max_side: Optional[int] = None

    @property
    def source(self) -> str:
        return self.info.source

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def sampled_fps(self) -> Optional[float]:
        """Frames per second of the sampled clip (transformers' ``VideoMetadata.sampled_fps``:
        sampled / total * fps); None when the fps is unknown (a frame folder, a list)."""
        if not self.info.fps or not self.info.total_frames:
            return None
        return self.num_frames / self.info.total_frames * self.info.fps

    @property
    def timestamps(self) -> Optional[List[float]]:
        """Seconds of each sampled frame (None without fps)."""
        return None if not self.info.fps else [i / self.info.fps for i in self.indices]

    def to_array(self) -> np.ndarray:
        """Frames as one uint8 array [T, H, W, 3]."""
        return np.stack([np.asarray(f, dtype=np.uint8) for f in self.frames])

    def metadata(self) -> Dict[str, Any]:
        """JSON-able metadata: the `VideoInfo` fields plus ``frame_indices``."""
        return dict(self.info.to_dict(), frame_indices=list(self.indices), num_frames=self.num_frames)

    def hf_metadata(self) -> Dict[str, Any]:
        """The fields of transformers' ``video_utils.VideoMetadata`` (``VideoMetadata(**d)``),
        for a video processor called with already sampled frames (``do_sample_frames=False``)."""
        return dict(total_num_frames=self.info.total_frames, fps=self.info.fps, width=self.info.width,
                    height=self.info.height, duration=self.info.duration,
                    video_backend="pyav" if self.info.kind == "file" else "frames",
                    frames_indices=list(self.indices))


# --------------------------------------------------------------------------- paths

def is_video_path(path: PathLike) -> bool:
    """True for a directory or a file with a `VIDEO_EXTENSIONS` extension (no decoding; GIFs
    count as images here, though `read_video` decodes them, as anything FFmpeg reads)."""
    p = os.fspath(path)
    return os.path.isdir(p) or os.path.splitext(p)[1].lower() in VIDEO_EXTENSIONS


def _natural_key(name: str):
    parts = re.split(r"(\d+)", name)
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts], name


def list_frame_files(folder: PathLike) -> List[str]:
    """A frame folder's images (`FRAME_EXTENSIONS`, case-insensitive; hidden files skipped),
    in natural name order (``2.png`` before ``10.png``; ties by plain name order)."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        raise _fail(folder, MISSING_VIDEO, "frame folder not found") from None
    except OSError as exc:
        raise _fail(folder, MISSING_VIDEO, f"cannot list the frame folder ({exc.strerror or exc})") from None
    names = [n for n in names if not n.startswith(".") and os.path.splitext(n)[1].lower() in FRAME_EXTENSIONS
             and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _check_source(path: str) -> str:
    """"file" or "frames"; a `VideoError` for a missing / non-regular / empty file."""
    try:
        return check_video_source(path)
    except VideoError:
        raise
    except MediaError as exc:
        raise VideoError(str(exc), path=exc.path, reason=exc.reason) from None


# --------------------------------------------------------------------------- public API

def probe_video(source: PathLike, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """`VideoInfo` of a video file or frame folder without decoding frames (a folder's first
    frame is opened for its size). Raises `VideoError`."""
    path = os.fspath(source)
    if _check_source(path) == "frames":
        return _probe_folder(path, max_pixels)
    return _probe_file(path, max_pixels)


def read_video(source: PathLike, num_frames: Optional[int] = None, *, max_frames: Optional[int] = None,
               max_side: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Video:
    """Sample ``num_frames`` frames uniformly (`sample_frame_indices`) from a video file or a
    folder of frame images; RGB PIL images plus metadata.

    num_frames: frames to return (repeats when the video is shorter); None: every frame,
        or ``max_frames`` uniformly sampled ones when the video has more.
    max_frames: an upper bound on the frames returned; a ``num_frames`` above it is a
        ValueError (a configuration error, not a bad video).
    max_side: downscale frames (aspect kept, BICUBIC, never upscaled) so that their longer
        side is at most this.
    max_pixels: refuse frames larger than this many pixels (`VideoError`, reason
        ``video_too_large``); None: no limit.

    Raises `VideoError` for a missing, empty, unreadable, corrupt or frame-less video.
    """
    path = os.fspath(source)
    for name, value in (("num_frames", num_frames), ("max_frames", max_frames), ("max_side", max_side),
                        ("max_pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if num_frames is not None and max_frames is not None and num_frames > max_frames:
        raise ValueError(f"num_frames={num_frames} is above max_frames={max_frames}")
    if _check_source(path) == "frames":
        video = _read_folder(path, num_frames, max_frames, max_pixels)
    else:
        video = _read_file(path, num_frames, max_frames, max_pixels)
    if max_side is not None:
        video = _downscale(video, int(max_side))
    return video


def sample_clip(video: Any, num_frames: int, max_side: Optional[int] = None, *,
                max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Video:
    """The clip a side gets: ``num_frames`` frames sampled uniformly (`sample_frame_indices`)
    and downscaled to ``max_side``. The one owner of that rule.

    ``video``: a path (read with `read_video` and that rule), a `Video` (returned as it is
    when it already has ``num_frames`` frames and that ``max_side``, i.e. it was read with
    the same rule; otherwise its frames are the clip to sample from), or a list of PIL
    frames (the whole clip, fps unknown).
    """
    if isinstance(video, (str, os.PathLike)):
        return read_video(video, num_frames, max_side=max_side, max_pixels=max_pixels)
    if isinstance(video, Video):
        if video.num_frames == num_frames and video.max_side == max_side:
            return video
        frames, info = list(video.frames), video.info
    elif isinstance(video, (list, tuple)):
        if not video or not all(isinstance(f, Image.Image) for f in video):
            raise ValueError("a video given as a list must hold one or more PIL images")
        frames = list(video)
        info = VideoInfo(source="<frames>", kind="frames", total_frames=len(frames), width=frames[0].width,
                         height=frames[0].height)
    else:
        raise TypeError(f"a video must be a path, a llave_ds.media.video.Video or a list of PIL frames, "
                        f"got {type(video).__name__}")
    picked = sample_frame_indices(len(frames), num_frames)
    # Indices stay those of the original video where the given clip carries them.
    indices = [video.indices[i] for i in picked] if isinstance(video, Video) else picked
    clip = Video(frames=[frames[i] for i in picked], indices=indices, info=info)
    return _downscale(clip, int(max_side)) if max_side is not None else clip


def downscale_frames(frames: List[Image.Image], max_side: int) -> List[Image.Image]:
    """The ``max_side`` rule: a BICUBIC thumbnail, aspect kept, never upscaled; a frame object
    repeated in the list (sampling more frames than the video has) is resized once."""
    done: Dict[int, Image.Image] = {}
    out = []
    for f in frames:
        if id(f) not in done:
            g = f
            if max(f.size) > max_side:
                g = f.copy()
                g.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            done[id(f)] = g
        out.append(done[id(f)])
    return out


def _downscale(video: Video, max_side: int) -> Video:
    return replace(video, frames=downscale_frames(video.frames, max_side), max_side=max_side)


# --------------------------------------------------------------------------- frame folders

def _open_frame(path: str, folder: str, max_pixels: Optional[int]) -> Image.Image:
    where = f"frame {path}"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise VideoError(f"video {folder}: {where} cannot be read ({exc.strerror or exc})", path=folder,
                         reason=BAD_FRAME) from None
    if st.st_size == 0:
        raise VideoError(f"video {folder}: {where} is empty (0 bytes)", path=folder, reason=BAD_FRAME)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as fh:
                img = Image.open(fh)
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise VideoError(f"video {folder}: {where} is {w}x{h} = {w * h} pixels, above the limit of "
                                     f"{max_pixels}", path=folder, reason=VIDEO_TOO_LARGE)
                img.load()
                return to_rgb(img)
    except VideoError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise VideoError(f"video {folder}: {where} is too large ({exc})", path=folder,
                         reason=VIDEO_TOO_LARGE) from None
    except UnidentifiedImageError:
        raise VideoError(f"video {folder}: {where} is not a recognised image file", path=folder,
                         reason=BAD_FRAME) from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL decoders raise many types on corrupt data
        raise VideoError(f"video {folder}: {where} is corrupt or truncated ({type(exc).__name__}: {exc})",
                         path=folder, reason=BAD_FRAME) from None


def _folder_files(folder: str) -> List[str]:
    files = list_frame_files(folder)
    if not files:
        raise _fail(folder, NO_FRAMES, "frame folder has no frame images "
                    f"({', '.join(FRAME_EXTENSIONS)})")
    return files


def _probe_folder(folder: str, max_pixels: Optional[int]) -> VideoInfo:
    files = _folder_files(folder)
    first = _open_frame(files[0], folder, max_pixels)
    return VideoInfo(source=folder, kind="frames", total_frames=len(files), width=first.width,
                     height=first.height, frame_files=tuple(files))


def _read_folder(folder: str, num_frames: Optional[int], max_frames: Optional[int],
                 max_pixels: Optional[int]) -> Video:
    files = _folder_files(folder)
    indices = _plan(len(files), num_frames, max_frames)
    opened: Dict[int, Image.Image] = {}
    for k in sorted(set(indices)):
        img = _open_frame(files[k], folder, max_pixels)
        if opened:
            first_k = min(opened)
            if img.size != opened[first_k].size:
                raise VideoError(f"video {folder}: frame {files[k]} is {img.width}x{img.height} but frame "
                                 f"{files[first_k]} is {opened[first_k].width}x{opened[first_k].height}; "
                                 "all frames of a video must have one size", path=folder, reason=BAD_FRAME)
        opened[k] = img
    first = opened[indices[0]]
    info = VideoInfo(source=folder, kind="frames", total_frames=len(files), width=first.width, height=first.height,
                     frame_files=tuple(files))
    return Video(frames=[opened[k] for k in indices], indices=indices, info=info)


# --------------------------------------------------------------------------- video files (PyAV)

def _import_av(path: str):
    try:
        import av
    except ImportError:
        raise VideoError(f"video {path}: cannot decode video files without PyAV; install it with `pip install av`",
                         path=path, reason=UNREADABLE_VIDEO) from None
    return av


def _av_problem(exc: BaseException) -> str:
    """An FFmpeg error's own words, without the path PyAV appends (we name the file ourselves)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)


def _open_container(av, path: str):
    try:
        return av.open(path, mode="r", metadata_errors="replace")
    except MemoryError:
        raise
    except Exception as exc:  # av.error.FFmpegError subclasses, OSError, ...
        raise _fail(path, UNREADABLE_VIDEO, f"cannot be opened as a video ({_av_problem(exc)})") from None


def _video_stream(container, path: str):
    streams = container.streams.video
    if len(streams) == 0:
        raise _fail(path, NO_VIDEO_STREAM, "has no video stream")
    return streams[0]


def _as_float(rate) -> Optional[float]:
    if rate is None:
        return None
    try:
        value = float(Fraction(rate))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _probe_open(container, stream, path: str, max_pixels: Optional[int]) -> VideoInfo:
    width = int(stream.codec_context.width or 0) or None
    height = int(stream.codec_context.height or 0) or None
    if max_pixels is not None and width and height and width * height > max_pixels:
        raise _fail(path, VIDEO_TOO_LARGE, f"frames are {width}x{height} = {width * height} pixels, above the "
                    f"limit of {max_pixels}")
    fps = _as_float(stream.average_rate) or _as_float(getattr(stream, "guessed_rate", None))
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    total = int(stream.frames or 0)
    if total <= 0:  # not in the header (some mkv / webm / avi): count packets, no decoding
        try:
            total = sum(1 for packet in container.demux(stream) if packet.size)
        except MemoryError:
            raise
        except Exception as exc:
            raise _fail(path, UNREADABLE_VIDEO, f"is corrupt: reading its packets failed "
                        f"({_av_problem(exc)})") from None
    if total <= 0:
        raise _fail(path, NO_FRAMES, "has no frames")
    if duration is None and fps:
        duration = total / fps
    return VideoInfo(source=path, kind="file", total_frames=total, fps=fps, width=width, height=height,
                     duration=duration)


def _probe_file(path: str, max_pixels: Optional[int]) -> VideoInfo:
    av = _import_av(path)
    with _open_container(av, path) as container:
        return _probe_open(container, _video_stream(container, path), path, max_pixels)


def _decode_indices(av, path: str, indices: Sequence[int], max_pixels: Optional[int]
                    ) -> Tuple[Dict[int, Image.Image], int]:
    """Decode from the start until the last wanted index; (wanted frames by index, frames decoded)."""
    wanted = set(indices)
    last = max(wanted)
    got: Dict[int, Image.Image] = {}
    decoded = 0
    with _open_container(av, path) as container:
        stream = _video_stream(container, path)
        try:
            for frame in container.decode(stream):
                k = decoded
                decoded += 1
                if k in wanted:
                    if max_pixels is not None and frame.width * frame.height > max_pixels:
                        raise _fail(path, VIDEO_TOO_LARGE, f"frame {k} is {frame.width}x{frame.height}, above "
                                    f"the limit of {max_pixels} pixels")
                    got[k] = Image.fromarray(frame.to_ndarray(format="rgb24"), mode="RGB")
                if k >= last:
                    break
        except VideoError:
            raise
        except MemoryError:
            raise
        except Exception as exc:
            raise _fail(path, UNREADABLE_VIDEO, f"is corrupt: decoding failed after {decoded} frame(s) "
                        f"({_av_problem(exc)})") from None
    return got, decoded


def _read_file(path: str, num_frames: Optional[int], max_frames: Optional[int],
               max_pixels: Optional[int]) -> Video:
    av = _import_av(path)
    with _open_container(av, path) as container:
        info = _probe_open(container, _video_stream(container, path), path, max_pixels)
    indices = _plan(info.total_frames, num_frames, max_frames)
    got, decoded = _decode_indices(av, path, indices, max_pixels)
    if len(got) < len(set(indices)):
        # The header promised more frames than the stream holds: sample the real ones.
        if decoded == 0:
            raise _fail(path, NO_FRAMES, f"no frame could be decoded (the container reports "
                        f"{info.total_frames})")
        info = replace(info, total_frames=decoded, duration=decoded / info.fps if info.fps else info.duration)
        indices = _plan(decoded, num_frames, max_frames)
        got, _ = _decode_indices(av, path, indices, max_pixels)
        if len(got) < len(set(indices)):
            raise _fail(path, UNREADABLE_VIDEO, "decodes to a different number of frames on every read")
    sizes = {img.size for img in got.values()}
    if len(sizes) > 1:
        raise _fail(path, BAD_FRAME, f"frame size changes within the video ({sorted(sizes)})")
    first = got[indices[0]]
    if info.width != first.width or info.height != first.height:
        info = replace(info, width=first.width, height=first.height)
    return Video(frames=[got[k] for k in indices], indices=indices, info=info)
