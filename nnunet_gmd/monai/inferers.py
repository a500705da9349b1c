"""Sliding-window inference that hands each case's availability mask to a Dynamic Sharing network.

MONAI's ``SlidingWindowInferer`` forwards extra keyword arguments unchanged to every window batch. A window
batch holds ``sw_batch_size`` windows that may come from different cases, so a ``(B, M)`` mask would not line
up with it. Running the window loop per case with that case's ``(M,)`` row keeps the mask exact: the network
broadcasts an ``(M,)`` mask to all windows.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from monai.inferers import SlidingWindowInferer


class AvailabilitySlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` whose ``available`` keyword (``(M,)`` or ``(B, M)`` bool) is applied per case."""

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any,
                 available: Optional[torch.Tensor] = None, **kwargs: Any):
        if available is None:
            return super().__call__(inputs, network, *args, **kwargs)
        mask = torch.as_tensor(available).to(device=inputs.device, dtype=torch.bool)
        if mask.dim() == 1:
            return super().__call__(inputs, network, *args, available=mask, **kwargs)
        if mask.dim() != 2 or mask.shape[0] != inputs.shape[0]:
            raise ValueError(f"availability mask must have shape (M,) or (B={inputs.shape[0]}, M), "
                             f"got {tuple(mask.shape)}")
        if inputs.shape[0] == 1:
            return super().__call__(inputs, network, *args, available=mask[0], **kwargs)
        outputs = [super(AvailabilitySlidingWindowInferer, self).__call__(
            inputs[b:b + 1], network, *args, available=mask[b], **kwargs) for b in range(inputs.shape[0])]
        return torch.cat(outputs, 0)
