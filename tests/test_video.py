"""llave_ds.media.video: uniform frame sampling, decoding mp4 files and frame folders, clear errors."""
from __future__ import annotations

import os
import pickle

import av
import numpy as np
import pytest
from PIL import Image

from llave_ds.media import video as vid
from llave_ds.media.video import VideoError, list_frame_files, probe_video, read_video, sample_frame_indices

NUM = 16      # frames in the test videos
FPS = 8


def level(i: int) -> int:
    """Grey level that encodes frame i (survives H.264 at crf 10 within +-3)."""
    return 10 + 15 * i


def frame_id(img) -> int:
    return int(round((np.asarray(img, dtype=np.float64).mean() - 10) / 15))


def write_video(path, num=NUM, width=32, height=32, fmt="mp4", options=None):
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"crf": "10"}
        for i in range(num):
            a = np.full((height, width, 3), level(i), np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4")


def check_error(exc_info, path, reason):
    err = exc_info.value
    assert isinstance(err, ValueError)
    assert str(path) in str(err)
    assert err.reason == reason and err.path == str(path)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no FFmpeg traceback
    return str(err)


# --------------------------------------------------------------------------- sampling

def test_sampling_known_values():
    assert sample_frame_indices(16, 4) == [0, 4, 8, 12]
    assert sample_frame_indices(10, 3) == [0, 3, 6]
    assert sample_frame_indices(7, 7) == list(range(7))
    assert sample_frame_indices(1, 3) == [0, 0, 0]
    assert sample_frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]     # shorter video: frames repeat in order
    assert sample_frame_indices(5, None) == [0, 1, 2, 3, 4]


def test_sampling_matches_transformers():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn
    for total in range(1, 41):
        for n in range(1, total + 1):
            ref = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=n)
            assert sample_frame_indices(total, n) == ref.tolist(), (total, n)


def test_sampling_properties_when_repeating():
    for total in range(1, 12):
        for n in range(total, 30):
            idx = sample_frame_indices(total, n)
            assert len(idx) == n and idx == sorted(idx) and set(idx) == set(range(total))
            counts = np.bincount(idx)
            assert counts.max() - counts.min() <= 1     # as even as possible


@pytest.mark.parametrize("total,n", [(0, 4), (-1, 4), (4, 0), (4, -2), (4.0, 2), (4, 2.5), (True, 2)])
def test_sampling_rejects_bad_arguments(total, n):
    with pytest.raises(ValueError):
        sample_frame_indices(total, n)


# --------------------------------------------------------------------------- mp4 files

def test_read_mp4_samples_the_right_frames(mp4):
    v = read_video(mp4, 4)
    assert v.indices == [0, 4, 8, 12]
    assert [frame_id(f) for f in v.frames] == [0, 4, 8, 12]
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in v.frames)
    assert v.info.kind == "file" and v.info.total_frames == NUM and v.info.fps == FPS
    assert (v.info.width, v.info.height) == (32, 32) and v.info.duration == pytest.approx(NUM / FPS)
    arr = v.to_array()
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8
    assert v.timestamps == [0.0, 0.5, 1.0, 1.5]
    meta = v.metadata()
    assert meta["frame_indices"] == [0, 4, 8, 12] and meta["source"] == mp4 and meta["total_frames"] == NUM
    hf = v.hf_metadata()
    from transformers.video_utils import VideoMetadata
    assert VideoMetadata(**hf).frames_indices == [0, 4, 8, 12]


def test_read_mp4_all_frames_repeat_and_max_frames(mp4):
    assert [frame_id(f) for f in read_video(mp4).frames] == list(range(NUM))
    v = read_video(mp4, 20)            # more than the video has: frames repeat
    assert v.indices == sample_frame_indices(NUM, 20)
    assert [frame_id(f) for f in v.frames] == v.indices
    capped = read_video(mp4, max_frames=5)
    assert capped.indices == [0, 3, 6, 9, 12]
    with pytest.raises(ValueError, match="above max_frames"):
        read_video(mp4, 8, max_frames=4)
    with pytest.raises(ValueError, match="num_frames"):
        read_video(mp4, 0)


def test_max_side_downscales_keeping_aspect(tmp_path):
    path = write_video(tmp_path / "wide.mp4", num=4, width=64, height=48)
    v = read_video(path, 2, max_side=32)
    assert [f.size for f in v.frames] == [(32, 24), (32, 24)]
    assert v.info.width == 64 and v.info.height == 48          # metadata: the stored size
    assert read_video(path, 2, max_side=100).frames[0].size == (64, 48)   # never upscaled
    with pytest.raises(VideoError, match="above the limit") as e:
        read_video(path, 2, max_pixels=1000)
    assert e.value.reason == vid.VIDEO_TOO_LARGE


def test_container_without_frame_count_is_counted(tmp_path):
    path = write_video(tmp_path / "clip.mkv", fmt="matroska")
    with av.open(path) as c:
        assert c.streams.video[0].frames == 0                   # matroska has no count in the header
    assert probe_video(path).total_frames == NUM
    assert [frame_id(f) for f in read_video(path, 4).frames] == [0, 4, 8, 12]


def test_header_promising_more_frames_is_resampled(mp4, monkeypatch):
    real = vid._probe_open

    def lying(container, stream, path, max_pixels):
        info = real(container, stream, path, max_pixels)
        return vid.VideoInfo(**dict(info.to_dict(), total_frames=NUM + 8))

    monkeypatch.setattr(vid, "_probe_open", lying)
    v = read_video(mp4, 8)
    assert v.info.total_frames == NUM
    assert v.indices == sample_frame_indices(NUM, 8)
    assert [frame_id(f) for f in v.frames] == v.indices


def test_probe_reads_metadata_without_frames(mp4):
    info = probe_video(mp4)
    assert (info.kind, info.total_frames, info.fps, info.width, info.height) == ("file", NUM, FPS, 32, 32)


# --------------------------------------------------------------------------- frame folders

def make_folder(root, num=12, size=(24, 16)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        Image.new("RGB", size, (level(i),) * 3).save(root / f"f{i + 1}.png")   # f1 .. f12: not lexicographic
    (root / ".hidden.png").write_bytes(b"junk")
    (root / "notes.txt").write_text("not a frame")
    return str(root)


def test_read_frame_folder_in_natural_order(tmp_path):
    folder = make_folder(tmp_path / "frames")
    names = [os.path.basename(p) for p in list_frame_files(folder)]
    assert names == [f"f{i}.png" for i in range(1, 13)]
    v = read_video(folder, 4)
    assert v.indices == [0, 3, 6, 9]
    assert [frame_id(f) for f in v.frames] == [0, 3, 6, 9]
    assert v.info.kind == "frames" and v.info.total_frames == 12 and v.info.fps is None
    assert (v.info.width, v.info.height) == (24, 16) and v.timestamps is None
    assert read_video(folder, 3, max_side=12).frames[0].size == (12, 8)
    assert probe_video(folder).total_frames == 12


def test_folder_opens_only_the_sampled_frames(tmp_path):
    folder = make_folder(tmp_path / "frames")
    (tmp_path / "frames" / "f2.png").write_bytes(b"not a png")   # index 1: not sampled by 4 of 12
    assert [frame_id(f) for f in read_video(folder, 4).frames] == [0, 3, 6, 9]
    with pytest.raises(VideoError) as e:
        read_video(folder)                                      # all frames: f2 is read
    msg = check_error(e, folder, vid.BAD_FRAME)
    assert "f2.png" in msg and "not a recognised image" in msg


# --------------------------------------------------------------------------- errors

def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoError) as e:
        read_video(missing, 4)
    assert "video not found" in check_error(e, missing, vid.MISSING_VIDEO)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError) as e:
        read_video(empty, 4)
    assert "empty" in check_error(e, empty, vid.EMPTY_VIDEO_FILE)


def test_garbage_and_truncated_files(tmp_path, mp4):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"definitely not a video " * 40)
    with pytest.raises(VideoError) as e:
        read_video(garbage, 4)
    assert "cannot be opened as a video" in check_error(e, garbage, vid.UNREADABLE_VIDEO)
    data = open(mp4, "rb").read()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError) as e:
        probe_video(truncated)
    check_error(e, truncated, vid.UNREADABLE_VIDEO)


def test_corrupt_stream_fails_while_decoding(tmp_path, mp4):
    data = bytearray(open(mp4, "rb").read())
    start = data.index(b"mdat") + 4
    size = int.from_bytes(data[start - 8:start - 4], "big") - 8
    data[start:start + size] = bytes(size)                     # header intact, every packet zeroed
    bad = tmp_path / "zeroed.mp4"
    bad.write_bytes(bytes(data))
    assert probe_video(bad).total_frames == NUM                # the container still looks fine
    with pytest.raises(VideoError) as e:
        read_video(bad, 4)
    assert "decoding failed" in check_error(e, bad, vid.UNREADABLE_VIDEO)


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)
    with pytest.raises(VideoError) as e:
        read_video(path, 4)
    assert "no video stream" in check_error(e, path, vid.NO_VIDEO_STREAM)


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(VideoError) as e:
        read_video(empty, 4)
    assert "no frame images" in check_error(e, empty, vid.NO_FRAMES)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (8, 6)).save(mixed / "b.png")
    with pytest.raises(VideoError) as e:
        read_video(mixed)
    assert "b.png" in check_error(e, mixed, vid.BAD_FRAME)
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "0.png").write_bytes(b"")
    with pytest.raises(VideoError) as e:
        read_video(zero)
    assert "0.png" in check_error(e, zero, vid.BAD_FRAME)


def test_video_error_survives_pickling():
    err = VideoError("video x.mp4: broken", path="x.mp4", reason=vid.UNREADABLE_VIDEO)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.path, back.reason) == (str(err), "x.mp4", vid.UNREADABLE_VIDEO)


def test_is_video_path(tmp_path):
    assert vid.is_video_path("a/b.MP4") and vid.is_video_path(str(tmp_path))
    assert not vid.is_video_path("a/b.png")
