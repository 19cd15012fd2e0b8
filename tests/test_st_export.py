"""The export is also a sentence-transformers model (llave_ds/export/st_files.py, issue 19).

Tiny LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL models are exported in both prompt formats
(with instructions, a one-word system prompt, a max_length that cuts long texts, a Qwen
image-token cap and, for ``qwen_chat``, left padding recorded for LlaveEmbedder). A fresh
process that never imports llave-ds (tests/st_client.py) loads each with
``SentenceTransformer(dir)`` and encodes text-only, image-only and image+text rows; here
the same rows go through ``LlaveEmbedder``. Token ids, image tensors and vectors must
agree (vectors within 1e-5), in mixed batches, one row at a time and left padded. The
cases the template cannot reproduce (``st_export.differences``) are pinned, and the
model card's (and docs/EXPORT.md's) three usage snippets are executed and agree. One export
declares Matryoshka sizes: ``SentenceTransformer(dir, truncate_dim=d)`` with
``normalize_embeddings=True`` gives ``LlaveEmbedder(dim=d)``'s vectors.
"""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from llave_ds import LlaveEmbedder
from llave_ds.export import st_files as st_export
from llave_ds.export.model_dir import embedding_metadata, model_card, write_model_dir
from llave_ds.model.embedder import Side
from llave_ds.model.embedding import ModelConfig, load_embedding_model
from llave_ds.model.formatter import InputFormatter, ProcessingConfig
from llave_ds.model.prompt_formats import TEMPLATE_TAILS
from llave_ds.toy import tiny
from tests.multimodal import ALL_BACKBONES, noise_image

pytest.importorskip("sentence_transformers", reason="sentence-transformers is in the test extra (llave-ds[st])")

CLIENT = Path(__file__).with_name("st_client.py")
ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("qwen_chat", "llave")


def formats_for(backbone):
    """Every backbone in both general formats; Qwen3-VL also in Qwen3-VL-Embedding's own."""
    return FORMATS + (("qwen3_vl_embedding",) if backbone == "qwen3_vl" else ())


EXPORTS = [(bb, pf) for bb in ALL_BACKBONES for pf in formats_for(bb)]
MAX_LENGTH = 160
# Qwen: the image-token cap travels as image-processor size bounds (Qwen2.5-VL's tiny
# processor needs >= 9 merged tokens, see llave_ds/toy/tiny.py).
QWEN_CAP = {"qwen2_vl": 2, "qwen2_5_vl": 12, "qwen3_vl": 2}
IMAGES = {"a": (40, 56, 1), "b": (30, 30, 2), "c": (60, 40, 3), "d": (28, 28, 4)}
CASES = [
    ("a cat on a mat", None),                          # text only
    ("<|image_1|>\nWhat is in this image?", "a"),      # placeholder first
    ("a red square", "b"),                             # image, no placeholder
    (None, "c"),                                       # image only
    ("Look: <|image_1|> now describe it", "d"),        # placeholder inside (llave: image moved first)
    ("<|image_1|> orphan placeholder", None),          # placeholder without image: removed
    ("<|image_1|> one <|image_1|> two", "a"),          # two placeholders
    ("  spaced out  ", "b"),                           # llave strips the rest
    ("text spelling <image> and <|im_end|>", "c"),     # special tokens stay text
    ("café – naïve 😀\nsecond line", None),            # unicode
    ("long text " * 40, None),                         # text-only over max_length: cut alike
]
TOL = 1e-5
# The export that declares Matryoshka sizes, and the sizes sentence-transformers truncates to.
MATRYOSHKA_EXPORT, MATRYOSHKA_DIMS = "qwen2_vl-qwen_chat", [16, 32, 64]
TRUNCATE_DIMS = [16, 32]


def export_name(backbone, prompt_format):
    return f"{backbone}-{prompt_format}"


def processing(backbone, prompt_format, **changes):
    cfg = ProcessingConfig(prompt_format=prompt_format, query_instruction="Find: ", target_instruction="Doc: ",
                           system_prompt="Embed.", max_length=MAX_LENGTH, max_image_tokens=QWEN_CAP.get(backbone),
                           padding_side="left" if prompt_format == "qwen_chat" else "right")
    return dataclasses.replace(cfg, **changes)


def write_export(model, processor, backbone, cfg, out, matryoshka_dims=None):
    fmt = InputFormatter.from_config(processor, backbone, cfg)
    meta = embedding_metadata(model, fmt, export_dtype="float32", model_class=type(model.base_hf_model).__name__,
                              matryoshka_dims=matryoshka_dims)
    return write_model_dir(model.base_hf_model, None, processor, out, meta, model_card(None, meta))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("st_images")
    paths = {}
    for name, (h, w, seed) in IMAGES.items():
        paths[name] = root / f"{name}.png"
        noise_image(h, w, seed).save(paths[name])
    # A photo whose EXIF orientation tag says "turn 90 degrees".
    exif = noise_image(30, 50, 7).getexif()
    exif[0x0112] = 6
    paths["exif"] = root / "exif.jpg"
    noise_image(30, 50, 7).save(paths["exif"], exif=exif.tobytes())
    return paths


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("st_exports")
    out = {}
    for backbone in ALL_BACKBONES:
        base = tiny.build_tiny_model_dir(root / f"base-{backbone}", backbone)
        model, processor = load_embedding_model(ModelConfig(path=str(base), dtype="float32"))
        model.eval()
        for prompt_format in formats_for(backbone):
            name = export_name(backbone, prompt_format)
            out[name] = write_export(model, processor, backbone, processing(backbone, prompt_format), root / name,
                                     matryoshka_dims=MATRYOSHKA_DIMS if name == MATRYOSHKA_EXPORT else None)
        if backbone == "llava_onevision":  # the image-token cap sentence-transformers cannot apply
            out["llava_onevision-cap"] = write_export(
                model, processor, backbone, processing(backbone, "qwen_chat", max_image_tokens=14),
                root / "llava_onevision-cap")
    return out


def run_client(args, tmp_path, name):
    out = tmp_path / f"{name}.pt"
    proc = subprocess.run([sys.executable, str(CLIENT), *args, str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = torch.load(out, weights_only=False)
    result["stderr"] = proc.stderr
    return result


EXTRA = [  # rows for the pinned differences
    {"export": "llava_onevision-qwen_chat", "prompt": "query", "rows": [["long text " * 40, "a"]]},  # over max_length
    {"export": "llava_onevision-qwen_chat", "prompt": "query", "expect_error": True,               # cut in the image
     "rows": [["long text " * 40 + "<|image_1|> after", "a"]]},
    {"export": "qwen2_vl-llave", "prompt": "document", "rows": [[None, "path:exif"], [None, "exif"]]},  # EXIF
    {"export": "llava_onevision-cap", "prompt": "document", "rows": [[None, "d"], [None, "c"]]},  # cap: under, over
    {"export": "qwen2_vl-qwen_chat", "prompt": "query", "rows": [["a cat on a mat", None], [None, "a"]],
     "dtype": "bfloat16"},
]


@pytest.fixture(scope="module")
def st_results(exports, images, tmp_path_factory):
    """Everything sentence-transformers gives, from one fresh process."""
    tmp = tmp_path_factory.mktemp("st_client")
    job = {"exports": {name: str(path) for name, path in exports.items()},
           "images": {name: str(path) for name, path in images.items()},
           "cases": [list(case) for case in CASES],
           "extra": EXTRA,
           "truncate": {"export": MATRYOSHKA_EXPORT, "dims": TRUNCATE_DIMS}}
    (tmp / "job.json").write_text(json.dumps(job))
    result = run_client([str(tmp / "job.json")], tmp, "st")
    assert result["llave_ds_imported"] == []
    return result


@pytest.fixture(scope="module")
def embedders(exports):
    return {name: LlaveEmbedder.from_pretrained(path, device="cpu", dtype="float32") for name, path in exports.items()}


def reference_sides(images):
    return [Side(text or "", Image.open(images[img]).convert("RGB") if img else None) for text, img in CASES]


def llave_encode(embedder, images, role, **kwargs):
    return embedder.encode(texts=[t for t, _ in CASES], images=[str(images[i]) if i else None for _, i in CASES],
                           role=role, progress=False, **kwargs)


def unpadded_ids(batch, row=0):
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


# ------------------------------------------------------------------------ the files

def test_sentence_transformers_loads_every_export_without_a_load_report(st_results, exports):
    """transformers prints a load report when a checkpoint has keys the model does not (or
    lacks keys it has); users read it as a broken model. The tiny LLaVA-OV's LM head is untied
    (as every 7B's): the export leaves it out, so SentenceTransformer(dir) loads silently."""
    assert not any(word in st_results["stderr"] for word in ("UNEXPECTED", "MISSING", "LOAD REPORT")), \
        st_results["stderr"][-3000:]
    meta = {name: json.loads((path / "llave_embedding.json").read_text()) for name, path in exports.items()}
    assert {name for name, m in meta.items() if "lm_head" in m} == {n for n in exports if n.startswith("llava")}


def test_export_writes_the_sentence_transformers_files(exports):
    out = exports["qwen2_vl-qwen_chat"]
    for name in st_export.ST_FILES:
        assert (out / name).is_file(), name
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((out / "1_Pooling/config.json").read_text())["pooling_mode"] == "lasttoken"
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": "Find: ", "document": "Doc: "} and cfg["similarity_fn_name"] == "cosine"
    module = json.loads((out / "sentence_bert_config.json").read_text())
    assert module["max_seq_length"] == MAX_LENGTH and module["unpad_inputs"] is False
    kwargs = module["processing_kwargs"]
    assert kwargs["text"] == {"padding_side": "right"} and kwargs["chat_template"]["sanitize_control_tokens"] is True
    assert kwargs["image"] == {"size": {"shortest_edge": 784, "longest_edge": 2 * 784}}  # max_image_tokens=2
    assert "image" not in json.loads((exports["llava_onevision-llave"] / "sentence_bert_config.json").read_text())[
        "processing_kwargs"]
    # The export's own chat template (the base model's) is left alone.
    assert (out / "chat_template.jinja").read_text().startswith("{% for message in messages %}")

    meta = json.loads((out / "llave_embedding.json").read_text())["sentence_transformers"]
    assert meta["written"] is True and meta["files"] == list(st_export.ST_FILES)
    assert meta["prompts"] == cfg["prompts"]
    ids = [d["id"] for d in meta["differences"]]
    assert ids == ["image_row_over_max_length", "exif_orientation", "tokenization_at_prompt_boundaries", "dtype"]
    cap = json.loads((exports["llava_onevision-cap"] / "llave_embedding.json").read_text())["sentence_transformers"]
    assert [d["id"] for d in cap["differences"]][-1] == "llava_image_token_cap"

    card = (out / "README.md").read_text()
    assert "### sentence-transformers" in card and "### Where sentence-transformers differs" in card
    assert all(f"`{i}`" in card for i in ids) and "system prompt `Embed.`" in card


def test_the_template_survives_any_system_prompt(exports):
    """Quotes, backslashes, Jinja delimiters, line breaks, non-ASCII: the template's literal
    system prompt renders to exactly the formatter's head."""
    from llave_ds.model.processors import load_processor

    processor = load_processor(exports["qwen2_vl-llave"])
    nasty = 'Say "hi" \\ {{ x }} {% raw %} {# c #} \'q\' café 😀\n\tend'
    for prompt_format in FORMATS:
        fmt = InputFormatter(processor, "qwen2_vl", system_prompt=nasty, prompt_format=prompt_format,
                             query_instruction="Find: ")
        template = st_export.chat_template(fmt.metadata(), st_export.image_markup("qwen2_vl", processor))
        assert st_export._check_template(fmt, {"chat_template": template, "sanitize_control_tokens": True}) is None
    # Qwen3-VL-Embedding's format: the instruction is the system turn, so it must survive too.
    processor = load_processor(exports["qwen3_vl-qwen3_vl_embedding"])
    fmt = InputFormatter(processor, "qwen3_vl", prompt_format="qwen3_vl_embedding", query_instruction=nasty,
                         target_instruction=nasty + "?")
    template = st_export.chat_template(fmt.metadata(), st_export.image_markup("qwen3_vl", processor))
    assert st_export._check_template(fmt, {"chat_template": template, "sanitize_control_tokens": True}) is None


# ------------------------------------------------------------------ same tokens, same vectors

@pytest.mark.parametrize("name", [export_name(*e) for e in EXPORTS])
def test_token_ids_and_image_tensors_equal_the_formatter(st_results, embedders, images, name):
    features = st_results["exports"][name]["features"]
    formatter = embedders[name].formatter
    sides = reference_sides(images)
    for role in ("query", "target"):
        for i, side in enumerate(sides):
            got = features[role][i]
            want = formatter([side], role)
            assert got["input_ids"][got["attention_mask"].bool()].tolist() == unpadded_ids(want), (role, CASES[i])
            if "mm_token_type_ids" in got:  # Qwen: what M-RoPE reads; EmbeddingModel derives it alike
                ids = got["input_ids"]
                assert torch.equal(got["mm_token_type_ids"].bool(), ids == formatter.image_token_id)
            if side.image is not None:
                for key in ("pixel_values", "image_sizes", "image_grid_thw"):
                    if key in want:
                        assert torch.equal(got[key], want[key]), (key, role, CASES[i])
            else:
                assert "pixel_values" not in got


@pytest.mark.parametrize("name", [export_name(*e) for e in EXPORTS])
def test_sentence_transformers_encode_equals_llave_embedder(st_results, embedders, images, name):
    st = st_results["exports"][name]
    embedder = embedders[name]
    # Qwen3-VL-Embedding's prompts are its system turns: stripped, ending in punctuation.
    want = {"query": "Find:", "document": "Doc:"} if name.endswith("qwen3_vl_embedding") else \
        {"query": "Find: ", "document": "Doc: "}
    assert st["prompts"] == want
    pairs = {"query": llave_encode(embedder, images, "query"), "document": llave_encode(embedder, images, "target"),
             "plain": llave_encode(embedder, images, "query", instruction="")}
    for key, want in pairs.items():
        diff = (st[key] - want).abs().max(dim=1).values
        print(f"{name} {key}: max |ST - LlaveEmbedder| per row {[f'{d:.1e}' for d in diff.tolist()]}")
        assert diff.max() <= TOL, (key, diff.tolist())
    assert (pairs["query"] - pairs["document"]).abs().max() > 1e-3  # the instructions do matter


@pytest.mark.parametrize("name", [export_name(*e) for e in EXPORTS])
def test_mixed_batches_and_padding_give_the_rows_alone(st_results, embedders, images, name):
    """sentence-transformers: one mixed batch = batches of 3 = one row at a time = left padded;
    LlaveEmbedder (left padding recorded for qwen_chat, right for llave): batch of 16 = one by one."""
    st = st_results["exports"][name]
    diffs = {key: (st[key] - st["query"]).abs().max().item()
             for key in ("query_batches_of_3", "query_one_by_one", "query_left_padded")}
    embedder = embedders[name]
    one_by_one = llave_encode(embedder, images, "query", batch_size=1)
    diffs["llave_embedder_one_by_one"] = (llave_encode(embedder, images, "query") - one_by_one).abs().max().item()
    print(f"{name}: max |difference to the mixed batch| {diffs}")
    assert max(diffs.values()) <= TOL, diffs


# ------------------------------------------------------------------------ Matryoshka sizes

def test_truncate_dim_with_normalize_embeddings_equals_llave_embedder_dim(st_results, embedders, exports, images):
    """sentence-transformers truncates after its Normalize module and does not re-normalise:
    ``truncate_dim=d`` alone gives the whole unit vector's first d dims (norm below 1), with
    ``normalize_embeddings=True`` exactly ``LlaveEmbedder(dim=d)``; cosine scores agree either way."""
    meta = json.loads((exports[MATRYOSHKA_EXPORT] / "llave_embedding.json").read_text())
    assert meta["matryoshka_dims"] == MATRYOSHKA_DIMS
    st = st_results["truncate"]
    whole = st_results["exports"][MATRYOSHKA_EXPORT]["query"]
    embedder = embedders[MATRYOSHKA_EXPORT]
    for d in TRUNCATE_DIMS:
        got = st[d]
        want = llave_encode(embedder, images, "query", dim=d)
        assert got["dimension"] == d and got["normalized"].shape == want.shape == (len(CASES), d)
        for key in ("normalized", "per_call"):
            diff = (got[key] - want).abs().max().item()
            print(f"truncate_dim={d} {key}: max |ST - LlaveEmbedder(dim={d})| {diff:.1e}")
            assert diff <= TOL, (d, key, diff)
        assert torch.equal(got["raw"], whole[:, :d])  # a plain slice of the normalised vector
        assert got["raw"].norm(dim=-1).max() < 1 - 1e-3
        assert (got["similarity"] - want @ want.T).abs().max() <= TOL


# --------------------------------------------------------------- what cannot be reproduced

def test_pinned_differences(st_results, embedders, exports, images):
    """Each difference listed in llave_embedding.json, as it shows."""
    long_row, cut_in_image, exif, cap, bf16 = st_results["extra"]
    # image_row_over_max_length: sentence-transformers cuts the pooled end of the prompt.
    embedder = embedders["llava_onevision-qwen_chat"]
    text = EXTRA[0]["rows"][0][0]
    want = embedder.formatter([Side(text, Image.open(images["a"]).convert("RGB"))], "query")
    tail = embedder.formatter._encode_template(TEMPLATE_TAILS["qwen_chat"])
    assert len(long_row["input_ids"][0]) == MAX_LENGTH and long_row["input_ids"][0][-len(tail):].tolist() != tail
    assert len(unpadded_ids(want)) == MAX_LENGTH and unpadded_ids(want)[-len(tail):] == tail
    ref = embedder.encode(texts=[text], images=[images["a"]], role="query", progress=False)
    assert (long_row["embeddings"] - ref).abs().max() > 1e-3
    # ... and raises when the cut falls among the image tokens; LlaveEmbedder cuts the text.
    assert "Mismatch in `image` token count" in cut_in_image["error"]
    text = EXTRA[1]["rows"][0][0]
    assert embedder.encode(texts=[text], images=[images["a"]], progress=False).shape == (1, 64)

    # exif_orientation: a path is turned by its EXIF tag in sentence-transformers only.
    embedder = embedders["qwen2_vl-llave"]
    ref = embedder.encode(texts=[None], images=[images["exif"]], role="target", progress=False)[0]
    assert (exif["embeddings"][0] - ref).abs().max() > 1e-3                        # path
    assert (exif["embeddings"][1] - ref).abs().max() <= TOL                        # PIL image
    turned = ImageOps.exif_transpose(Image.open(images["exif"])).convert("RGB")
    turned_ref = embedder.encode(texts=[None], images=[turned], role="target", progress=False)[0]
    assert (exif["embeddings"][0] - turned_ref).abs().max() <= TOL

    # llava_image_token_cap: images within the cap agree, larger ones do not.
    embedder = embedders["llava_onevision-cap"]
    fmt = embedder.formatter
    counts = [fmt._llava_image_tokens(*reversed(Image.open(images[k]).size)) for k in ("d", "c")]
    assert counts[0] <= 14 < counts[1]
    ref = embedder.encode(texts=[None, None], images=[images["d"], images["c"]], role="target", progress=False)
    assert (cap["embeddings"][0] - ref[0]).abs().max() <= TOL
    assert (cap["embeddings"][1] - ref[1]).abs().max() > 1e-3

    # dtype: in bfloat16 sentence-transformers' vectors are bfloat16 (pooled and normalised in
    # it); LlaveEmbedder normalises in float32. Both are close to the float32 vectors.
    assert bf16["embeddings"].dtype == torch.bfloat16
    embedder = LlaveEmbedder.from_pretrained(exports["qwen2_vl-qwen_chat"], device="cpu", dtype="bfloat16")
    ref = embedder.encode(texts=["a cat on a mat", None], images=[None, images["a"]], role="query", progress=False)
    assert ref.dtype == torch.float32 and not torch.equal(ref.bfloat16().float(), ref)
    fp32 = embedders["qwen2_vl-qwen_chat"].encode(texts=["a cat on a mat", None], images=[None, images["a"]],
                                                  role="query", progress=False)
    assert (bf16["embeddings"].float() - ref).abs().max() > TOL
    assert (bf16["embeddings"].float() - fp32).abs().max() < 0.05 and (ref - fp32).abs().max() < 0.05


def test_pinned_tokenization_at_prompt_boundaries():
    """A BPE merge across the end of the chat head: content that starts with a line break
    tokenizes differently when the prompt is tokenized whole (sentence-transformers) than
    per segment (LlaveEmbedder); other content is identical."""
    from transformers import Qwen2Tokenizer

    symbols = tiny._byte_symbols()
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({tok: tiny.special_token_id(tok) for tok in tiny.SPECIAL_TOKENS})
    newline = symbols[ord("\n")]
    vocab[newline * 2] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[(newline, newline)], unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", additional_special_tokens=list(tiny.SPECIAL_TOKENS[1:]))
    processor = tiny.build_tiny_processor("qwen2_vl")
    processor.tokenizer = tokenizer
    fmt = InputFormatter(processor, "qwen2_vl")
    template = st_export.chat_template(fmt.metadata(), st_export.image_markup("qwen2_vl", processor))
    for text, same in (("\nstarts with a line break", False), ("inner\n\nbreaks", True), ("plain", True)):
        whole = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                              chat_template=template, sanitize_control_tokens=True, tokenize=True,
                                              return_dict=False)
        assert (list(whole) == unpadded_ids(fmt([Side(text)], "query"))) is same, text


# --------------------------------------------------------------------- the usage snippets

def python_blocks(markdown: str) -> list[str]:
    return [block + "\n" for block in re.findall(r"```python\n(.*?)\n```", markdown, re.S)]


def test_the_three_ways_to_load_run_and_agree(exports, tmp_path, monkeypatch):
    """The model card's snippets (docs/EXPORT.md has the same ones) run as written against
    exports of both backbones and give the same queries, documents and scores."""
    expected = list(st_export.SNIPPETS.values())
    card = (exports["llava_onevision-qwen_chat"] / "README.md").read_text()
    usage = card[card.index("## Usage"):card.index("### Where sentence-transformers differs")]
    assert python_blocks(usage) == expected
    docs = (ROOT / "docs" / "EXPORT.md").read_text()
    section = docs[docs.index("## Three ways to load"):]
    section = section[:section.index("\n## ", 3)]
    assert python_blocks(section) == expected

    noise_image(48, 64, 11).save(tmp_path / "cat.jpg")
    dirs = [str(exports["llava_onevision-qwen_chat"]), str(exports["qwen2_vl-llave"])]
    job = {"snippets": {k: v for k, v in st_export.SNIPPETS.items() if k != "llave-ds"},
           "model_dir": st_export.MODEL_DIR, "dirs": dirs, "cwd": str(tmp_path)}
    (tmp_path / "snippets.json").write_text(json.dumps(job))
    others = run_client(["--snippets", str(tmp_path / "snippets.json")], tmp_path, "snippets")
    assert others["llave_ds_imported"] == []
    monkeypatch.chdir(tmp_path)
    for directory in dirs:
        scope = {}
        exec(st_export.SNIPPET_LLAVE_DS.replace(st_export.MODEL_DIR, directory), scope)
        for name in ("sentence-transformers", "transformers"):
            for key in ("queries", "docs", "scores"):
                diff = (others[(directory, name)][key] - scope[key]).abs().max()
                assert diff <= TOL, (directory, name, key, diff.item())
        assert scope["queries"].shape == (2, 64) and (scope["queries"] - scope["docs"]).abs().max() > 1e-3


def test_no_st_files_when_the_template_would_be_wrong(exports, tmp_path, monkeypatch):
    """A template that does not reproduce the formatter's ids is a bug: the export is still
    written, without the sentence-transformers files, and the metadata says why."""
    monkeypatch.setattr(st_export, "chat_template", lambda fmt, markup: "{{ 'wrong' }}")
    from llave_ds.model.processors import load_processor

    processor = load_processor(exports["qwen2_vl-llave"])
    meta = json.loads((exports["qwen2_vl-llave"] / "llave_embedding.json").read_text())
    meta.pop("sentence_transformers")
    got = st_export.write_sentence_transformers_files(tmp_path, processor, meta)
    assert got["sentence_transformers"]["written"] is False and "probe" in got["sentence_transformers"]["error"]
    assert not (tmp_path / "modules.json").exists()
