"""llave_ds.eval.analysis: Figure-1-style histograms (a valid PNG) and the Table-1-style gap table."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llave_ds.eval.analysis import gap_table, groups_from_scores, plot_similarity_histograms

GROUPS = {
    # InfoNCE-like: positives and hardest negatives close together.
    "InfoNCE": (np.array([0.50, 0.40, 0.30, 0.60]), np.array([0.46, 0.42, 0.22, 0.58])),
    # LLaVE-like: a wider gap.
    "LLaVE": (np.array([0.70, 0.60, 0.66, 0.80]), np.array([0.30, 0.56, 0.20, 0.42])),
}


def test_histogram_png_is_written(tmp_path):
    path = tmp_path / "figs" / "hist.png"
    out = plot_similarity_histograms(GROUPS, str(path), bins=20, title="pos vs hardest neg")
    assert out == str(path) and path.stat().st_size > 1000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
    assert width > height  # two panels side by side
    one = tmp_path / "one.png"
    plot_similarity_histograms({"only": GROUPS["LLaVE"]}, str(one))
    with Image.open(one) as img:
        assert img.format == "PNG" and img.size[0] < width


def test_gap_table_numbers():
    md = gap_table(GROUPS, margins=(0.0, 0.05))
    lines = md.strip().splitlines()
    assert lines[0] == "| group | queries | mean pos | mean hardest neg | mean gap | pos > neg + 0 | pos > neg + 0.05 |"
    # InfoNCE: pos mean 0.45, neg mean 0.42, gaps .04 -.02 .08 .02 -> mean .03; 3/4 > 0, 1/4 > 0.05
    assert "| InfoNCE | 4 | 0.450 | 0.420 | 0.030 | 0.750 | 0.250 |" in lines
    # LLaVE: pos mean 0.69, neg mean 0.37, gaps .40 .04 .46 .38 -> mean .32; 4/4 > 0, 3/4 > 0.05
    assert "| LLaVE | 4 | 0.690 | 0.370 | 0.320 | 1.000 | 0.750 |" in lines


def test_groups_from_scores_and_errors(tmp_path):
    s = np.array([[0.9, 0.1, 0.3], [0.2, 0.6, 0.5]])
    groups = groups_from_scores({"m": s, "ragged": [np.array([0.4]), np.array([0.5, 0.2])]})
    np.testing.assert_allclose(groups["m"][0], [0.9, 0.2])
    np.testing.assert_allclose(groups["m"][1], [0.3, 0.6])
    np.testing.assert_allclose(groups["ragged"][0], [0.5])   # single-candidate query left out
    assert "| m | 2 |" in gap_table(groups)
    with pytest.raises(ValueError, match="group 'bad'"):
        gap_table({"bad": (np.array([0.1, 0.2]), np.array([0.1]))})
    with pytest.raises(ValueError, match="empty"):
        plot_similarity_histograms({}, str(tmp_path / "x.png"))
