"""The optimiser-study building blocks: the warm-up schedule and the trainers that use it."""
import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_gmd.nnunet.optimizers import WarmupPolyLRScheduler, warmup_epochs


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _lr_at(scheduler, optimizer, epoch: int) -> float:
    scheduler.step(epoch)
    return optimizer.param_groups[0]["lr"]


def test_warmup_rises_linearly_to_the_peak_then_follows_nnunets_poly_decay_over_the_rest():
    opt = _optimizer()
    sched = WarmupPolyLRScheduler(opt, 1e-2, 40, 4)
    lrs = [_lr_at(sched, opt, e) for e in range(40)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    # after the warm-up: nnU-Net's poly decay over the remaining 36 epochs
    ref_opt = _optimizer()
    reference = PolyLRScheduler(ref_opt, 1e-2, 36)
    assert lrs[4:] == pytest.approx([_lr_at(reference, ref_opt, e) for e in range(36)])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0
    assert sched.get_last_lr() == [lrs[-1]]


def test_the_schedule_is_a_function_of_the_epoch_so_resuming_needs_no_state():
    opt_a, opt_b = _optimizer(), _optimizer()
    run = WarmupPolyLRScheduler(opt_a, 3e-3, 20, 2)
    for epoch in range(13):
        run.step(epoch)
    resumed = WarmupPolyLRScheduler(opt_b, 3e-3, 20, 2)   # a fresh trainer after --c at epoch 12
    resumed.step(12)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"])


def test_no_warmup_is_nnunets_poly_schedule_and_a_warmup_longer_than_the_run_is_refused():
    opt, ref_opt = _optimizer(), _optimizer()
    sched, reference = WarmupPolyLRScheduler(opt, 1e-2, 10, 0), PolyLRScheduler(ref_opt, 1e-2, 10)
    assert [_lr_at(sched, opt, e) for e in range(10)] == pytest.approx([_lr_at(reference, ref_opt, e)
                                                                        for e in range(10)])
    with pytest.raises(ValueError, match="warm-up of 10 epochs"):
        WarmupPolyLRScheduler(_optimizer(), 1e-2, 10, 10)


@pytest.mark.parametrize("epochs, fraction, expected", [(40, 0.1, 4), (1000, 0.05, 50), (3, 0.1, 1), (2, 0.9, 1),
                                                         (1, 0.1, 0)])
def test_warmup_epochs_is_a_fraction_of_at_least_one_epoch_leaving_one_to_decay(epochs, fraction, expected):
    assert warmup_epochs(epochs, fraction) == expected
