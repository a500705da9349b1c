"""Procedural BraTS-like brain phantoms: a built-in dataset that needs no download.

Each case is a (by default skull-stripped, like BraTS) head with scalp, skull, CSF (cortical rim and two ventricles), grey and white matter, and a
glioma made of peritumoural edema (label 2), a necrotic core (label 1) and an enhancing rim (label 4).
The four sequences render the same anatomy with the relative contrasts of real MRI, chosen so that every
modality carries partly distinct information and dropping one actually hurts:

* T1:    WM bright, GM mid, CSF dark; the whole tumour is hypointense, edema only faintly visible.
* T1ce:  T1 plus a bright enhancing rim -- the only sequence in which the rim (label 4) stands out clearly.
* T2:    CSF and fluid bright; edema bright but hard to tell from CSF; necrosis fluid-bright.
* FLAIR: CSF suppressed, edema brightest -- the best view of the edema's extent.

Per case (seeded) the anatomy, tumour position/size/shape, tissue intensities, noise and a smooth
multiplicative bias field are randomised. Files follow the BraTS layout
``<out_dir>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` with a 1 mm affine like BraTS 2018.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

MODALITIES = ("t1", "t1ce", "t2", "flair")

# Tissue classes rendered into the images (labels are derived separately).
BACKGROUND, SCALP, SKULL, CSF, GM, WM, EDEMA, ENHANCING, NECROSIS = range(9)

# Mean relative intensity of each tissue class per sequence, in the order of the class constants above.
# Rough literature values for 1.5-3 T glioma MRI, rescaled to WM(T1) ~ 0.85.
TISSUE_INTENSITY: dict[str, tuple[float, ...]] = {
    #         bg    scalp skull csf   gm    wm    edema enh   necro
    "t1":    (0.0,  0.75, 0.10, 0.20, 0.58, 0.85, 0.40, 0.46, 0.25),
    "t1ce":  (0.0,  0.80, 0.10, 0.22, 0.60, 0.86, 0.42, 1.25, 0.24),
    "t2":    (0.0,  0.55, 0.08, 1.00, 0.58, 0.38, 0.85, 0.68, 0.95),
    "flair": (0.0,  0.50, 0.08, 0.10, 0.58, 0.42, 1.00, 0.78, 0.35),
}

# BraTS label values.
LABEL_NECROTIC, LABEL_EDEMA, LABEL_ENHANCING = 1, 2, 4

AFFINE_1MM = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ~sigma_vox (for irregular shapes)."""
    field = gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _ellipsoid_distance(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal distance: < 1 inside the ellipsoid."""
    return np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))


@dataclass
class Phantom:
    """One generated case. ``tissue`` (class constants above) is kept so tests can check the contrasts."""
    images: dict[str, np.ndarray]   # modality -> float32 image, about 0..1000
    seg: np.ndarray                 # uint8 BraTS labels 0/1/2/4
    tissue: np.ndarray              # uint8 tissue class per voxel


def make_phantom(shape: Sequence[int] = (32, 32, 32), rng: np.random.Generator | None = None,
                 skull_stripped: bool = True) -> Phantom:
    """Generate one case; all randomness comes from ``rng``.

    ``skull_stripped`` zeroes everything outside the brain, as in the BraTS release (and so nnU-Net's
    crop-to-nonzero works on phantoms as it does on real data).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be 3-D with every side >= 16 voxels, got {shape}")
    size = np.array(shape, dtype=float)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    centre = (size - 1) / 2 + rng.uniform(-0.03, 0.03, 3) * size

    head_r = size / 2 * rng.uniform(0.84, 0.92, 3)
    skull_r = head_r - np.maximum(1.0, 0.05 * size)
    brain_r = skull_r - np.maximum(1.0, 0.04 * size)
    wobble = 0.03 * _smooth_field(rng, shape, max(2.0, min(shape) / 8))
    d_head = _ellipsoid_distance(grid, centre, head_r)
    d_skull = _ellipsoid_distance(grid, centre, skull_r)
    d_brain = _ellipsoid_distance(grid, centre, brain_r) + wobble

    tissue = np.full(shape, BACKGROUND, dtype=np.uint8)
    tissue[d_head < 1] = SCALP
    tissue[d_skull < 1] = SKULL
    brain = d_brain < 1
    tissue[brain] = CSF                                      # thin subarachnoid CSF rim
    cortex_in = 1 - max(1.2 / brain_r.min(), 0.06)          # CSF rim about one voxel thick
    tissue[d_brain < cortex_in] = GM
    wm_in = cortex_in - rng.uniform(0.18, 0.26)
    gyri = 0.06 * _smooth_field(rng, shape, max(1.5, min(shape) / 16))
    tissue[d_brain + gyri < wm_in] = WM
    for side in (-1, 1):                                     # two lateral ventricles
        v_centre = centre + np.array([0.0, side * 0.18, 0.05]) * brain_r
        v_radii = brain_r * np.array([0.30, 0.07, 0.16]) * rng.uniform(0.85, 1.15, 3)
        tissue[_ellipsoid_distance(grid, v_centre, np.maximum(v_radii, 1.0)) < 1] = CSF

    # Tumour: nested irregular blobs; edema > core (enhancing rim) > necrosis, all inside the brain.
    edema_r = rng.uniform(0.42, 0.55) * brain_r.min()
    core_r = edema_r * rng.uniform(0.45, 0.60)
    necro_r = max(core_r * rng.uniform(0.40, 0.55), 1.5)
    core_r = max(core_r, necro_r + 1.5)                       # keep the rim at least ~1.5 voxels thick
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    offset = rng.uniform(0.0, 0.5) * (brain_r.min() * cortex_in - edema_r)
    t_centre = centre + direction * max(offset, 0.0)
    irregular = _smooth_field(rng, shape, max(1.5, min(shape) / 12))
    t_dist = np.sqrt(((grid - t_centre[:, None, None, None]) ** 2).sum(0))
    edema = (t_dist / edema_r + 0.15 * irregular < 1) & (d_brain < cortex_in)
    core_shift = t_centre + rng.uniform(-0.15, 0.15, 3) * edema_r
    c_dist = np.sqrt(((grid - core_shift[:, None, None, None]) ** 2).sum(0))
    core = (c_dist / core_r + 0.10 * irregular < 1) & edema
    necrosis = (c_dist / necro_r < 1) & core
    tissue[edema] = EDEMA
    tissue[core] = ENHANCING
    tissue[necrosis] = NECROSIS

    seg = np.zeros(shape, dtype=np.uint8)
    seg[edema] = LABEL_EDEMA
    seg[core] = LABEL_ENHANCING
    seg[necrosis] = LABEL_NECROTIC

    bias_sigma = max(3.0, min(shape) / 3)
    images: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        means = np.array(TISSUE_INTENSITY[modality]) * rng.uniform(0.95, 1.05, len(TISSUE_INTENSITY[modality]))
        image = means[tissue]
        image = image * (1 + 0.06 * _smooth_field(rng, shape, 1.5)) * (tissue > 0)   # tissue texture
        image = gaussian_filter(image, 0.5)                                         # partial volume
        bias = np.exp(0.12 * _smooth_field(rng, shape, bias_sigma))                 # smooth bias field
        noise_sd = rng.uniform(0.02, 0.05)
        image = np.abs(image * bias + noise_sd * rng.standard_normal(shape))        # Rician-like magnitude
        image[tissue == BACKGROUND] = np.abs(noise_sd * 0.5 * rng.standard_normal(int((tissue == 0).sum())))
        if skull_stripped:
            image[~brain] = 0.0
        images[modality] = (image * 1000 * rng.uniform(0.8, 1.2)).astype(np.float32)
    return Phantom(images=images, seg=seg, tissue=tissue)


def _save_nifti(array: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, AFFINE_1MM)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def write_brats_like_cases(out_dir: str | os.PathLike, n_cases: int, shape: Sequence[int] = (32, 32, 32),
                           seed: int = 0, progress: bool = False) -> list[Path]:
    """Write ``n_cases`` phantoms as BraTS case folders ``Phantom_000 ...`` and return their paths.

    Case ``i`` depends only on ``(seed, i, shape)``, so asking for more cases later keeps the first ones
    identical. Each case folder is written under a temporary name and renamed when complete, so an
    interrupted run never leaves a half-written case behind.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in tqdm(range(n_cases), desc="generating phantoms", unit="case", disable=not progress):
        name = f"Phantom_{i:03d}"
        phantom = make_phantom(shape, np.random.default_rng([seed, i]))
        tmp = out / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for modality, image in phantom.images.items():
            _save_nifti(image, tmp / f"{name}_{modality}.nii.gz")
        _save_nifti(phantom.seg, tmp / f"{name}_seg.nii.gz")
        final = out / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        cases.append(final)
    return cases
