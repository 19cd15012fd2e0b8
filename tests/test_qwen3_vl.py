"""Qwen3-VL specifics: DeepStack in the dummy image, in the frozen-vision cache and in the
gradient cache's second pass (the pooling, freezing, LoRA and ZeRO-3 loading tests of
test_model.py and the tiny-model tests of test_tiny.py cover Qwen3-VL with every backbone)."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers.models.qwen3_vl")

from llave_ds.model.embedding import ModelConfig, load_embedding_model  # noqa: E402
from llave_ds.model.formatter import InputFormatter  # noqa: E402
from llave_ds.toy import tiny  # noqa: E402
from tests.multimodal import Side, check_cached_second_pass, noise_image  # noqa: E402

BACKBONE = "qwen3_vl"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tiny.build_tiny_model_dir(tmp_path_factory.mktemp("qwen3") / BACKBONE, BACKBONE, seed=4))


def load(path, **overrides):
    cfg = dict(path=path, dtype="float32", attn_implementation="sdpa")
    cfg.update(overrides)
    return load_embedding_model(ModelConfig(**cfg))


def images():
    return [Side("<|image_1|>\nwhat is it", noise_image(40, 50, 11)), Side("x", noise_image(64, 32, 12)),
            Side("y", noise_image(30, 30, 13)), Side("z", noise_image(70, 90, 14))]


def test_the_tiny_model_has_deepstack_on_two_layers_and_interleaved_mrope(tiny_dir):
    model, _ = load(tiny_dir)
    config = model.base_hf_model.config
    assert list(config.vision_config.deepstack_visual_indexes) == tiny.TINY_QWEN3_DEEPSTACK
    assert len(model.base_hf_model.model.visual.deepstack_merger_list) == 2
    assert config.text_config.rope_parameters["mrope_interleaved"] is True
    assert model.zero3_fetch_units() == ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"]


def test_deepstack_features_reach_the_embedding(tiny_dir):
    """The DeepStack features are added to the first decoder layers: zeroing either DeepStack
    merger's output changes an image row's embedding, and leaves a text row's alone."""
    model, processor = load(tiny_dir, cache_frozen_vision=False)
    model.eval()
    batch = InputFormatter(processor, BACKBONE, max_length=128)([images()[0], Side("plain text")], "query")
    with torch.no_grad():
        before = model(**batch)
        for merger in model.base_hf_model.model.visual.deepstack_merger_list:
            handle = merger.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
            try:
                after = model(**batch)
            finally:
                handle.remove()
            assert (before[0] - after[0]).abs().max() > 1e-4
            torch.testing.assert_close(before[1], after[1], atol=0, rtol=0)


def test_text_only_chunk_runs_every_deepstack_merger(tiny_dir):
    """Every rank must run the same modules under ZeRO-3: a text-only chunk's dummy image goes
    through the tower and every merger (each gets a zero gradient, not none)."""
    model, processor = load(tiny_dir)
    runs = []
    visual = model.base_hf_model.model.visual
    for merger in [visual.merger, *visual.deepstack_merger_list]:
        merger.register_forward_hook(lambda *_: runs.append(1))
    model.train()
    batch = InputFormatter(processor, BACKBONE, max_length=64)([Side("only text"), Side("more text")], "query")
    assert bool(batch["dummy_image"])
    model(**batch).sum().backward()
    assert len(runs) == 3
    grads = {n: p.grad for n, p in model.named_parameters() if "merger" in n}
    assert grads and all(g is not None and not g.any() for g in grads.values()), sorted(grads)


def test_vision_cache_carries_the_deepstack_features_bitwise(tiny_dir):
    model, processor = load(tiny_dir)
    assert model.vision_cache is not None  # frozen tower (default): cache on
    batch = InputFormatter(processor, BACKBONE, max_length=256)(images(), "query")
    model.eval()
    with torch.no_grad():
        model(**batch)  # pass 1: keeps the entry
        direct = model.vision_cache._original(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    (entry,) = model.vision_cache._entries.values()
    hidden, taps = entry.features
    assert len(taps) == 2 and all(t.shape == hidden.shape for t in taps)
    replayed = model.vision_cache._replay(entry.features)
    assert torch.equal(replayed.last_hidden_state, direct.last_hidden_state)
    assert torch.equal(replayed.pooler_output, direct.pooler_output)
    assert len(replayed.deepstack_features) == len(direct.deepstack_features) == 2
    for got, want in zip(replayed.deepstack_features, direct.deepstack_features):
        assert torch.equal(got, want)
    # The taps are the tower's intermediate states, not its output: merging the last state
    # instead would give other DeepStack features.
    assert not torch.equal(model.base_hf_model.model.visual.deepstack_merger_list[0](hidden),
                           direct.deepstack_features[0])


def test_gradcache_second_pass_skips_tower_with_exact_gradients(tiny_dir):
    model, processor = load(tiny_dir)
    ref, _ = load(tiny_dir, cache_frozen_vision=False)
    fmt = InputFormatter(processor, BACKBONE, max_length=128, system_prompt="E")
    trained = check_cached_second_pass(model, ref, fmt, images())
    assert any(".deepstack_merger_list." in n for n in trained)  # trained through the cached taps


# ------------------------------------------------------------------ Qwen3-VL-Embedding

# The Qwen3-VL chat template's rendering of a message list (system and user turns whose
# content is a list of parts), as the released checkpoints ship it for images and text.
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def release_dir(tiny_dir, tmp_path_factory):
    """A tiny stand-in with the released layout: a Qwen3-VL checkpoint with the Qwen3-VL chat
    template and sentence-transformers files that pool the last token, no llave_embedding.json."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("release") / "Qwen3-VL-Embedding-tiny"
    shutil.copytree(tiny_dir, out)
    (out / "chat_template.jinja").write_text(QWEN3_VL_TEMPLATE)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"}]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 64, "pooling_mode": "lasttoken"}))
    return out


def reference_encode(model_dir, rows):
    """Qwen3-VL-Embedding's encoder (Qwen3VLEmbedder.format_model_input / process), written
    again from its source without llave-ds's formatter: the instruction as the system turn
    (default "Represent the user's input.", a "." added when it ends otherwise), the user
    turn's images then texts ("NULL" for nothing), the chat template with the generation
    prompt, right padding, the stock Qwen3VLModel, the last attended token, L2 norm."""
    import unicodedata

    import torch.nn.functional as F
    from transformers import Qwen3VLModel

    from llave_ds.model.processors import load_processor  # the stock processor minus its video part

    processor = load_processor(model_dir)

    def fetch_image(image, factor=32, min_pixels=4 * 32 * 32, max_pixels=1800 * 32 * 32):
        """qwen-vl-utils' resize, as the encoder calls it (image_patch_size=16, MIN/MAX_PIXELS)."""
        height, width = image.height, image.width
        h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if h_bar * w_bar > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
        elif h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return image.resize((w_bar, h_bar), Image.BICUBIC)

    conversations, images = [], []
    for row in rows:
        instruction = (row.get("instruction") or "").strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction += "."
        content = []
        if row.get("image") is not None:
            content.append({"type": "image"})
            images.append(fetch_image(row["image"]))
        if row.get("text"):
            content.append({"type": "text", "text": row["text"]})
        if not content:
            content.append({"type": "text", "text": "NULL"})
        conversations.append([{"role": "system", "content": [{"type": "text",
                                                              "text": instruction or "Represent the user's input."}]},
                              {"role": "user", "content": content}])
    text = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False,
                                         chat_template=QWEN3_VL_TEMPLATE)
    processor.tokenizer.padding_side = "right"
    inputs = processor(text=text, images=images or None, padding=True, do_resize=False, return_tensors="pt")
    model = Qwen3VLModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    return F.normalize(hidden[torch.arange(len(rows)), last].float(), dim=-1), inputs["input_ids"]


def test_a_released_embedding_directory_gives_the_reference_encoders_vectors(release_dir):
    """LlaveEmbedder on a Qwen3-VL-Embedding directory (no llave_embedding.json) picks its
    prompt format and image bounds and gives the vectors of the model's own encoder."""
    from llave_ds.model.embedder import LlaveEmbedder

    emb = LlaveEmbedder.from_pretrained(release_dir, device="cpu", dtype="float32")
    assert emb.formatter.prompt_format == "qwen3_vl_embedding"
    assert (emb.formatter.min_image_tokens, emb.formatter.max_image_tokens, emb.formatter.max_length) == (4, 1800, 8192)
    # 64x96 px needs no resize; 32x32 (1 token) is upscaled to the 4-token minimum, 70x90 rounded.
    a, b, c = noise_image(64, 96, 1), noise_image(32, 32, 2), noise_image(70, 90, 3)
    queries = [{"text": "what animal is this", "image": a, "instruction": "Find the answer"},
               {"text": "a red square on the left", "instruction": "Find an image of it!"},
               {"image": b, "instruction": "Find an image of it!"}]
    docs = [{"image": a}, {"text": "a photo of a cat"}, {}, {"text": "two circles", "image": c}]
    want_q, ids_q = reference_encode(release_dir, queries)
    want_d, _ = reference_encode(release_dir, docs)
    got_q = torch.cat([emb.encode(texts=[r.get("text")], images=[r.get("image")], role="query",
                                  instruction=r["instruction"], progress=False) for r in queries])
    got_d = emb.encode(texts=[r.get("text") for r in docs], images=[r.get("image") for r in docs], role="target",
                       progress=False)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_d, want_d, atol=1e-5, rtol=0)
    # The same token ids as the reference's prompt (row 0: system turn, image, then text).
    fmt = emb._formatter_for("query", "Find the answer")
    from llave_ds.media.side import Side
    ours = fmt([Side("<|image_1|>\nwhat animal is this", a)], "query")["input_ids"][0].tolist()
    theirs = ids_q[0][: len(ours)].tolist()
    assert ours == theirs


def test_qwen3_vl_embedding_prompt_token_by_token(release_dir):
    from llave_ds.media.side import Side
    from llave_ds.model.formatter import InputFormatter
    from llave_ds.model.processors import load_processor

    processor = load_processor(release_dir)
    fmt = InputFormatter(processor, BACKBONE, prompt_format="qwen3_vl_embedding", query_instruction="Find it")
    decode = lambda batch, i: processor.tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()])  # noqa: E731
    q = fmt([Side("<|image_1|>\n  what is it  ", noise_image(32, 32)), Side("plain"), Side("")], "query")
    assert decode(q, 0) == ("<|im_start|>system\nFind it.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
                            "<|vision_end|>what is it<|im_end|>\n<|im_start|>assistant\n")
    assert decode(q, 1).startswith("<|im_start|>system\nFind it.<|im_end|>\n<|im_start|>user\nplain<|im_end|>")
    assert "<|im_start|>user\nNULL<|im_end|>" in decode(q, 2)
    t = fmt([Side("doc")], "target")  # no target instruction: the default one
    assert decode(t, 0).startswith("<|im_start|>system\nRepresent the user's input.<|im_end|>")


# ------------------------------------------------ video against transformers' own processor

QWEN3_VIDEO_REFERENCE = r'''
import json, sys
import numpy as np, torch
from transformers import AutoProcessor
from transformers.video_utils import VideoMetadata
job = json.loads(sys.argv[1])
processor = AutoProcessor.from_pretrained(job["dir"])
frames = np.load(job["frames"])
meta = VideoMetadata(**job["metadata"])
text = "<|vision_start|><|video_pad|><|vision_end|>"
out = processor(text=[text], videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
torch.save({"input_ids": out["input_ids"][0], "pixel_values_videos": out["pixel_values_videos"],
            "video_grid_thw": out["video_grid_thw"]}, job["out"])
print(json.dumps({"video_processor": type(processor.video_processor).__name__}))
'''


def _plain_python_with_torchvision():
    """An interpreter that can build transformers' Qwen3VLVideoProcessor (torchvision):
    LLAVE_DS_PLAIN_PYTHON (docs/EXPORT.md), else this one if it has torchvision."""
    import importlib.util
    import os
    import sys
    if os.environ.get("LLAVE_DS_PLAIN_PYTHON"):
        return os.environ["LLAVE_DS_PLAIN_PYTHON"]
    return sys.executable if importlib.util.find_spec("torchvision") else None


def test_video_ids_and_tensors_equal_transformers_qwen3_vl_processor(tiny_dir, tmp_path):
    """The spec check for Qwen3-VL video: a real checkpoint's video_preprocessor_config.json
    (Qwen3VLVideoProcessor), an mp4 with a frame rate, frames that need a resize. Our
    tensors and grid equal transformers' processor's, and our token ids are its
    per-temporal-patch layout (``<t seconds>`` + vision block) without the outer
    ``<|vision_start|>``/``<|vision_end|>`` pair that transformers 5.2x's processor leaves
    around it (docs/VIDEO.md). Needs torchvision: another interpreter (LLAVE_DS_PLAIN_PYTHON)
    when this one has none."""
    import json
    import shutil
    import subprocess

    import numpy as np

    from llave_ds.model.processors import load_processor
    from llave_ds.toy.synthetic_video import VideoSpec, render_video, write_mp4

    python = _plain_python_with_torchvision()
    if python is None:
        pytest.skip("needs torchvision (set LLAVE_DS_PLAIN_PYTHON to an interpreter that has it)")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
        "size": {"shortest_edge": 4 * 32 * 32, "longest_edge": 24 * 32 * 32}, "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "do_sample_frames": False}))
    # 20 frames of 48x48 px at 8 fps, 6 of them sampled: resized to a multiple of 32 px
    frames = render_video(VideoSpec(2, "red", "square", "left"), size=48, num_frames=20)
    mp4 = write_mp4(frames, str(tmp_path / "clip.mp4"), fps=8)
    fmt = InputFormatter(load_processor(str(model_dir)), BACKBONE, video_frames=6)
    clip = fmt.prepare_video(mp4)
    assert clip.info.fps == 8 and len(clip.indices) == 6
    tensors, (ids,) = fmt._process_videos([clip])

    np.save(tmp_path / "frames.npy", clip.to_array())
    job = {"dir": str(model_dir), "frames": str(tmp_path / "frames.npy"), "metadata": clip.hf_metadata(),
           "out": str(tmp_path / "reference.pt")}
    proc = subprocess.run([python, "-c", QWEN3_VIDEO_REFERENCE, json.dumps(job)], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "", "OMP_NUM_THREADS": "1",
                                            "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["video_processor"] == "Qwen3VLVideoProcessor"
    ref = torch.load(tmp_path / "reference.pt")
    assert tensors["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    assert ref["video_grid_thw"][0, 1] * 16 != 48  # the frames were resized
    torch.testing.assert_close(tensors["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-6, rtol=0)
    theirs = ref["input_ids"].tolist()
    assert theirs[0] == fmt.vision_start_id and theirs[-1] == fmt.vision_end_id
    assert ids == theirs[1:-1]
    assert "seconds>" in fmt.processor.tokenizer.decode(ids)
