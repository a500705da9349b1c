"""GMD as the ``iteration_update`` of MONAI's ``SupervisedTrainer``.

The trainer keeps doing what it is good at (data loading, handlers, checkpointing, metrics, resume); only the
per-iteration step changes: draw modality subsets, let :func:`nnunet_gmd.gmd.ds_gmd_backward` write the
decoupled gradient into ``.grad``, clip, step. The step's statistics (number of conflicting subset pairs,
subset losses) go into ``engine.state.output`` so ordinary MONAI/ignite handlers can log them.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from nnunet_gmd.availability import samples_supplying, select_samples, supported_subsets
from nnunet_gmd.gmd import ds_gmd_backward
from nnunet_gmd.gmd_fast import ds_mean_backward
from nnunet_gmd.networks import unwrap
from nnunet_gmd.subsets import SubsetSampler

METHODS = ("gmd", "mean")

#: Keys this update adds to ``engine.state.output`` next to MONAI's image/label/loss.
CONFLICTS_KEY = "gmd_conflicting_pairs"
CONFLICT_FRACTION_KEY = "gmd_conflict_fraction"
NUM_SUBSETS_KEY = "gmd_num_subsets"


class GMDIterationUpdate:
    """One training step over modality subsets of a DS network; pass as ``SupervisedTrainer(iteration_update=)``.

    Args:
        num_modalities: M, the network's modality branches.
        subsets_per_step: ``None`` trains all ``2**M - 1`` subsets per step, an int k draws k of them.
        include_full: with k, always include the full set (the all-modality prediction trains every step).
        method: ``"gmd"`` (decoupled, projected gradients) or ``"mean"`` (plain mean of the subset losses, the
            paper's no-decoupling DS baseline).
        reduction: GMD's merge, ``"mean"`` (official code) or ``"sum"`` (paper Eq. 9).
        max_grad_norm: clip the merged gradient to this norm (nnU-Net uses 12); ``None`` disables clipping.
        seed: seeds the subset draw and the projection order; the state is saved with checkpoints.
        mask_key: the batch's ``(B, M)`` availability mask (:class:`~nnunet_gmd.monai.StackModalitiesd`). A
            training case with ``null`` sequences supervises only the subsets it has: each subset's loss is
            taken over the samples that have it, and subsets no sample has are not drawn.
    """

    def __init__(self, num_modalities: int = 4, subsets_per_step: Optional[int] = None, include_full: bool = True,
                 method: str = "gmd", reduction: str = "mean", max_grad_norm: Optional[float] = 12.0,
                 seed: Optional[int] = 0, mask_key: str = "available") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.sampler = SubsetSampler(num_modalities, k=subsets_per_step, include_full=include_full, seed=seed)
        self.method = method
        self.reduction = reduction
        self.max_grad_norm = max_grad_norm
        self.mask_key = mask_key
        self.generator = torch.Generator()
        self.generator.manual_seed(torch.initial_seed() % 2**63 if seed is None else seed + 1)

    def __call__(self, engine: Any, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("GMDIterationUpdate needs batch data for the iteration")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        # extra network inputs, as SupervisedTrainer unpacks them (PrepareBatchExtraInput): the availability mask
        # is the one a DS network takes; it names which branches each sample really has
        args, kwargs = (tuple(batch[2]), dict(batch[3])) if len(batch) == 4 else ((), {})
        extra_mask = kwargs.pop(self.mask_key, None)
        if args or kwargs:
            raise ValueError(f"GMDIterationUpdate: extra network inputs {list(kwargs) or len(args)} are not "
                             f"supported; the DS branch graphs take the image and the '{self.mask_key}' mask only")
        network = unwrap(engine.network)  # GMD needs the DS network itself, not DDP or a compiled wrapper
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        mask = extra_mask if extra_mask is not None else (
            batchdata.get(self.mask_key) if isinstance(batchdata, dict) else None)
        mask = None if mask is None or bool(torch.as_tensor(mask).all()) else torch.as_tensor(mask).bool().cpu()
        subsets = self.sampler.sample(None if mask is None else supported_subsets(self.sampler.subsets, mask))

        def subset_loss(output: Any, subset: tuple[int, ...]) -> torch.Tensor:
            if mask is None:
                return engine.loss_function(output, targets).mean()
            rows = samples_supplying(subset, mask)
            return engine.loss_function(select_samples(output, rows), select_samples(targets, rows)).mean()

        if self.method == "gmd":
            stats = ds_gmd_backward(network, inputs, subsets, subset_loss, reduction=self.reduction,
                                    generator=self.generator)
            losses, conflicts = stats.losses, int(stats.num_conflicts)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        else:
            losses, conflicts = ds_mean_backward(network, inputs, subsets, subset_loss), 0
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_grad_norm)
        engine.optimizer.step()

        pairs = len(subsets) * (len(subsets) - 1) // 2
        engine.state.output[Keys.LOSS] = losses.mean().detach()
        engine.state.output[CONFLICTS_KEY] = conflicts
        engine.state.output[CONFLICT_FRACTION_KEY] = conflicts / pairs if pairs else 0.0
        engine.state.output[NUM_SUBSETS_KEY] = len(subsets)
        # Last: MONAI decollates the output and runs postprocessing on this event.
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    # Saved by MONAI's CheckpointSaver next to the model, so a resumed run continues the same subset draws.
    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])


def _first(output: Any) -> dict:
    """The step's dict, whether or not the trainer decollated its output into a list of per-sample dicts."""
    return output[0] if isinstance(output, (list, tuple)) else output


def output_scalar(key: str) -> Callable[[Any], float]:
    """``output_transform`` for one scalar of the step (for ignite metrics such as ``Average``)."""
    def transform(output: Any) -> float:
        value = _first(output)[key]
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    return transform


def training_scalars(output: Any) -> dict[str, float]:
    """``output_transform`` for ``TensorBoardStatsHandler``: loss and conflict counts of the step."""
    step = _first(output)
    return {"train_loss": output_scalar(Keys.LOSS)(step), CONFLICTS_KEY: output_scalar(CONFLICTS_KEY)(step),
            CONFLICT_FRACTION_KEY: output_scalar(CONFLICT_FRACTION_KEY)(step)}
