"""One set of assets and one uninterrupted reference run for the whole reliability suite."""
from __future__ import annotations

import pytest

from tests.assets import build_demo_assets
from tests.reliability import helpers


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Synthetic MMEB data (4 subsets x 12 rows) and a tiny LLaVA-OneVision directory."""
    return build_demo_assets(tmp_path_factory.mktemp("reliability_assets"))


@pytest.fixture(scope="session")
def reference_run(assets, tmp_path_factory):
    """2 ranks, ZeRO-3, 4 uninterrupted steps: checkpoints at steps 2 and 4, fp32 export.
    Failure tests start from a copy of its step-2 checkpoint and must end where it did."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run = helpers.run_ranks(helpers.train_rank, 2, helpers.overrides(assets, run_dir))
    assert run.all_ok(), run.describe()
    assert run.value(0)["steps"] == helpers.STEPS and "error" not in run.value(0), run.value(0)
    return run_dir
