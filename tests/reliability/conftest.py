"""One set of assets and one uninterrupted reference run for the whole reliability suite."""
from __future__ import annotations

import pytest

from tests.reliability import helpers


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Synthetic MMEB data (4 subsets x 12 rows) and a tiny LLaVA-OneVision directory."""
    from llave_ds.synthetic import prepare_synthetic_mmeb
    from llave_ds.tiny import build_tiny_model_dir
    root = tmp_path_factory.mktemp("reliability_assets")
    train_dir, image_root = prepare_synthetic_mmeb(root / "data", num_train_per_subset=12,
                                                   num_eval_per_subset=4, seed=3)
    model_dir = build_tiny_model_dir(root / "tiny", "llava_onevision", seed=1)
    return {"train": str(train_dir), "images": str(image_root), "model": str(model_dir), "root": root}


@pytest.fixture(scope="session")
def reference_run(assets, tmp_path_factory):
    """2 ranks, ZeRO-3, 4 uninterrupted steps: checkpoints at steps 2 and 4, fp32 export.
    Failure tests start from a copy of its step-2 checkpoint and must end where it did."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir))
    assert run.all_ok(), run.describe()
    assert run.value(0)["steps"] == helpers.STEPS and "error" not in run.value(0), run.value(0)
    return run_dir
