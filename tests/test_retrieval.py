"""llave_ds.eval.retrieval_metrics: text-video Recall@K / median rank on hand-computed examples, ties, the split loader."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from llave_ds.eval.retrieval_metrics import (RetrievalDataError, load_retrieval_split, markdown_table, rank_summary,
                                             retrieval_metrics, similarity_matrix, text_to_video_ranks,
                                             video_to_text_ranks)

# One caption per video (MSR-VTT style): rows are captions, columns videos, caption i -> video i.
SIM_1 = np.array([[0.9, 0.1, 0.2],
                  [0.3, 0.2, 0.8],    # its video (1) is last of three
                  [0.1, 0.5, 0.7]])

# Several captions per video (MSVD style), with ties.
GT_M = [0, 0, 1, 2, 2]
SIM_M = np.array([[0.9, 0.5, 0.1],    # c0 -> v0: rank 1
                  [0.2, 0.6, 0.3],    # c1 -> v0: rank 3
                  [0.0, 0.4, 0.4],    # c2 -> v1: tied with v2 (a later index)
                  [0.3, 0.2, 0.7],    # c3 -> v2: rank 1
                  [0.9, 0.1, 0.5]])   # c4 -> v2: rank 2; its 0.9 for v0 ties with v0's best caption c0


def test_one_caption_per_video():
    assert text_to_video_ranks(SIM_1, [0, 1, 2]).tolist() == [1, 3, 1]
    # video 1's caption (0.2) is beaten by caption 2 (0.5); video 2's (0.7) by caption 1 (0.8)
    assert video_to_text_ranks(SIM_1, [0, 1, 2]).tolist() == [1, 2, 2]
    res = retrieval_metrics(SIM_1, [0, 1, 2], ks=(1, 2))
    assert res["t2v"] == {"R@1": pytest.approx(2 / 3), "R@2": pytest.approx(2 / 3), "median_rank": 1.0,
                          "mean_rank": pytest.approx(5 / 3), "num_queries": 3}
    assert res["v2t"]["R@1"] == pytest.approx(1 / 3) and res["v2t"]["R@2"] == 1.0
    assert res["v2t"]["median_rank"] == 2.0 and res["v2t"]["mean_rank"] == pytest.approx(5 / 3)
    assert res["chance_R@1"] == pytest.approx(1 / 3)
    # with one caption per video both video->text protocols agree
    assert video_to_text_ranks(SIM_1, [0, 1, 2], protocol="group").tolist() == [1, 2, 2]


def test_multi_caption_strict_ties():
    assert text_to_video_ranks(SIM_M, GT_M).tolist() == [1, 3, 2, 1, 2]
    # v0: best correct caption c0 (0.9) ties with the wrong c4 -> 2; v1: c2 (0.4) below c0, c1 -> 3;
    # v2: best correct c3 (0.7) is top -> 1
    assert video_to_text_ranks(SIM_M, GT_M).tolist() == [2, 3, 1]
    # group: v0 -> groups {v0: 0.9, v1: 0.0, v2: 0.9}: tie -> 2; v1 -> {0.6, 0.4, 0.2} -> 2 (v0's two
    # captions count once); v2 -> {0.3, 0.4, 0.7} -> 1
    assert video_to_text_ranks(SIM_M, GT_M, protocol="group").tolist() == [2, 2, 1]
    res = retrieval_metrics(SIM_M, GT_M)
    assert res["t2v"]["R@1"] == pytest.approx(0.4) and res["t2v"]["R@5"] == 1.0
    assert res["t2v"]["median_rank"] == 2.0 and res["t2v"]["mean_rank"] == pytest.approx(1.8)
    assert res["v2t"]["R@1"] == pytest.approx(1 / 3) and res["v2t"]["median_rank"] == 2.0
    assert res["num_videos"] == 3 and res["num_captions"] == 5 and res["tie_policy"] == "strict"


def test_multi_caption_first_index_ties():
    assert text_to_video_ranks(SIM_M, GT_M, tie_policy="first").tolist() == [1, 3, 1, 1, 2]
    assert video_to_text_ranks(SIM_M, GT_M, tie_policy="first").tolist() == [1, 3, 1]
    assert video_to_text_ranks(SIM_M, GT_M, tie_policy="first", protocol="group").tolist() == [1, 2, 1]
    res = retrieval_metrics(SIM_M, GT_M, tie_policy="first", return_ranks=True)
    assert res["t2v"]["R@1"] == pytest.approx(0.6) and res["t2v"]["ranks"] == [1, 3, 1, 1, 2]


def test_collapsed_model_scores_nothing_under_strict():
    sim = np.zeros((6, 3))
    gt = [0, 0, 1, 1, 2, 2]
    assert text_to_video_ranks(sim, gt).tolist() == [3] * 6
    assert video_to_text_ranks(sim, gt).tolist() == [5, 5, 5]       # 4 wrong captions tie above
    assert retrieval_metrics(sim, gt)["t2v"]["R@1"] == 0.0
    assert text_to_video_ranks(sim, gt, tie_policy="first").tolist() == [1, 1, 2, 2, 3, 3]


def reference_ranks(sim, gt, tie_policy, protocol):
    """Slow, obvious version: sort candidates by (-score, tie key), find the first correct one."""
    sim = np.asarray(sim, dtype=float)
    num_captions, num_videos = sim.shape
    t2v = []
    for c in range(num_captions):
        order = sorted(range(num_videos), key=lambda v: (-sim[c, v], (v == gt[c]) if tie_policy == "strict" else v))
        t2v.append(order.index(gt[c]) + 1)
    v2t = []
    for v in range(num_videos):
        if protocol == "group":
            cand = [max(sim[c, v] for c in range(num_captions) if gt[c] == g) for g in range(num_videos)]
            correct = {v}
        else:
            cand = list(sim[:, v])
            correct = {c for c in range(num_captions) if gt[c] == v}
        order = sorted(range(len(cand)), key=lambda i: (-cand[i], (i in correct) if tie_policy == "strict" else i))
        v2t.append(min(order.index(i) for i in correct) + 1)
    return t2v, v2t


@pytest.mark.parametrize("tie_policy", ["strict", "first"])
@pytest.mark.parametrize("protocol", ["caption", "group"])
def test_matches_slow_reference_with_many_ties(tie_policy, protocol):
    rng = np.random.default_rng(0)
    for _ in range(20):
        num_videos = int(rng.integers(2, 7))
        gt = list(range(num_videos)) + rng.integers(0, num_videos, size=int(rng.integers(0, 8))).tolist()
        rng.shuffle(gt)
        sim = rng.integers(0, 3, size=(len(gt), num_videos)).astype(float)   # few values: many ties
        t2v, v2t = reference_ranks(sim, gt, tie_policy, protocol)
        assert text_to_video_ranks(sim, gt, tie_policy).tolist() == t2v
        assert video_to_text_ranks(sim, gt, tie_policy, protocol).tolist() == v2t


def test_torch_inputs_and_similarity_matrix():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    video = torch.tensor([[0.0, 3.0], [4.0, 0.0]])
    sim = similarity_matrix(text, video, normalize=True)
    assert np.allclose(sim, [[0.0, 1.0], [1.0, 0.0]])
    res = retrieval_metrics(torch.tensor(sim, dtype=torch.bfloat16), torch.tensor([1, 0]))
    assert res["t2v"]["R@1"] == 1.0 and res["v2t"]["R@1"] == 1.0
    table = markdown_table(res)
    assert "| text→video | 100.0 | 100.0 | 100.0 | 1 | 1.0 | 2 |" in table
    assert "video→text protocol: caption" in table


def test_input_errors():
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics([[0.1, float("nan")], [0.2, 0.3]], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(SIM_1, [0, 1, 3])
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_metrics(SIM_1, [0, 1])
    with pytest.raises(ValueError, match="no caption"):
        video_to_text_ranks(SIM_1, [0, 0, 2])
    with pytest.raises(ValueError, match="tie_policy"):
        retrieval_metrics(SIM_1, [0, 1, 2], tie_policy="optimistic")
    with pytest.raises(ValueError, match="protocol"):
        video_to_text_ranks(SIM_1, [0, 1, 2], protocol="mean")
    with pytest.raises(ValueError, match="K must be"):
        rank_summary([1, 2], ks=(0,))


# --------------------------------------------------------------------------- loader

@pytest.fixture
def videos(tmp_path):
    d = tmp_path / "vids"
    d.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (d / name).write_bytes(b"x")
    return d


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_load_jsonl_lists_and_rows_per_caption(tmp_path, videos):
    path = write_jsonl(tmp_path / "test.jsonl", [
        {"video": "vids/a.mp4", "captions": ["a one", "a two"]},
        {"video": "vids/b.mp4", "caption": "b one", "extra": 1},
        {"video": "vids/a.mp4", "captions": ["a three"]},          # merged into a
        "",                                                         # blank lines are skipped
        {"video": str(videos / "c.mp4"), "captions": ["c one"]},    # absolute path kept
    ])
    split = load_retrieval_split(path)
    assert split.videos == [str(videos / n) for n in ("a.mp4", "b.mp4", "c.mp4")]
    assert split.captions == ["a one", "a two", "b one", "a three", "c one"]
    assert split.caption_to_video.tolist() == [0, 0, 1, 0, 2]
    assert split.captions_of(0) == ["a one", "a two", "a three"] and split.num_videos == 3


def test_load_csv_with_custom_columns_and_pattern(tmp_path, videos):
    path = tmp_path / "msrvtt.csv"
    path.write_text('key,video_id,sentence\n1,a,"a man, cooking"\n2,b,b text\n3,a,a again\n', encoding="utf-8")
    split = load_retrieval_split(str(path), video_column="video_id", caption_column="sentence",
                                 video_pattern="{}.mp4", video_root=str(videos))
    assert split.videos == [str(videos / "a.mp4"), str(videos / "b.mp4")]
    assert split.captions == ["a man, cooking", "b text", "a again"]
    assert split.caption_to_video.tolist() == [0, 1, 0] and split.video_keys == ["a", "b"]
    plain = tmp_path / "plain.csv"
    plain.write_text("video,caption\nvids/c.mp4,c text\n", encoding="utf-8")
    assert load_retrieval_split(str(plain)).captions == ["c text"]


@pytest.mark.parametrize("rows,where", [
    ([{"video": "vids/a.mp4", "captions": ["ok"]}, "{not json"], "line 2: not valid JSON"),
    ([{"video": "vids/a.mp4", "captions": ["ok"]}, {"video": "vids/b.mp4"}], "line 2: no caption field"),
    ([{"captions": ["x"]}], "line 1: no video field"),
    ([{"video": "vids/a.mp4", "captions": ["ok", ""]}], "line 1, field 'captions'[1]"),
    ([{"video": "vids/a.mp4", "captions": []}], "line 1, field 'captions'"),
    ([{"video": "", "captions": ["x"]}], "line 1, field 'video'"),
    ([{"video": "vids/a.mp4", "caption": "x"}, {"video": "vids/zzz.mp4", "caption": "y"}],
     "line 2, field 'video': video not found"),
    ([["a", "b"]], "line 1: expected a JSON object"),
    ([], "no rows"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, videos, rows, where):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RetrievalDataError) as e:
        load_retrieval_split(path)
    assert path in str(e.value) and where in str(e.value)


def test_csv_and_format_errors(tmp_path, videos):
    bad = tmp_path / "bad.csv"
    bad.write_text("clip,caption\nvids/a.mp4,x\n", encoding="utf-8")
    with pytest.raises(RetrievalDataError, match="no video field") as e:
        load_retrieval_split(str(bad))
    assert str(bad) in str(e.value)
    wide = tmp_path / "wide.csv"
    wide.write_text("video,caption\nvids/a.mp4,x\nvids/b.mp4,y,z\n", encoding="utf-8")
    with pytest.raises(RetrievalDataError, match="line 3: more values"):
        load_retrieval_split(str(wide))
    empty_caption = tmp_path / "empty.csv"
    empty_caption.write_text("video,caption\nvids/a.mp4,\n", encoding="utf-8")
    with pytest.raises(RetrievalDataError, match="line 2, field 'caption'"):
        load_retrieval_split(str(empty_caption))
    with pytest.raises(RetrievalDataError, match="unsupported split format"):
        load_retrieval_split(str(tmp_path / "x.tsv"))
    with pytest.raises(RetrievalDataError, match="not found"):
        load_retrieval_split(str(tmp_path / "missing.jsonl"))
    assert load_retrieval_split(write_jsonl(tmp_path / "ok.jsonl", [{"video": "nope.mp4", "caption": "x"}]),
                                check_files=False).num_captions == 1


def test_retrieval_error_pickles():
    err = RetrievalDataError("f.jsonl, line 2: bad", path="f.jsonl", line=2, field_name="video")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.path, back.line, back.field) == (str(err), "f.jsonl", 2, "video")
