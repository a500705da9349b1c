"""``nnunet-gmd demo``: the whole pipeline on built-in phantoms, no download; about 7 min on 2 CPU cores.

Steps: generate BraTS-like phantoms -> ``convert-brats`` -> nnU-Net planning/preprocessing (reduced plans) ->
train GMD k=5 (feature fusion) and stock nnU-Net under one budget -> evaluate both under all 15 subsets -> compare.
Each finished step is reused when the command runs again; ``--fresh`` starts over.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunet_gmd.errors import UserError
from nnunet_gmd.demo.phantoms import write_brats_like_cases
from nnunet_gmd.demo.pipeline import Method, total_steps, train_and_evaluate_all, write_results
from nnunet_gmd.demo.planning import plan_and_preprocess, write_split
from nnunet_gmd.demo.presets import Preset
from nnunet_gmd.demo.workspace import Workspace

DATASET_ID = 990
DATASET_NAME = "Phantoms"


@dataclass(frozen=True)
class DemoData:
    """The generated dataset: ``n_cases`` phantoms of ``size``^3 voxels at 1 mm; the last ``n_test`` are tested."""

    n_cases: int = 12
    n_test: int = 3
    size: int = 32
    seed: int = 0

    def check(self) -> None:
        if self.size < 24:
            raise UserError(f"--size must be at least 24 voxels, got {self.size}")
        if self.n_test < 1 or self.n_cases - self.n_test < 1:
            raise UserError(f"need at least one training and one test case; got --cases {self.n_cases} "
                            f"--test-cases {self.n_test}")


def run_demo(out_dir: Path, preset: Preset, methods: Sequence[Method], data: DemoData, device: str,
             fresh: bool = False, seeds: int = 1) -> dict[str, Path]:
    """Run (or resume) the demo in ``out_dir``; returns the paths of the results files."""
    data.check()
    settings = {"command": "demo", "data": data.__dict__, "preset": preset.as_dict()}
    ws = Workspace(out_dir, settings, fresh=fresh)
    started = time.monotonic()
    total = total_steps(len(methods), seeds)
    print(f"nnunet-gmd demo in {ws.root}: {data.n_cases} phantoms ({data.size}^3 voxels, 1 mm), "
          f"{data.n_cases - data.n_test} train / {data.n_test} test; {preset.describe()}; device {device}")
    phantoms = ws.root / "phantoms"
    dataset_name = f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"

    ws.run_step("phantoms", f"[1/{total}] generate {data.n_cases} BraTS-like phantoms",
                lambda: write_brats_like_cases(phantoms, data.n_cases, (data.size,) * 3, data.seed, progress=True))

    def convert() -> None:
        from nnunet_gmd.nnunet.convert_brats import convert_brats
        convert_brats(phantoms, DATASET_ID, DATASET_NAME, raw_root=ws.raw, overwrite=True)
    ws.run_step("convert", f"[2/{total}] convert to an nnU-Net dataset (convert-brats)", convert)

    case_ids = [f"Phantom_{i:03d}" for i in range(data.n_cases)]

    def plan() -> None:
        plan_and_preprocess(ws, DATASET_ID, dataset_name, preset)
        write_split(ws, dataset_name, case_ids[: -data.n_test], case_ids[-data.n_test:])
    ws.run_step("plan", f"[3/{total}] nnU-Net planning and preprocessing ({preset.plans_name})", plan)

    train_and_evaluate_all(ws, DATASET_ID, preset, methods, device, first_step=4, total_steps=total,
                           seeds=seeds)

    details = [f"data: {data.n_cases - data.n_test} training / {data.n_test} test phantoms, {data.size}^3 voxels "
               f"at 1 mm (seed {data.seed})"]
    return write_results(ws, methods, preset, dataset_name, "demo_results",
                         "nnunet-gmd demo: missing-modality Dice on phantoms", details, started, total,
                         seeds=seeds)
