"""Smoke run of ``nnunet-gmd demo``: phantoms -> nnU-Net plans -> GMD and stock training -> 15-subset evaluation.

A tiny budget (1 epoch of 2 iterations), so the numbers mean nothing; what is checked is that every step runs
through the real tools, the outputs are complete and consistent, a re-run reuses all steps, and a run with other
settings in the same folder is refused.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from nnunet_gmd.demo.tools import nnunet_gmd_command

SMOKE = ["--cases", "3", "--test-cases", "1", "--size", "32", "--epochs", "1", "--iterations", "2",
         "--val-iterations", "1", "-device", "cpu"]


def _nnunet_gmd(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_GMD_"))}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return subprocess.run(nnunet_gmd_command(*args), capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_demo_smoke_runs_end_to_end_and_reuses_finished_steps(tmp_path):
    out = tmp_path / "demo_output"
    first = _nnunet_gmd("demo", "-o", str(out), *SMOKE)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    results = json.loads((out / "demo_results.json").read_text())
    assert results["methods"] == ["nnUNet (zero-fill)", "GMD-FF k=5"]
    assert results["regions"] == ["whole tumor", "tumor core", "enhancing tumor"]
    assert results["test_cases"] == ["Phantom_002"]
    assert len(results["dice"]) == 15
    values = [v for subset in results["dice"].values() for region in subset.values() for v in region.values()]
    assert len(values) == 15 * 3 * 2
    assert all(v is None or 0.0 <= v <= 1.0 for v in values)
    assert any(v is not None for v in values)
    # The reduced configuration came from nnU-Net's plans mechanism with the narrow network.
    assert results["plans"]["configuration"] == "3d_small" and results["plans"]["features_per_stage"][0] == 16
    # Both methods trained under the same explicit budget; GMD really used the DS network and GMD ...
    for trainer in ("nnUNetTrainerBudget", "nnUNetTrainerGMD_k5_FF"):
        fold = out / "nnUNet_results" / "Dataset990_Phantoms" / f"{trainer}__nnUNetPlans_cpu__3d_small" / "fold_0"
        debug = json.loads((fold / "debug.json").read_text())
        assert (debug["num_epochs"], debug["num_iterations_per_epoch"]) == ("1", "2")
        assert (fold / "checkpoint_final.pth").is_file()
    # ... and the feature-fusion network at full width with mean + variance fusion, recorded in its plans.
    saved = json.loads((out / "nnUNet_results" / "Dataset990_Phantoms"
                        / "nnUNetTrainerGMD_k5_FF__nnUNetPlans_cpu__3d_small" / "plans.json").read_text())
    assert saved["configurations"]["3d_small"]["nnunet_gmd_fusion"] == "mean_var"
    assert saved["configurations"]["3d_small"]["nnunet_gmd_width_factor"] == 1.0
    gmd_report = json.loads((out / "reports" / "gmd_k5_ff" / "missing_modality_report.json").read_text())
    assert gmd_report["network"] == "dynamic sharing"
    split = json.loads((out / "nnUNet_preprocessed" / "Dataset990_Phantoms" / "splits_final.json").read_text())
    assert split == [{"train": ["Phantom_000", "Phantom_001"], "val": ["Phantom_002"]}]
    for name in ("demo_results.md", "demo_results.csv", "demo_results.png", "missing_modality_comparison.md",
                 "missing_modality_comparison.png", "reports/stock/missing_modality_report.png",
                 "reports/gmd_k5_ff/missing_modality_report.png"):
        assert (out / name).stat().st_size > 0, name
    assert "Mean Dice per method" in first.stdout and "| t1+t1ce+t2+flair |" in first.stdout

    again = _nnunet_gmd("demo", "-o", str(out), *SMOKE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, reused") == 7      # phantoms, convert, plan, 2x train, 2x evaluate

    other = _nnunet_gmd("demo", "-o", str(out), *SMOKE[:-2], "--epochs", "3")
    assert other.returncode == 2
    assert "other settings" in other.stderr and "--fresh" in other.stderr and "Traceback" not in other.stderr
