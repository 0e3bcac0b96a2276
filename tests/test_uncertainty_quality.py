"""benchmarks/uncertainty_quality.py's measures, by hand on small inputs: AUROC, the error deciles, the candidate
case scores, the flip test-time augmentation and the temperature fit."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import monai_dualssl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import uncertainty_quality as uq  # noqa: E402


def test_auroc_by_hand():
    # positives 0.3 and 0.8 against negatives 0.1 and 0.35: 3 of the 4 pairs ordered right
    assert uq.auroc(np.array([0.1, 0.3, 0.35, 0.8]), np.array([False, True, False, True])) == 0.75
    assert uq.auroc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5  # a tie counts half
    assert math.isnan(uq.auroc(np.array([0.1, 0.2]), np.array([False, False])))


def test_error_by_decile_orders_by_the_map():
    values = np.arange(20.0)[::-1]  # the last voxels are the most certain
    error = np.array([True] * 2 + [False] * 18)  # the two most uncertain are the errors
    rates = uq.error_by_decile(values, error)
    assert rates == [0.0] * 9 + [1.0]


def _uncertainty(p_fg: list[float]) -> torch.Tensor:
    """``DualNet(output="uncertainty")`` output of both networks giving foreground probability ``p_fg``, [1, 4, 1, 1, N]."""
    p = torch.tensor(p_fg).reshape(1, 1, 1, 1, -1)
    logits = torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], 1)
    return monai_dualssl.ensemble_uncertainty(logits, logits)


def test_candidate_case_scores_by_hand():
    u = _uncertainty([0.9, 0.6, 0.2, 0.1])  # predicted foreground: the first two voxels
    scores = uq.candidate_scores(u, margin=0)
    assert scores["expected_dice_error"] == pytest.approx(1 - (2 * 1.5 + 1) / (1.8 + 2 + 1))  # one voxel of smoothing
    h = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q))  # noqa: E731
    assert scores["entropy per predicted voxel"] == pytest.approx((h(0.9) + h(0.6)) / 2, rel=1e-5)
    # margin 1 takes the third voxel into the region, still per predicted voxel
    assert uq.candidate_scores(u, margin=1)["entropy per predicted voxel"] == pytest.approx((h(0.9) + h(0.6) + h(0.2)) / 2, rel=1e-5)


def test_flip_tta_is_silent_for_a_flip_equivariant_model_and_not_otherwise():
    image = torch.rand(1, 1, 4, 3, 2)
    inferer = lambda x, network: network(x)  # noqa: E731
    pointwise = lambda x: monai_dualssl.ensemble_uncertainty(torch.cat([x, -x], 1), torch.cat([x, -x], 1))  # noqa: E731
    h, mi = uq.flip_tta(inferer, image, pointwise)
    u = pointwise(image)
    np.testing.assert_allclose(h, u[0, 2].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mi, 0, atol=1e-6)
    # a model that looks at the position: the flips disagree, the mutual information is positive, and each
    # flipped output is flipped back (the mean is symmetric under any flip)
    ramp = torch.linspace(-3, 3, 4).reshape(1, 1, 4, 1, 1)
    positional = lambda x: pointwise(x * 0 + ramp)  # noqa: E731
    h, mi = uq.flip_tta(inferer, image, positional)
    assert (mi > 1e-3).all()
    np.testing.assert_allclose(h, np.flip(h, 0), rtol=1e-5)


def test_fit_temperature_recovers_the_scale_of_over_confident_logits():
    torch.manual_seed(0)
    calibrated = torch.randn(20000, 3)
    target = torch.distributions.Categorical(logits=calibrated).sample()
    assert uq.fit_temperature(2 * calibrated, target) == pytest.approx(2.0, rel=0.06)  # the grid's step is ~5 %


def test_the_region_of_the_voxel_auroc_with_and_without_a_margin():
    u = _uncertainty([0.9, 0.1, 0.1, 0.1, 0.1])
    label = torch.tensor([0, 0, 0, 1, 0]).reshape(1, 1, 1, 1, -1)
    assert uq.case_maps(u, label, margin=0)["region"].ravel().tolist() == [True, False, False, True, False]
    assert uq.case_maps(u, label, margin=1)["region"].ravel().tolist() == [True, True, True, True, True]
    assert uq.case_maps(u, label, margin=0)["error"].tolist() == [True, True]  # both region voxels are wrong


def test_held_out_combination_learns_the_map_that_finds_the_errors_and_scores_only_unseen_cases():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=400) for _ in range(3)]
    noise = [1e5 * rng.normal(size=400) for _ in range(3)]  # standardised: its scale does not swamp the fit
    error = [x > 0.5 for x in a]
    scores = uq.held_out_combination({"noise": noise, "a": a}, error, every=2)
    assert scores.shape == (1200,) and uq.auroc(scores, np.concatenate(error)) > 0.99
    # the errors lie on the other side in the second case: a model fitted on the first case ranks them last,
    # one that had seen the case would not
    a = [rng.normal(size=400) for _ in range(2)]
    error = [a[0] > 0.5, a[1] < -0.5]
    scores = uq.held_out_combination({"a": a}, error)
    assert uq.auroc(scores[:400], error[0]) < 0.01 and uq.auroc(scores[400:], error[1]) < 0.01
