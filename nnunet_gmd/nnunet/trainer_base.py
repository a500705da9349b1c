"""What every trainer of this package shares, the baselines included: budget, seeds, checkpoints, failed steps.

The budget variables (all optional, positive integers) are ``NNUNET_GMD_NUM_EPOCHS``, ``NNUNET_GMD_ITERS_PER_EPOCH``
and ``NNUNET_GMD_VAL_ITERS``; ``NNUNET_GMD_INITIAL_LR`` (a positive float) replaces the trainer's initial learning
rate, for learning-rate studies. ``NNUNET_GMD_FINAL_VALIDATION=0`` skips nnU-Net's final validation after
training: the demo and benchmark score the test cases themselves under every subset, and on a CPU the
all-modality validation with mirroring costs more than a minute per method.

``NNUNET_GMD_SEED`` (a non-negative integer) makes repeated trainings differ in a controlled way: nnU-Net itself
seeds nothing. It seeds ``random``, NumPy and torch in the trainer's ``__init__`` (before the network's weights
are drawn) and offsets our own generators (subset sampler, GMD tie-breaks, modality dropout) by
:func:`derived_seed`, which leaves them at their historical seeds for seed 0. nnU-Net's augmentation worker
processes reseed themselves from the OS (``seeds=None``), so two runs with one seed are repeats, not bit copies.

:class:`PackageTrainer` is the mixin that applies all of it; it goes first among a trainer's bases.
"""
from __future__ import annotations

import os
import random
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_gmd.atomic import atomic_path, leftover_temp_files
from nnunet_gmd.availability import AVAILABILITY_FILE, batch_mask, load_availability
from nnunet_gmd.networks import unwrap

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


def _env_number(var: str, parse: type, valid, what: str, environ: dict | None = None):
    """``environ[var]`` parsed with ``parse`` and checked with ``valid``; None when unset or empty."""
    environ = os.environ if environ is None else environ
    raw = environ.get(var, "").strip()
    if not raw:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"environment variable {var}={raw!r} must be {what}")
    return value


def budget_from_env(environ: dict | None = None) -> dict[str, int]:
    """Trainer attributes to override, read from the budget environment variables that are set."""
    values = {attribute: _env_number(var, int, lambda v: v >= 1, "a positive integer", environ)
              for var, attribute in BUDGET_ENV_VARS.items()}
    return {attribute: v for attribute, v in values.items() if v is not None}


def initial_lr_from_env(environ: dict | None = None) -> float | None:
    """``NNUNET_GMD_INITIAL_LR`` as a positive float, or None when unset (for learning-rate studies)."""
    return _env_number(INITIAL_LR_ENV, float, lambda v: v > 0, "a positive number", environ)


def seed_from_env(environ: dict | None = None) -> int | None:
    """``NNUNET_GMD_SEED`` as a non-negative integer, or None when unset."""
    return _env_number(SEED_ENV, int, lambda v: v >= 0, "a non-negative integer", environ)


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


def num_threads_from_env(environ: dict | None = None) -> int | None:
    """``NNUNET_GMD_NUM_THREADS`` as a positive integer, or None when unset.

    ``nnUNetv2_train -device cpu`` sets torch's intra-op threads to every core. On a shared CPU (several jobs on
    two cores) that oversubscribes: threads spin at every op's barrier and a step runs many times slower.
    """
    return _env_number(NUM_THREADS_ENV, int, lambda v: v >= 1, "a positive integer", environ)


def apply_budget_from_env(trainer) -> None:
    """Override epochs / iterations (and the initial learning rate, CPU threads) of a trainer in ``__init__``.

    Also seeds the global generators from ``NNUNET_GMD_SEED`` (before ``initialize()`` builds the network), and
    writes ``checkpoint_latest.pth`` every epoch (nnU-Net: every 50), so ``--c`` after a crash loses at most one
    epoch.
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


# ---------------------------------------------------------------------------------------- failed steps
class NonFiniteTrainingError(RuntimeError):
    """Training cannot go on: steps in a row had a non-finite loss or gradient, or the weights are not finite."""


def nonfinite_parameters(network: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``network`` holding NaN or inf."""
    tensors = list(network.named_parameters()) + list(network.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class NonFiniteStepGuard:
    """Counts skipped steps; too many in a row is an error that names the cases of the last batch.

    A step whose loss or merged gradient is NaN/inf is skipped (no optimiser update), as the GradScaler does on
    CUDA. One such step can be a fluke; ``max_in_a_row`` of them mean bad data (NaN voxels in a case) or a
    diverged model, and silently going on would end in NaN weights and an all-background model.
    """

    def __init__(self, max_in_a_row: int = 5) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be positive, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def record(self, finite: bool, keys: Optional[Sequence[str]], detail: str) -> Optional[str]:
        """Note one step; returns a warning line for a skipped step, raises after too many in a row."""
        if finite:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self.total += 1
        cases = ", ".join(str(k) for k in keys) if keys is not None and len(keys) else "unknown cases"
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteTrainingError(
                f"{self.in_a_row} training steps in a row had a non-finite loss or gradient ({detail}; last batch: "
                f"{cases}). Look for NaN/inf voxels in these cases' images (or lower the learning rate); no "
                f"checkpoint with non-finite weights was written")
        return (f"WARNING: step skipped, non-finite loss or gradient ({detail}) on cases {cases} "
                f"({self.in_a_row} in a row, {self.total} in this run)")


# ---------------------------------------------------------------------------------------- the mixin
SMOKE_BUDGET = {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1}
EXTRA_STATE_KEY = "nnunet_gmd_state"


class PackageTrainer:
    """Mixin (first among the bases of an nnU-Net trainer) for every trainer of this package.

    * ``budget``: trainer attributes (``num_epochs``, ...) set in ``__init__``, before the ``NNUNET_GMD_*``
      environment overrides (:func:`apply_budget_from_env`); ``default_initial_lr`` likewise.
    * Checkpoints: nnU-Net's own, written to a temp file and renamed (a kill during ``torch.save`` leaves the
      previous one intact), refused when the weights are not finite, with :meth:`_extra_state` added under
      ``nnunet_gmd_state``. Leftover temp files of a killed run are removed when training starts.
    * ``NNUNET_GMD_FINAL_VALIDATION=0`` skips nnU-Net's final validation.
    * :meth:`_record_step` feeds a :class:`NonFiniteStepGuard`; when it gives up, ``run_training`` stops with
      one clear line (``SystemExit``) instead of a traceback.

    nnU-Net records ``__init__``'s named parameters to re-create a trainer from a checkpoint, so ``__init__``
    spells out nnU-Net's signature instead of ``*args, **kwargs``.
    """

    budget: dict = {}
    default_initial_lr: Optional[float] = None
    max_nonfinite_steps: int = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.default_initial_lr is not None:
            self.initial_lr = self.default_initial_lr
        for attribute, value in self.budget.items():
            setattr(self, attribute, value)
        apply_budget_from_env(self)
        self.nonfinite_guard = NonFiniteStepGuard(self.max_nonfinite_steps)
        self.training_availability = self._load_training_availability(dataset_json)

    # ------------------------------------------------------------------ incomplete training cases
    def _availability_files(self) -> list[str]:
        from nnunetv2.paths import nnUNet_raw

        raw = [os.path.join(nnUNet_raw, self.plans_manager.dataset_name, AVAILABILITY_FILE)] if nnUNet_raw else []
        return raw + [os.path.join(self.preprocessed_dataset_folder_base, AVAILABILITY_FILE)]

    def _load_training_availability(self, dataset_json: dict) -> Optional[dict[str, tuple[int, ...]]]:
        """The dataset's ``modality_availability.json`` (raw folder first, then preprocessed), or None."""
        names = [str(n) for _, n in sorted(dataset_json["channel_names"].items(), key=lambda kv: int(kv[0]))]
        for path in self._availability_files():
            if os.path.isfile(path):
                table = load_availability(path, names)
                incomplete = sum(len(v) < len(names) for v in table.values())
                self.print_to_log_file(f"modality availability from {path}: {incomplete} of {len(table)} listed "
                                       f"training cases lack sequences", also_print_to_console=True)
                return table
        return None

    def _batch_availability(self, batch: dict) -> Optional[torch.Tensor]:
        """``(B, M)`` mask of the channels each sample really has, or None when the batch is complete."""
        if not self.training_availability or "keys" not in batch:
            return None
        mask = batch_mask(list(batch["keys"]), self.training_availability, batch["data"].shape[1])
        return None if bool(mask.all()) else mask

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> Optional[dict]:
        """State of our own generators etc. for the checkpoint; None: nothing to add."""
        return None

    def _load_extra_state(self, state: dict) -> None:
        pass

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank == 0 and not self.disable_checkpointing:
            bad = nonfinite_parameters(unwrap(self.network))
            if bad:
                raise NonFiniteTrainingError(f"not writing {filename}: {len(bad)} weight tensors of the network are "
                                             f"not finite (first: {bad[0]}); the previous checkpoint is kept")
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)   # writes nothing (and says so when disabled)
        with atomic_path(filename) as tmp:
            super().save_checkpoint(str(tmp))
            extra = self._extra_state()
            if extra is not None:
                checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
                checkpoint[EXTRA_STATE_KEY] = extra
                torch.save(checkpoint, tmp)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if isinstance(checkpoint, dict) and checkpoint.get(EXTRA_STATE_KEY):
            self._load_extra_state(checkpoint[EXTRA_STATE_KEY])

    # ------------------------------------------------------------------ validation, failed steps
    def perform_actual_validation(self, save_probabilities: bool = False):
        if final_validation_enabled():
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file(f"final validation skipped ({FINAL_VALIDATION_ENV}=0)", also_print_to_console=True)

    def on_train_start(self):
        if self.local_rank == 0:
            for leftover in leftover_temp_files(self.output_folder, "*.pth"):
                leftover.unlink()   # a run killed while saving a checkpoint
        super().on_train_start()

    def _record_step(self, finite: bool, batch: dict, loss: float, grad_norm: float) -> None:
        """Count a taken or skipped step (see :class:`NonFiniteStepGuard`)."""
        warning = self.nonfinite_guard.record(finite, batch.get("keys"),
                                              f"loss {loss:.4g}, gradient norm {grad_norm:.4g}")
        if warning:
            self.print_to_log_file(warning, also_print_to_console=True)

    def run_training(self):
        try:
            super().run_training()
        except NonFiniteTrainingError as e:
            self.print_to_log_file(f"ERROR: {e}", also_print_to_console=False)
            for loader in (self.dataloader_train, self.dataloader_val):
                finish = getattr(loader, "_finish", None)
                if finish is not None:
                    finish()
            raise SystemExit(f"nnUNetv2_train: error: {e}") from None
