"""Plan and preprocess with nnU-Net's own tools, and pin the train/test split.

Reduced settings use only nnU-Net's plans mechanism: ``nnUNetv2_plan_and_preprocess -overwrite_target_spacing
-gpu_memory_target -overwrite_plans_name`` for the resolution and patch size, then a named configuration in the
plans file that ``inherits_from`` 3d_fullres and overrides only the network width (as nnU-Net's plans
documentation describes). It shares 3d_fullres' preprocessed data, and every trainer reads it like any other
configuration (``-p nnUNetPlans_cpu -c 3d_small``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

from nnunet_gmd.atomic import write_json
from nnunet_gmd.errors import UserError
from nnunet_gmd.demo.presets import Preset
from nnunet_gmd.demo.tools import run_tool, tool
from nnunet_gmd.demo.workspace import Workspace


def plan_and_preprocess(ws: Workspace, dataset_id: int, dataset_name: str, preset: Preset) -> Path:
    """``nnUNetv2_plan_and_preprocess`` for 3d_fullres with the preset's overrides; returns the plans file.

    One process for fingerprint, planning and preprocessing (process start-up is a large share on a small CPU).
    The narrow configuration is added afterwards: it shares 3d_fullres' preprocessed data.
    """
    workers = "1" if preset.cpu_friendly else "4"
    command = [tool("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres", "-np", workers,
               "-npfp", workers]
    if preset.target_spacing_mm:
        command += ["-overwrite_target_spacing"] + [str(float(preset.target_spacing_mm))] * 3
    if preset.gpu_memory_target_gb:
        command += ["-gpu_memory_target", str(preset.gpu_memory_target_gb)]
    if preset.plans_name != "nnUNetPlans":
        command += ["-overwrite_plans_name", preset.plans_name]
    run_tool(command, ws.env(), ws.logs / "plan_and_preprocess.log", "nnU-Net plan and preprocess")
    plans_file = ws.preprocessed / dataset_name / f"{preset.plans_name}.json"
    if preset.derived_configuration:
        add_narrow_configuration(plans_file, preset.derived_configuration, preset.base_features,
                                 preset.max_features)
    return plans_file


def narrow_features(n_stages: int, base: int, cap: int) -> list[int]:
    """nnU-Net's feature rule (double per stage, capped) with another base and cap."""
    return [min(cap, base * 2 ** i) for i in range(n_stages)]


def add_narrow_configuration(plans_file: Path, name: str, base_features: int, max_features: int) -> None:
    """Add configuration ``name`` = 3d_fullres with a narrower U-Net, written back atomically."""
    plans = json.loads(Path(plans_file).read_text())
    configurations = plans["configurations"]
    if "3d_fullres" not in configurations:
        raise UserError(f"{plans_file} has no 3d_fullres configuration to derive {name} from")
    architecture = copy.deepcopy(configurations["3d_fullres"]["architecture"])
    kwargs = architecture["arch_kwargs"]
    kwargs["features_per_stage"] = narrow_features(int(kwargs["n_stages"]), base_features, max_features)
    configurations[name] = {"inherits_from": "3d_fullres", "architecture": architecture}
    write_json(plans_file, plans)


def write_split(ws: Workspace, dataset_name: str, train: Sequence[str], test: Sequence[str]) -> Path:
    """A one-fold ``splits_final.json``: fold 0 trains on ``train`` and validates on ``test``.

    nnU-Net then never trains on a test case, and ``nnunet-gmd evaluate -f 0`` scores exactly the test cases.
    """
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise UserError(f"cases in both the training and the test set: {', '.join(overlap)}")
    if not train or not test:
        raise UserError(f"need at least one training and one test case (got {len(train)} and {len(test)})")
    path = ws.preprocessed / dataset_name / "splits_final.json"
    write_json(path, [{"train": sorted(train), "val": sorted(test)}])
    return path


def plans_summary(plans_file: Path, configuration: str) -> dict:
    """Spacing, patch size, batch size and features of a configuration (resolved like nnU-Net does)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # heavy import, only here

    manager = PlansManager(str(plans_file))
    cm = manager.get_configuration(configuration)
    return {"plans": manager.plans_name, "configuration": configuration,
            "spacing_mm": [round(float(s), 3) for s in cm.spacing], "patch_size": [int(p) for p in cm.patch_size],
            "batch_size": int(cm.batch_size),
            "features_per_stage": list(cm.network_arch_init_kwargs["features_per_stage"])}
