"""The reject threshold: chosen so that no calibration set of real digits loses more than its share; the
temperature: the minimum of the validation NLL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from digitrec.calibrate import choose_threshold, fit_temperature


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


@pytest.mark.parametrize("true_temperature", [0.6, 1.7, 2.9])
def test_the_temperature_is_the_nll_minimum_to_a_tenth_of_a_percent(true_temperature):
    """fit_temperature's grids promise the minimum to 0.1%; an off-the-shelf 1-D minimizer finds the reference."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2000, 10, generator=generator) * 4
    labels = torch.distributions.Categorical(logits=logits / true_temperature).sample()

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(logits.double() / np.exp(log_t), labels).item()

    reference = float(
        np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded", options={"xatol": 1e-7}).x)
    )
    assert reference == pytest.approx(true_temperature, rel=0.1)
    assert fit_temperature(logits, labels) == pytest.approx(reference, rel=1e-3)
