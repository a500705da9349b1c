"""Our nnU-Net trainers, in-process on real nnU-Net objects and end to end through nnU-Net's own tools."""
import json

import numpy as np
import pytest
import torch

from nnunet_helpers import CONFIG, DATASET_ID, DATASET_NAME, GMD_SMOKE, GMD_SMOKE_FOLD, run_tool

from nnunet_gmd.networks import DSFeatureFusionUNet, DSUNet
from nnunet_gmd.subsets import all_subsets, subset_mask


def make_trainer(ws, name: str):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    pre = ws.preprocessed / DATASET_NAME
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8's run_training puts this into the plans dict
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = recursive_find_trainer_class_by_name(name)(plans, CONFIG, 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def random_batch(trainer, seed: int = 0) -> dict:
    """A batch shaped like nnU-Net's loader output: region targets at every deep-supervision scale."""
    gen = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, trainer.num_input_channels, *patch, generator=gen)
    scales = trainer._get_deep_supervision_scales()
    targets = []
    for scale in scales:
        shape = [int(round(p * s)) for p, s in zip(patch, scale)]
        targets.append(torch.randint(0, 2, (2, 3, *shape), generator=gen).float())
    return {"data": data, "target": targets}


def _first_conv_width(network) -> int:
    return network.encoder.stages[0].blocks[0].conv.out_channels


@pytest.mark.parametrize("name, width", [("nnUNetTrainerGMD", 1.0), ("nnUNetTrainerDS_W05", 0.5),
                                         ("nnUNetTrainerGMD_amortized_W1", 1.0), ("nnUNetTrainerGMD_smoke", 0.5),
                                         ("nnUNetTrainerDS_W1_smoke", 1.0), ("nnUNetTrainerDS_FF_MV_W1", 1.0),
                                         ("nnUNetTrainerDS_FF_W1", 1.0), ("nnUNetTrainerGMD_k5_FF", 1.0),
                                         ("nnUNetTrainerGMD_k5_FF_MV_W1", 1.0)])
def test_training_records_its_width_and_fusion_in_the_plans_the_predictor_rebuilds_from(nnunet_paths, monkeypatch,
                                                                                       tmp_path, name, width):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_gmd.nnunet.network import FUSION_KEY, WIDTH_KEY

    monkeypatch.setenv("nnUNet_results", str(tmp_path))  # a fresh output folder (nnU-Net reads it when used)
    trainer = make_trainer(nnunet_paths, name)
    planned = trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"]
    assert isinstance(trainer.network, DSFeatureFusionUNet if "_FF" in name else DSUNet)
    assert trainer.network.num_modalities == 4
    assert _first_conv_width(trainer.network) == round(planned[0] * width)
    recorded = trainer.plans_manager.plans["configurations"][CONFIG]  # what plans.json will hold
    assert recorded[WIDTH_KEY] == width and recorded[FUSION_KEY] == type(trainer).fusion
    # the predictor: the saved plans, deep supervision off, a strict load
    saved = PlansManager(json.loads(json.dumps(trainer.plans_manager.plans)))
    rebuilt = type(trainer).build_network_architecture(saved, saved.get_configuration(CONFIG), 4, 3, False)
    rebuilt.load_state_dict(trainer.network.state_dict(), strict=True)


@pytest.mark.parametrize("name, width", [("nnUNetTrainerGMD", 0.5), ("nnUNetTrainerDS", 0.5),
                                         ("nnUNetTrainerDS_W1", 1.0), ("nnUNetTrainerGMD_FF", 0.5)])
def test_a_model_folder_without_a_recorded_width_rebuilds_at_the_legacy_width(nnunet_paths, name, width):
    """plans.json of a model trained before widths were recorded: the width the class had then."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = recursive_find_trainer_class_by_name(name)
    plans = PlansManager(str(nnunet_paths.preprocessed / DATASET_NAME / "nnUNetPlans.json"))
    cm = plans.get_configuration(CONFIG)
    with_ds = trainer_class.build_network_architecture(plans, cm, 4, 3, True)
    without = trainer_class.build_network_architecture(plans, cm, 4, 3, False)
    assert _first_conv_width(with_ds) == round(cm.network_arch_init_kwargs["features_per_stage"][0] * width)
    without.load_state_dict(with_ds.state_dict(), strict=True)


@pytest.mark.parametrize("name, fusion", [("nnUNetTrainerDS_FF", "mean"), ("nnUNetTrainerGMD_FF", "mean"),
                                          ("nnUNetTrainerGMD_k5_FF", "mean"), ("nnUNetTrainerDS_FF_W1", "mean"),
                                          ("nnUNetTrainerDS_FF_smoke", "mean"), ("nnUNetTrainerDS_FF_MV", "mean_var"),
                                          ("nnUNetTrainerDS_FF_MV_W1", "mean_var"),
                                          ("nnUNetTrainerGMD_k5_FF_MV_W1", "mean_var")])
def test_a_model_folder_without_a_recorded_fusion_rebuilds_with_the_fusion_it_was_trained_with(nnunet_paths, name,
                                                                                               fusion):
    """plans.json of a model trained before fusions were recorded: the fusion the class had then (the plain
    mean for the ``_FF`` defaults, which fuse mean and variance since run 10)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = recursive_find_trainer_class_by_name(name)
    plans = PlansManager(str(nnunet_paths.preprocessed / DATASET_NAME / "nnUNetPlans.json"))
    network = trainer_class.build_network_architecture(plans, plans.get_configuration(CONFIG), 4, 3, False)
    assert isinstance(network, DSFeatureFusionUNet) and network.fusion == fusion


def test_a_new_fold_or_resume_keeps_the_width_and_fusion_of_the_folder_it_joins(nnunet_paths, monkeypatch, tmp_path):
    """Another fold (or ``--c``) in a folder of an older training must match its weights and its one plans.json."""
    from nnunet_gmd.errors import UserError
    from nnunet_gmd.nnunet.network import FUSION_KEY, WIDTH_KEY

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = json.loads((nnunet_paths.preprocessed / DATASET_NAME / "nnUNetPlans.json").read_text())
    folder = tmp_path / DATASET_NAME / f"nnUNetTrainerDS__{plans['plans_name']}__{CONFIG}"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))  # an old training's: no width recorded
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerDS")
    assert trainer.plans_manager.plans["configurations"][CONFIG][WIDTH_KEY] == 0.5
    planned = trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"]
    assert _first_conv_width(trainer.network) == round(planned[0] * 0.5)

    # a DS-FF folder from before fusions were recorded: the plain mean it was trained with, not today's mean + var
    ff_folder = tmp_path / DATASET_NAME / f"nnUNetTrainerDS_FF__{plans['plans_name']}__{CONFIG}"
    ff_folder.mkdir(parents=True)
    (ff_folder / "plans.json").write_text(json.dumps(plans))
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerDS_FF")
    assert trainer.plans_manager.plans["configurations"][CONFIG][FUSION_KEY] == "mean"
    assert trainer.network.fusion == "mean" and _first_conv_width(trainer.network) == round(planned[0] * 0.5)
    plans["configurations"][CONFIG][FUSION_KEY] = "median"
    (ff_folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(UserError, match=rf"plans.json: plans key {FUSION_KEY} must be one of logits, .*'median'"):
        make_trainer(nnunet_paths, "nnUNetTrainerDS_FF")
    del plans["configurations"][CONFIG][FUSION_KEY]

    plans["configurations"][CONFIG][WIDTH_KEY] = "wide"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(UserError, match=rf"plans.json: plans key {WIDTH_KEY} must be a number"):
        make_trainer(nnunet_paths, "nnUNetTrainerDS")
    (folder / "plans.json").write_text("{not json")
    with pytest.raises(UserError, match=r"plans.json: cannot read its configurations"):
        make_trainer(nnunet_paths, "nnUNetTrainerDS")


def test_gmd_train_step_optimises_the_mean_subset_loss_with_statistics(nnunet_paths):
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerGMD")
    batch = random_batch(trainer)
    net = trainer.network
    before = [p.detach().clone() for p in net.parameters()]

    expected = [float(trainer.loss(net(batch["data"], subset_mask(s, 4)), batch["target"])) for s in all_subsets(4)]
    out = trainer.train_step(batch)
    assert out["loss"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert out["modality_grad_norms"].shape == (4,) and np.all(out["modality_grad_norms"] > 0)
    assert 0 <= out["conflicts"] <= 105
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters() if p.grad is not None))
    assert total <= 12 + 1e-4  # clipped after the merge


def test_ds_trainer_gradient_is_that_of_the_mean_subset_loss(nnunet_paths):
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerDS")
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.0)  # keep weights for the check
    batch = random_batch(trainer, seed=1)
    net = trainer.network
    trainer.train_step(batch)
    got = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    loss = torch.stack([trainer.loss(net(batch["data"], subset_mask(s, 4)), batch["target"])
                        for s in all_subsets(4)]).mean()
    loss.backward()
    want = [p.grad for p in net.parameters()]
    scale = min(1.0, 12 / float(torch.sqrt(sum((g ** 2).sum() for g in want if g is not None))))
    assert sum(g is not None for g in got) > 0.9 * len(got)
    for g, w in zip(got, want):
        if w is None:   # e.g. the 0-weighted lowest deep-supervision head: zero, as on the exact GMD path
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w * scale, rtol=1e-4, atol=1e-7)


def test_k5_trainer_draws_five_subsets(nnunet_paths):
    trainer = make_trainer(nnunet_paths, "nnUNetTrainerGMD_k5")
    draws = [trainer.subset_sampler.sample() for _ in range(10)]
    assert all(len(d) == 5 for d in draws) and len({tuple(d) for d in draws}) > 1


@pytest.mark.slow
def test_train_resume_and_find_best_configuration_through_nnunet_tools(tiny_nnunet, trained_gmd_smoke):
    """Reuses the session's ``nnUNetv2_train -tr nnUNetTrainerGMD_smoke`` run (2 epochs), then resumes it."""
    import shutil

    ws = tiny_nnunet
    # resume a copy (as fold 2), so the session's trained model stays as other tests expect it
    resume_fold = 2
    fold = trained_gmd_smoke / f"fold_{resume_fold}"
    shutil.rmtree(fold, ignore_errors=True)
    shutil.copytree(trained_gmd_smoke / f"fold_{GMD_SMOKE_FOLD}", fold)
    first = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    done = first["current_epoch"]
    assert done >= 2
    assert len(first["logging"]["gmd_conflicting_pairs"]) == done
    assert all(len(norms) == 4 for norms in first["logging"]["gmd_modality_grad_norms"])
    assert "subset_sampler" in first["nnunet_gmd_state"] and "gmd_generator" in first["nnunet_gmd_state"]
    assert (fold / "gmd_progress.png").stat().st_size > 1000 and (fold / "progress.png").is_file()
    from nnunet_gmd.nnunet.network import WIDTH_KEY
    saved_plans = json.loads((trained_gmd_smoke / "plans.json").read_text())  # what nnUNetv2_predict rebuilds from
    assert saved_plans["configurations"][CONFIG][WIDTH_KEY] == 0.5  # smoke variants train at half width

    train = ["nnUNetv2_train", str(DATASET_ID), CONFIG, str(resume_fold), "-tr", GMD_SMOKE, "-device", "cpu", "--c"]
    proc = run_tool(train, ws.env(NNUNET_GMD_NUM_EPOCHS=str(done + 1), NNUNET_GMD_FINAL_VALIDATION="1"), timeout=900)
    assert f"Epoch {done}" in proc.stdout and "Epoch 0\n" not in proc.stdout
    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == done + 1
    assert len(resumed["logging"]["gmd_conflicting_pairs"]) == done + 1
    key = "encoder.stages.0.blocks.0.conv.weight"
    assert not torch.equal(resumed["network_weights"][key], first["network_weights"][key])
    assert not list(fold.glob("*.tmp"))

    run_tool(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", CONFIG, "-tr", GMD_SMOKE,
              "-f", str(resume_fold), "-np", "1"], ws.env(), timeout=600)
    inference = ws.results / DATASET_NAME / "inference_information.json"
    assert GMD_SMOKE in inference.read_text()


@pytest.mark.parametrize("name", ["nnUNetTrainerGMD", "nnUNetTrainerModalityDropout"])
def test_initial_lr_environment_override_reaches_the_optimizer(nnunet_paths, monkeypatch, name):
    monkeypatch.setenv("NNUNET_GMD_INITIAL_LR", "0.003")
    trainer = make_trainer(nnunet_paths, name)
    optimizer, _ = trainer.configure_optimizers()
    assert trainer.initial_lr == pytest.approx(3e-3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)


@pytest.mark.parametrize("name, optimizer_type, peak_lr", [
    ("nnUNetTrainerBudget_AdamW", torch.optim.AdamW, 1e-3),
    ("nnUNetTrainerModalityDropout_AdamW", torch.optim.AdamW, 1e-3),
    ("nnUNetTrainerDS_SGD", torch.optim.SGD, 1e-2),
])
def test_optimiser_study_trainers_build_the_other_optimiser(nnunet_paths, name, optimizer_type, peak_lr):
    trainer = make_trainer(nnunet_paths, name)
    assert isinstance(trainer.optimizer, optimizer_type) and trainer.initial_lr == pytest.approx(peak_lr)
    trainer.lr_scheduler.step(0)   # what nnU-Net's on_train_epoch_start does
    first = trainer.optimizer.param_groups[0]["lr"]
    if optimizer_type is torch.optim.SGD:
        assert trainer.optimizer.param_groups[0]["momentum"] == 0.99
        warmup = trainer.lr_scheduler.warmup_steps
        assert warmup == max(1, round(0.1 * trainer.num_epochs)) and first == pytest.approx(peak_lr / warmup)
        trainer.lr_scheduler.step(warmup)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak_lr)
    else:
        assert first == pytest.approx(peak_lr)
    out = trainer.train_step(random_batch(trainer, seed=3))
    assert np.isfinite(float(out["loss"]))


def test_num_threads_environment_override_sets_torch_threads(nnunet_paths, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("NNUNET_GMD_NUM_THREADS", "1")
    try:
        torch.set_num_threads(2)
        make_trainer(nnunet_paths, "nnUNetTrainerBudget")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_feature_fusion_network_is_built_from_the_plans_and_loads_strictly(nnunet_paths):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_gmd.nnunet.trainers import nnUNetTrainerGMD_FF

    pre = nnunet_paths.preprocessed / DATASET_NAME
    plans = PlansManager(str(pre / "nnUNetPlans.json"))
    cm = plans.get_configuration(CONFIG)
    with_ds = nnUNetTrainerGMD_FF.build_network_architecture(plans, cm, 4, 3, True)
    without = nnUNetTrainerGMD_FF.build_network_architecture(plans, cm, 4, 3, False)
    assert isinstance(with_ds, DSFeatureFusionUNet)
    assert with_ds.fusion == "mean"  # plans without a recorded fusion: a model from before mean + var
    without.load_state_dict(with_ds.state_dict(), strict=True)  # the predictor's strict load


@pytest.mark.parametrize("name, fusion", [("nnUNetTrainerGMD_FF", "mean_var"), ("nnUNetTrainerDS_FF", "mean_var"),
                                          ("nnUNetTrainerDS_FF_W1", "mean"),
                                          ("nnUNetTrainerDS_FF_ATT", "attention_var")])
def test_feature_fusion_train_step_optimises_the_mean_subset_loss(nnunet_paths, name, fusion):
    trainer = make_trainer(nnunet_paths, name)
    assert isinstance(trainer.network, DSFeatureFusionUNet)
    assert trainer.network.fusion == fusion
    batch = random_batch(trainer, seed=2)
    net = trainer.network
    before = [p.detach().clone() for p in net.parameters()]
    # the subsets this step will draw (DS_FF samples 5, the full set among them; GMD_FF takes all 15)
    state = trainer.subset_sampler.state_dict()
    subsets = trainer.subset_sampler.sample()
    trainer.subset_sampler.load_state_dict(state)
    assert len(subsets) == (15 if name == "nnUNetTrainerGMD_FF" else 5) and (0, 1, 2, 3) in subsets
    expected = [float(trainer.loss(net(batch["data"], subset_mask(s, 4)), batch["target"])) for s in subsets]
    out = trainer.train_step(batch)
    assert float(out["loss"]) == pytest.approx(np.mean(expected), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("name", ["nnUNetTrainerDS_FF_KD", "nnUNetTrainerDS_FF_ATT_KD"])
def test_self_distillation_step_adds_the_soft_target_loss_towards_the_detached_full_set(nnunet_paths, name):
    from nnunet_gmd.distillation import soft_target_loss

    trainer = make_trainer(nnunet_paths, name)
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.0)  # keep weights for the check
    batch = random_batch(trainer, seed=3)
    net = trainer.network
    state = trainer.subset_sampler.state_dict()
    subsets = trainer._step_subsets(None)
    trainer.subset_sampler.load_state_dict(state)
    full = (0, 1, 2, 3)
    assert subsets[0] == full and len(subsets) == 5   # the teacher is decoded first
    assert trainer.label_manager.has_regions and trainer.distill_weight == 0.5
    out = trainer.train_step(batch)
    got = [None if p.grad is None else p.grad.clone() for p in net.parameters()]

    net.zero_grad(set_to_none=True)
    outputs = {s: net(batch["data"], subset_mask(s, 4)) for s in subsets}
    teacher = outputs[full][0].detach()
    losses = [trainer.loss(outputs[s], batch["target"])
              + (0.0 if s == full else 0.5 * soft_target_loss(outputs[s][0], teacher, regions=True))
              for s in subsets]
    total = torch.stack(losses).mean()
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-5)
    plain = np.mean([float(trainer.loss(outputs[s], batch["target"])) for s in subsets])
    assert float(out["loss"]) > plain + 1e-3   # the term is really there
    total.backward()
    want = [p.grad for p in net.parameters()]
    scale = min(1.0, 12 / float(torch.sqrt(sum((g ** 2).sum() for g in want if g is not None))))
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w * scale, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["nnUNetTrainerBudget", "nnUNetTrainerGMD"])
def test_checkpoint_latest_every_epoch_written_atomically(nnunet_paths, tmp_path, name):
    trainer = make_trainer(nnunet_paths, name)
    assert trainer.save_every == 1  # nnU-Net's on_epoch_end then writes checkpoint_latest every epoch
    target = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(target))
    assert not list(tmp_path.glob("*.tmp"))
    saved = torch.load(target, map_location="cpu", weights_only=False)
    assert saved["trainer_name"] == name and "network_weights" in saved


@pytest.mark.parametrize("name", ["nnUNetTrainerGMD_k5", "nnUNetTrainerModalityDropout"])
def test_seed_variable_repeats_and_varies_initial_weights_and_our_generators(nnunet_paths, monkeypatch, name):
    """``NNUNET_GMD_SEED`` (set by ``--seeds``): one seed gives the same start, another seed a different one."""
    def start(seed: int):
        monkeypatch.setenv("NNUNET_GMD_SEED", str(seed))
        trainer = make_trainer(nnunet_paths, name)
        weights = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
        generator = trainer.subset_sampler.generator if hasattr(trainer, "subset_sampler") \
            else trainer.dropout_generator
        return weights, generator.initial_seed()

    (w1, g1), (w1_again, g1_again), (w2, g2) = start(1), start(1), start(2)
    assert torch.equal(w1, w1_again) and g1 == g1_again
    assert not torch.equal(w1, w2) and g2 - g1 == 1000
    base = 1234 if name.startswith("nnUNetTrainerGMD") else 12345       # seed 0 keeps the historical seeds
    assert start(0)[1] == base


@pytest.mark.parametrize("name", ["nnUNetTrainerGMD_LW", "nnUNetTrainerDS_LW"])
def test_learned_fusion_weights_are_built_from_the_plans_load_strictly_and_learn(nnunet_paths, name):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_gmd.nnunet import trainers
    from nnunet_gmd.nnunet.network import network_spec

    cls = getattr(trainers, name)
    plans = PlansManager(str(nnunet_paths.preprocessed / DATASET_NAME / "nnUNetPlans.json"))
    cm = plans.get_configuration(CONFIG)
    with_ds = cls.build_network_architecture(plans, cm, 4, 3, True)
    without = cls.build_network_architecture(plans, cm, 4, 3, False)
    assert with_ds.learned_fusion and network_spec(with_ds).kwargs["learned_fusion"] is True  # export-bundle
    without.load_state_dict(with_ds.state_dict(), strict=True)  # the predictor's strict load

    trainer = make_trainer(nnunet_paths, name)
    net = trainer.network
    batch = random_batch(trainer, seed=3)
    expected = np.mean([float(trainer.loss(net(batch["data"], subset_mask(s, 4)), batch["target"]))
                        for s in all_subsets(4)])
    out = trainer.train_step(batch)
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)
    moved = [not torch.equal(f.weight, torch.zeros_like(f.weight)) for f in net.fusion_weights]
    assert all(moved), "every modality's fusion weights get a gradient from the subsets that contain it"
