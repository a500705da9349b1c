"""The built-in BraTS-like phantoms: layout, labels, designed MRI contrasts, and seeded determinism."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from nnunet_gmd.demo.phantoms import (CSF, EDEMA, ENHANCING, GM, MODALITIES, NECROSIS, SCALP, SKULL, WM,
                                      make_phantom, write_brats_like_cases)

BRAIN_AND_TUMOUR = (CSF, GM, WM, EDEMA, ENHANCING, NECROSIS)


def _tissue_means(phantom, modality: str) -> dict[int, float]:
    return {t: float(phantom.images[modality][phantom.tissue == t].mean()) for t in BRAIN_AND_TUMOUR}


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom((32, 32, 32), np.random.default_rng([0, i])) for i in range(6)]


def test_every_case_has_all_tumour_labels_nested_inside_the_brain(phantoms):
    for p in phantoms:
        assert set(np.unique(p.seg)) == {0, 1, 2, 4}
        # Necrosis is enclosed by the enhancing rim, which is enclosed by edema (BraTS nesting).
        assert np.all(np.isin(p.tissue[p.seg > 0], (EDEMA, ENHANCING, NECROSIS)))
        assert (p.seg == 2).sum() > (p.seg == 1).sum()


def test_contrasts_follow_real_mri(phantoms):
    for p in phantoms:
        t1, t1ce, t2, flair = (_tissue_means(p, m) for m in MODALITIES)
        assert t1[WM] > t1[GM] > t1[CSF]                          # T1: WM bright, CSF dark
        assert t1[EDEMA] < t1[GM] and t1[NECROSIS] < t1[GM]     # tumour hypointense on T1
        assert t1ce[ENHANCING] > max(v for k, v in t1ce.items() if k != ENHANCING)  # rim brightest on T1ce
        assert t2[CSF] > t2[GM] > t2[WM] and t2[EDEMA] > t2[GM]  # T2: fluid bright
        assert flair[EDEMA] > max(v for k, v in flair.items() if k != EDEMA)         # FLAIR: edema brightest
        assert flair[CSF] < flair[WM]                              # CSF suppressed on FLAIR


def test_each_modality_carries_distinct_information(phantoms):
    for p in phantoms:
        means = {m: _tissue_means(p, m) for m in MODALITIES}
        rim_vs_edema = {m: means[m][ENHANCING] / means[m][EDEMA] for m in MODALITIES}
        # The enhancing rim separates from the surrounding edema far more clearly on T1ce than elsewhere.
        assert rim_vs_edema["t1ce"] > 1.8
        assert all(rim_vs_edema[m] < 1.3 for m in ("t1", "t2", "flair"))
        # Edema stands apart from CSF on FLAIR, while on T2 both are bright.
        assert means["flair"][EDEMA] / means["flair"][CSF] > 4.0
        assert means["t2"][EDEMA] / means["t2"][CSF] < 1.2


def test_images_have_noise_and_a_bias_field_and_are_skull_stripped_like_brats():
    p = make_phantom((32, 32, 32), np.random.default_rng(3))
    wm = p.images["t1"][p.tissue == WM]
    assert wm.std() / wm.mean() > 0.03          # not piecewise constant
    outside_brain = np.isin(p.tissue, (0, SCALP, SKULL))
    assert np.all(p.images["flair"][outside_brain] == 0)
    with_skull = make_phantom((32, 32, 32), np.random.default_rng(3), skull_stripped=False)
    assert with_skull.images["t1"][with_skull.tissue == SCALP].mean() > with_skull.images["t1"][
        with_skull.tissue == SKULL].mean()     # bright scalp fat, dark bone on T1
    assert with_skull.images["t1"][with_skull.tissue == 0].max() > 0   # noise floor outside the head


def test_written_cases_follow_brats_layout_and_are_deterministic(tmp_path):
    cases = write_brats_like_cases(tmp_path / "a", 2, shape=(24, 20, 16), seed=7)
    again = write_brats_like_cases(tmp_path / "b", 3, shape=(24, 20, 16), seed=7)
    other = write_brats_like_cases(tmp_path / "c", 1, shape=(24, 20, 16), seed=8)
    assert [c.name for c in cases] == ["Phantom_000", "Phantom_001"]
    assert [c.name for c in again] == ["Phantom_000", "Phantom_001", "Phantom_002"]  # more cases, same first two
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["Phantom_000", "Phantom_001"]  # no partials
    for case in cases:
        files = sorted(f.name for f in case.iterdir())
        assert files == sorted(f"{case.name}_{m}.nii.gz" for m in (*MODALITIES, "seg"))
        for m in (*MODALITIES, "seg"):
            img = nib.load(case / f"{case.name}_{m}.nii.gz")
            assert img.shape == (24, 20, 16)
            assert np.allclose(img.header.get_zooms(), 1.0)
            twin = nib.load(tmp_path / "b" / case.name / f"{case.name}_{m}.nii.gz")
            assert np.array_equal(np.asarray(img.dataobj), np.asarray(twin.dataobj))
        seg = nib.load(case / f"{case.name}_seg.nii.gz")
        assert seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 4}
    a = np.asarray(nib.load(cases[0] / "Phantom_000_flair.nii.gz").dataobj)
    c = np.asarray(nib.load(other[0] / "Phantom_000_flair.nii.gz").dataobj)
    assert not np.array_equal(a, c)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        write_brats_like_cases(tmp_path, 0)
    with pytest.raises(ValueError, match="shape"):
        make_phantom((8, 32, 32))
