"""LlaveEmbedder (load an exported or base directory, encode in batches) and `llave-ds encode`."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llave_ds.cli import main as cli_main  # noqa: E402
from llave_ds.model.embedding import ModelConfig, load_embedding_model  # noqa: E402
from llave_ds.model.formatter import InputFormatter, ProcessingConfig  # noqa: E402
from llave_ds.toy import tiny  # noqa: E402
from tests.multimodal import BACKBONES, Side, noise_image  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_embedder")
    return {bb: tiny.build_tiny_model_dir(root / bb, bb) for bb in BACKBONES}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, (h, w, seed) in {"a.png": (28, 28, 1), "b.png": (40, 56, 2), "sub/c.png": (30, 30, 3)}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        noise_image(h, w, seed).save(root / name)
        paths[name] = root / name
    return root, paths


def reference(model, formatter, sides, role, batch_size):
    """What the EmbeddingModel gives, batch by batch, with its own formatter."""
    out = []
    with torch.no_grad():
        for i in range(0, len(sides), batch_size):
            out.append(model(**formatter(sides[i:i + batch_size], role)))
    return torch.cat(out)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_encode_equals_the_embedding_model_and_is_normalised(tiny_dirs, images, backbone):
    from llave_ds import LlaveEmbedder

    _, paths = images
    embedder = LlaveEmbedder.from_pretrained(tiny_dirs[backbone], device="cpu")
    assert embedder.model.training is False and embedder.dim == 64
    texts = ["<|image_1|>\nwhat is this?", "plain text row", None, "image after text", "another text"]
    pil = Image.open(paths["b.png"]).convert("RGB")
    imgs = [paths["a.png"], None, pil, str(paths["sub/c.png"]), None]
    got = embedder.encode(texts=texts, images=imgs, batch_size=2, progress=False)
    assert got.shape == (5, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)

    model, processor = load_embedding_model(ModelConfig(path=str(tiny_dirs[backbone]), dtype="float32"))
    model.eval()
    fmt = InputFormatter(processor, backbone)  # a base dir: the default prompt settings
    sides = [Side(t or "", Image.open(i).convert("RGB") if isinstance(i, (str, Path)) else i)
             for t, i in zip(texts, imgs)]
    torch.testing.assert_close(got, reference(model, fmt, sides, "query", 2), atol=1e-5, rtol=0)
    # Batching does not change the result; text-only batches (dummy image) neither.
    one_batch = embedder.encode(texts=texts, images=imgs, batch_size=16, progress=False)
    torch.testing.assert_close(one_batch, got, atol=1e-5, rtol=0)
    text_only = embedder.encode(texts=["plain text row"], progress=False)
    torch.testing.assert_close(text_only[0], got[1], atol=1e-5, rtol=0)


def test_exported_prompt_settings_are_used(tiny_dirs, tmp_path):
    """llave_embedding.json configures the formatter: every ProcessingConfig field (system
    prompt, instructions, max_length, image-token cap, padding)."""
    import dataclasses

    from llave_ds import LlaveEmbedder
    from llave_ds.export.model_dir import embedding_metadata, write_model_dir

    backbone = "llava_onevision"
    model, processor = load_embedding_model(ModelConfig(path=str(tiny_dirs[backbone]), dtype="float32"))
    model.eval()
    cfg = ProcessingConfig(max_length=80, max_image_tokens=14, query_instruction="Find: ",
                           target_instruction="Doc: ", system_prompt="Embed.", padding_side="left",
                           prompt_format="llave", video_frames=4, video_max_side=20)
    # every field away from its default but min_image_tokens, which LLaVA-OV refuses (Qwen only)
    defaults = ProcessingConfig()
    left_default = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) == getattr(defaults, f.name)]
    assert left_default == ["min_image_tokens"]
    fmt = InputFormatter.from_config(processor, backbone, cfg)
    meta = embedding_metadata(model, fmt, export_dtype="float32", model_class="LlavaOnevisionForConditionalGeneration")
    out = write_model_dir(model.base_hf_model, None, processor, tmp_path / "exported", meta, "card")
    recorded = json.loads((out / "llave_embedding.json").read_text())["input_format"]
    assert {name: recorded[name] for name in ProcessingConfig.field_names()} == dataclasses.asdict(cfg)

    embedder = LlaveEmbedder.from_pretrained(out, device="cpu", dtype=torch.float32)
    assert embedder.formatter.config == cfg and embedder.formatter.metadata() == fmt.metadata()
    texts = ["a short one", "a much longer text that will need to be cut to fit in eighty tokens " * 3,
             "<|image_1|> a wide image"]
    images = [None, None, noise_image(40, 30, 7)]  # 24 image tokens uncapped: the cap downscales it
    sides = [Side(t, i) for t, i in zip(texts, images)]
    for role in ("query", "target"):
        got = embedder.encode(texts=texts, images=images, role=role, progress=False)
        torch.testing.assert_close(got, reference(model, fmt, sides, role, 16), atol=1e-5, rtol=0)
        # The system prompt, the cap and the prompt format matter: the defaults embed differently.
        for other in (dataclasses.replace(cfg, system_prompt=ProcessingConfig().system_prompt),
                      dataclasses.replace(cfg, max_image_tokens=None),
                      dataclasses.replace(cfg, prompt_format="qwen_chat")):
            other_emb = reference(model, InputFormatter.from_config(processor, backbone, other), sides, role, 16)
            assert not torch.allclose(got, other_emb, atol=1e-4)
    assert embedder.formatter.num_truncated >= 1
    # instruction= replaces the recorded one for one call only.
    other = embedder.encode(texts=texts, images=images, instruction="Other: ", progress=False)
    fmt_other = InputFormatter.from_config(processor, backbone, dataclasses.replace(cfg, query_instruction="Other: "))
    torch.testing.assert_close(other, reference(model, fmt_other, sides, "query", 16), atol=1e-5, rtol=0)
    assert embedder.formatter.query_instruction == "Find: "
    assert not torch.allclose(other, embedder.encode(texts=texts, images=images, progress=False), atol=1e-3)


def test_bad_recorded_prompt_settings_name_the_file_and_field(tiny_dirs, tmp_path):
    import shutil

    from llave_ds import LlaveEmbedder

    out = tmp_path / "exported"
    shutil.copytree(tiny_dirs["qwen2_vl"], out)
    meta_file = out / "llave_embedding.json"
    for input_format, field in [({"padding_side": "middle"}, "padding_side"), ({"max_length": "long"}, "max_length"),
                                ({"prompt_format": "llama"}, "prompt_format")]:
        meta_file.write_text(json.dumps({"input_format": {"prompt_format": "qwen_chat", **input_format}}))
        with pytest.raises(ValueError) as info:
            LlaveEmbedder.from_pretrained(out, device="cpu")
        assert str(meta_file) in str(info.value) and field in str(info.value), str(info.value)
    meta_file.write_text(json.dumps({"input_format": {"system_prompt": "Embed.", "max_length": 64}}))
    embedder = LlaveEmbedder.from_pretrained(out, device="cpu", max_length=96)  # an override wins
    assert embedder.formatter.config == ProcessingConfig(system_prompt="Embed.", max_length=96)
    with pytest.raises(TypeError, match="max_lenght"):
        LlaveEmbedder.from_pretrained(out, device="cpu", max_lenght=96)


def test_llave_prompt_format_from_export_and_override(tiny_dirs, tmp_path):
    """prompt_format recorded in llave_embedding.json (or passed as an override) is the one
    LlaveEmbedder formats with: LLaVE checkpoints get LLaVE's prompt."""
    import shutil

    from llave_ds import LlaveEmbedder

    backbone = "llava_onevision"
    out = tmp_path / "exported"
    shutil.copytree(tiny_dirs[backbone], out)
    (out / "llave_embedding.json").write_text(json.dumps({"input_format": {"prompt_format": "llave"}}))
    embedder = LlaveEmbedder.from_pretrained(out, device="cpu")
    assert embedder.formatter.config == ProcessingConfig(prompt_format="llave")
    model, processor = load_embedding_model(ModelConfig(path=str(tiny_dirs[backbone]), dtype="float32"))
    model.eval()
    sides = [Side("<|image_1|> Represent the given image.", noise_image(28, 28, 4)), Side("a cat and a dog")]
    got = embedder.encode_sides(sides, role="target", progress=False)
    llave = InputFormatter(processor, backbone, prompt_format="llave")
    torch.testing.assert_close(got, reference(model, llave, sides, "target", 16), atol=1e-5, rtol=0)
    qwen_chat = reference(model, InputFormatter(processor, backbone), sides, "target", 16)
    assert not torch.allclose(got, qwen_chat, atol=1e-4)
    base = LlaveEmbedder.from_pretrained(tiny_dirs[backbone], device="cpu", prompt_format="llave")
    assert base.formatter.prompt_format == "llave"
    torch.testing.assert_close(base.encode_sides(sides, role="target", progress=False), got, atol=1e-5, rtol=0)


def test_encode_sides_and_argument_errors(tiny_dirs):
    from llave_ds import LlaveEmbedder
    from llave_ds.model.embedder import EncodeError

    embedder = LlaveEmbedder.from_pretrained(tiny_dirs["qwen2_vl"], device="cpu")
    sides = [Side("<|image_1|> x", noise_image(28, 28, 5)), Side("y")]
    got = embedder.encode_sides(sides, role="target", progress=False)
    torch.testing.assert_close(got, embedder.encode(texts=["<|image_1|> x", "y"], images=[sides[0].image, None],
                                                    role="target", progress=False), atol=1e-6, rtol=0)
    assert embedder.encode(texts=[], progress=False).shape == (0, 64)
    with pytest.raises(EncodeError, match="differ in length"):
        embedder.encode(texts=["a", "b"], images=[None])
    with pytest.raises(EncodeError, match="role"):
        embedder.encode(texts=["a"], role="document")
    with pytest.raises(EncodeError, match="not one string"):
        embedder.encode(texts="a")
    with pytest.raises(EncodeError, match="no_such.png"):
        embedder.encode(texts=["a"], images=["/no/such/dir/no_such.png"], progress=False)


# --------------------------------------------------------------------- Matryoshka sizes

def unit_prefix(x: torch.Tensor, d: int) -> torch.Tensor:
    """The first d dims of each row scaled to unit length, in float64 (not llave_ds's truncate)."""
    prefix = x[:, :d].double()
    return (prefix / prefix.pow(2).sum(dim=1, keepdim=True).sqrt()).float()


def with_declared_dims(tiny_dir: Path, out: Path, dims) -> Path:
    shutil.copytree(tiny_dir, out)
    (out / "llave_embedding.json").write_text(json.dumps({"matryoshka_dims": dims}))
    return out


def embedder_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "llave_ds.model.embedder" and r.levelno == logging.WARNING]


def test_dim_gives_the_first_dims_renormalised(tiny_dirs, images, tmp_path):
    """from_pretrained(dim=d), encode(dim=d) and encode_sides(dim=d): the whole vector's first d
    dims scaled back to unit length; the full width is the whole vector itself."""
    from llave_ds import LlaveEmbedder

    _, paths = images
    out = with_declared_dims(tiny_dirs["qwen2_vl"], tmp_path / "exported", [16, 32, 64])
    texts = ["<|image_1|>\nwhat is this?", "plain text row", None, "another text"]
    imgs = [paths["a.png"], None, paths["b.png"], None]
    full = LlaveEmbedder.from_pretrained(out, device="cpu")
    whole = full.encode(texts=texts, images=imgs, progress=False)
    assert full.dim == full.full_dim == 64 and full.matryoshka_dims == [16, 32, 64]

    small = LlaveEmbedder.from_pretrained(out, device="cpu", dim=16)
    assert small.dim == 16 and small.full_dim == 64
    got = small.encode(texts=texts, images=imgs, progress=False)
    assert got.shape == (4, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, unit_prefix(whole, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
    assert (got - whole[:, :16]).abs().max() > 1e-3  # re-normalised, not just cut
    # Per call (overriding the default either way), and encode_sides.
    torch.testing.assert_close(full.encode(texts=texts, images=imgs, dim=32, progress=False),
                               unit_prefix(whole, 32), atol=1e-6, rtol=0)
    assert torch.equal(small.encode(texts=texts, images=imgs, dim=64, progress=False), whole)
    sides = [Side(t or "", Image.open(i).convert("RGB") if i else None) for t, i in zip(texts, imgs)]
    torch.testing.assert_close(full.encode_sides(sides, dim=16, progress=False), got, atol=1e-6, rtol=0)
    assert small.encode(texts=[], progress=False).shape == (0, 16)


def test_bad_dims_are_errors_and_untrained_dims_warn_once(tiny_dirs, tmp_path, caplog):
    from llave_ds import LlaveEmbedder

    out = with_declared_dims(tiny_dirs["qwen2_vl"], tmp_path / "exported", [16, 32, 64])
    embedder = LlaveEmbedder.from_pretrained(out, device="cpu")
    for bad in (0, -3, 65, 1.5, True, "16"):
        with pytest.raises(ValueError, match="dim must be an integer from 1 to 64"):
            embedder.encode(texts=["a"], dim=bad, progress=False)
    with pytest.raises(ValueError, match=r"dim must be an integer from 1 to 64 \(the embedding width\), got 65"):
        LlaveEmbedder.from_pretrained(out, device="cpu", dim=65)

    with caplog.at_level(logging.WARNING, logger="llave_ds.model.embedder"):
        for d in (16, 32, 64, 16):  # declared sizes, and the whole vector
            embedder.encode(texts=["a"], dim=d, progress=False)
        assert embedder_warnings(caplog) == []
        for _ in range(2):  # not declared: it works, with one warning
            assert embedder.encode(texts=["a"], dim=24, progress=False).shape == (1, 24)
        (warning,) = embedder_warnings(caplog)
        assert "dim=24" in warning and "16, 32, 64" in warning and "not trained" in warning
        caplog.clear()
        # No declared sizes at all (a base model directory): also one warning.
        base = LlaveEmbedder.from_pretrained(tiny_dirs["qwen2_vl"], device="cpu", dim=16)
        base.encode(texts=["a", "b"], progress=False)
        base.encode(texts=["a"], dim=16, progress=False)
        (warning,) = embedder_warnings(caplog)
        assert "dim=16" in warning and "declares no Matryoshka sizes" in warning


def test_encode_cli_dim(tiny_dirs, tmp_path, capsys):
    from llave_ds import LlaveEmbedder

    out = with_declared_dims(tiny_dirs["llava_onevision"], tmp_path / "exported", [16, 32, 64])
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello"}, {"text": "a longer row of text"}])
    dest = tmp_path / "e.safetensors"
    assert cli_main(["encode", "--model", str(out), "--input", str(data), "--out", str(dest), "--dim", "32",
                     "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dim"] == 32
    want = LlaveEmbedder.from_pretrained(out, device="cpu", dim=32).encode(texts=["hello", "a longer row of text"],
                                                                           progress=False)
    torch.testing.assert_close(load_file(str(dest))["embeddings"], want, atol=1e-6, rtol=0)
    for dim, words in (("65", ["from 1 to 64", "65"]), ("0", ["--dim must be >= 1"])):
        assert cli_main(["encode", "--model", str(out), "--input", str(data), "--out", str(tmp_path / "x.npy"),
                         "--dim", dim, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    assert not (tmp_path / "x.npy").exists()


def test_package_import_is_lazy():
    code = ("import sys, llave_ds; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'LlaveEmbedder' in dir(llave_ds) or True; print(llave_ds.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------- encode CLI

def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_encode_cli_writes_one_row_per_input_row(tiny_dirs, images, tmp_path):
    from llave_ds import LlaveEmbedder

    root, _ = images
    model_dir = tiny_dirs["llava_onevision"]
    rows = [{"qry": "<|image_1|>\nfind this", "qry_image_path": "a.png", "pos_text": "t1", "pos_image_path": ""},
            {"qry": "text only query", "qry_image_path": "", "pos_text": "", "pos_image_path": "sub/c.png"},
            {"qry": "", "qry_image_path": "b.png", "pos_text": "t3", "pos_image_path": "a.png"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "q.safetensors"
    assert cli_main(["encode", "--model", str(model_dir), "--input", str(data), "--out", str(out),
                     "--image-root", str(root), "--batch-size", "2", "--no-progress"]) == 0
    emb = load_file(str(out))["embeddings"]
    assert emb.shape == (3, 64) and emb.dtype == torch.float32

    embedder = LlaveEmbedder.from_pretrained(model_dir, device="cpu")
    expected = embedder.encode(texts=[r["qry"] for r in rows],
                               images=[root / r["qry_image_path"] if r["qry_image_path"] else None for r in rows],
                               role="query", progress=False)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=0)

    # targets (pos_* fields) to .npy
    out_npy = tmp_path / "t.npy"
    assert cli_main(["encode", "--model", str(model_dir), "--input", str(data), "--out", str(out_npy),
                     "--role", "target", "--image-root", str(root), "--no-progress"]) == 0
    targets = np.load(out_npy)
    assert targets.shape == (3, 64) and targets.dtype == np.float32
    expected_t = embedder.encode(texts=[r["pos_text"] for r in rows],
                                 images=[root / r["pos_image_path"] if r["pos_image_path"] else None for r in rows],
                                 role="target", progress=False)
    np.testing.assert_allclose(targets, expected_t.numpy(), atol=1e-5)

    # generic text / image_path columns, from parquet, images relative to the input file
    import pyarrow as pa
    import pyarrow.parquet as pq
    generic = [{"text": "hello", "image_path": "a.png"}, {"text": "world", "image_path": None}]
    pq.write_table(pa.Table.from_pylist(generic), root / "generic.parquet")
    out_g = tmp_path / "g.safetensors"
    assert cli_main(["encode", "--model", str(model_dir), "--input", str(root / "generic.parquet"),
                     "--out", str(out_g), "--no-progress"]) == 0
    assert load_file(str(out_g))["embeddings"].shape == (2, 64)


@pytest.mark.parametrize("row, words", [
    ({"pos_text": "only target fields"}, ["line 3", "qry", "text", "pos_text"]),
    ({"qry": 17, "qry_image_path": ""}, ["line 3", "'qry'", "expected a string", "int"]),
    ({"qry": "x", "qry_image_path": "missing.png"}, ["line 3", "'qry_image_path'", "missing.png"]),
    ({"qry": "", "qry_image_path": ""}, ["line 3", "empty"]),
    # a path that leaves the image root (the input's folder here), as training refuses it
    ({"qry": "x", "qry_image_path": "../elsewhere.png"}, ["line 3", "'qry_image_path'", "outside the image root",
                                                         "--image-root"]),
    ({"qry": "x", "qry_video_path": "/etc/clip.mp4"}, ["line 3", "'qry_video_path'", "outside the image root"]),
])
def test_encode_cli_names_file_row_and_field_of_a_bad_row(tiny_dirs, tmp_path, capsys, row, words):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"qry": "fine", "qry_image_path": ""}) + "\n\n" + json.dumps(row) + "\n")
    out = tmp_path / "never.safetensors"
    capsys.readouterr()
    assert cli_main(["encode", "--model", str(tiny_dirs["qwen2_vl"]), "--input", str(data), "--out", str(out),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "row 1" in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_encode_cli_rejects_bad_files(tiny_dirs, tmp_path, capsys):
    model = str(tiny_dirs["qwen2_vl"])
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text('{"qry": "a"}\n{"qry": \n')
    cases = [
        (["--input", str(bad_json), "--out", str(tmp_path / "o.npy")], [str(bad_json), "line 2", "JSON"]),
        (["--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.npy")], ["nope.jsonl", "does not exist"]),
        (["--input", str(bad_json), "--out", str(tmp_path / "o.pt")], ["o.pt", ".safetensors or .npy"]),
    ]
    for args, words in cases:
        capsys.readouterr()
        assert cli_main(["encode", "--model", model, *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), (words, err)


def test_encode_takes_an_absolute_path_only_under_the_image_root(tiny_dirs, tmp_path, capsys):
    from PIL import Image
    image = tmp_path / "media" / "a.png"
    image.parent.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    data = tmp_path / "rows" / "rows.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"qry": "<|image_1|> x", "qry_image_path": str(image)}) + "\n")
    args = ["encode", "--model", str(tiny_dirs["qwen2_vl"]), "--input", str(data), "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "a.npy")]) == 2          # root: the input's folder
    assert "outside the image root" in capsys.readouterr().err
    assert cli_main(args + ["--out", str(tmp_path / "b.npy"), "--image-root", str(tmp_path / "media")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "c.npy"), "--image-root", "/"]) == 0
    assert np.load(tmp_path / "b.npy").shape == np.load(tmp_path / "c.npy").shape == (1, 64)
