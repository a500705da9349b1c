"""Shared set-up for the nnU-Net tests: a tiny planned BraTS-like dataset and model folders built on it.

``tiny_nnunet`` (a session fixture in ``conftest.py``) builds, once per test session, five 32^3
phantom cases converted with ``nnunet-gmd convert-brats``'s code and planned + preprocessed by the real
``nnUNetv2_plan_and_preprocess``. nnU-Net reads its folders from environment variables, so subprocesses get
them through :meth:`Workspace.env` and in-process calls through the ``nnunet_paths`` fixture.

Untrained model folders (``write_untrained_model``) give fast, deterministic tests of prediction and
evaluation: the network is what the trainer builds at inference time (a ``DSUNet`` for ``nnUNetTrainerDS``),
with seeded random weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

VENV_BIN = Path(sys.executable).parent
DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_TinyBraTS"
CONFIG = "3d_fullres"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

DS_TRAINER = "nnUNetTrainerDS"  # our Dynamic Sharing trainer (nnunet_gmd.nnunet.trainers)
STOCK_TRAINER = "nnUNetTrainer"


@dataclass
class Workspace:
    """nnU-Net folders of one test session."""

    root: Path
    raw: Path
    preprocessed: Path
    results: Path
    phantoms: Path

    @property
    def dataset_folder(self) -> Path:
        return self.raw / DATASET_NAME

    def env_vars(self) -> dict[str, str]:
        from nnunet_gmd.nnunet import ext_trainer_path

        return {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results),
                "nnUNet_extTrainer": str(ext_trainer_path()),
                "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}  # the caller's, when set

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env_vars())
        env.update(extra)
        return env

    def model_folder(self, trainer: str) -> Path:
        return self.results / DATASET_NAME / f"{trainer}__nnUNetPlans__{CONFIG}"


def run_tool(args: Sequence[str], env: dict[str, str], timeout: float = 600, cwd: Optional[Path] = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run a command-line tool of the venv; on failure show the tail of its output."""
    exe = args[0] if os.path.isabs(args[0]) else str(VENV_BIN / args[0])
    proc = subprocess.run([exe, *args[1:]], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited with {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def build_workspace(root: Path, n_cases: int = 5) -> Workspace:
    from nnunet_gmd.demo.phantoms import write_brats_like_cases
    from nnunet_gmd.nnunet.convert_brats import convert_brats

    ws = Workspace(root, root / "nnUNet_raw", root / "nnUNet_preprocessed", root / "nnUNet_results",
                   root / "phantoms")
    for p in (ws.raw, ws.preprocessed, ws.results):
        p.mkdir(parents=True, exist_ok=True)
    write_brats_like_cases(ws.phantoms, n_cases, shape=(32, 32, 32), seed=0)
    convert_brats(ws.phantoms, DATASET_ID, "TinyBraTS", raw_root=ws.raw)
    run_tool(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIG, "-np", "1", "-npfp", "1"],
             ws.env(nnUNet_n_proc_DA="1"), timeout=300)
    return ws




GMD_SMOKE = "nnUNetTrainerGMD_smoke"
GMD_SMOKE_FOLD = 1  # fold 0 of this trainer belongs to test_nnunet_trainers.py's resume test


def write_split(ws: Workspace, n_splits: int = 5) -> list[dict]:
    """``splits_final.json`` as nnU-Net's trainer writes it (its own cross-validation split function)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    path = ws.preprocessed / DATASET_NAME / "splits_final.json"
    if path.is_file():
        return json.loads(path.read_text())
    cases = sorted(p.name[: -len(".nii.gz")] for p in (ws.dataset_folder / "labelsTr").glob("*.nii.gz"))
    splits = generate_crossval_split(cases, seed=12345, n_splits=n_splits)
    path.write_text(json.dumps(splits, indent=2))
    return splits


def write_untrained_model(ws: Workspace, trainer_name: str, folds: Sequence[int] = (0,), seed: int = 0) -> Path:
    """A model folder like ``nnUNetv2_train`` leaves, holding the trainer's network with seeded random weights.

    Built by the trainer's own ``build_network_architecture``, as nnU-Net's predictor rebuilds it. Needs the
    workspace's environment variables in this process (the ``nnunet_paths`` fixture).
    """
    import shutil

    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    assert os.environ.get("nnUNet_results") == str(ws.results), "use the nnunet_paths fixture"
    folder = ws.model_folder(trainer_name)
    if all((folder / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in folds):
        return folder
    pre = ws.preprocessed / DATASET_NAME
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans = PlansManager(str(pre / "nnUNetPlans.json"))
    cm = plans.get_configuration(CONFIG)
    trainer = recursive_find_trainer_class_by_name(trainer_name)
    n_in = determine_num_input_channels(plans, cm, dataset_json)
    n_out = plans.get_label_manager(dataset_json).num_segmentation_heads
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(pre / "dataset.json", folder / "dataset.json")
    shutil.copy(pre / "nnUNetPlans.json", folder / "plans.json")
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = trainer.build_network_architecture(plans, cm, n_in, n_out, enable_deep_supervision=False)
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": net.state_dict(), "trainer_name": trainer_name,
                    "init_args": {"configuration": CONFIG, "fold": fold},
                    "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def assert_same_prediction(ours: Path, ref: Path, case: str, tol: float = 2e-3) -> None:
    """Equal predictions, up to the fp16 rounding of nnU-Net's sliding-window logits.

    nnU-Net accumulates logits in float16, so a last-bit difference of a float32 convolution (memory alignment
    differs between processes) can move a probability by one fp16 step. Probabilities must agree to ``tol``;
    the segmentations must be identical except where a probability sits within ``tol`` of a decision boundary.
    """
    import SimpleITK as sitk

    p_ours = np.load(ours / f"{case}.npz")["probabilities"]
    p_ref = np.load(ref / f"{case}.npz")["probabilities"]
    np.testing.assert_allclose(p_ours, p_ref, rtol=0, atol=tol)
    s_ours = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / f"{case}.nii.gz")))
    s_ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / f"{case}.nii.gz")))
    differ = s_ours != s_ref
    if differ.any():
        top2 = np.sort(p_ref, axis=0)[-2:]
        borderline = (np.abs(p_ref - 0.5) < tol).any(0) | (top2[1] - top2[0] < 2 * tol)  # sigmoid | softmax
        assert not (differ & ~borderline).any(), f"{case}: {int((differ & ~borderline).sum())} voxels differ"
        assert differ.mean() < 1e-3, f"{case}: {int(differ.sum())} borderline voxels differ"


def make_input_folder(ws: Workspace, dest: Path, cases: Sequence[str], drop: Sequence[int] = ()) -> Path:
    """Copy the raw images of ``cases`` into ``dest`` (an nnUNetv2_predict input folder), leaving out channels
    ``drop`` for every case."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for case in cases:
        for f in sorted((ws.dataset_folder / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz")):
            channel = int(f.name[len(case) + 1: len(case) + 5])
            if channel not in drop:
                shutil.copy(f, dest / f.name)
    return dest
