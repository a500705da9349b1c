"""Optimiser choices for the optimiser study of issue 10, as ``configure_optimizers`` building blocks.

nnU-Net's stock trainer uses SGD (lr 1e-2, momentum 0.99, Nesterov) with a poly decay; our DS/GMD trainers use
nnU-Net's AdamW variant at 1e-3. A fair comparison runs each method under the other's optimiser too. SGD at 1e-2
from the first step left the late-fusion DS network at the all-background solution on phantoms, so the SGD
variant of the DS trainers warms the learning rate up linearly first, as nnU-Net's ``nnUNetTrainer_warmup`` does.
"""
from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.warmup import PolyLRScheduler_offset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

__all__ = ["WarmupPolyLRScheduler", "SGDWarmupMixin", "warmup_epochs"]


class WarmupPolyLRScheduler(PolyLRScheduler_offset):
    """Linear warm-up over the first ``warmup_steps`` epochs, then nnU-Net's poly decay over the rest.

    ``nnUNetTrainer_warmup`` switches between two schedulers (and two optimisers) at the end of its warm-up and
    needs its own ``load_checkpoint`` for that; one scheduler that is a pure function of the epoch needs nothing
    on resume, because nnU-Net calls ``step(current_epoch)`` at the start of every epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int, warmup_steps: int,
                 exponent: float = 0.9) -> None:
        if not 0 <= warmup_steps < max_steps:
            raise ValueError(f"warm-up of {warmup_steps} epochs does not fit in {max_steps} epochs")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, initial_lr, max_steps, warmup_steps, exponent)

    def step(self, current_step=None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        if current_step >= self.warmup_steps:
            super().step(current_step)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = self.initial_lr * (current_step + 1) / self.warmup_steps
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def warmup_epochs(num_epochs: int, fraction: float) -> int:
    """Epochs of warm-up: ``fraction`` of the run, at least one, and always leaving one epoch of decay."""
    return min(max(1, round(fraction * num_epochs)), max(num_epochs - 1, 0))


class SGDWarmupMixin:
    """nnU-Net's SGD (momentum 0.99, Nesterov, its weight decay) with a linear warm-up, then the poly decay.

    Put it before the trainer in the bases; the trainer's ``initial_lr`` is the peak learning rate.
    """

    warmup_fraction: float = 0.1  # nnU-Net's warm-up trainer uses 50 of 1000 epochs; short CPU runs get a bit more

    def configure_optimizers(self):
        optimizer, _ = nnUNetTrainer.configure_optimizers(self)   # nnU-Net's own SGD; only the schedule differs
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs,
                                          warmup_epochs(self.num_epochs, self.warmup_fraction))
        return optimizer, scheduler
