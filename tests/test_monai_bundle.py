"""End-to-end tests of monai_bundle/ through ``python -m monai.bundle`` (train, resume, verify_net_in_out,
ckpt_export, inference with a missing sequence, 15-subset evaluation) on tiny phantoms, plus inference on the
real BraTS cases in ../shared/data when they are there.

The subprocesses get no PYTHONPATH: the configs' ``_target_``s must resolve through the installed package.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.metrics import compute_dice
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from nnunet_gmd.demo.phantoms import write_brats_like_cases
from nnunet_gmd.subsets import all_subsets, subset_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "monai_bundle"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BRATS2018_CASE = SHARED_DATA / "brats2018" / "Brats18_2013_11_1"
BRATS2015_CASE = SHARED_DATA / "brats2015_deepmedic_brats_2013_pat0005_1"
MODALITIES = ["t1", "t1ce", "t2", "flair"]
SHAPE = (24, 24, 24)
# A small network for CPU tests; the configs default to a full-size one.
TINY = ["--network_features", "[8,16,32,64]"]


def configs(name: str, root: Path | str = BUNDLE / "configs") -> str:
    """The config list of one workflow: the shared ``common.json``, then ``<name>.json`` (as the model zoo)."""
    return f"['{root}/common.json','{root}/{name}.json']"


def parsed(name: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([BUNDLE / "configs" / "common.json", BUNDLE / "configs" / f"{name}.json"])
    return parser


def bundle(command: str, *args: str, cwd: Path) -> str:
    """Run ``python -m monai.bundle COMMAND ARGS`` and return its log; fail with the log's tail otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", command, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"monai.bundle {command} failed ({proc.returncode}):\n{log[-6000:]}")
    return log


def label_regions(path: Path) -> torch.Tensor:
    """BraTS label file -> TC/WT/ET region maps."""
    seg = torch.as_tensor(np.asarray(nib.load(path).dataobj).astype(np.int64))[None]
    return ConvertToMultiChannelBasedOnBratsClasses()(seg).float()


def assert_same_geometry(output: Path, reference: Path) -> np.ndarray:
    out, ref = nib.load(output), nib.load(reference)
    assert out.shape == ref.shape
    assert np.allclose(out.affine, ref.affine, atol=1e-4)
    assert out.get_data_dtype() == np.uint8
    labels = np.asarray(out.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    return labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two epochs of GMD training (3 subsets per step) on 3 phantoms: 2 train, 1 validate."""
    root = tmp_path_factory.mktemp("monai_bundle")
    write_brats_like_cases(root / "data", 3, shape=SHAPE, seed=0)
    log = bundle("run", "--config_file", configs("train"), "--bundle_root", str(BUNDLE),
                 "--dataset_dir", "data", "--output_dir", "out", "--ckpt_dir", "models", *TINY,
                 "--patch_size", "[16,16,16]", "--roi_size", str(list(SHAPE)), "--num_epochs", "2",
                 "--val_interval", "1", "--batch_size", "2", "--num_workers", "0", "--gmd_subsets_per_step", "3",
                 cwd=root)
    (root / "train.log").write_text(log)
    return root


@pytest.fixture(scope="module")
def inferred(trained) -> Path:
    """Inference, run from the repository root as documented, on the validation phantom without its FLAIR."""
    case = trained / "infer_data" / "Phantom_002"
    case.mkdir(parents=True)
    for m in ("t1", "t1ce", "t2"):
        shutil.copy(trained / "data" / "Phantom_002" / f"Phantom_002_{m}.nii.gz", case)
    bundle("run", "--config_file", configs("inference", "monai_bundle/configs"), "--bundle_root", "monai_bundle",
           "--dataset_dir", str(trained / "infer_data"), "--output_dir", str(trained / "pred"),
           "--ckpt_path", str(trained / "models" / "model.pt"), *TINY, "--roi_size", str(list(SHAPE)), cwd=REPO)
    return trained / "pred"


def test_train_writes_model_resumable_checkpoint_and_conflict_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = (trained / "train.log").read_text()
    assert "Epoch: 2/2" in log and "val_mean_dice" in log
    state = torch.load(trained / "models" / "checkpoint_epoch=2.pt", weights_only=False)
    assert {"model", "optimizer", "trainer", "gmd_update"} <= set(state)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]  # ignite stores iterations
    # the best model is a plain state dict of the configured network
    parser = parsed("train")
    parser["network_features"] = [8, 16, 32, 64]
    parser.get_parsed_content("network_def").load_state_dict(torch.load(trained / "models" / "model.pt"))
    tags = set()
    for events in (trained / "out" / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train_loss", "gmd_conflicting_pairs", "gmd_conflict_fraction", "train_gmd_conflicting_pairs",
            "val_mean_dice"} <= tags


def test_resume_continues_from_the_checkpoint(trained):
    log = bundle("run", "--config_file", configs("train"), "--bundle_root", str(BUNDLE),
                 "--dataset_dir", "data", "--output_dir", "out_resumed", "--ckpt_dir", "models_resumed", *TINY,
                 "--patch_size", "[16,16,16]", "--roi_size", str(list(SHAPE)), "--num_epochs", "3",
                 "--val_interval", "10", "--batch_size", "2", "--num_workers", "0", "--gmd_subsets_per_step", "3",
                 "--resume_from", "models/checkpoint_epoch=2.pt", cwd=trained)
    assert "Epoch: 3/3" in log
    assert "Epoch: 1/3" not in log and "Epoch: 2/3" not in log
    before = torch.load(trained / "models" / "checkpoint_epoch=2.pt", weights_only=False)
    after = torch.load(trained / "models_resumed" / "checkpoint_epoch=3.pt", weights_only=False)
    assert after["trainer"]["iteration"] == before["trainer"]["iteration"] + before["trainer"]["epoch_length"]
    assert after["trainer"]["max_epochs"] == 3
    # poly LR follows the new num_epochs: epoch 3 of 3 trains at lr * (1 - 2/3)^0.9, not at 0
    initial = parsed("train")["learning_rate"]
    assert after["optimizer"]["param_groups"][0]["lr"] == pytest.approx(initial * (1 / 3) ** 0.9)
    changed = [k for k in before["model"] if not torch.equal(before["model"][k], after["model"][k])]
    assert changed


def test_verify_net_in_out_with_the_default_network():
    log = bundle("verify_net_in_out", "network_def", "--meta_file", "monai_bundle/configs/metadata.json",
                 "--config_file", configs("inference", "monai_bundle/configs"), "--bundle_root", "monai_bundle", cwd=REPO)
    assert "data shape of network is verified with no error" in log


def test_ckpt_export_is_scripted_and_honours_the_mask(trained):
    target = trained / "export" / "model.ts"
    target.parent.mkdir(exist_ok=True)
    bundle("ckpt_export", "network_def", "--filepath", str(target), "--ckpt_file", str(trained / "models" / "model.pt"),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
           "--config_file", configs("inference"), "--bundle_root", str(BUNDLE), *TINY,
           cwd=trained)
    extra = {"metadata.json": "", "inference.json": ""}
    model = torch.jit.load(str(target), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["available"]["num_channels"] == 4
    assert "Tensor? available=None" in str(model.forward.schema)  # scripted: the mask is a real runtime input
    parser = parsed("inference")
    parser["network_features"] = [8, 16, 32, 64]
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(trained / "models" / "model.pt"))
    eager.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 4, *SHAPE)
    mask = torch.tensor([[True, True, False, True], [False, True, False, False]])
    with torch.no_grad():
        out = model(x, mask)
        assert torch.allclose(out, eager(x, mask), atol=1e-5)
        garbage = x.clone()
        garbage[0, 2] = 50 * torch.randn(SHAPE)
        garbage[1, [0, 2, 3]] = -30.0
        assert torch.allclose(model(garbage, mask), out, atol=1e-5)
        assert not torch.allclose(model(garbage), out, atol=1e-3)


def test_inference_with_flair_absent_writes_the_case_on_its_geometry(inferred, trained):
    assert sorted(p.name for p in inferred.iterdir()) == ["Phantom_002.nii.gz"]
    assert_same_geometry(inferred / "Phantom_002.nii.gz", trained / "data" / "Phantom_002" / "Phantom_002_t1.nii.gz")


def test_a_truncated_file_is_one_line_naming_it_and_earlier_cases_are_kept(trained):
    """It used to end in a 326-line MONAI traceback that named neither case nor file."""
    data = trained / "bad_data"
    for name in ("Phantom_000", "Phantom_001"):   # sorted: Phantom_000 runs first and is written
        shutil.copytree(trained / "data" / name, data / name, ignore=shutil.ignore_patterns("*_seg.nii.gz"))
    t2 = data / "Phantom_001" / "Phantom_001_t2.nii.gz"
    t2.write_bytes(t2.read_bytes()[:300])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           configs("inference", "monai_bundle/configs"), "--bundle_root", "monai_bundle",
                           "--dataset_dir", str(data), "--output_dir", str(trained / "bad_pred"),
                           "--ckpt_path", str(trained / "models" / "model.pt"), *TINY, "--roi_size", str(list(SHAPE))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nnunet-gmd inference: error: cannot read ") and str(t2) in last and "truncated" in last
    assert (trained / "bad_pred" / "Phantom_000.nii.gz").is_file()


def test_evaluate_writes_15_subset_report_consistent_with_inference(inferred, trained):
    case = trained / "data" / "Phantom_002"
    datalist = {"testing": [{"case": "Phantom_002", **{m: str(case / f"Phantom_002_{m}.nii.gz") for m in MODALITIES},
                             "label": str(case / "Phantom_002_seg.nii.gz")}]}
    (trained / "eval_list.json").write_text(json.dumps(datalist))
    bundle("run", "--config_file", configs("evaluate"), "--bundle_root", str(BUNDLE),
           "--datalist_file", "eval_list.json", "--output_dir", "eval", "--ckpt_path", "models/model.pt", *TINY,
           "--roi_size", str(list(SHAPE)), cwd=trained)
    report = json.loads((trained / "eval" / "missing_modality_report.json").read_text())
    assert (trained / "eval" / "missing_modality_report.csv").is_file()
    assert report["cases"] == ["Phantom_002"]
    assert report["channels"] == MODALITIES and report["dataset"] == "eval_list.json"
    assert [s["available"] for s in report["subsets"]] == [subset_name(s, MODALITIES).split("+")
                                                           for s in all_subsets(4)]
    regions = ["whole tumor", "tumor core", "enhancing tumor"]
    for entry in report["subsets"]:
        assert list(entry["metrics"]) == regions
        assert entry["n_cases"] == 1 and all(0.0 <= m["dice"] <= 1.0 for m in entry["metrics"].values())
    for region in regions:
        mean = np.mean([s["metrics"][region]["dice"] for s in report["subsets"]])
        assert report["mean"][region]["dice"] == pytest.approx(mean)
    # The evaluation's "t1+t1ce+t2" row must score exactly what inference writes when the FLAIR file is absent.
    written = torch.as_tensor(np.asarray(nib.load(inferred / "Phantom_002.nii.gz").dataobj).astype(np.int64))[None]
    pred = ConvertToMultiChannelBasedOnBratsClasses()(written).float()
    dice = compute_dice(pred[None], label_regions(case / "Phantom_002_seg.nii.gz")[None], ignore_empty=False)[0]
    row = next(s for s in report["subsets"] if s["available"] == ["t1", "t1ce", "t2"])["metrics"]
    assert [row[r]["dice"] for r in ("tumor core", "whole tumor", "enhancing tumor")] == pytest.approx(
        dice.tolist(), abs=1e-5)


# --------------------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def real_inference(trained) -> Path:
    """One inference run over the real cases that exist: BraTS 2018 without FLAIR, BraTS 2015 FLAIR + T1c."""
    cases = []
    if BRATS2018_CASE.is_dir():
        name = BRATS2018_CASE.name
        cases.append({"case": name, **{m: str(BRATS2018_CASE / f"{name}_{m}.nii.gz") for m in ("t1", "t1ce", "t2")}})
    if BRATS2015_CASE.is_dir():
        cases.append({"case": "brats_2013_pat0005_1",
                      "flair": str(BRATS2015_CASE / "Flair_subtrMeanDivStd.nii.gz"),
                      "t1ce": str(BRATS2015_CASE / "T1c_subtrMeanDivStd.nii.gz")})
    if not cases:
        pytest.skip(f"real BraTS data not found under {SHARED_DATA}")
    (trained / "real_list.json").write_text(json.dumps({"testing": cases}))
    # Coarser spacing keeps CPU time low; Invertd still writes the 240x240x155 input grid.
    bundle("run", "--config_file", configs("inference"), "--bundle_root", str(BUNDLE),
           "--datalist_file", "real_list.json", "--output_dir", "real_pred", "--ckpt_path", "models/model.pt",
           *TINY, "--spacing", "[2.5,2.5,2.5]", "--roi_size", "[64,64,64]", cwd=trained)
    return trained / "real_pred"


def test_real_brats2018_case_with_flair_absent(real_inference):
    if not BRATS2018_CASE.is_dir():
        pytest.skip(f"BraTS 2018 case not found: {BRATS2018_CASE}")
    name = BRATS2018_CASE.name
    labels = assert_same_geometry(real_inference / f"{name}.nii.gz", BRATS2018_CASE / f"{name}_t1.nii.gz")
    assert labels.shape == (240, 240, 155)
    # Nothing may land outside the head: the foreground crop is undone by Invertd, in the right place.
    head = np.zeros(labels.shape, bool)
    for m in ("t1", "t1ce", "t2"):
        head |= np.asarray(nib.load(BRATS2018_CASE / f"{name}_{m}.nii.gz").dataobj) != 0
    lo = np.maximum(np.argwhere(head).min(0) - 12, 0)
    hi = np.argwhere(head).max(0) + 13
    outside = np.ones(labels.shape, bool)
    outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
    assert not labels[outside].any()


def test_real_brats2015_flair_t1c_only_case(real_inference):
    if not BRATS2015_CASE.is_dir():
        pytest.skip(f"BraTS 2015 FLAIR+T1c case not found: {BRATS2015_CASE}")
    labels = assert_same_geometry(real_inference / "brats_2013_pat0005_1.nii.gz",
                                  BRATS2015_CASE / "T1c_subtrMeanDivStd.nii.gz")
    assert labels.shape == (240, 240, 155)
