"""Literal GMD, written straight from the official code's PCGrad loop: the test oracle and the benchmark baseline.

Flattened gradient vectors, explicit projected copies, pair loops. Slow and memory-hungry on purpose: it is
the readable definition that :mod:`nnunet_gmd.gmd` must reproduce.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def reference_gmd_grads(losses: Sequence[Tensor], params: Sequence[Tensor], orders: Sequence[Sequence[int]],
                        reduction: str = "mean") -> list[Optional[Tensor]]:
    """Merged gradient per parameter (``None`` where no loss reaches it), projecting in the given orders."""
    grads, has_grads = [], []
    for loss in losses:
        gs = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
        has_grads.append(torch.cat([(torch.zeros_like(p) if g is None else torch.ones_like(p)).reshape(-1)
                                    for g, p in zip(gs, params)]))
    shared = torch.stack(has_grads).prod(0).bool()
    projected = [g.clone() for g in grads]
    for i, g_i in enumerate(projected):
        for j in orders[i]:
            g_j = grads[j]
            dot = torch.dot(g_i, g_j)
            if dot < 0:
                g_i -= dot * g_j / (g_j.norm() ** 2)
    stacked = torch.stack(projected)
    merged = torch.zeros_like(grads[0])
    if reduction == "mean":
        merged[shared] = stacked[:, shared].mean(0)
    elif reduction == "sum":
        merged[shared] = stacked[:, shared].sum(0)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    merged[~shared] = stacked[:, ~shared].sum(0)
    reached = torch.stack(has_grads).amax(0).bool()
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(merged[offset:offset + n].view_as(p).clone() if reached[offset:offset + n].any() else None)
        offset += n
    return out
