"""File helpers: atomic writes, and an integrity check for NIfTI files.

Reports and records are written through a temporary file and ``os.replace``, so a reader (or a re-run after an
interruption) never sees half a file.

SimpleITK (and with it nnU-Net's default reader) reads a truncated ``.nii.gz`` without complaint and fills the
missing voxels with zeros, so a broken download would be segmented as if half the head were empty. nibabel
checks that the whole data block is there, which is what this module is for.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional

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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json_atomic(path: Path, content: object) -> None:
    """Strict JSON (no NaN: callers turn undefined values into null), written atomically."""
    write_text_atomic(path, json.dumps(content, indent=2, allow_nan=False) + "\n")
