"""Case lists for the MONAI bundle: which sequence files each case has, from a folder or a datalist JSON.

An absent sequence is normal here (that is what the model is for), so a case simply lacks that key and the
loading transforms switch the branch off. Only a case with no sequence at all is an error. Every error names
the case and the file so a clinician running the bundle on a folder of 200 cases can find the culprit.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from nnunet_gmd.errors import UserError
from nnunet_gmd.monai.brats import MODALITIES
from nnunet_gmd.subsets import all_subsets, subset_name

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_KEY = "label"
CASE_KEY = "case"
SUBSET_KEY = "subset"


class CaseListError(UserError, ValueError):
    """A case list that cannot be used: no cases, a case without any sequence, a missing label, ..."""


def _find_nifti(folder: Path, stem: str) -> Optional[Path]:
    for suffix in NIFTI_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def scan_case_folders(dataset_dir: str | os.PathLike, modalities: Sequence[str] = MODALITIES,
                      label_suffix: str = "seg") -> list[dict[str, Any]]:
    """Cases of a BraTS-style folder ``DIR/<case>/<case>_<modality>.nii.gz`` (``.nii`` also accepted).

    Hidden folders are skipped. Absent sequences are left out of the case's dict; the label is included
    when ``<case>_<label_suffix>`` exists.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise CaseListError(f"dataset_dir {str(root)!r} is not a folder of BraTS-style case folders")
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case: dict[str, Any] = {CASE_KEY: folder.name}
        for key in modalities:
            path = _find_nifti(folder, f"{folder.name}_{key}")
            if path is not None:
                case[key] = str(path)
        label = _find_nifti(folder, f"{folder.name}_{label_suffix}")
        if label is not None:
            case[LABEL_KEY] = str(label)
        cases.append(case)
    if not cases:
        raise CaseListError(f"dataset_dir {str(root)!r} holds no case folders "
                            f"(expected {root}/<case>/<case>_{{{','.join(modalities)}}}.nii.gz)")
    return cases


def read_datalist(datalist_file: str | os.PathLike, key: str = "testing",
                  base_dir: Optional[str | os.PathLike] = None,
                  modalities: Sequence[str] = MODALITIES) -> list[dict[str, Any]]:
    """Entries of a model-zoo style datalist JSON: ``{"<key>": [{"case": ..., "t1": path, ...}, ...]}``.

    A bare JSON list is accepted too. Relative paths are resolved against ``base_dir`` (the bundle's
    ``dataset_dir``), or against the JSON's folder when ``base_dir`` is not an existing folder. A sequence
    given as ``null``/``""`` or pointing at a file that does not exist counts as absent (with a warning).
    """
    path = Path(datalist_file)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseListError(f"datalist file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise CaseListError(f"datalist file {str(path)!r} is not valid JSON: {e}") from None
    if isinstance(content, dict):
        if key not in content:
            raise CaseListError(f"datalist file {str(path)!r} has no {key!r} list (keys: {sorted(content)})")
        content = content[key]
    if not isinstance(content, list) or not all(isinstance(item, dict) for item in content):
        raise CaseListError(f"datalist file {str(path)!r}: {key!r} must be a list of objects, one per case")
    base = Path(base_dir) if base_dir and Path(base_dir).is_dir() else path.parent
    entries = []
    for i, item in enumerate(content):
        entry = dict(item)
        entry.setdefault(CASE_KEY, _case_name_from_files(item, i, modalities))
        for k in (*modalities, LABEL_KEY):
            value = entry.get(k)
            if value in (None, ""):
                entry.pop(k, None)
                continue
            if not isinstance(value, str):
                raise CaseListError(f"datalist file {str(path)!r}, case {entry[CASE_KEY]!r}: {k!r} must be a file "
                                    f"path, got {value!r}")
            file = Path(value) if Path(value).is_absolute() else base / value
            if not file.is_file():
                logger.warning("case %r: %s file %s does not exist; treating %s as absent",
                               entry[CASE_KEY], k, file, k)
                entry.pop(k)
                continue
            entry[k] = str(file)
        entries.append(entry)
    if not entries:
        raise CaseListError(f"datalist file {str(path)!r}: the {key!r} list is empty")
    return entries


def _case_name_from_files(item: dict, index: int, modalities: Sequence[str] = MODALITIES) -> str:
    """``<case>`` from ``<case>_<modality>.nii.gz``; otherwise the file's folder name; otherwise ``case_<i>``."""
    for key in modalities:
        value = item.get(key)
        if isinstance(value, str) and value:
            name = Path(value).name
            for suffix in NIFTI_SUFFIXES:
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            if name.endswith(f"_{key}"):
                return name[: -len(key) - 1]
            if Path(value).parent.name:
                return Path(value).parent.name
    return f"case_{index:04d}"


def load_cases(dataset_dir: str | os.PathLike, datalist_file: Optional[str | os.PathLike] = None,
               key: str = "testing", require_label: bool = False, require_all: bool = False,
               modalities: Sequence[str] = MODALITIES) -> list[dict[str, Any]]:
    """The bundle's case list: from ``datalist_file`` when given, else by scanning ``dataset_dir``.

    Checks every case: at least one sequence (always), all sequences (``require_all``, training: GMD switches
    branches off itself) and a label (``require_label``), and that case names are unique (they name outputs).
    """
    if datalist_file:
        cases = read_datalist(datalist_file, key=key, base_dir=dataset_dir, modalities=modalities)
        source = f"datalist {str(datalist_file)!r}"
    else:
        cases = scan_case_folders(dataset_dir, modalities)
        source = f"dataset_dir {str(dataset_dir)!r}"
    seen: set[str] = set()
    for case in cases:
        name = str(case[CASE_KEY])
        if name in seen:
            raise CaseListError(f"{source}: case name {name!r} appears twice; outputs are named after the case")
        seen.add(name)
        present = [m for m in modalities if m in case]
        if not present:
            raise CaseListError(f"{source}: case {name!r} has none of the sequences {', '.join(modalities)}; "
                                f"at least one is needed")
        if require_all and len(present) < len(modalities):
            missing = [m for m in modalities if m not in case]
            raise CaseListError(f"{source}: case {name!r} lacks {', '.join(missing)}; training and the per-subset "
                                f"evaluation need all of {', '.join(modalities)} (they switch sequences off "
                                f"themselves)")
        if require_label and LABEL_KEY not in case:
            raise CaseListError(f"{source}: case {name!r} has no label file (expected <case>_seg.nii.gz or a "
                                f"'label' entry)")
    return cases


def split_train_val(cases: Sequence[dict], val_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Deterministic split (last cases validate): at least one case on each side."""
    if len(cases) < 2:
        raise CaseListError(f"training needs at least 2 labelled cases (1 to train, 1 to validate), got {len(cases)}")
    if not 0.0 < val_fraction < 1.0:
        raise CaseListError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    return list(cases[:-n_val]), list(cases[-n_val:])


def expand_subsets(cases: Sequence[dict], modalities: Sequence[str] = MODALITIES,
                   require_all: bool = False) -> list[dict[str, Any]]:
    """One entry per (subset, case), subsets in :func:`all_subsets` order; ``subset`` is e.g. ``"t1ce+flair"``.

    A case that lacks sequences is evaluated only on the subsets of the sequences it has (the report's
    ``n_cases`` tells how many cases stand behind each subset), never on a subset it cannot supply, which would
    silently measure a smaller one. ``require_all`` makes a missing sequence an error instead.
    """
    entries = []
    for case in cases:
        missing = [m for m in modalities if m not in case]
        if missing and require_all:
            raise CaseListError(f"case {case.get(CASE_KEY)!r} lacks {', '.join(missing)}; the per-subset "
                                f"evaluation needs every sequence")
    for s in all_subsets(len(modalities)):
        for case in cases:
            if all(modalities[i] in case for i in s):
                entries.append({**case, SUBSET_KEY: subset_name(s, modalities)})
    return entries
