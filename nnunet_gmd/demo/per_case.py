"""One number per test case and method: mean Dice over the missing-modality subsets, and on the full set.

The method means in ``*_results.md`` average over a handful of test cases and hide how much the cases differ;
paired statistics (:mod:`nnunet_gmd.demo.paired`) need the per-case values. They come from the per-case metrics
that ``nnunet-gmd evaluate`` wrote beside each subset's predictions (``predictions/<subset>/summary.json``,
nnU-Net's ``compute_metrics`` format), so a finished run folder is all that is needed.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_gmd.errors import UserError
from nnunet_gmd.report import REPORT_JSON, load_report


@dataclass(frozen=True)
class CaseScores:
    """Per case id: Dice averaged over the regions and the ``n_missing`` subsets with an absent channel
    (``missing``), and averaged over the regions with every channel present (``full``). NaN where undefined."""

    cases: list[str]
    missing: dict[str, float]
    full: dict[str, float]
    n_missing: int
    regions: list[str]


def _nanmean(values: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # every value NaN: the mean stays NaN
        return float(np.nanmean(values)) if values else math.nan


def _case_of(prediction_file: str, cases: list[str]) -> str | None:
    name = Path(prediction_file).name
    matches = [c for c in cases if name == c or name.startswith(c + ".")]
    return max(matches, key=len) if matches else None


def _subset_dice(summary_path: Path, cases: list[str], n_regions: int) -> dict[str, list[float]]:
    """case id -> Dice of every region, from one subset's ``summary.json``."""
    try:
        summary = json.loads(summary_path.read_text())     # nnU-Net writes bare NaN, which json accepts
    except FileNotFoundError:
        raise UserError(f"{summary_path} does not exist (was this subset evaluated?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{summary_path} is not valid JSON ({e})") from None
    out: dict[str, list[float]] = {}
    for entry in summary.get("metric_per_case", []):
        case = _case_of(str(entry.get("prediction_file", "")), cases)
        if case is None:
            raise UserError(f"{summary_path}: prediction {entry.get('prediction_file')!r} is none of the report's "
                            f"cases ({', '.join(cases)})")
        blocks = list(entry.get("metrics", {}).values())
        if len(blocks) != n_regions:
            raise UserError(f"{summary_path}: case {case} has {len(blocks)} regions, the report has {n_regions}")
        out[case] = [math.nan if b.get("Dice") is None else float(b["Dice"]) for b in blocks]
    missing = [c for c in cases if c not in out]
    if missing:
        raise UserError(f"{summary_path} has no metrics for case {missing[0]}")
    return out


def case_scores(method_dir: Path) -> CaseScores:
    """Per-case scores of one method folder (``reports/<method>``, holding the report and ``predictions/``)."""
    method_dir = Path(method_dir)
    report = load_report(method_dir / REPORT_JSON)
    cases = list(report.cases)
    if not cases:
        raise UserError(f"{method_dir / REPORT_JSON} lists no cases (written by an older nnunet-gmd evaluate?)")
    regions = report.regions
    full_name = "+".join(report.channels)
    missing: dict[str, list[float]] = {c: [] for c in cases}
    full: dict[str, float] = {c: math.nan for c in cases}
    n_missing = 0
    for entry in report.subsets:
        name = entry.label
        dice = _subset_dice(method_dir / "predictions" / name / "summary.json", cases, len(regions))
        if name == full_name:
            full = {c: _nanmean(dice[c]) for c in cases}
        else:
            n_missing += 1
            for c in cases:
                missing[c] += dice[c]
    return CaseScores(cases, {c: _nanmean(v) for c, v in missing.items()}, full, n_missing, regions)
