"""Baseline trainers for missing-modality comparisons, on the same explicit training budget as GMD.

* ``nnUNetTrainerBudget``: stock ``nnUNetTrainer`` that only honours the budget environment variables, so the
  demo and benchmark can train the stock baseline for exactly as long as every other method. At test time a
  missing channel is zero-filled.
* ``nnUNetTrainerModalityDropout``: stock network, but every training sample sees a random non-empty subset
  of its input channels (the others zeroed), each of the 2^M - 1 subsets equally likely. This is the common
  strong baseline for missing-modality robustness.

The budget variables (all optional, positive integers) are shared by every trainer of this package:
``NNUNET_GMD_NUM_EPOCHS``, ``NNUNET_GMD_ITERS_PER_EPOCH`` and ``NNUNET_GMD_VAL_ITERS``; ``NNUNET_GMD_INITIAL_LR``
(a positive float) replaces the trainer's initial learning rate, for learning-rate studies.
``NNUNET_GMD_FINAL_VALIDATION=0`` skips nnU-Net's final validation after training (:class:`OptionalFinalValidation`):
the demo and benchmark score the test cases themselves under every subset, and on a CPU the all-modality
validation with mirroring costs more than a minute per method.

``NNUNET_GMD_SEED`` (a non-negative integer) makes repeated trainings differ in a controlled way: nnU-Net itself
seeds nothing. It seeds ``random``, NumPy and torch in the trainer's ``__init__`` (before the network's weights
are drawn) and offsets our own generators (subset sampler, GMD tie-breaks, modality dropout) by
:func:`derived_seed`, which leaves them at their historical seeds for seed 0. nnU-Net's augmentation worker
processes reseed themselves from the OS (``seeds=None``), so two runs with one seed are repeats, not bit copies.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_gmd.subsets import all_subsets, subset_mask

__all__ = ["nnUNetTrainerBudget", "nnUNetTrainerModalityDropout", "nnUNetTrainerBudget_smoke",
           "nnUNetTrainerModalityDropout_smoke"]

FINAL_VALIDATION_ENV = "NNUNET_GMD_FINAL_VALIDATION"
INITIAL_LR_ENV = "NNUNET_GMD_INITIAL_LR"
NUM_THREADS_ENV = "NNUNET_GMD_NUM_THREADS"
SEED_ENV = "NNUNET_GMD_SEED"
SEED_STRIDE = 1000  # derived_seed(base) = base + SEED_STRIDE * seed: streams of different seeds never coincide
BUDGET_ENV_VARS = {
    "NNUNET_GMD_NUM_EPOCHS": "num_epochs",
    "NNUNET_GMD_ITERS_PER_EPOCH": "num_iterations_per_epoch",
    "NNUNET_GMD_VAL_ITERS": "num_val_iterations_per_epoch",
}


def budget_from_env(environ: dict | None = None) -> dict[str, int]:
    """Trainer attributes to override, read from the budget environment variables that are set."""
    environ = os.environ if environ is None else environ
    out = {}
    for var, attribute in BUDGET_ENV_VARS.items():
        raw = environ.get(var, "").strip()
        if not raw:
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {var}={raw!r} must be a positive integer") from None
        if value < 1:
            raise ValueError(f"environment variable {var}={raw!r} must be a positive integer")
        out[attribute] = value
    return out


def initial_lr_from_env(environ: dict | None = None) -> float | None:
    """``NNUNET_GMD_INITIAL_LR`` as a positive float, or None when unset (for learning-rate studies)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(INITIAL_LR_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {INITIAL_LR_ENV}={raw!r} must be a positive number") from None
    if not value > 0:
        raise ValueError(f"environment variable {INITIAL_LR_ENV}={raw!r} must be a positive number")
    return value


def seed_from_env(environ: dict | None = None) -> int | None:
    """``NNUNET_GMD_SEED`` as a non-negative integer, or None when unset."""
    environ = os.environ if environ is None else environ
    raw = environ.get(SEED_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {SEED_ENV}={raw!r} must be a non-negative integer") from None
    if value < 0:
        raise ValueError(f"environment variable {SEED_ENV}={raw!r} must be a non-negative integer")
    return value


def derived_seed(base: int, environ: dict | None = None) -> int:
    """Seed of one of our generators: ``base`` shifted by the run seed (``base`` itself when unset or 0)."""
    return base + SEED_STRIDE * (seed_from_env(environ) or 0)


def seed_everything_from_env(environ: dict | None = None) -> int | None:
    """Seed ``random``, NumPy and torch from ``NNUNET_GMD_SEED`` when it is set; returns the seed."""
    seed = seed_from_env(environ)
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)   # also seeds every CUDA device
    return seed


def final_validation_enabled(environ: dict | None = None) -> bool:
    """False only when ``NNUNET_GMD_FINAL_VALIDATION`` is 0 / false / no / off."""
    environ = os.environ if environ is None else environ
    return environ.get(FINAL_VALIDATION_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class OptionalFinalValidation:
    """Mixin (put it before the nnU-Net trainer base) that honours ``NNUNET_GMD_FINAL_VALIDATION``."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        if final_validation_enabled():
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file(f"final validation skipped ({FINAL_VALIDATION_ENV}=0)", also_print_to_console=True)


def num_threads_from_env(environ: dict | None = None) -> int | None:
    """``NNUNET_GMD_NUM_THREADS`` as a positive integer, or None when unset.

    ``nnUNetv2_train -device cpu`` sets torch's intra-op threads to every core. On a shared CPU (several jobs on
    two cores) that oversubscribes: threads spin at every op's barrier and a step runs many times slower.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(NUM_THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {NUM_THREADS_ENV}={raw!r} must be a positive integer")
    return value


class AtomicCheckpoints:
    """Mixin (before the nnU-Net trainer base): nnU-Net's own checkpoint, written to a temp file, then renamed.

    A kill during ``torch.save`` then leaves the previous checkpoint intact instead of a truncated one.
    """

    def save_checkpoint(self, filename: str) -> None:
        tmp = f"{filename}.tmp"
        super().save_checkpoint(tmp)
        if os.path.isfile(tmp):  # rank 0 with checkpointing enabled
            os.replace(tmp, filename)


def apply_budget_from_env(trainer: nnUNetTrainer) -> None:
    """Override epochs / iterations (and the initial learning rate, CPU threads) of a trainer in ``__init__``.

    Also seeds the global generators from ``NNUNET_GMD_SEED`` (every trainer of this package calls this in
    ``__init__``, before ``initialize()`` builds the network), and writes ``checkpoint_latest.pth`` every epoch
    (nnU-Net: every 50), so ``--c`` after a crash loses at most one epoch; our checkpoints are written atomically.
    """
    seed_everything_from_env()
    trainer.save_every = 1
    for attribute, value in budget_from_env().items():
        setattr(trainer, attribute, value)
    lr = initial_lr_from_env()
    if lr is not None:
        trainer.initial_lr = lr
    threads = num_threads_from_env()
    if threads is not None:
        torch.set_num_threads(threads)


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


class nnUNetTrainerBudget(AtomicCheckpoints, OptionalFinalValidation, nnUNetTrainer):
    """Stock nnU-Net training, with the budget taken from ``NNUNET_GMD_*`` environment variables.

    nnU-Net records ``__init__``'s named parameters to re-create a trainer from a checkpoint, so every subclass
    spells out the full signature instead of ``*args, **kwargs``.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget_from_env(self)


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


class nnUNetTrainerBudget_smoke(nnUNetTrainerBudget):
    """Two tiny epochs, for tests (the budget variables still win when set)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 2
        apply_budget_from_env(self)


class nnUNetTrainerModalityDropout_smoke(nnUNetTrainerModalityDropout):
    """Two tiny epochs, for tests (the budget variables still win when set)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 2
        apply_budget_from_env(self)
