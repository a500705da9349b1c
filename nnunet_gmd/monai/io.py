"""Output naming: segmentations are named after the case, not after one of its sequence files."""
from __future__ import annotations

from typing import Any

from monai.data.folder_layout import default_name_formatter


def case_name_formatter(metadict: dict, saver: Any) -> dict:
    """``SaveImaged(output_name_formatter=...)``: ``<case>.nii.gz`` instead of the first sequence's file name.

    :class:`~nnunet_gmd.monai.transforms.StackModalitiesd` stores the case name under ``meta["case"]``; without
    it MONAI's default naming is used.
    """
    case = (metadict or {}).get("case")
    if not case:
        return default_name_formatter(metadict, saver)
    return {"subject": str(case), "idx": None}
