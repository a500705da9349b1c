"""Baseline trainers for missing-modality comparisons, on the same explicit training budget as GMD.

* ``nnUNetTrainerBudget``: stock ``nnUNetTrainer`` that only honours the budget environment variables, so the
  demo and benchmark can train the stock baseline for exactly as long as every other method. At test time a
  missing channel is zero-filled.
* ``nnUNetTrainerModalityDropout``: stock network, but every training sample sees a random non-empty subset
  of its input channels (the others zeroed), each of the 2^M - 1 subsets equally likely. This is the common
  strong baseline for missing-modality robustness.
* ``nnUNetTrainerBudget_AdamW``, ``nnUNetTrainerModalityDropout_AdamW``: the same two under the optimiser of our
  DS/GMD trainers (nnU-Net's AdamW variant at 1e-3, poly decay) instead of SGD at 1e-2, for the optimiser study.

Budget, seeds, atomic checkpoints and the optional final validation come from
:class:`nnunet_gmd.nnunet.trainer_base.PackageTrainer`, as for our own trainers. The training step is nnU-Net's.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam

from nnunet_gmd.nnunet.trainer_base import SMOKE_BUDGET, PackageTrainer, derived_seed
from nnunet_gmd.subsets import all_subsets, subset_mask

__all__ = ["nnUNetTrainerBudget", "nnUNetTrainerModalityDropout", "nnUNetTrainerBudget_smoke",
           "nnUNetTrainerModalityDropout_smoke", "nnUNetTrainerBudget_complete", "nnUNetTrainerBudget_complete_smoke",
           "nnUNetTrainerBudget_AdamW", "nnUNetTrainerModalityDropout_AdamW", "nnUNetTrainerBudget_AdamW_smoke",
           "nnUNetTrainerModalityDropout_AdamW_smoke"]


def drop_random_modalities(data: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zero the channels outside one uniformly drawn non-empty subset, independently per sample.

    Zero is what a missing channel becomes at test time for a stock nnU-Net (after z-scoring, the mean).
    """
    num_channels = data.shape[1]
    subsets = all_subsets(num_channels)
    draws = torch.randint(len(subsets), (data.shape[0],), generator=generator)
    keep = torch.stack([subset_mask(subsets[int(i)], num_channels) for i in draws])
    shape = keep.shape + (1,) * (data.ndim - 2)
    return data * keep.view(shape).to(device=data.device, dtype=data.dtype)


class nnUNetTrainerBudget(PackageTrainer, nnUNetTrainer):
    """Stock nnU-Net training, with the budget taken from ``NNUNET_GMD_*`` environment variables.

    With a ``modality_availability.json`` the channels a case lacks are zero in its batches (what a user feeds
    stock nnU-Net today: zero-filled files give zeros after normalisation too), also when the record marks
    sequences absent whose files are there (``benchmark brats --drop-train``).
    """

    def _zero_absent(self, batch: dict) -> dict:
        mask = self._batch_availability(batch)
        if mask is None:
            return batch
        keep = mask.view(*mask.shape, *([1] * (batch["data"].ndim - 2)))
        return {**batch, "data": batch["data"] * keep.to(batch["data"].dtype)}

    def train_step(self, batch: dict) -> dict:
        return super().train_step(self._zero_absent(batch))

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step(self._zero_absent(batch))


class nnUNetTrainerBudget_complete(nnUNetTrainerBudget):
    """Stock nnU-Net on the complete training cases only: every case ``modality_availability.json`` marks
    incomplete is left out of training (validation keeps its cases)."""

    def do_split(self):
        tr_keys, val_keys = super().do_split()
        table = self.training_availability or {}
        n = len(self.dataset_json["channel_names"])
        complete = [k for k in tr_keys if k not in table or len(table[k]) == n]
        if not complete:
            raise ValueError("every training case of this fold lacks a sequence; nothing is left to train on")
        if len(complete) < len(tr_keys):
            self.print_to_log_file(f"training on the {len(complete)} complete of {len(tr_keys)} training cases "
                                   f"(modality_availability.json)", also_print_to_console=True)
        return complete, val_keys


class nnUNetTrainerModalityDropout(nnUNetTrainerBudget):
    """Stock network trained on randomly masked inputs: each sample keeps one random non-empty channel subset."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        # Own generator: the subset draw is reproducible and does not perturb nnU-Net's augmentation RNG.
        self.dropout_generator = torch.Generator().manual_seed(derived_seed(12345))

    def train_step(self, batch: dict) -> dict:
        batch = dict(batch)
        batch["data"] = drop_random_modalities(batch["data"], self.dropout_generator)
        return super().train_step(batch)


class nnUNetTrainerBudget_AdamW(nnUNetTrainerBudget, nnUNetTrainerAdam):
    """Stock nnU-Net under nnU-Net's AdamW variant at 1e-3 (the DS/GMD trainers' optimiser) instead of SGD."""

    default_initial_lr = 1e-3


class nnUNetTrainerModalityDropout_AdamW(nnUNetTrainerModalityDropout, nnUNetTrainerAdam):
    """ModalityDropout under nnU-Net's AdamW variant at 1e-3 (the DS/GMD trainers' optimiser) instead of SGD."""

    default_initial_lr = 1e-3


class nnUNetTrainerBudget_smoke(nnUNetTrainerBudget):
    """Two tiny epochs, for tests (the budget variables still win when set)."""

    budget = SMOKE_BUDGET


class nnUNetTrainerModalityDropout_smoke(nnUNetTrainerModalityDropout):
    """Two tiny epochs, for tests (the budget variables still win when set)."""

    budget = SMOKE_BUDGET


class nnUNetTrainerBudget_complete_smoke(nnUNetTrainerBudget_complete):
    budget = SMOKE_BUDGET


class nnUNetTrainerBudget_AdamW_smoke(nnUNetTrainerBudget_AdamW):
    budget = SMOKE_BUDGET


class nnUNetTrainerModalityDropout_AdamW_smoke(nnUNetTrainerModalityDropout_AdamW):
    budget = SMOKE_BUDGET
