"""Unit tests of the MONAI glue (nnunet_gmd.monai): case lists, availability transforms, the masked
sliding-window inferer, the GMD iteration update inside a real SupervisedTrainer, and the report."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import PrepareBatchExtraInput
from monai.losses import DiceFocalLoss
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses, LoadImaged

from nnunet_gmd.gmd import ds_gmd_backward
from nnunet_gmd.monai import (MODALITIES, ApplySubsetd, AvailabilitySlidingWindowInferer, CaseListError,
                              GMDIterationUpdate, MissingModalityReport, PolyLRHandler, RegionsToBratsLabelsd,
                              StackModalitiesd, expand_subsets, load_cases, split_train_val)
from nnunet_gmd.monai.gmd_update import CONFLICTS_KEY, training_scalars
from nnunet_gmd.monai.io import case_name_formatter
from nnunet_gmd.report import check_comparable, load_report
from nnunet_gmd.networks import DSFeatureFusionUNet, DSUNet
from nnunet_gmd.subsets import SubsetSampler, all_subsets

BUNDLE = Path(__file__).resolve().parents[1] / "monai_bundle"
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def tiny_net(seed: int = 0, network_class=DSUNet) -> DSUNet:
    torch.manual_seed(seed)
    return network_class(4, 2, [4, 8], torch.nn.Conv3d, 3, [1, 2], 1, 3, 1, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def write_case(root: Path, name: str, modalities=MODALITIES, shape=(8, 8, 8), seed: int = 0, label=True) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    for m in modalities:
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32) + 0.1, AFFINE), folder / f"{name}_{m}.nii.gz")
    if label:
        seg = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=shape)
        nib.save(nib.Nifti1Image(seg, AFFINE), folder / f"{name}_seg.nii.gz")
    return folder


# ----------------------------------------------------------------------------------------------- case lists
def test_folder_scan_keeps_cases_with_absent_sequences(tmp_path):
    write_case(tmp_path, "A")
    write_case(tmp_path, "B", modalities=("t1ce", "flair"), label=False)
    (tmp_path / ".hidden").mkdir()
    cases = load_cases(tmp_path)
    assert [c["case"] for c in cases] == ["A", "B"]
    assert set(cases[0]) == {"case", *MODALITIES, "label"}
    assert set(cases[1]) == {"case", "t1ce", "flair"}
    assert cases[1]["flair"].endswith("B/B_flair.nii.gz")


def test_case_without_any_sequence_is_an_error_naming_it(tmp_path):
    write_case(tmp_path, "A")
    (tmp_path / "Empty").mkdir()
    with pytest.raises(CaseListError, match="'Empty' has none of the sequences"):
        load_cases(tmp_path)
    with pytest.raises(CaseListError, match="holds no case folders"):
        load_cases(tmp_path / "Empty")
    with pytest.raises(CaseListError, match="is not a folder"):
        load_cases(tmp_path / "nowhere")


def test_training_requirements_name_the_case(tmp_path):
    write_case(tmp_path, "A")
    write_case(tmp_path, "B", modalities=("t1", "t1ce", "t2"))
    with pytest.raises(CaseListError, match="'B' lacks flair"):
        load_cases(tmp_path, require_all=True)
    write_case(tmp_path / "x", "C", label=False)
    with pytest.raises(CaseListError, match="'C' has no label"):
        load_cases(tmp_path / "x", require_label=True)


def test_datalist_json_relative_paths_absent_files_and_case_names(tmp_path, caplog):
    write_case(tmp_path, "A")
    datalist = {"testing": [
        {"t1": "A/A_t1.nii.gz", "flair": "A/A_flair.nii.gz", "t2": "A/does_not_exist.nii.gz", "t1ce": None},
        {"case": "other", "t1ce": str(tmp_path / "A" / "A_t1ce.nii.gz")},
    ]}
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    cases = load_cases(tmp_path, tmp_path / "list.json", key="testing")
    assert cases[0]["case"] == "A"
    assert set(cases[0]) == {"case", "t1", "flair"}  # missing file and null both count as absent
    assert Path(cases[0]["t1"]).is_file()
    assert "does_not_exist" in caplog.text
    assert cases[1]["case"] == "other"
    with pytest.raises(CaseListError, match="no 'training' list"):
        load_cases(tmp_path, tmp_path / "list.json", key="training")
    (tmp_path / "dup.json").write_text(json.dumps([{"case": "x", "t1": "A/A_t1.nii.gz"}] * 2))
    with pytest.raises(CaseListError, match="appears twice"):
        load_cases(tmp_path, tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CaseListError, match="not valid JSON"):
        load_cases(tmp_path, tmp_path / "bad.json")


def test_split_and_subset_expansion():
    cases = [{"case": str(i), **{m: f"{i}{m}" for m in MODALITIES}} for i in range(5)]
    train, val = split_train_val(cases, 0.2)
    assert [c["case"] for c in val] == ["4"] and len(train) == 4
    with pytest.raises(CaseListError, match="at least 2"):
        split_train_val(cases[:1])
    expanded = expand_subsets(cases[:2])
    assert len(expanded) == 30
    assert [e["subset"] for e in expanded[:3]] == ["t1", "t1", "t1ce"]
    assert expanded[-1]["subset"] == "t1+t1ce+t2+flair"
    incomplete = expand_subsets([{"case": "x", "t1": "a", "t1ce": "b", "flair": "c"}])
    assert len(incomplete) == 7 and all("t2" not in e["subset"].split("+") for e in incomplete)
    with pytest.raises(CaseListError, match="lacks t2"):
        expand_subsets([{"case": "x", "t1": "a", "t1ce": "b", "flair": "c"}], require_all=True)


# ----------------------------------------------------------------------------------------------- transforms
def test_stack_modalities_zero_fills_and_masks(tmp_path):
    write_case(tmp_path, "A", modalities=("t1", "flair"))
    case = load_cases(tmp_path)[0]
    loaded = LoadImaged(keys=list(MODALITIES), allow_missing_keys=True, image_only=True,
                        ensure_channel_first=True)(case)
    out = StackModalitiesd()(loaded)
    image, mask = out["image"], out["available"]
    assert image.shape == (4, 8, 8, 8) and image.dtype == torch.float32
    assert mask.tolist() == [True, False, False, True]
    assert torch.all(image[1] == 0) and torch.all(image[2] == 0)
    expected = nib.load(tmp_path / "A" / "A_flair.nii.gz").get_fdata()
    assert np.allclose(image[3].numpy(), expected)
    assert image.meta["case"] == "A" and np.allclose(image.affine.numpy(), AFFINE)
    assert not any(m in out for m in MODALITIES)


def test_stack_modalities_rejects_mismatched_grids(tmp_path):
    write_case(tmp_path, "A", modalities=("t1",))
    nib.save(nib.Nifti1Image(np.ones((8, 8, 9), np.float32), AFFINE), tmp_path / "A" / "A_t2.nii.gz")
    case = load_cases(tmp_path)[0]
    loaded = LoadImaged(keys=list(MODALITIES), allow_missing_keys=True, image_only=True,
                        ensure_channel_first=True)(case)
    with pytest.raises(CaseListError, match=r"case 'A': t2 \(.*A_t2.nii.gz\) has shape \(8, 8, 9\)"):
        StackModalitiesd()(loaded)
    with pytest.raises(CaseListError, match="none of the sequences"):
        StackModalitiesd()({"case": "Z"})


def test_nan_voxels_are_refused_naming_the_file_in_both_integrations(tmp_path):
    """MONAI used to give an empty mask for a NaN voxel; both paths now refuse with the same words."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_gmd.errors import UserError
    from nnunet_gmd.nifti import nifti_problem
    from nnunet_gmd.nnunet.cases import CaseFiles, check_case

    write_case(tmp_path, "A", modalities=("t1", "flair"))
    flair = tmp_path / "A" / "A_flair.nii.gz"
    data = nib.load(flair).get_fdata().astype(np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, AFFINE), flair)
    loaded = LoadImaged(keys=list(MODALITIES), allow_missing_keys=True, image_only=True,
                        ensure_channel_first=True)(load_cases(tmp_path)[0])
    with pytest.raises(CaseListError, match=r"case 'A': cannot use flair \(.*A_flair.nii.gz\) \(contains 1 NaN or infinite voxel"):
        StackModalitiesd()(loaded)
    with pytest.raises(UserError, match=r"case A: cannot use A_flair.nii.gz \(contains 1 NaN or infinite voxel\(s\)\)"):
        check_case(CaseFiles("A", {0: tmp_path / "A" / "A_t1.nii.gz", 3: flair}), SimpleITKIO())
    assert nifti_problem(flair) is None
    assert nifti_problem(flair, check_finite=True) == "contains 1 NaN or infinite voxel(s)"


def test_label_maps_outside_brats_labels_are_refused_naming_the_file():
    from nnunet_gmd.monai import CheckBratsLabelsd

    ok = MetaTensor(torch.tensor([[[[0, 1], [2, 4]]]]), meta={"filename_or_obj": "/d/A/A_seg.nii.gz"})
    assert CheckBratsLabelsd()({"case": "A", "label": ok})["label"] is ok
    brats2023 = MetaTensor(torch.tensor([[[[0, 1], [2, 3]]]]), meta={"filename_or_obj": "/d/B/B_seg.nii.gz"})
    with pytest.raises(CaseListError, match=r"case 'B': label \(/d/B/B_seg.nii.gz\) has label values \[0, 1, 2, 3\]; "
                                            r"expected BraTS labels 0/1/2/4 \(3 is BraTS 2023"):
        CheckBratsLabelsd()({"case": "B", "label": brats2023})


def test_apply_subset_zeroes_and_narrows_the_mask():
    image = MetaTensor(torch.ones(4, 2, 2, 2))
    out = ApplySubsetd()({"case": "c", "image": image, "available": torch.ones(4, dtype=torch.bool),
                          "subset": "t1ce+flair"})
    assert out["available"].tolist() == [False, True, False, True]
    assert out["image"][[0, 2]].abs().sum() == 0 and out["image"][[1, 3]].min() == 1
    assert image.min() == 1  # input untouched
    with pytest.raises(CaseListError, match="needs t2"):
        ApplySubsetd()({"case": "c", "image": image, "available": torch.tensor([1, 1, 0, 1]).bool(), "subset": "t2"})
    with pytest.raises(CaseListError, match="modality names"):
        ApplySubsetd()({"case": "c", "image": image, "available": torch.ones(4).bool(), "subset": "pd"})


def test_regions_to_brats_labels_inverts_monai_region_conversion():
    rng = np.random.default_rng(0)
    labels = torch.as_tensor(rng.choice(np.array([0, 1, 2, 4]), size=(1, 6, 6, 6)))
    regions = ConvertToMultiChannelBasedOnBratsClasses()(labels).float()  # TC, WT, ET
    back = RegionsToBratsLabelsd(keys="pred")({"pred": MetaTensor(regions)})["pred"]
    assert back.dtype == torch.uint8 and back.shape == (1, 6, 6, 6)
    assert torch.equal(back.as_tensor().long(), labels.long())
    # nnU-Net's channel order needs saying so; the same maps in WT/TC/ET order give the same labels
    back2 = RegionsToBratsLabelsd(keys="pred", region_keys=("wt", "tc", "et"))({"pred": regions[[1, 0, 2]]})["pred"]
    assert torch.equal(back2.long(), labels.long())
    with pytest.raises(ValueError, match="region channels"):
        RegionsToBratsLabelsd(keys="pred")({"pred": regions[:2]})


def test_case_name_formatter():
    assert case_name_formatter({"case": "Brats18_x", "filename_or_obj": "/a/b_t1.nii.gz"}, None)["subject"] == "Brats18_x"
    assert case_name_formatter({"filename_or_obj": "/a/b_t1.nii.gz"}, None)["subject"] == "/a/b_t1.nii.gz"


# ----------------------------------------------------------------------------------------------- inferer
def test_masked_sliding_window_matches_per_case_network_calls():
    net = tiny_net().eval()
    x = torch.randn(2, 4, 12, 12, 12)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    inferer = AvailabilitySlidingWindowInferer(roi_size=(12, 12, 12), sw_batch_size=2)
    with torch.no_grad():
        out = inferer(x, net, available=mask)
        expected = torch.cat([net(x[b:b + 1], mask[b]) for b in range(2)])
        assert torch.allclose(out, expected, atol=1e-5)
        x2 = x.clone()
        x2[0, 1] = 1e3  # an absent branch's values must not reach the output
        x2[1, :3] = -7.0
        assert torch.allclose(inferer(x2, net, available=mask), out, atol=1e-5)
        windows = AvailabilitySlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=3, overlap=0.5)
        assert windows(x, net, available=mask).shape == (2, 3, 12, 12, 12)
        assert not torch.allclose(inferer(x, net), out, atol=1e-3)  # no mask = all branches


# ----------------------------------------------------------------------------------------------- GMD update
def _trainer(update: GMDIterationUpdate, net: DSUNet, n_iter: int = 2, lr: float = 0.01, seed: int = 0,
             max_epochs: int = 1):
    g = torch.Generator().manual_seed(seed)
    data = [{"image": torch.randn(4, 8, 8, 8, generator=g),
             "label": (torch.rand(3, 8, 8, 8, generator=g) > 0.7).float(),
             "available": torch.ones(4, dtype=torch.bool)} for _ in range(n_iter)]
    loader = DataLoader(Dataset(data), batch_size=1, shuffle=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=net,
                                optimizer=optimizer, loss_function=DiceFocalLoss(sigmoid=True, gamma=0.0),
                                prepare_batch=PrepareBatchExtraInput({"available": "available"}),
                                iteration_update=update)
    return trainer, data


@pytest.mark.parametrize("network_class", [DSUNet, DSFeatureFusionUNet])
def test_gmd_update_applies_exactly_the_gmd_gradient_over_all_subsets(network_class):
    net = tiny_net(network_class=network_class)
    reference = tiny_net(network_class=network_class)
    update = GMDIterationUpdate(subsets_per_step=None, max_grad_norm=None, seed=3)
    trainer, data = _trainer(update, net, n_iter=1, lr=0.1)
    trainer.run()
    output = trainer.state.output[0]  # decollated
    assert output[CONFLICTS_KEY] >= 0 and output["gmd_num_subsets"] == 15
    assert np.isfinite(float(output["loss"]))
    scalars = training_scalars(trainer.state.output)
    assert set(scalars) == {"train_loss", "gmd_conflicting_pairs", "gmd_conflict_fraction"}
    # the same step by hand: ds_gmd_backward with the same projection-order generator, then SGD
    gen = torch.Generator().manual_seed(4)
    loss = DiceFocalLoss(sigmoid=True, gamma=0.0)
    x, y = data[0]["image"][None], data[0]["label"][None]
    stats = ds_gmd_backward(reference, x, all_subsets(4), lambda out, s: loss(out, y).mean(), generator=gen)
    assert stats.num_conflicts == output[CONFLICTS_KEY]
    for (name, p), q in zip(reference.named_parameters(), net.parameters()):
        expected = p.detach() - 0.1 * p.grad if p.grad is not None else p.detach()
        assert torch.allclose(q.detach(), expected, atol=1e-6), name


@pytest.mark.parametrize("method", ["gmd", "mean"])
def test_gmd_update_a_null_sequence_contributes_nothing(method):
    """A training case without T1ce (issue 11): noise in its zero-filled channel leaves the step unchanged."""
    def step(noise: bool, with_mask: bool = True) -> list[torch.Tensor]:
        net = tiny_net()
        g = torch.Generator().manual_seed(5)
        image = torch.randn(2, 4, 8, 8, 8, generator=g)
        label = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.7).float()
        available = torch.tensor([[True, False, True, True], [True, True, True, True]])
        if noise:
            image[0, 1] = 30 * torch.randn(8, 8, 8, generator=g)
        data = [{"image": image[i], "label": label[i], "available": available[i] if with_mask else torch.ones(4).bool()}
                for i in range(2)]
        loader = DataLoader(Dataset(data), batch_size=2, shuffle=False)
        trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
                                    optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                    loss_function=DiceFocalLoss(sigmoid=True, gamma=0.0),
                                    prepare_batch=PrepareBatchExtraInput({"available": "available"}),
                                    iteration_update=GMDIterationUpdate(subsets_per_step=None, method=method, seed=3))
        trainer.run()
        return [p.detach().clone() for p in net.parameters()]

    clean, noisy = step(noise=False), step(noise=True)
    for a, b in zip(clean, noisy):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(clean, step(noise=True, with_mask=False)))


def test_gmd_update_refuses_extra_inputs_it_cannot_pass_to_the_branches():
    net = tiny_net()
    data = [{"image": torch.randn(4, 8, 8, 8), "label": torch.zeros(3, 8, 8, 8), "spacing": torch.ones(3)}]
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(Dataset(data)),
                                network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                loss_function=DiceFocalLoss(sigmoid=True), iteration_update=GMDIterationUpdate(),
                                prepare_batch=PrepareBatchExtraInput({"spacing": "spacing"}))
    with pytest.raises(Exception) as info:
        trainer.run()
    assert "extra network inputs ['spacing'] are not supported" in str(info.value) + str(info.value.__cause__)


def test_gmd_update_k_subsets_mean_method_and_resumable_state():
    update = GMDIterationUpdate(subsets_per_step=3, include_full=True, seed=7)
    expected = SubsetSampler(4, k=3, include_full=True, seed=7)
    first = [expected.sample() for _ in range(2)]
    trainer, _ = _trainer(update, tiny_net(), n_iter=2)
    trainer.run()
    assert trainer.state.output[0]["gmd_num_subsets"] == 3
    assert update.sampler.sample() == (third := expected.sample())
    # resume: a fresh update loaded with a saved state continues the same draw sequence
    saved = GMDIterationUpdate(subsets_per_step=3, include_full=True, seed=7)
    [saved.sampler.sample() for _ in first]
    state = saved.state_dict()
    resumed = GMDIterationUpdate(subsets_per_step=3, include_full=True, seed=123)
    resumed.load_state_dict(state)
    assert resumed.sampler.sample() == third
    net = tiny_net()
    before = [p.detach().clone() for p in net.parameters()]
    trainer, _ = _trainer(GMDIterationUpdate(subsets_per_step=2, method="mean"), net, n_iter=1)
    trainer.run()
    assert trainer.state.output[0][CONFLICTS_KEY] == 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="method"):
        GMDIterationUpdate(method="pcgrad")


def test_poly_lr_handler_sets_the_rate_from_epoch_and_max_epochs():
    from ignite.engine import Events

    net = tiny_net()
    trainer, _ = _trainer(GMDIterationUpdate(subsets_per_step=1), net, n_iter=1, lr=123.0, max_epochs=3)
    PolyLRHandler(trainer.optimizer, initial_lr=0.5).attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.optimizer.param_groups[0]["lr"]))
    trainer.run()
    assert seen == pytest.approx([0.5, 0.5 * (2 / 3) ** 0.9, 0.5 * (1 / 3) ** 0.9])


# ----------------------------------------------------------------------------------------------- report
def test_report_dice_values_schema_and_order(tmp_path):
    report = MissingModalityReport(tmp_path / "out", trainer="T", dataset="D")
    label = torch.zeros(3, 4, 4, 4)
    label[:, :2] = 1  # 32 voxels per region
    pred = torch.zeros(3, 4, 4, 4)
    pred[0, :1] = 1  # TC: 16 of 32 -> 2*16/(16+32)
    pred[1, :2] = 1  # WT: perfect
    assert report.add("t1+flair", "c1", pred, label) == pytest.approx([2 * 16 / 48, 1.0, 0.0])
    report.add("t1+flair", "c2", label.clone(), label)
    report.add("t1", "c1", torch.zeros(3, 4, 4, 4), torch.zeros(3, 4, 4, 4))  # both empty: 1 (BraTS)
    path = report.write()
    assert path == tmp_path / "out" / "missing_modality_report.json"
    assert {p.suffix for p in path.parent.iterdir()} == {".json", ".csv", ".md", ".png"}
    content = load_report(path)  # the nnU-Net path's reader accepts it
    assert content.trainer == "T" and content.dataset == "D" and content.channels == list(MODALITIES)
    assert content.regions == ["whole tumor", "tumor core", "enhancing tumor"] and content.cases == ["c1", "c2"]
    check_comparable([content, content], [path, path])
    assert [s.available for s in content.subsets] == [["t1"], ["t1", "flair"]]  # all_subsets order
    both = content.subsets[1].metrics
    assert list(both) == ["whole tumor", "tumor core", "enhancing tumor"]
    assert both["tumor core"]["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert both["enhancing tumor"]["dice"] == pytest.approx(0.5)
    # the number of cases behind each subset, in the field the nnU-Net report uses too (the same fields)
    assert [s.n_cases for s in content.subsets] == [1, 2]
    assert all(set(block) == {"dice"} for s in content.subsets for block in s.metrics.values())
    assert content.mean["tumor core"]["dice"] == pytest.approx((1 + (2 / 3 + 1) / 2) / 2)
    with pytest.raises(CaseListError, match="case 'c3'.*differs"):
        report.add("t1", "c3", pred, label[:, :2])


# ----------------------------------------------------------------------------------------------- bundle files
def test_bundle_configs_extend_one_common_config_and_metadata_declares_the_contract():
    common = json.loads((BUNDLE / "configs" / "common.json").read_text())
    configs = {n: json.loads((BUNDLE / "configs" / f"{n}.json").read_text()) for n in ("inference", "train", "evaluate")}
    for key in ("network_def", "network", "modalities", "region_keys", "network_features", "spacing", "device",
                "prepare_batch", "inferer"):
        assert key in common, key
        assert not any(key in c for c in configs.values()), f"{key} is redefined instead of taken from common.json"
    for name, config in configs.items():
        refs = json.dumps(config)
        assert "@network" in refs and "@prepare_batch" in refs and "@inferer" in refs, name
    # Training defaults of the nnU-Net DS trainers: nnU-Net's AdamW variant (amsgrad) at 1e-3 with the poly LR.
    train = configs["train"]
    assert train["optimizer"]["_target_"] == "torch.optim.AdamW" and train["optimizer"]["amsgrad"] is True
    assert train["learning_rate"] == 1e-3 and train["optimizer"]["lr"] == "@learning_rate"
    assert any(h["_target_"].endswith("PolyLRHandler") for h in train["train"]["handlers"])
    configs["inference"] = {**common, **configs["inference"]}
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert configs["inference"]["modalities"] == list(MODALITIES)
    assert {"fire", "pytorch-ignite", "nibabel"} <= set(meta["required_packages_version"])
    inputs, outputs = meta["network_data_format"]["inputs"], meta["network_data_format"]["outputs"]
    assert [v.lower() for v in inputs["image"]["channel_def"].values()] == list(MODALITIES)
    assert inputs["available"]["num_channels"] == 4 and inputs["available"]["dtype"] == "bool"
    assert [v.split()[0] for v in outputs["pred"]["channel_def"].values()] == ["TC", "WT", "ET"]
    assert configs["inference"]["region_keys"] == ["tc", "wt", "et"]
    assert "research only" in meta["intended_use"].lower()
    assert "clinical" in meta["intended_use"].lower()
    assert meta["references"][0].startswith("Hao Wang, Shengda Luo, Guosheng Hu, Jianguo Zhang.")
    assert "38(14):15483-15491" in meta["references"][0]
    for name in ("docs/README.md", "LICENSE"):
        assert (BUNDLE / name).is_file(), name
