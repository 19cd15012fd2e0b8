"""`llave-ds eval --task video-retrieval`: the pipeline with a stand-in embedder (roles,
instructions, the similarity matrix and both directions), and the CLI's errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llave_ds.eval.cli import main as eval_main
from llave_ds.eval.retrieval_metrics import load_retrieval_split
from llave_ds.eval.video_retrieval import evaluate_video_retrieval


class StandIn:
    """Embeds a caption as the one-hot of the video it names, a video as its own one-hot;
    records what it was asked."""

    def __init__(self, videos, confuse=None):
        self.videos = [str(v) for v in videos]
        self.confuse = confuse or {}  # caption -> the video it is (wrongly) closest to
        self.calls = []

    def encode_sides(self, sides, role, instruction=None, batch_size=16, progress=True):
        self.calls.append((role, instruction, len(sides)))
        out = torch.zeros(len(sides), len(self.videos))
        for i, side in enumerate(sides):
            if getattr(side, "video", None) is not None:
                out[i, self.videos.index(str(side.video))] = 1.0
            else:
                target = self.confuse.get(side.text, side.text.split()[-1])
                out[i, [Path_name(v) for v in self.videos].index(target)] = 1.0
        return out


def Path_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".")[0]


@pytest.fixture
def split_file(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.mp4").write_bytes(b"x")
    rows = [{"video": "a.mp4", "captions": ["clip a", "also a"]}, {"video": "b.mp4", "caption": "clip b"},
            {"video": "c.mp4", "captions": ["clip c"]}]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_both_directions_from_one_similarity_matrix(split_file):
    split = load_retrieval_split(str(split_file))
    embedder = StandIn(split.videos, confuse={"clip c": "b"})
    result = evaluate_video_retrieval(embedder, split, text_instruction="Find the video: ", progress=False)
    # captions are the query role (with the given instruction), videos the target role
    assert embedder.calls == [("query", "Find the video: ", 4), ("target", None, 3)]
    # 'clip c' points at video b: the one miss among the four captions
    assert result["t2v"]["R@1"] == pytest.approx(3 / 4)
    assert result["t2v"]["num_queries"] == 4 and result["v2t"]["num_queries"] == 3
    # video b: its caption 'clip b' ties with the confused 'clip c' (strict: ranked 2nd); video c:
    # no caption scores above 0 for it (last); video a: first
    assert result["v2t"]["R@1"] == pytest.approx(1 / 3)
    assert result["num_videos"] == 3 and result["chance_R@1"] == pytest.approx(1 / 3)
    assert result["split"] == str(split_file)


def test_a_perfect_embedder_scores_one_and_a_collapsed_one_zero(split_file):
    split = load_retrieval_split(str(split_file))
    perfect = evaluate_video_retrieval(StandIn(split.videos), split, progress=False)
    assert perfect["t2v"]["R@1"] == perfect["v2t"]["R@1"] == 1.0 and perfect["t2v"]["median_rank"] == 1

    class Collapsed(StandIn):
        def encode_sides(self, sides, role, **kw):
            return torch.ones(len(sides), 4) / 2.0

    collapsed = evaluate_video_retrieval(Collapsed(split.videos), split, progress=False)
    assert collapsed["t2v"]["R@1"] == 0.0 and collapsed["v2t"]["R@1"] == 0.0  # strict ties by default
    assert np.isclose(collapsed["similarity"]["std"], 0.0)


def test_dims_score_each_prefix_from_the_same_embeddings(split_file, capsys):
    """``dims=[2, "full"]``: the full size is the plain result; size 2 is the metrics of the
    first two coordinates re-normalised by hand (video c's one-hot has no mass there: it
    scores 0 against every caption and ranks last, strict ties)."""
    from llave_ds.eval.retrieval_metrics import retrieval_metrics

    split = load_retrieval_split(str(split_file))
    result = evaluate_video_retrieval(StandIn(split.videos), split, progress=False, dims=[2, "full"])
    assert list(result["by_dim"]) == ["2", "3"]
    assert result["by_dim"]["3"]["t2v"] == result["t2v"] and result["by_dim"]["3"]["v2t"] == result["v2t"]
    stand_in = StandIn(split.videos)
    t = stand_in.encode_sides([type("S", (), {"text": c})() for c in split.captions], "query")[:, :2].numpy()
    v = np.eye(3)[:, :2]
    norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    want = retrieval_metrics(norm(t) @ norm(v).T, split.caption_to_video)
    assert result["by_dim"]["2"]["t2v"] == want["t2v"] and result["by_dim"]["2"]["v2t"] == want["v2t"]
    assert result["by_dim"]["2"]["t2v"]["R@1"] == pytest.approx(3 / 4)    # 'clip c' is lost at size 2
    with pytest.raises(ValueError, match="at most 3"):
        evaluate_video_retrieval(StandIn(split.videos), split, progress=False, dims=[4])
    assert eval_main(["--benchmark", "mmeb-v2", "--scores-dir", "x", "--dims", "64,full"]) == 2
    assert "--dims is not built for --benchmark mmeb-v2" in capsys.readouterr().err


def test_cli_names_the_bad_split_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code = eval_main(["--task", "video-retrieval", "--model", str(tmp_path), "--data", str(missing)])
    assert code == 2
    assert f"{missing}: split file not found" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "gone.mp4", "caption": "x"}) + "\n")
    assert eval_main(["--task", "video-retrieval", "--model", str(tmp_path), "--data", str(bad)]) == 2
    assert "line 1, field 'video': video not found" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", ["llava_onevision", "qwen2_vl"])
def test_one_command_on_synthetic_videos_with_a_tiny_model(tmp_path, backbone, capsys):
    """Synthetic mp4 clips -> `llave-ds eval --task video-retrieval` -> R@1/5/10 per direction,
    with the numbers recomputed here from the model's own embeddings."""
    from llave_ds.eval.retrieval_metrics import retrieval_metrics, similarity_matrix
    from llave_ds.model.embedder import LlaveEmbedder, Side
    from llave_ds.toy.synthetic_video import generate_synthetic_videos
    from llave_ds.toy.tiny import build_tiny_model_dir

    model = build_tiny_model_dir(tmp_path / "model", backbone)
    videos = generate_synthetic_videos(tmp_path / "data", num_test=6, num_train_per_subset=0, seed=1)
    out = tmp_path / "res.json"
    assert eval_main(["--task", "video-retrieval", "--model", str(model), "--data", videos.test_file,
                      "--out", str(out), "--no-progress", "--batch-size", "4"]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "video-retrieval" and result["num_videos"] == 6 and result["num_captions"] == 6
    assert set(result["t2v"]) >= {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
    assert "| text→video |" in out.with_suffix(".md").read_text() and "| video→text |" in capsys.readouterr().out

    split = load_retrieval_split(videos.test_file)
    embedder = LlaveEmbedder.from_pretrained(model, device="cpu")
    text = embedder.encode_sides([Side(text=c) for c in split.captions], role="query", progress=False)
    video = embedder.encode_sides([Side(video=v) for v in split.videos], role="target", progress=False)
    want = retrieval_metrics(similarity_matrix(text.numpy(), video.numpy()), split.caption_to_video)
    for direction in ("t2v", "v2t"):
        for key in ("R@1", "R@5", "R@10", "median_rank"):
            assert result[direction][key] == pytest.approx(want[direction][key]), (direction, key)
