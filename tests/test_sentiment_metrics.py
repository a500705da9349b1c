"""MMSA metrics against values worked out by hand (comments show the arithmetic)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_gmd.sentiment.metrics import METRIC_NAMES, mmsa_regression_metrics, multiclass_acc

TRUTH = np.array([0.0, 2.0, -1.0, 3.0, 3.0, -2.0, 1.0, 0.0])
PREDS = np.array([0.5, 1.5, -0.4, 4.6, 2.4, 0.3, 2.5, -0.2])


def test_multiclass_accuracies_clip_then_round_half_to_even():
    m = mmsa_regression_metrics(PREDS, TRUTH)
    # 7 classes: preds clipped to [-3, 3] -> rounded [0, 2, -0, 3, 2, 0, 2, -0]; truth rounded [0, 2, -1, 3, 3, -2, 1, 0].
    # 0.5 -> 0 and 2.5 -> 2 (half to even), 4.6 -> clip 3 -> 3 matches truth 3: hits at 0, 1, 3, 7 -> 4/8.
    assert m["Mult_acc_7"] == 0.5
    # 5 classes: clip both to [-2, 2]: preds [0, 2, -0, 2, 2, 0, 2, -0], truth [0, 2, -1, 2, 2, -2, 1, 0]
    # 2.4 vs 3 now agree (both clip to 2): hits at 0, 1, 3, 4, 7 -> 5/8.
    assert m["Mult_acc_5"] == 0.625


def test_half_to_even_and_clipping_edge_cases_one_by_one():
    assert multiclass_acc(np.array([0.5]), np.array([0.0])) == 1.0  # half-up rounding would say 1 != 0
    assert multiclass_acc(np.array([2.5]), np.array([2.0])) == 1.0  # 2.5 -> 2
    assert multiclass_acc(np.array([1.5]), np.array([1.0])) == 0.0  # 1.5 -> 2
    assert multiclass_acc(np.array([-0.5]), np.array([0.0])) == 1.0  # -0.5 -> -0 == 0
    only = lambda p, t: mmsa_regression_metrics(np.array([p, 0.0]), np.array([t, 0.0]))  # noqa: E731
    assert only(3.6, 3.0)["Mult_acc_7"] == 1.0  # without the clip: round(3.6) = 4 != 3
    assert only(2.4, 3.0)["Mult_acc_7"] == 0.5 and only(2.4, 3.0)["Mult_acc_5"] == 1.0
    assert only(-2.6, -2.0)["Mult_acc_5"] == 1.0 and only(-2.6, -2.0)["Mult_acc_7"] == 0.5


def test_binary_metrics_with_and_without_zero_labels():
    m = mmsa_regression_metrics(PREDS, TRUTH)
    # Has0: truth >= 0 [T T F T T F T T], preds >= 0 [T T F T T T T F]: wrong at 5 and 7 -> 6/8.
    assert m["Has0_acc_2"] == pytest.approx(0.75)
    # Class T (support 6): TP 5, FP 1, FN 1 -> F1 5/6; class F (support 2): TP 1, FP 1, FN 1 -> 1/2.
    # Weighted by true support: (6 * 5/6 + 2 * 1/2) / 8 = 0.75.
    assert m["Has0_F1_score"] == pytest.approx(0.75)
    # Non0 drops truth == 0 (indices 0 and 7): truth > 0 [T F T T F T], preds > 0 [T F T T T T] -> 5/6.
    assert m["Non0_acc_2"] == pytest.approx(5 / 6)
    # Class T (support 4): TP 4, FP 1 -> 8/9; class F (support 2): TP 1, FN 1 -> 2/3; (4*8/9 + 2*2/3) / 6 = 22/27.
    assert m["Non0_F1_score"] == pytest.approx(22 / 27)


def test_zero_prediction_counts_as_positive_only_for_has0():
    m = mmsa_regression_metrics(np.array([0.0, 0.0]), np.array([0.3, 0.6]))
    assert m["Has0_acc_2"] == 1.0  # 0 >= 0
    assert m["Non0_acc_2"] == 0.0  # 0 > 0 is False


def test_f1_weights_by_true_support_not_predicted_support():
    truth = np.array([1.0, 1.0, 1.0, 1.0, -1.0])
    preds = np.array([1.0, 1.0, -1.0, -1.0, -1.0])
    m = mmsa_regression_metrics(preds, truth)
    # Class positive: TP 2, FN 2 -> F1 2/3 (support 4 in truth, 2 in preds);
    # class negative: TP 1, FP 2 -> F1 1/2 (support 1 in truth, 3 in preds).
    assert m["Has0_F1_score"] == pytest.approx((4 * 2 / 3 + 1 * 0.5) / 5)  # 19/30, MMSA's argument order
    assert m["Has0_F1_score"] != pytest.approx((2 * 2 / 3 + 3 * 0.5) / 5)  # 17/30, the swapped order
    assert m["Non0_F1_score"] == pytest.approx(19 / 30)


def test_mae_and_corr():
    m = mmsa_regression_metrics(PREDS, TRUTH)
    # |diff| = .5 .5 .6 1.6 .6 2.3 1.5 .2 -> 7.8 / 8
    assert m["MAE"] == pytest.approx(0.975)
    p, t = PREDS - PREDS.mean(), TRUTH - TRUTH.mean()
    assert m["Corr"] == pytest.approx((p * t).sum() / math.sqrt((p * p).sum() * (t * t).sum()))
    assert list(m) == list(METRIC_NAMES)


def test_degenerate_inputs_give_nan_not_a_crash():
    m = mmsa_regression_metrics(np.array([0.2, -0.1, 0.4]), np.zeros(3))
    assert math.isnan(m["Non0_acc_2"]) and math.isnan(m["Non0_F1_score"]) and math.isnan(m["Corr"])
    assert m["Has0_acc_2"] == pytest.approx(2 / 3)
    constant = mmsa_regression_metrics(np.ones(4), np.array([1.0, -1.0, 2.0, 0.0]))
    assert math.isnan(constant["Corr"]) and constant["MAE"] == pytest.approx(1.0)  # 0 + 2 + 1 + 1 over 4
    with pytest.raises(ValueError, match="equally many"):
        mmsa_regression_metrics(np.ones(3), np.ones(2))
