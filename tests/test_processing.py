"""InputFormatter: prompt layout, image tokens, dummy image, truncation, instructions."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llave_ds.toy import tiny  # noqa: E402
from llave_ds.model.formatter import InputFormatter, ProcessingConfig  # noqa: E402
from llave_ds.model.processors import load_processor  # noqa: E402
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
    with caplog.at_level(logging.WARNING, logger="llave_ds.model.formatter"):
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


# --------------------------------------------------------------------- ProcessingConfig

# Every field away from its default (checked below): a field from_config dropped would show.
NON_DEFAULT = {"llava_onevision": dict(max_length=200, max_image_tokens=14, query_instruction="Find: ",
                                       target_instruction="Doc: ", system_prompt="Embed.", padding_side="left",
                                       prompt_format="llave", video_frames=4, video_max_side=20),
               "qwen2_vl": dict(max_length=200, max_image_tokens=1, query_instruction="Find: ",
                                target_instruction="Doc: ", system_prompt="Embed.", padding_side="left",
                                prompt_format="llave", video_frames=6, video_max_side=40, min_image_tokens=1)}
# Fields a backbone refuses away from their default (min_image_tokens is Qwen-only).
NOT_FOR = {"llava_onevision": ["min_image_tokens"], "qwen2_vl": []}


def fixed_chunk():
    return [Side("<|image_1|>\nwhat is this", noise_image(56, 28, 5)), Side("a plain text side"),
            Side("image first", noise_image(40, 30, 6))]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_from_config_uses_every_field(processors, backbone):
    import dataclasses

    cfg = ProcessingConfig(**NON_DEFAULT[backbone])
    defaults = ProcessingConfig()
    left_default = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) == getattr(defaults, f.name)]
    assert left_default == NOT_FOR[backbone]
    proc = processors[backbone]
    fmt = InputFormatter.from_config(proc, backbone, cfg)
    assert fmt.config == cfg
    meta = fmt.metadata()
    assert {name: meta[name] for name in ProcessingConfig.field_names()} == dataclasses.asdict(cfg)
    # The same token ids and pixels as the keyword constructor with each field spelled out.
    explicit = InputFormatter(proc, backbone, max_length=cfg.max_length, max_image_tokens=cfg.max_image_tokens,
                              query_instruction=cfg.query_instruction, target_instruction=cfg.target_instruction,
                              system_prompt=cfg.system_prompt, padding_side=cfg.padding_side,
                              prompt_format=cfg.prompt_format, video_frames=cfg.video_frames,
                              video_max_side=cfg.video_max_side)
    default = InputFormatter.from_config(proc, backbone, defaults)
    for role in ("query", "target"):
        got, want = fmt(fixed_chunk(), role), explicit(fixed_chunk(), role)
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), (role, key)
        # ... and not those of the defaults (the cap shrinks the images, the prompt differs).
        assert not torch.equal(got["pixel_values"], default(fixed_chunk(), role)["pixel_values"])
        text = proc.tokenizer.decode(row_ids(got, 1))
        assert text.startswith("<|im_start|>system\nEmbed.<|im_end|>")
        assert ("user\nFind: a plain" if role == "query" else "user\nDoc: a plain") in text
        mask = got["attention_mask"]
        shortest = int(mask.sum(-1).argmin())
        assert mask.sum(-1).min() < mask.shape[1] and mask[shortest, 0] == 0 and mask[shortest, -1] == 1  # left


def test_processing_config_is_shared_with_the_training_config():
    from llave_ds.config import load_config
    from llave_ds import train

    assert train.ProcessingConfig is ProcessingConfig
    base = ["data.source=/data/mmeb"]
    cfg = load_config(train.TrainConfig, overrides=base + ["processing.system_prompt=Embed.",
                                                           "processing.max_image_tokens=64"])
    assert isinstance(cfg.processing, ProcessingConfig)
    assert cfg.processing.system_prompt == "Embed." and cfg.processing.max_image_tokens == 64
    with pytest.raises(ValueError, match="processing.max_image_tokens"):
        load_config(train.TrainConfig, overrides=base + ["processing.max_image_tokens=0"])


def test_processing_config_from_metadata_round_trips_and_names_the_file(processors):
    cfg = ProcessingConfig(**NON_DEFAULT["qwen2_vl"])
    meta = InputFormatter.from_config(processors["qwen2_vl"], "qwen2_vl", cfg).metadata()
    assert ProcessingConfig.from_metadata(meta, source="x/llave_embedding.json") == cfg
    # Missing fields (an older export) keep their defaults; no block at all: the defaults.
    partial = {k: v for k, v in meta.items() if k not in ("system_prompt", "padding_side")}
    got = ProcessingConfig.from_metadata(partial, source="x/llave_embedding.json")
    assert got.system_prompt == ProcessingConfig().system_prompt and got.query_instruction == "Find: "
    assert ProcessingConfig.from_metadata(None, source="x") == ProcessingConfig()

    bad_cases = [({"padding_side": "middle"}, "padding_side"), ({"max_length": "long"}, "max_length"),
                 ({"max_image_tokens": 0}, "max_image_tokens"), ({"prompt_format": "llama"}, "prompt_format")]
    for change, field in bad_cases:
        with pytest.raises(ValueError) as info:
            ProcessingConfig.from_metadata({**meta, **change}, source="/some/dir/llave_embedding.json")
        assert "/some/dir/llave_embedding.json" in str(info.value) and field in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="input_format must be a mapping"):
        ProcessingConfig.from_metadata(["max_length"], source="f.json")


def test_from_config_validates(processors):
    with pytest.raises(ValueError, match="processing.max_image_tokens"):
        InputFormatter.from_config(processors["qwen2_vl"], "qwen2_vl", ProcessingConfig(max_image_tokens=0))
    with pytest.raises(ValueError, match="processing.padding_side"):
        InputFormatter.from_config(processors["qwen2_vl"], "qwen2_vl", ProcessingConfig(padding_side="middle"))
    with pytest.raises(TypeError, match="ProcessingConfig"):
        InputFormatter.from_config(processors["qwen2_vl"], "qwen2_vl", {"max_length": 64})


@pytest.mark.parametrize("backbone", BACKBONES)
def test_saved_processor_names_the_stock_class(tmp_path, backbone):
    """Directories llave-ds writes name LlavaOnevisionProcessor / Qwen2VLProcessor (what
    AutoProcessor builds) and still load with load_processor."""
    import json

    path = tiny.build_tiny_model_dir(tmp_path / backbone, backbone)
    stock = {"llava_onevision": "LlavaOnevisionProcessor", "qwen2_vl": "Qwen2VLProcessor"}[backbone]
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == stock
    assert json.loads((path / "tokenizer_config.json").read_text())["processor_class"] == stock
    processor = load_processor(path)
    assert type(processor).__name__ == stock.replace("Processor", "ImageTextProcessor")
    again = tmp_path / "again"
    processor.save_pretrained(again)
    assert json.loads((again / "processor_config.json").read_text())["processor_class"] == stock


# --------------------------------------------------------------------------- Qwen2.5-VL

@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    return tiny.build_tiny_model_dir(tmp_path_factory.mktemp("tiny_proc_qwen25") / "qwen2_5_vl", "qwen2_5_vl")


def test_qwen2_5_vl_formatter_matches_the_stock_processor(qwen25_dir):
    """Token ids, pixels and grids of the formatter equal what the stock Qwen2.5-VL
    processor call makes of the same chat prompt (its own image-token expansion)."""
    proc = load_processor(qwen25_dir)
    assert type(proc).__name__ == "Qwen2_5_VLImageTextProcessor"
    fmt = InputFormatter(proc, "qwen2_5_vl", max_length=512, system_prompt="S", query_instruction="Q: ")
    for text, image, content in [
        ("<|image_1|>\nwhat is it", noise_image(40, 50, 1), "Q: <|vision_start|><|image_pad|><|vision_end|>\nwhat is it"),
        ("caption first", noise_image(56, 28, 2), "<|vision_start|><|image_pad|><|vision_end|>\nQ: caption first"),
    ]:
        batch = fmt([Side(text, image)], "query")
        prompt = f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        stock = proc(text=[prompt], images=[image], return_tensors="pt")
        assert batch["input_ids"].tolist() == stock["input_ids"].tolist()
        assert torch.equal(batch["pixel_values"], stock["pixel_values"])
        assert batch["image_grid_thw"].tolist() == stock["image_grid_thw"].tolist()
        # what EmbeddingModel derives for get_rope_index when the chunk carries none
        derived = (batch["input_ids"] == ids_of("<|image_pad|>")).int()
        assert derived.tolist() == stock["mm_token_type_ids"].tolist()
        assert int(batch["image_grid_thw"].prod()) // 4 >= 9  # resized up to >= 3x3 merged tokens
        assert not bool(batch["dummy_image"])


def test_qwen2_5_vl_text_only_dummy_and_token_cap(qwen25_dir):
    proc = load_processor(qwen25_dir)
    fmt = InputFormatter(proc, "qwen2_5_vl", max_length=256)
    batch = fmt([Side("only text"), Side("spelled <|image_pad|> and <|image_1|>")], "query")
    assert bool(batch["dummy_image"]) and batch["image_grid_thw"].shape == (1, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod())
    for token in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"):
        assert not (batch["input_ids"] == ids_of(token)).any()
    image = noise_image(100, 100, 3)
    natural = fmt([Side("a", image)], "query")
    capped = InputFormatter(proc, "qwen2_5_vl", max_image_tokens=4)([Side("a", image)], "query")
    count = lambda b: int((b["input_ids"] == ids_of("<|image_pad|>")).sum())  # noqa: E731
    assert count(natural) == int(natural["image_grid_thw"].prod()) // 4 > 4
    assert count(capped) == int(capped["image_grid_thw"].prod()) // 4 <= 4


def test_qwen2_5_vl_directory_names_the_stock_class_and_loads_stock_format(qwen25_dir, tmp_path):
    import json
    import shutil

    from llave_ds.model.backbones import detect_backbone

    assert detect_backbone(qwen25_dir) == "qwen2_5_vl"
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((qwen25_dir / name).read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    # A hub-style directory also carries a video processor config: ignored.
    path = tmp_path / "stock"
    shutil.copytree(qwen25_dir, path)
    config = json.loads((path / "processor_config.json").read_text())
    config["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor"}
    (path / "processor_config.json").write_text(json.dumps(config))
    processor = load_processor(path)
    assert type(processor).__name__ == "Qwen2_5_VLImageTextProcessor"
    assert processor.get_attributes() == ["image_processor", "tokenizer"]


# ------------------------------------------------------------------ prompt_format: llave
# tests/llave_reference.py re-implements LLaVE's own preprocessing (DeepLearnXMU/LLaVE
# train.py / model_embed.py) without llave_ds; the llave format must equal it token for token.

from tests import llave_reference  # noqa: E402

# (text, image size or None): text-only; placeholder at the start (space / newline after it),
# in the middle, at the end, after leading whitespace, alone; an empty image-only side.
LLAVE_CASES = [
    ("A cat and a dog", None),
    ("  spaced text-only side \n", None),
    ("<|image_1|> Represent the given image with the following question: What is in the image", (40, 50)),
    ("<|image_1|>\nRepresent the given image.", (28, 28)),
    ("Find a caption for <|image_1|> in the news  ", (56, 28)),
    ("Select the matching image: <|image_1|>", (30, 40)),
    (" \n<|image_1|>\nwhat is this?", (28, 56)),
    ("<|image_1|>", (28, 28)),
]


def llave_sides():
    return [Side(text, noise_image(*size, seed=i) if size else None) for i, (text, size) in enumerate(LLAVE_CASES)]


def llave_expected(proc, user_text, image, system_prompt):
    """Reference ids of one side, its image expanded as transformers' LLaVA-OV processor does."""
    ids = llave_reference.llave_input_ids(user_text, proc.tokenizer, system_message=system_prompt)
    if image is None:
        assert llave_reference.IMAGE_TOKEN_INDEX not in ids
        return ids
    n_tokens = list(proc(text=["<image>"], images=[image])["input_ids"][0]).count(ids_of("<image>"))
    return llave_reference.expand_image(ids, n_tokens, ids_of("<image>"))


@pytest.mark.parametrize("query_instruction, target_instruction, system_prompt", [
    (None, None, "You are a helpful assistant."),
    ("Instruct: find the picture\nQuery: ", "Represent the answer: ", "Embed."),
])
def test_llave_format_equals_the_official_preprocessing(processors, query_instruction, target_instruction,
                                                        system_prompt):
    proc = processors["llava_onevision"]
    settings = dict(max_length=1024, query_instruction=query_instruction, target_instruction=target_instruction,
                    system_prompt=system_prompt)
    fmt = InputFormatter(proc, "llava_onevision", prompt_format="llave", **settings)
    qwen_chat = InputFormatter(proc, "llava_onevision", **settings)
    sides = llave_sides()
    for role, instruction in (("query", query_instruction), ("target", target_instruction)):
        batch, other = fmt(sides, role), qwen_chat(sides, role)
        for i, side in enumerate(sides):
            # llave-ds's instruction is a prefix of the user text LLaVE would be given
            want = llave_expected(proc, (instruction or "") + side.text, side.image, system_prompt)
            assert row_ids(batch, i) == want, (role, side.text)
            assert row_ids(other, i) != want  # the default format is not LLaVE's
            if side.image is not None:
                assert ids_of("<image>") in want
        # one side at a time formats the same
        assert row_ids(fmt(sides[4:5], role), 0) == row_ids(batch, 4)


def test_llave_format_spelled_out(processors):
    """The layout in docs/MODELS.md, decoded: image moved to the front, text stripped, closed
    assistant turn; a placeholder at the very start stays; text-only sides untouched."""
    proc = processors["llava_onevision"]
    fmt = InputFormatter(proc, "llava_onevision", system_prompt="S", prompt_format="llave")
    image = noise_image(28, 28)
    n = len([t for t in row_ids(fmt([Side("x", image)], "query"), 0) if t == ids_of("<image>")])
    def decode(side):
        return proc.tokenizer.decode(row_ids(fmt([side], "query"), 0)).replace("<image>" * n, "<IMG>")

    head = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n"
    assert decode(Side("Find a <|image_1|> caption ", image)) == head + "<IMG>\nFind a  caption" + tail
    assert decode(Side("<|image_1|> Represent it ", image)) == head + "<IMG> Represent it " + tail
    assert decode(Side(" text only ", None)) == head + " text only " + tail
    assert decode(Side("<|image_1|>", image)) == head + "<IMG>" + tail
    # Deviations, documented: LLaVE would drop an image whose text has no placeholder (its
    # reference ids carry no image); llave-ds places it as LLaVE places a trailing placeholder.
    assert llave_reference.IMAGE_TOKEN_INDEX not in llave_reference.llave_input_ids("caption text", proc.tokenizer)
    assert row_ids(fmt([Side("caption text ", image)], "query"), 0) == llave_expected(
        proc, "caption text <|image_1|>", image, "S")
    # several placeholders: the image at the first, the others removed; none in text-only sides
    assert decode(Side("<|image_1|> a <|image_1|> b", image)) == head + "<IMG> a  b" + tail
    assert decode(Side("a <|image_1|> b", None)) == head + "a  b" + tail


@pytest.mark.parametrize("backbone", BACKBONES)
def test_llave_format_pools_the_final_newline_under_both_paddings(tmp_path, backbone):
    """The pooled token (last attended) is the final '\\n' after the closing <|im_end|>, at
    LLaVE's index (mask.sum - 1) under right padding; left padding embeds the same."""
    import torch.nn.functional as F

    from llave_ds.model.embedding import ModelConfig, last_token_index, load_embedding_model

    model, proc = load_embedding_model(ModelConfig(path=str(tiny.build_tiny_model_dir(tmp_path / backbone, backbone)),
                                                   dtype="float32"))
    model.eval()
    sides = llave_sides()[:6]
    embeddings = {}
    for padding_side in ("right", "left"):
        fmt = InputFormatter(proc, backbone, padding_side=padding_side, prompt_format="llave")
        batch = fmt(sides, "query")
        mask = batch["attention_mask"]
        assert len(set(mask.sum(1).tolist())) > 1
        index = last_token_index(mask)
        rows = torch.arange(len(sides))
        assert (batch["input_ids"][rows, index] == ord("\n")).all()
        assert (batch["input_ids"][rows, index - 1] == ids_of("<|im_end|>")).all()
        with torch.no_grad():
            embeddings[padding_side] = model(**batch)
        if padding_side == "right":
            official = torch.tensor([llave_reference.pooled_index(row.tolist()) for row in mask])
            assert index.tolist() == official.tolist()
            if backbone == "llava_onevision":  # the stock forward's hidden state at LLaVE's index
                kwargs = {k: v for k, v in batch.items() if k != "dummy_image"}
                with torch.no_grad():
                    hidden = model.base_hf_model.model(**kwargs, use_cache=False).last_hidden_state
                torch.testing.assert_close(embeddings["right"], F.normalize(hidden[rows, official], dim=-1),
                                           atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings["right"], embeddings["left"], atol=1e-5, rtol=1e-5)


def test_prompt_format_round_trips_and_unknown_is_a_clear_error(processors):
    from llave_ds.config import load_config
    from llave_ds import train

    cfg = ProcessingConfig(prompt_format="llave")
    fmt = InputFormatter.from_config(processors["llava_onevision"], "llava_onevision", cfg)
    meta = fmt.metadata()
    assert meta["prompt_format"] == "llave" and "assistant\\n\\n<|im_end|>\\n" in meta["pooled_token"]
    assert ProcessingConfig.from_metadata(meta, source="x/llave_embedding.json") == cfg
    assert ProcessingConfig.from_metadata({}, source="x").prompt_format == "qwen_chat"  # older exports
    with pytest.raises(ValueError, match="processing.prompt_format must be one of qwen_chat, llave, "
                                         "qwen3_vl_embedding, got 'chatml'"):
        InputFormatter.from_config(processors["qwen2_vl"], "qwen2_vl", ProcessingConfig(prompt_format="chatml"))
    with pytest.raises(ValueError, match="prompt_format"):
        InputFormatter(processors["qwen2_vl"], "qwen2_vl", prompt_format="chatml")
    with pytest.raises(ValueError, match="processing.prompt_format"):
        load_config(train.TrainConfig, overrides=["data.source=/data/mmeb", "processing.prompt_format=chatml"])
    assert load_config(train.TrainConfig, overrides=["data.source=/data/mmeb", "processing.prompt_format=llave"]
                       ).processing.prompt_format == "llave"


# --------------------------------------------------------------------- row lengths (token-budget chunks)

@pytest.mark.parametrize("backbone", BACKBONES)
def test_row_lengths_are_each_rows_length_in_any_chunk(processors, backbone):
    """``row_lengths`` (what token-budget chunks are packed by) is each row's attended length
    whatever chunk it lands in: rows are fitted alone and padded, image tokens are per image.
    Truncated rows included; the formatter's counters are left alone."""
    from tests.multimodal import moving_video

    fmt = InputFormatter(processors[backbone], backbone, max_length=90, video_frames=4, video_slot=True)
    sides = [Side("<|image_1|>\nwhat is shown here, in detail?", noise_image(40, 50, 1)), Side("short"),
             Side("a long text row " * 20), Side("<|image_1|> x", noise_image(56, 28, 2)),
             Side("<|video_1|>\nwhere does it go", video=moving_video(3, 4)), Side("")]
    counters = (fmt.num_formatted, fmt.num_truncated)
    lengths = fmt.row_lengths(sides, "query")
    assert (fmt.num_formatted, fmt.num_truncated) == counters
    assert max(lengths) == 90 and len(set(lengths)) >= 4  # truncated rows, and rows of many lengths
    for group in ([0, 1, 2, 3, 4, 5], [2, 5], [4, 0, 1], [3]):
        mask = fmt([sides[i] for i in group], "query")["attention_mask"]
        assert mask.sum(1).tolist() == [lengths[i] for i in group]
    assert fmt.row_lengths([sides[1]], "target") == [int(fmt([sides[1]], "target")["attention_mask"].sum())]
