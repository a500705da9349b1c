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
import multiprocessing
import os
import re
import tempfile
import warnings
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy, get_output_folder
from tqdm import tqdm

from nnunet_gmd.errors import UserError
from nnunet_gmd.networks import DSNetworkBase, only_available, unwrap
from nnunet_gmd.nnunet import ext_trainer_path
from nnunet_gmd.atomic import write_json
from nnunet_gmd.nifti import NIFTI_ENDINGS, cannot, nifti_problem, nonfinite_problem
from nnunet_gmd.subsets import Subset, subset_mask

AVAILABILITY_FILE = "modality_availability.json"


@dataclass(frozen=True)
class CaseFiles:
    """One case to predict: its id and the files of the channels it has (channel index -> file)."""

    case_id: str
    files: dict[int, Path]


# ---------------------------------------------------------------------------------------------- model loading
def channel_names(dataset_json: dict) -> list[str]:
    """Channel names in channel-index order (dataset.json keys are strings)."""
    names = dataset_json["channel_names"]
    return [names[k] for k in sorted(names, key=int)]


def resolve_dataset_name(dataset: str) -> str:
    """``"501"`` or ``"Dataset501_X"`` -> ``"Dataset501_X"``, with a one-line error when nnU-Net knows no such id."""
    try:
        return maybe_convert_to_dataset_name(dataset)
    except ValueError:
        raise UserError(f"-d {dataset!r} is neither a dataset id nor a DatasetXXX_Name") from None
    except RuntimeError as e:
        if "More than one" in str(e):
            raise UserError(f"dataset id {dataset} is used by more than one dataset folder; rename one") from None
        where = ", ".join(f"{k}={os.environ.get(k) or '(unset)'}"
                          for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        raise UserError(f"no dataset with id {dataset} in {where}") from None


def model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """The training output folder ``nnUNetv2_predict -d -tr -p -c`` would use."""
    if not os.environ.get("nnUNet_results"):
        raise UserError("nnUNet_results is not set; it must point at the folder holding your trained models")
    folder = Path(get_output_folder(resolve_dataset_name(dataset), trainer, plans, configuration))
    if not folder.is_dir():
        raise UserError(f"no trained model at {folder} (check -d, -tr, -p and -c)")
    return folder


def use_our_trainers() -> None:
    """Let nnU-Net find our trainers without the user exporting ``nnUNet_extTrainer`` (their own paths stay)."""
    ours = str(ext_trainer_path())
    current = os.environ.get("nnUNet_extTrainer", "")
    if ours not in current.split(os.pathsep):
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(p for p in (current, ours) if p)


def torch_device(name: str) -> torch.device:
    """Same device set-up as ``nnUNetv2_predict``, so results match it."""
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("-device cuda was asked for, but no CUDA GPU is available (use -device cpu)")
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        return torch.device("cuda")
    if name == "mps":
        return torch.device("mps")
    raise UserError(f"-device must be cpu, cuda or mps, got {name!r}")


def load_predictor(folder: Path, folds: Sequence[int | str], checkpoint: str = "checkpoint_final.pth",
                   device: str = "cuda", step_size: float = 0.5, use_mirroring: bool = True,
                   verbose: bool = False, allow_tqdm: bool = True) -> nnUNetPredictor:
    """A stock ``nnUNetPredictor`` for a trained model folder, with a clear error for missing folds."""
    for f in folds:
        ckpt = folder / f"fold_{f}" / checkpoint
        if not ckpt.is_file():
            have = sorted(p.parent.name for p in folder.glob(f"fold_*/{checkpoint}"))
            raise UserError(f"no {checkpoint} for fold {f} in {folder} (present: {', '.join(have) or 'none'})")
    if not 0 < step_size <= 1:
        raise UserError(f"-step_size must be in (0, 1], got {step_size}")
    use_our_trainers()
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=True, device=torch_device(device), verbose=verbose,
                                verbose_preprocessing=verbose, allow_tqdm=allow_tqdm)
    try:
        predictor.initialize_from_trained_model_folder(str(folder), list(folds), checkpoint_name=checkpoint)
    except RuntimeError as e:
        raise UserError(f"cannot load the model in {folder}: {str(e).splitlines()[0]}") from None
    return predictor


def ds_network(predictor: nnUNetPredictor) -> Optional[DSNetworkBase]:
    """The predictor's network if it is a Dynamic Sharing network (it can switch branches off), else None."""
    net = unwrap(predictor.network)
    return net if isinstance(net, DSNetworkBase) else None


# ---------------------------------------------------------------------------------------------- input discovery
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


# ---------------------------------------------------------------------------------------------- prediction
def _refuse_cascade(predictor: nnUNetPredictor) -> None:
    if predictor.configuration_manager.previous_stage_name is not None:
        raise UserError("cascade configurations take the previous stage's segmentation as extra input channels; "
                        "missing-modality prediction supports full-resolution and 2d configurations")


def predict_cases(predictor: nnUNetPredictor, cases: Iterable[CaseFiles], output_dir: Path,
                  forced: Optional[Subset] = None, overwrite: bool = True, save_probabilities: bool = False,
                  num_processes_preprocessing: int = 3, num_processes_segmentation_export: int = 3,
                  warn_zero_fill: bool = True, progress: bool = True) -> dict[str, Subset]:
    """Predict ``cases`` into ``output_dir`` with their absent channels switched off (or zero-filled).

    ``forced`` predicts every case from that subset only, as if the other files were absent. Returns the subset
    each case was predicted from. With both process counts 0 nnU-Net's sequential predictor is used (no worker
    processes), like ``nnUNetv2_predict -npp 0 -nps 0``.
    """
    _refuse_cascade(predictor)
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


# ---------------------------------------------------------------------------------------------- one case, many subsets
def zero_preserving_channels(predictor: nnUNetPredictor) -> list[bool]:
    """Per channel, whether nnU-Net's normalization maps an all-zero image to zeros (z-scoring does, CT does not).

    Resampling keeps zeros at zero, so for these channels a zero-filled file preprocesses to exactly zero.
    """
    cm, pm = predictor.configuration_manager, predictor.plans_manager
    n = len(predictor.dataset_json["channel_names"])
    preprocessor = cm.preprocessor_class(verbose=False)
    normalized = preprocessor._normalize(np.zeros((n, 2, 2, 2), dtype=np.float32), np.zeros((1, 2, 2, 2), np.int8),
                                         cm, pm.foreground_intensity_properties_per_channel)
    return [bool(np.all(normalized[c] == 0)) for c in range(n)]


class _Exporter:
    """nnU-Net's export (resample to the input geometry, write the file), inline or in a bounded worker pool."""

    def __init__(self, num_processes: int):
        self._pool = multiprocessing.get_context("spawn").Pool(num_processes) if num_processes > 0 else None
        self._workers = list(self._pool._pool) if self._pool is not None else []   # as nnU-Net watches them
        self._pending: list = []
        self._limit = 2 * max(num_processes, 1)

    def _wait(self, result) -> None:
        """``result.get()``, but a dead worker (killed, out of memory) is an error instead of a hang: the pool
        replaces it silently and its task never finishes."""
        while not result.ready():
            check_workers_alive_and_busy(self._pool, self._workers, [], 0)   # raises if a worker died
            result.wait(0.5)
        result.get()

    def __call__(self, *args) -> None:
        if self._pool is None:
            export_prediction_from_logits(*args)
            return
        while len(self._pending) >= self._limit:
            self._wait(self._pending.pop(0))
        logits, *rest = args  # as nnU-Net's own pool: numpy to the workers
        self._pending.append(self._pool.apply_async(export_prediction_from_logits, (logits.numpy(), *rest)))

    def close(self) -> None:
        if self._pool is not None:
            try:
                for result in self._pending:
                    self._wait(result)
            except BaseException:
                self._pool.terminate()
                raise
            else:
                self._pool.close()
            finally:
                self._pool.join()


def predict_case_subsets(predictor: nnUNetPredictor, cases: Sequence[CaseFiles],
                         outputs: Callable[[CaseFiles, Subset], Path], subsets: Sequence[Subset],
                         num_processes_segmentation_export: int = 0,
                         on_prediction: Optional[Callable[[], None]] = None) -> dict[str, int]:
    """Predict every case from each of ``subsets``, as ``predict_cases(..., forced=subset)`` would, reading once.

    ``outputs(case, subset)`` is the output file name without its ending. A case is read, checked and preprocessed
    once with all channels. Preprocessing depends on the absent channels only through the nonzero mask (crop box
    and normalization region) and through what a zero image normalizes to; when the present channels have the
    same nonzero voxels as the whole case and the absent channels normalize zeros to zeros, the whole case's array
    with the absent channels set to zero *is* the zero-filled case's preprocessed array. Other subsets are
    preprocessed again from the zero-filled array, in memory. Returns how many subset predictions took each route.
    """
    _refuse_cascade(predictor)
    cm, pm, dataset_json = predictor.configuration_manager, predictor.plans_manager, predictor.dataset_json
    names = channel_names(dataset_json)
    full = tuple(range(len(names)))
    reader = pm.image_reader_writer_class()
    preprocessor = cm.preprocessor_class(verbose=False)
    zero_stays_zero = zero_preserving_channels(predictor)
    ds = ds_network(predictor)
    routes = {"reused": 0, "preprocessed": 0}
    exporter = _Exporter(num_processes_segmentation_export)
    try:
        for case in cases:
            missing = [names[c] for c in full if c not in case.files]
            if missing:
                raise UserError(f"case {case.case_id}: {', '.join(missing)} missing; scoring under every subset "
                                f"needs all channel files")
            check_case(case, reader)
            raw, props = reader.read_images([str(case.files[c]) for c in full])
            whole, _, whole_props = preprocessor.run_case_npy(raw, None, deepcopy(props), pm, cm, dataset_json)
            nonzero = raw != 0
            nonzero_all = nonzero.any(0)
            for subset in subsets:
                absent = [c for c in full if c not in subset]
                if all(zero_stays_zero[c] for c in absent) and np.array_equal(nonzero[list(subset)].any(0),
                                                                               nonzero_all):
                    data, data_props = whole.copy(), whole_props
                    data[absent] = 0
                    routes["reused"] += 1
                else:
                    filled = raw.copy()
                    filled[absent] = 0
                    data, _, data_props = preprocessor.run_case_npy(filled, None, deepcopy(props), pm, cm,
                                                                    dataset_json)
                    routes["preprocessed"] += 1
                with only_available(ds, None if subset == full else subset_mask(subset, len(names))):
                    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
                out = Path(outputs(case, subset))
                out.parent.mkdir(parents=True, exist_ok=True)
                exporter(logits, deepcopy(data_props), cm, pm, dataset_json, str(out), False)
                if on_prediction is not None:
                    on_prediction()
    finally:
        exporter.close()
    return routes


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
