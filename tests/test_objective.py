"""The LLaVE loss on one process, against an independent float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from llave_ds.core.objective import ObjectiveConfig, hardness_weighted_loss, weighted_logits
from tests.reference_loss import reference_loss


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
