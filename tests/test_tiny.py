"""Tiny offline checkpoints: build, save, reload with plain transformers, same outputs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402
import torch  # noqa: E402

from llave_ds.toy import tiny  # noqa: E402
from llave_ds.model.embedding import EmbeddingModel  # noqa: E402
from llave_ds.model.formatter import InputFormatter  # noqa: E402
from llave_ds.model.processors import load_processor  # noqa: E402
from tests.multimodal import ALL_BACKBONES, Side, noise_image  # noqa: E402



@pytest.fixture(autouse=True)
def offline_and_one_thread(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 CI cores may be shared with another test process
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {bb: tiny.build_tiny_model_dir(root / bb, bb, seed=0) for bb in ALL_BACKBONES}


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_dir_reloads_with_plain_transformers_and_gives_identical_outputs(tiny_dirs, backbone):
    from transformers import AutoModelForImageTextToText

    path = tiny_dirs[backbone]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name

    reloaded = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    in_memory = tiny.build_tiny_model(backbone, seed=0)
    assert type(reloaded) is type(in_memory)
    n_params = sum(p.numel() for p in reloaded.parameters())
    assert 100_000 < n_params < 300_000, n_params  # Qwen3-VL, the largest: ~280K

    processor = load_processor(path)
    sides = [Side("<|image_1|>\nwhat is this", noise_image(40, 50, 1)), Side("text only row"),
             Side("another picture", noise_image(30, 30, 2))]
    batch = InputFormatter(processor, backbone, max_length=128)(sides, "query")
    with torch.no_grad():
        a = EmbeddingModel(in_memory, backbone)(**batch)
        b = EmbeddingModel(reloaded, backbone)(**batch)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_build_is_deterministic_in_seed(backbone):
    a = tiny.build_tiny_model(backbone, seed=3).state_dict()
    b = tiny.build_tiny_model(backbone, seed=3).state_dict()
    c = tiny.build_tiny_model(backbone, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tied_and_untied_heads():
    llava = tiny.build_tiny_model("llava_onevision")
    qwen = tiny.build_tiny_model("qwen2_vl")
    qwen25 = tiny.build_tiny_model("qwen2_5_vl")  # as Qwen2.5-VL-3B
    assert llava.lm_head.weight is not llava.get_input_embeddings().weight
    assert qwen.lm_head.weight is qwen.get_input_embeddings().weight
    assert qwen25.lm_head.weight is qwen25.get_input_embeddings().weight


def test_tokenizer_round_trips_through_save_and_auto_tokenizer(tiny_dirs):
    from transformers import AutoTokenizer

    built = tiny.build_tiny_tokenizer()
    loaded = AutoTokenizer.from_pretrained(tiny_dirs["qwen2_vl"])
    text = "<|im_start|>user\nhé, naïve 文字<image><|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    ids = built(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == text
    for token in tiny.SPECIAL_TOKENS:  # each special token is one id, the same after reload
        assert loaded(token, add_special_tokens=False)["input_ids"] == [tiny.special_token_id(token)]
    # one id per UTF-8 byte for plain text, no merges
    assert len(loaded("héllo", add_special_tokens=False)["input_ids"]) == len("héllo".encode())
    assert loaded.pad_token == "<|endoftext|>" and loaded.eos_token == "<|im_end|>"
    assert max(ids) < tiny.TINY_VOCAB_SIZE
    rendered = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_processor_reloads_without_video_processor(tiny_dirs, backbone):
    from transformers import AutoImageProcessor

    built = tiny.build_tiny_processor(backbone)
    loaded = load_processor(tiny_dirs[backbone])
    assert type(loaded) is type(built)
    assert loaded.get_attributes() == ["image_processor", "tokenizer"]
    assert loaded.image_processor.to_dict() == built.image_processor.to_dict()
    assert loaded.chat_template == tiny.QWEN_CHAT_TEMPLATE
    standalone = AutoImageProcessor.from_pretrained(tiny_dirs[backbone])
    assert standalone.to_dict() == built.image_processor.to_dict()


def test_unknown_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl"):
        tiny.build_tiny_model_dir(tmp_path, "qwen4_vl")


def test_qwen2_5_vl_tiny_is_the_real_architecture_with_real_windows(tiny_dirs):
    """The toy keeps what sets Qwen2.5-VL apart from Qwen2-VL: windowed and full-attention
    vision blocks, an RMSNorm/SwiGLU tower, and a window order that is not the identity for
    the images the tests use, down to the smallest (resized up to the minimum, as the blank
    dummy image is). Only very elongated images (a merged grid 1-2 tokens wide) keep it."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.vision_utils import get_vision_window_index

    model = tiny.build_tiny_model("qwen2_5_vl")
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    visual = model.model.visual
    vcfg = model.config.vision_config
    assert vcfg.out_hidden_size == model.config.text_config.hidden_size
    assert 0 < len(vcfg.fullatt_block_indexes) < vcfg.depth  # some blocks windowed, some full
    assert type(visual.blocks[0].norm1).__name__ == "Qwen2_5_VLRMSNorm"
    processor = load_processor(tiny_dirs["qwen2_5_vl"])
    assert type(processor).__name__ == "Qwen2_5_VLImageTextProcessor"
    for h, w in ((1, 1), (28, 28), (40, 50), (56, 28), (30, 30), (500, 500)):
        grid = processor.image_processor(noise_image(h, w), return_tensors="pt")["image_grid_thw"]
        window_index, cu_window = get_vision_window_index(
            grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        assert len(cu_window) > 2, (h, w, grid)  # more than one window
        assert not torch.equal(window_index, torch.arange(len(window_index))), (h, w, grid)


def test_llave_ds_tiny_writes_a_loadable_directory(tmp_path, capsys):
    """`llave-ds tiny --backbone NAME --out DIR`: the same directory the tests build (same
    weights for the same seed), refusing to overwrite unless --force."""
    import json

    from safetensors.torch import load_file

    from llave_ds.cli import main

    out = tmp_path / "q3"
    assert main(["tiny", "--backbone", "qwen3_vl", "--out", str(out), "--seed", "5"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["backbone"] == "qwen3_vl" and report["parameters"] > 0
    same = tiny.build_tiny_model_dir(tmp_path / "same", "qwen3_vl", seed=5)
    got, want = load_file(str(out / "model.safetensors")), load_file(str(same / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["tiny", "--backbone", "qwen3_vl", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["tiny", "--backbone", "llava_onevision", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava_onevision"
