"""The LLaVE loss on one process, against an independent float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from llave_ds.core.objective import ObjectiveConfig, _direction, hardness_weighted_loss, weighted_logits
from tests.reference_loss import reference_loss, reference_matryoshka_loss


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def leaf(x):
    return x.clone().requires_grad_(True)


CASES = [
    # tau, alpha, symmetric, hard negatives K, false-negative delta
    (0.02, 9.0, True, 0, None),
    (0.02, 9.0, False, 0, None),
    (0.05, 0.0, True, 2, None),
    (0.1, 3.5, False, 3, None),
    (0.3, 12.0, True, 1, 0.9),
    (0.07, 5.0, False, 2, 0.9),
]


@pytest.mark.parametrize("tau,alpha,symmetric,k,delta", CASES)
def test_loss_and_gradients_match_float64_reference(tau, alpha, symmetric, k, delta):
    b, d = 6, 16
    q, t = unit(b, d, seed=1), unit(b, d, seed=2)
    hard = unit(b, k, d, seed=3) if k else None
    if delta is not None:
        # Plant false negatives: near-copies of another pair's target, among the
        # in-batch candidates and among the hard negatives.
        t[4] = F.normalize(t[1] + 0.05 * t[4], dim=0)
        hard[2, 0] = F.normalize(t[2] + 0.05 * hard[2, 0], dim=0)
    args = [leaf(q), leaf(t)] + ([leaf(hard)] if k else [])
    out = hardness_weighted_loss(args[0], args[1], temperature=tau, alpha=alpha,
                                 symmetric=symmetric, hard_negatives=args[2] if k else None,
                                 false_negative_threshold=delta)
    out.loss.backward()
    ref_args = [leaf(q), leaf(t)] + ([leaf(hard)] if k else [])
    ref = reference_loss(ref_args[0], ref_args[1], tau, alpha, symmetric,
                         ref_args[2] if k else None, delta)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(args, ref_args):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)


def test_false_negative_filter_changes_the_loss_only_when_triggered():
    q, t = unit(5, 8, seed=4), unit(5, 8, seed=5)
    base = hardness_weighted_loss(q, t, temperature=0.05, alpha=2.0).loss
    same = hardness_weighted_loss(q, t, temperature=0.05, alpha=2.0, false_negative_threshold=0.999).loss
    torch.testing.assert_close(base, same)
    t2 = t.clone()
    t2[3] = t2[0]  # an exact duplicate target: a false negative for pair 0 and pair 3
    with_dup = hardness_weighted_loss(q, t2, temperature=0.05, alpha=2.0).loss
    filtered = hardness_weighted_loss(q, t2, temperature=0.05, alpha=2.0, false_negative_threshold=0.95).loss
    assert filtered < with_dup


@pytest.mark.parametrize("symmetric", [False, True])
def test_alpha_zero_is_infonce(symmetric):
    q, t = unit(7, 12, seed=6, dtype=torch.float32), unit(7, 12, seed=7, dtype=torch.float32)
    tau = 0.05
    labels = torch.arange(7)
    want = F.cross_entropy(q @ t.T / tau, labels)
    if symmetric:
        want = (want + F.cross_entropy(t @ q.T / tau, labels)) / 2
    got = hardness_weighted_loss(q, t, temperature=tau, alpha=0.0, symmetric=symmetric).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_default_call_form_and_alpha_raises_loss():
    q, t = unit(8, 32, seed=8, dtype=torch.float32), unit(8, 32, seed=9, dtype=torch.float32)
    out = hardness_weighted_loss(q, t)  # tau=0.02, alpha=9, symmetric
    infonce = hardness_weighted_loss(q, t, alpha=0.0)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    # The hardness weights change every negative's term, so the loss must change.
    assert not torch.allclose(out.loss, infonce.loss)


def test_negative_gradient_share_grows_as_exp_alpha_s():
    """d loss / d s_j for two negatives: ratio = exp((alpha + 1/tau)(s_j - s_k)); with
    alpha = 0 it is exp((s_j - s_k)/tau): the hardness weight multiplies by exp(alpha dS)."""
    tau = 0.05
    s = torch.tensor([[0.8, 0.6, 0.3, -0.2, 0.1]], dtype=torch.float64)
    positive = torch.zeros_like(s, dtype=torch.bool)
    positive[0, 0] = True
    grads = {}
    for alpha in (0.0, 9.0):
        sim = s.clone().requires_grad_(True)
        F.cross_entropy(weighted_logits(sim, positive, tau, alpha), torch.tensor([0])).backward()
        grads[alpha] = sim.grad[0]
        assert grads[alpha][0] < 0 and (grads[alpha][1:] > 0).all()  # pull positive, push negatives
    for j, k in [(1, 2), (1, 3), (4, 3)]:
        ds = float(s[0, j] - s[0, k])
        ratio_infonce = float(grads[0.0][j] / grads[0.0][k])
        ratio_weighted = float(grads[9.0][j] / grads[9.0][k])
        assert math.isclose(ratio_infonce, math.exp(ds / tau), rel_tol=1e-9)
        assert math.isclose(ratio_weighted, math.exp((9.0 + 1 / tau) * ds), rel_tol=1e-9)
        assert math.isclose(ratio_weighted / ratio_infonce, math.exp(9.0 * ds), rel_tol=1e-9)


def test_positive_is_never_weighted():
    """Scaling alpha must not change the positive's logit."""
    sim = torch.tensor([[0.5, 0.4], [0.1, 0.7]])
    pos = torch.eye(2, dtype=torch.bool)
    a = weighted_logits(sim, pos, 0.1, 0.0)
    b = weighted_logits(sim, pos, 0.1, 7.0)
    torch.testing.assert_close(a[pos], b[pos])
    torch.testing.assert_close(b[~pos], a[~pos] + 7.0 * sim[~pos])


def test_statistics():
    q = torch.eye(4)[:, :4].float()
    t = torch.eye(4).float()
    t[2] = F.normalize(torch.tensor([0.0, 1.0, 1.0, 0.0]), dim=0)  # pair 2 ties with pair 1's target
    out = hardness_weighted_loss(q, t, symmetric=False)
    s = q @ t.T
    pos = s.diag()
    hardest = s.masked_fill(torch.eye(4, dtype=torch.bool), float("-inf")).max(1).values
    torch.testing.assert_close(out.positive_similarity, pos.mean())
    torch.testing.assert_close(out.hardest_negative_similarity, hardest.mean())
    torch.testing.assert_close(out.gap, pos.mean() - hardest.mean())
    torch.testing.assert_close(out.accuracy, (pos > hardest).float().mean())
    assert set(out.stats()) >= {"loss", "pos_sim", "hardest_neg_sim", "gap", "acc"}


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        hardness_weighted_loss(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="hard_negatives"):
        hardness_weighted_loss(unit(3, 4), unit(3, 4), hard_negatives=unit(2, 1, 4))


@pytest.mark.parametrize("field,value,msg", [("temperature", -0.1, "temperature"),
                                             ("alpha", -1.0, "alpha"),
                                             ("gather_mode", "sideways", "gather_mode"),
                                             ("false_negative_threshold", 1.5, "false_negative")])
def test_config_validation(field, value, msg):
    cfg = ObjectiveConfig(**{field: value})
    with pytest.raises(ValueError, match=msg):
        cfg.validate()


# --------------------------------------------------------------------------- Matryoshka

MATRYOSHKA_CASES = [
    # sizes [(size, weight)], tau, alpha, symmetric, hard negatives K, false-negative delta
    ([(4, 1.0), (8, 1.0), (16, 1.0)], 0.02, 9.0, True, 0, None),
    ([(2, 0.5), (6, 2.0), (16, 1.0)], 0.05, 4.0, False, 2, None),
    ([(3, 1.0), (16, 0.25)], 0.1, 6.0, True, 1, 0.8),
    ([(5, 1.0), (9, 1.0)], 0.07, 0.0, False, 3, 0.8),  # no full size; InfoNCE
]


@pytest.mark.parametrize("sizes,tau,alpha,symmetric,k,delta", MATRYOSHKA_CASES)
def test_matryoshka_matches_float64_reference(sizes, tau, alpha, symmetric, k, delta):
    """Every size's own re-normalised prefix, its own hardness weights and filter, weighted
    and summed: loss, gradients and the per-size losses against the naive reference. The
    leaves are raw (unnormalised) embeddings, as a model produces them: ours are normalised
    by F.normalize (as the embedder does) then truncated; the reference normalises each
    prefix of the raw rows by hand."""
    b, d = 6, 16
    g = torch.Generator().manual_seed(11)
    q, t = 3 * torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    hard = torch.randn(b, k, d, generator=g, dtype=torch.float64) if k else None
    if delta is not None:  # near-copies: false negatives at every size
        t[4] = t[1] + 0.02 * t[4]
        hard[2, 0] = 2 * t[2] + 0.02 * hard[2, 0]
    args = [leaf(q), leaf(t)] + ([leaf(hard)] if k else [])
    out = hardness_weighted_loss(F.normalize(args[0], dim=-1), F.normalize(args[1], dim=-1), temperature=tau,
                                 alpha=alpha, symmetric=symmetric,
                                 hard_negatives=F.normalize(args[2], dim=-1) if k else None,
                                 false_negative_threshold=delta, matryoshka=sizes)
    out.loss.backward()
    ref_args = [leaf(q), leaf(t)] + ([leaf(hard)] if k else [])
    ref = reference_matryoshka_loss(ref_args[0], ref_args[1], tau, alpha, symmetric, sizes,
                                    ref_args[2] if k else None, delta)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(args, ref_args):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)
    for size, _ in sizes:
        one = reference_matryoshka_loss(q, t, tau, alpha, symmetric, [(size, 1.0)], hard, delta)
        assert math.isclose(out.stats()[f"loss_d{size}"], float(one), rel_tol=1e-6)


def test_matryoshka_off_is_the_plain_loss_bit_for_bit():
    """Off (the default), the loss is the two directions' sums over the global row count, as
    before Matryoshka existed; the full width alone with weight 1 is the same bits."""
    q, t, hard = unit(6, 16, seed=14, dtype=torch.float32), unit(6, 16, seed=15, dtype=torch.float32), \
        unit(6, 2, 16, seed=16, dtype=torch.float32)
    runs = []
    for sizes in (None, [(16, 1.0)]):
        a, b, h = leaf(q), leaf(t), leaf(hard)
        out = hardness_weighted_loss(a, b, hard_negatives=h, false_negative_threshold=0.9, matryoshka=sizes)
        out.loss.backward()
        runs.append((out.loss.detach(), a.grad, b.grad, h.grad, out.stats()))
    a, b, h = leaf(q), leaf(t), leaf(hard)
    rows = torch.arange(6)
    plain = (_direction(a, b, rows, h, 0.02, 9.0, 0.9)[0] + _direction(b, a, rows, None, 0.02, 9.0, 0.9)[0]) / 12
    plain.backward()
    for got in runs:
        for x, y in zip(got[:4], (plain.detach(), a.grad, b.grad, h.grad)):
            assert torch.equal(x, y)
    assert "loss_d16" not in runs[0][4] and runs[1][4]["loss_d16"] == pytest.approx(runs[1][4]["loss"])


def test_matryoshka_weights_select_sizes_and_stats_are_the_largest_size():
    q, t = unit(6, 16, seed=17), unit(6, 16, seed=18)
    small = hardness_weighted_loss(F.normalize(q[:, :4], dim=-1), F.normalize(t[:, :4], dim=-1))
    only_small = hardness_weighted_loss(q, t, matryoshka=[(4, 1.0), (16, 0.0)])
    torch.testing.assert_close(only_small.loss, small.loss, rtol=1e-12, atol=1e-12)
    full = hardness_weighted_loss(q, t)
    both = hardness_weighted_loss(q, t, matryoshka=[(4, 1.0), (16, 1.0)])
    torch.testing.assert_close(both.loss, small.loss + full.loss, rtol=1e-12, atol=1e-12)
    for name in ("positive_similarity", "hardest_negative_similarity", "accuracy"):
        torch.testing.assert_close(getattr(only_small, name), getattr(full, name))


@pytest.mark.parametrize("dims,weights,msg", [
    ([64, 32], None, "must increase"),
    (["full", 64], None, r"matryoshka_dims\[0\] must be a positive integer or 'full' \(last only\)"),
    ([0, 64], None, r"matryoshka_dims\[0\]"),
    ([], None, "non-empty list"),
    ([64, "x"], None, r"matryoshka_dims\[1\]"),
    ([64, 128], [1.0], "one weight per size"),
    ([64, 128], [0.0, 0.0], "not all 0"),
    ([64, 128], [1.0, -1.0], ">= 0"),
    (None, [1.0], "matryoshka_dims is not"),
])
def test_matryoshka_config_validation(dims, weights, msg):
    cfg = ObjectiveConfig(matryoshka_dims=dims, matryoshka_weights=weights)
    with pytest.raises(ValueError, match=msg):
        cfg.validate()


def test_matryoshka_config_resolves_against_the_width():
    cfg = ObjectiveConfig(matryoshka_dims=["64", "128", "full"], matryoshka_weights=[1, 2, 1])
    cfg.validate()                       # a comma-list override's strings are sizes
    assert cfg.matryoshka_dims == [64, 128, "full"]
    assert cfg.matryoshka(256) == [(64, 1.0), (128, 2.0), (256, 1.0)]
    assert ObjectiveConfig().matryoshka(256) is None
    with pytest.raises(ValueError, match="at most 100"):
        cfg.matryoshka(100)
    with pytest.raises(ValueError, match="appear once"):
        cfg.matryoshka(128)              # "full" would repeat 128
    with pytest.raises(ValueError, match="do not fit embeddings of width 16"):
        hardness_weighted_loss(unit(3, 16), unit(3, 16), matryoshka=[(32, 1.0)])


def test_matryoshka_equals_sentence_transformers_matryoshka_loss():
    """An outside reference: sentence-transformers' ``MatryoshkaLoss`` around its
    ``MultipleNegativesRankingLoss`` with LLaVE's weighting (``hardness_mode="all_negatives"``,
    ``hardness_strength`` = alpha, ``scale`` = 1/tau), query->target with in-batch negatives,
    which is where the two formulations coincide (its hardness is query->target only, and its
    extra negatives join every query's denominator): loss and gradients of the raw rows."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    class Rows(torch.nn.Module):  # a "model" whose embeddings are rows of one parameter
        def __init__(self, table):
            super().__init__()
            self.table = torch.nn.Parameter(table)

        def forward(self, features):
            return {**features, "sentence_embedding": self.table[features["rows"]]}

    b, d, tau, alpha = 6, 16, 0.05, 9.0
    sizes = [(4, 0.5), (8, 1.0), (16, 2.0)]
    rows = Rows(torch.randn(2 * b, d, generator=torch.Generator().manual_seed(21), dtype=torch.float64))
    model = st.SentenceTransformer(modules=[rows], device="cpu")
    inner = MultipleNegativesRankingLoss(model, scale=1 / tau, hardness_mode="all_negatives", hardness_strength=alpha)
    theirs = MatryoshkaLoss(model, inner, matryoshka_dims=[s for s, _ in sizes], matryoshka_weights=[w for _, w in sizes])
    want = theirs([{"rows": torch.arange(b)}, {"rows": torch.arange(b, 2 * b)}], None)
    want.backward()
    want_grad, rows.table.grad = rows.table.grad.clone(), None
    e = F.normalize(rows.table, dim=-1)
    got = hardness_weighted_loss(e[:b], e[b:], temperature=tau, alpha=alpha, symmetric=False, matryoshka=sizes)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.table.grad, want_grad, rtol=1e-10, atol=1e-12)
