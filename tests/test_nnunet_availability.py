"""Training on incomplete cases (issue 11): a sequence a case lacks never reaches a loss."""
import json

import numpy as np
import pytest
import torch

from nnunet_helpers import CONFIG, DATASET_ID, GMD_SMOKE, run_tool, write_split
from test_nnunet_trainers import make_trainer, random_batch

from nnunet_gmd.availability import batch_mask, load_availability, samples_supplying, supported_subsets
from nnunet_gmd.errors import UserError
from nnunet_gmd.subsets import SubsetSampler, all_subsets

T1CE = 1


# ------------------------------------------------------------------------------------------ core
def test_batch_mask_and_the_subsets_a_batch_can_supply():
    mask = batch_mask(["a", "b", "c"], {"a": (0, 2, 3), "b": (3,)}, 4)   # c is not listed: complete
    assert mask.tolist() == [[True, False, True, True], [False, False, False, True], [True] * 4]
    assert samples_supplying((0, 1), mask).tolist() == [2] and samples_supplying((3,), mask).tolist() == [0, 1, 2]
    only_a_b = mask[:2]
    assert supported_subsets(all_subsets(4), only_a_b) == [(0,), (2,), (3,), (0, 2), (0, 3), (2, 3), (0, 2, 3)]


def test_a_sampled_draw_stays_inside_the_allowed_subsets():
    allowed = [s for s in all_subsets(4) if T1CE not in s]   # nobody in the batch has T1ce
    sampler = SubsetSampler(4, k=5, include_full=True, seed=0)
    for _ in range(20):
        draw = sampler.sample(allowed=allowed)
        assert len(draw) == 5 and all(T1CE not in s for s in draw) and len(set(draw)) == 5
    assert SubsetSampler(4, k=5, seed=0).sample(allowed=[(0,), (3,)]) == [(0,), (3,)]
    assert SubsetSampler(4, seed=0).sample(allowed=allowed) == allowed


def test_the_availability_record_is_checked(tmp_path):
    names = ["t1", "t1ce", "t2", "flair"]
    path = tmp_path / "modality_availability.json"
    path.write_text(json.dumps({"case_1": ["t1", "FLAIR"], "case_2": ["t1", "t1ce", "t2", "flair"]}))
    assert load_availability(path, names) == {"case_1": (0, 3), "case_2": (0, 1, 2, 3)}
    for bad, fragment in [({"c": ["pd"]}, "unknown channel 'pd'"), ({"c": []}, "no available channel"),
                          (["c"], "expected an object"), ({"c": "t1"}, "expected a list")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=fragment):
            load_availability(path, names)
    path.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_availability(path, names)


# ------------------------------------------------------------------------------------------ trainers
def _incomplete_batch(trainer, noise: bool) -> dict:
    batch = random_batch(trainer, seed=3)
    batch["keys"] = np.array(["no_t1ce", "complete"])
    if noise:   # what sits in the absent channel must not matter
        batch["data"][0, T1CE] = 40 * torch.randn(batch["data"][0, T1CE].shape, generator=torch.Generator().manual_seed(9))
    return batch


def _step_from(trainer, state: dict, batch: dict) -> list[torch.Tensor]:
    """One step from the same weights, optimiser and generators (subset draw, projection orders)."""
    import copy

    trainer.network.load_state_dict(state["network"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer._load_extra_state(copy.deepcopy(state["extra"]))
    trainer.train_step(batch)
    return [p.detach().clone() for p in trainer.network.parameters()]


@pytest.mark.parametrize("name", ["nnUNetTrainerGMD_smoke", "nnUNetTrainerDS_smoke", "nnUNetTrainerGMD_k5_FF_smoke",
                                  "nnUNetTrainerGMD_m1_smoke"])
def test_an_absent_sequence_contributes_nothing(nnunet_paths, name):
    import copy

    trainer = make_trainer(nnunet_paths, name)
    trainer.training_availability = {"no_t1ce": (0, 2, 3)}
    state = {"network": copy.deepcopy(trainer.network.state_dict()),
             "optimizer": copy.deepcopy(trainer.optimizer.state_dict()), "extra": copy.deepcopy(trainer._extra_state())}
    clean = _step_from(trainer, state, _incomplete_batch(trainer, noise=False))
    noisy = _step_from(trainer, state, _incomplete_batch(trainer, noise=True))
    for a, b in zip(clean, noisy):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # and without the record the noise does reach the weights: the test can fail
    trainer.training_availability = None
    plain = _step_from(trainer, state, _incomplete_batch(trainer, noise=True))
    assert any(not torch.equal(a, b) for a, b in zip(clean, plain))


def test_validation_runs_an_incomplete_case_on_its_own_sequences(nnunet_paths):
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerGMD_smoke")
    trainer.training_availability = {"no_t1ce": (0, 2, 3)}
    trainer.network.eval()
    with torch.no_grad():
        clean = trainer.validation_step(_incomplete_batch(trainer, noise=False))
        noisy = trainer.validation_step(_incomplete_batch(trainer, noise=True))
    for key in ("tp_hard", "fp_hard", "fn_hard"):
        np.testing.assert_array_equal(noisy[key], clean[key])
    assert trainer._ds_network()._default_available is None   # reset after the step


def test_stock_trains_on_zeros_and_the_complete_variant_drops_incomplete_cases(nnunet_paths):
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerBudget_smoke")
    trainer.training_availability = {"no_t1ce": (0, 2, 3)}
    zeroed = trainer._zero_absent(_incomplete_batch(trainer, noise=True))["data"]
    assert not zeroed[0, T1CE].any() and zeroed[1, T1CE].any() and zeroed[0, 0].any()

    write_split(nnunet_paths)
    complete = make_trainer(nnunet_paths, "nnUNetTrainerBudget_complete_smoke")
    tr_keys, val_keys = complete.do_split()
    complete.training_availability = {tr_keys[0]: (0, 2, 3), val_keys[0]: (0,)}
    kept, kept_val = complete.do_split()
    assert kept == tr_keys[1:] and kept_val == val_keys


@pytest.mark.slow
def test_gmd_smoke_through_nnunetv2_train_with_an_availability_record(nnunet_paths):
    ws = nnunet_paths
    cases = sorted(p.name[: -len(".nii.gz")] for p in (ws.dataset_folder / "labelsTr").glob("*.nii.gz"))
    record = ws.dataset_folder / "modality_availability.json"
    record.write_text(json.dumps({cases[0]: ["t1", "t2", "flair"], cases[1]: ["flair"]}))
    try:
        run_tool(["nnUNetv2_train", str(DATASET_ID), CONFIG, "2", "-tr", GMD_SMOKE, "-device", "cpu"],
                 ws.env(NNUNET_GMD_FINAL_VALIDATION="0"), timeout=900)
    finally:
        record.unlink()
    log = "\n".join(p.read_text() for p in (ws.model_folder(GMD_SMOKE) / "fold_2").glob("training_log_*.txt"))
    assert "modality availability from" in log and "2 of 2 listed training cases lack sequences" in log
    ckpt = torch.load(ws.model_folder(GMD_SMOKE) / "fold_2" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["network_weights"].values())
