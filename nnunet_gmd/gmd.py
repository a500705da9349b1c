"""Gradient-Guided Modality Decoupling (GMD), framework-free (torch only).

Each modality subset S has a loss L_S. Per step GMD takes the gradients g_S, removes from each g_i its
component along every g_j it conflicts with (g_i . g_j < 0, PCGrad-style, the j in random order) and merges
the projected gradients: the mean over parameters every loss reaches and the sum over the rest (official
code, ``reduction="mean"``) or the plain sum (paper Eq. 9, ``reduction="sum"``).

Every projected gradient is a linear combination of the original ones, so the projection runs on the KxK
Gram matrix and only tracks coefficients; the merged gradient is one weighted combination ``w @ G``. No
projected copies of the K gradient vectors are made.

Two entry points:

* :func:`gmd_backward` — any K losses, any parameters, any training loop.
* :func:`ds_gmd_backward` — the structured path for Dynamic Sharing networks: one forward pass, each branch
  a separate graph, and per subset one VJP through only that subset's branches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from nnunet_gmd.subsets import Subset

REDUCTIONS = ("mean", "sum")


@runtime_checkable
class DSNetwork(Protocol):
    """What the structured GMD path needs of a Dynamic Sharing network (``nnunet_gmd.networks`` provide it).

    A feature-fusion network also has ``decode_subset(branch_outputs, subset)``: the subset's output from the
    per-branch encoder graphs (:func:`fuses_features`).
    """

    def forward_branch_graphs(self, x: Tensor) -> list[list[Tensor]]:
        """Each modality branch as its own graph: ``out[m][scale]`` (encoder skips for feature fusion)."""

    def modality_of_parameters(self) -> dict[str, Optional[int]]:
        """Parameter name -> the modality whose branch alone uses it, or None for shared parameters."""

    def uses_deep_supervision(self) -> bool:
        """Whether ``network(x)`` returns one output per scale (a list) instead of one tensor."""


@dataclass
class GMDStats:
    """What one GMD step saw. ``cosine`` and ``grad_norms`` are the paper's "gradient as dominance indicator"."""

    cosine: Tensor  # (K, K) cosine similarity of the original subset gradients
    num_conflicts: int  # pairs i < j with g_i . g_j < 0
    grad_norms: Tensor  # (K,) norms of the original subset gradients
    weights: Tensor  # (K,) merged gradient = sum_k weights[k] g_k (before the 1/K on shared parameters)
    losses: Optional[Tensor] = None  # (K,) subset losses, detached
    subsets: Optional[list] = field(default=None)


# ---------------------------------------------------------------------------- projection on the Gram matrix
def draw_orders(k: int, generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """One random order of all K gradients per projected gradient, as the official code's ``random.shuffle``."""
    return [torch.randperm(k, generator=generator).tolist() for _ in range(k)]


def pcgrad_coefficients(gram: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """Coefficients C with ``projected_i = sum_j C[i, j] g_j`` given the Gram matrix ``G[i, j] = g_i . g_j``.

    Mirrors the reference loop exactly: g_i is updated in place while it walks ``orders[i]`` (which, as in
    the official code, includes i itself).
    """
    g = gram.detach().to("cpu", torch.float64).numpy()
    k = g.shape[0]
    coeffs = np.eye(k)
    if np.isfinite(g).all():
        for i in range(k):
            c = coeffs[i]
            for j in orders[i]:
                dot = c @ g[:, j]
                if dot < 0.0:
                    c[j] -= dot / g[j, j]
    return torch.from_numpy(coeffs)


def gram_statistics(gram: Tensor) -> tuple[Tensor, int, Tensor]:
    """Cosine matrix, number of conflicting pairs and gradient norms from the Gram matrix."""
    gram = gram.detach().to("cpu", torch.float64)
    norms = gram.diagonal().clamp_min(0).sqrt()
    cosine = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    conflicts = int(torch.triu(gram < 0, diagonal=1).sum())
    return cosine.float(), conflicts, norms.float()


def pcgrad_weights(gram: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """The PCGrad step of GMD on the Gram matrix: weights ``w`` with merged gradient ``sum_k w_k g_k``.

    Gram and random projection orders in, weights out (float64, CPU). Plain averaging, the DS ablation, is
    ``w = 1``; the merge (:func:`merge_flat`) is the same for both.
    """
    return pcgrad_coefficients(gram, draw_orders(gram.shape[0], generator)).sum(0)


def merge_flat(flat_grads: Tensor, weights: Tensor, shared: Tensor, reduction: str) -> Tensor:
    """``weights @ flat_grads``, divided by K on the entries every loss reaches when ``reduction="mean"``."""
    k = flat_grads.shape[0]
    merged = weights.to(flat_grads.dtype).to(flat_grads.device) @ flat_grads
    if reduction == "mean":
        merged = torch.where(shared, merged / k, merged)
    return merged


def _merge(flat_grads: Tensor, gram: Tensor, shared: Tensor, reduction: str,
           generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Merged flat gradient and the per-loss weights. ``shared`` marks entries every loss reaches."""
    weights = pcgrad_weights(gram, generator)
    return merge_flat(flat_grads, weights, shared, reduction), weights.float()


# ---------------------------------------------------------------------------- parameter bookkeeping
class FlatLayout:
    """Offsets of each parameter inside one flat gradient vector."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.offsets = np.cumsum([0] + self.sizes).tolist()
        self.numel = self.offsets[-1]

    def flatten_into(self, out: Tensor, grads: Sequence[Optional[Tensor]]) -> list[bool]:
        reached = []
        for p, g, a, b in zip(self.params, grads, self.offsets[:-1], self.offsets[1:]):
            if g is None:
                out[a:b].zero_()
                reached.append(False)
            else:
                out[a:b].copy_(g.reshape(-1))
                reached.append(True)
        return reached

    def element_mask(self, per_param: Sequence[bool], device: torch.device) -> Tensor:
        return torch.repeat_interleave(torch.tensor(per_param, device=device),
                                       torch.tensor(self.sizes, device=device))

    def write_grads(self, merged: Tensor, any_reached: Sequence[bool]) -> None:
        """Set ``p.grad`` to views of ``merged``; parameters no loss reached get ``None`` (as after backward)."""
        for p, hit, a, b in zip(self.params, any_reached, self.offsets[:-1], self.offsets[1:]):
            p.grad = merged[a:b].view_as(p) if hit else None


def all_reduce_mean_(flat: Tensor) -> None:
    """Average the merged gradient over DDP ranks in a single collective."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
        flat /= dist.get_world_size()


def backward_all_reduced(loss: Tensor, params: Sequence[Tensor]) -> None:
    """``loss.backward()`` for a forward that bypassed DDP's wrapper: gradients averaged over ranks in one call.

    Parameters the loss does not reach get ``None``, as after a plain backward (in every rank alike).
    """
    layout = FlatLayout(params)
    grads = torch.autograd.grad(loss, layout.params, allow_unused=True)
    flat = torch.empty(layout.numel, dtype=layout.params[0].dtype, device=layout.params[0].device)
    reached = layout.flatten_into(flat, grads)
    all_reduce_mean_(flat)
    layout.write_grads(flat, reached)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ---------------------------------------------------------------------------- generic entry point
def gmd_backward(losses: Sequence[Tensor], params: Sequence[Tensor], *, reduction: str = "mean",
                 generator: Optional[torch.Generator] = None, sync_distributed: bool = True) -> GMDStats:
    """Decouple and merge the gradients of ``losses`` and write the result into ``p.grad`` (overwriting).

    A parameter "reached" by a loss is one for which autograd returns a gradient (not ``None``). Under
    torch.distributed the merged gradient is averaged across ranks with one all-reduce (``sync_distributed``);
    call it on the unwrapped module, since DDP's own hooks do not see ``torch.autograd.grad``.
    """
    check_reduction(reduction)
    if len(losses) == 0:
        raise ValueError("gmd_backward needs at least one loss")
    layout = FlatLayout(params)
    ref = layout.params[0]
    flat = torch.empty(len(losses), layout.numel, dtype=ref.dtype, device=ref.device)
    reached = []
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, layout.params, retain_graph=k < len(losses) - 1, allow_unused=True)
        reached.append(layout.flatten_into(flat[k], grads))
    return _finish(flat, layout, reached, reduction, generator, sync_distributed,
                   torch.stack([loss.detach().float() for loss in losses]).cpu(), None)


def _finish(flat: Tensor, layout: FlatLayout, reached: list[list[bool]], reduction: str,
            generator: Optional[torch.Generator], sync_distributed: bool, losses: Optional[Tensor],
            subsets: Optional[list]) -> GMDStats:
    gram = flat @ flat.T
    shared = layout.element_mask([all(col) for col in zip(*reached)], flat.device)
    merged, weights = _merge(flat, gram, shared, reduction, generator)
    del flat
    if sync_distributed:
        all_reduce_mean_(merged)
    layout.write_grads(merged, [any(col) for col in zip(*reached)])
    cosine, conflicts, norms = gram_statistics(gram)
    return GMDStats(cosine, conflicts, norms, weights, losses, subsets)


# ---------------------------------------------------------------------------- structured path for DS networks
SubsetLoss = Callable[[object, Subset], Tensor]


def ds_branch_outputs(network: DSNetwork, x: Tensor) -> list[list[Tensor]]:
    """Forward each modality branch as its own graph: ``out[m][scale]`` of shape ``(B, C, *spatial)``.

    Separate graphs let a subset's VJP run through its own branches only, which is where the structured
    path saves over one backward per subset through everything.
    """
    return network.forward_branch_graphs(x)


def fuse_logits(outputs: list[list[Tensor]], subset: Subset) -> list[Tensor]:
    """Late fusion: the mean of the subset's branch outputs, at every scale."""
    n = len(subset)
    return [sum(outputs[m][s] for m in subset) / n for s in range(len(outputs[0]))]


def fuses_features(network: nn.Module) -> bool:
    """True for networks that fuse branch features and decode them per subset (``decode_subset``)."""
    return callable(getattr(network, "decode_subset", None))


def learns_fusion(network: nn.Module) -> bool:
    """True for logit-fusion networks with learned fusion weights (``fuse_subset``): not a plain mean."""
    return bool(getattr(network, "learned_fusion", False)) and callable(getattr(network, "fuse_subset", None))


def subset_outputs(network: DSNetwork, outputs: list[list[Tensor]], subset: Subset) -> list[Tensor]:
    """The network's output for ``subset`` (highest resolution first) from its per-branch graphs."""
    if fuses_features(network):
        return network.decode_subset(outputs, subset)
    if learns_fusion(network):
        return network.fuse_subset(outputs, subset)
    return fuse_logits(outputs, subset)


def _as_network_output(fused: list[Tensor], as_list: bool):
    return fused if as_list else fused[0]


def ds_subset_losses(network: DSNetwork, x: Tensor, subsets: Sequence[Subset], subset_loss: SubsetLoss) -> list[Tensor]:
    """One forward, the loss of each subset's fused output (for the no-decoupling "DS" ablation)."""
    outputs = ds_branch_outputs(network, x)
    as_list = network.uses_deep_supervision()
    return [subset_loss(_as_network_output(subset_outputs(network, outputs, s), as_list), s) for s in subsets]


def ds_gmd_backward(network: DSNetwork, x: Tensor, subsets: Sequence[Subset], subset_loss: SubsetLoss, *,
                    reduction: str = "mean", generator: Optional[torch.Generator] = None,
                    sync_distributed: bool = True) -> GMDStats:
    """Exact GMD for a Dynamic Sharing network over ``subsets`` in one forward pass.

    ``network`` is the unwrapped DS network (``forward_branch_graphs``, ``modality_of_parameters``,
    ``uses_deep_supervision``). ``subset_loss(output, subset)`` gets what ``network(x)`` would return for that
    subset (a tensor, or a list under deep supervision); it may return a GradScaler-scaled loss, since the
    projection is scale-invariant. Per subset, the loss is evaluated on detached fused logits to get the
    cotangent there, then a single VJP runs through the subset's branches only. For a feature-fusion network
    (``decode_subset``) the encoder branches run once as separate graphs; per subset the features are fused and
    decoded, and one VJP runs through the decoder and that subset's encoder branches.
    """
    check_reduction(reduction)
    if len(subsets) == 0:
        raise ValueError("ds_gmd_backward needs at least one subset")
    names = [n for n, p in network.named_parameters() if p.requires_grad]
    owner_by_name = network.modality_of_parameters()
    owners = [owner_by_name[n] for n in names]
    layout = FlatLayout([p for p in network.parameters() if p.requires_grad])
    as_list = network.uses_deep_supervision()

    outputs = ds_branch_outputs(network, x)
    ref = layout.params[0]
    flat = torch.empty(len(subsets), layout.numel, dtype=ref.dtype, device=ref.device)
    reached, losses = [], []
    last = len(subsets) - 1
    through_network = fuses_features(network) or learns_fusion(network)
    for k, subset in enumerate(subsets):
        if through_network:
            # fuse (and decode), loss, then one VJP through the fusion (decoder, learned fusion weights) and
            # this subset's branches
            loss = subset_loss(_as_network_output(subset_outputs(network, outputs, subset), as_list), subset)
            grads = torch.autograd.grad(loss, layout.params, retain_graph=k < last, allow_unused=True)
            layout.flatten_into(flat[k], grads)
            reached.append([owner is None or owner in subset for owner in owners])
            losses.append(loss.detach().float())
            continue
        leaves = [f.detach().requires_grad_() for f in fuse_logits(outputs, subset)]
        loss = subset_loss(_as_network_output(leaves, as_list), subset)
        # scales the loss ignores (nnU-Net weights the lowest deep-supervision output 0) get no cotangent
        cotangents = torch.autograd.grad(loss, leaves, allow_unused=True)
        used = [s for s, c in enumerate(cotangents) if c is not None]
        branch_outs = [outputs[m][s] for m in subset for s in used]
        branch_cots = [cotangents[s] / len(subset) for _ in subset for s in used]
        grads = torch.autograd.grad(branch_outs, layout.params, grad_outputs=branch_cots,
                                    retain_graph=k < last, allow_unused=True)
        layout.flatten_into(flat[k], grads)
        reached.append([owner is None or owner in subset for owner in owners])
        losses.append(loss.detach().float())
    return _finish(flat, layout, reached, reduction, generator, sync_distributed,
                   torch.stack(losses).cpu(), [tuple(s) for s in subsets])
