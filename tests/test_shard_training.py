"""Training from shards (``data.source_type: shards``, `llave_ds.data.shards.train_stream`).

* The global batch of every step is one function of (seed, step): the same rows in the same
  order for 1, 2 or 3 ranks and 0 or 2 DataLoader workers; every sample is read; starting at
  step k gives exactly the rest.
* End to end, 2 gloo ranks, ZeRO-3, the gradient cache, shards served over HTTP by a server on
  127.0.0.1: a run preempted in the middle of shards and resumed, or with a rank killed (-9)
  mid-step and resumed from its last checkpoint, equals the uninterrupted one (losses and
  parameters, fp32, 1e-6); resumed on 3 ranks instead, 1e-5 (another rank count sums float32
  in another order); a server that disappears mid-epoch stops the run on every rank with an
  error naming the URL, within the retry budget.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llave_ds.config import load_config
from llave_ds.data.batching import CountingCollator, PairCollator
from llave_ds.data.errors import DataError
from llave_ds.data.mmeb_train import TrainDataConfig
from llave_ds.data.shards.train_stream import ShardLoader, ShardTrainData, default_lanes
from llave_ds.data.shards.writer import write_shards
from llave_ds.train import TrainConfig
from tests.assets import build_demo_assets
from tests.distributed_harness import run_distributed
from tests.test_elastic_resume import STABLE_ADAM, assert_same_run
from tests.test_train import DEMO_CONFIG, _train_rank, exported, losses

GLOBAL_BATCH = 6
LANES = 6          # 14 shards of 2-5 samples, 2-3 per lane: lanes of 4-13 samples, 1 per step
EPOCH = 8          # 48 samples / 6 per step (nominal)
STEPS = 10         # across the nominal epoch boundary; the shorter lanes start their second deal


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    assets = build_demo_assets(tmp_path_factory.mktemp("shard_train_assets"))
    assets["shards"] = Path(assets["root"]) / "shards"
    write_shards(assets["train"], str(assets["shards"]), image_root=assets["images"], shard_size=12000)
    return assets


@pytest.fixture(scope="module")
def served(assets):
    """Python's own HTTP server on 127.0.0.1 serving the shards, in its own process (a test
    makes its own to make it disappear); its URL."""
    proc, url = start_server(assets["shards"])
    yield url
    proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def reference(assets, served, tmp_path_factory):
    """The uninterrupted run: 2 ranks, ZeRO-3, the gradient cache, shards over HTTP."""
    full = tmp_path_factory.mktemp("shard_reference") / "run"
    assert run_distributed(_train_rank, 2, overrides(assets, full, served), 0, timeout_s=420)[0].value == \
        {"steps": STEPS, "stopped_early": False}
    return full


def start_server(directory: Path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the test HTTP server did not start")


# ------------------------------------------------------------------ the order

def _sizes(sides, role):  # a formatter that keeps nothing but the row count (picklable)
    return {"rows": torch.zeros(len(sides))}


def data_config(source, **extra) -> TrainDataConfig:
    return TrainDataConfig(source=str(source), source_type="shards", shard_lanes=LANES, **extra)


def global_batches(source, world: int, workers: int, epoch: int = 0, start: int = 0):
    """Every step's global batch (sample positions in the shard set's order), rank slices joined."""
    per_rank = []
    for rank in range(world):
        data = ShardTrainData(data_config(source), global_batch_size=GLOBAL_BATCH, rank=rank, world_size=world,
                              seed=5)
        data.plan.load_state_dict({"epoch": epoch, "step": start})
        per_rank.append([batch.rows for batch, _ in ShardLoader(data, CountingCollator(PairCollator(_sizes, 2, 2)), workers)])
    return [sum((rows[k] for rows in per_rank), []) for k in range(len(per_rank[0]))]


def test_the_global_batch_is_the_same_for_any_rank_and_worker_count(assets):
    want = global_batches(assets["shards"], 1, 0) + global_batches(assets["shards"], 1, 0, epoch=1)
    assert len(want) == 2 * EPOCH and all(len(b) == GLOBAL_BATCH for b in want)
    for world, workers in ((2, 0), (3, 0), (2, 2), (3, 2)):
        assert global_batches(assets["shards"], world, workers) == want[:EPOCH], (world, workers)
    assert global_batches(assets["shards"], 2, 2, start=3) == want[3:EPOCH]          # resumed mid-shard
    assert global_batches(assets["shards"], 3, 0, epoch=1, start=1) == want[EPOCH + 1:]
    # Each lane reads its whole deal, whatever the shard sizes: until the shortest lane's deal
    # ends (4 steps) nothing repeats, and two epochs' worth of steps read every sample.
    flat = [i for b in want[:4] for i in b]
    assert len(set(flat)) == len(flat)
    assert set(i for b in want for i in b) == set(range(48))


def test_lane_rules_are_clear_errors(assets):
    assert default_lanes(12, 14) == 12 and default_lanes(12, 5) == 4 and default_lanes(7, 3) == 1
    with pytest.raises(DataError, match="6 lanes .* cannot be split evenly over 4 ranks"):
        ShardTrainData(data_config(assets["shards"]), global_batch_size=GLOBAL_BATCH, rank=0, world_size=4, seed=0)
    with pytest.raises(DataError, match="fewer than data.shard_lanes=20"):
        ShardTrainData(TrainDataConfig(source=str(assets["shards"]), source_type="shards", shard_lanes=20),
                       global_batch_size=20, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="subsets=.* does not apply to source_type=shards"):
        TrainDataConfig(source="x", source_type="shards", subsets=["a"]).validate()


def test_a_bad_sample_is_named_or_replaced_by_the_next_good_one_of_the_step(assets, tmp_path):
    from llave_ds.data.shards.layout import ShardIndex, sample_key
    from tests.test_shards import rewrite_tar
    shards = tmp_path / "shards"
    shutil.copytree(assets["shards"], shards)
    clean = global_batches(assets["shards"], 1, 0)
    victim = clean[0][0]                       # the first sample of step 1
    index = ShardIndex.loads((shards / "index.json").read_text(), "index")
    shard = index.shards[index.locate(victim)[0]].name
    key = sample_key(victim)
    rewrite_tar(shards / shard, lambda name, data: data[:40] if name.startswith(key + ".") and
                not name.endswith(".json") else data)
    with pytest.raises(DataError, match=rf"(?s)shard {shard} .*sample {key}.*data.skip_bad_rows"):
        for _ in ShardLoader(ShardTrainData(data_config(shards), global_batch_size=GLOBAL_BATCH, rank=0,
                                            world_size=1, seed=5), CountingCollator(PairCollator(_sizes, 2, 2)), 0):
            pass
    data = ShardTrainData(data_config(shards, skip_bad_rows=True), global_batch_size=GLOBAL_BATCH, rank=0,
                          world_size=1, seed=5)
    batches = [b for b, _ in ShardLoader(data, CountingCollator(PairCollator(_sizes, 2, 2)), 0)]
    assert [b.rows for b in batches[1:]] == clean[1:]                       # the other steps are untouched
    assert batches[0].rows == clean[0][1:2] + clean[0][1:]                  # the next good one stands in
    assert batches[0].skipped and sum(batches[0].skipped.values()) == 1     # counted once


# ------------------------------------------------------------------ end to end

def overrides(assets, run_dir: Path, source: str, **extra) -> list[str]:
    values = {"model.path": assets["model"], "data.source": source, "data.source_type": "shards",
              "data.shard_lanes": LANES, "data.shard_retries": 2, "data.shard_timeout_s": 5,
              "run_dir": str(run_dir), "global_batch_size": GLOBAL_BATCH, "num_workers": 0,
              "gradcache.query_chunk_size": 2, "gradcache.target_chunk_size": 2,
              "schedule.max_steps": STEPS, "checkpoint.every_steps": 0, "logging.progress": False,
              "export.dtype": "float32", "collective_timeout_s": 120, "deepspeed.config": "zero3",
              "optim.eps": STABLE_ADAM}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def assert_exact(full: Path, continued: Path) -> None:
    want, got = losses(full), losses(continued)
    assert sorted(got) == list(range(1, STEPS + 1)) and max(abs(want[s] - got[s]) for s in want) <= 1e-6, got
    a, b = exported(full), exported(continued)
    assert a.keys() == b.keys() and a and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_training_from_http_shards_resumes_exactly_mid_shard_and_on_another_rank_count(assets, served, reference,
                                                                                      tmp_path):
    url, full, split = served, reference, tmp_path / "split"
    first = run_distributed(_train_rank, 2, overrides(assets, split, url), 2, timeout_s=420)
    assert all(o.value == {"steps": 2, "stopped_early": True} for o in first)
    three = tmp_path / "three"
    shutil.copytree(split, three)
    run_distributed(_train_rank, 2, overrides(assets, split, url), 0, timeout_s=420)
    run_distributed(_train_rank, 3, overrides(assets, three, url), 0, timeout_s=420)
    assert_exact(full, split)
    assert_same_run(full, three, STEPS)   # 1e-5


def test_a_rank_killed_mid_step_resumes_mid_shard_to_the_same_run(assets, served, reference, tmp_path):
    """kill -9 of rank 1 in step 3 (checkpoint at step 2, in the middle of shards): the other
    rank stops, and --resume auto ends where the uninterrupted run ends (1e-6)."""
    from llave_ds.training import checkpoint as ckpt
    from tests.reliability import helpers
    run_dir = tmp_path / "run"
    every_2 = overrides(assets, run_dir, served, **{"checkpoint.every_steps": 2})
    crash = helpers.run_ranks(helpers.train_rank, 2, every_2, {"kill_in_step": (3, 1), "marks_dir": str(tmp_path)})
    assert crash.exitcodes[1] == -9 and not crash.hung, crash.describe()
    assert crash.value(0).get("error", "").startswith("PeerStoppedError"), crash.describe()
    assert (run_dir / "checkpoints" / ckpt.LATEST).read_text().strip() == ckpt.tag_for_step(2)
    resumed = helpers.run_ranks(helpers.train_rank, 2, every_2)
    assert resumed.all_ok() and resumed.value(0)["steps"] == STEPS, resumed.describe()
    assert_exact(reference, run_dir)


def test_a_server_that_disappears_mid_epoch_stops_every_rank_naming_the_url(assets, tmp_path):
    proc, url = start_server(assets["shards"])
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"

    def kill_after_the_first_step():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.05)
        proc.kill()

    watcher = threading.Thread(target=kill_after_the_first_step, daemon=True)
    watcher.start()
    try:
        started = time.monotonic()
        outcomes = run_distributed(_train_rank, 2, overrides(assets, run_dir, url), 0, timeout_s=420,
                                   expect_errors=True)
        elapsed = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait(10)
    assert all(not o.ok for o in outcomes), [o.value for o in outcomes]
    for o in outcomes:
        assert "TrainingError" in o.error and url in o.error and "attempt" in o.error, o.error[-3000:]
    done = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 1 <= len(done) < STEPS, done
    print(f"the run stopped after step {done[-1]}, {elapsed:.0f} s after its launch")


def test_a_shard_config_loads_from_yaml(assets, tmp_path):
    cfg = load_config(TrainConfig, DEMO_CONFIG, overrides(assets, tmp_path, str(assets["shards"])))
    assert cfg.data.source_type == "shards" and cfg.data.shard_lanes == LANES
