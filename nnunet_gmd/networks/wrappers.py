"""The bare network under the wrappers that trainers put around it, and its branches switched off for a while."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import Tensor, nn


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


@contextmanager
def only_available(network: Optional[nn.Module], available: Optional[Tensor]) -> Iterator[None]:
    """Inside the block, ``network(x)`` runs only the branches in ``available`` (``(M,)`` or ``(B, M)``).

    For callers that cannot pass the mask themselves (nnU-Net's predictor and validation step call
    ``network(x)``). The default is reset on leaving, also after an error. ``network`` None (not a DS
    network) or ``available`` None (every branch) change nothing.
    """
    if network is None or available is None:
        yield
        return
    network.set_default_available(available)
    try:
        yield
    finally:
        network.set_default_available(None)
