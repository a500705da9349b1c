"""The cases of a prediction input folder, and the checks every channel file passes before nnU-Net reads it."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter

from nnunet_gmd.errors import UserError
from nnunet_gmd.nifti import NIFTI_ENDINGS, cannot, nifti_problem, nonfinite_problem
from nnunet_gmd.subsets import Subset


@dataclass(frozen=True)
class CaseFiles:
    """One case to predict: its id and the files of the channels it has (channel index -> file)."""

    case_id: str
    files: dict[int, Path]


def find_cases(input_dir: Path, file_ending: str, names: Sequence[str]) -> list[CaseFiles]:
    """Cases of an ``nnUNetv2_predict`` input folder; absent channels are allowed, unknown ones are not."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"input folder {input_dir} does not exist")
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + r"$")
    cases: dict[str, dict[int, Path]] = {}
    other_images: list[str] = []
    for f in sorted(input_dir.iterdir()):
        if not f.name.endswith(file_ending) or f.name.startswith(".") or not f.is_file():
            if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(NIFTI_ENDINGS):
                other_images.append(f.name)   # e.g. a .nii among .nii.gz files: skipped, so say so
            continue
        m = pattern.match(f.name)
        if not m:
            raise UserError(f"{f.name} in {input_dir}: image files must be named CASE_XXXX{file_ending}, "
                            f"XXXX being the channel index")
        channel = int(m.group("channel"))
        if channel >= len(names):
            known = ", ".join(f"{i:04d}={n}" for i, n in enumerate(names))
            raise UserError(f"case {m.group('case')}: {f.name} is channel {channel}, but the model has only "
                            f"{len(names)} channels ({known})")
        cases.setdefault(m.group("case"), {})[channel] = f
    if other_images:
        warnings.warn(f"{len(other_images)} image file(s) in {input_dir} are skipped because the model's files end "
                      f"in {file_ending}: {', '.join(other_images[:5])}{' ...' if len(other_images) > 5 else ''}",
                      UserWarning, stacklevel=2)
    if not cases:
        raise UserError(f"no CASE_XXXX{file_ending} images in {input_dir}")
    return [CaseFiles(case_id, files) for case_id, files in sorted(cases.items())]


def resolve_available(case: CaseFiles, names: Sequence[str], forced: Optional[Subset] = None) -> Subset:
    """The channels a case is predicted from: the present ones, or the forced subset (which must be present)."""
    if forced is None:
        subset = tuple(sorted(case.files))
    else:
        absent = [names[c] for c in forced if c not in case.files]
        if absent:
            raise UserError(f"case {case.case_id}: --available asks for {', '.join(absent)}, but "
                            + ", ".join(f"{case.case_id}_{c:04d}" for c in forced if c not in case.files)
                            + " is not there")
        subset = tuple(sorted(forced))
    if not subset:
        raise UserError(f"case {case.case_id}: no channel at all (expected files {case.case_id}_XXXX for "
                        f"{', '.join(f'{i:04d}={n}' for i, n in enumerate(names))})")
    return subset


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _mm(spacing: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(s):g}" for s in spacing) + ") mm"


def check_case(case: CaseFiles, reader: BaseReaderWriter) -> tuple[tuple[int, ...], dict]:
    """Read every channel file of a case with the dataset's reader; same shape and spacing, finite values.

    Returns the array shape and the reader properties of the first channel: the geometry that zero images of
    absent channels get.
    """
    ref: Optional[tuple[Path, tuple[int, ...], dict]] = None
    for channel, f in sorted(case.files.items()):
        # nibabel first: it names truncation and NaN voxels, which SimpleITK reads silently (as zeros), and it
        # fails quietly on a non-NIfTI file where SimpleITK prints "sitk::ERROR" lines before raising
        problem = nifti_problem(f, check_finite=True)
        if problem:
            raise UserError(f"case {case.case_id}: {cannot(f.name, problem)}")
        try:
            data, props = reader.read_images([str(f)])
        except Exception as e:  # readers raise anything from RuntimeError to EOFError on broken files
            raise UserError(f"case {case.case_id}: cannot read {f.name} ({_short(e)})") from None
        if data.shape[0] != 1:
            raise UserError(f"case {case.case_id}: {f.name} holds {data.shape[0]} channels; "
                            f"one file per channel is expected")
        problem = nonfinite_problem(data)   # a reader other than nibabel's may still see them
        if problem:
            raise UserError(f"case {case.case_id}: {cannot(f.name, problem)}")
        shape = tuple(data.shape[1:])
        if ref is None:
            ref = (f, shape, props)
            continue
        ref_file, ref_shape, ref_props = ref
        if shape != ref_shape:
            raise UserError(f"case {case.case_id}: {f.name} has shape {shape}, but {ref_file.name} has {ref_shape}")
        if not np.allclose(props["spacing"], ref_props["spacing"]):
            raise UserError(f"case {case.case_id}: {f.name} has spacing {_mm(props['spacing'])}, but "
                            f"{ref_file.name} has {_mm(ref_props['spacing'])}")
    assert ref is not None
    return ref[1], ref[2]
