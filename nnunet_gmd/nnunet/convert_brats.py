"""Turn a BraTS-style folder into an nnU-Net raw dataset with the BraTS evaluation regions.

Input: ``SRC/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (BraTS 2018-2021) or the BraTS 2023 naming
``<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``. Output: ``DatasetNNN_NAME`` with the channel order, labels and regions
of nnU-Net's own BraTS conversion (``nnunetv2/dataset_conversion/Dataset137_BraTS21.py``):
channels t1, t1ce, t2, flair; labels 1 edema, 2 necrosis/non-enhancing core, 3 enhancing tumor; regions
whole tumor (1, 2, 3), tumor core (2, 3), enhancing tumor (3,).

Cases with a segmentation go to imagesTr/labelsTr and need all four sequences (nnU-Net trains on all channels),
unless ``allow_missing``: then a sequence a labelled case lacks is written as a zero image on the case's grid
(nnU-Net's planning and preprocessing run unchanged), and ``modality_availability.json`` in the dataset folder
records what was really there (case id -> available channel names). Our DS/GMD trainers read that record; for
stock nnU-Net the zeros are what a user would feed it today.
Cases without a segmentation go to imagesTs and may lack sequences: that is what ``nnunet-gmd predict`` is for.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.Dataset137_BraTS21 import convert_labels_back_to_BraTS
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from nnunet_gmd.atomic import write_json
from nnunet_gmd.availability import AVAILABILITY_FILE
from nnunet_gmd.errors import UserError
from nnunet_gmd.nifti import cannot, nifti_problem

#: nnU-Net channel index -> channel name, in the order of nnU-Net's Dataset137.
CHANNEL_NAMES: dict[int, str] = {0: "t1", 1: "t1ce", 2: "t2", 3: "flair"}
#: File-name suffixes that mean each channel (BraTS 2018-2021 first, BraTS 2023 second).
CHANNEL_SUFFIXES: dict[str, tuple[str, ...]] = {
    "t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}
#: Region-based labels exactly as nnU-Net's Dataset137 declares them.
LABELS: dict[str, object] = {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (2, 3),
                             "enhancing tumor": (3,)}
REGIONS_CLASS_ORDER = (1, 2, 3)
#: BraTS label -> nnU-Net label. BraTS 2018-2021 marks enhancing tumor 4, BraTS 2023 marks it 3.
_LABEL_MAP_2021 = {0: 0, 1: 2, 2: 1, 4: 3}
_LABEL_MAP_2023 = {0: 0, 1: 2, 2: 1, 3: 3}

_SUFFIX_TO_CHANNEL = {s: name for name, suffixes in CHANNEL_SUFFIXES.items() for s in suffixes}
_FILE_RE = re.compile(r"^(?P<prefix>.+?)[_-](?P<kind>" + "|".join(sorted(_SUFFIX_TO_CHANNEL, key=len, reverse=True))
                      + r"|seg)\.nii(?:\.gz)?$", re.IGNORECASE)


@dataclass
class BratsCase:
    """The files of one BraTS case folder: channel name -> file, and the segmentation if there is one."""

    case_id: str
    channels: dict[str, Path] = field(default_factory=dict)
    seg: Optional[Path] = None


def find_cases(src: Path) -> list[BratsCase]:
    """Every sub-folder of ``src`` that holds BraTS-named files, with a clear error for ambiguous folders."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src} is not a folder")
    cases = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        case = BratsCase(folder.name)
        for f in sorted(folder.iterdir()):
            m = _FILE_RE.match(f.name)
            if not m or not f.is_file():
                continue
            kind = m.group("kind").lower()
            if kind == "seg":
                if case.seg is not None:
                    raise UserError(f"case {folder.name}: two segmentations, {case.seg.name} and {f.name}")
                case.seg = f
                continue
            channel = _SUFFIX_TO_CHANNEL[kind]
            if channel in case.channels:
                raise UserError(f"case {folder.name}: two {channel} files, {case.channels[channel].name} and {f.name}")
            case.channels[channel] = f
        if case.channels or case.seg is not None:
            cases.append(case)
    if not cases:
        raise UserError(f"no BraTS case folders in {src} (expected {src}/<case>/<case>_t1.nii.gz, _t1ce, _t2, "
                        f"_flair and _seg, or the BraTS 2023 names t1n, t1c, t2w, t2f)")
    return cases


@dataclass(frozen=True)
class _Grid:
    """Where an image's voxels lie: what every file of one case must share."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def _header(path: Path, case_id: str) -> _Grid:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise UserError(f"case {case_id}: cannot read {path.name}: {str(e).strip().splitlines()[-1]}") from None
    return _Grid(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                 tuple(reader.GetDirection()))


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def check_case(case: BratsCase, need_all_channels: bool) -> None:
    """Same grid for every file of a case; all four sequences where nnU-Net will train on the case."""
    if not case.channels:
        raise UserError(f"case {case.case_id}: no image files (only {case.seg.name})")
    missing = [c for c in CHANNEL_NAMES.values() if c not in case.channels]
    if need_all_channels and missing:
        raise UserError(f"case {case.case_id}: labelled training case lacks {', '.join(missing)} "
                        f"(no {case.case_id}_{missing[0]}.nii.gz; nnU-Net trains on all four sequences). Pass "
                        f"--allow-missing to train on incomplete cases: the DS/GMD trainers then skip what is absent")
    files = list(case.channels.values()) + ([case.seg] if case.seg is not None else [])
    for f in files:
        problem = nifti_problem(f, check_finite=True)   # NaN voxels would silently read as 0 in nnU-Net
        if problem:
            raise UserError(f"case {case.case_id}: {cannot(f.name, problem)}")
    ref = _header(files[0], case.case_id)
    for f in files[1:]:
        grid = _header(f, case.case_id)
        if grid.size != ref.size:
            raise UserError(f"case {case.case_id}: {f.name} has shape {grid.size}, {files[0].name} has {ref.size}")
        if not np.allclose(grid.spacing, ref.spacing, rtol=1e-5, atol=1e-6):
            raise UserError(f"case {case.case_id}: {f.name} has spacing {_rounded(grid.spacing)}, {files[0].name} "
                            f"has {_rounded(ref.spacing)}")
        # misregistered sequences (a shifted origin, flipped axes) would be stacked voxel by voxel as if aligned
        if not np.allclose(grid.origin, ref.origin, rtol=0, atol=1e-3 * max(ref.spacing)):
            raise UserError(f"case {case.case_id}: {f.name} has origin {_rounded(grid.origin)} mm, {files[0].name} "
                            f"has {_rounded(ref.origin)} mm (the sequences are not registered to one grid)")
        if not np.allclose(grid.direction, ref.direction, rtol=0, atol=1e-4):
            raise UserError(f"case {case.case_id}: {f.name} has direction {_rounded(grid.direction)}, "
                            f"{files[0].name} has {_rounded(ref.direction)} (flipped or rotated axes)")


#: Label convention name -> BraTS label -> nnU-Net label.
LABEL_CONVENTIONS: dict[str, dict[int, int]] = {"2018-2021": _LABEL_MAP_2021, "2023": _LABEL_MAP_2023}


def naming_convention(case: BratsCase) -> str:
    """``"2023"`` for the BraTS 2023 file names (t1n, t1c, t2w, t2f), else ``"2018-2021"``."""
    names = [f.name for f in case.channels.values()]
    return "2023" if any(_FILE_RE.match(n).group("kind").lower() in ("t1n", "t1c", "t2w", "t2f") for n in names) \
        else "2018-2021"


def brats_to_nnunet_labels(seg: np.ndarray, where: str = "segmentation",
                           convention: Optional[str] = None) -> np.ndarray:
    """Map BraTS labels (2018-2021: 0/1/2/4; 2023: 0/1/2/3) to nnU-Net's consecutive 0/1/2/3 of Dataset137.

    With ``convention`` given, labels outside it are an error: one dataset must not mix conventions (a 3 in a
    2018-named case would otherwise silently become enhancing tumour).
    """
    found = set(np.unique(seg).tolist())
    if convention is not None:
        mapping = LABEL_CONVENTIONS[convention]
        if not found <= set(mapping):
            raise UserError(f"{where}: labels {sorted(found)} do not fit the BraTS {convention} convention of this "
                            f"dataset ({', '.join(map(str, sorted(mapping)))})")
    elif found <= set(_LABEL_MAP_2021):
        mapping = _LABEL_MAP_2021
    elif found <= set(_LABEL_MAP_2023):
        mapping = _LABEL_MAP_2023
    else:
        raise UserError(f"{where}: unexpected labels {sorted(found)}; BraTS uses 0, 1, 2 and 4 (or 3 since 2023)")
    out = np.zeros(seg.shape, dtype=np.uint8)
    for src_label, dst_label in mapping.items():
        out[seg == src_label] = dst_label
    return out


def nnunet_to_brats_labels(seg: np.ndarray) -> np.ndarray:
    """Back to the BraTS 2018-2021 convention (0/1/2/4), via nnU-Net's own inverse."""
    return convert_labels_back_to_BraTS(seg)


def _copy_image(src: Path, dst: Path) -> None:
    if src.name.lower().endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:  # .nii -> .nii.gz
        sitk.WriteImage(sitk.ReadImage(str(src)), str(dst), True)


def _write_zero_image(reference: Path, dst: Path) -> None:
    """An all-zero image on ``reference``'s grid (size, spacing, origin, direction)."""
    info = sitk.ImageFileReader()
    info.SetFileName(str(reference))
    info.ReadImageInformation()
    zero = sitk.Image(list(info.GetSize()), sitk.sitkUInt8)
    zero.SetSpacing(info.GetSpacing())
    zero.SetOrigin(info.GetOrigin())
    zero.SetDirection(info.GetDirection())
    sitk.WriteImage(zero, str(dst), True)


def _convert_seg(case: BratsCase, dst: Path, convention: str) -> None:
    try:
        img = sitk.ReadImage(str(case.seg))
    except RuntimeError as e:
        raise UserError(f"case {case.case_id}: cannot read {case.seg.name}: {str(e).strip().splitlines()[-1]}") \
            from None
    seg = brats_to_nnunet_labels(sitk.GetArrayFromImage(img), f"case {case.case_id}: {case.seg.name}", convention)
    out = sitk.GetImageFromArray(seg)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(dst), True)


def _raw_root(raw_root: Optional[Path]) -> Path:
    if raw_root is not None:
        return Path(raw_root)
    env = os.environ.get("nnUNet_raw")
    if not env:
        raise UserError("nnUNet_raw is not set; set it or pass --raw-dir")
    return Path(env)


def convert_brats(src: Path, dataset_id: int, name: str = "BraTS", raw_root: Optional[Path] = None,
                  overwrite: bool = False, allow_missing: bool = False) -> Path:
    """Write ``<raw_root>/DatasetNNN_NAME`` from the BraTS folder ``src``; returns the dataset folder.

    The dataset is assembled in a hidden sibling folder and moved into place at the end, so an interrupted run
    never leaves a half-written dataset that nnU-Net would pick up.
    """
    if not 1 <= dataset_id <= 999:
        raise UserError(f"--dataset-id must be in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise UserError(f"--name must be letters, digits, '_' or '-', got {name!r}")
    root = _raw_root(raw_root)
    if root.exists() and not root.is_dir():
        raise UserError(f"raw folder {root} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the raw folder {root}: {e.strerror}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"raw folder {root} is not writable")
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    target = root / folder_name
    if root.is_dir():
        clashes = [p.name for p in root.iterdir() if p.name.startswith(f"Dataset{dataset_id:03d}_")
                   and p.name != folder_name]
        if clashes:
            raise UserError(f"dataset id {dataset_id} is already used by {root / clashes[0]}")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists (pass --overwrite to replace it)")

    cases = find_cases(src)
    for case in tqdm(cases, desc="checking cases", unit="case"):
        check_case(case, need_all_channels=case.seg is not None and not allow_missing)
    labelled = [c for c in cases if c.seg is not None]
    convention = _dataset_convention(cases)

    tmp = root / f".{folder_name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_cases(cases, tmp, folder_name, convention)
        if allow_missing:
            write_json(tmp / AVAILABILITY_FILE,
                       {c.case_id: [n for n in CHANNEL_NAMES.values() if n in c.channels] for c in labelled})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no hidden half-written dataset after an error
        raise
    if not any((tmp / "imagesTs").iterdir()):
        (tmp / "imagesTs").rmdir()
    generate_dataset_json(str(tmp), channel_names=dict(CHANNEL_NAMES), labels=dict(LABELS),
                          num_training_cases=len(labelled), file_ending=".nii.gz",
                          regions_class_order=REGIONS_CLASS_ORDER, dataset_name=folder_name,
                          description=f"BraTS cases converted by nnunet-gmd convert-brats from {Path(src).resolve()}",
                          license="see the source dataset's terms (BraTS: cite Menze et al. 2015, Bakas et al. 2017)",
                          converted_by="nnunet-gmd convert-brats")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _dataset_convention(cases: list[BratsCase]) -> str:
    """The one label convention of a dataset, decided by its file names; mixed names are an error."""
    by_convention: dict[str, str] = {}
    for case in cases:
        by_convention.setdefault(naming_convention(case), case.case_id)
    if len(by_convention) > 1:
        raise UserError(f"cases use both BraTS file-name conventions (e.g. {by_convention['2018-2021']} the "
                        f"2018-2021 names, {by_convention['2023']} the 2023 names); convert them as two datasets")
    return next(iter(by_convention), "2018-2021")


def _write_cases(cases: list[BratsCase], tmp: Path, folder_name: str, convention: str) -> None:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp / sub).mkdir(parents=True)
    for case in tqdm(cases, desc=f"converting to {folder_name}", unit="case"):
        images = tmp / ("imagesTr" if case.seg is not None else "imagesTs")
        reference = next(iter(case.channels.values()))
        for index, channel in CHANNEL_NAMES.items():
            target = images / f"{case.case_id}_{index:04d}.nii.gz"
            if channel in case.channels:
                _copy_image(case.channels[channel], target)
            elif case.seg is not None:   # --allow-missing: nnU-Net needs every channel file of a training case
                _write_zero_image(reference, target)
        if case.seg is not None:
            _convert_seg(case, tmp / "labelsTr" / f"{case.case_id}.nii.gz", convention)


def summary(dataset_folder: Path) -> str:
    """One line about a converted dataset, for the CLI."""
    ds = json.loads((dataset_folder / "dataset.json").read_text())
    n_test = len({p.name.rsplit("_", 1)[0] for p in (dataset_folder / "imagesTs").glob("*.nii.gz")}) \
        if (dataset_folder / "imagesTs").is_dir() else 0
    line = f"wrote {dataset_folder} ({ds['numTraining']} training cases, {n_test} unlabelled cases in imagesTs)"
    record = dataset_folder / AVAILABILITY_FILE
    if record.is_file():
        cases = json.loads(record.read_text())
        incomplete = sum(len(v) < len(CHANNEL_NAMES) for v in cases.values())
        line += f"; {incomplete} training case(s) lack sequences (zero images, listed in {record.name})"
    return line
