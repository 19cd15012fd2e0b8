"""Video as an input side (issue #16): formatter tensors and token counts against the
backbones' own processing, the model forward with videos (mixed batches, frame order, the
dummy-video rule, the frozen-vision cache), ``LlaveEmbedder.encode(videos=...)`` and
``llave-ds encode`` rows with video paths. Tiny offline models of all three backbones."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from PIL import Image

from llave_ds.toy.synthetic_video import VideoSpec, render_video, write_frame_folder, write_mp4
from tests.multimodal import ALL_BACKBONES, noise_image

SPEC = VideoSpec(2, "red", "square", "left")


@dataclass
class Side:
    text: str = ""
    image: Optional[Image.Image] = None
    video: Any = None


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from llave_ds.toy.tiny import build_tiny_model_dir
    root = tmp_path_factory.mktemp("video_models")
    return {bb: build_tiny_model_dir(root / bb, bb, seed=1) for bb in ALL_BACKBONES}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    frames = render_video(SPEC, size=32, num_frames=8)
    return {"frames": frames, "mp4": write_mp4(frames, str(root / "clip.mp4")),
            "folder": write_frame_folder(frames, str(root / "clip_frames")),
            "reversed_folder": write_frame_folder(frames[::-1], str(root / "clip_reversed")),
            "root": root}


def load(model_dir, **overrides):
    from llave_ds.model.embedding import ModelConfig, load_embedding_model
    from llave_ds.model.formatter import InputFormatter
    model, processor = load_embedding_model(ModelConfig(path=str(model_dir), dtype="float32",
                                                        attn_implementation="sdpa", **overrides))
    return model, processor, InputFormatter(processor, model.backbone, max_length=160, system_prompt="E")


# ---------------------------------------------------------------- tensors and token counts

def _reference_size(backbone):
    # frame sizes the backbone's processors keep as they are (no resize): exact comparisons
    return {"llava_onevision": (28, 28), "qwen2_vl": (56, 28), "qwen2_5_vl": (112, 84), "qwen3_vl": (64, 32)}[backbone]


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_video_tensors_match_the_image_processor_frame_by_frame(model_dirs, backbone):
    """Where no resize happens, the video processor's steps equal the image processor's on
    each frame: Qwen's image processor repeats a single image to one temporal patch, so a
    2-frame video of that image must give the very same patches and grid; LLaVA-OV's frames
    are its image processor's base view."""
    from llave_ds.model.processors import load_processor
    from llave_ds.model.video_processing import VideoSettings, video_pixel_values
    processor = load_processor(model_dirs[backbone])
    settings = VideoSettings.from_processor(processor, backbone)
    w, h = _reference_size(backbone)
    frame = noise_image(h, w, seed=4)
    if backbone == "llava_onevision":
        frames = [frame, noise_image(h, w, seed=5)]
        out = video_pixel_values(frames, settings)
        assert out["pixel_values_videos"].shape == (1, 2, 3, 28, 28)
        for t, f in enumerate(frames):
            ref = processor.image_processor([f], return_tensors="pt")["pixel_values"][0, 0]
            torch.testing.assert_close(out["pixel_values_videos"][0, t], ref, atol=1e-5, rtol=0)
    else:
        out = video_pixel_values([frame, frame], settings)
        ref = processor.image_processor([frame], return_tensors="pt")
        assert out["video_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
        torch.testing.assert_close(out["pixel_values_videos"], ref["pixel_values"], atol=1e-5, rtol=0)
        # an odd frame count is padded by repeating the last frame (patchify)
        odd = video_pixel_values([frame, frame, frame], settings)
        spatial = ref["image_grid_thw"][0, 1:].tolist()
        if backbone == "qwen3_vl":  # its size bounds count every frame: 3 frames of 32x64 shrink
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
            th, tw = smart_resize(3, h, w, temporal_factor=2, factor=32, min_pixels=settings.min_pixels,
                                  max_pixels=settings.max_pixels)
            spatial = [th // 16, tw // 16]
        assert odd["video_grid_thw"].tolist() == [[2] + spatial]


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_resized_frames_match_pil_bicubic_closely(model_dirs, backbone):
    """With a resize (32 px synthetic frames), torch's antialiased bicubic (what the video
    processors use) and PIL's (the image processors') differ by rounding only."""
    from llave_ds.model.processors import load_processor
    from llave_ds.model.video_processing import VideoSettings, video_pixel_values
    processor = load_processor(model_dirs[backbone])
    settings = VideoSettings.from_processor(processor, backbone)
    frame = render_video(SPEC, size=32, num_frames=2)[0]
    out = video_pixel_values([frame, frame], settings)["pixel_values_videos"]
    ref = processor.image_processor([frame], return_tensors="pt")["pixel_values"]
    if backbone == "llava_onevision":
        out, ref = out[0, 0], ref[0, 0]
    assert out.shape == ref.shape
    # one uint8 level is 1/255/std ~ 0.015 after normalisation
    assert (out - ref).abs().max() < 0.1
    assert (out - ref).abs().mean() < 0.01


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_video_token_counts_and_shapes(model_dirs, clips, backbone):
    model, processor, fmt = load(model_dirs[backbone])
    batch = fmt([Side("clip: <|video_1|> end", video=clips["frames"]), Side("plain text")], "query")
    n_video_tokens = int((batch["input_ids"] == fmt.video_token_id).sum())
    if backbone == "llava_onevision":
        assert batch["pixel_values_videos"].shape == (1, 8, 3, 28, 28)
        expected = processor._get_num_multimodal_tokens(video_sizes=[[8, 28, 28]])["num_video_tokens"][0]
    else:
        t, h, w = batch["video_grid_thw"][0].tolist()
        assert t == 4  # 8 frames / temporal patch 2
        patch = processor.image_processor.patch_size  # 14; Qwen3-VL 16
        assert batch["pixel_values_videos"].shape == (t * h * w, 3 * 2 * patch * patch)
        expected = t * h * w // 4
        row = batch["input_ids"][0].tolist()
        if backbone == "qwen3_vl":
            # Per temporal patch: "<t seconds>" (the mean time of its two frames; a frame list has
            # no fps: 24, as transformers), then its tokens between vision start / end.
            block = [fmt.vision_start_id] + [fmt.video_token_id] * (h * w // 4) + [fmt.vision_end_id]
            layout = []
            for k in range(t):
                seconds = (2 * k + 2 * k + 1) / 2 / 24
                layout += processor.tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"] + block
            prefix = processor.tokenizer("clip: ", add_special_tokens=False)["input_ids"]
            start = next(i for i in range(len(row)) if row[i:i + len(prefix)] == prefix) + len(prefix)
            assert row[start:start + len(layout)] == layout
        else:
            # the video sits where the placeholder was, between vision start / end
            start = row.index(fmt.vision_start_id)
            assert row[start + 1:start + 1 + expected] == [fmt.video_token_id] * expected
            assert row[start + 1 + expected] == fmt.vision_end_id
    if backbone == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].tolist() == [pytest.approx(2 / 24)]  # fps unknown: 24
    assert n_video_tokens == expected
    assert bool(batch["dummy_video"]) is False and bool(batch["dummy_image"]) is True
    with torch.no_grad():  # the model checks tokens against features
        assert model(**batch).shape == (2, model.hidden_size)


def test_placeholders_in_both_prompt_formats(model_dirs, clips):
    from llave_ds.model.formatter import InputFormatter
    from llave_ds.model.processors import load_processor
    processor = load_processor(model_dirs["qwen2_vl"])
    for prompt_format in ("qwen_chat", "llave"):
        fmt = InputFormatter(processor, "qwen2_vl", max_length=200, system_prompt="E", prompt_format=prompt_format)
        ids = fmt([Side("Find <|video_1|> now <|image_1|>", video=clips["frames"])], "query")["input_ids"][0]
        text = fmt.tokenizer.decode(ids)
        assert "<|image_1|>" not in text and "<|video_1|>" not in text
        assert "<|image_pad|>" not in text and "<|video_pad|>" in text
        if prompt_format == "llave":  # one placeholder not at the start: the video moves first
            assert "user\n<|vision_start|>" in text and "<|vision_end|>\nFind  now" in text
        else:
            assert "Find <|vision_start|>" in text
    with pytest.raises(ValueError, match="both an image and a video"):
        fmt([Side("x", image=noise_image(28, 28), video=clips["frames"])], "query")


# ---------------------------------------------------------------- model: dummy rule, cache

def _tower_calls(model):
    inner = model.base_hf_model.model
    target = inner.vision_tower.embeddings if model.backbone == "llava_onevision" else inner.visual.patch_embed
    calls = []
    target.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    return calls


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_video_slot_runs_the_same_tower_calls_in_every_chunk(model_dirs, clips, backbone):
    from llave_ds.model.formatter import InputFormatter
    model, processor, _ = load(model_dirs[backbone])
    plain = InputFormatter(processor, backbone, max_length=160, system_prompt="E")
    slot = InputFormatter(processor, backbone, max_length=160, system_prompt="E", video_slot=True)
    chunks = {"text": [Side("only text")], "image": [Side("pic", image=noise_image(28, 28))],
              "video": [Side("clip", video=clips["frames"])]}
    calls = _tower_calls(model)
    for name, sides in chunks.items():
        batch = slot(sides, "query")
        assert "pixel_values_videos" in batch and bool(batch["dummy_video"]) == (name != "video")
        assert "pixel_values" in batch and bool(batch["dummy_image"]) == (name != "image")
        calls.clear()
        with torch.no_grad():
            emb = model(**batch)
            slot_calls = list(calls)
            ref = model(**plain(sides, "query"))
        # slot: two tower calls in every chunk, images (real or dummy) first, then videos;
        # the video call runs all frames of the chunk's videos (or the dummy's) at once
        assert len(slot_calls) == 2, (name, slot_calls)
        torch.testing.assert_close(emb, ref, atol=1e-6, rtol=0)  # dummies change nothing
    # without the slot a chunk without videos carries no video tensors
    assert "pixel_values_videos" not in plain(chunks["text"], "query")


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_frozen_vision_cache_replays_each_tower_call_exactly(model_dirs, clips, backbone):
    """Two tower calls per chunk (images, videos): the second (autograd) pass replays each
    from its own pixel tensor, and the gradients equal those of running the tower again."""
    from llave_ds.model.formatter import InputFormatter
    torch.manual_seed(0)
    model, processor, _ = load(model_dirs[backbone])
    ref, _, _ = load(model_dirs[backbone], cache_frozen_vision=False)
    assert model.vision_cache is not None and ref.vision_cache is None
    ref.load_state_dict(model.state_dict())
    fmt = InputFormatter(processor, backbone, max_length=160, system_prompt="E", video_slot=True)
    chunks = [fmt([Side("pic", image=noise_image(28, 28, seed=2)), Side("clip", video=clips["frames"])], "query"),
              fmt([Side("text"), Side("clip2", video=clips["frames"][::-1])], "query")]
    weight = torch.randn(2, model.hidden_size)
    grads = {}
    for m in (model, ref):
        m.train()
        with torch.no_grad():  # the gradient cache's first pass
            for c in chunks:
                m(**c)
        loss = sum((m(**c) * weight).sum() for c in chunks)
        loss.backward()
        grads[m is model] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert model.vision_cache.hits == 4  # 2 chunks x (image call + video call)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- embedder and CLI

@pytest.fixture(scope="module")
def embedders(model_dirs):
    from llave_ds.model.embedder import LlaveEmbedder
    return {bb: LlaveEmbedder.from_pretrained(model_dirs[bb], device="cpu") for bb in ALL_BACKBONES}


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_encode_videos_mixed_batch_equals_rows_alone(embedders, clips, backbone):
    emb = embedders[backbone]
    assert emb.formatter.video_frames == 8
    texts = ["just text", "an image", "<|video_1|> the mp4", "the frame folder", "reversed frames", ""]
    images = [None, noise_image(28, 28, seed=7), None, None, None, None]
    videos = [None, None, clips["mp4"], clips["folder"], clips["frames"][::-1], clips["reversed_folder"]]
    batch = emb.encode(texts=texts, images=images, videos=videos, batch_size=6, progress=False)
    alone = torch.cat([emb.encode(texts=[t], images=[i], videos=[v], progress=False)
                       for t, i, v in zip(texts, images, videos)])
    assert batch.shape == (6, emb.dim)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    # the model sees frame order: a clip and its time-reversed copy embed differently,
    # and a frame list reversed in memory equals the reversed frame folder
    forward, backward = emb.encode(videos=[clips["folder"], clips["reversed_folder"]], progress=False)
    assert (forward - backward).abs().max() > 1e-4
    torch.testing.assert_close(batch[5], emb.encode(videos=[clips["frames"][::-1]], progress=False)[0],
                               atol=1e-5, rtol=0)


def test_bad_video_is_an_encode_error_naming_the_file(embedders, clips):
    from llave_ds.model.embedder import EncodeError
    bad = clips["root"] / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    emb = embedders["qwen2_vl"]
    with pytest.raises(EncodeError, match=r"row 1: .*broken\.mp4"):
        emb.encode(texts=["ok", "bad"], videos=[clips["mp4"], str(bad)], progress=False)
    with pytest.raises(EncodeError, match="both an image and a video"):
        emb.encode(images=[noise_image(28, 28)], videos=[clips["mp4"]], progress=False)


def _run_cli(argv):
    from llave_ds.model import embedder
    parser = argparse.ArgumentParser()
    embedder.add_arguments(parser)
    return embedder.run(parser.parse_args(argv))


def test_cli_encodes_video_rows_and_names_bad_ones(model_dirs, embedders, clips, tmp_path, capsys):
    from safetensors.torch import load_file
    root = clips["root"]
    rows = [{"qry": "<|video_1|> a clip", "qry_video_path": "clip.mp4"},
            {"qry": "frames", "qry_video_path": "clip_frames"},
            {"qry": "text only"}]
    inp = root / "rows.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "emb.safetensors"
    assert _run_cli(["--model", str(model_dirs["llava_onevision"]), "--input", str(inp), "--out", str(out),
                     "--no-progress"]) == 0
    got = load_file(str(out))["embeddings"]
    emb = embedders["llava_onevision"]
    want = emb.encode(texts=[r["qry"] for r in rows], videos=[clips["mp4"], clips["folder"], None], progress=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    (root / "empty.mp4").write_bytes(b"")
    bad = root / "bad_rows.jsonl"
    bad.write_text(json.dumps({"text": "x", "video_path": "empty.mp4"}) + "\n")
    assert _run_cli(["--model", str(model_dirs["llava_onevision"]), "--input", str(bad),
                     "--out", str(tmp_path / "b.npy"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "row 0 (line 1), field 'video_path'" in err and "empty.mp4" in err
    missing = root / "missing_rows.jsonl"
    missing.write_text(json.dumps({"qry": "x", "qry_video_path": "nope.mp4"}) + "\n")
    assert _run_cli(["--model", str(model_dirs["llava_onevision"]), "--input", str(missing),
                     "--out", str(tmp_path / "c.npy"), "--no-progress"]) == 2
    assert "video file or frame folder not found" in capsys.readouterr().err


def test_metadata_records_video_frames(model_dirs, tmp_path):
    import shutil

    from llave_ds.model.embedder import EMBEDDING_METADATA, LlaveEmbedder
    from llave_ds.model.formatter import ProcessingConfig
    model, _, fmt = load(model_dirs["qwen2_vl"])
    meta = model.embedding_metadata(fmt)  # what `llave-ds export` writes (export.embedding_metadata)
    assert meta["input_format"]["video_frames"] == 8 and meta["input_format"]["video_max_side"] is None
    assert meta["input_format"]["video_placeholder"] == "<|video_1|>"
    meta["input_format"].update(video_frames=4, video_max_side=24)
    assert ProcessingConfig.from_metadata(meta["input_format"], "x").video_frames == 4
    copy = tmp_path / "export"
    shutil.copytree(model_dirs["qwen2_vl"], copy)
    (copy / EMBEDDING_METADATA).write_text(json.dumps(meta))
    emb = LlaveEmbedder.from_pretrained(copy, device="cpu")
    assert (emb.formatter.video_frames, emb.formatter.video_max_side) == (4, 24)
    with pytest.raises(ValueError, match="video_frames"):
        ProcessingConfig(video_frames=0).validate()


def test_the_export_keeps_the_base_models_video_processor_settings(model_dirs, tmp_path):
    """A checkpoint's video_preprocessor_config.json (how its own video processor resizes,
    normalises, samples) survives the export, so AutoProcessor on the export builds the same
    video processor and llave-ds reads the same VideoSettings back."""
    import shutil

    from llave_ds.export.model_dir import embedding_metadata, model_card, write_model_dir
    from llave_ds.model.processors import load_processor
    from llave_ds.model.video_processing import VideoSettings

    base = tmp_path / "base"
    shutil.copytree(model_dirs["qwen3_vl"], base)
    video_config = {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "temporal_patch_size": 2,
                    "merge_size": 2, "size": {"shortest_edge": 2048, "longest_edge": 8192}, "fps": 2,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (base / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    model, processor, fmt = load(base)
    meta = embedding_metadata(model, fmt, export_dtype="float32", model_class=type(model.base_hf_model).__name__)
    out = write_model_dir(model.base_hf_model, None, processor, tmp_path / "export", meta, model_card(None, meta))
    assert json.loads((out / "video_preprocessor_config.json").read_text()) == video_config
    settings = VideoSettings.from_processor(load_processor(out), "qwen3_vl")
    assert settings == VideoSettings.from_processor(processor, "qwen3_vl")
    assert (settings.min_pixels, settings.max_pixels) == (2048, 8192)
