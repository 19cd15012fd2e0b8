"""benchmarks/ablation.py: its statistics, and a one-seed, few-step smoke run of the whole
script (warm start -> one 2-rank launch training the arms -> evaluation -> table and JSON).
The numbers of a smoke run mean nothing; docs/RESULTS.md has the real ones."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ablation.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ablation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_test_and_sign_flip_test():
    ab = load_script()
    # Student t, two-sided: t = 2.776 at 4 df and t = 2.228 at 10 df are the 5 % points.
    assert abs(ab.t_two_sided_p(2.7764451, 4) - 0.05) < 1e-6
    assert abs(ab.t_two_sided_p(2.2281389, 10) - 0.05) < 1e-6
    assert abs(ab.t_two_sided_p(1.0, 1) - 0.5) < 1e-9          # Cauchy: P(|T| > 1) = 1/2
    assert ab.t_two_sided_p(0.0, 3) == 1.0
    res = ab.paired_test([0.5, 0.6, 0.7, 0.55, 0.65], [0.4, 0.45, 0.5, 0.5, 0.5])
    diffs = [0.1, 0.15, 0.2, 0.05, 0.15]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    assert abs(res["mean_diff"] - mean) < 1e-12 and abs(res["sd_diff"] - sd) < 1e-12
    assert abs(res["t"] - mean / (sd / math.sqrt(5))) < 1e-9
    assert res["wins"] == 5 and res["p_signflip"] == 2 / 32   # all positive: only +/- all-flips as extreme
    same = ab.paired_test([0.3, 0.4], [0.3, 0.4])
    assert same["p_t"] == 1.0 and same["p_signflip"] == 1.0 and same["ties"] == 2
    assert ab.json_safe({"x": [float("nan"), 1.0]}) == {"x": [None, 1.0]}


@pytest.mark.slow
def test_ablation_smoke_run_prints_table_and_json(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), "--seeds", "0", "--steps", "2", "--warm-steps", "3", "--arms", "a", "b",
           "--sweep", "0", "9", "--train-per-subset", "8", "--eval-per-subset", "2", "--batch", "8", "--chunk", "4",
           "--work", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])                      # the JSON line is last, and strict JSON
    assert "| (a) InfoNCE, local negatives | 8 | 2 |" in proc.stdout
    assert result["benchmark"] == "ablation" and result["seeds"] == [0] and result["start"] == "warm_start"
    assert result["metrics"] == ["hard_p_at_1", "hard_gap", "p_at_1"]
    assert set(result["arms"]) == {"a", "b"} and result["best_setting"] == "b"
    for arm in result["arms"].values():
        for metric in result["metrics"]:
            assert set(arm[metric]) == {"mean", "std", "values"} and len(arm[metric]["values"]) == 1
    assert (result["arms"]["a"]["alpha"], result["arms"]["b"]["alpha"]) == (0.0, 9.0)
    # The sweep at (b)'s setting reuses (a) and (b): alpha 0 and 9 there are those very runs.
    assert set(result["sweep"]) == {"0", "9"}
    assert result["sweep"]["0"]["hard_gap"] == result["arms"]["a"]["hard_gap"]
    assert result["sweep"]["9"]["hard_gap"] == result["arms"]["b"]["hard_gap"]
    pairs = {(p["x"], p["y"], p["metric"]) for p in result["paired"]}
    assert ("b", "a", "hard_p_at_1") in pairs and ("alpha=9", "alpha=0", "hard_gap") in pairs
    for name in ("random_init", "warm_start"):
        assert set(result["spread"][name]["positive"]) == {"mean", "std", "p5", "p50", "p95"}
    assert not result["warm_start"]["0"]["cached"]
    for png in ("warm_start_spread.png", "ablation_histogram.png"):
        assert (tmp_path / "work" / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "work" / "results").glob("*.json"))) == 2


@pytest.mark.slow
def test_matryoshka_benchmark_smoke_run(tmp_path):
    """benchmarks/matryoshka.py: a plain and a Matryoshka run from the same warm start, both
    scored at every size; the Matryoshka run trained with the sizes (its metrics log each
    size's loss), the plain one without; the table, the figure and the JSON line last."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT.with_name("matryoshka.py")), "--seeds", "0", "--steps", "2", "--warm-steps", "3",
           "--dims", "8", "32", "full", "--train-per-subset", "8", "--eval-per-subset", "2", "--batch", "8",
           "--chunk", "4", "--work", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "matryoshka" and result["dims"] == [8, 32, "full"]
    assert result["sizes"] == ["8", "32", "64"] and set(result["table"]) == {"plain", "matryoshka"}
    assert "| 8 | " in proc.stdout and (tmp_path / "work" / "matryoshka_p_at_1.png").read_bytes()[:4] == b"\x89PNG"
    runs = {p.name: p for p in (tmp_path / "work" / "runs").iterdir()}
    assert sorted(runs) == ["s0_a9_exact_b8_n2", "s0_a9_exact_b8_n2_m8-32-full"]
    logged = [json.loads(line) for line in (runs["s0_a9_exact_b8_n2_m8-32-full"] / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (runs["s0_a9_exact_b8_n2"] / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_d8" in r and "loss_d64" in r for r in logged) and not any("loss_d8" in r for r in plain)


def load_mining():
    spec = importlib.util.spec_from_file_location("mining_script", SCRIPT.with_name("mining.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mining_benchmark_random_draw_fill_rule_and_neighbour_rates(tmp_path):
    """benchmarks/mining.py's data side: the random arm never draws the row's own positive or
    a copy of it and is seeded; a mined row left empty is filled with its random negative (and
    named); a one-attribute neighbour counts in the neighbour rate."""
    from llave_ds.data.row_files import read_rows, row_files
    from llave_ds.mine.select import side_keys
    from llave_ds.toy.synthetic import prepare_synthetic_mmeb
    mining = load_mining()
    train, root = map(Path, prepare_synthetic_mmeb(str(tmp_path / "data"), num_train_per_subset=24,
                                                   num_eval_per_subset=1, seed=3))
    drawn = mining.random_negatives(train, seed=7)
    assert drawn == mining.random_negatives(train, seed=7) != mining.random_negatives(train, seed=8)
    for f in row_files(str(train)):
        rows = read_rows(f)
        assert len(drawn[f.subset]) == len(rows)
        for row, (text, image) in zip(rows, drawn[f.subset]):
            own = side_keys(row["pos_text"], row["pos_image_path"])
            assert not side_keys(text, image) & own
            assert (text, image) in {(r["pos_text"], r["pos_image_path"]) for r in rows}
    random = {s: [[n] for n in negs] for s, negs in drawn.items()}
    mining.write_training_copy(train, tmp_path / "random", random)
    copy = {f.subset: read_rows(f) for f in row_files(str(tmp_path / "random"))}
    assert all(len(r["neg_text"]) == len(r["neg_image_path"]) == 1 for rows in copy.values() for r in rows)
    # a "mined" copy with row 2 of Synth_I2T left empty: filled from the random draw, and named
    mined = {s: [[n] for n in negs] for s, negs in mining.random_negatives(train, seed=9).items()}
    mined["Synth_I2T"][2] = []
    mining.write_training_copy(train, tmp_path / "mined", mined)
    got, filled = mining.mined_negatives(tmp_path / "mined", drawn)
    assert filled == {"Synth_CLS": [], "Synth_I2T": [2], "Synth_T2I": [], "Synth_VQA": []}
    assert got["Synth_I2T"][2] == [drawn["Synth_I2T"][2]] and got["Synth_I2T"][3] == mined["Synth_I2T"][3]
    rates = mining.neighbour_rates(root, train, random)
    assert set(rates) == {"Synth_I2T", "Synth_T2I"} and 0 < rates["Synth_I2T"]["pool_neighbour"] < 0.3
    # a negative that is the positive's own one-attribute neighbour counts as one
    rows = read_rows(row_files(str(train), ["Synth_I2T"])[0])
    captions = {r["pos_text"] for r in rows}
    own = {"Synth_I2T": [[(r["neg_text"][0], "")] for r in rows]}
    outside = {"Synth_I2T": [i for i, r in enumerate(rows) if r["neg_text"][0] not in captions]}
    rate = mining.neighbour_rates(root, train, own, skip=outside)["Synth_I2T"]
    assert rate["negatives"] == len(rows) - len(outside["Synth_I2T"]) > 0 and rate["neighbour"] == 1.0


@pytest.mark.slow
def test_mining_benchmark_smoke_run(tmp_path):
    """benchmarks/mining.py: per seed, random / mined with the warm start / mined with the
    random arm's model / oracle, each trained from the warm start with one negative a row;
    the oracle is the ablation's arm (c) (its run name); every training copy has one negative
    a row, the short rows filled and counted; the table, the figure and the JSON line last."""
    from llave_ds.data.row_files import read_rows, row_files
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT.with_name("mining.py")), "--seeds", "0", "--steps", "2", "--warm-steps", "3",
           "--train-per-subset", "8", "--eval-per-subset", "2", "--batch", "8", "--chunk", "4", "--mine-workers", "0",
           "--work", str(work), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "mining" and list(result["arms"]) == ["random", "mined-warm", "mined-r2", "oracle"]
    assert result["runs"]["oracle"] == ["s0_a9_exact_b8_n2"] and result["runs"]["mined-r2"] == [
        "s0_a9_exact_b8_n2_neg-mined-r2"]
    assert sorted(p.name for p in (work / "runs").iterdir()) == sorted(r[0] for r in result["runs"].values())
    assert {p["x"] + "-" + p["y"] for p in result["paired"]} >= {"mined-warm-random", "mined-r2-random",
                                                                 "oracle-random", "mined-r2-mined-warm"}
    for arm in ("mined-warm", "mined-r2"):
        counts = result["mining_counts"][arm]["0"]
        assert counts["queries"] == 32 and counts["kept"] + counts["short"] == 32 == counts["copy"]
        assert counts["filled"] == counts["short"]
        record = json.loads((work / "mined" / f"{arm}_s0" / "mining.json").read_text())
        assert record["parameters"]["num_negatives"] == 1 and record["parameters"]["depth"] == 100
    assert json.loads((work / "mined" / "mined-r2_s0" / "mining.json").read_text())["model_dir"].endswith(
        "runs/s0_a9_exact_b8_n2_neg-random/export")
    for arm in ("random", "mined-warm", "mined-r2"):
        rows = [r for f in row_files(str(work / "train" / f"{arm}_s0")) for r in read_rows(f)]
        assert len(rows) == 32 and all(len(r["neg_text"]) == 1 == len(r["neg_image_path"]) for r in rows)
        rates = result["neighbour_rates"][arm]["0"]
        assert set(rates) == {"Synth_I2T", "Synth_T2I"} and rates["Synth_T2I"]["negatives"] == 8
    assert "| oracle: the data's own one-attribute negative |" in proc.stdout
    assert (work / "mining_hard_p_at_1.png").read_bytes()[:4] == b"\x89PNG"
