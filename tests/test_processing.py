"""InputFormatter: prompt layout, image tokens, dummy image, truncation, instructions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llave_ds import tiny  # noqa: E402
from llave_ds.processing import InputFormatter, load_processor  # noqa: E402
from tests.multimodal import BACKBONES, Side, noise_image  # noqa: E402

IMAGE_TOKEN = {"llava_onevision": "<image>", "qwen2_vl": "<|image_pad|>"}


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_proc")
    return {bb: load_processor(tiny.build_tiny_model_dir(root / bb, bb)) for bb in BACKBONES}


def ids_of(token):
    return tiny.special_token_id(token)


def row_ids(batch, i):
    return batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()


def image_runs(ids, token_id):
    """Lengths of the runs of consecutive ``token_id`` in ``ids``."""
    runs, n = [], 0
    for t in ids + [None]:
        if t == token_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def expected_tail():
    tokenizer = tiny.build_tiny_tokenizer()
    return tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_placeholder_becomes_backbone_image_tokens(processors, backbone):
    fmt = InputFormatter(processors[backbone], backbone, max_length=256)
    batch = fmt([Side("<|image_1|>\nRepresent the given image.", noise_image(40, 50))], "query")
    ids = row_ids(batch, 0)
    decoded = processors[backbone].tokenizer.decode(ids)
    assert "<|image_1|>" not in decoded
    image_id = ids_of(IMAGE_TOKEN[backbone])
    runs = image_runs(ids, image_id)
    assert len(runs) == 1 and runs[0] >= 1
    first = ids.index(image_id)
    if backbone == "qwen2_vl":
        assert ids[first - 1] == ids_of("<|vision_start|>")
        assert ids[:first - 1] == fmt.head_ids
        assert ids[first + runs[0]] == ids_of("<|vision_end|>")
        grid = batch["image_grid_thw"][0]
        assert runs[0] == int(grid.prod()) // 4  # 2x2 patch merge
        assert ids_of("<image>") not in ids
    else:
        assert ids[:first] == fmt.head_ids  # placeholder at the start of the content
        assert batch["image_sizes"].tolist() == [[40, 50]]
        assert ids_of("<|image_pad|>") not in ids
    # the text after the image starts with the newline that followed the placeholder
    assert ids[first + runs[0] + (1 if backbone == "qwen2_vl" else 0)] == ord("\n")
    assert ids[-len(expected_tail()):] == expected_tail()
    assert not bool(batch["dummy_image"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_image_without_placeholder_goes_first(processors, backbone):
    fmt = InputFormatter(processors[backbone], backbone, max_length=256, system_prompt="S")
    batch = fmt([Side("caption text", noise_image(30, 30))], "target")
    ids = row_ids(batch, 0)
    head = fmt.head_ids
    assert ids[:len(head)] == head
    first_content = ids[len(head)]
    expected = ids_of("<|vision_start|>") if backbone == "qwen2_vl" else ids_of("<image>")
    assert first_content == expected
    assert processors[backbone].tokenizer.decode(ids).endswith(
        "\ncaption text<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_text_only_chunk_carries_blank_dummy_image_and_no_image_tokens(processors, backbone):
    fmt = InputFormatter(processors[backbone], backbone, max_length=256)
    batch = fmt([Side("only text"), Side("spelled <image> and <|image_pad|> and <|image_1|>")], "query")
    assert bool(batch["dummy_image"]) and batch["dummy_image"].dtype == torch.bool
    assert batch["pixel_values"].shape[0] >= 1
    key = "image_grid_thw" if backbone == "qwen2_vl" else "image_sizes"
    assert batch[key].shape[0] == 1  # exactly one blank image
    for token in ("<image>", "<|image_pad|>", "<|vision_start|>"):
        assert not (batch["input_ids"] == ids_of(token)).any()
    # user text that spells special tokens stays plain text; the MMEB placeholder is dropped
    decoded = processors[backbone].tokenizer.decode(row_ids(batch, 1))
    assert "spelled <image> and <|image_pad|> and <|im_end|>" in decoded


@pytest.mark.parametrize("backbone", BACKBONES)
def test_mixed_chunk_keeps_images_in_row_order(processors, backbone):
    fmt = InputFormatter(processors[backbone], backbone, max_length=256)
    sides = [Side("<|image_1|> a", noise_image(40, 50)), Side("no image"), Side("b", noise_image(56, 28))]
    batch = fmt(sides, "query")
    assert not bool(batch["dummy_image"])
    image_id = ids_of(IMAGE_TOKEN[backbone])
    counts = [len([t for t in row_ids(batch, i) if t == image_id]) for i in range(3)]
    assert counts[1] == 0 and counts[0] > 0 and counts[2] > 0
    if backbone == "qwen2_vl":
        assert [int(g.prod()) // 4 for g in batch["image_grid_thw"]] == [counts[0], counts[2]]
    else:
        assert batch["image_sizes"].tolist() == [[40, 50], [56, 28]]  # (height, width)
        assert batch["pixel_values"].shape[0] == 2


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_side(processors, padding_side):
    fmt = InputFormatter(processors["qwen2_vl"], "qwen2_vl", max_length=256, padding_side=padding_side)
    batch = fmt([Side("short"), Side("a much longer piece of text")], "query")
    mask = batch["attention_mask"]
    assert mask[1].all() and not mask[0].all()
    assert (mask[0, 0] == 1) == (padding_side == "right")
    assert (batch["input_ids"][mask == 0] == ids_of("<|endoftext|>")).all()
    assert row_ids(batch, 0)[-len(expected_tail()):] == expected_tail()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_truncation_keeps_image_tokens_and_pooled_end_and_is_counted(processors, backbone, caplog):
    fmt = InputFormatter(processors[backbone], backbone, max_length=100, system_prompt="")
    long_text = "word " * 200
    sides = [Side("<|image_1|>\n" + long_text, noise_image(40, 50)), Side(long_text), Side("short")]
    untruncated = InputFormatter(processors[backbone], backbone, max_length=4096, system_prompt="")(
        sides, "query")
    with caplog.at_level(logging.WARNING, logger="llave_ds.processing"):
        batch = fmt(sides, "query")
        fmt(sides, "query")
    assert fmt.num_truncated == 4 and fmt.num_formatted == 6
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1  # warned once
    assert batch["input_ids"].shape[1] == 100
    image_id = ids_of(IMAGE_TOKEN[backbone])
    for i in range(2):
        ids = row_ids(batch, i)
        assert len(ids) == 100
        assert ids[-len(expected_tail()):] == expected_tail()
        full = row_ids(untruncated, i)
        assert ids.count(image_id) == full.count(image_id)
        kept = len(ids) - len(expected_tail())
        assert ids[:kept] == full[:kept]  # the start of the content is kept, its end cut
    assert row_ids(batch, 2) == row_ids(untruncated, 2)


def test_image_that_cannot_fit_is_an_error(processors):
    fmt = InputFormatter(processors["llava_onevision"], "llava_onevision", max_length=40, system_prompt="")
    with pytest.raises(ValueError, match="max_length"):
        fmt([Side("x", noise_image(56, 56))], "query")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_instruction_prefix_per_role(processors, backbone):
    tok = processors[backbone].tokenizer
    fmt = InputFormatter(processors[backbone], backbone, query_instruction="Instruct: find it\nQuery: ")
    q = tok.decode(row_ids(fmt([Side("red car")], "query"), 0))
    t = tok.decode(row_ids(fmt([Side("red car")], "target"), 0))
    assert "<|im_start|>user\nInstruct: find it\nQuery: red car<|im_end|>" in q
    assert "<|im_start|>user\nred car<|im_end|>" in t
    both = InputFormatter(processors[backbone], backbone, query_instruction="Q: ", target_instruction="T: ")
    assert "user\nT: red car<|im_end|>" in tok.decode(row_ids(both([Side("red car")], "target"), 0))
    # with a placeholder, the instruction comes before the image
    with_image = tok.decode(row_ids(fmt([Side("<|image_1|>\nwhat", noise_image(28, 28))], "query"), 0))
    assert with_image.index("Instruct: find it") < with_image.index(IMAGE_TOKEN[backbone])


def test_qwen_image_token_cap(processors):
    fmt = InputFormatter(processors["qwen2_vl"], "qwen2_vl", max_image_tokens=1)
    batch = fmt([Side("a", noise_image(56, 56)), Side("b", noise_image(50, 40))], "query")
    assert batch["image_grid_thw"].prod(-1).tolist() == [4, 4]  # 4 patches -> 1 token each
    uncapped = InputFormatter(processors["qwen2_vl"], "qwen2_vl")([Side("a", noise_image(56, 56))], "query")
    assert uncapped["image_grid_thw"].prod(-1).tolist() == [16]


def test_llava_image_token_cap_downscales_before_tiling(processors):
    proc = processors["llava_onevision"]
    image = noise_image(56, 56)
    natural = InputFormatter(proc, "llava_onevision")([Side("a", image)], "query")
    capped_fmt = InputFormatter(proc, "llava_onevision", max_image_tokens=12)
    capped = capped_fmt([Side("a", image)], "query")
    count = lambda b: int((b["input_ids"] == ids_of("<image>")).sum())  # noqa: E731
    assert count(natural) > 12 >= count(capped)
    assert capped["image_sizes"][0].max() < 56
    with pytest.raises(ValueError, match="max_image_tokens"):
        InputFormatter(proc, "llava_onevision", max_image_tokens=2)([Side("a", image)], "query")


def test_loads_a_stock_format_checkpoint_directory(tmp_path):
    """Hub checkpoints name the stock processor class and carry a video processor config."""
    import json

    path = tiny.build_tiny_model_dir(tmp_path / "stock", "llava_onevision")
    config_file = path / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = "LlavaOnevisionProcessor"
    config["video_processor"] = {"video_processor_type": "LlavaOnevisionVideoProcessor"}
    config_file.write_text(json.dumps(config))
    processor = load_processor(path)
    assert type(processor).__name__ == "LlavaOnevisionImageTextProcessor"
    assert processor.num_image_tokens == 4
    batch = InputFormatter(processor, "llava_onevision")([Side("a", noise_image(28, 28))], "query")
    assert (batch["input_ids"] == ids_of("<image>")).sum() > 0


def test_bad_arguments_are_clear_errors(processors):
    with pytest.raises(ValueError, match="llava_onevision, qwen2_vl"):
        InputFormatter(processors["qwen2_vl"], "clip")
    fmt = InputFormatter(processors["qwen2_vl"], "qwen2_vl")
    with pytest.raises(ValueError, match="role"):
        fmt([Side("a")], "candidate")
    with pytest.raises(ValueError, match="padding_side"):
        InputFormatter(processors["qwen2_vl"], "qwen2_vl", padding_side="middle")
