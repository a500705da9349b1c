"""Reading and writing in the bundle: case-named outputs, a reader that names damaged files, one-line errors.

* :func:`case_name_formatter`: segmentations are named after the case, not after one of its sequence files.
* :class:`CheckedNibabelReader`: a truncated or damaged NIfTI is an error naming the file.
* :func:`run_workflow`: the bundle's ``run`` step; an input error is one line, not a MONAI traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from monai.data import NibabelReader
from monai.data.folder_layout import default_name_formatter

from nnunet_gmd.errors import UserError
from nnunet_gmd.monai.data import CaseListError
from nnunet_gmd.nifti import nifti_problem


def case_name_formatter(metadict: dict, saver: Any) -> dict:
    """``SaveImaged(output_name_formatter=...)``: ``<case>.nii.gz`` instead of the first sequence's file name.

    :class:`~nnunet_gmd.monai.transforms.StackModalitiesd` stores the case name under ``meta["case"]``; without
    it MONAI's default naming is used.
    """
    case = (metadict or {}).get("case")
    if not case:
        return default_name_formatter(metadict, saver)
    return {"subject": str(case), "idx": None}


class CheckedNibabelReader(NibabelReader):
    """MONAI's nibabel reader, but a damaged file is an error that names it.

    nibabel raises a bare ``EOFError`` ("Compressed file ended before the end-of-stream marker was reached") for
    a truncated ``.nii.gz``, which names no file; MONAI then wraps it into a traceback of hundreds of lines.
    """

    def get_data(self, img: Any):
        try:
            return super().get_data(img)
        except Exception as e:  # nibabel: EOFError, OSError, zlib.error, ValueError ...
            images = img if isinstance(img, (list, tuple)) else [img]
            names = ", ".join(str(i.get_filename()) for i in images if hasattr(i, "get_filename"))
            problem = nifti_problem(Path(names)) if len(images) == 1 and names else None
            raise CaseListError(f"cannot read {names or 'an image'} "
                                f"({problem or ' '.join(str(e).split()) or type(e).__name__})") from e


def _user_error_in(exc: BaseException) -> Optional[UserError]:
    """The first :class:`UserError` in ``exc``'s chain of causes (MONAI wraps transform errors in RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_workflow(workflow: Any, name: str = "bundle") -> None:
    """``workflow.run()`` for a bundle's ``"run"`` section; our input errors end it with one line, exit code 2.

    Cases finished before the error keep their outputs (they are written per case). Any other error keeps its
    full traceback.
    """
    try:
        workflow.run()
    except Exception as e:
        user_error = _user_error_in(e)
        if user_error is None:
            raise
        print(f"nnunet-gmd {name}: error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
