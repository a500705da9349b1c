"""``nnunet-gmd export-bundle`` end to end, through the real command lines: nnUNetv2_train (GMD smoke) ->
export-bundle -> ``python -m monai.bundle run`` on a case with FLAIR absent, compared with ``nnunet-gmd predict``
on the same files -> ``verify_net_in_out`` and ``ckpt_export`` on the exported bundle. Plus the same comparison
on a real BraTS 2018 case from ../shared/data (skipped when absent), and the exporter's one-line errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_gmd.cli import main
from nnunet_helpers import (CONFIG, DATASET_ID, DATASET_NAME, GMD_SMOKE, GMD_SMOKE_FOLD, SHARED_DATA, STOCK_TRAINER,
                            make_input_folder, run_tool, write_untrained_model)

pytestmark = pytest.mark.slow

CHANNELS = ["t1", "t1ce", "t2", "flair"]
CASE = "Phantom_003"
BRATS2018_CASE = SHARED_DATA / "brats2018" / "Brats18_2013_11_1"
MIN_AGREEMENT = 0.995  # the target: voxels on which monai.bundle and nnunet-gmd predict agree


def model_args(fold: int | str = GMD_SMOKE_FOLD) -> list[str]:
    return ["-d", str(DATASET_ID), "-c", CONFIG, "-f", str(fold), "-tr", GMD_SMOKE]


def bundle_run(bundle: Path, env: dict, *args: str) -> str:
    proc = run_tool(["python", "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                     "--bundle_root", str(bundle), "--device", "$torch.device('cpu')", *args], env, timeout=900)
    return proc.stdout + proc.stderr


def monai_case_folder(root: Path, case: str, files: dict[str, Path]) -> Path:
    """``root/<case>/<case>_<channel>.nii.gz`` links to ``files`` (channel key -> file)."""
    folder = root / case
    folder.mkdir(parents=True)
    for key, f in files.items():
        (folder / f"{case}_{key}.nii.gz").symlink_to(f)
    return root


def read_seg(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def agreement(ours: Path, ref: Path) -> float:
    a, b = read_seg(ours), read_seg(ref)
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    return float((sitk.GetArrayFromImage(a) == sitk.GetArrayFromImage(b)).mean())


@pytest.fixture(scope="module")
def exported(tiny_nnunet, trained_gmd_smoke, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "bundle"
    proc = run_tool(["nnunet-gmd", "export-bundle", *model_args(), "-o", str(out)], tiny_nnunet.env())
    assert "wrote MONAI bundle" in proc.stdout
    return out


def test_export_writes_a_complete_bundle_from_the_plans(exported, trained_gmd_smoke):
    from monai.bundle import ConfigParser
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for name in ("configs/inference.json", "configs/metadata.json", "configs/nnunet/plans.json",
                 "configs/nnunet/dataset.json", "models/model.pt", "docs/README.md", "LICENSE"):
        assert (exported / name).is_file(), name
    inference = json.loads((exported / "configs" / "inference.json").read_text())
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    cm = PlansManager(str(trained_gmd_smoke / "plans.json")).get_configuration(CONFIG)
    assert inference["roi_size"] == list(cm.patch_size) and inference["spacing"] == list(cm.spacing)
    assert inference["normalization_schemes"] == list(cm.normalization_schemes)
    ckpt = torch.load(trained_gmd_smoke / f"fold_{GMD_SMOKE_FOLD}" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    assert inference["mirror_axes"] == list(ckpt["inference_allowed_mirroring_axes"])
    assert inference["network_def"]["_target_"] == "nnunet_gmd.networks.ds_unet.DSUNet"
    assert inference["channels"] == CHANNELS
    assert list(meta["network_data_format"]["inputs"]["image"]["channel_def"].values()) == CHANNELS
    assert meta["network_data_format"]["inputs"]["available"]["dtype"] == "bool"
    assert meta["nnunet"]["trainer"] == GMD_SMOKE and meta["nnunet"]["fold"] == GMD_SMOKE_FOLD
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3  # the dataset's three regions
    # The bundle's network_def is the trainer's network: the checkpoint's weights load into it unchanged.
    parser = ConfigParser()
    parser.read_config(exported / "configs" / "inference.json")
    parser["bundle_root"] = str(exported)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(exported / "models" / "model.pt"))
    for key, value in ckpt["network_weights"].items():
        assert torch.equal(net.state_dict()[key], value), key
    readme = (exported / "docs" / "README.md").read_text()
    assert GMD_SMOKE in readme and DATASET_NAME in readme and "research only" in readme.lower()
    assert "Apache License" in (exported / "LICENSE").read_text()


@pytest.fixture(scope="module")
def flair_absent(tiny_nnunet, trained_gmd_smoke, exported, tmp_path_factory) -> dict[str, Path]:
    """The same case with FLAIR absent, predicted by nnunet-gmd predict and by the exported bundle."""
    ws, root = tiny_nnunet, tmp_path_factory.mktemp("flair_absent")
    nn_in = make_input_folder(ws, root / "nnunet_in", [CASE], drop=[3])
    run_tool(["nnunet-gmd", "predict", "-i", str(nn_in), "-o", str(root / "predict"), *model_args(), "-device", "cpu",
              "-npp", "0", "-nps", "0", "--disable_progress_bar", "--save_probabilities"], ws.env())
    files = {k: nn_in / f"{CASE}_{i:04d}.nii.gz" for i, k in enumerate(CHANNELS[:3])}
    data = monai_case_folder(root / "monai_in", CASE, files)
    log = bundle_run(exported, ws.env(), "--dataset_dir", str(data), "--output_dir", str(root / "bundle"))
    return {"root": root, "predict": root / "predict", "bundle": root / "bundle", "input": nn_in, "log": log}


def test_bundle_run_with_flair_absent_agrees_with_nnunet_gmd_predict(flair_absent):
    assert sorted(p.name for p in flair_absent["bundle"].iterdir()) == [f"{CASE}.nii.gz"]
    ours, ref = flair_absent["bundle"] / f"{CASE}.nii.gz", flair_absent["predict"] / f"{CASE}.nii.gz"
    assert agreement(ours, ref) >= MIN_AGREEMENT
    labels = set(np.unique(sitk.GetArrayFromImage(read_seg(ours))).tolist())
    assert labels <= {0, 1, 2, 3}  # the nnU-Net dataset's values (regions_class_order), not BraTS 1/2/4
    record = json.loads((flair_absent["predict"] / "modality_availability.json").read_text())
    assert record["cases"] == {CASE: CHANNELS[:3]}


def test_bundle_pipeline_reproduces_predict_probabilities(flair_absent, exported, nnunet_paths):
    """The bundle's own components (preprocessing, inferer, export) give nnunet-gmd predict's probabilities."""
    from monai.bundle import ConfigParser
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    parser = ConfigParser()
    parser.read_config(exported / "configs" / "inference.json")
    parser.update({"bundle_root": str(exported), "device": "$torch.device('cpu')"})
    net, plan = parser.get_parsed_content("network"), parser.get_parsed_content("plan")
    net.load_state_dict(torch.load(exported / "models" / "model.pt"))
    net.eval()
    item = {"case": CASE, **{k: str(flair_absent["input"] / f"{CASE}_{i:04d}.nii.gz")
                             for i, k in enumerate(CHANNELS[:3])}}
    item = parser.get_parsed_content("preprocessing")(item)
    assert item["available"].tolist() == [True, True, True, False]
    logits = parser.get_parsed_content("inferer")(item["image"][None], net, available=item["available"][None])[0]
    _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plan.plans_manager, plan.configuration_manager, plan.label_manager, json.loads(item["nnunet_properties"]),
        return_probabilities=True)
    reference = np.load(flair_absent["predict"] / f"{CASE}.npz")["probabilities"]
    np.testing.assert_allclose(probabilities, reference, rtol=0, atol=2e-3)
    assert reference.std() > 1e-3  # a real prediction, not a constant


def test_verify_net_in_out_and_ckpt_export_pass_on_the_exported_bundle(exported, tiny_nnunet, tmp_path):
    env = tiny_nnunet.env()
    common = ["--meta_file", str(exported / "configs" / "metadata.json"),
              "--config_file", str(exported / "configs" / "inference.json"), "--bundle_root", str(exported)]
    log = run_tool(["python", "-m", "monai.bundle", "verify_net_in_out", "network_def", *common], env)
    assert "data shape of network is verified with no error" in log.stdout + log.stderr
    target = tmp_path / "model.ts"
    run_tool(["python", "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(target),
              "--ckpt_file", str(exported / "models" / "model.pt"), *common], env)
    scripted = torch.jit.load(str(target))
    assert "Tensor? available=None" in str(scripted.forward.schema)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(exported / "configs" / "inference.json")
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(exported / "models" / "model.pt"))
    eager.eval()
    torch.manual_seed(0)
    x = torch.randn(1, 4, *json.loads((exported / "configs" / "inference.json").read_text())["roi_size"])
    mask = torch.tensor([True, False, True, False])
    with torch.no_grad():
        assert torch.allclose(scripted(x, mask), eager(x, mask), atol=1e-5)


# --------------------------------------------------------------------------------------------- bad input
def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"nnunet-gmd {argv[0]}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_export_errors_name_the_problem(nnunet_paths, trained_gmd_smoke, tmp_path, capsys):
    ws = nnunet_paths
    out = ["-o", str(tmp_path / "b")]
    err = _error(capsys, ["export-bundle", "-d", str(DATASET_ID), "-c", CONFIG, "-f", "1", "-tr", "NoSuchTrainer",
                          *out])
    assert "no trained model at" in err and "NoSuchTrainer" in err
    err = _error(capsys, ["export-bundle", *model_args(), "-chk", "checkpoint_nope.pth", *out])
    assert str(trained_gmd_smoke / f"fold_{GMD_SMOKE_FOLD}" / "checkpoint_nope.pth") in err
    assert "checkpoint_final.pth" in err  # what is there instead
    err = _error(capsys, ["export-bundle", "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0", "1", "2", "3", "4",
                          "-tr", GMD_SMOKE, *out])
    assert "one fold" in err and "fold 'all'" in err
    write_untrained_model(ws, STOCK_TRAINER)
    err = _error(capsys, ["export-bundle", "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0", "-tr", STOCK_TRAINER,
                          *out])
    assert "not a Dynamic Sharing network" in err and STOCK_TRAINER in err
    assert not (tmp_path / "b").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    err = _error(capsys, ["export-bundle", *model_args(), *out])
    assert "not empty" in err and "--overwrite" in err


# --------------------------------------------------------------------------------------------- real data
def test_real_brats2018_case_bundle_agrees_with_predict(exported, tiny_nnunet, tmp_path):
    """A real 240x240x155 case with T2 absent: the exported bundle writes what nnunet-gmd predict writes.

    The smoke model is trained on 32^3 phantoms at the same 1 mm spacing and channel order. Tile step 1 and no
    mirroring on both sides keep the CPU time down; both are the same nnU-Net settings.
    """
    if not BRATS2018_CASE.is_dir():
        pytest.skip(f"real BraTS 2018 case not found: {BRATS2018_CASE}")
    name, env = BRATS2018_CASE.name, tiny_nnunet.env()
    present = {k: BRATS2018_CASE / f"{name}_{k}.nii.gz" for k in ("t1", "t1ce", "flair")}
    nn_in = tmp_path / "nnunet_in"
    nn_in.mkdir()
    for k, f in present.items():
        (nn_in / f"{name}_{CHANNELS.index(k):04d}.nii.gz").symlink_to(f)
    run_tool(["nnunet-gmd", "predict", "-i", str(nn_in), "-o", str(tmp_path / "predict"), *model_args(),
              "-device", "cpu", "-npp", "0", "-nps", "0", "-step_size", "1", "--disable_tta",
              "--disable_progress_bar"], env)
    data = monai_case_folder(tmp_path / "monai_in", name, present)
    bundle_run(exported, env, "--dataset_dir", str(data), "--output_dir", str(tmp_path / "bundle"),
               "--tile_step_size", "1.0", "--use_mirroring", "False")
    share = agreement(tmp_path / "bundle" / f"{name}.nii.gz", tmp_path / "predict" / f"{name}.nii.gz")
    print(f"{name} (t2 absent): {100 * share:.4f}% of voxels agree")
    assert share >= MIN_AGREEMENT
