"""Training handlers that MONAI lacks in the form GMD training needs."""
from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


class PolyLRHandler:
    """nnU-Net's poly learning rate, ``lr = initial_lr * (1 - epoch / max_epochs) ** exponent``, set at each epoch start.

    Why not ``PolynomialLR`` + ``LrScheduleHandler``: a stateful scheduler saved in a checkpoint keeps the old
    ``total_iters``, so resuming with a larger ``num_epochs`` silently trains at learning rate 0. Computing the
    rate from the trainer's epoch and ``max_epochs`` (which MONAI's ``CheckpointLoader`` keeps at the new value)
    needs no state and is what nnU-Net does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, exponent: float = 0.9) -> None:
        if initial_lr <= 0:
            raise ValueError(f"initial_lr must be positive, got {initial_lr}")
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.exponent = exponent

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def learning_rate(self, epoch: int, max_epochs: int) -> float:
        """Rate for the 0-based ``epoch`` of ``max_epochs``."""
        return self.initial_lr * max(0.0, 1.0 - epoch / max_epochs) ** self.exponent

    def __call__(self, engine: Any) -> None:
        lr = self.learning_rate(engine.state.epoch - 1, engine.state.max_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logger.info("epoch %d: learning rate %.6g", engine.state.epoch, lr)
