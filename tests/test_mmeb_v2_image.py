"""MMEB-V2 image tasks (issue 26): the official parsers' texts and candidate names by hand,
the reader on the synthetic MMEB_Test_Instruct layout, and ``--modalities image`` end to end
(rankings equal to a brute-force ranking of the same embeddings)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llave_ds.eval import mmeb_v2_image as image
from llave_ds.toy import synthetic_mmeb_v2
from tests.multimodal import brute_force_embeddings

IMG = image.IMAGE


def row(**kw):
    base = dict(qry_inst="", qry_text="", qry_img_path="q.png", tgt_inst="", tgt_text=[], tgt_img_path=[])
    return {**base, **kw}


def test_query_texts_follow_the_official_parsers():
    r = row(qry_inst="<|image_1|> Represent the given image for classification", qry_text="")
    assert image.query_text("image_cls", "ImageNet-1K", r) == (f"{IMG}  Represent the given image for "
                                                                "classification\n", True)
    r = row(qry_inst="<|image_1|> Represent the image with the question:\n", qry_text="What is it?")
    assert image.query_text("image_qa", "OK-VQA", r) == (f"{IMG}\nRepresent the image with the question: "
                                                          "What is it?\n", True)
    r = row(qry_inst="Find an image matching:", qry_text="a dog", qry_img_path="")
    assert image.query_text("image_t2i", "MSCOCO_t2i", r) == ("Find an image matching: a dog\n", False)
    assert image.query_text("image_t2i", "VisDial", r) == ("Find an image matching: a dog\n\n", False)


def test_candidates_and_their_names_follow_the_official_parsers():
    assert image.candidates("image_cls", row(tgt_text=["dog", "cat"])) == [("dog", "dog", None), ("cat", "cat", None)]
    t2i = image.candidates("image_t2i", row(tgt_inst="<|image_1|> Represent the image.", tgt_text=["", ""],
                                            tgt_img_path=["a.png", "b.png"]))
    assert t2i == [("a.png", f"{IMG}  Represent the image.\n", "a.png"),
                   ("b.png", f"{IMG}  Represent the image.\n", "b.png")]
    webqa = image.candidates("image_t2i", row(tgt_inst="Represent:", tgt_text=["first", "second"],
                                              tgt_img_path=["a.png", "b.png"]))
    assert webqa[1] == ("b.png", f"{IMG} Represent: second\n", "b.png")
    vg = image.candidates("image_i2i_vg", row(tgt_inst="<|image_1|> Select:", tgt_text=['"the cup"', '"the cup"'],
                                              tgt_img_path=["x.png", "y.png"]))
    assert [n for n, _, _ in vg] == ["x.png:the cup", "y.png:the cup"] and vg[0][1] == f'{IMG}  Select: "the cup"\n'
    cirr = image.candidates("image_i2i_vg", row(tgt_inst="Represent the given image.", tgt_text=["", ""],
                                                tgt_img_path=["x.png", "y.png"]))
    assert cirr[0] == ("x.png:", f"{IMG} Represent the given image.", "x.png")   # no trailing newline here


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_mmeb_v2.write_world(tmp_path_factory.mktemp("v2img") / "data", tasks=(), video_tasks=())


def test_reader_on_the_download_layout(world, tmp_path):
    t = image.load_image_task(world, "RefCOCO-Matching")
    assert len(t.query_items) == 6 and t.query_items[0][1] == "RefCOCO-Matching/img_0.png"
    assert t.infos[0]["cand_names"][0] == "RefCOCO-Matching/img_0.png:the alpha word"
    assert len(set(t.pool_ids)) == len(t.pool_ids) and t.pool_ids[:4] == t.infos[0]["cand_names"]
    side = t.candidates[0]
    assert side.error is None and side.image.size == (32, 32)
    cls = image.load_image_task(world, "ImageNet-1K")
    assert cls.pool_ids[:4] == ["alpha", "bravo", "charlie", "delta"] and cls.candidates[0].image is None
    with pytest.raises(image.ImageTaskError, match=r"VOC2007: no download found; looked for .*MMEB_Test_Instruct"):
        image.load_image_task(world, "VOC2007")
    broken = image.load_image_task(world, "CIRR", image_root=str(tmp_path))
    bad = broken.queries[0]
    assert bad.error and "MMEB-V2 task CIRR: query 0 (CIRR/img_0.png)" in bad.error


def test_image_tasks_end_to_end(world, tmp_path, capsys):
    from llave_ds.eval.cli import main
    from llave_ds.model.embedder import LlaveEmbedder
    from llave_ds.toy.tiny import build_tiny_model_dir

    model = str(build_tiny_model_dir(tmp_path / "tiny", "llava_onevision", seed=5))
    scores = tmp_path / "scores"
    assert main(["--benchmark", "mmeb-v2", "--model", model, "--data", str(world), "--scores-dir", str(scores),
                 "--modalities", "image", "--batch-size", "4", "--num-workers", "0", "--no-progress"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["num_tasks"] == 7 and 0 <= last["image"] <= 1 and last["visdoc"] is None
    t = image.load_image_task(world, "WebQA")
    preds = [json.loads(x) for x in (scores / "WebQA_pred.jsonl").read_text().splitlines()]
    emb = LlaveEmbedder.from_pretrained(model, device="cpu")
    q, c = brute_force_embeddings(emb, t)
    lookup = dict(zip(t.pool_ids, c))
    for p, qe, info in zip(preds, q, t.infos):
        names = info["cand_names"]
        want = [names[i] for i in np.argsort(-(np.stack([lookup[n] for n in names]) @ qe))]
        assert p["prediction"] == want and p["label"] == [names[0]]
    record = json.loads((scores / "WebQA_score.json").read_text())
    assert record["hit@1"] == np.mean([p["prediction"][0] == p["label"][0] for p in preds])
