"""Robustness under missing modalities: predict a fold's validation cases from every channel subset and score them.

Predictions are those :func:`nnunet_gmd.nnunet.predict.predict_cases` (what ``nnunet-gmd predict`` does) writes
when the other files are absent, one folder per subset, so the numbers describe exactly what a user gets. They are
made by :func:`~nnunet_gmd.nnunet.subset_sweep.predict_case_subsets`, which reads and preprocesses each case once and
reuses that wherever the result is provably the same. Scoring is
nnU-Net's own ``compute_metrics`` on the dataset's regions or labels (per-subset ``summary.json`` in nnU-Net's
format), plus HD95 from MONAI. Finished subsets are reused on a re-run as long as the checkpoint, the cases and
the prediction settings are the same.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_metrics, region_or_label_to_mask, save_summary_json
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
from tqdm import tqdm

from nnunet_gmd.atomic import write_json
from nnunet_gmd.availability import AVAILABILITY_FILE, load_availability
from nnunet_gmd.errors import UserError
from nnunet_gmd.nnunet.model import TrainedModel
from nnunet_gmd.nnunet.cases import CaseFiles
from nnunet_gmd.nnunet.predict import record_availability
from nnunet_gmd.nnunet.subset_sweep import predict_case_subsets
from nnunet_gmd.report import Report, SubsetResult
from nnunet_gmd.subsets import Subset, all_subsets, subset_name

Region = Union[int, tuple[int, ...]]
_DONE_FILE = ".subset_complete.json"


# ---------------------------------------------------------------------------------------------- what to evaluate
def validation_cases(dataset_name: str, fold: int) -> list[str]:
    """The fold's validation case ids from nnU-Net's ``splits_final.json`` (written when training starts)."""
    pre = os.environ.get("nnUNet_preprocessed")
    if not pre:
        raise UserError("nnUNet_preprocessed is not set; evaluate reads the fold's split from it")
    splits_file = Path(pre) / dataset_name / "splits_final.json"
    if not splits_file.is_file():
        raise UserError(f"{splits_file} does not exist; nnU-Net writes it when training starts")
    splits = json.loads(splits_file.read_text())
    if not 0 <= fold < len(splits):
        raise UserError(f"fold {fold} is not in {splits_file} (it has folds 0..{len(splits) - 1})")
    return sorted(splits[fold]["val"])


def raw_cases(dataset_name: str, dataset_json: dict, case_ids: Sequence[str]) -> tuple[list[CaseFiles], dict]:
    """Image files (from imagesTr) and label files (labelsTr) of ``case_ids``, via nnU-Net's own lookup."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise UserError("nnUNet_raw is not set; evaluate reads the validation images and labels from it")
    folder = Path(raw) / dataset_name
    if not folder.is_dir():
        raise UserError(f"raw dataset {folder} does not exist")
    entries = get_filenames_of_train_images_and_targets(str(folder), dict(dataset_json))
    missing = [c for c in case_ids if c not in entries]
    if missing:
        raise UserError(f"validation case {missing[0]} is not in {folder} (the split does not match the raw data)")
    cases, labels = [], {}
    for case_id in case_ids:
        images, label = entries[case_id]["images"], Path(entries[case_id]["label"])
        if not label.is_file():
            raise UserError(f"case {case_id}: reference segmentation {label} does not exist")
        cases.append(CaseFiles(case_id, {i: Path(f) for i, f in enumerate(images)}))
        labels[case_id] = label
    return cases, labels


def case_availability(dataset_name: str, names: Sequence[str], case_ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Channels each case really has: the raw dataset's ``modality_availability.json``, else every channel."""
    full = tuple(range(len(names)))
    record = Path(os.environ.get("nnUNet_raw", "")) / dataset_name / AVAILABILITY_FILE
    table = load_availability(record, names) if os.environ.get("nnUNet_raw") and record.is_file() else {}
    return {c: table.get(c, full) for c in case_ids}


def named_regions(label_manager: LabelManager) -> list[tuple[Region, str]]:
    """The regions (or labels) nnU-Net evaluates, each with its dataset.json name, e.g. ((1, 2, 3), 'whole tumor')."""
    regions = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    by_value: dict[tuple[int, ...], str] = {}
    for name, value in label_manager.label_dict.items():
        key = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        by_value.setdefault(key, name)
    out = []
    for r in regions:
        key = tuple(int(v) for v in r) if isinstance(r, (list, tuple)) else (int(r),)
        out.append((tuple(key) if isinstance(r, (list, tuple)) else int(r), by_value.get(key, str(r))))
    return out


# ---------------------------------------------------------------------------------------------- scoring
def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI); NaN when either mask is empty."""
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not ref.any():
        return float("nan")
    union = np.nonzero(pred | ref)
    crop = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in union)  # surfaces stay inside
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = compute_hausdorff_distance(torch.from_numpy(np.ascontiguousarray(pred[crop]))[None, None],
                                       torch.from_numpy(np.ascontiguousarray(ref[crop]))[None, None],
                                       include_background=True, percentile=95, spacing=list(spacing))
    return float(d.item())


def score_case(reference: Path, prediction: Path, reader: BaseReaderWriter, regions: Sequence[Region],
               ignore_label: Optional[int], with_hd95: bool) -> dict:
    """nnU-Net's ``compute_metrics`` for one case, with HD95 added per region."""
    result = compute_metrics(str(reference), str(prediction), reader, list(regions), ignore_label)
    if with_hd95:
        ref, props = reader.read_seg(str(reference))
        pred, _ = reader.read_seg(str(prediction))
        keep = ref != ignore_label if ignore_label is not None else np.ones(ref.shape, dtype=bool)
        spacing = props["spacing"][-(ref.ndim - 1):]
        for r in regions:
            m_ref = region_or_label_to_mask(ref, r) & keep
            m_pred = region_or_label_to_mask(pred, r) & keep
            result["metrics"][r]["HD95"] = hd95(m_pred[0], m_ref[0], spacing)
    return result


def summarize(per_case: list[dict], regions: Sequence[Region]) -> dict:
    """nnU-Net's summary (mean over cases, NaN-aware, as ``compute_metrics_on_folder``), without its worker pool."""
    metrics = list(per_case[0]["metrics"][regions[0]].keys())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN region: mean stays NaN
        means = {r: {m: np.nanmean([c["metrics"][r][m] for c in per_case]) for m in metrics} for r in regions}
        foreground = {m: np.mean([means[r][m] for r in regions]) for m in metrics}
    for item in per_case:
        recursive_fix_for_json_export(item)
    recursive_fix_for_json_export(means)
    recursive_fix_for_json_export(foreground)
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground}


# ---------------------------------------------------------------------------------------------- reuse
def _fingerprint(model_folder: Path, folds: Sequence[Union[int, str]], checkpoint: str, predictor: nnUNetPredictor,
                 subset: Subset, case_ids: Sequence[str]) -> dict:
    ckpts = []
    for f in folds:
        st = (model_folder / f"fold_{f}" / checkpoint).stat()
        ckpts.append([f"fold_{f}/{checkpoint}", st.st_size, st.st_mtime_ns])
    return {"checkpoints": ckpts, "subset": list(subset), "cases": list(case_ids),
            "step_size": predictor.tile_step_size, "mirroring": predictor.use_mirroring}


def _is_done(folder: Path, fingerprint: dict, case_ids: Sequence[str], file_ending: str) -> bool:
    marker = folder / _DONE_FILE
    if not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text()) != fingerprint:
            return False
    except json.JSONDecodeError:
        return False
    return all((folder / f"{c}{file_ending}").is_file() for c in case_ids)


# ---------------------------------------------------------------------------------------------- main entry
def evaluate_missing_modalities(model: TrainedModel, dataset_name: str,
                                configuration: str, fold: int, out_dir: Path, checkpoint: str = "checkpoint_final.pth",
                                subsets: Optional[Sequence[Subset]] = None, with_hd95: bool = True,
                                num_processes_segmentation_export: int = 3, progress: bool = True) -> dict:
    """Predict and score the fold's validation cases under every channel subset; returns the report dict.

    nnU-Net's chatter goes to ``out_dir/predictions/predict.log`` so the progress bar stays readable.
    """
    predictor, model_folder, names = model.predictor, model.folder, model.channel_names
    dataset_json = predictor.dataset_json
    ending = dataset_json["file_ending"]
    case_ids = validation_cases(dataset_name, fold)
    if not case_ids:
        raise UserError(f"fold {fold} of {dataset_name} has no validation cases")
    cases, labels = raw_cases(dataset_name, dataset_json, case_ids)
    label_manager = predictor.label_manager
    regions = named_regions(label_manager)
    region_values = [r for r, _ in regions]
    reader = predictor.plans_manager.image_reader_writer_class()
    subsets = list(subsets) if subsets is not None else all_subsets(len(names))
    if model.ds is None and len(subsets) > 1:
        warnings.warn(f"{predictor.trainer_name} does not use a Dynamic Sharing network: absent channels are "
                      f"zero-filled for it", UserWarning, stacklevel=2)

    # a case is scored only on the subsets of the sequences it really has (modality_availability.json)
    available = case_availability(dataset_name, names, case_ids)
    cases_for = {s: [c for c in cases if set(s) <= set(available[c.case_id])] for s in subsets}
    ids_for = {s: [c.case_id for c in cases_for[s]] for s in subsets}

    out_dir = Path(out_dir)
    pred_root = out_dir / "predictions"
    pred_root.mkdir(parents=True, exist_ok=True)
    folders = {subset: pred_root / subset_name(subset, names) for subset in subsets}
    fingerprints = {s: _fingerprint(model_folder, [fold], checkpoint, predictor, s, ids_for[s]) for s in subsets}
    todo = [s for s in subsets if not _is_done(folders[s], fingerprints[s], ids_for[s], ending)]
    for subset in todo:
        (folders[subset] / _DONE_FILE).unlink(missing_ok=True)
        folders[subset].mkdir(parents=True, exist_ok=True)
    if todo:
        bar = tqdm(total=sum(len(cases_for[s]) for s in todo), desc="predicting subsets x cases",
                   unit="prediction", disable=not progress)
        groups: dict[tuple[int, ...], list[CaseFiles]] = {}
        for case in cases:
            groups.setdefault(available[case.case_id], []).append(case)
        with open(pred_root / "predict.log", "a") as log, contextlib.redirect_stdout(log):
            for channels, group in groups.items():
                group_todo = [s for s in todo if set(s) <= set(channels)]
                if not group_todo:
                    continue
                routes = predict_case_subsets(predictor, group, lambda case, s: folders[s] / case.case_id,
                                              group_todo, num_processes_segmentation_export,
                                              on_prediction=bar.update)
                print(f"nnunet-gmd evaluate: {routes['reused']} subset predictions reused the case's "
                      f"preprocessing, {routes['preprocessed']} preprocessed their zero-filled input")
        bar.close()
        for subset in todo:
            record_availability(folders[subset], predictor, {c: subset for c in ids_for[subset]})
            write_json(folders[subset] / _DONE_FILE, fingerprints[subset])

    entries = []
    for subset in tqdm(subsets, desc="scoring subsets", unit="subset", disable=not progress):
        folder = folders[subset]
        per_case = [score_case(labels[case.case_id], folder / f"{case.case_id}{ending}", reader, region_values,
                               label_manager.ignore_label, with_hd95) for case in cases_for[subset]]
        if per_case:
            summary = summarize(per_case, region_values)
            save_summary_json(summary, str(folder / "summary.json"))
            metrics = {name: _metric_block(summary["mean"][r], with_hd95) for r, name in regions}
        else:   # no case has these sequences: nothing to score
            metrics = {name: _metric_block({"Dice": None, "HD95": None}, with_hd95) for _, name in regions}
        entries.append(SubsetResult([names[i] for i in subset], metrics, n_cases=len(per_case)))
    details = {"configuration": configuration, "plans": predictor.plans_manager.plans_name, "fold": fold,
               "checkpoint": checkpoint,
               "network": "dynamic sharing" if model.ds is not None else "other (absent channels zero-filled)"}
    return Report(trainer=predictor.trainer_name, dataset=dataset_name, channels=names, subsets=entries,
                  regions=[name for _, name in regions], cases=case_ids, details=details)


def _metric_block(mean: dict, with_hd95: bool) -> dict:
    block = {"dice": mean["Dice"]}
    if with_hd95:
        block["hd95"] = mean["HD95"]
    return block

