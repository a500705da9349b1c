"""A trained nnU-Net model folder as our commands load it: the folder, the predictor, its channels, its DS network.

The predictor is nnU-Net's own ``nnUNetPredictor``, with our trainers findable (``nnUNet_extTrainer``), so the
network is rebuilt by the trainer's ``build_network_architecture`` and loaded strictly, as ``nnUNetv2_predict``
does.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.file_path_utilities import get_output_folder

from nnunet_gmd.errors import UserError
from nnunet_gmd.networks import DSNetworkBase, unwrap
from nnunet_gmd.nnunet import ext_trainer_path


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


@dataclass
class TrainedModel:
    """A loaded model folder: what ``predict`` and ``evaluate`` read of it, in one place."""

    folder: Path
    predictor: nnUNetPredictor
    channel_names: list[str]
    ds: Optional[DSNetworkBase]   # None: not a DS network; absent channels are zero-filled for it

    @classmethod
    def load(cls, folder: Path, folds: Sequence[int | str], checkpoint: str = "checkpoint_final.pth",
             device: str = "cuda", step_size: float = 0.5, use_mirroring: bool = True, verbose: bool = False,
             allow_tqdm: bool = True) -> "TrainedModel":
        predictor = load_predictor(folder, folds, checkpoint, device, step_size, use_mirroring, verbose, allow_tqdm)
        return cls(Path(folder), predictor, channel_names(predictor.dataset_json), ds_network(predictor))

    @property
    def trainer_name(self) -> str:
        return self.predictor.trainer_name


def refuse_cascade(predictor: nnUNetPredictor) -> None:
    if predictor.configuration_manager.previous_stage_name is not None:
        raise UserError("cascade configurations take the previous stage's segmentation as extra input channels; "
                        "missing-modality prediction supports full-resolution and 2d configurations")
