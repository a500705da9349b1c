"""End to end through the real command-line tools on the tiny 4-modality dataset:
nnUNetv2_plan_and_preprocess -> nnUNetv2_train (GMD smoke) -> nnUNetv2_predict -> nnunet-gmd predict with a
channel file removed -> nnunet-gmd evaluate (15 subsets)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_helpers import (CONFIG, DATASET_ID, DATASET_NAME, GMD_SMOKE, GMD_SMOKE_FOLD, assert_same_prediction,
                            make_input_folder, run_tool)


@pytest.mark.slow
def test_plan_train_predict_missing_channel_and_evaluate(tiny_nnunet, trained_gmd_smoke, tmp_path):
    ws = tiny_nnunet
    env = ws.env()
    fold = str(GMD_SMOKE_FOLD)
    model_args = ["-d", str(DATASET_ID), "-c", CONFIG, "-f", fold, "-tr", GMD_SMOKE, "-device", "cpu"]

    # 1-2: planning/preprocessing and training went through nnU-Net's own tools.
    pre = ws.preprocessed / DATASET_NAME
    assert (pre / "nnUNetPlans.json").is_file() and list((pre / f"nnUNetPlans_{CONFIG}").glob("*.b2nd"))
    ckpt = torch.load(trained_gmd_smoke / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    assert ckpt["trainer_name"] == GMD_SMOKE and ckpt["current_epoch"] == 2

    # 3: stock nnUNetv2_predict, every channel present.
    cases = ["Phantom_001", "Phantom_003"]
    full = make_input_folder(ws, tmp_path / "full", cases)
    run_tool(["nnUNetv2_predict", "-i", str(full), "-o", str(tmp_path / "stock"), *model_args,
              "-npp", "0", "-nps", "0", "--save_probabilities"], env, timeout=600)

    # 4: nnunet-gmd predict (with nnU-Net's worker processes); Phantom_003 lacks its FLAIR file, Phantom_001 is
    # complete and must come out exactly as nnUNetv2_predict's.
    mixed = make_input_folder(ws, tmp_path / "mixed", cases)
    (mixed / "Phantom_003_0003.nii.gz").unlink()
    proc = run_tool(["nnunet-gmd", "predict", "-i", str(mixed), "-o", str(tmp_path / "ours"), *model_args,
                     "-npp", "1", "-nps", "1", "--disable_progress_bar", "--save_probabilities"], env, timeout=600)
    assert "Phantom_003: t1+t1ce+t2" in proc.stdout
    assert_same_prediction(tmp_path / "ours", tmp_path / "stock", "Phantom_001")
    stock_files = {p.name for p in (tmp_path / "stock").iterdir()}
    assert stock_files <= {p.name for p in (tmp_path / "ours").iterdir()}  # same outputs (+ availability record)
    missing = sitk.ReadImage(str(tmp_path / "ours" / "Phantom_003.nii.gz"))
    source = sitk.ReadImage(str(full / "Phantom_003_0000.nii.gz"))
    assert missing.GetSize() == source.GetSize() and missing.GetSpacing() == source.GetSpacing()
    assert missing.GetOrigin() == source.GetOrigin() and missing.GetDirection() == source.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(missing))) <= {0, 1, 2, 3}
    record = json.loads((tmp_path / "ours" / "modality_availability.json").read_text())
    assert record["cases"] == {"Phantom_001": ["t1", "t1ce", "t2", "flair"], "Phantom_003": ["t1", "t1ce", "t2"]}
    assert record["absent_channels"].startswith("switched off")

    # 5: the robustness report over all 15 subsets of the fold's validation cases.
    out = tmp_path / "report"
    run_tool(["nnunet-gmd", "evaluate", "-d", str(DATASET_ID), "-c", CONFIG, "-f", fold, "-tr", GMD_SMOKE,
              "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta", "-o", str(out)], env, timeout=600)
    report = json.loads((out / "missing_modality_report.json").read_text())
    assert len(report["subsets"]) == 15 and len({tuple(s["available"]) for s in report["subsets"]}) == 15
    assert report["trainer"] == GMD_SMOKE and report["fold"] == GMD_SMOKE_FOLD
    split = json.loads((pre / "splits_final.json").read_text())[GMD_SMOKE_FOLD]["val"]
    assert report["cases"] == sorted(split)
    for entry in report["subsets"]:
        for block in entry["metrics"].values():
            assert block["dice"] is None or 0.0 <= block["dice"] <= 1.0
    for suffix in ("csv", "md", "png"):
        assert (out / f"missing_modality_report.{suffix}").stat().st_size > 100


@pytest.mark.slow
def test_feature_fusion_smoke_training_then_predict_without_flair(tiny_nnunet, tmp_path):
    """``nnUNetv2_train -tr nnUNetTrainerGMD_FF_smoke``, then ``nnunet-gmd predict`` on a case lacking FLAIR."""
    from nnunet_gmd.nnunet.network import FUSION_KEY

    ws = tiny_nnunet
    trainer = "nnUNetTrainerGMD_FF_smoke"
    run_tool(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", trainer, "-device", "cpu"],
             ws.env(NNUNET_GMD_FINAL_VALIDATION="0"), timeout=900)
    ckpt = torch.load(ws.model_folder(trainer) / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    assert ckpt["current_epoch"] == 2 and len(ckpt["logging"]["gmd_conflicting_pairs"]) == 2
    assert any(k.startswith("decoder.") for k in ckpt["network_weights"])
    saved_plans = json.loads((ws.model_folder(trainer) / "plans.json").read_text())  # what predict rebuilds from
    assert saved_plans["configurations"][CONFIG][FUSION_KEY] == "mean_var"
    inp = make_input_folder(ws, tmp_path / "in", ["Phantom_002"], drop=[3])
    proc = run_tool(["nnunet-gmd", "predict", "-i", str(inp), "-o", str(tmp_path / "out"), "-d", str(DATASET_ID),
                     "-c", CONFIG, "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "0", "-nps", "0",
                     "--disable_progress_bar", "--disable_tta"], ws.env(), timeout=600)
    assert "Phantom_002: t1+t1ce+t2" in proc.stdout
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "Phantom_002.nii.gz")))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(inp / "Phantom_002_0000.nii.gz")))
    assert seg.shape == source.shape and set(np.unique(seg)) <= {0, 1, 2, 3}
    record = json.loads((tmp_path / "out" / "modality_availability.json").read_text())
    assert record["cases"] == {"Phantom_002": ["t1", "t1ce", "t2"]}
