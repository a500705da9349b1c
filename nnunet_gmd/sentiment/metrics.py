"""MMSA's regression metrics for MOSI/MOSEI, with MMSA's exact definitions.

Follows ``MetricsTop.__eval_mosei_regression`` in MMSA's ``utils/metricsTop.py`` so numbers are comparable
with published tables. The details that change numbers:

* ``Mult_acc_7`` / ``Mult_acc_5`` clip predictions *and* labels to [-3, 3] / [-2, 2] before rounding, and
  round with ``np.round`` (half to even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2).
* ``Has0_*`` splits at ``>= 0`` (negative vs non-negative) over all samples; ``Non0_*`` drops samples whose
  label is exactly 0 and splits at ``> 0``.
* F1 is sklearn's weighted F1 called as ``f1_score(truth, preds)`` (weights are the *true* class supports;
  swapping the arguments changes the value). Accuracy is symmetric in its arguments.
* ``Corr`` is Pearson's r (NaN when predictions are constant). Values are not rounded here; MMSA rounds to 4
  decimals only when printing, which the Markdown report does too.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

METRIC_NAMES: tuple[str, ...] = ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5",
                                 "Mult_acc_7", "MAE", "Corr")


def multiclass_acc(preds: np.ndarray, truth: np.ndarray) -> float:
    """Share of samples whose rounded (half to even) prediction equals the rounded label."""
    return float(np.sum(np.round(preds) == np.round(truth)) / float(len(truth)))


def mmsa_regression_metrics(preds: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """All eight MMSA metrics for 1-D predictions and labels. ``Non0_*`` are NaN when every label is 0."""
    preds = np.asarray(preds, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1)
    if preds.shape != truth.shape or preds.size == 0:
        raise ValueError(f"need equally many predictions and labels (> 0), got {preds.size} and {truth.size}")

    mae = float(np.mean(np.absolute(preds - truth)))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = float(np.corrcoef(preds, truth)[0][1]) if preds.size > 1 else float("nan")
    mult_a7 = multiclass_acc(np.clip(preds, -3.0, 3.0), np.clip(truth, -3.0, 3.0))
    mult_a5 = multiclass_acc(np.clip(preds, -2.0, 2.0), np.clip(truth, -2.0, 2.0))

    non_zeros = truth != 0
    if non_zeros.any():
        nz_truth, nz_preds = truth[non_zeros] > 0, preds[non_zeros] > 0
        non0_acc2 = float(accuracy_score(nz_preds, nz_truth))
        non0_f1 = float(f1_score(nz_truth, nz_preds, average="weighted", zero_division=0))
    else:
        non0_acc2 = non0_f1 = float("nan")

    binary_truth, binary_preds = truth >= 0, preds >= 0
    has0_acc2 = float(accuracy_score(binary_preds, binary_truth))
    has0_f1 = float(f1_score(binary_truth, binary_preds, average="weighted", zero_division=0))
    return {
        "Has0_acc_2": has0_acc2,
        "Has0_F1_score": has0_f1,
        "Non0_acc_2": non0_acc2,
        "Non0_F1_score": non0_f1,
        "Mult_acc_5": mult_a5,
        "Mult_acc_7": mult_a7,
        "MAE": mae,
        "Corr": corr,
    }
