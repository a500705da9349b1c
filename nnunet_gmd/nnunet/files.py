"""Integrity check for NIfTI files.

SimpleITK (and with it nnU-Net's default reader) reads a truncated ``.nii.gz`` without complaint and fills the
missing voxels with zeros, so a broken download would be segmented as if half the head were empty. nibabel
checks that the whole data block is there, which is what this module is for.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

NIFTI_ENDINGS = (".nii", ".nii.gz")


def nifti_problem(path: Path) -> Optional[str]:
    """``None`` if ``path`` is not NIfTI or holds its full data block; otherwise what is wrong, in a few words."""
    if not str(path).lower().endswith(NIFTI_ENDINGS):
        return None
    import nibabel as nib

    try:
        np.asanyarray(nib.load(str(path)).dataobj)
    except EOFError:
        return "the compressed data ends early: the file is truncated"
    except Exception as e:  # nibabel raises OSError, ImageFileError, ValueError, zlib.error, ...
        text = " ".join(str(e).split())
        m = re.search(r"Expected (\d+) bytes, got (\d+) bytes", text)
        if m:
            return f"the image data is incomplete ({m.group(2)} of {m.group(1)} bytes): the file is truncated"
        return f"damaged file: {text}" if text else f"damaged file ({type(e).__name__})"
    return None
