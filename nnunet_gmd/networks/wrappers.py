"""The bare network under the wrappers that trainers put around it."""
from __future__ import annotations

from torch import nn


def unwrap(network: nn.Module) -> nn.Module:
    """The module itself under DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``).

    GMD takes per-subset gradients with ``torch.autograd.grad`` on the bare DS network: DDP's hooks do not see
    those, and a compiled wrapper hides the branch methods.
    """
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):
            network = network._orig_mod
        else:
            return network
