"""Building blocks of the demo/benchmark pipeline: presets, plans derivation, workspace reuse, tool runner, results."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_gmd.errors import UserError
from nnunet_gmd.demo.pipeline import METHODS, parse_methods
from nnunet_gmd.demo.planning import add_narrow_configuration, narrow_features
from nnunet_gmd.demo.presets import PRESETS, Budget
from nnunet_gmd.demo.results import Results
from nnunet_gmd.demo.tools import run_tool
from nnunet_gmd.demo.workspace import Workspace
from nnunet_gmd.nnunet.trainer_base import budget_from_env
from nnunet_gmd.subsets import all_subsets

CHANNELS = ["t1", "t1ce", "t2", "flair"]
REGIONS = ["whole tumor", "tumor core", "enhancing tumor"]


def test_budget_reaches_trainers_through_the_variables_they_read():
    budget = Budget(7, 11, 3)
    assert budget_from_env(budget.env()) == {"num_epochs": 7, "num_iterations_per_epoch": 11,
                                             "num_val_iterations_per_epoch": 3}
    preset = PRESETS["cpu"].with_budget(epochs=2)
    assert (preset.budget.epochs, preset.budget.iterations_per_epoch) == (2, PRESETS["cpu"].budget.iterations_per_epoch)
    full = PRESETS["full"]
    assert (full.plans_name, full.configuration, full.target_spacing_mm, full.base_features, full.tta) == \
        ("nnUNetPlans", "3d_fullres", None, None, True)
    assert full.budget == Budget(1000, 250, 50)          # nnU-Net's own defaults


def test_methods_are_validated():
    assert [m.trainer for m in parse_methods(["stock", "gmd_k5"])] == ["nnUNetTrainerBudget", "nnUNetTrainerGMD_k5"]
    with pytest.raises(UserError, match="unknown method 'gdm'"):
        parse_methods(["gdm"])
    with pytest.raises(UserError, match="twice"):
        parse_methods(["gmd", "gmd"])
    assert set(METHODS) == {"stock", "stock_complete", "dropout", "stock_adamw", "dropout_adamw", "ds", "ds_sgd", "ds_w1",
                            "gmd", "gmd_k5", "ds_ff", "ds_ff_mv", "gmd_ff", "gmd_k5_ff", "ds_lw", "gmd_lw",
                            "gmd_amortized", "gmd_amortized_sub", "gmd_m1", "gmd_amortized_w1", "ds_w05",
                            "ds_ff_mv_w1", "ds_ff_w1", "gmd_k5_ff_mv_w1", "ds_ff_att",
                            "ds_ff_kd", "ds_ff_att_kd"}
    from nnunet_gmd.nnunet import baselines, trainers

    from nnunet_gmd.demo.cli import BENCHMARK_METHODS, DEMO_METHODS, METHOD_KEYS

    assert METHOD_KEYS == tuple(METHODS)
    # The defaults are the best measured network (feature fusion) against the fair AdamW baselines (runs 7-11).
    assert [METHODS[k].trainer for k in DEMO_METHODS] == ["nnUNetTrainerBudget", "nnUNetTrainerGMD_k5_FF"]
    # predict / evaluate / export-bundle default to the trainer the demo and the README's quick start train
    from nnunet_gmd.nnunet.cli import DEFAULT_TRAINER
    assert DEFAULT_TRAINER == METHODS[DEMO_METHODS[1]].trainer
    assert [METHODS[k].trainer for k in BENCHMARK_METHODS] == [
        "nnUNetTrainerBudget_AdamW", "nnUNetTrainerModalityDropout_AdamW", "nnUNetTrainerDS_FF", "nnUNetTrainerGMD_k5_FF"]
    for method in METHODS.values():  # every method names a trainer class that our nnUNet_extTrainer shim exports
        assert method.trainer in baselines.__all__ + trainers.__all__, method


def test_drop_train_is_parsed_and_drawn_reproducibly():
    from nnunet_gmd.demo.benchmark import dropped_availability, parse_drop_train

    assert parse_drop_train("t1ce=0.5, T1=0.25") == {"t1ce": 0.5, "t1": 0.25}
    for bad, fragment in [("pd=0.5", "unknown sequence 'pd'"), ("t1ce=1.5", r"fraction in \(0, 1\]"),
                          ("t1ce", r"fraction in \(0, 1\]"), ("t1=0.1,t1=0.2", "twice"), (",", "expected SEQ")]:
        with pytest.raises(UserError, match=fragment):
            parse_drop_train(bad)
    cases = [f"c{i:02d}" for i in range(16)]
    keep = dropped_availability(cases, {"t1ce": 0.5, "t1": 0.25})
    assert keep == dropped_availability(cases, {"t1": 0.25, "t1ce": 0.5})     # the spec's order does not matter
    assert sum("t1ce" not in v for v in keep.values()) == 8 and sum("t1" not in v for v in keep.values()) == 4
    assert all("t2" in v and "flair" in v for v in keep.values())
    everything = dropped_availability(cases[:3], {m: 1.0 for m in ("t1", "t1ce", "t2", "flair")})
    assert all(len(v) == 1 for v in everything.values())    # never the last sequence


def _plans(n_stages: int = 5) -> dict:
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n_stages, "features_per_stage": [32, 64, 128, 256, 320],
                            "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * n_stages, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
                            "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return {"dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans_cpu",
            "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_cpu_3d_fullres", "batch_size": 2,
                                              "patch_size": [48, 64, 48], "spacing": [3.0, 3.0, 3.0],
                                              "architecture": arch}}}


def test_narrow_configuration_inherits_everything_but_the_width(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    assert narrow_features(5, 16, 128) == [16, 32, 64, 128, 128]
    plans_file = tmp_path / "nnUNetPlans_cpu.json"
    plans_file.write_text(json.dumps(_plans()))
    add_narrow_configuration(plans_file, "3d_small", 16, 128)
    manager = PlansManager(str(plans_file))          # nnU-Net's own resolution of inherits_from
    small, full = manager.get_configuration("3d_small"), manager.get_configuration("3d_fullres")
    assert list(small.network_arch_init_kwargs["features_per_stage"]) == [16, 32, 64, 128, 128]
    assert list(full.network_arch_init_kwargs["features_per_stage"]) == [32, 64, 128, 256, 320]
    assert small.data_identifier == full.data_identifier      # shares the preprocessed data
    assert list(small.patch_size) == [48, 64, 48] and small.batch_size == 2


def test_workspace_reuses_steps_and_refuses_other_settings(tmp_path):
    root = tmp_path / "run"
    ws = Workspace(root, {"a": 1})
    calls = []
    assert ws.run_step("one", "step one", lambda: calls.append(1))
    assert not Workspace(root, {"a": 1}).run_step("one", "step one", lambda: calls.append(2))
    assert calls == [1]
    assert "one" in ws.step_seconds()
    with pytest.raises(UserError, match="other settings.*a differ.*--fresh"):
        Workspace(root, {"a": 2})
    fresh = Workspace(root, {"a": 2}, fresh=True)
    assert not fresh.is_done("one")
    env = fresh.env()
    assert env["nnUNet_raw"] == str(fresh.raw) and Path(env["nnUNet_extTrainer"]).is_dir()


def test_workspace_never_deletes_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        Workspace(foreign, {})
    with pytest.raises(UserError, match="not made by nnunet-gmd"):
        Workspace(foreign, {}, fresh=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_run_tool_logs_output_and_reports_failures_with_the_log(tmp_path, capsys):
    log = tmp_path / "tool.log"
    script = "import sys\nfor e in range(3):\n    print(f'2026-01-01 00:00:00.0: Epoch {e}')\n" \
             "    print('Pseudo dice [np.float32(0.5), np.float32(0.25)]')\n    print('Epoch time: 0.1 s')\n"
    run_tool([sys.executable, "-c", script], {}, log, "fake training", total_epochs=3)
    assert sum(line.startswith("Epoch time") for line in log.read_text().splitlines()) == 3
    shown = capsys.readouterr().err
    assert "3/3" in shown and "pseudo Dice 0.5 0.25" in shown     # epoch bar and latest pseudo Dice
    with pytest.raises(UserError) as e:
        run_tool([sys.executable, "-c", "print('loading'); raise SystemExit('plans file is broken')"], {}, log,
                 "fake planning")
    assert "fake planning failed (exit code 1)" in str(e.value) and str(log) in str(e.value)
    assert "plans file is broken" in str(e.value)
    with pytest.raises(UserError, match="not installed"):
        run_tool(["/nonexistent/nnUNetv2_train"], {}, log, "missing tool")


def _report(path: Path, trainer: str, dice_of) -> Path:
    subsets = []
    for s in all_subsets(4):
        subsets.append({"available": [CHANNELS[i] for i in s],
                        "metrics": {r: {"dice": dice_of(s, r)} for r in REGIONS}})
    report = {"trainer": trainer, "dataset": "Dataset991_X", "channels": CHANNELS, "regions": REGIONS,
              "cases": ["c1"], "subsets": subsets, "mean": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def test_results_table_means_and_plot(tmp_path, monkeypatch):
    # Method A is perfect with all modalities and 0.5 otherwise; B is 0.6 everywhere; ET of B undefined on t1.
    a = _report(tmp_path / "a.json", "A", lambda s, r: 1.0 if len(s) == 4 else 0.5)
    b = _report(tmp_path / "b.json", "B", lambda s, r: None if (s == (0,) and r == "enhancing tumor") else 0.6)
    results = Results([a, b], ["A", "B"])
    assert results.dice.shape == (15, 3, 2)
    means = results.means()
    assert np.allclose(means["full set"][:, 0], 1.0)
    assert np.allclose(means["missing modalities"][:, 0], 0.5)
    assert np.allclose(means["all subsets"][:, 0], (14 * 0.5 + 1.0) / 15)
    assert np.allclose(means["missing modalities"][:, 1], 0.6)   # the undefined value is skipped, not zero
    import nnunet_gmd.demo.results as results_module
    figures = []
    saver = results_module.save_figure
    monkeypatch.setattr(results_module, "save_figure", lambda fig, path, **kw: (figures.append(fig),
                                                                                saver(fig, path, **kw)))
    paths = results.write(tmp_path / "out", "bench", "test", ["8 training cases"])
    by_count_axes = figures[0].axes[-1]          # the last row: one line per method over 1-4 sequences
    plotted = [line.get_ydata() for line in by_count_axes.get_lines()]
    assert len(plotted) == 2 and np.allclose(plotted, [[0.5, 0.5, 0.5, 1.0], [0.6] * 4])
    md = paths["md"].read_text()
    means_row = next(line for line in md.splitlines() if line.startswith("| A |"))
    assert means_row.startswith(f"| A | {(14 * 0.5 + 1.0) / 15:.3f} |")   # first columns: the all-subsets means
    assert "| t1+t1ce+t2+flair | **1.000** | 0.600 |" in md
    assert "| t1 | 0.500 | **0.600** | 0.500 | **0.600** | **0.500** | n/a |" in md
    # By count: A is 0.5 with 1-3 sequences and 1.0 with all 4; there are 4, 6, 4 and 1 such subsets.
    counts, by_count, by_count_sd = results.by_count()
    assert counts == [1, 2, 3, 4] and np.allclose(by_count[:, 0], [0.5, 0.5, 0.5, 1.0])
    assert np.allclose(by_count[:, 1], 0.6) and np.isnan(by_count_sd).all()       # one seed: no spread
    assert "| A | 0.500 | 0.500 | 0.500 | 1.000 |" in md and "4 of 4 (1 subsets)" in md
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "available,n_available,region,method,dice" and len(rows) == 1 + 15 * 3 * 2
    data = json.loads(paths["json"].read_text())
    assert data["mean_dice"]["missing modalities"]["A"]["mean"] == 0.5
    assert data["dice"]["t1"]["enhancing tumor"]["B"] is None
    assert data["mean_dice_by_available_count"]["4"]["A"] == {"mean": 1.0, "sd_over_seeds": None}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(data["mean_dice"]["all subsets"]["B"]["enhancing tumor"])
