"""MMEB-V2 video retrieval tasks (issue 26): the official frame rule, the reader on the
download layout (per-task columns, frame folders), clear errors, and ``--modalities video``
end to end with a tiny model (rankings equal to a brute-force ranking of the same embeddings)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llave_ds.eval import mmeb_v2_video as video
from llave_ds.eval.mmeb_v2_tasks import TASKS
from llave_ds.toy import synthetic_mmeb_v2
from tests.multimodal import brute_force_embeddings


def test_official_frame_rule():
    assert video.official_frame_indices(64) == [0, 9, 18, 27, 36, 45, 54, 63]   # linspace(0, 63, 8) as int
    assert video.official_frame_indices(12) == [0, 1, 3, 4, 6, 7, 9, 11]
    assert video.official_frame_indices(8) == list(range(8))
    assert video.official_frame_indices(5) == list(range(5))                     # fewer: every frame
    assert video.official_frame_indices(0) == []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_mmeb_v2.write_world(tmp_path_factory.mktemp("v2video") / "data", tasks=(), image_tasks=())


def test_reader_on_the_download_layout(world):
    msvd = video.load_video_task(world, "MSVD")
    assert msvd.query_items[0][0] == "Find the video snippet that corresponds to the given summary: a red square moving right"
    assert msvd.infos[0] == {"cand_names": ["video0"], "label_name": "video0"} and msvd.pool_ids[:2] == ["video0", "video1"]
    didemo = video.load_video_task(world, "DiDeMo")             # the name comes from the file
    assert didemo.pool_ids[0] == "video0"
    side = didemo.candidates[0]
    assert side.error is None and len(side.video) == 8 and side.text == video.CANDIDATE_TEXT
    with pytest.raises(video.VideoTaskError, match=r"VATEX: no download found; looked for test-\*.parquet"):
        video.load_video_task(world, "VATEX")
    assert video.READABLE == {t.name for t in TASKS.values() if t.modality == "video"}   # all 18
    with pytest.raises(video.VideoTaskError, match="ImageNet-1K: not a video task"):
        video.task_dir(world, "ImageNet-1K")


def test_classification_pools_are_the_official_label_lists(world):
    labels = video.official_labels()["labels"]
    assert {k: len(v) for k, v in labels.items()} == {"K700": 700, "SmthSmthV2": 174, "UCF101": 101, "HMDB51": 51,
                                                       "Breakfast": 10}
    hmdb = video.load_video_task(world, "HMDB51")
    # the rows' labels first (row order), then the rest of the official list: every label a candidate
    assert hmdb.pool_ids[:3] == labels["HMDB51"][:3] and sorted(hmdb.pool_ids) == sorted(labels["HMDB51"])
    assert hmdb.query_items[0] == ("<|video_1|> " + video.official_labels()["instructions"]["HMDB51"], "1000")
    assert hmdb.infos[1] == {"cand_names": [labels["HMDB51"][1]], "label_name": labels["HMDB51"][1]}
    assert len(hmdb.queries[0].video) == 8 and hmdb.candidates[0].video is None
    ssv2 = video.load_video_task(world, "SmthSmthV2")   # local: each row's own options
    assert len(ssv2.infos[0]["cand_names"]) == 4 and ssv2.infos[0]["label_name"] in ssv2.infos[0]["cand_names"]
    assert len(ssv2.pool_ids) < 174


def test_a_missing_video_is_one_clear_error(world, tmp_path):
    vt = video.load_video_task(world, "MSR-VTT", image_root=str(tmp_path))   # frames looked for elsewhere
    side = vt.candidates[0]
    assert "MMEB-V2 task MSR-VTT: video 'video0': neither a frame folder" in side.error


def test_video_retrieval_end_to_end(world, tmp_path, capsys):
    from llave_ds.eval.cli import main
    from llave_ds.model.embedder import LlaveEmbedder
    from llave_ds.toy.tiny import build_tiny_model_dir

    model = str(build_tiny_model_dir(tmp_path / "tiny", "qwen2_vl", seed=7))
    scores = tmp_path / "scores"
    assert main(["--benchmark", "mmeb-v2", "--model", model, "--data", str(world), "--scores-dir", str(scores),
                 "--modalities", "video", "--batch-size", "2", "--num-workers", "0", "--no-progress"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["num_tasks"] == 12 and 0 <= last["video"] <= 1
    mvbench = [json.loads(x) for x in (scores / "MVBench_pred.jsonl").read_text().splitlines()]
    assert len(mvbench) == 30 and mvbench[0]["label"] == ["(B) right"]
    assert sorted(mvbench[0]["prediction"]) == ["(A) left", "(B) right", "(C) up"]   # its own options
    t = video.load_video_task(world, "MSR-VTT")
    preds = [json.loads(x) for x in (scores / "MSR-VTT_pred.jsonl").read_text().splitlines()]
    emb = LlaveEmbedder.from_pretrained(model, device="cpu")
    q, c = brute_force_embeddings(emb, t)
    assert [p["prediction"] for p in preds] == [[t.pool_ids[i] for i in np.argsort(-row)] for row in q @ c.T]


def test_qa_rows_are_written_as_the_official_parsers_write_them():
    head = f"<|video_1|> {video.QA_PROMPT} "
    text, folder, names, shown, answer = video.qa_row("NExTQA", {"video": 42, "question": "why?", "answer": 1,
                                                                 **{f"a{i}": f"o{i}" for i in range(5)}})
    assert text == head + "why?\nOptions:\n(A) o0\n(B) o1\n(C) o2\n(D) o3\n(E) o4"
    assert (folder, names, shown, answer) == ("42", ["o0", "o1", "o2", "o3", "o4"], ["o0", "o1", "o2", "o3", "o4"], "o1")
    text, folder, names, shown, answer = video.qa_row("EgoSchema", {"video_idx": "v", "question": "what?",
                                                                    "answer": "2", "option": ["A. x y", "B. z", "C. w"]})
    assert text == head + "what?A. x y B. z C. w"     # the official join: no space after the question
    assert names == ["A. x y", "B. z", "C. w"] and shown == ["x y", "z", "w"] and answer == "C. w"
    text, _, names, shown, answer = video.qa_row("Video-MME", {"videoID": "v", "question": "Q?", "answer": "B",
                                                               "options": ["A. one", "B. two"]})
    assert text == head + "Q?\nA. one\nB. two" and answer == "B. two" and shown == ["one", "two"]
    text, folder, names, _, answer = video.qa_row("ActivityNetQA", {"video_name": "abc", "question": "is it red",
                                                                    "answer": "no"})
    assert text == head + "is it red? (A) yes; (B) no." and folder == "v_abc" and names == ["yes", "no"]


def test_qa_tasks_on_the_download_layout(world, tmp_path):
    ego = video.load_video_task(world, "EgoSchema")
    assert ego.infos[0] == {"cand_names": ["A. up", "B. down", "C. left", "D. right"], "label_name": "D. right"}
    assert ego.pool_items[0] == ("up", None) and ego.query_items[0][1] == "egoschema0"
    assert len(ego.queries[0].video) == 8 and ego.candidates[0].video is None
    anet = video.load_video_task(world, "ActivityNetQA")
    assert anet.pool_ids == ["yes", "no"] and anet.query_items[0][1] == "v_activitynetqa0"
    missing = video.load_video_task(world, "NExTQA", image_root=str(tmp_path)).queries[0]
    assert "no frame folder" in missing.error and "frame folders only" in missing.error


def test_moment_retrieval_candidates_are_the_clip_folders(world, tmp_path):
    qv = video.load_video_task(world, "QVHighlight")
    assert qv.query_items[0] == (f"<|video_1|> {video.MOMENT_QUERY} the square moving right", "moment0/query")
    assert qv.infos[0] == {"cand_names": ["moment0/negative_0", "moment0/negative_1", "moment0/negative_2",
                                          "moment0/positive_0"], "label_name": "moment0/positive_0"}
    assert len(qv.queries[0].video) == 8 and len(qv.candidates[0].video) == 4     # a 4-frame clip: all of it
    assert qv.task.eval_type == "local"
    with pytest.raises(video.VideoTaskError, match=r"QVHighlight: .* row 0: .*moment0 needs a query/ frame folder"):
        video.load_video_task(world, "QVHighlight", image_root=str(tmp_path))


def test_moment_seeker_queries_of_three_kinds_and_several_positives(world):
    ms = video.load_video_task(world, "MomentSeeker")
    texts = [t for t, _ in ms.query_items]
    assert texts[0] == f"{video.SEEKER_QUERY['text']} the square moving right" and ms.query_items[0][1] is None
    assert texts[1].startswith("<|image_1|> " + video.SEEKER_QUERY["image"]) and ms.queries[1].image is not None
    assert texts[2].startswith("<|video_1|> " + video.SEEKER_QUERY["video"]) and len(ms.queries[2].video) == 8
    assert ms.infos[1]["label_name"] == ["video_frames/src1_clip_0", "video_frames/src1_clip_1"]   # two relevant
    assert ms.infos[1]["cand_names"][:2] == ms.infos[1]["label_name"] and len(ms.infos[1]["cand_names"]) == 5
    assert ms.candidates[0].text == video.SEEKER_CANDIDATE_TEXT and len(ms.candidates[0].video) == 6


def test_mvbench_rows_are_written_as_the_official_template_writes_them():
    head = f"<|video_1|> {video.QA_PROMPT} "
    text, key, names, answer = video.mvbench_row("action_antonym", {
        "video": "166583.webm", "question": "What is the action performed by the person in the video?",
        "candidates": ["Not sure", "Scattering something down", "Piling something up"],
        "answer": "Piling something up"})
    assert text == (head + "What is the action performed by the person in the video?\nOptions:\n"
                    "(A) Not sure\n(B) Scattering something down\n(C) Piling something up")
    assert key == "action_antonym/166583.webm"
    assert names == ["(A) Not sure", "(B) Scattering something down", "(C) Piling something up"]
    assert answer == "(C) Piling something up"
    # the official loop keeps the last matching candidate; an answer that is none of them gets "@"
    assert video.mvbench_row("s", {"video": "v.mp4", "question": "Q", "candidates": ["x", "y", "x"],
                                   "answer": "x"})[3] == "(C) x"
    assert video.mvbench_row("s", {"video": "v.mp4", "question": "Q", "candidates": ["x", "y"],
                                   "answer": "z"})[3] == "(@) z"


def test_mvbench_reads_the_twenty_sub_datasets_in_the_official_order(world, tmp_path):
    mv = video.load_video_task(world, "MVBench")
    assert mv.task.eval_type == "local" and len(mv.query_items) == 30      # 10 sub-datasets of 2 rows, 10 of 1
    order = [key.split("/")[0] for _, key in mv.query_items]
    assert order == [s for k, s in enumerate(video.MVBENCH_SUBSETS) for _ in range(1 + (k % 2 == 0))]
    assert mv.query_items[0] == (f"<|video_1|> {video.QA_PROMPT} Where does the square go?\nOptions:\n"
                                 "(A) left\n(B) right\n(C) up", "episodic_reasoning/clip0.mp4")
    assert mv.query_items[1][1] == mv.query_items[0][1]                     # two questions, one video
    assert mv.infos[2] == {"cand_names": ["(A) left", "(B) right", "(C) up", "(D) down"], "label_name": "(A) left"}
    assert mv.pool_items[:2] == [("(A) left", None), ("(B) right", None)]
    folder, file = mv.sources["action_sequence/clip1.mp4"]
    assert folder == str(world / "video-tasks" / "frames" / "video_qa" / "MVBench" / "action_sequence" / "clip1.mp4")
    assert file == ""                                                       # frame folders only
    assert len(mv.queries[0].video) == 8 and mv.candidates[0].video is None  # 8 of the folder's 9 frames
    missing = video.load_video_task(world, "MVBench", image_root=str(tmp_path)).queries[0]
    assert "no frame folder" in missing.error and "MVBench/episodic_reasoning/clip0.mp4" in missing.error


def test_mvbench_bad_downloads_are_clear_errors(tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    synthetic_mmeb_v2.write_video_task(tmp_path, "MVBench")
    base = tmp_path / "VLM2Vec" / "MVBench"
    pq.write_table(pa.Table.from_pylist([{"video": "a.mp4", "question": "Q", "candidates": ["x", "y"], "answer": "x"},
                                         {"video": "a.mp4", "question": "Q", "candidates": ["x", "y"],
                                          "answer": "z"}]), base / "state_change" / "train-00000-of-00001.parquet")
    with pytest.raises(video.VideoTaskError, match=r"MVBench: sub-dataset state_change: .*state_change.*"
                                                   r"train-00000-of-00001.parquet row 1: answer 'z' is not one of "
                                                   r"the candidates \['x', 'y'\]"):
        video.load_video_task(tmp_path, "MVBench")
    shutil.rmtree(base / "action_sequence")
    with pytest.raises(video.VideoTaskError, match=r"MVBench: sub-dataset action_sequence: no train-\*.parquet in "
                                                   r".*VLM2Vec/MVBench/action_sequence"):
        video.load_video_task(tmp_path, "MVBench")
    shutil.rmtree(base)
    with pytest.raises(video.VideoTaskError, match=r"MVBench: no download found; looked for <sub-dataset>/train-"):
        video.task_dir(tmp_path, "MVBench")


def test_a_video_name_that_leaves_the_media_root_is_refused(world, tmp_path):
    """A dataset column naming ``../`` (or an absolute path) must not reach outside the media
    root: the training readers' rule, named with the task and the video."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    data = tmp_path / "data"
    shutil.copytree(world, data, symlinks=True)
    directory = video.task_dir(data, "MSR-VTT")
    files = sorted(directory.glob("test-*.parquet"))
    table = pq.read_table(files[0]).to_pylist()
    table[1]["video_id"] = "../../../../../../outside"   # up past the media root
    pq.write_table(pa.Table.from_pylist(table), files[0])
    with pytest.raises(video.VideoTaskError, match=r"MSR-VTT: video '(\.\./)+outside'.*outside the image root"):
        video.load_video_task(data, "MSR-VTT")
    assert video.load_video_task(world, "MSR-VTT").pool_ids   # the download as it is loads
