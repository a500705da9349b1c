"""A NaN in a training batch: the step is skipped, counted, and too many in a row stop training with the cases."""
import numpy as np
import pytest
import torch

from test_nnunet_trainers import make_trainer, random_batch

from nnunet_gmd.nnunet.trainer_base import NonFiniteStepGuard, NonFiniteTrainingError


def _with_nan(batch: dict, keys: list[str]) -> dict:
    data = batch["data"].clone()
    data[0, 1, 0, 0, 0] = float("nan")   # one voxel of one sequence of one case
    return {**batch, "data": data, "keys": np.array(keys)}


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.network.parameters()]


@pytest.mark.parametrize("name", ["nnUNetTrainerDS_smoke", "nnUNetTrainerGMD_smoke", "nnUNetTrainerGMD_amortized_smoke"])
def test_a_nan_voxel_skips_the_step_and_leaves_the_weights_finite(nnunet_paths, name):
    trainer = make_trainer(nnunet_paths, name)
    before = _weights(trainer)
    out = trainer.train_step(_with_nan(random_batch(trainer), ["case_a", "case_b"]))
    assert out["skipped"] and not np.isfinite(out["loss"])
    for a, b in zip(before, trainer.network.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)    # no optimiser update at all
    assert trainer.nonfinite_guard.in_a_row == 1
    out = trainer.train_step(random_batch(trainer, seed=1))  # a clean batch steps again and resets the count
    assert not out["skipped"] and np.isfinite(out["loss"])
    assert trainer.nonfinite_guard.in_a_row == 0 and trainer.nonfinite_guard.total == 1
    assert all(bool(torch.isfinite(p).all()) for p in trainer.network.parameters())
    # the epoch's logged loss is over the steps that were taken
    trainer.on_train_epoch_end([{**out, "loss": np.float64(out["loss"])}, {"loss": np.nan, "skipped": True,
                                "conflicts": 0, "modality_grad_norms": np.full(4, np.nan)}])
    assert trainer.logger.get_value("train_losses", step=None)[-1] == pytest.approx(float(out["loss"]))


def test_too_many_nan_steps_in_a_row_name_the_cases(nnunet_paths):
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerGMD_smoke")
    trainer.nonfinite_guard = NonFiniteStepGuard(max_in_a_row=2)
    trainer.train_step(_with_nan(random_batch(trainer), ["BraTS_001", "BraTS_007"]))
    with pytest.raises(NonFiniteTrainingError, match=r"2 training steps in a row.*BraTS_001, BraTS_007"):
        trainer.train_step(_with_nan(random_batch(trainer), ["BraTS_001", "BraTS_007"]))


def test_a_checkpoint_with_nonfinite_weights_is_refused_and_the_previous_kept(nnunet_paths, tmp_path):
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerDS_smoke")
    path = tmp_path / "checkpoint_best.pth"
    trainer.save_checkpoint(str(path))
    saved = path.read_bytes()
    assert torch.load(path, map_location="cpu", weights_only=False)["nnunet_gmd_state"]["subset_sampler"]
    with torch.no_grad():
        next(trainer.network.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="not writing .*checkpoint_best.pth"):
        trainer.save_checkpoint(str(path))
    assert path.read_bytes() == saved and not list(tmp_path.glob("*.tmp"))


def test_the_guard_counts_in_a_row_and_in_total():
    guard = NonFiniteStepGuard(max_in_a_row=3)
    assert guard.record(True, ["a"], "") is None
    assert "case_x" in guard.record(False, ["case_x"], "loss nan")
    guard.record(True, None, "")
    guard.record(False, None, "")
    assert "unknown cases" in guard.record(False, None, "loss nan")
    with pytest.raises(NonFiniteTrainingError):
        guard.record(False, ["c"], "loss nan")
    assert guard.total == 4
