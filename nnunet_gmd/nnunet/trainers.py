"""nnU-Net v2 trainers for one model that segments from any subset of the input sequences.

* ``nnUNetTrainerGMD``: Dynamic Sharing network, exact GMD over all 2^M - 1 modality subsets per step.
* ``nnUNetTrainerGMD_k5``: GMD over 5 subsets sampled per step, as in the paper.
* ``nnUNetTrainerDS``: Dynamic Sharing network on the mean of the subset losses, no decoupling (the ablation).
* ``nnUNetTrainerDS_FF``, ``nnUNetTrainerGMD_FF``, ``nnUNetTrainerGMD_k5_FF``: the same three on the feature-fusion
  DS network (a shared encoder per sequence; at every skip the mean and variance of the available branches'
  features, HeMIS' fusion, since run 10 of issue 10; one decoder).
* ``nnUNetTrainerDS_LW``, ``nnUNetTrainerGMD_LW``: the logit-fusion DS network with learned, availability-masked
  fusion weights per modality and output channel instead of the plain mean.
* ``nnUNetTrainerDS_SGD``, ``nnUNetTrainerDS_W05``, ``nnUNetTrainerDS_FF_MV``: optimiser, width and fusion studies
  (nnU-Net's SGD at 1e-2 with a linear warm-up; half-width branches, the default before run 8 of issue 10;
  HeMIS' mean-and-variance feature fusion). ``nnUNetTrainerDS_W1`` is the default width under its study name;
  ``nnUNetTrainerDS_FF_MV_W1`` and ``nnUNetTrainerDS_FF_W1`` are the two feature fusions at full width, and
  ``nnUNetTrainerGMD_k5_FF_MV_W1`` is GMD (k=5) on the first, the best DS network so far.
  ``nnUNetTrainerDS_FF_ATT`` weights the feature fusion by availability-masked attention (``"attention_var"``).
* ``nnUNetTrainerGMD_amortized`` (``_sub``, ``_m1``, ``_W1``): cheaper GMD (:mod:`nnunet_gmd.gmd_fast`), at the end
  of this file.
* ``<Trainer>_smoke``: two tiny epochs at half width, for tests and first contact (``_W1_smoke`` keeps full width).

Each training records its branch width and fusion in the plans.json it saves
(:data:`~nnunet_gmd.nnunet.network.WIDTH_KEY`, :data:`~nnunet_gmd.nnunet.network.FUSION_KEY`); the predictor
rebuilds from those, and a plans.json without them is a model trained at ``legacy_width_factor`` and
``legacy_fusion``.

Every per-subset loss is nnU-Net's own loss (DC+CE or the region loss, deep-supervision weighted) on the mean of
that subset's branch logits. Validation and the final validation use all modalities, as in nnU-Net.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from nnunet_gmd.availability import samples_supplying, select_samples, supported_subsets
from nnunet_gmd.distillation import soft_target_loss
from nnunet_gmd.gmd import GMDStats, ds_gmd_backward
from nnunet_gmd.gmd_fast import DEFAULT_INTERVAL, AmortizedGMD, ds_mean_backward, unimodal_and_full
from nnunet_gmd.networks import DSNetworkBase, only_available, unwrap
from nnunet_gmd.nnunet.trainer_base import SMOKE_BUDGET, PackageTrainer, derived_seed
from nnunet_gmd.nnunet.optimizers import SGDWarmupMixin
from nnunet_gmd.errors import UserError
from nnunet_gmd.nnunet.network import (FUSION_KEY, LEARNED_LOGIT_FUSION, LOGIT_FUSION, WIDTH_KEY, ds_unet_from_plans,
                                       recorded_fusion, recorded_width, saved_configuration)
from nnunet_gmd.nnunet.progress import plot_gmd_progress
from nnunet_gmd.subsets import SubsetSampler

CONFLICTS_KEY = "gmd_conflicting_pairs"
GRAD_NORMS_KEY = "gmd_modality_grad_norms"


class nnUNetTrainerDS(PackageTrainer, nnUNetTrainerAdam):
    """Dynamic Sharing network trained on the mean of the per-subset losses (no gradient decoupling).

    The optimiser is nnU-Net's own AdamW variant (``nnUNetTrainerAdam``) at 1e-3 with the poly schedule: with the
    stock SGD (lr 1e-2, momentum 0.99) the late-fusion DS network stayed at the all-background solution on a
    fixed phantom batch for 150 steps (Dice 0/0/0), while Adam at 1e-3 reached 0.95/0.55/0.30 (WT/TC/ET).
    ``NNUNET_GMD_FINAL_VALIDATION=0`` skips nnU-Net's final validation (tests, benchmarks that evaluate anyway).
    A step with a non-finite loss or merged gradient is skipped and counted; ``max_nonfinite_steps`` in a row stop
    training with an error naming the batch's cases (:class:`~nnunet_gmd.nnunet.trainer_base.PackageTrainer`).
    """

    width_factor: float = 1.0  # full-width branches: +0.10 Dice over half width on BraTS, 3 seeds (issue 10, run 8)
    legacy_width_factor: float = 0.5  # the width of models whose plans.json records none (trained before it did)
    fusion: str = LOGIT_FUSION  # "logits", "learned_logits" (DSUNet) or a feature fusion ("mean", "mean_var")
    legacy_fusion: Optional[str] = None  # the fusion of models whose plans.json records none; None: ``fusion``
    subsets_per_step: Optional[int] = None  # None: all 2^M - 1 subsets every step
    include_full_set: bool = False  # always put the full set in a sampled draw
    default_initial_lr = 1e-3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._record_architecture(configuration)
        self.subset_sampler: Optional[SubsetSampler] = None
        self.modality_names = [str(n) for _, n in sorted(dataset_json["channel_names"].items(), key=lambda kv: int(kv[0]))]

    # ------------------------------------------------------------------ network
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The DS network from the plans alone (the stock predictor calls this with deep supervision off)."""
        if configuration_manager.previous_stage_name is not None:
            raise ValueError("cascade configurations feed segmentations as extra input channels, which are not "
                             "modalities; train the DS/GMD trainers on a full-resolution or 2d configuration")
        planned = configuration_manager.configuration
        width = recorded_width(planned, cls.legacy_width_factor)
        fusion = recorded_fusion(planned, cls.legacy_fusion or cls.fusion)
        return ds_unet_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs, num_input_channels,
                                  num_output_channels, enable_deep_supervision, width, fusion)

    def _record_architecture(self, configuration: str) -> None:
        """Write this training's branch width and fusion into its plans, which nnU-Net saves beside the weights, so
        the predictor rebuilds the same network even after a class's defaults change.

        Each comes from the plans if they name it, else from a plans.json an earlier training left in this output
        folder (folds and ``--c`` must match the weights already there; a plans.json that records none is a model
        trained at the legacy value), else from the class.
        """
        planned = self.configuration_manager.configuration
        saved = os.path.join(self.output_folder_base, "plans.json") if self.output_folder_base else None
        saved_config = saved_configuration(saved, configuration) if saved and os.path.isfile(saved) else None
        settings = ((WIDTH_KEY, recorded_width, self.width_factor, self.legacy_width_factor),
                    (FUSION_KEY, recorded_fusion, self.fusion, self.legacy_fusion or self.fusion))
        described = []
        for key, read, default, legacy in settings:
            if key in planned:
                value, source = read(planned, default), "the plans"
            elif saved_config is not None:
                try:
                    value, source = read(saved_config, legacy), saved
                except UserError as e:
                    raise UserError(f"{saved}: {e}") from None
            else:
                value, source = default, type(self).__name__
            self.plans_manager.plans["configurations"][configuration][key] = value
            planned[key] = value
            shown = f"{value:g}" if isinstance(value, float) else value
            described.append(f"{shown} (from {source})")
        self.print_to_log_file(f"branch width factor {described[0]}, fusion {described[1]}")

    def initialize(self):
        if not self.was_initialized:
            super().initialize()
            self.subset_sampler = SubsetSampler(self.num_input_channels, self.subsets_per_step, self.include_full_set,
                                                seed=derived_seed(1234 + self.fold))

    def _do_i_compile(self) -> bool:
        # GMD takes per-subset gradients with torch.autograd.grad through the branch graphs, outside the
        # compiled forward, so compiling would only cost compile time.
        if self.device.type == "cuda" and os.environ.get("nnUNet_compile", "true").lower() in ("true", "1", "t"):
            self.print_to_log_file("INFO: torch.compile disabled for this trainer: the per-subset gradients are "
                                   "taken with torch.autograd.grad through the branch graphs, outside forward()")
        return False

    def _ds_network(self) -> DSNetworkBase:
        return unwrap(self.network)

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict:
        return {"subset_sampler": self.subset_sampler.state_dict() if self.subset_sampler else None}

    def _load_extra_state(self, state: dict) -> None:
        if state.get("subset_sampler") and self.subset_sampler is not None:
            self.subset_sampler.load_state_dict(state["subset_sampler"])

    # ------------------------------------------------------------------ training step
    def _batch_to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        return data, target

    # ------------------------------------------------------------------ incomplete cases
    def _step_subsets(self, mask: Optional[torch.Tensor]) -> list:
        """This step's subsets; with incomplete cases only those some sample of the batch can supply."""
        if mask is None:
            return self.subset_sampler.sample()
        return self.subset_sampler.sample(allowed=supported_subsets(self.subset_sampler.subsets, mask))

    def _subset_loss(self, target, mask: Optional[torch.Tensor], scaler=None):
        """nnU-Net's loss of one subset's output; with incomplete cases over the samples that have the subset."""
        def subset_loss(output, subset):
            if mask is None:
                loss = self.loss(output, target)
            else:
                rows = samples_supplying(subset, mask)
                loss = self.loss(select_samples(output, rows), select_samples(target, rows))
            return scaler.scale(loss) if scaler is not None else loss
        return subset_loss

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step; an incomplete case runs on the sequences it really has."""
        mask = self._batch_availability(batch)
        if mask is None:
            return super().validation_step(batch)
        with only_available(self._ds_network(), mask):
            return super().validation_step(batch)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _optimizer_step(self, loss: float, batch: dict) -> bool:
        """Clip at 12 after the merge and step, through the GradScaler on CUDA; a non-finite step is skipped.

        ``loss`` is the step's unscaled loss. Returns whether the optimiser stepped. On CUDA the GradScaler skips
        steps with inf/NaN gradients itself (routine fp16 overflow), so only a non-finite loss counts there.
        """
        params = list(self.network.parameters())
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(params, 12))
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            taken = math.isfinite(loss)
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(params, 12))
            taken = math.isfinite(loss) and math.isfinite(norm)
            if taken:
                self.optimizer.step()
        self._record_step(taken, batch, loss, norm)
        return taken

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """nnU-Net's epoch log, over the steps that were taken (a skipped step's loss is NaN)."""
        taken = [o for o in train_outputs if not o.get("skipped")]
        skipped = len(train_outputs) - len(taken)
        if skipped:
            self.print_to_log_file(f"{skipped} of {len(train_outputs)} steps of this epoch skipped (non-finite "
                                   f"loss or gradient)", also_print_to_console=True)
        super().on_train_epoch_end([{"loss": np.asarray(o["loss"])} for o in taken] or [{"loss": np.nan}])

    def train_step(self, batch: dict) -> dict:
        data, target = self._batch_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.grad_scaler
        mask = self._batch_availability(batch)
        with self._autocast():   # the forward bypasses DDP's wrapper; the core all-reduces the gradient once
            losses = ds_mean_backward(self._ds_network(), data, self._step_subsets(mask),
                                      self._subset_loss(target, mask, scaler))
        value = float(losses.mean()) / (float(scaler.get_scale()) if scaler is not None else 1.0)
        taken = self._optimizer_step(value, batch)
        return {"loss": np.asarray(value), "skipped": not taken}


class nnUNetTrainerGMD(nnUNetTrainerDS):
    """Dynamic Sharing network with Gradient-Guided Modality Decoupling over all modality subsets."""

    gmd_reduction: str = "mean"  # official code; "sum" is the paper's Eq. 9

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.gmd_generator = torch.Generator().manual_seed(derived_seed(4321 + fold))
        registry = self.logger.local_logger.my_fantastic_logging
        registry.setdefault(CONFLICTS_KEY, [])
        registry.setdefault(GRAD_NORMS_KEY, [])

    def train_step(self, batch: dict) -> dict:
        data, target = self._batch_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.grad_scaler
        mask = self._batch_availability(batch)
        with self._autocast():
            stats = ds_gmd_backward(self._ds_network(), data, self._step_subsets(mask),
                                    self._subset_loss(target, mask, scaler), reduction=self.gmd_reduction,
                                    generator=self.gmd_generator)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        loss = float(stats.losses.mean()) / scale
        taken = self._optimizer_step(loss, batch)
        return {"loss": loss, "conflicts": stats.num_conflicts, "skipped": not taken,
                "modality_grad_norms": self._modality_grad_norms(stats) / scale}

    def _modality_grad_norms(self, stats: GMDStats) -> np.ndarray:
        """Norm of each unimodal subset's gradient (NaN when that subset was not drawn this step)."""
        norms = np.full(self.num_input_channels, np.nan)
        for subset, norm in zip(stats.subsets, stats.grad_norms.tolist()):
            if len(subset) == 1:
                norms[subset[0]] = norm
        return norms

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        train_outputs = [o for o in train_outputs if not o.get("skipped")] or train_outputs
        conflicts = np.array([o["conflicts"] for o in train_outputs], dtype=float)
        norms = np.stack([o["modality_grad_norms"] for o in train_outputs])
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (conflicts, norms))
            conflicts = np.concatenate([g[0] for g in gathered])
            norms = np.concatenate([g[1] for g in gathered])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a modality whose unimodal subset was never drawn
            mean_norms = [float(v) for v in np.nanmean(norms, axis=0)] if len(norms) else []
        self.logger.log(CONFLICTS_KEY, float(conflicts.mean()), self.current_epoch)
        self.logger.log(GRAD_NORMS_KEY, mean_norms, self.current_epoch)
        self.print_to_log_file(f"GMD: {conflicts.mean():.2f} conflicting subset pairs per step; unimodal gradient "
                               "norms " + ", ".join(f"{n}={v:.3g}" for n, v in zip(self.modality_names, mean_norms)))

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "gmd_generator": self.gmd_generator.get_state()}

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        if state.get("gmd_generator") is not None:
            self.gmd_generator.set_state(state["gmd_generator"])

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0:
            plot_gmd_progress(self.logger.get_value(CONFLICTS_KEY, step=None),
                              self.logger.get_value(GRAD_NORMS_KEY, step=None), self.modality_names,
                              os.path.join(self.output_folder, "gmd_progress.png"))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        registry = self.logger.local_logger.my_fantastic_logging
        for key, empty in ((CONFLICTS_KEY, np.nan), (GRAD_NORMS_KEY, [])):  # checkpoints from other trainers
            registry.setdefault(key, [empty] * self.current_epoch)


class nnUNetTrainerGMD_k5(nnUNetTrainerGMD):
    """GMD over 5 subsets drawn per step, as in the paper."""

    subsets_per_step = 5


# ---------------------------------------------------------------------------- feature fusion
class nnUNetTrainerDS_FF(nnUNetTrainerDS):
    """The DS ablation (mean of the subset losses) on the feature-fusion DS network, over 5 subsets per step.

    A feature-fusion step decodes once per subset, so all 15 subsets cost about 15 decoder passes; 5 per step
    (the paper's k, the full set always among them) keep the step near a logit-fusion DS step. Its GMD
    counterpart is :class:`nnUNetTrainerGMD_k5_FF`.
    """

    # Full width (the DS default): +0.02 to +0.08 over half width on BraTS (issue 10, run 10). HeMIS' mean and
    # variance: +0.021 over the plain mean with a sequence missing at full width (run 10, 2 seeds; 6/6 cases, an
    # interval over cases of [+0.009, +0.035], over seeds and cases [-0.012, +0.056]).
    # Folders that record neither rebuild at legacy_width_factor 0.5 and the legacy plain mean.
    fusion = "mean_var"
    legacy_fusion = "mean"
    subsets_per_step = 5
    include_full_set = True


class nnUNetTrainerGMD_FF(nnUNetTrainerGMD):
    """Exact GMD over all subsets on the feature-fusion DS network (the same network as ``nnUNetTrainerDS_FF``)."""

    fusion = "mean_var"
    legacy_fusion = "mean"


class nnUNetTrainerGMD_k5_FF(nnUNetTrainerGMD_k5):
    """GMD over 5 sampled subsets (the full set always among them) on the feature-fusion DS network."""

    fusion = "mean_var"
    legacy_fusion = "mean"
    include_full_set = True


# ---------------------------------------------------------------------------- learned logit fusion
class nnUNetTrainerDS_LW(nnUNetTrainerDS):
    """The DS ablation on the logit-fusion network with learned fusion weights (per modality and output channel,
    a softmax over the available modalities; they start at the plain mean)."""

    fusion = LEARNED_LOGIT_FUSION


class nnUNetTrainerGMD_LW(nnUNetTrainerGMD):
    """Exact GMD over all subsets on the logit-fusion network with learned fusion weights."""

    fusion = LEARNED_LOGIT_FUSION


# ---------------------------------------------------------------------------- optimiser and fusion studies
class nnUNetTrainerDS_SGD(SGDWarmupMixin, nnUNetTrainerDS):
    """The DS ablation under stock nnU-Net's optimiser: SGD at 1e-2 (momentum 0.99), after a linear warm-up over
    the first tenth of the epochs (without it, SGD left DS at the all-background solution on phantoms)."""

    default_initial_lr = 1e-2


class nnUNetTrainerDS_W1(nnUNetTrainerDS):
    """The DS ablation with full-width branches, the default width after issue 10's run 8. Kept by name because
    it was full width before widths were recorded in the plans (``legacy_width_factor``), so its folders load."""

    width_factor = 1.0
    legacy_width_factor = 1.0


class nnUNetTrainerDS_W05(nnUNetTrainerDS):
    """The DS ablation with half-width branches, the default before run 8 of issue 10: four half-width branches
    cost about one stock network in arithmetic (full width about four; on the 2-core CPU full width trained
    1.6x as long), at about 0.10 less mean Dice on BraTS over three seeds."""

    width_factor = 0.5


class nnUNetTrainerDS_FF_MV(nnUNetTrainerDS_FF):
    """DS-FF with HeMIS' fusion: the mean and the variance of the available branches' features at every skip
    (run 7's study name; ``nnUNetTrainerDS_FF`` is the same network since run 10)."""

    fusion = "mean_var"
    legacy_fusion = "mean_var"


class nnUNetTrainerDS_FF_W1(nnUNetTrainerDS_FF):
    """DS-FF (plain mean fusion) with full-width branches, the name of run 10's study: beside ``_FF_MV_W1`` it
    measures what the variance adds once the branches are full width (0.02 with a sequence missing, 2 seeds).
    This name pins the width and the plain mean (``nnUNetTrainerDS_FF`` fuses mean and variance since run 10)."""

    fusion = "mean"
    legacy_fusion = "mean"
    width_factor = 1.0


class nnUNetTrainerDS_FF_MV_W1(nnUNetTrainerDS_FF_MV):
    """DS-FF mean + variance with full-width branches: the two changes that each lifted DS on BraTS (run 7:
    mean + variance fusion; runs 7-8: width 1.0), measured together in run 10. ``nnUNetTrainerDS_FF_MV`` is the
    same network since the FF default width became 1.0; this name pins the width, as ``_DS_W1`` does."""

    width_factor = 1.0


class nnUNetTrainerDS_FF_ATT(nnUNetTrainerDS_FF):
    """DS-FF with availability-masked attention fusion (``"attention_var"``): the mean and variance at every skip
    weighted per voxel and channel by a softmax, over the available branches, of a shared 1x1 convolution's
    scores. The study of the full-set gap (TC and ET trail stock): a plain mean gives T1ce a quarter of the vote
    with all four present. The scores start at 0, so it starts as ``nnUNetTrainerDS_FF``.

    A study, not a default: on a validation fold of the BraTS training cases (issue 10, run 13) it gained on the
    full set (+0.029, ET +0.055) and lost with a sequence missing (-0.019; one sequence 0.312 against 0.349), at
    1.23x the training time."""

    fusion = "attention_var"
    legacy_fusion = "attention_var"


class SelfDistillationMixin:
    """First among the bases of a DS trainer: each subset's loss adds ``distill_weight`` times a soft-target loss
    towards the full set's own detached prediction (:mod:`nnunet_gmd.distillation`), at full resolution.

    Why: target 2 of issue 10 needs gains with one and two sequences, which the ground truth alone teaches from
    labels those subsets often cannot see. The full set is decoded first in each step (it is in every draw of
    the FF trainers), so the teacher costs nothing extra; the teacher is detached, so the full set's own gradient
    is unchanged. A batch with incomplete cases trains without the term (the teacher would cover other samples).
    The logged training loss includes the term. The weight 0.5 was fixed before any run, not tuned.
    """

    distill_weight: float = 0.5

    def _step_subsets(self, mask: Optional[torch.Tensor]) -> list:
        full = self.subset_sampler.subsets[-1]
        subsets = super()._step_subsets(mask)
        return [s for s in subsets if s == full] + [s for s in subsets if s != full]

    def _subset_loss(self, target, mask: Optional[torch.Tensor], scaler=None):
        ground_truth = super()._subset_loss(target, mask, None)
        full = self.subset_sampler.subsets[-1]
        regions = self.label_manager.has_regions
        teacher: dict[str, torch.Tensor] = {}

        def subset_loss(output, subset):
            loss = ground_truth(output, subset)
            logits = output[0] if isinstance(output, (list, tuple)) else output
            if subset == full:
                teacher["logits"] = logits   # soft_target_loss detaches it
            elif mask is None and "logits" in teacher:
                loss = loss + self.distill_weight * soft_target_loss(logits, teacher["logits"], regions=regions)
            return scaler.scale(loss) if scaler is not None else loss
        return subset_loss


class nnUNetTrainerDS_FF_KD(SelfDistillationMixin, nnUNetTrainerDS_FF):
    """DS-FF with self-distillation from the full set to the other four subsets of each step.

    A study, not a default: on the validation fold (issue 10, run 14) it was level with DS-FF with a sequence
    missing (+0.002; one sequence +0.014) and lost ET on the full set (-0.013 overall), at the same step cost."""


class nnUNetTrainerDS_FF_ATT_KD(SelfDistillationMixin, nnUNetTrainerDS_FF_ATT):
    """DS-FF attention fusion with self-distillation: attention lifted the full set and lost with one sequence
    (run 13); the distillation term was meant to hold the small subsets up.

    A study, not a default: on the validation fold (run 14) it trailed DS-FF both ways (-0.022 missing, -0.029
    full) and lost attention's full-set gain."""


class nnUNetTrainerGMD_k5_FF_MV_W1(nnUNetTrainerGMD_k5_FF):
    """GMD over 5 sampled subsets (the full set always among them) on ``nnUNetTrainerDS_FF_MV_W1``'s network:
    the same subsets per step, losses and optimiser, so the two differ only in how the subset gradients merge.
    ``nnUNetTrainerGMD_k5_FF`` is the same network since run 10; this name pins it."""

    fusion = "mean_var"
    legacy_fusion = "mean_var"
    width_factor = 1.0


# ---------------------------------------------------------------------------- smoke variants
class Smoke:
    """First among the bases of a ``_smoke`` variant: two tiny epochs at half width.

    A smoke run checks that the pipeline runs, not what it learns, and full-width branches cost about 2.5x the
    time per step; the width is still recorded in the plans, so predict and export rebuild it exactly.
    """

    budget = SMOKE_BUDGET
    width_factor = 0.5


class nnUNetTrainerDS_SGD_smoke(Smoke, nnUNetTrainerDS_SGD):
    pass


class nnUNetTrainerDS_W1_smoke(Smoke, nnUNetTrainerDS_W1):
    width_factor = 1.0  # the width is what this trainer is about


class nnUNetTrainerDS_W05_smoke(Smoke, nnUNetTrainerDS_W05):
    pass


class nnUNetTrainerDS_FF_MV_smoke(Smoke, nnUNetTrainerDS_FF_MV):
    pass


class nnUNetTrainerDS_FF_W1_smoke(Smoke, nnUNetTrainerDS_FF_W1):
    width_factor = 1.0  # the width is what this trainer is about


class nnUNetTrainerDS_FF_MV_W1_smoke(Smoke, nnUNetTrainerDS_FF_MV_W1):
    width_factor = 1.0  # the width is what this trainer is about


class nnUNetTrainerGMD_k5_FF_MV_W1_smoke(Smoke, nnUNetTrainerGMD_k5_FF_MV_W1):
    width_factor = 1.0  # the name pins the width


class nnUNetTrainerDS_FF_ATT_smoke(Smoke, nnUNetTrainerDS_FF_ATT):
    pass


class nnUNetTrainerDS_FF_KD_smoke(Smoke, nnUNetTrainerDS_FF_KD):
    pass


class nnUNetTrainerDS_FF_ATT_KD_smoke(Smoke, nnUNetTrainerDS_FF_ATT_KD):
    pass


class nnUNetTrainerDS_LW_smoke(Smoke, nnUNetTrainerDS_LW):
    pass


class nnUNetTrainerGMD_LW_smoke(Smoke, nnUNetTrainerGMD_LW):
    pass


class nnUNetTrainerDS_smoke(Smoke, nnUNetTrainerDS):
    pass


class nnUNetTrainerGMD_smoke(Smoke, nnUNetTrainerGMD):
    pass


class nnUNetTrainerGMD_k5_smoke(Smoke, nnUNetTrainerGMD_k5):
    pass


class nnUNetTrainerDS_FF_smoke(Smoke, nnUNetTrainerDS_FF):
    pass


class nnUNetTrainerGMD_FF_smoke(Smoke, nnUNetTrainerGMD_FF):
    pass


class nnUNetTrainerGMD_k5_FF_smoke(Smoke, nnUNetTrainerGMD_k5_FF):
    pass


__all__ = ["nnUNetTrainerDS", "nnUNetTrainerGMD", "nnUNetTrainerGMD_k5", "nnUNetTrainerDS_smoke",
           "nnUNetTrainerGMD_smoke", "nnUNetTrainerGMD_k5_smoke", "nnUNetTrainerDS_FF", "nnUNetTrainerGMD_FF",
           "nnUNetTrainerGMD_k5_FF", "nnUNetTrainerDS_FF_smoke", "nnUNetTrainerGMD_FF_smoke",
           "nnUNetTrainerGMD_k5_FF_smoke", "nnUNetTrainerDS_LW", "nnUNetTrainerGMD_LW", "nnUNetTrainerDS_LW_smoke",
           "nnUNetTrainerGMD_LW_smoke", "nnUNetTrainerDS_SGD", "nnUNetTrainerDS_FF_MV", "nnUNetTrainerDS_SGD_smoke",
           "nnUNetTrainerDS_FF_MV_smoke", "nnUNetTrainerDS_W1", "nnUNetTrainerDS_W1_smoke",
           "nnUNetTrainerDS_W05", "nnUNetTrainerDS_W05_smoke", "nnUNetTrainerDS_FF_MV_W1",
           "nnUNetTrainerDS_FF_MV_W1_smoke", "nnUNetTrainerGMD_k5_FF_MV_W1",
           "nnUNetTrainerGMD_k5_FF_MV_W1_smoke", "nnUNetTrainerDS_FF_W1", "nnUNetTrainerDS_FF_W1_smoke",
           "nnUNetTrainerDS_FF_ATT", "nnUNetTrainerDS_FF_ATT_smoke", "nnUNetTrainerDS_FF_KD",
           "nnUNetTrainerDS_FF_KD_smoke", "nnUNetTrainerDS_FF_ATT_KD", "nnUNetTrainerDS_FF_ATT_KD_smoke"]


# ---------------------------------------------------------------------------- cheap GMD (nnunet_gmd.gmd_fast)
class nnUNetTrainerGMD_amortized(nnUNetTrainerGMD):
    """GMD whose PCGrad weights are computed exactly every ``gmd_interval`` steps and reused in between.

    A reuse step is one weighted backward through all branches (about a DS step); a refresh step is an exact GMD
    step, and only those steps log conflicts and unimodal gradient norms. ``gram_batch`` computes the refresh's
    Gram matrix on the first samples of the batch only; ``objectives = "unimodal+full"`` decouples the M + 1
    objectives (unimodal subsets and the full set) instead of all 2^M - 1. The cached weights and step counter are
    in the checkpoint, so ``--c`` resumes the schedule.
    """

    gmd_interval: int = DEFAULT_INTERVAL
    gram_batch: Optional[int] = None  # None: the refresh's Gram on the whole batch
    objectives: str = "all"  # or "unimodal+full"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.objectives not in ("all", "unimodal+full"):
            raise ValueError(f"objectives must be 'all' or 'unimodal+full', got {self.objectives!r}")
        self.amortized_gmd = AmortizedGMD(self.gmd_interval, self.gmd_reduction)

    def _objectives(self, mask: Optional[torch.Tensor] = None) -> list:
        if self.objectives == "unimodal+full":
            objectives = unimodal_and_full(self.num_input_channels)
            return objectives if mask is None else supported_subsets(objectives, mask)
        return self._step_subsets(mask)

    def train_step(self, batch: dict) -> dict:
        data, target = self._batch_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.grad_scaler
        mask = self._batch_availability(batch)
        subsets = self._objectives(mask)
        gram_input = None
        if self.gram_batch is not None and self.amortized_gmd.needs_refresh(subsets):
            rows = slice(0, self.gram_batch)
            sub_mask = None if mask is None else mask[rows]
            if sub_mask is None or all(bool(sub_mask[:, list(s)].all(1).any()) for s in subsets):
                gram_input = (data[rows], self._subset_loss([t[rows] for t in target] if isinstance(target, list)
                                                            else target[rows], sub_mask, scaler))
        with self._autocast():
            step = self.amortized_gmd.backward(self._ds_network(), data, subsets,
                                               self._subset_loss(target, mask, scaler),
                                               generator=self.gmd_generator, gram_input=gram_input)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        loss = float(step.losses.mean()) / scale
        taken = self._optimizer_step(loss, batch)
        out = {"loss": loss, "conflicts": np.nan, "skipped": not taken,
               "modality_grad_norms": np.full(self.num_input_channels, np.nan)}
        if step.stats is not None:
            out.update(conflicts=step.stats.num_conflicts,
                       modality_grad_norms=self._modality_grad_norms(step.stats) / scale)
        return out

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """As GMD's, averaging the statistics over the refresh steps only (NaN for an epoch without one)."""
        nnUNetTrainerDS.on_train_epoch_end(self, train_outputs)
        train_outputs = [o for o in train_outputs if not o.get("skipped")] or train_outputs
        conflicts = np.array([o["conflicts"] for o in train_outputs], dtype=float)
        norms = np.stack([o["modality_grad_norms"] for o in train_outputs])
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (conflicts, norms))
            conflicts = np.concatenate([g[0] for g in gathered])
            norms = np.concatenate([g[1] for g in gathered])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an epoch without a refresh step: all NaN
            mean_conflicts = float(np.nanmean(conflicts)) if len(conflicts) else float("nan")
            mean_norms = [float(v) for v in np.nanmean(norms, axis=0)] if len(norms) else []
        self.logger.log(CONFLICTS_KEY, mean_conflicts, self.current_epoch)
        self.logger.log(GRAD_NORMS_KEY, mean_norms, self.current_epoch)
        refreshes = int(np.isfinite(conflicts).sum())
        self.print_to_log_file(f"GMD (amortised, {refreshes} exact steps): {mean_conflicts:.2f} conflicting subset "
                               "pairs per exact step; unimodal gradient norms "
                               + ", ".join(f"{n}={v:.3g}" for n, v in zip(self.modality_names, mean_norms)))

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "amortized_gmd": self.amortized_gmd.state_dict()}

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        if state.get("amortized_gmd") is not None:
            self.amortized_gmd.load_state_dict(state["amortized_gmd"])


class nnUNetTrainerGMD_amortized_sub(nnUNetTrainerGMD_amortized):
    """Amortised GMD whose refresh computes the Gram matrix on one sample of the batch, every 8 steps."""

    gmd_interval = 8
    gram_batch = 1


class nnUNetTrainerGMD_m1(nnUNetTrainerGMD_amortized):
    """Exact GMD every step over the M + 1 objectives: the unimodal subsets and the full set (2M branch VJPs)."""

    gmd_interval = 1
    objectives = "unimodal+full"


class nnUNetTrainerGMD_amortized_W1(nnUNetTrainerGMD_amortized):
    """Amortised GMD with full-width branches (now the default width): the name its first folders were trained
    under, before widths were recorded in the plans."""

    width_factor = 1.0
    legacy_width_factor = 1.0


class nnUNetTrainerGMD_amortized_smoke(Smoke, nnUNetTrainerGMD_amortized):
    gmd_interval = 4  # 6 smoke steps: refreshes at steps 0 and 4, reuse steps in between


class nnUNetTrainerGMD_amortized_sub_smoke(Smoke, nnUNetTrainerGMD_amortized_sub):
    gmd_interval = 4


class nnUNetTrainerGMD_m1_smoke(Smoke, nnUNetTrainerGMD_m1):
    pass


class nnUNetTrainerGMD_amortized_W1_smoke(Smoke, nnUNetTrainerGMD_amortized_W1):
    width_factor = 1.0
    gmd_interval = 4


__all__ += ["nnUNetTrainerGMD_amortized", "nnUNetTrainerGMD_amortized_sub", "nnUNetTrainerGMD_m1",
            "nnUNetTrainerGMD_amortized_smoke", "nnUNetTrainerGMD_amortized_sub_smoke", "nnUNetTrainerGMD_m1_smoke",
            "nnUNetTrainerGMD_amortized_W1", "nnUNetTrainerGMD_amortized_W1_smoke"]
