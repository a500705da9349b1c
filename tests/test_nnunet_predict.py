"""``nnunet-gmd predict``: absent channels are switched off for DS networks, zero-filled otherwise; bad input fails
with one clear line. Models here are untrained (seeded random weights), which is enough to compare outputs
voxel by voxel; the end-to-end test with a trained GMD model lives in test_nnunet_e2e.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_gmd.cli import main
from nnunet_gmd.errors import UserError
from nnunet_helpers import CONFIG, DATASET_ID, DS_TRAINER, STOCK_TRAINER, assert_same_prediction, make_input_folder

STOCK = STOCK_TRAINER
CASES = ["Phantom_000", "Phantom_001"]
FAST = ["-npp", "0", "-nps", "0", "-device", "cpu", "--disable_progress_bar", "--disable_tta"]


def _predict_args(inp: Path, out: Path, trainer: str, *extra: str) -> list[str]:
    return ["predict", "-i", str(inp), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0",
            "-tr", trainer, "--save_probabilities", *FAST, *extra]


def _probs(folder: Path, case: str) -> np.ndarray:
    return np.load(folder / f"{case}.npz")["probabilities"]


def _seg(folder: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))


def _nnunet_predictor(folder: Path):
    """nnU-Net's own predictor on the same model (no mirroring, like FAST), for reference outputs."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False)
    predictor.initialize_from_trained_model_folder(str(folder), [0])
    return predictor


def test_ds_switches_absent_branch_off(nnunet_paths, ds_model, tmp_path):
    """An absent FLAIR is a switched-off branch: not the zero-filled branch, and its values cannot matter."""
    import torch

    case = CASES[0]
    make_input_folder(nnunet_paths, tmp_path / "missing", [case], drop=[3])
    assert main(_predict_args(tmp_path / "missing", tmp_path / "ours", DS_TRAINER)) == 0
    ours = _probs(tmp_path / "ours", case)

    # Reference 1: nnU-Net's predictor with FLAIR replaced by arbitrary values inside the head and the DS
    # branch switched off by hand. Equal -> the branch is off and its content never reaches the output.
    full = make_input_folder(nnunet_paths, tmp_path / "full", [case])
    t1 = sitk.ReadImage(str(full / f"{case}_0000.nii.gz"))
    head = sitk.GetArrayFromImage(t1) != 0
    noise = np.where(head, np.random.default_rng(0).normal(5, 3, head.shape), 0).astype(np.float32)
    junk = sitk.GetImageFromArray(noise)
    junk.CopyInformation(t1)
    sitk.WriteImage(junk, str(full / f"{case}_0003.nii.gz"))
    predictor = _nnunet_predictor(ds_model)
    predictor.network.set_default_available(torch.tensor([True, True, True, False]))
    files = [[str(full / f"{case}_{c:04d}.nii.gz") for c in range(4)]]
    (tmp_path / "ref_off").mkdir()
    predictor.predict_from_files_sequential(files, [str(tmp_path / "ref_off" / case)], save_probabilities=True)
    assert_same_prediction(tmp_path / "ours", tmp_path / "ref_off", case)

    # Reference 2: the same zeros fed through all four branches (what zero-filling would do) give other logits.
    zeros = sitk.GetImageFromArray(np.zeros(head.shape, np.float32))
    zeros.CopyInformation(t1)
    sitk.WriteImage(zeros, str(full / f"{case}_0003.nii.gz"))
    predictor.network.set_default_available(None)
    (tmp_path / "ref_zero").mkdir()
    predictor.predict_from_files_sequential(files, [str(tmp_path / "ref_zero" / case)], save_probabilities=True)
    assert np.abs(ours - _probs(tmp_path / "ref_zero", case)).max() > 0.05

    # And the forced subset on complete input is the same as the absent file.
    make_input_folder(nnunet_paths, tmp_path / "complete", [case])
    assert main(_predict_args(tmp_path / "complete", tmp_path / "forced", DS_TRAINER,
                              "--available", "T1,t1ce,t2")) == 0
    assert_same_prediction(tmp_path / "forced", tmp_path / "ours", case)
    record = (tmp_path / "ours" / "modality_availability.json").read_text()
    assert '"t1ce"' in record and '"flair"' not in record


def test_stock_model_gets_zero_filled_channels_and_a_warning(nnunet_paths, stock_model, tmp_path):
    from nnunet_gmd.nnunet.model import load_predictor
    from nnunet_gmd.nnunet.cases import find_cases
    from nnunet_gmd.nnunet.predict import predict_cases

    case = CASES[1]
    make_input_folder(nnunet_paths, tmp_path / "missing", [case], drop=[0, 2])
    predictor = load_predictor(stock_model, [0], device="cpu", use_mirroring=False, allow_tqdm=False)
    cases = find_cases(tmp_path / "missing", ".nii.gz", ["t1", "t1ce", "t2", "flair"])
    with pytest.warns(UserWarning, match="zero-filled"):
        used = predict_cases(predictor, cases, tmp_path / "ours", save_probabilities=True,
                             num_processes_preprocessing=0, num_processes_segmentation_export=0)
    assert used == {case: (1, 3)}

    full = make_input_folder(nnunet_paths, tmp_path / "zf", [case])
    t1 = sitk.ReadImage(str(full / f"{case}_0000.nii.gz"))
    zeros = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(t1).shape, np.float32))
    zeros.CopyInformation(t1)
    for c in (0, 2):
        sitk.WriteImage(zeros, str(full / f"{case}_{c:04d}.nii.gz"))
    reference = _nnunet_predictor(stock_model)
    (tmp_path / "ref").mkdir()
    reference.predict_from_files_sequential([[str(full / f"{case}_{c:04d}.nii.gz") for c in range(4)]],
                                            [str(tmp_path / "ref" / case)], save_probabilities=True)
    assert_same_prediction(tmp_path / "ours", tmp_path / "ref", case)


def test_cli_warns_in_one_line_when_zero_filling(nnunet_paths, stock_model, tmp_path, capsys):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1], drop=[2])
    assert main(_predict_args(inp, tmp_path / "out", STOCK)) == 0
    captured = capsys.readouterr()
    assert [ln for ln in captured.err.splitlines() if "warning" in ln] == [
        f"nnunet-gmd predict: warning: {STOCK} does not use a Dynamic Sharing network and cannot switch branches "
        "off: the absent channels of 1 case(s) are zero-filled"]
    assert f"{CASES[0]}: t1+t1ce+flair" in captured.out and "zero-filled" in captured.out


def test_continue_prediction_skips_finished_cases(nnunet_paths, stock_model, tmp_path):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    out = tmp_path / "out"
    assert main(_predict_args(inp, out, STOCK)) == 0
    first = (out / f"{CASES[0]}.nii.gz").stat().st_mtime_ns
    assert main(_predict_args(inp, out, STOCK, "--continue_prediction")) == 0
    assert (out / f"{CASES[0]}.nii.gz").stat().st_mtime_ns == first

    # other channels than the finished prediction's: predicted again, and the record says so truthfully
    assert main(_predict_args(inp, out, STOCK, "--continue_prediction", "--available", "t1")) == 0
    assert (out / f"{CASES[0]}.nii.gz").stat().st_mtime_ns != first
    record = json.loads((out / "modality_availability.json").read_text())
    assert record["cases"][CASES[0]] == ["t1"]
    # a truncated output (a killed run) is not taken as done
    seg = out / f"{CASES[0]}.nii.gz"
    seg.write_bytes(seg.read_bytes()[:200])
    assert main(_predict_args(inp, out, STOCK, "--continue_prediction", "--available", "t1")) == 0
    assert sitk.ReadImage(str(seg)).GetSize() == sitk.ReadImage(str(inp / f"{CASES[0]}_0000.nii.gz")).GetSize()


def test_an_image_with_another_ending_is_skipped_with_a_warning(nnunet_paths, stock_model, tmp_path, capsys):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    f = inp / f"{CASES[0]}_0003.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(f)), str(inp / f"{CASES[0]}_0003.nii"))   # the user's .nii copy
    f.unlink()
    assert main(_predict_args(inp, tmp_path / "o", STOCK)) == 0
    err = capsys.readouterr().err
    assert f"warning: 1 image file(s) in {inp} are skipped because the model's files end in .nii.gz: " \
           f"{CASES[0]}_0003.nii" in err


def test_output_folder_is_checked_before_the_model_loads(nnunet_paths, stock_model, tmp_path, capsys):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    (tmp_path / "file").write_text("x")
    _expect_error(capsys, _predict_args(inp, tmp_path / "file", STOCK), "-o:", "is a file")
    _expect_error(capsys, _predict_args(inp, inp, STOCK), "-o:", "is the input folder")
    _expect_error(capsys, _predict_args(inp, tmp_path / "file" / "sub", STOCK), "cannot be created")


# ---------------------------------------------------------------------------------------------- bad input
def _expect_error(capsys, args: list[str], *fragments: str) -> None:
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if ": error: " in line]  # progress bars aside
    assert len(err) == 1, stderr  # one line, no traceback
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_unknown_channel_is_rejected(nnunet_paths, stock_model, tmp_path, capsys):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    shutil.copy(inp / f"{CASES[0]}_0000.nii.gz", inp / f"{CASES[0]}_0004.nii.gz")
    _expect_error(capsys, _predict_args(inp, tmp_path / "o", STOCK), CASES[0], f"{CASES[0]}_0004.nii.gz",
                  "channel 4")


def test_badly_named_file_is_rejected(nnunet_paths, stock_model, tmp_path, capsys):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    shutil.copy(inp / f"{CASES[0]}_0000.nii.gz", inp / "scan.nii.gz")
    _expect_error(capsys, _predict_args(inp, tmp_path / "o", STOCK), "scan.nii.gz", "CASE_XXXX")


def test_wrong_shape_between_channels_is_rejected(nnunet_paths, stock_model, tmp_path, capsys):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    f = inp / f"{CASES[0]}_0002.nii.gz"
    img = sitk.ReadImage(str(f))
    sitk.WriteImage(img[:, :, :30], str(f))
    _expect_error(capsys, _predict_args(inp, tmp_path / "o", STOCK), CASES[0], f.name, "shape")


def test_wrong_spacing_between_channels_is_rejected(nnunet_paths, stock_model, tmp_path, capsys):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    f = inp / f"{CASES[0]}_0001.nii.gz"
    img = sitk.ReadImage(str(f))
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(f))
    _expect_error(capsys, _predict_args(inp, tmp_path / "o", STOCK), CASES[0], f.name, "spacing")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_rejected(nnunet_paths, stock_model, tmp_path, capsys, damage):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    f = inp / f"{CASES[0]}_0003.nii.gz"
    if damage == "garbage":
        f.write_bytes(b"this is not an image" * 50)
    else:
        data = f.read_bytes()  # SimpleITK would read this silently, zero-filling the lost half
        f.write_bytes(data[: len(data) // 2])
    _expect_error(capsys, _predict_args(inp, tmp_path / "o", STOCK), CASES[0], f.name, "cannot read",
                  *(["truncated"] if damage == "truncated" else []))
    assert not (tmp_path / "o" / f"{CASES[0]}.nii.gz").exists()


def test_available_names_are_checked(nnunet_paths, stock_model, tmp_path, capsys):
    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1], drop=[3])
    _expect_error(capsys, _predict_args(inp, tmp_path / "o", STOCK, "--available", "t1,pd"), "unknown modality",
                  "'pd'")
    _expect_error(capsys, _predict_args(inp, tmp_path / "o", STOCK, "--available", "t1ce,flair"), CASES[0],
                  "flair", f"{CASES[0]}_0003")


def test_empty_input_and_unknown_model_are_one_line_errors(nnunet_paths, stock_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _expect_error(capsys, _predict_args(tmp_path / "empty", tmp_path / "o", STOCK), "no CASE_XXXX.nii.gz images")
    _expect_error(capsys, _predict_args(tmp_path / "empty", tmp_path / "o", "nnUNetTrainerNeverTrained"),
                  "no trained model")


def test_case_without_any_channel_is_rejected():
    from nnunet_gmd.nnunet.cases import CaseFiles, resolve_available

    with pytest.raises(UserError, match="case lonely: no channel at all"):
        resolve_available(CaseFiles("lonely", {}), ["t1", "t1ce", "t2", "flair"])


@pytest.mark.parametrize("trainer", [DS_TRAINER, STOCK])
def test_case_subsets_match_predict_cases_on_both_routes(nnunet_paths, ds_model, stock_model, trainer, tmp_path):
    """``predict_case_subsets`` (evaluate's path: read and preprocess once) writes what ``predict_cases`` writes
    with the other files absent, whether it reuses the whole case's preprocessing or has to redo it."""
    from nnunet_gmd.nnunet.model import load_predictor
    from nnunet_gmd.nnunet.cases import find_cases
    from nnunet_gmd.nnunet.subset_sweep import predict_case_subsets
    from nnunet_gmd.nnunet.predict import predict_cases

    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES)
    # Phantom_001 gets a FLAIR-only bright slab in its empty first slices: without FLAIR, nnU-Net's nonzero crop
    # and normalization mask change, so those subsets cannot reuse the whole case's preprocessed array.
    f = inp / f"{CASES[1]}_0003.nii.gz"
    image = sitk.ReadImage(str(f))
    array = sitk.GetArrayFromImage(image)
    assert not array[:4].any()
    array[:4] = array.max()
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(image)
    sitk.WriteImage(edited, str(f))
    model = ds_model if trainer == DS_TRAINER else stock_model
    predictor = load_predictor(model, [0], device="cpu", use_mirroring=False, allow_tqdm=False)
    cases = find_cases(inp, ".nii.gz", ["t1", "t1ce", "t2", "flair"])
    subsets = [(0, 1, 2, 3), (0, 1, 2), (3,), (1, 3)]
    routes = predict_case_subsets(predictor, cases,
                                  lambda case, s: tmp_path / "ours" / f"{case.case_id}_{len(s)}{s[0]}", subsets)
    # Phantom_000: every subset reuses; Phantom_001: only the subset without FLAIR is preprocessed again.
    assert routes == {"reused": 7, "preprocessed": 1}
    for subset in subsets:
        with pytest.warns(UserWarning) if trainer == STOCK and len(subset) < 4 else _no_warning():
            predict_cases(predictor, cases, tmp_path / f"ref_{len(subset)}{subset[0]}", forced=subset,
                          num_processes_preprocessing=0, num_processes_segmentation_export=0, progress=False)
        for case in CASES:
            ours = _seg(tmp_path / "ours", f"{case}_{len(subset)}{subset[0]}")
            ref = _seg(tmp_path / f"ref_{len(subset)}{subset[0]}", case)
            assert ours.shape == ref.shape and (ours != ref).mean() < 1e-3, (case, subset)


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def guard():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            yield
    return guard()


def test_case_subsets_export_pool_writes_what_inline_export_writes(nnunet_paths, ds_model, tmp_path):
    from nnunet_gmd.nnunet.model import load_predictor
    from nnunet_gmd.nnunet.cases import find_cases
    from nnunet_gmd.nnunet.subset_sweep import predict_case_subsets

    inp = make_input_folder(nnunet_paths, tmp_path / "in", CASES[:1])
    predictor = load_predictor(ds_model, [0], device="cpu", use_mirroring=False, allow_tqdm=False)
    cases = find_cases(inp, ".nii.gz", ["t1", "t1ce", "t2", "flair"])
    subsets = [(0, 1, 2, 3), (2,), (0, 3)]
    for workers, folder in ((0, "inline"), (1, "pool")):
        def out(case, s, f=folder):
            return tmp_path / f / f"{case.case_id}_{len(s)}{s[0]}"
        predict_case_subsets(predictor, cases, out, subsets, num_processes_segmentation_export=workers)
    for subset in subsets:
        name = f"{CASES[0]}_{len(subset)}{subset[0]}"
        np.testing.assert_array_equal(_seg(tmp_path / "pool", name), _seg(tmp_path / "inline", name))


def test_the_export_pool_fails_instead_of_hanging_when_a_worker_dies():
    import os
    import signal
    import time

    from nnunet_gmd.nnunet.subset_sweep import _Exporter

    exporter = _Exporter(1)
    task = exporter._pool.apply_async(time.sleep, (60,))
    time.sleep(1.0)                                   # the worker has picked the task up
    os.kill(exporter._workers[0].pid, signal.SIGKILL)  # what the OOM killer does
    started = time.monotonic()
    exporter._pending.append(task)
    with pytest.raises(RuntimeError, match="no longer alive"):
        exporter.close()
    assert time.monotonic() - started < 30

