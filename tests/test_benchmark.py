"""``nnunet-gmd benchmark brats``: input checks (fast, on phantoms) and a smoke run on real BraTS 2018 cases.

The smoke run trains on 2 real cases and tests on a third (each cut to a 120 x 120 x 90 mm box around the tumour)
at the smoke preset (3 mm, narrow network, 1 epoch of 2 iterations): the numbers mean nothing, but every step runs
through the real tools, the test case is never trained on, and the full subsets x regions x methods table is
produced.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nnunet_gmd.errors import UserError
from nnunet_gmd.demo.benchmark import run_benchmark
from nnunet_gmd.demo.phantoms import write_brats_like_cases
from nnunet_gmd.demo.pipeline import parse_methods
from nnunet_gmd.demo.presets import PRESETS
from nnunet_gmd.demo.tools import nnunet_gmd_command

BRATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2018"
TRAIN_CASES = ("Brats18_2013_11_1", "Brats18_CBICA_ABM_1")
TEST_CASE = "Brats18_TCIA01_201_1"


def _cropped_cases(folder: Path, cases, size=(120, 120, 90)) -> Path:
    """Real BraTS cases cut to a box around the tumour (in tmp_path), so the smoke run takes minutes, not ten.

    Every voxel is original data; the affine is shifted so the crop keeps its place in scanner space.
    """
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True)
    for case in cases:
        seg = nib.load(BRATS / case / f"{case}_seg.nii.gz")
        centre = np.argwhere(np.asarray(seg.dataobj) > 0).mean(0).round().astype(int)
        start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, seg.shape)]
        box = tuple(slice(a, a + s) for a, s in zip(start, size))
        (folder / case).mkdir()
        for kind in ("t1", "t1ce", "t2", "flair", "seg"):
            img = nib.load(BRATS / case / f"{case}_{kind}.nii.gz")
            affine = img.affine.copy()
            affine[:3, 3] = img.affine[:3, :3] @ np.array(start) + img.affine[:3, 3]
            out = nib.Nifti1Image(np.asarray(img.dataobj)[box], affine, img.header)
            nib.save(out, str(folder / case / f"{case}_{kind}.nii.gz"))
    return folder


def _run(train: Path, test: Path, out: Path):
    return run_benchmark(train, test, out, PRESETS["smoke"], parse_methods(["stock"]), "cpu")


def test_a_case_in_both_sets_is_refused(tmp_path):
    cases = write_brats_like_cases(tmp_path / "train", 2, shape=(24, 24, 24))
    (tmp_path / "test").mkdir()
    shutil.copytree(cases[0], tmp_path / "test" / cases[0].name)
    with pytest.raises(UserError, match="Phantom_000 is in both"):
        _run(tmp_path / "train", tmp_path / "test", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_test_cases_need_labels_and_all_four_sequences(tmp_path):
    write_brats_like_cases(tmp_path / "train", 1, shape=(24, 24, 24))
    test_case = write_brats_like_cases(tmp_path / "test", 1, shape=(24, 24, 24), seed=1)[0]
    renamed = test_case.parent / "Other_000"
    test_case.rename(renamed)
    for f in renamed.iterdir():
        f.rename(renamed / f.name.replace("Phantom_000", "Other_000"))
    (renamed / "Other_000_seg.nii.gz").unlink()
    with pytest.raises(UserError, match="test case .*Other_000: no segmentation"):
        _run(tmp_path / "train", tmp_path / "test", tmp_path / "out")
    (renamed / "Other_000_seg.nii.gz").write_bytes((tmp_path / "train" / "Phantom_000" /
                                                    "Phantom_000_seg.nii.gz").read_bytes())
    (renamed / "Other_000_t1ce.nii.gz").unlink()
    with pytest.raises(UserError, match="Other_000: lacks t1ce"):
        _run(tmp_path / "train", tmp_path / "test", tmp_path / "out")
    with pytest.raises(UserError, match="is not a folder"):
        _run(tmp_path / "nowhere", tmp_path / "test", tmp_path / "out")


@pytest.mark.slow
def test_benchmark_smoke_on_real_brats_cases(tmp_path):
    if not all((BRATS / c).is_dir() for c in (*TRAIN_CASES, TEST_CASE)):
        pytest.skip(f"real BraTS 2018 cases not found under {BRATS} (shared data folder absent)")
    train = _cropped_cases(tmp_path / "train", TRAIN_CASES)
    test = _cropped_cases(tmp_path / "test", [TEST_CASE])
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_GMD_"))}
    proc = subprocess.run(nnunet_gmd_command("benchmark", "brats", "--train", str(train), "--test", str(test),
                                             "-o", str(out), "--preset", "smoke", "--methods", "dropout", "gmd_k5",
                                             "stock_complete", "--drop-train", "t1ce=0.5", "-device", "cpu"),
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = json.loads((out / "benchmark_results.json").read_text())
    assert results["methods"] == ["ModalityDropout", "GMD k=5", "nnUNet (complete cases)"]
    # --drop-train: availability only, one of the two training cases has no T1ce for every trainer
    record = json.loads((out / "nnUNet_raw" / "Dataset991_BraTSBenchmark" / "modality_availability.json").read_text())
    assert sorted(record) == sorted(TRAIN_CASES) and sum("t1ce" not in v for v in record.values()) == 1
    log = (out / "logs" / "train_stock_complete.log").read_text()
    assert "training on the 1 complete of 2 training cases" in log
    assert results["test_cases"] == [TEST_CASE] and results["train_cases"] == list(TRAIN_CASES)
    assert len(results["dice"]) == 15
    assert all(len(results["dice"][s]) == 3 and len(results["dice"][s]["whole tumor"]) == 3 for s in results["dice"])
    values = [v for s in results["dice"].values() for r in s.values() for v in r.values()]
    assert all(v is None or 0.0 <= v <= 1.0 for v in values) and any(v is not None for v in values)
    assert results["plans"]["spacing_mm"] == [3.0, 3.0, 3.0]       # reduced resolution via the plans
    split = json.loads((out / "nnUNet_preprocessed" / "Dataset991_BraTSBenchmark" / "splits_final.json").read_text())
    assert split == [{"train": sorted(TRAIN_CASES), "val": [TEST_CASE]}]   # the test case is never trained on
    md = (out / "benchmark_results.md").read_text()
    assert "training set: 2 cases" in md and "test set: 1 cases" in md and "1 epochs x 2 iterations" in md
    assert md.count("\n| ") >= 2 + 15           # means table rows + one row per subset
    assert "incomplete training data (--drop-train t1ce=0.5): cases without t1ce 1/2" in md
    assert (out / "benchmark_results.png").stat().st_size > 0
    assert (out / "missing_modality_comparison.png").stat().st_size > 0
    paired = json.loads((out / "paired_differences.json").read_text())    # written from the reports just made
    assert paired["test_cases"] == [TEST_CASE] and len(paired["differences"]["missing"]) == 3
    assert paired["differences"]["missing"][0]["method"] == "GMD k=5" and \
        paired["differences"]["missing"][0]["ci_low"] is None           # one test case: no interval
    assert (out / "paired_differences.png").stat().st_size > 0
    # Nothing was copied from the shared folder into the output beyond nnU-Net's converted dataset.
    assert all((out / "cases" / c).is_symlink() for c in (*TRAIN_CASES, TEST_CASE))


def test_split_links_a_seeded_test_selection(tmp_path):
    from nnunet_gmd.demo.benchmark import split_folder

    write_brats_like_cases(tmp_path / "all", 5, shape=(24, 24, 24))
    train, test = split_folder(tmp_path / "all", tmp_path / "split", 2, seed=3)
    assert len(train) == 3 and len(test) == 2 and not set(train) & set(test)
    assert sorted(p.name for p in (tmp_path / "split" / "test").iterdir()) == test
    assert all(p.is_symlink() for p in (tmp_path / "split" / "train").iterdir())
    assert split_folder(tmp_path / "all", tmp_path / "again", 2, seed=3) == (train, test)   # deterministic
    with pytest.raises(UserError, match="not empty"):
        split_folder(tmp_path / "all", tmp_path / "split", 2, seed=3)
    with pytest.raises(UserError, match="at least one training case"):
        split_folder(tmp_path / "all", tmp_path / "other", 5)
