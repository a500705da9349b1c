"""Small output helpers: name segmentations after the case, write JSON files atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
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


def write_json_atomic(path: str | os.PathLike, content: Any) -> Path:
    """Write ``content`` as JSON to ``path`` via a temporary file and ``os.replace``: never a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
