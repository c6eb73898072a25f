"""The reject threshold: chosen so that no calibration set of real digits loses more than its share."""

from __future__ import annotations

import numpy as np

from digitrec.calibrate import choose_threshold


def test_the_threshold_protects_the_least_confident_set_of_digits():
    rng = np.random.default_rng(0)
    sure, shaky = rng.beta(30, 1, 5000), rng.beta(6, 1, 600)
    pooled = choose_threshold(np.concatenate([sure, shaky]), max_digit_rejection=0.005)
    per_set = choose_threshold([sure, shaky], max_digit_rejection=0.005)
    assert per_set < pooled  # pooling lets the big, confident set hide the shaky one
    assert (shaky < per_set).mean() <= 0.0051 and (sure < per_set).mean() <= 0.0051
    assert (shaky < pooled).mean() > 0.01


def test_one_array_still_works_and_the_cut_is_bounded():
    assert choose_threshold(np.ones(100)) == 0.99
    assert choose_threshold([np.zeros(10), np.ones(10)]) == 0.0
