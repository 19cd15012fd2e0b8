"""Cross-rank negatives: W ranks must equal one rank holding the whole global batch.

Each scenario runs on real gloo ranks (spawned processes) in float64; the reference is
the independent naive loss of ``tests/reference_loss.py`` on the concatenated batch.
"""
import pytest
import torch
import torch.nn.functional as F

from llave_ds.core.gather import GatherMode, RankMismatchError, all_gather_rows
from llave_ds.core.objective import hardness_weighted_loss
from tests.distributed_harness import run_distributed
from tests.reference_loss import (prefix_normalised, reference_loss, reference_loss_sum, reference_matryoshka_loss,
                                  reference_matryoshka_loss_sum)

D = 8
# name, per-rank sizes (W = len), symmetric, hard negatives K, delta, mode
SCENARIOS = [
    ("sym_exact", (3, 3), True, 0, None, "exact"),
    ("qt_exact_hard", (3, 3), False, 2, None, "exact"),
    ("sym_exact_hard_fn", (4, 4), True, 2, 0.9, "exact"),
    ("sym_exact_uneven", (4, 2), True, 1, None, "exact"),
    ("qt_exact_empty_rank", (3, 0), False, 0, None, "exact"),
    ("sym_stopgrad", (3, 3), True, 1, None, "stop_grad"),
    ("qt_stopgrad_uneven", (2, 4), False, 0, None, "stop_grad"),
    ("sym_local_hard", (3, 3), True, 1, None, "local"),
    ("qt_local_uneven", (4, 2), False, 0, None, "local"),
]
SCENARIOS_W3 = [
    ("sym_exact_w3", (2, 3, 2), True, 1, None, "exact"),
    ("qt_stopgrad_w3", (2, 2, 2), False, 0, None, "stop_grad"),
]
TAU, ALPHA = 0.05, 6.0


def global_batch(sizes, k, delta, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    q = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    hard = F.normalize(torch.randn(n, k, D, generator=g, dtype=torch.float64), dim=-1) if k else None
    if delta is not None and n > 5:
        t[5] = F.normalize(t[0] + 0.05 * t[5], dim=0)  # a false negative across ranks
    return q, t, hard


def _run_scenarios(rank, world, scenarios):
    results = {}
    for i, (name, sizes, symmetric, k, delta, mode) in enumerate(scenarios):
        q, t, hard = global_batch(sizes, k, delta, seed=100 + i)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        ql, tl = q[lo:hi].clone().requires_grad_(True), t[lo:hi].clone().requires_grad_(True)
        hl = hard[lo:hi].clone().requires_grad_(True) if k else None
        out = hardness_weighted_loss(ql, tl, temperature=TAU, alpha=ALPHA, symmetric=symmetric,
                                     hard_negatives=hl, false_negative_threshold=delta,
                                     gather_mode=mode)
        out.loss.backward()
        results[name] = dict(loss=out.loss.detach(), gq=ql.grad, gt=tl.grad,
                             gh=hl.grad if k else None,
                             stats=(out.positive_similarity, out.hardest_negative_similarity,
                                    out.accuracy))
    return results


def _check(outcomes, scenarios):
    for i, (name, sizes, symmetric, k, delta, mode) in enumerate(scenarios):
        q, t, hard = global_batch(sizes, k, delta, seed=100 + i)
        n, dirs = sum(sizes), 2 if symmetric else 1
        single = hardness_weighted_loss(q, t, temperature=TAU, alpha=ALPHA, symmetric=symmetric,
                                        hard_negatives=hard, false_negative_threshold=delta)
        for rank, out in enumerate(outcomes):
            got = out.value[name]
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            leaves = [x.clone().requires_grad_(True) for x in (q, t)]
            hleaf = hard.clone().requires_grad_(True) if k else None
            if mode == "local":
                # No cross-rank negatives: every rank's rows against its own candidates,
                # normalised by the global row count.
                total = 0.0
                for r in range(len(sizes)):
                    a, b = sum(sizes[:r]), sum(sizes[:r + 1])
                    total = total + reference_loss_sum(leaves[0][a:b], leaves[1][a:b], range(b - a), TAU, ALPHA,
                                                       symmetric, hleaf[a:b] if k else None, delta)
                share = total / (n * dirs)
                share.backward()
                want_loss = share.detach()
            elif mode == "exact":
                # One device holding the global batch: its gradient, sliced to this rank.
                ref = reference_loss(*leaves, TAU, ALPHA, symmetric, hleaf, delta)
                ref.backward()
                want_loss = ref.detach()
            else:
                # stop_grad: this rank's rows only, every other rank's embeddings constant.
                def mixed(x):
                    return torch.cat([x[:lo].detach(), x[lo:hi], x[hi:].detach()])
                share = reference_loss_sum(mixed(leaves[0]), mixed(leaves[1]), range(lo, hi),
                                           TAU, ALPHA, symmetric,
                                           mixed(hleaf) if k else None, delta) / (n * dirs)
                share.backward()
                want_loss = reference_loss(q, t, TAU, ALPHA, symmetric, hard, delta)
            torch.testing.assert_close(got["loss"], want_loss, rtol=1e-10, atol=1e-10,
                                       msg=f"{name} rank {rank}: loss")
            torch.testing.assert_close(got["gq"], leaves[0].grad[lo:hi], rtol=1e-8, atol=1e-12,
                                       msg=f"{name} rank {rank}: query grads")
            torch.testing.assert_close(got["gt"], leaves[1].grad[lo:hi], rtol=1e-8, atol=1e-12,
                                       msg=f"{name} rank {rank}: target grads")
            if k:
                torch.testing.assert_close(got["gh"], hleaf.grad[lo:hi], rtol=1e-8, atol=1e-12,
                                           msg=f"{name} rank {rank}: hard-negative grads")
            if mode == "local":
                continue  # statistics are over local candidates: not the single-process ones
            for g, w in zip(got["stats"], (single.positive_similarity,
                                           single.hardest_negative_similarity, single.accuracy)):
                torch.testing.assert_close(g, w, msg=f"{name} rank {rank}: statistics")


def test_two_ranks_equal_one_big_rank():
    outcomes = run_distributed(_run_scenarios, 2, SCENARIOS, timeout_s=120)
    _check(outcomes, SCENARIOS)


def test_three_ranks_equal_one_big_rank():
    outcomes = run_distributed(_run_scenarios, 3, SCENARIOS_W3, timeout_s=120)
    _check(outcomes, SCENARIOS_W3)


def test_stop_grad_differs_from_exact():
    """The documented difference is real: stop_grad drops remote rows' terms."""
    outcomes = run_distributed(_run_same_data_two_modes, 2, timeout_s=120)
    for out in outcomes:
        exact, stop = out.value
        torch.testing.assert_close(exact["loss"], stop["loss"])
        assert (exact["gt"] - stop["gt"]).abs().max() > 1e-6


MATRYOSHKA = [(2, 0.5), (5, 1.0), (D, 1.0)]
MATRYOSHKA_SCENARIOS = [   # name, per-rank sizes, symmetric, K, delta, mode
    ("m_sym_exact_hard_fn", (4, 3), True, 2, 0.9, "exact"),
    ("m_qt_stopgrad", (3, 3), False, 1, None, "stop_grad"),
]


def _run_matryoshka(rank, world):
    results = {}
    for i, (name, sizes, symmetric, k, delta, mode) in enumerate(MATRYOSHKA_SCENARIOS):
        q, t, hard = global_batch(sizes, k, delta, seed=300 + i)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        leaves = [x[lo:hi].clone().requires_grad_(True) for x in (q, t)]
        hl = hard[lo:hi].clone().requires_grad_(True) if k else None
        out = hardness_weighted_loss(*leaves, temperature=TAU, alpha=ALPHA, symmetric=symmetric, hard_negatives=hl,
                                     false_negative_threshold=delta, gather_mode=mode, matryoshka=MATRYOSHKA)
        out.loss.backward()
        results[name] = dict(loss=out.loss.detach(), grads=[x.grad for x in leaves] + ([hl.grad] if k else []),
                             stats=out.stats())
    return results


def test_matryoshka_two_ranks_equal_one_big_rank():
    """Matryoshka sizes over 2 gloo ranks (gathered once, at full width): loss, per-size losses
    and every gradient equal the naive reference on the global batch. The reference also
    re-normalises the full width, which removes the radial part of that term's gradient; the
    embedder's normalisation removes it downstream of ours, so ours is compared projected."""
    outcomes = run_distributed(_run_matryoshka, 2, timeout_s=120)
    for i, (name, sizes, symmetric, k, delta, mode) in enumerate(MATRYOSHKA_SCENARIOS):
        q, t, hard = global_batch(sizes, k, delta, seed=300 + i)
        n, dirs = sum(sizes), 2 if symmetric else 1
        for rank, out in enumerate(outcomes):
            got = out.value[name]
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            leaves = [x.clone().requires_grad_(True) for x in (q, t)] + ([hard.clone().requires_grad_(True)] if k else [])
            if mode == "exact":
                ref = reference_matryoshka_loss(leaves[0], leaves[1], TAU, ALPHA, symmetric, MATRYOSHKA,
                                                leaves[2] if k else None, delta)
            else:
                def mixed(x):
                    return torch.cat([x[:lo].detach(), x[lo:hi], x[hi:].detach()])
                ref = reference_matryoshka_loss_sum(mixed(leaves[0]), mixed(leaves[1]), range(lo, hi), TAU, ALPHA,
                                                    symmetric, MATRYOSHKA, mixed(leaves[2]) if k else None,
                                                    delta) / (n * dirs)
            ref.backward()
            want_loss = reference_matryoshka_loss(q, t, TAU, ALPHA, symmetric, MATRYOSHKA, hard, delta)
            torch.testing.assert_close(got["loss"], want_loss, rtol=1e-10, atol=1e-10, msg=f"{name} rank {rank}")
            for g, leaf in zip(got["grads"], leaves):
                x = leaf.detach()[lo:hi]
                radial_free = g - (g * x).sum(-1, keepdim=True) * x        # the normalisation's projection
                torch.testing.assert_close(radial_free, leaf.grad[lo:hi], rtol=1e-8, atol=1e-12,
                                           msg=f"{name} rank {rank}: gradients")
            for size, _ in MATRYOSHKA:
                one = reference_matryoshka_loss(q, t, TAU, ALPHA, symmetric, [(size, 1.0)], hard, delta)
                assert abs(got["stats"][f"loss_d{size}"] - float(one)) < 1e-5 * float(one), (name, size)
    assert prefix_normalised(q, D).sub(q).abs().max() < 1e-12   # the rows are unit vectors


def _run_same_data_two_modes(rank, world):
    res = []
    for mode in ("exact", "stop_grad"):
        q, t, _ = global_batch((3, 3), 0, None, seed=7)
        ql, tl = q[3 * rank:3 * rank + 3].requires_grad_(True), t[3 * rank:3 * rank + 3].requires_grad_(True)
        out = hardness_weighted_loss(ql, tl, temperature=TAU, alpha=ALPHA, gather_mode=mode)
        out.loss.backward()
        res.append(dict(loss=out.loss.detach(), gt=tl.grad))
    return res


def _mismatched_width(rank, world):
    x = torch.randn(2, 4 + rank, requires_grad=True)
    all_gather_rows(x, GatherMode.EXACT)


def test_mismatched_widths_are_refused_on_every_rank():
    outcomes = run_distributed(_mismatched_width, 2, timeout_s=90, expect_errors=True)
    for out in outcomes:
        assert not out.ok
        assert "RankMismatchError" in out.error and "incompatible shapes" in out.error


def _one_rank_skips_the_loss(rank, world):
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    if rank == 0:
        hardness_weighted_loss(x, x, gather_mode="exact")


def test_a_rank_that_skips_the_collective_fails_within_the_timeout():
    """Rank 1 never joins the gather: rank 0 must error out (collective timeout), not hang."""
    outcomes = run_distributed(_one_rank_skips_the_loss, 2, timeout_s=90,
                               collective_timeout_s=5, expect_errors=True)
    assert not outcomes[0].ok


def test_single_process_gather_is_identity():
    x = torch.randn(3, 4)
    y, layout = all_gather_rows(x)
    assert y is x and layout.offset == 0 and layout.total == 3
    with pytest.raises(ValueError):
        GatherMode("nope")
    assert RankMismatchError.__mro__[1] is RuntimeError
