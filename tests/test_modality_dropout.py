"""Random modality dropout (the baseline trainer's input masking) and the shared training-budget variables."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from nnunet_gmd.nnunet.baselines import (drop_random_modalities, nnUNetTrainerModalityDropout,
                                         nnUNetTrainerModalityDropout_smoke)
from nnunet_gmd.nnunet.trainer_base import BUDGET_ENV_VARS, budget_from_env, final_validation_enabled
from nnunet_gmd.subsets import all_subsets


def test_dropout_zeroes_whole_channels_and_keeps_at_least_one():
    data = torch.rand(64, 4, 5, 6, 7) + 1.0     # strictly positive, so a zero means "dropped"
    out = drop_random_modalities(data, torch.Generator().manual_seed(0))
    kept = (out != 0).flatten(2)
    assert torch.all(kept.all(-1) | (~kept).all(-1))          # a channel is kept or dropped as a whole
    assert torch.all(kept.all(-1).sum(1) >= 1)                # never all channels dropped
    assert torch.equal(out[out != 0], data[out != 0])          # kept channels pass through unchanged


def test_every_subset_is_drawn_about_equally_often():
    data = torch.ones(3000, 4, 1, 1, 1)
    out = drop_random_modalities(data, torch.Generator().manual_seed(1))
    drawn = Counter(tuple(int(c) for c in torch.nonzero(row.flatten()).flatten()) for row in out)
    assert set(drawn) == set(all_subsets(4))
    expected = 3000 / 15
    assert all(abs(n - expected) < 0.3 * expected for n in drawn.values())


def test_dropout_is_reproducible_with_its_own_generator():
    data = torch.rand(16, 4, 3, 3, 3)
    a = drop_random_modalities(data, torch.Generator().manual_seed(5))
    b = drop_random_modalities(data, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_budget_is_read_from_environment_and_validated():
    env = {"NNUNET_GMD_NUM_EPOCHS": "7", "NNUNET_GMD_ITERS_PER_EPOCH": " 12 ", "NNUNET_GMD_VAL_ITERS": ""}
    assert budget_from_env(env) == {"num_epochs": 7, "num_iterations_per_epoch": 12}
    for bad in ("0", "-3", "ten", "1.5"):
        with pytest.raises(ValueError, match="NNUNET_GMD_NUM_EPOCHS"):
            budget_from_env({"NNUNET_GMD_NUM_EPOCHS": bad})
    assert set(BUDGET_ENV_VARS) == {"NNUNET_GMD_NUM_EPOCHS", "NNUNET_GMD_ITERS_PER_EPOCH", "NNUNET_GMD_VAL_ITERS"}


def test_final_validation_switch():
    assert final_validation_enabled({})
    assert final_validation_enabled({"NNUNET_GMD_FINAL_VALIDATION": "1"})
    for off in ("0", "false", "No", " off "):
        assert not final_validation_enabled({"NNUNET_GMD_FINAL_VALIDATION": off})


def test_trainers_are_nnunet_trainers_with_full_init_signature():
    import inspect
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    for cls in (nnUNetTrainerModalityDropout, nnUNetTrainerModalityDropout_smoke):
        assert issubclass(cls, nnUNetTrainer)
        # nnU-Net re-creates trainers from checkpoints by these names; *args would break that.
        assert list(inspect.signature(cls.__init__).parameters) == \
            ["self", "plans", "configuration", "fold", "dataset_json", "device"]


def test_initial_learning_rate_override_is_validated():
    from nnunet_gmd.nnunet.trainer_base import initial_lr_from_env

    assert initial_lr_from_env({}) is None and initial_lr_from_env({"NNUNET_GMD_INITIAL_LR": " "}) is None
    assert initial_lr_from_env({"NNUNET_GMD_INITIAL_LR": "3e-3"}) == pytest.approx(3e-3)
    for bad in ("0", "-1e-3", "fast", "nan"):
        with pytest.raises(ValueError, match="NNUNET_GMD_INITIAL_LR"):
            initial_lr_from_env({"NNUNET_GMD_INITIAL_LR": bad})


def test_num_threads_variable_is_validated():
    from nnunet_gmd.nnunet.trainer_base import num_threads_from_env

    assert num_threads_from_env({}) is None and num_threads_from_env({"NNUNET_GMD_NUM_THREADS": ""}) is None
    assert num_threads_from_env({"NNUNET_GMD_NUM_THREADS": "3"}) == 3
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match="NNUNET_GMD_NUM_THREADS"):
            num_threads_from_env({"NNUNET_GMD_NUM_THREADS": bad})
