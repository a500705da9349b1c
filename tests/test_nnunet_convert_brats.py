"""``nnunet-gmd convert-brats``: BraTS folders (2018-2021 and 2023 naming) -> nnU-Net raw datasets with the BraTS
regions of nnU-Net's Dataset137; bad folders fail with one line naming the case and file."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.dataset_conversion.Dataset137_BraTS21 import convert_labels_back_to_BraTS
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_gmd.cli import main
from nnunet_gmd.demo.phantoms import write_brats_like_cases

MODALITIES_2021 = ("t1", "t1ce", "t2", "flair")
MODALITIES_2023 = ("t1n", "t1c", "t2w", "t2f")


@pytest.fixture(scope="module")
def brats_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("brats")
    write_brats_like_cases(src, 3, shape=(24, 24, 24), seed=3)
    return src


def _convert(src: Path, raw: Path, *extra: str, dataset_id: int = 42) -> int:
    return main(["convert-brats", str(src), "--dataset-id", str(dataset_id), "--raw-dir", str(raw), *extra])


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_converts_images_labels_and_regions(brats_src, tmp_path):
    assert _convert(brats_src, tmp_path / "raw", "--name", "Phantoms") == 0
    ds = tmp_path / "raw" / "Dataset042_Phantoms"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    lm = LabelManager(meta["labels"], meta["regions_class_order"])
    assert lm.has_regions and lm.foreground_regions == [(1, 2, 3), (2, 3), (3,)]
    for case in sorted(p.name for p in brats_src.iterdir()):
        for i, m in enumerate(MODALITIES_2021):
            assert (ds / "imagesTr" / f"{case}_{i:04d}.nii.gz").read_bytes() == \
                (brats_src / case / f"{case}_{m}.nii.gz").read_bytes()
        src_seg = np.asarray(nib.load(brats_src / case / f"{case}_seg.nii.gz").dataobj)
        seg = nib.load(ds / "labelsTr" / f"{case}.nii.gz")
        ours = np.asarray(seg.dataobj)
        np.testing.assert_array_equal(convert_labels_back_to_BraTS(ours), src_seg)  # nnU-Net's own inverse
        assert set(np.unique(ours)) == {0, 1, 2, 3}
        # whole tumour / tumour core / enhancing tumour are the BraTS definitions
        np.testing.assert_array_equal(np.isin(ours, (1, 2, 3)), src_seg > 0)
        np.testing.assert_array_equal(np.isin(ours, (2, 3)), np.isin(src_seg, (1, 4)))
        np.testing.assert_array_equal(ours == 3, src_seg == 4)
        np.testing.assert_allclose(seg.affine, nib.load(brats_src / case / f"{case}_seg.nii.gz").affine)
    assert not list((tmp_path / "raw").glob(".*partial"))


def test_brats2023_names_and_labels_and_unlabelled_cases(brats_src, tmp_path):
    src = tmp_path / "src"
    for i, case_dir in enumerate(sorted(brats_src.iterdir())):
        new = f"BraTS-GLI-{i:05d}-000"
        (src / new).mkdir(parents=True)
        for old, m in zip(MODALITIES_2021, MODALITIES_2023):
            if i == 2 and m == "t1n":
                continue  # an unlabelled case may lack a sequence
            (src / new / f"{new}-{m}.nii.gz").write_bytes((case_dir / f"{case_dir.name}_{old}.nii.gz").read_bytes())
        if i < 2:
            seg = nib.load(case_dir / f"{case_dir.name}_seg.nii.gz")
            data = np.asarray(seg.dataobj).copy()
            data[data == 4] = 3  # BraTS 2023 marks enhancing tumour 3
            nib.save(nib.Nifti1Image(data, seg.affine), src / new / f"{new}-seg.nii.gz")
    assert _convert(src, tmp_path / "raw") == 0
    ds = tmp_path / "raw" / "Dataset042_BraTS"
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 2
    first = sorted(brats_src.iterdir())[0]
    # same nnU-Net labels as the 2018-2021 conversion of the same segmentation
    ours = _array(ds / "labelsTr" / "BraTS-GLI-00000-000.nii.gz")
    np.testing.assert_array_equal(convert_labels_back_to_BraTS(ours), _array(first / f"{first.name}_seg.nii.gz"))
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == [
        "BraTS-GLI-00002-000_0001.nii.gz", "BraTS-GLI-00002-000_0002.nii.gz", "BraTS-GLI-00002-000_0003.nii.gz"]


def _one_line_error(capsys, code: int, *fragments: str) -> None:
    assert code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if ": error: " in line]  # progress bars aside
    assert len(err) == 1, stderr
    for f in fragments:
        assert f in err[0], err[0]


def test_labelled_case_must_have_every_sequence(brats_src, tmp_path, capsys):
    src = tmp_path / "src"
    case = sorted(brats_src.iterdir())[0]
    (src / case.name).mkdir(parents=True)
    for m in ("t1", "t1ce", "flair", "seg"):
        (src / case.name / f"{case.name}_{m}.nii.gz").write_bytes((case / f"{case.name}_{m}.nii.gz").read_bytes())
    _one_line_error(capsys, _convert(src, tmp_path / "raw"), case.name, "lacks t2", f"{case.name}_t2.nii.gz",
                    "--allow-missing")
    assert not (tmp_path / "raw" / "Dataset042_BraTS").exists()


def _incomplete_dataset(brats_src: Path, dest: Path, drop: dict[str, tuple[str, ...]]) -> Path:
    """A copy of the phantoms, without the sequences ``drop`` names per case index."""
    for i, case in enumerate(sorted(brats_src.iterdir())):
        (dest / case.name).mkdir(parents=True)
        for f in case.iterdir():
            if not any(f.name.endswith(f"_{m}.nii.gz") for m in drop.get(str(i), ())):
                (dest / case.name / f.name).write_bytes(f.read_bytes())
    return dest


def test_allow_missing_writes_zero_images_and_the_availability_record(brats_src, tmp_path, capsys):
    src = _incomplete_dataset(brats_src, tmp_path / "src", {"0": ("t1ce",), "1": ("t1", "t2")})
    assert _convert(src, tmp_path / "raw", "--allow-missing") == 0
    assert "2 training case(s) lack sequences" in capsys.readouterr().out
    ds = tmp_path / "raw" / "Dataset042_BraTS"
    names = sorted(p.name for p in brats_src.iterdir())
    record = json.loads((ds / "modality_availability.json").read_text())
    assert record == {names[0]: ["t1", "t2", "flair"], names[1]: ["t1ce", "flair"],
                      names[2]: ["t1", "t1ce", "t2", "flair"]}
    zero = sitk.ReadImage(str(ds / "imagesTr" / f"{names[0]}_0001.nii.gz"))
    ref = sitk.ReadImage(str(brats_src / names[0] / f"{names[0]}_t1.nii.gz"))
    assert not _array(ds / "imagesTr" / f"{names[0]}_0001.nii.gz").any()
    assert zero.GetSize() == ref.GetSize() and zero.GetSpacing() == ref.GetSpacing()
    assert zero.GetOrigin() == ref.GetOrigin() and zero.GetDirection() == ref.GetDirection()
    np.testing.assert_array_equal(_array(ds / "imagesTr" / f"{names[0]}_0000.nii.gz"),
                                  sitk.GetArrayFromImage(ref))
    assert len(list((ds / "imagesTr").glob("*.nii.gz"))) == 12   # every channel file nnU-Net expects
    # without the flag: nothing is written, and the error says how to go on
    _one_line_error(capsys, _convert(src, tmp_path / "raw2"), names[0], "lacks t1ce", "--allow-missing")
    # complete data with the flag: a record of complete cases, images unchanged
    assert _convert(brats_src, tmp_path / "raw3", "--allow-missing") == 0
    full = json.loads((tmp_path / "raw3" / "Dataset042_BraTS" / "modality_availability.json").read_text())
    assert all(v == ["t1", "t1ce", "t2", "flair"] for v in full.values())


def test_allow_missing_still_refuses_a_case_without_any_sequence(brats_src, tmp_path, capsys):
    src = _incomplete_dataset(brats_src, tmp_path / "src", {"2": ("t1", "t1ce", "t2", "flair")})
    name = sorted(p.name for p in brats_src.iterdir())[2]
    _one_line_error(capsys, _convert(src, tmp_path / "raw", "--allow-missing"), name, "no image files")


def test_bad_files_are_named(brats_src, tmp_path, capsys):
    case = sorted(brats_src.iterdir())[0]
    src = tmp_path / "src"
    (src / case.name).mkdir(parents=True)
    for f in case.iterdir():
        (src / case.name / f.name).write_bytes(f.read_bytes())
    t2 = src / case.name / f"{case.name}_t2.nii.gz"

    img = nib.load(t2)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :20], img.affine), t2)
    _one_line_error(capsys, _convert(src, tmp_path / "raw"), case.name, t2.name, "shape")

    data = (case / t2.name).read_bytes()
    t2.write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, _convert(src, tmp_path / "raw"), case.name, t2.name, "truncated")

    nan = np.asarray(nib.load(case / t2.name).dataobj).astype(np.float32)
    nan[3, 4, 5] = np.nan     # nnU-Net's SimpleITK reader would train on it as a 0 without a word
    nib.save(nib.Nifti1Image(nan, img.affine), t2)
    _one_line_error(capsys, _convert(src, tmp_path / "raw"), case.name, f"cannot use {t2.name}",
                    "1 NaN or infinite voxel")

    t2.write_bytes(data)
    seg = src / case.name / f"{case.name}_seg.nii.gz"
    s = nib.load(seg)
    bad = np.asarray(s.dataobj).copy()
    bad[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad, s.affine), seg)
    _one_line_error(capsys, _convert(src, tmp_path / "raw"), case.name, seg.name, "labels [0, 1, 2, 4, 7]")
    assert not list((tmp_path / "raw").glob(".*partial")), "a label error must not leave a hidden partial dataset"


def _copy_case(brats_src: Path, dest: Path) -> Path:
    case = sorted(brats_src.iterdir())[0]
    (dest / case.name).mkdir(parents=True)
    for f in case.iterdir():
        (dest / case.name / f.name).write_bytes(f.read_bytes())
    return dest / case.name


@pytest.mark.parametrize("damage,fragment", [("shift", "origin"), ("flip", "direction")])
def test_misregistered_sequences_are_refused(brats_src, tmp_path, capsys, damage, fragment):
    case = _copy_case(brats_src, tmp_path / "src")
    name = f"{case.name}_{'t2' if damage == 'shift' else 'flair'}.nii.gz"
    img = sitk.ReadImage(str(case / name))
    if damage == "shift":
        img.SetOrigin(tuple(o + (30.0 if i == 0 else 0.0) for i, o in enumerate(img.GetOrigin())))
    else:
        direction = list(img.GetDirection())
        direction[0] = -direction[0]
        img.SetDirection(direction)
    sitk.WriteImage(img, str(case / name), True)
    _one_line_error(capsys, _convert(tmp_path / "src", tmp_path / "raw"), case.name, name, fragment)


def test_label_convention_is_decided_once_per_dataset(brats_src, tmp_path, capsys):
    """A 2018-named case whose segmentation uses 3 (the 2023 enhancing-tumour label) is an error, not 2023."""
    case = _copy_case(brats_src, tmp_path / "src")
    seg = case / f"{case.name}_seg.nii.gz"
    s = nib.load(seg)
    data = np.asarray(s.dataobj).copy()
    data[data == 4] = 3
    nib.save(nib.Nifti1Image(data, s.affine), seg)
    _one_line_error(capsys, _convert(tmp_path / "src", tmp_path / "raw"), case.name, seg.name, "2018-2021 convention")
    # mixing the two naming conventions in one source folder is refused too
    other = tmp_path / "src" / "BraTS-GLI-00009-000"
    other.mkdir()
    for old, new in zip(MODALITIES_2021, MODALITIES_2023):
        (other / f"{other.name}-{new}.nii.gz").write_bytes((case / f"{case.name}_{old}.nii.gz").read_bytes())
    _one_line_error(capsys, _convert(tmp_path / "src", tmp_path / "raw"), "both BraTS file-name conventions")


def test_raw_dir_that_is_a_file_is_a_one_line_error(brats_src, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.write_text("not a folder")
    _one_line_error(capsys, _convert(brats_src, raw), str(raw), "is a file")


def test_existing_dataset_and_id_clash(brats_src, tmp_path, capsys):
    assert _convert(brats_src, tmp_path / "raw") == 0
    capsys.readouterr()
    _one_line_error(capsys, _convert(brats_src, tmp_path / "raw"), "already exists", "--overwrite")
    _one_line_error(capsys, main(["convert-brats", str(brats_src), "--dataset-id", "42", "--name", "Other",
                                  "--raw-dir", str(tmp_path / "raw")]), "already used by", "Dataset042_BraTS")
    assert _convert(brats_src, tmp_path / "raw", "--overwrite") == 0
    _one_line_error(capsys, _convert(tmp_path / "raw", tmp_path / "raw2"), "no BraTS case folders")


REAL_BRATS2018 = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2018"


def test_allow_missing_on_a_real_brats2018_case_without_t1ce(tmp_path, capsys):
    cases = sorted(p for p in REAL_BRATS2018.glob("Brats18_*") if p.is_dir()) if REAL_BRATS2018.is_dir() else []
    if not cases:
        pytest.skip(f"real BraTS 2018 cases not found in {REAL_BRATS2018} (../shared/data is not part of the repo)")
    case = cases[0]
    src = tmp_path / "src" / case.name
    src.mkdir(parents=True)
    for f in case.glob("*.nii.gz"):
        if not f.name.endswith("_t1ce.nii.gz"):
            (src / f.name).symlink_to(f)
    _one_line_error(capsys, _convert(src.parent, tmp_path / "raw"), case.name, "lacks t1ce", "--allow-missing")
    assert _convert(src.parent, tmp_path / "raw", "--allow-missing") == 0
    ds = tmp_path / "raw" / "Dataset042_BraTS"
    assert json.loads((ds / "modality_availability.json").read_text()) == {case.name: ["t1", "t2", "flair"]}
    zero = sitk.ReadImage(str(ds / "imagesTr" / f"{case.name}_0001.nii.gz"))
    assert zero.GetSize() == (240, 240, 155) and not sitk.GetArrayViewFromImage(zero).any()

