"""An integrity check for NIfTI files, shared by conversion, prediction and the MONAI bundle.

SimpleITK (and with it nnU-Net's default reader) reads a truncated ``.nii.gz`` without complaint and fills the
missing voxels with zeros, so a broken download would be segmented as if half the head were empty. nibabel
checks that the whole data block is there. NaN voxels are refused as well: nnU-Net's normalisation turns them
into a NaN input, which a network turns into an empty mask without any error.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

NIFTI_ENDINGS = (".nii", ".nii.gz")
NONFINITE = "contains"


def nifti_problem(path: Path, check_finite: bool = False) -> Optional[str]:
    """``None`` if ``path`` is not NIfTI or holds its full data block; otherwise what is wrong, in a few words.

    ``check_finite`` also refuses NaN or infinite voxels (the data block is read anyway).
    """
    if not str(path).lower().endswith(NIFTI_ENDINGS):
        return None
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except EOFError:
        return "the compressed data ends early: the file is truncated"
    except Exception as e:  # nibabel raises OSError, ImageFileError, ValueError, zlib.error, ...
        text = " ".join(str(e).split())
        m = re.search(r"Expected (\d+) bytes, got (\d+) bytes", text)
        if m:
            return f"the image data is incomplete ({m.group(2)} of {m.group(1)} bytes): the file is truncated"
        return f"damaged file: {text}" if text else f"damaged file ({type(e).__name__})"
    return nonfinite_problem(data) if check_finite else None


def nonfinite_problem(data) -> Optional[str]:
    """``None`` if every voxel of ``data`` (NumPy or torch) is finite; else how many are not, in a few words.

    One wording for every reader: nnU-Net's SimpleITK reader turns NaN voxels into 0 without a word, and MONAI's
    loaders keep them, so both integrations check the data themselves.
    """
    finite = np.isfinite(np.asarray(data))
    if finite.all():
        return None
    return f"{NONFINITE} {int(finite.size - finite.sum())} NaN or infinite voxel(s)"


def cannot(name: str, problem: str) -> str:
    """``cannot read NAME (problem)`` for a damaged file, ``cannot use NAME (problem)`` for NaN voxels."""
    return f"{'cannot use' if problem.startswith(NONFINITE) else 'cannot read'} {name} ({problem})"
