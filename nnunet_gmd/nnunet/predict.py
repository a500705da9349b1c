"""Missing-modality prediction on top of nnU-Net's own predictor.

A case may lack some ``CASE_XXXX`` channel files. nnU-Net's preprocessing needs every channel file, so each
absent channel gets a zero image with the geometry of a present one, written to a temporary folder. For a
Dynamic Sharing network the absent branches are then switched off (``DSUNet.set_default_available``), so the
zeros never reach the output: nothing is imputed. A network that is not DS cannot switch branches off; it sees
the zero-filled channels and a warning says so, which puts baselines on the same footing.

Cases are grouped by their available subset and the stock ``nnUNetPredictor`` runs once per group, so sliding
window, mirroring and export are nnU-Net's. With every channel present the files handed to the predictor are
exactly those ``nnUNetv2_predict`` would use, and the output is identical.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from tqdm import tqdm

from nnunet_gmd.atomic import write_json
from nnunet_gmd.availability import AVAILABILITY_FILE
from nnunet_gmd.errors import UserError
from nnunet_gmd.networks import only_available
from nnunet_gmd.nifti import nifti_problem
from nnunet_gmd.nnunet.cases import CaseFiles, check_case, resolve_available
from nnunet_gmd.nnunet.model import channel_names, ds_network, refuse_cascade
from nnunet_gmd.subsets import Subset, subset_mask


def predict_cases(predictor: nnUNetPredictor, cases: Iterable[CaseFiles], output_dir: Path,
                  forced: Optional[Subset] = None, overwrite: bool = True, save_probabilities: bool = False,
                  num_processes_preprocessing: int = 3, num_processes_segmentation_export: int = 3,
                  warn_zero_fill: bool = True, progress: bool = True) -> dict[str, Subset]:
    """Predict ``cases`` into ``output_dir`` with their absent channels switched off (or zero-filled).

    ``forced`` predicts every case from that subset only, as if the other files were absent. Returns the subset
    each case was predicted from. With both process counts 0 nnU-Net's sequential predictor is used (no worker
    processes), like ``nnUNetv2_predict -npp 0 -nps 0``.
    """
    refuse_cascade(predictor)
    dataset_json = predictor.dataset_json
    names = channel_names(dataset_json)
    num_channels = len(names)
    full = tuple(range(num_channels))
    ending = dataset_json["file_ending"]
    output_dir = Path(output_dir)
    cases = list(cases)
    if forced is not None and any(c >= num_channels for c in forced):
        raise UserError(f"--available names a channel the model does not have (channels: {', '.join(names)})")

    available = {case.case_id: resolve_available(case, names, forced) for case in cases}
    if not overwrite:
        recorded = recorded_availability(output_dir)

        def done(case_id: str) -> bool:
            """An intact output from the same channels (a killed run leaves truncated files; ``--available``
            may differ from the earlier run's)."""
            out = output_dir / f"{case_id}{ending}"
            return out.is_file() and nifti_problem(out) is None \
                and recorded.get(case_id) == [names[i] for i in available[case_id]] \
                and (not save_probabilities or (output_dir / f"{case_id}.npz").is_file())
        cases = [c for c in cases if not done(c.case_id)]

    reader = predictor.plans_manager.image_reader_writer_class()
    ds = ds_network(predictor)
    groups: dict[Subset, list[tuple[list[str], str]]] = {}
    with tempfile.TemporaryDirectory(prefix="nnunet_gmd_absent_") as tmp:
        for case in tqdm(cases, desc="checking inputs", unit="case", disable=not (progress and cases)):
            shape, props = check_case(case, reader)
            subset = available[case.case_id]
            files = []
            for channel in range(num_channels):
                if channel in subset:
                    files.append(str(case.files[channel]))
                else:
                    zero = Path(tmp) / f"{case.case_id}_{channel:04d}{ending}"
                    reader.write_seg(np.zeros(shape, dtype=np.uint8), str(zero), props)
                    files.append(str(zero))
            groups.setdefault(subset, []).append((files, str(output_dir / case.case_id)))

        partial = [s for s in groups if s != full]
        if ds is None and partial and warn_zero_fill:
            n = sum(len(groups[s]) for s in partial)
            warnings.warn(f"{predictor.trainer_name} does not use a Dynamic Sharing network and cannot switch "
                          f"branches off: the absent channels of {n} case(s) are zero-filled", UserWarning,
                          stacklevel=2)
        output_dir.mkdir(parents=True, exist_ok=True)
        for subset in sorted(groups, key=lambda s: (-len(s), s)):
            lists, outputs = map(list, zip(*groups[subset]))
            with only_available(ds, None if subset == full else subset_mask(subset, num_channels)):
                if num_processes_preprocessing == 0 and num_processes_segmentation_export == 0:
                    predictor.predict_from_files_sequential(lists, outputs, save_probabilities=save_probabilities,
                                                            overwrite=True)
                else:
                    predictor.predict_from_files(
                        lists, outputs, save_probabilities=save_probabilities, overwrite=True,
                        num_processes_preprocessing=max(1, num_processes_preprocessing),
                        num_processes_segmentation_export=max(1, num_processes_segmentation_export))

    record_availability(output_dir, predictor, {c.case_id: available[c.case_id] for c in cases})
    return available


def record_availability(output_dir: Path, predictor: nnUNetPredictor, available: Mapping[str, Subset]) -> None:
    """Write (merge) ``modality_availability.json``: which channels each prediction in the folder came from."""
    names = channel_names(predictor.dataset_json)
    _record_availability(Path(output_dir) / AVAILABILITY_FILE, predictor.trainer_name,
                         ds_network(predictor) is not None,
                         {case_id: [names[i] for i in subset] for case_id, subset in available.items()})


def recorded_availability(output_dir: Path) -> dict[str, list[str]]:
    """Case id -> channel names of the predictions already in ``output_dir`` (empty without a record)."""
    try:
        return dict(json.loads((Path(output_dir) / AVAILABILITY_FILE).read_text()).get("cases", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _record_availability(path: Path, trainer: str, is_ds: bool, cases: dict[str, list[str]]) -> None:
    """Which channels each prediction in the folder was made from (merged with earlier runs into the folder)."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        record = {}
    record["trainer"] = trainer
    record["absent_channels"] = "switched off (Dynamic Sharing)" if is_ds else "zero-filled (not a DS network)"
    record.setdefault("cases", {}).update(cases)
    record["cases"] = dict(sorted(record["cases"].items()))
    write_json(path, record)
