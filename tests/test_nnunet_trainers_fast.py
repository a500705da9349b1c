"""The amortised GMD trainers on real nnU-Net objects: refresh schedule, statistics, resume, nnUNetv2_train."""
import numpy as np
import pytest
import torch

from nnunet_helpers import CONFIG, DATASET_ID, run_tool
from test_nnunet_trainers import make_trainer, random_batch

from nnunet_gmd.subsets import all_subsets, subset_mask

AMORTIZED_SMOKE = "nnUNetTrainerGMD_amortized_smoke"


def test_amortized_trainer_refreshes_on_schedule_and_resumes_from_its_checkpoint(nnunet_paths, tmp_path):
    trainer = make_trainer(nnunet_paths, AMORTIZED_SMOKE)  # exact weights every 4 steps
    net = trainer.network
    outs = []
    for i in range(3):
        batch = random_batch(trainer, seed=i)
        expected = np.mean([float(trainer.loss(net(batch["data"], subset_mask(s, 4)), batch["target"]))
                            for s in all_subsets(4)])
        outs.append(trainer.train_step(batch))
        assert outs[-1]["loss"] == pytest.approx(expected, rel=1e-5)
        total = torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters() if p.grad is not None))
        assert total <= 12 + 1e-4  # clipped after the merge, on reuse steps too
    assert np.isfinite(outs[0]["conflicts"]) and np.all(outs[0]["modality_grad_norms"] > 0)
    assert all(np.isnan(o["conflicts"]) and np.isnan(o["modality_grad_norms"]).all() for o in outs[1:])
    assert trainer.amortized_gmd.step == 3 and trainer.amortized_gmd.weights.shape == (15,)

    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    resumed = make_trainer(nnunet_paths, AMORTIZED_SMOKE)
    resumed.load_checkpoint(path)
    assert resumed.amortized_gmd.state_dict() == trainer.amortized_gmd.state_dict()
    for t in (trainer, resumed):  # step 3 reuses the cached weights, step 4 refreshes them
        for seed in (10, 11):
            out = t.train_step(random_batch(t, seed=seed))
        assert np.isfinite(out["conflicts"])
    for a, b in zip(trainer.network.parameters(), resumed.network.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(resumed.amortized_gmd.weights, trainer.amortized_gmd.weights)


@pytest.mark.parametrize("name,conflict_pairs", [("nnUNetTrainerGMD_m1", 10), ("nnUNetTrainerGMD_amortized_sub", 105)])
def test_cheap_variants_log_their_objectives(nnunet_paths, name, conflict_pairs):
    trainer = make_trainer(nnunet_paths, name)
    out = trainer.train_step(random_batch(trainer))
    assert 0 <= out["conflicts"] <= conflict_pairs
    assert out["modality_grad_norms"].shape == (4,) and np.all(out["modality_grad_norms"] > 0)
    expected = 5 if name.endswith("m1") else 15
    assert trainer.amortized_gmd.weights.shape == (expected,)


@pytest.mark.slow
def test_amortized_smoke_through_nnunetv2_train(tiny_nnunet):
    ws = tiny_nnunet
    run_tool(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", AMORTIZED_SMOKE, "-device", "cpu"],
             ws.env(NNUNET_GMD_FINAL_VALIDATION="0"), timeout=900)
    fold = ws.model_folder(AMORTIZED_SMOKE) / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = ckpt["nnunet_gmd_state"]["amortized_gmd"]
    assert state["step"] == 6 and state["interval"] == 4 and len(state["weights"]) == 15
    conflicts = ckpt["logging"]["gmd_conflicting_pairs"]
    assert len(conflicts) == 2 and all(np.isfinite(conflicts))  # refreshes at steps 0 and 4, one per epoch
    assert (fold / "gmd_progress.png").stat().st_size > 1000
