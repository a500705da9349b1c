"""GMD at about the cost of a plain DS step: reuse the PCGrad weights between exact refreshes.

The merged GMD gradient is ``sum_k w_k g_k`` (before the official mean rule), with ``w`` the summed PCGrad
coefficients of :func:`nnunet_gmd.gmd.pcgrad_coefficients`. For given weights that is the gradient of
``sum_k w_k L_k``, and for a late-fusion DS network (each subset's output is the mean of its branches' logits)
one forward of the branch graphs and ONE backward give it: autograd adds, at each branch's logits, the
cotangents of every subset that contains the branch. The official mean/sum rule only scales the parameters every
subset reaches, so it is applied to that one gradient afterwards.

:class:`AmortizedGMD` computes the exact Gram matrix and weights (:func:`nnunet_gmd.gmd.ds_gmd_backward`) every
``interval`` steps, optionally on a smaller sub-batch, and takes the weighted single backward in between. With
``interval=1`` and no sub-batch it is exact GMD step for step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from nnunet_gmd.gmd import (FlatLayout, GMDStats, SubsetLoss, all_reduce_mean_, check_reduction, ds_gmd_backward,
                            ds_subset_losses)
from nnunet_gmd.subsets import Subset

# Exact weights every 32 steps: on real BraTS slices, weights up to 31 steps old are as close to exact GMD as fresh
# ones (mean cosine 0.9991 vs 0.9992, benchmarks/gmd_staleness_brats), and 32 puts the amortised step at 1.20x a
# DS step where 16 costs 1.35x (benchmarks/gmd_fast/paired_timing_1thread.json).
DEFAULT_INTERVAL = 32


def unimodal_and_full(num_modalities: int) -> list[Subset]:
    """The M unimodal subsets plus the full set: M + 1 objectives, 2M branch VJPs for an exact Gram."""
    return [(m,) for m in range(num_modalities)] + [tuple(range(num_modalities))]


def _reach(network: nn.Module, subsets: Sequence[Subset]) -> tuple[list[bool], list[bool]]:
    """Per trainable parameter: reached by every subset (shared) and by any subset, as ``ds_gmd_backward`` decides.

    The decision is structural (a parameter belongs to all branches or to one modality), so a head that the loss
    weights 0 still counts as reached and gets a zero gradient, exactly as on the exact path.
    """
    owner_by_name = network.modality_of_parameters()
    owners = [owner_by_name[n] for n, p in network.named_parameters() if p.requires_grad]
    shared = [o is None or all(o in s for s in subsets) for o in owners]
    reached = [o is None or any(o in s for s in subsets) for o in owners]
    return shared, reached


def weighted_ds_backward(network: nn.Module, x: Tensor, subsets: Sequence[Subset], subset_loss: SubsetLoss,
                         weights: Tensor, *, reduction: str = "mean", sync_distributed: bool = True) -> Tensor:
    """Write ``sum_k weights[k] g_k`` (official mean rule: / K on shared parameters) into ``p.grad``, in one backward.

    Same contract as :func:`nnunet_gmd.gmd.ds_gmd_backward` (unwrapped DS network, ``subset_loss`` may return a
    GradScaler-scaled loss). Returns the detached subset losses, shape ``(K,)``.
    """
    check_reduction(reduction)
    if len(subsets) == 0 or len(weights) != len(subsets):
        raise ValueError(f"need one weight per subset, got {len(weights)} weights for {len(subsets)} subsets")
    layout = FlatLayout([p for p in network.parameters() if p.requires_grad])
    losses = ds_subset_losses(network, x, subsets, subset_loss)
    w = weights.detach().to(device=losses[0].device, dtype=losses[0].dtype)
    total = (w * torch.stack(losses)).sum()
    grads = torch.autograd.grad(total, layout.params, allow_unused=True)
    shared, reached = _reach(network, subsets)
    flat = torch.empty(layout.numel, dtype=layout.params[0].dtype, device=layout.params[0].device)
    layout.flatten_into(flat, grads)
    if reduction == "mean":
        flat = torch.where(layout.element_mask(shared, flat.device), flat / len(subsets), flat)
    if sync_distributed:
        all_reduce_mean_(flat)
    layout.write_grads(flat, reached)
    return torch.stack([loss.detach().float() for loss in losses]).cpu()


def ds_mean_backward(network: nn.Module, x: Tensor, subsets: Sequence[Subset], subset_loss: SubsetLoss, *,
                     sync_distributed: bool = True) -> Tensor:
    """The DS ablation's step: the gradient of the mean subset loss, in one backward.

    It is the weighted merge above with every weight ``1/K`` and no mean rule, so the ablation and amortised GMD
    share one code path (the trainers, the MONAI update and ``bench gmd`` all call this). Returns the detached
    subset losses, shape ``(K,)``.
    """
    weights = torch.full((len(subsets),), 1.0 / max(len(subsets), 1), dtype=torch.float64)
    return weighted_ds_backward(network, x, subsets, subset_loss, weights, reduction="sum",
                                sync_distributed=sync_distributed)


@dataclass
class FastStep:
    """What one amortised step did. ``stats`` is the exact step's statistics, ``None`` on a reuse step."""

    losses: Tensor  # (K,) subset losses on the full batch, detached (scaled if the loss was)
    stats: Optional[GMDStats]
    weights: Tensor  # (K,) the weights the merged gradient used


class AmortizedGMD:
    """GMD whose PCGrad weights are computed exactly every ``interval`` steps and reused in between.

    ``backward`` writes the merged gradient into ``p.grad`` like :func:`ds_gmd_backward`. A refresh step is an exact
    GMD step (its statistics are returned); a reuse step is one weighted backward, about the cost of a DS step.
    ``gram_input=(x_sub, loss_sub)`` computes the refresh's weights on a cheaper (sub-)batch; the merged gradient
    then still comes from a weighted backward on the full batch. A refresh whose Gram matrix is not finite (a
    GradScaler overflow) caches nothing, so the next step refreshes again. The subsets must stay the same between
    refreshes (a new list forces a refresh).
    """

    def __init__(self, interval: int = DEFAULT_INTERVAL, reduction: str = "mean") -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        check_reduction(reduction)
        self.interval = interval
        self.reduction = reduction
        self.step = 0
        self.weights: Optional[Tensor] = None
        self.subsets: Optional[list[Subset]] = None

    def needs_refresh(self, subsets: Sequence[Subset]) -> bool:
        return (self.weights is None or self.subsets != [tuple(s) for s in subsets]
                or self.step % self.interval == 0)

    def backward(self, network: nn.Module, x: Tensor, subsets: Sequence[Subset], subset_loss: SubsetLoss, *,
                 generator: Optional[torch.Generator] = None, sync_distributed: bool = True,
                 gram_input: Optional[tuple[Tensor, SubsetLoss]] = None) -> FastStep:
        subsets = [tuple(s) for s in subsets]
        stats = None
        if self.needs_refresh(subsets):
            if gram_input is None:
                stats = ds_gmd_backward(network, x, subsets, subset_loss, reduction=self.reduction,
                                        generator=generator, sync_distributed=sync_distributed)
                weights, losses = stats.weights, stats.losses
            else:
                # the exact merge on the sub-batch is only for its weights; the full-batch backward overwrites it
                stats = ds_gmd_backward(network, gram_input[0], subsets, gram_input[1], reduction=self.reduction,
                                        generator=generator, sync_distributed=False)
                weights = stats.weights
                losses = weighted_ds_backward(network, x, subsets, subset_loss, weights, reduction=self.reduction,
                                              sync_distributed=sync_distributed)
            if bool(torch.isfinite(stats.grad_norms).all()):
                self.weights, self.subsets = weights.detach().cpu(), subsets
            else:
                self.weights = None
        else:
            weights = self.weights
            losses = weighted_ds_backward(network, x, subsets, subset_loss, weights, reduction=self.reduction,
                                          sync_distributed=sync_distributed)
        self.step += 1
        return FastStep(losses, stats, weights)

    def state_dict(self) -> dict:
        return {"interval": self.interval, "step": self.step,
                "weights": None if self.weights is None else self.weights.tolist(),
                "subsets": None if self.subsets is None else [list(s) for s in self.subsets]}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.weights = None if state["weights"] is None else torch.tensor(state["weights"], dtype=torch.float32)
        self.subsets = None if state["subsets"] is None else [tuple(s) for s in state["subsets"]]
