"""``llave-ds mine`` (issue 28): the exact blocked search against numpy, the positive-aware
selection rule on hand-made candidate lists, and the whole command on the synthetic task
(the one-attribute neighbours are found, copies of the positive never are, 1 and 2 ranks
write the same files, a killed run resumes to the same files)."""
from __future__ import annotations

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
