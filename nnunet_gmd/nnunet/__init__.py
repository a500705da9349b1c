"""nnU-Net v2 integration: trainers, missing-modality prediction, robustness reports, BraTS conversion."""
from pathlib import Path


def ext_trainer_path() -> Path:
    """Folder for ``nnUNet_extTrainer``: it holds only a shim module that re-exports our trainers.

    nnU-Net imports every module below that folder while looking for a trainer, so it must never be the
    package or the repository root.
    """
    return Path(__file__).resolve().parent / "ext_trainers"
