"""A real BraTS 2018 case (../shared/data/brats2018): convert it, then predict it with T1 missing."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_gmd.cli import main
from nnunet_gmd.nnunet.convert_brats import nnunet_to_brats_labels
from nnunet_helpers import CONFIG, DATASET_ID, DS_TRAINER, SHARED_DATA

BRATS2018 = SHARED_DATA / "brats2018"
CASE = "Brats18_TCIA10_639_1"

pytestmark = pytest.mark.skipif(not (BRATS2018 / CASE).is_dir(),
                                reason=f"real BraTS 2018 data not available at {BRATS2018 / CASE}")


@pytest.mark.slow
def test_convert_real_case_then_predict_without_t1(nnunet_paths, ds_model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / CASE).symlink_to(BRATS2018 / CASE)  # one real case, read in place
    assert main(["convert-brats", str(src), "--dataset-id", "321", "--raw-dir", str(tmp_path / "raw")]) == 0
    ds = tmp_path / "raw" / "Dataset321_BraTS"
    images = ds / "imagesTr"
    for i, m in enumerate(("t1", "t1ce", "t2", "flair")):
        assert (images / f"{CASE}_{i:04d}.nii.gz").read_bytes() == (BRATS2018 / CASE / f"{CASE}_{m}.nii.gz").read_bytes()
    source_seg = np.asarray(nib.load(BRATS2018 / CASE / f"{CASE}_seg.nii.gz").dataobj)
    seg = np.asarray(nib.load(ds / "labelsTr" / f"{CASE}.nii.gz").dataobj)
    assert set(np.unique(source_seg)) == {0, 1, 2, 4}
    # whole tumour, tumour core and enhancing tumour keep their voxel counts
    assert np.isin(seg, (1, 2, 3)).sum() == (source_seg > 0).sum() > 1000
    assert np.isin(seg, (2, 3)).sum() == np.isin(source_seg, (1, 4)).sum()
    assert (seg == 3).sum() == (source_seg == 4).sum()
    np.testing.assert_array_equal(nnunet_to_brats_labels(seg), source_seg)

    # Predict the converted case with its T1 file absent (a model of the tiny dataset: same channels, 1 mm).
    inp = tmp_path / "in"
    inp.mkdir()
    for i in (1, 2, 3):
        (inp / f"{CASE}_{i:04d}.nii.gz").symlink_to(images / f"{CASE}_{i:04d}.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(inp), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0",
                 "-tr", DS_TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0", "-step_size", "1",
                 "--disable_tta", "--disable_progress_bar"]) == 0
    pred = sitk.ReadImage(str(out / f"{CASE}.nii.gz"))
    ref = sitk.ReadImage(str(BRATS2018 / CASE / f"{CASE}_seg.nii.gz"))
    assert pred.GetSize() == ref.GetSize() == (240, 240, 155)
    assert pred.GetSpacing() == ref.GetSpacing()
    np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin())
    np.testing.assert_allclose(pred.GetDirection(), ref.GetDirection())
    labels = sitk.GetArrayFromImage(pred)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    # nnU-Net crops to the bounding box of the present channels' nonzero voxels: no tumour in empty slices
    head = np.any([sitk.GetArrayFromImage(sitk.ReadImage(str(inp / f"{CASE}_{i:04d}.nii.gz"))) != 0
                   for i in (1, 2, 3)], axis=0)
    assert not labels[~np.any(head, axis=(1, 2))].any()
    record = json.loads((out / "modality_availability.json").read_text())
    assert record["cases"] == {CASE: ["t1ce", "t2", "flair"]}
