"""``nnunet-gmd benchmark brats``: train every method on one BraTS folder, test on another, under all subsets.

The two folders are combined into one nnU-Net dataset (via symbolic links, nothing is copied before
``convert-brats``) whose ``splits_final.json`` trains fold 0 on the training folder only and validates on the
test folder only, so ``nnunet-gmd evaluate -f 0`` scores exactly the test cases. Labels of test cases are used
for scoring only; nnU-Net's fingerprint sees their image size and spacing (MRI z-scoring uses no dataset-wide
statistics).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnunet_gmd.atomic import write_json
from nnunet_gmd.availability import AVAILABILITY_FILE
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


SEQUENCES = ("t1", "t1ce", "t2", "flair")   # convert-brats' channel names
DROP_SEED = 0


def parse_drop_train(spec: str) -> dict[str, float]:
    """``"t1ce=0.5,t1=0.25"`` -> ``{"t1ce": 0.5, "t1": 0.25}``: the fraction of training cases without each."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name not in SEQUENCES:
            raise UserError(f"--drop-train: unknown sequence {name!r} (use {', '.join(SEQUENCES)})")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"--drop-train: {part!r} needs a fraction in (0, 1], as in t1ce=0.5")
        if name in out:
            raise UserError(f"--drop-train: {name} is given twice")
        out[name] = fraction
    if not out:
        raise UserError("--drop-train: expected SEQ=FRACTION[,SEQ=FRACTION...], e.g. t1ce=0.5,t1=0.25")
    return out


def dropped_availability(train: Sequence[str], drop: dict[str, float], seed: int = DROP_SEED) -> dict[str, list[str]]:
    """Per training case, the sequences it keeps: for each dropped sequence a seeded ``round(f * n)`` cases lose
    it (independently per sequence). A case never loses its last sequence; ``--drop-train`` says so when that
    happens."""
    rng = np.random.default_rng(seed)
    keep = {case: list(SEQUENCES) for case in train}
    for name in SEQUENCES:                       # a fixed order, so the draw does not depend on the spec's order
        if name not in drop:
            rng.permutation(len(train))          # the stream stays aligned whichever sequences are dropped
            continue
        n = int(round(drop[name] * len(train)))
        for i in rng.permutation(len(train))[:n]:
            case = train[int(i)]
            if len(keep[case]) > 1:
                keep[case].remove(name)
    return keep


def run_benchmark(train_dir: Path, test_dir: Path, out_dir: Path, preset: Preset, methods: Sequence[Method],
                  device: str, fresh: bool = False, seeds: int = 1,
                  drop_train: Optional[dict[str, float]] = None) -> dict[str, Path]:
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
    if drop_train:
        settings["drop_train"] = drop_train   # another availability is another run: not mixed into this folder
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
        if drop_train:   # availability only: the trainers read it, no image is changed
            write_json(ws.raw / dataset_name / AVAILABILITY_FILE, dropped_availability(train, drop_train))
    ws.run_step("convert", f"[2/{total}] convert to an nnU-Net dataset (convert-brats)", convert)

    def plan() -> None:
        plan_and_preprocess(ws, DATASET_ID, dataset_name, preset)
        write_split(ws, dataset_name, train, test)
    ws.run_step("plan", f"[3/{total}] nnU-Net planning and preprocessing ({preset.plans_name})", plan)

    train_and_evaluate_all(ws, DATASET_ID, preset, methods, device, first_step=4, total_steps=total,
                           seeds=seeds)

    details = [f"training set: {len(train)} cases from {train_dir}; test set: {len(test)} cases from {test_dir}"]
    if drop_train:
        record = json.loads((ws.raw / dataset_name / AVAILABILITY_FILE).read_text())
        lost = {name: sum(name not in v for v in record.values()) for name in SEQUENCES}
        details.append("incomplete training data (--drop-train " + ",".join(f"{k}={v:g}" for k, v in drop_train.items())
                       + "): cases without " + ", ".join(f"{k} {n}/{len(train)}" for k, n in lost.items() if n)
                       + f"; {sum(len(v) < len(SEQUENCES) for v in record.values())} incomplete cases; the test "
                       f"cases are complete")
    return write_results(ws, methods, preset, dataset_name, "benchmark_results",
                         "nnunet-gmd benchmark: BraTS missing-modality Dice", details, started, total,
                         extra={"train_cases": train, "test_cases": test}, seeds=seeds)
