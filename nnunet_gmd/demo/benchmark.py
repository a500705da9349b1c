"""``nnunet-gmd benchmark brats``: train every method on one BraTS folder, test on another, under all subsets.

The two folders are combined into one nnU-Net dataset (via symbolic links, nothing is copied before
``convert-brats``) whose ``splits_final.json`` trains fold 0 on the training folder only and validates on the
test folder only, so ``nnunet-gmd evaluate -f 0`` scores exactly the test cases. Labels of test cases are used
for scoring only; nnU-Net's fingerprint sees their image size and spacing (MRI z-scoring uses no dataset-wide
statistics).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from nnunet_gmd.errors import UserError
from nnunet_gmd.demo.pipeline import Method, total_steps, train_and_evaluate_all, write_results
from nnunet_gmd.demo.planning import plan_and_preprocess, write_split
from nnunet_gmd.demo.presets import Preset
from nnunet_gmd.demo.workspace import Workspace

DATASET_ID = 991
DATASET_NAME = "BraTSBenchmark"


def _labelled_case_ids(folder: Path, role: str) -> list[str]:
    from nnunet_gmd.nnunet.convert_brats import CHANNEL_NAMES, find_cases

    cases = find_cases(Path(folder))
    for case in cases:
        if case.seg is None:
            raise UserError(f"{role} case {folder / case.case_id}: no segmentation (_seg.nii.gz); every {role} "
                            f"case needs one")
        missing = [c for c in CHANNEL_NAMES.values() if c not in case.channels]
        if missing:
            raise UserError(f"{role} case {folder / case.case_id}: lacks {', '.join(missing)} (the benchmark "
                            f"removes modalities itself)")
    return [c.case_id for c in cases]


def _stage(train_dir: Path, test_dir: Path, staging: Path, train: Sequence[str], test: Sequence[str]) -> None:
    """One folder holding links to every case folder, for ``convert-brats``."""
    tmp = staging.with_name(staging.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for folder, ids in ((train_dir, train), (test_dir, test)):
        for case_id in ids:
            os.symlink(Path(folder).resolve() / case_id, tmp / case_id, target_is_directory=True)
    shutil.rmtree(staging, ignore_errors=True)
    os.replace(tmp, staging)


def split_folder(src: Path, out: Path, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Link a seeded random ``n_test`` of ``src``'s labelled cases into ``out/test``, the rest into ``out/train``.

    Links, not copies: the data stays where it is (and under its licence's terms).
    """
    import numpy as np

    src, out = Path(src).resolve(), Path(out)
    cases = _labelled_case_ids(src, "source")
    if not 1 <= n_test < len(cases):
        raise UserError(f"--test must leave at least one training case: {src} has {len(cases)} cases, "
                        f"asked for {n_test} test cases")
    test = sorted(np.random.default_rng(seed).choice(cases, n_test, replace=False).tolist())
    train = [c for c in cases if c not in test]
    for role in ("train", "test"):
        if (out / role).exists() and any((out / role).iterdir()):
            raise UserError(f"{out / role} is not empty; choose another output folder")
    for role, ids in (("train", train), ("test", test)):
        folder = out / role
        folder.mkdir(parents=True, exist_ok=True)
        for case_id in ids:
            os.symlink(src / case_id, folder / case_id, target_is_directory=True)
    return train, test


def run_benchmark(train_dir: Path, test_dir: Path, out_dir: Path, preset: Preset, methods: Sequence[Method],
                  device: str, fresh: bool = False, seeds: int = 1) -> dict[str, Path]:
    """Run (or resume) the benchmark in ``out_dir``; returns the paths of the results files.

    ``seeds`` trainings per method (seed 0 is the single-run layout, so a later call with more seeds reuses it).
    """
    train = _labelled_case_ids(train_dir, "training")
    test = _labelled_case_ids(test_dir, "test")
    clash = sorted(set(train) & set(test))
    if clash:
        raise UserError(f"case {clash[0]} is in both {train_dir} and {test_dir}")
    settings = {"command": "benchmark brats", "train": [str(Path(train_dir).resolve()), train],
                "test": [str(Path(test_dir).resolve()), test], "preset": preset.as_dict()}
    ws = Workspace(out_dir, settings, fresh=fresh)
    started = time.monotonic()
    total = total_steps(len(methods), seeds)
    print(f"nnunet-gmd benchmark brats in {ws.root}: {len(train)} training cases ({train_dir}), {len(test)} test "
          f"cases ({test_dir}); {preset.describe()}; device {device}")
    dataset_name = f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    staging = ws.root / "cases"

    ws.run_step("stage", f"[1/{total}] link the {len(train) + len(test)} case folders",
                lambda: _stage(train_dir, test_dir, staging, train, test))

    def convert() -> None:
        from nnunet_gmd.nnunet.convert_brats import convert_brats
        convert_brats(staging, DATASET_ID, DATASET_NAME, raw_root=ws.raw, overwrite=True)
    ws.run_step("convert", f"[2/{total}] convert to an nnU-Net dataset (convert-brats)", convert)

    def plan() -> None:
        plan_and_preprocess(ws, DATASET_ID, dataset_name, preset)
        write_split(ws, dataset_name, train, test)
    ws.run_step("plan", f"[3/{total}] nnU-Net planning and preprocessing ({preset.plans_name})", plan)

    train_and_evaluate_all(ws, DATASET_ID, preset, methods, device, first_step=4, total_steps=total,
                           seeds=seeds)

    details = [f"training set: {len(train)} cases from {train_dir}; test set: {len(test)} cases from {test_dir}"]
    return write_results(ws, methods, preset, dataset_name, "benchmark_results",
                         "nnunet-gmd benchmark: BraTS missing-modality Dice", details, started, total,
                         extra={"train_cases": train, "test_cases": test}, seeds=seeds)
