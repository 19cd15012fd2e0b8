"""Non-finite values: a NaN loss, NaN cached embedding gradients or NaN parameter gradients
on ONE rank skip the step on EVERY rank together, leave parameters and optimizer state
bit-for-bit untouched, leave DeepSpeed consistent (later steps are still exactly the
global-batch gradient), are counted and logged, and too many in a row stop the run."""
from __future__ import annotations

import pytest
import torch

from llave_ds.core.gradcache import TorchStepBackend, gradcache_step
from tests.reference_loss import reference_loss
from tests.reliability import helpers
from tests.test_gradcache import LR, STEPS, Scenario, ds_config, objective_of, rank_chunks
from tests.toy_models import ToyEncoder

TOL = 1e-5
TOY_STEPS = 5
# step -> (what, rank): "cached_grad": rank 1's cached embedding gradients become NaN (its
# loss and rank 0 stay finite: decided before pass 2); "param_grad": rank 1's parameter
# gradients become NaN in pass 2 (caught after the reduction by the backend's step).
TOY_PLAN = {1: ("cached_grad", 1), 2: ("param_grad", 1)}
TOY_SKIPPED = {1, 2}


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _toy_rank(rank, world, stages):
    from llave_ds.core import gradcache
    from llave_ds.training import engine as eng
    real_loss = gradcache.hardness_weighted_loss
    results = {}
    for stage in stages:
        sc = Scenario(f"z{stage}", stage=stage)
        torch.manual_seed(0)
        model = ToyEncoder(dropout=sc.dropout)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
        engine = eng.build_engine(model, opt, eng.complete_ds_config(ds_config(stage), local_batch_size=4,
                                                                      world_size=world))
        backend = eng.DeepSpeedStepBackend(engine)
        real_backward = backend.backward
        snaps = {-1: helpers.engine_snapshot(engine)}
        out = {"losses": {}, "skipped": {}, "diffs": {}}
        for step in range(TOY_STEPS):
            what, who = TOY_PLAN.get(step, (None, None))
            gradcache.hardness_weighted_loss = real_loss
            backend.backward = real_backward
            if what == "cached_grad" and who == rank:
                gradcache.hardness_weighted_loss = lambda q, t, **kw: real_loss(_NanGrad.apply(q), t, **kw)
            if what == "param_grad" and who == rank:
                backend.backward = lambda s, last: real_backward(s * float("nan"), last)
            qc, tc, nc = rank_chunks(sc, step, rank)
            torch.manual_seed(1000 * step + rank)
            res = gradcache_step(backend, qc, tc, objective_of(sc), nc, sc.negatives)
            out["losses"][step] = float(res.output.loss.detach())
            out["skipped"][step] = (res.skipped, res.skip_reason, "reencode_backward" in res.timings)
            snaps[step] = helpers.engine_snapshot(engine)
            out["diffs"][step] = helpers.snapshot_diff(snaps[step - 1], snaps[step])
        gradcache.hardness_weighted_loss = real_loss
        out["params"] = snaps[TOY_STEPS - 1]["params"]
        out["ds_skipped_steps"] = engine.skipped_steps
        results[stage] = out
    return results


def _reference_skipping(sc: Scenario, world: int, skip: set):
    """Plain torch on the global batch (tests/test_gradcache.py's reference, exact gather),
    with the batches of the skipped steps never seen."""
    torch.manual_seed(0)
    model = ToyEncoder(dropout=sc.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    losses = {}
    n, k = sum(sc.sizes), sc.negatives
    for step in range(TOY_STEPS):
        if step in skip:
            continue
        parts = {"q": [], "t": [], "n": []}
        for r in range(world):
            qc, tc, nc = rank_chunks(sc, step, r)
            torch.manual_seed(1000 * step + r)
            for key, chunks in (("q", qc), ("t", tc), ("n", nc)):
                parts[key] += [model(**c) for c in chunks]
        q, t = torch.cat(parts["q"]).double(), torch.cat(parts["t"]).double()
        hard = torch.cat(parts["n"]).double().view(n, k, -1)
        loss = reference_loss(q, t, 0.1, 4.0, sc.symmetric, hard)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses[step] = float(loss.detach())
    return {name: p.detach().clone() for name, p in model.named_parameters()}, losses


@pytest.fixture(scope="module")
def toy_runs():
    run = helpers.run_ranks(_toy_rank, 2, [0, 2, 3], timeout_s=200)
    assert run.all_ok(), run.describe()
    return {rank: run.value(rank) for rank in (0, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_non_finite_cached_gradient_on_one_rank_skips_on_every_rank_before_pass_2(toy_runs, stage):
    for rank in (0, 1):
        skipped, reason, ran_pass_2 = toy_runs[rank][stage]["skipped"][1]
        assert skipped and not ran_pass_2, (rank, reason)
        assert reason == "non-finite embedding gradient on rank 1: step skipped before the backward pass"
        diff = toy_runs[rank][stage]["diffs"][1]
        assert diff == {"params": 0.0, "optimizer": 0.0, "adam_steps_equal": True, "lr_equal": True}, diff


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_non_finite_parameter_gradient_on_one_rank_skips_the_update_on_every_rank(toy_runs, stage):
    for rank in (0, 1):
        skipped, reason, ran_pass_2 = toy_runs[rank][stage]["skipped"][2]
        assert skipped and ran_pass_2, (rank, reason)
        assert reason.startswith("non-finite parameter gradient"), reason
        diff = toy_runs[rank][stage]["diffs"][2]
        assert diff == {"params": 0.0, "optimizer": 0.0, "adam_steps_equal": True, "lr_equal": True}, diff
        assert toy_runs[rank][stage]["ds_skipped_steps"] == 1  # DeepSpeed's own bookkeeping saw one skip


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_steps_after_skips_still_equal_plain_torch_on_the_global_batch(toy_runs, stage):
    """No half-done reduction or stale gradient survives a skip: the following steps are
    still exactly those of a reference that never saw the skipped batches."""
    sc = Scenario(f"z{stage}", stage=stage)
    want_params, want_losses = _reference_skipping(sc, 2, TOY_SKIPPED)
    for rank in (0, 1):
        got = toy_runs[rank][stage]
        assert all(d["params"] > 0 for s, d in got["diffs"].items() if s not in TOY_SKIPPED)
        for step, loss in want_losses.items():
            assert abs(got["losses"][step] - loss) <= TOL, (step, got["losses"][step], loss)
        worst = max(float((got["params"][k] - want_params[k]).abs().max()) for k in want_params)
        assert worst <= TOL, worst


def test_plain_torch_backend_skips_a_non_finite_gradient():
    sc = Scenario("torch", sizes=(8,), query_chunk=3, target_chunk=5, negatives=1)
    torch.manual_seed(0)
    model = ToyEncoder(dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    backend = TorchStepBackend(model, opt)
    qc, tc, nc = rank_chunks(sc, 0, 0)
    gradcache_step(backend, qc, tc, objective_of(sc), nc, 1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    real_backward = backend.backward
    backend.backward = lambda s, last: real_backward(s * float("inf"), last)
    res = gradcache_step(backend, qc, tc, objective_of(sc), nc, 1)
    assert res.skipped and res.skip_reason.startswith("non-finite parameter gradient"), res.skip_reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in opt.state[next(model.parameters())].items())
    assert all(p.grad is None for p in model.parameters())
    assert STEPS == 3  # the imported scenario helpers are the exactness suite's


# ------------------------------------------------------------------ through train()

# step -> (kind, rank); with optim.max_consecutive_skips=2 the run stops at step 5.
LMM_PLAN = {2: ("embedding", 1), 4: ("param_grad", 1), 5: ("embedding", 0)}


@pytest.fixture(scope="module")
def lmm_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("numerics") / "run"
    ov = helpers.overrides(assets, run_dir, **{"schedule.max_steps": 6, "checkpoint.every_steps": 0,
                                              "export.at_end": "false", "optim.max_consecutive_skips": 2})
    run = helpers.run_ranks(helpers.numerics_rank, 2, ov, LMM_PLAN, timeout_s=200)
    assert run.all_ok(), run.describe()
    return {"run_dir": run_dir, 0: run.value(0), 1: run.value(1), "wall_s": run.wall_s}


@pytest.mark.slow
def test_lmm_skipped_steps_leave_parameters_and_optimizer_state_untouched(lmm_run):
    untouched = {"params": 0.0, "optimizer": 0.0, "adam_steps_equal": True, "lr_equal": True}
    for rank in (0, 1):
        diffs, skipped = lmm_run[rank]["diffs"], lmm_run[rank]["skipped"]
        assert [skipped[s][0] for s in (1, 2, 3, 4, 5)] == [False, True, False, True, True]
        assert "non-finite loss on rank 1" in skipped[2][1] and "before the backward pass" in skipped[2][1]
        assert skipped[4][1].startswith("non-finite parameter gradient"), skipped[4][1]
        assert diffs[2] == untouched and diffs[4] == untouched and diffs[5] == untouched, diffs
        for s in (1, 3):  # real steps in between really moved
            assert diffs[s]["params"] > 0 and diffs[s]["optimizer"] > 0 and not diffs[s]["adam_steps_equal"]


@pytest.mark.slow
def test_lmm_skips_are_counted_in_metrics_and_logged(lmm_run):
    recs = helpers.records(lmm_run["run_dir"])
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["skipped_step"] for r in recs] == [0, 1, 0, 1, 1]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1, 2, 3]
    assert recs[1]["loss"] is None and isinstance(recs[2]["loss"], float)  # NaN is written as null
    assert recs[3]["grad_norm"] is None and "non-finite parameter gradient" in recs[3]["skip_reason"]
    assert "skip_reason" not in recs[0]
    log = (lmm_run["run_dir"] / "rank0.log").read_text()
    assert "step 2 skipped: non-finite loss on rank" in log and "1 in a row, 1 in total" in log, log
    assert "step 4 skipped: non-finite parameter gradient" in log, log


@pytest.mark.slow
def test_lmm_consecutive_skips_stop_every_rank_with_a_clear_message(lmm_run):
    for rank in (0, 1):
        error = lmm_run[rank]["error"]
        assert error.startswith("NonFiniteLossError: step 5: 2 optimizer steps in a row were skipped"), error
        assert "optim.max_consecutive_skips=2" in error and "Lower optim.lr" in error, error


def test_max_consecutive_skips_is_validated():
    from llave_ds.config import ConfigError, load_config
    from llave_ds.train import TrainConfig
    with pytest.raises(ConfigError, match="max_consecutive_skips must be >= 1"):
        load_config(TrainConfig, helpers.DEMO_CONFIG, ["optim.max_consecutive_skips=0"])
    assert TrainConfig().optim.max_consecutive_skips == 5
