"""``llave-ds mine`` (issue 28): the exact blocked search against numpy, the positive-aware
selection rule on hand-made candidate lists, and the whole command on the synthetic task
(the one-attribute neighbours are found, copies of the positive never are, 1 and 2 ranks
write the same files, a killed run resumes to the same files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llave_ds.mine.search import topk_blocks
from llave_ds.mine.select import MineConfig, select_negatives, side_keys


def reference_topk(q, c, k):
    """numpy: the full score matrix, sorted by (score descending, id ascending), cut at k."""
    s = q.astype(np.float32) @ c.astype(np.float32).T
    ids = np.lexsort((np.broadcast_to(np.arange(c.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.mark.parametrize("n,block,k", [(50, 7, 5), (50, 50, 10), (13, 4, 13), (9, 3, 20)])
def test_blocked_search_equals_the_full_sort(n, block, k):
    rng = np.random.default_rng(n + block + k)
    q = rng.standard_normal((11, 8)).astype(np.float32)
    c = rng.standard_normal((n, 8)).astype(np.float32)
    got_s, got_i = topk_blocks(q, [c[i:i + block] for i in range(0, n, block)], k, query_block=4)
    want_s, want_i = reference_topk(q, c, k)
    assert got_i.shape == (11, min(k, n))
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-6)


def test_blocked_search_breaks_ties_by_the_lower_id_across_blocks():
    """Equal scores straddling block boundaries and the k cut: the lower ids win, as in a
    stable full sort, whatever the blocking."""
    c = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.5, 0.5], [1, 0], [0, 1]], dtype=np.float32)
    q = np.array([[1, 0], [0, 1]], dtype=np.float32)
    for block in (1, 2, 3, 7):
        _, ids = topk_blocks(q, [c[i:i + block] for i in range(0, len(c), block)], 3)
        np.testing.assert_array_equal(ids, [[0, 2, 3], [1, 6, 4]])
    with pytest.raises(ValueError, match="width 3"):
        topk_blocks(q, [np.zeros((2, 3), np.float32)], 1)


def test_copies_of_the_positive():
    assert side_keys("a cat", "img/1.png") & side_keys("another caption", "img/1.png")   # same image file
    assert side_keys("  a cat ") & side_keys("a cat")                                    # same text, text only
    assert not side_keys("a cat", "img/1.png") & side_keys("a cat", "img/2.png")         # same text, other image
    assert not side_keys("a cat") & side_keys("a cat", "img/1.png")


def test_selection_rule_on_a_hand_made_list():
    ids = [10, 11, 12, 13, 14, 15, 16, 17]
    scores = [0.99, 0.90, 0.86, 0.80, 0.70, 0.60, 0.50, 0.40]
    copy = [False, True, False, False, False, False, False, False]
    cfg = MineConfig(num_negatives=2, depth=8, margin_kind="relative", margin=0.95)
    chosen, why = select_negatives(ids, scores, 0.9, copy, cfg, query_index=0)
    # ceiling 0.855: 10 (0.99) and 12 (0.86) are likely false negatives, 11 is a copy
    assert chosen == [13, 14]
    assert dict(why) == {"copy": 1, "above_margin": 2, "outside_window": 0, "kept": 2, "not_needed": 3}
    absolute = MineConfig(num_negatives=2, depth=8, margin_kind="absolute", margin=0.05)
    assert select_negatives(ids, scores, 0.9, copy, absolute, 0)[0] == [13, 14]   # ceiling 0.85
    none = MineConfig(num_negatives=2, depth=8, margin_kind="none")
    assert select_negatives(ids, scores, 0.9, copy, none, 0)[0] == [10, 12]
    window = MineConfig(num_negatives=2, depth=8, margin_kind="none", skip_top=2, window=3)
    chosen, why = select_negatives(ids, scores, 0.9, copy, window, 0)
    assert chosen == [13, 14] and why["outside_window"] == 4 and why["not_needed"] == 1   # ranks 2-4: 13, 14, 15
    short = MineConfig(num_negatives=3, depth=8, margin_kind="relative", margin=0.5)
    assert select_negatives(ids, scores, 0.9, copy, short, 0)[0] == [17]               # only 0.40 is under 0.45


def test_random_sampling_is_seeded_by_the_query_and_stays_in_the_window():
    ids, scores, copy = list(range(20)), list(np.linspace(0.9, 0.1, 20)), [False] * 20
    cfg = MineConfig(num_negatives=3, depth=20, margin_kind="none", skip_top=5, window=10, sampling="random", seed=1)
    a, _ = select_negatives(ids, scores, 1.0, copy, cfg, query_index=7)
    b, _ = select_negatives(ids, scores, 1.0, copy, cfg, query_index=7)
    assert a == b and len(a) == 3 and all(5 <= i < 15 for i in a) and a == sorted(a)
    assert any(select_negatives(ids, scores, 1.0, copy, cfg, query_index=q)[0] != a for q in range(8, 14))


@pytest.mark.parametrize("kwargs,msg", [
    ({"num_negatives": 0}, "num_negatives must be >= 1"),
    ({"depth": 2}, "depth"),
    ({"window": 1}, "window"),
    ({"margin": 1.5}, "relative margin"),
    ({"margin_kind": "absolute", "margin": -0.1}, "absolute margin"),
    ({"sampling": "best"}, "sampling"),
])
def test_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        MineConfig(**kwargs).validate()


# --------------------------------------------------------------------------- the command

class SceneEmbedder:
    """A stand-in model that knows the synthetic scenes: a side naming a scene (a caption, or
    an image of it) is the scene's attributes one-hot, over 2 (unit norm; a one-attribute
    neighbour scores 0.75, the same scene 1.0); any other text a fixed random unit vector.
    Mining with it must find exactly the one-attribute neighbours the pool holds."""

    def __init__(self, data_root):
        import json
        from pathlib import Path

        import pyarrow.parquet as pq

        from llave_ds.toy.synthetic import ATTRIBUTE_VALUES
        self.values = ATTRIBUTE_VALUES
        self.dim = sum(len(v) for v in ATTRIBUTE_VALUES.values())
        self.device = __import__("torch").device("cpu")
        self.scene = {}
        root = Path(data_root)
        for subset in ("Synth_I2T", "Synth_T2I", "Synth_CLS", "Synth_VQA"):
            rows = pq.read_table(root / "train" / f"{subset}.parquet").to_pylist()
            attrs = [json.loads(line) for line in open(root / "attributes" / "train" / f"{subset}.jsonl")]
            for row, a in zip(rows, attrs):
                for key in ("qry_image_path", "pos_image_path"):
                    if row[key]:
                        self.scene[row[key]] = a["positive"]
                if subset == "Synth_I2T":
                    self.scene[row["pos_text"]] = a["positive"]
                if subset == "Synth_T2I":
                    self.scene[row["qry"].strip()] = a["positive"]

    def vector(self, side):
        import zlib

        import torch
        scene = self.scene.get(side.image_path or "") or self.scene.get((side.text or "").strip())
        if scene is None:
            g = torch.Generator().manual_seed(zlib.crc32((side.text or "").encode()))
            v = torch.randn(self.dim, generator=g)
            return v / v.norm()
        parts = [torch.tensor([float(scene[k] == x) for x in values]) for k, values in self.values.items()]
        return torch.cat(parts) / 2.0

    def encode_sides(self, sides, role="query", batch_size=16, progress=False, **kw):
        import torch
        return torch.stack([self.vector(s) for s in sides])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from llave_ds.toy.synthetic import prepare_synthetic_mmeb
    root = tmp_path_factory.mktemp("mine_synth") / "data"
    train, image_root = prepare_synthetic_mmeb(root, num_train_per_subset=48, num_eval_per_subset=2, seed=5)
    return {"train": Path(train), "images": Path(image_root), "root": Path(root)}


def mine_args(synth, out, *extra):
    import argparse

    from llave_ds.mine.run import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", "unused", "--data", str(synth["train"]), "--image-root", str(synth["images"]),
                              "--out", str(out), "--num-negatives", "3", "--depth", "30", "--no-progress",
                              "--num-workers", "0", "--shard-rows", "20", *extra])


def run_mine(synth, out, *extra, on_shard=None):
    from unittest import mock

    from llave_ds.mine import run as mine_run
    with mock.patch.object(mine_run, "load_embedder", lambda *a, **k: SceneEmbedder(synth["root"])), \
            mock.patch.object(mine_run, "resolve_model", lambda model, work: str(synth["root"])):
        return mine_run.mine(mine_args(synth, out, *extra), on_shard=on_shard)


def neighbour_rates(synth, out, subset, field, neg_field, k=3):
    """(recall: the one-attribute neighbours mined over those that could be, min(k, how many
    the pool holds) per query; the share of neighbours among all pool candidates, what random
    negatives would score; mined negatives showing the positive's own scene)."""
    import json

    import pyarrow.parquet as pq
    rows = pq.read_table(synth["train"] / f"{subset}.parquet").to_pylist()
    mined = pq.read_table(out / f"{subset}.parquet").to_pylist()
    attrs = [json.loads(line)["positive"] for line in open(synth["root"] / "attributes" / "train" / f"{subset}.jsonl")]
    scene = {}
    for row, a in zip(rows, attrs):
        scene.setdefault(row[field], a)

    def diff(a, b):
        return sum(a[key] != b[key] for key in a)
    hits = reachable = base = base_total = same = 0
    for row, a, m in zip(rows, attrs, mined):
        hits += sum(diff(scene[n], a) == 1 for n in m[neg_field])
        same += sum(diff(scene[n], a) == 0 for n in m[neg_field])
        others = [diff(s, a) for key, s in scene.items() if key != row[field]]
        reachable += min(k, sum(d == 1 for d in others))
        base, base_total = base + sum(d == 1 for d in others), base_total + len(others)
    return hits / reachable, base / base_total, same


def test_mining_finds_the_one_attribute_neighbours_and_drops_the_positives_scene(synth, tmp_path):
    out = tmp_path / "mined"
    record = run_mine(synth, out)
    for subset, field, neg_field in (("Synth_I2T", "pos_text", "neg_text"), ("Synth_T2I", "pos_image_path",
                                                                             "neg_image_path")):
        recall, chance, same_scene = neighbour_rates(synth, out, subset, field, neg_field)
        print(f"{subset}: recall of the one-attribute neighbours {recall:.2f} (their share of the pool: {chance:.2f})")
        assert recall == 1.0 and chance < 0.2    # every neighbour the pool holds, up to 3 a query
        assert same_scene == 0                   # another image of the positive's scene: above the margin
    t2i = record["counts"]["Synth_T2I"]
    assert t2i["copy"] == 48 and t2i["above_margin"] > 0   # the positive itself; its scene's other images
    assert record["total"]["queries"] == 4 * 48 and record["parameters"]["num_negatives"] == 3
    assert len(record["model_sha256"]) == 64 and record["date"] and record["subsets"] == sorted(record["counts"])
    from llave_ds.data.mmeb_train import MMEBTrainDataset, TrainDataConfig
    cfg = TrainDataConfig(source=str(out), image_root=str(synth["images"]), subsets=["Synth_I2T", "Synth_T2I"],
                          use_hard_negatives=True, num_hard_negatives=3)
    dataset = MMEBTrainDataset(cfg)            # the output is training data: 3 negatives a row
    assert len(dataset) == 96 and len(dataset[0].negatives) == 3
    assert (out / "mining_summary.md").read_text().startswith("| subset | queries |")
    assert (out / "mining_scores.png").read_bytes()[:4] == b"\x89PNG"


def _outputs(out):
    """The mined files' bytes, and mining.json without what differs between launches."""
    import json
    files = {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}
    record = json.loads((out / "mining.json").read_text())
    for key in ("date", "ranks", "files"):
        record.pop(key)
    return files, record


def _mine_ranked(rank, world, synth, out):
    run_mine(synth, out)


def test_two_ranks_write_what_one_rank_writes(synth, tmp_path):
    from tests.distributed_harness import run_distributed
    run_mine(synth, tmp_path / "one")
    run_distributed(_mine_ranked, 2, synth, tmp_path / "two", timeout_s=240)
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one")
    assert len(list((tmp_path / "two" / ".mining" / "embeddings").glob("query-*.npy"))) == 10   # 192 rows / 20


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_files(synth, tmp_path):
    """Killed after the 4th shard is written; the relaunch encodes only the shards left and
    writes the same files as a run never interrupted."""
    run_mine(synth, tmp_path / "whole")
    written = []

    def die_after_four(i):
        written.append(i)
        if len(written) == 4:
            raise Killed
    with pytest.raises(Killed):
        run_mine(synth, tmp_path / "resumed", on_shard=die_after_four)
    assert not (tmp_path / "resumed" / "mining.json").exists()
    again = []
    run_mine(synth, tmp_path / "resumed", on_shard=again.append)
    shards = len(list((tmp_path / "whole" / ".mining" / "embeddings").glob("*.npy")))
    assert len(again) == shards - 4
    assert _outputs(tmp_path / "resumed") == _outputs(tmp_path / "whole")
    # another selection reuses every embedding: nothing is encoded again
    again.clear()
    run_mine(synth, tmp_path / "resumed", "--margin-kind", "none")
    assert again == []


def test_bad_input_is_a_clear_error(synth, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llave_ds.mine.run import MiningError
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = pq.read_table(synth["train"] / "Synth_I2T.parquet").to_pylist()[:3]
    rows[1]["pos_text"] = ""
    pq.write_table(pa.Table.from_pylist(rows), bad / "Synth_I2T.parquet")
    with pytest.raises(MiningError, match=r"Synth_I2T.parquet, row 1: field 'pos_text'"):
        run_mine({**synth, "train": bad}, tmp_path / "o1")
    with pytest.raises(MiningError, match="would overwrite the data"):
        run_mine({**synth, "train": bad}, bad)
    with pytest.raises(ValueError, match="not a local directory|hub|download"):
        run_mine({**synth, "train": "TIGER-Lab/MMEB-train"}, tmp_path / "o2")
    rows = pq.read_table(synth["train"] / "Synth_T2I.parquet").to_pylist()[:3]
    rows[2]["pos_image_path"] = "images/missing.png"
    (bad / "Synth_I2T.parquet").unlink()
    pq.write_table(pa.Table.from_pylist(rows), bad / "Synth_T2I.parquet")
    with pytest.raises(ValueError, match=r"Synth_T2I.parquet, row 2, pos_image_path: .*missing.png"):
        run_mine({**synth, "train": bad}, tmp_path / "o3")


def test_a_run_without_an_export_is_exported_once_from_its_latest_checkpoint(tmp_path, monkeypatch):
    """--model RUN_DIR: its export when there is one; else `export_checkpoint` (the code of
    `llave-ds export`) writes <out>/.mining/model once, and a resumed run reuses it."""
    from llave_ds.export import model_dir
    from llave_ds.mine.run import resolve_model
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    calls = []

    def fake_export(checkpoint, out_dir, **kw):
        calls.append((str(checkpoint), str(out_dir), kw))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
    monkeypatch.setattr(model_dir, "export_checkpoint", fake_export)
    work = tmp_path / "out" / ".mining"
    assert resolve_model(str(run), work) == str(work / "model")
    assert resolve_model(str(run), work) == str(work / "model")
    assert calls == [(str(run), str(work / "model"), {"force": True})]
    (run / "export").mkdir()
    (run / "export" / "config.json").write_text("{}")
    assert resolve_model(str(run), work) == str(run / "export")


def test_the_command_with_a_tiny_model_writes_trainable_data(synth, tmp_path, capsys):
    """`llave-ds mine` end to end with a real (tiny, random) model: its roles and images, the
    report, and data that `llave-ds train`'s reader takes with 2 negatives a row."""
    from llave_ds.cli import main
    from llave_ds.data.mmeb_train import MMEBTrainDataset, TrainDataConfig
    from llave_ds.toy.tiny import build_tiny_model_dir
    model = build_tiny_model_dir(tmp_path / "tiny", "qwen2_vl", seed=2)
    out = tmp_path / "mined"
    code = main(["mine", "--model", str(model), "--data", str(synth["train"]), "--image-root", str(synth["images"]),
                 "--out", str(out), "--num-negatives", "2", "--margin-kind", "none", "--subsets", "Synth_I2T",
                 "Synth_T2I", "--no-progress", "--num-workers", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| **total** | 96 |" in printed and "mining.json" in printed
    cfg = TrainDataConfig(source=str(out), image_root=str(synth["images"]), use_hard_negatives=True,
                          num_hard_negatives=2)
    pair = MMEBTrainDataset(cfg)[50]
    assert len(pair.negatives) == 2 and all(n.image is not None for n in pair.negatives)   # T2I: image negatives
    assert sorted(p.name for p in out.glob("*.parquet")) == ["Synth_I2T.parquet", "Synth_T2I.parquet"]
    assert main(["mine", "--model", str(model), "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_another_pool(synth, tmp_path):
    """--pool: the candidates are that source's positives (here 24 rows of Synth_I2T), the
    positives' scores come from their own encoding; a subset the pool lacks is an error with
    --pool-scope subset, and fine with --pool-scope all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llave_ds.mine.run import MiningError
    pool = tmp_path / "pool"
    pool.mkdir()
    rows = pq.read_table(synth["train"] / "Synth_I2T.parquet").to_pylist()[24:]
    pq.write_table(pa.Table.from_pylist(rows), pool / "Synth_I2T.parquet")
    out = tmp_path / "mined"
    record = run_mine(synth, out, "--pool", str(pool), "--subsets", "Synth_I2T")
    allowed = {r["pos_text"] for r in rows}
    mined = pq.read_table(out / "Synth_I2T.parquet").to_pylist()
    assert all(n in allowed for m in mined for n in m["neg_text"]) and record["total"]["kept"] > 0
    recall, _, same_scene = neighbour_rates(synth, out, "Synth_I2T", "pos_text", "neg_text")
    assert same_scene == 0
    assert (out / ".mining" / "embeddings" / "positive.json").is_file()
    with pytest.raises(MiningError, match="no rows for subset.*Synth_T2I"):
        run_mine(synth, tmp_path / "m2", "--pool", str(pool), "--subsets", "Synth_I2T", "Synth_T2I")
    record = run_mine(synth, tmp_path / "m3", "--pool", str(pool), "--subsets", "Synth_I2T", "Synth_T2I",
                      "--pool-scope", "all")
    assert record["counts"]["Synth_T2I"]["queries"] == 48
