"""Training on mixed image / video / text data end to end (issue #16): synthetic image
subsets and synthetic video rows (`llave_ds.toy.synthetic_video`) in one source, 2 gloo ranks,
ZeRO-3, the gradient cache, through ``llave_ds.train.train``. The dataset reports video
rows, so the formatter carries a (dummy) video in every chunk and the ranks stay in step
whatever mix each one draws."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from llave_ds.config import load_config
from llave_ds.train import TrainConfig
from tests.distributed_harness import run_distributed

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"


def mixed_source(root: Path, *, image_subsets=("Synth_I2T", "Synth_T2I"), train_per_subset: int = 8,
                 video_rows: int = 8, num_frames: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """(source, image_root): synthetic image subsets and the two synthetic video subsets in
    one directory; video paths rewritten relative to the shared root (``videos/...`` ->
    ``sv/videos/...``)."""
    from llave_ds.toy.synthetic import prepare_synthetic_mmeb
    from llave_ds.toy.synthetic_video import VIDEO_FIELDS, generate_synthetic_videos
    train_dir, image_root = prepare_synthetic_mmeb(root / "data", num_train_per_subset=train_per_subset,
                                                   num_eval_per_subset=2, seed=seed)
    image_root = Path(image_root)
    generate_synthetic_videos(str(image_root / "sv"), num_test=2, num_train_per_subset=video_rows,
                              num_frames=num_frames, seed=seed)
    source = root / "mixed"
    source.mkdir()
    for name in image_subsets:
        shutil.copy(Path(train_dir) / f"{name}.parquet", source / f"{name}.parquet")
    for path in sorted((image_root / "sv" / "train").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for row in rows:
            for key in VIDEO_FIELDS:
                value = row.get(key)
                if isinstance(value, list):
                    row[key] = [f"sv/{v}" if v else "" for v in value]
                elif value:
                    row[key] = f"sv/{value}"
        (source / path.name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return source, image_root


def _train(rank, world, overrides):
    from llave_ds.train import train
    res = train(load_config(TrainConfig, DEMO_CONFIG, overrides))
    return res.steps


def test_cached_steps_on_mixed_image_and_video_data_under_zero3(tmp_path):
    from llave_ds.toy.tiny import build_tiny_model_dir
    source, image_root = mixed_source(tmp_path)
    model = build_tiny_model_dir(tmp_path / "tiny", "llava_onevision", seed=1)
    run_dir = tmp_path / "run"
    over = {"model.path": str(model), "data.source": str(source), "data.image_root": str(image_root),
            "run_dir": str(run_dir), "global_batch_size": 8, "num_workers": 0, "seed": 1,
            "gradcache.query_chunk_size": 2, "gradcache.target_chunk_size": 3, "schedule.max_steps": 3,
            "processing.video_frames": 4, "checkpoint.every_steps": 0, "export.at_end": True,
            "export.dtype": "float32", "logging.progress": False, "collective_timeout_s": 120}
    outcomes = run_distributed(_train, 2, [f"{k}={v}" for k, v in over.items()], timeout_s=300)
    assert [o.value for o in outcomes] == [3, 3]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    meta = json.loads((run_dir / "export" / "llave_embedding.json").read_text())
    assert meta["input_format"]["video_frames"] == 4
    # The steps run really mixed videos with images and text (same data, seed and plan).
    from llave_ds.data.batching import GlobalBatchSampler
    from llave_ds.data.mmeb_train import MMEBTrainDataset, TrainDataConfig
    ds = MMEBTrainDataset(TrainDataConfig(source=str(source), image_root=str(image_root), use_hard_negatives=True,
                                          cache_dir=str(tmp_path / "hf_cache")), video_frames=4)
    assert ds.has_videos
    sampler = GlobalBatchSampler(ds, 8, seed=1)
    drawn = [ds.locate(i)[0] for step in range(3) for i in sampler.global_batch(step)]
    assert any(s.startswith("SynthVideo") for s in drawn) and any(s.startswith("Synth_") for s in drawn), drawn
