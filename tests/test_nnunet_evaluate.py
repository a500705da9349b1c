"""``nnunet-gmd evaluate`` and ``compare`` on untrained models of the tiny dataset: every subset is predicted and
scored, the scores are those of the written predictions, finished subsets are reused, any trainer works."""
from __future__ import annotations

import csv
import json
import os
from itertools import combinations
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from nnunet_gmd.cli import main
from nnunet_helpers import CONFIG, DATASET_ID, DATASET_NAME, DS_TRAINER, STOCK_TRAINER, write_split

CHANNELS = ["t1", "t1ce", "t2", "flair"]
REGIONS = {"whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
FAST = ["--disable_tta", "-npp", "0", "-nps", "0", "-device", "cpu"]


def _evaluate(trainer: str, out: Path, *extra: str) -> int:
    return main(["evaluate", "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0", "-tr", trainer, "-o", str(out),
                 *FAST, *extra])


def _surface_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """HD95 by brute force on surface voxels (an implementation independent of MONAI's)."""
    pa = np.argwhere(a & ~binary_erosion(a))
    pb = np.argwhere(b & ~binary_erosion(b))
    d_ab = cKDTree(pb).query(pa)[0]
    d_ba = cKDTree(pa).query(pb)[0]
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


_CACHE: dict[str, Path] = {}


@pytest.fixture
def ds_report(nnunet_paths, ds_model, tmp_path_factory) -> Path:
    """One evaluate run of the untrained DS model, shared by this module's tests."""
    if "ds" not in _CACHE:
        write_split(nnunet_paths)
        out = tmp_path_factory.mktemp("eval_ds")
        assert _evaluate(DS_TRAINER, out) == 0
        _CACHE["ds"] = out
    return _CACHE["ds"]


def test_report_covers_every_subset_with_scores_of_the_written_predictions(nnunet_paths, ds_report):
    report = json.loads((ds_report / "missing_modality_report.json").read_text())
    assert report["trainer"] == DS_TRAINER and report["dataset"] == DATASET_NAME
    assert report["channels"] == CHANNELS and report["network"] == "dynamic sharing"
    expected = [list(c) for k in range(1, 5) for c in combinations(CHANNELS, k)]
    assert [s["available"] for s in report["subsets"]] == expected
    val_cases = json.loads((nnunet_paths.preprocessed / DATASET_NAME / "splits_final.json").read_text())[0]["val"]
    assert report["cases"] == sorted(val_cases)

    # Recompute every score from the prediction files and the raw labels.
    refs = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet_paths.dataset_folder / "labelsTr" / f"{c}.nii.gz")))
            for c in report["cases"]}
    predictions = []
    for entry in report["subsets"]:
        folder = ds_report / "predictions" / "+".join(entry["available"])
        preds = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{c}.nii.gz"))) for c in report["cases"]}
        predictions.append(np.stack(list(preds.values())))
        assert set(entry["metrics"]) == set(REGIONS)
        for region, labels in REGIONS.items():
            dices, hds = [], []
            for c in report["cases"]:
                a, b = np.isin(preds[c], labels), np.isin(refs[c], labels)
                if a.sum() + b.sum():
                    dices.append(2 * (a & b).sum() / (a.sum() + b.sum()))
                if a.any() and b.any():
                    hds.append(_surface_hd95(a, b))
            got = entry["metrics"][region]
            assert got["dice"] == pytest.approx(np.mean(dices), abs=1e-9)
            if hds:
                assert got["hd95"] == pytest.approx(np.mean(hds), abs=1e-4)
            else:
                assert got["hd95"] is None
    # The subsets are really different inputs: the predictions are not all the same.
    assert any(not np.array_equal(predictions[0], p) for p in predictions[1:])
    mean_wt = np.mean([s["metrics"]["whole tumor"]["dice"] for s in report["subsets"]])
    assert report["mean"]["whole tumor"]["dice"] == pytest.approx(mean_wt)

    rows = list(csv.DictReader((ds_report / "missing_modality_report.csv").open()))
    assert len(rows) == 16 and rows[-1]["available"] == "mean over subsets"
    assert float(rows[5]["tumor core dice"]) == pytest.approx(report["subsets"][5]["metrics"]["tumor core"]["dice"],
                                                              rel=1e-5)
    md = (ds_report / "missing_modality_report.md").read_text()
    assert "| t1ce+flair |" in md and "| t1+t1ce+t2+flair |" in md
    png = mpimg.imread(ds_report / "missing_modality_report.png")
    assert png.ndim == 3 and png.shape[0] > 200
    # nnU-Net's own per-subset summary sits beside the predictions.
    summary = json.loads((ds_report / "predictions" / "t1ce+flair" / "summary.json").read_text())
    assert summary["mean"]["(1, 2, 3)"]["Dice"] == pytest.approx(report["subsets"][8]["metrics"]["whole tumor"]["dice"])


def test_rerun_reuses_finished_subsets_unless_the_model_changed(nnunet_paths, ds_model, ds_report):
    pred = ds_report / "predictions" / "t2" / f"{json.loads((ds_report / 'missing_modality_report.json').read_text())['cases'][0]}.nii.gz"
    before = pred.stat().st_mtime_ns
    assert _evaluate(DS_TRAINER, ds_report, "--no-hd95") == 0
    assert pred.stat().st_mtime_ns == before
    report = json.loads((ds_report / "missing_modality_report.json").read_text())
    assert "hd95" not in report["subsets"][0]["metrics"]["whole tumor"]

    ckpt = ds_model / "fold_0" / "checkpoint_final.pth"
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))  # "retrained"
    assert _evaluate(DS_TRAINER, ds_report, "--no-hd95") == 0
    assert pred.stat().st_mtime_ns != before


def test_stock_trainer_is_evaluated_zero_filled_and_compared(nnunet_paths, stock_model, ds_report, tmp_path,
                                                             capsys):
    capsys.readouterr()
    assert _evaluate(STOCK_TRAINER, tmp_path / "stock", "--no-hd95") == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ": warning: " in ln]
    assert warned == [f"nnunet-gmd evaluate: warning: {STOCK_TRAINER} does not use a Dynamic Sharing network: "
                      "absent channels are zero-filled for it"]
    stock = json.loads((tmp_path / "stock" / "missing_modality_report.json").read_text())
    assert len(stock["subsets"]) == 15 and stock["network"].startswith("other")

    assert main(["compare", str(ds_report / "missing_modality_report.json"),
                 str(tmp_path / "stock" / "missing_modality_report.json"), "-o", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert f"| available | {DS_TRAINER} | {STOCK_TRAINER} |" in printed
    table = (tmp_path / "cmp" / "missing_modality_comparison.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "available" not in ln]
    assert len(rows) == 16
    ds = json.loads((ds_report / "missing_modality_report.json").read_text())
    flair_row = next(r for r in rows if r.startswith("| flair |"))
    ds_flair = next(s for s in ds["subsets"] if s["available"] == ["flair"])
    ds_mean = np.nanmean([v["dice"] if v["dice"] is not None else np.nan for v in ds_flair["metrics"].values()])
    assert f"{ds_mean:.3f}" in flair_row
    assert mpimg.imread(tmp_path / "cmp" / "missing_modality_comparison.png").shape[1] > 400


def test_evaluate_needs_the_split_and_a_valid_fold(nnunet_paths, ds_model, tmp_path, capsys):
    write_split(nnunet_paths)
    assert main(["evaluate", "-d", str(DATASET_ID), "-c", CONFIG, "-f", "7", "-tr", DS_TRAINER,
                 "-o", str(tmp_path), *FAST]) == 2
    assert "no checkpoint_final.pth for fold 7" in capsys.readouterr().err
    splits = nnunet_paths.preprocessed / DATASET_NAME / "splits_final.json"
    saved = splits.read_text()
    splits.unlink()
    try:
        assert _evaluate(DS_TRAINER, tmp_path) == 2
        assert "splits_final.json does not exist" in capsys.readouterr().err
    finally:
        splits.write_text(saved)


def test_a_case_is_scored_only_on_the_subsets_of_its_sequences(nnunet_paths, ds_model, ds_report, tmp_path):
    """With modality_availability.json (issue 11) a case without T1ce counts only where T1ce is not needed."""
    report = json.loads((ds_report / "missing_modality_report.json").read_text())
    assert all(s["n_cases"] == len(report["cases"]) for s in report["subsets"])
    first = report["cases"][0]
    record = nnunet_paths.dataset_folder / "modality_availability.json"
    record.write_text(json.dumps({first: ["t1", "t2", "flair"]}))
    try:
        assert _evaluate(DS_TRAINER, tmp_path / "incomplete", "--no-hd95") == 0
    finally:
        record.unlink()
    partial = json.loads((tmp_path / "incomplete" / "missing_modality_report.json").read_text())
    n = len(report["cases"])
    for entry in partial["subsets"]:
        needs_t1ce = "t1ce" in entry["available"]
        assert entry["n_cases"] == (n - 1 if needs_t1ce else n), entry["available"]
        folder = tmp_path / "incomplete" / "predictions" / "+".join(entry["available"])
        assert (folder / f"{first}.nii.gz").is_file() != needs_t1ce
    # a subset every case has is scored exactly as without the record
    t2 = next(e for e in partial["subsets"] if e["available"] == ["t2"])["metrics"]
    t2_before = next(e for e in report["subsets"] if e["available"] == ["t2"])["metrics"]
    assert {r: b["dice"] for r, b in t2.items()} == pytest.approx({r: b["dice"] for r, b in t2_before.items()})
