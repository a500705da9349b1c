"""The shared back half of the demo and the benchmark: train each method, evaluate it under all subsets, compare.

Training is ``nnUNetv2_train`` with each method's trainer class under one :class:`~nnunet_gmd.demo.presets.Budget`;
evaluation is ``nnunet-gmd evaluate`` on fold 0, whose validation split is the test set (see
:func:`nnunet_gmd.demo.planning.write_split`); the side-by-side heatmaps come from ``nnunet-gmd compare``.

``seeds`` > 1 repeats the training of every method: seed k trains with ``NNUNET_GMD_SEED=k`` into its own
``nnUNet_results`` tree and is evaluated into its own report folder (seed 0 keeps the single-run layout, see
:mod:`nnunet_gmd.demo.workspace`). The results table then shows mean ± sd over seeds, and the paired differences
(:mod:`nnunet_gmd.demo.paired`) use the seed-averaged per-case values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from nnunet_gmd.atomic import write_json
from nnunet_gmd.errors import UserError
from nnunet_gmd.demo.paired import remove_stale_paired_differences, write_paired_differences
from nnunet_gmd.demo.planning import plans_summary
from nnunet_gmd.demo.presets import Preset
from nnunet_gmd.demo.results import Results
from nnunet_gmd.demo.tools import nnunet_gmd_command, run_tool, tool
from nnunet_gmd.demo.workspace import Workspace, reports_root, results_root, seed_suffix
from nnunet_gmd.nnunet.trainer_base import SEED_ENV
from nnunet_gmd.report import REPORT_JSON


@dataclass(frozen=True)
class Method:
    key: str        # what users type (--methods)
    trainer: str    # nnU-Net trainer class
    label: str      # column name in tables and plots


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("stock", "nnUNetTrainerBudget", "nnUNet (zero-fill)"),
    Method("stock_complete", "nnUNetTrainerBudget_complete", "nnUNet (complete cases)"),
    Method("dropout", "nnUNetTrainerModalityDropout", "ModalityDropout"),
    Method("stock_adamw", "nnUNetTrainerBudget_AdamW", "nnUNet AdamW (zero-fill)"),
    Method("dropout_adamw", "nnUNetTrainerModalityDropout_AdamW", "ModalityDropout AdamW"),
    Method("ds", "nnUNetTrainerDS", "DS"),
    Method("ds_sgd", "nnUNetTrainerDS_SGD", "DS SGD+warm-up"),
    Method("ds_w1", "nnUNetTrainerDS_W1", "DS width 1.0"),
    Method("ds_w05", "nnUNetTrainerDS_W05", "DS width 0.5"),
    Method("gmd", "nnUNetTrainerGMD", "GMD"),
    Method("gmd_k5", "nnUNetTrainerGMD_k5", "GMD k=5"),
    Method("ds_ff", "nnUNetTrainerDS_FF", "DS-FF"),
    Method("ds_ff_mv", "nnUNetTrainerDS_FF_MV", "DS-FF mean+var"),
    Method("ds_ff_mv_w1", "nnUNetTrainerDS_FF_MV_W1", "DS-FF mean+var width 1.0"),
    Method("ds_ff_w1", "nnUNetTrainerDS_FF_W1", "DS-FF width 1.0"),
    Method("ds_ff_att", "nnUNetTrainerDS_FF_ATT", "DS-FF attention fusion"),
    Method("ds_ff_kd", "nnUNetTrainerDS_FF_KD", "DS-FF self-distillation"),
    Method("ds_ff_att_kd", "nnUNetTrainerDS_FF_ATT_KD", "DS-FF attention + self-distillation"),
    Method("gmd_ff", "nnUNetTrainerGMD_FF", "GMD-FF"),
    Method("gmd_k5_ff", "nnUNetTrainerGMD_k5_FF", "GMD-FF k=5"),
    Method("gmd_k5_ff_mv_w1", "nnUNetTrainerGMD_k5_FF_MV_W1", "GMD-FF mean+var k=5 width 1.0"),
    Method("ds_lw", "nnUNetTrainerDS_LW", "DS-LW"),
    Method("gmd_lw", "nnUNetTrainerGMD_LW", "GMD-LW"),
    Method("gmd_amortized", "nnUNetTrainerGMD_amortized", "GMD amortised N=32"),
    Method("gmd_amortized_sub", "nnUNetTrainerGMD_amortized_sub", "GMD amortised sub-batch N=8"),
    Method("gmd_m1", "nnUNetTrainerGMD_m1", "GMD M+1 objectives"),
    Method("gmd_amortized_w1", "nnUNetTrainerGMD_amortized_W1", "GMD amortised width 1.0"),
)}


def parse_methods(keys: Sequence[str]) -> list[Method]:
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if len(set(keys)) != len(keys):
        raise UserError(f"a method is listed twice: {' '.join(keys)}")
    return [METHODS[k] for k in keys]


def report_path(ws: Workspace, method: Method, seed: int = 0) -> Path:
    return reports_root(ws.root, seed) / method.key / REPORT_JSON


def step_name(kind: str, method: Method, seed: int = 0) -> str:
    """Workspace step of ``kind`` (train / evaluate) for one method and seed; seed 0 keeps the single-run name."""
    return f"{kind}_{method.key}{seed_suffix(seed)}"


def _training_env(ws: Workspace, preset: Preset, seed: int = 0) -> dict[str, str]:
    extra = preset.budget.env()
    extra.update({"nnUNet_results": str(results_root(ws.root, seed)), SEED_ENV: str(seed)})
    if preset.cpu_friendly:
        # One augmentation worker and one export worker: more only adds process start-up on 2 cores.
        # nnU-Net's final all-modality validation is skipped: ``evaluate`` scores the same cases under all subsets.
        extra.update({"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "NNUNET_GMD_FINAL_VALIDATION": "0"})
    return ws.env(extra)


def train(ws: Workspace, dataset_id: int, preset: Preset, method: Method, device: str, seed: int = 0) -> None:
    """``nnUNetv2_train`` fold 0; ``--c`` resumes an interrupted run from its latest checkpoint."""
    command = [tool("nnUNetv2_train"), str(dataset_id), preset.configuration, "0", "-tr", method.trainer,
               "-p", preset.plans_name, "-device", device, "--c"]
    run_tool(command, _training_env(ws, preset, seed), ws.logs / f"{step_name('train', method, seed)}.log",
             f"train {method.label}{_seed_note(seed)}", total_epochs=preset.budget.epochs)


def _seed_note(seed: int) -> str:
    return f" (seed {seed})" if seed else ""


def evaluate(ws: Workspace, dataset_id: int, preset: Preset, method: Method, device: str, seed: int = 0) -> Path:
    """``nnunet-gmd evaluate`` on fold 0 (= the test cases) under all channel subsets."""
    out = report_path(ws, method, seed).parent
    command = nnunet_gmd_command("evaluate", "-d", str(dataset_id), "-c", preset.configuration, "-f", "0",
                                 "-tr", method.trainer, "-p", preset.plans_name, "-o", str(out), "-device", device)
    if not preset.tta:
        command.append("--disable_tta")
    if not preset.hd95:
        command.append("--no-hd95")
    if preset.cpu_friendly:
        command += ["-npp", "0", "-nps", "0"]
    run_tool(command, _training_env(ws, preset, seed), ws.logs / f"{step_name('evaluate', method, seed)}.log",
             f"evaluate {method.label}{_seed_note(seed)} (15 subsets)")
    return report_path(ws, method, seed)


def compare(ws: Workspace, methods: Sequence[Method], out_dir: Path) -> None:
    """``nnunet-gmd compare``: subsets x methods table and side-by-side heatmaps."""
    command = nnunet_gmd_command("compare", *[str(report_path(ws, m)) for m in methods],
                                 "--labels", *[m.label for m in methods], "-o", str(out_dir))
    run_tool(command, ws.env(), ws.logs / "compare.log", "compare")


def total_steps(n_methods: int, seeds: int) -> int:
    """Steps of a run: 3 preparation steps, train and evaluate per method and seed, the results."""
    return 3 + 2 * n_methods * seeds + 1


def train_and_evaluate_all(ws: Workspace, dataset_id: int, preset: Preset, methods: Sequence[Method],
                           device: str, first_step: int, total_steps: int, seeds: int = 1) -> None:
    """Per seed: train every method, then evaluate every method; each is a reusable step.

    Seed 0 first, so one complete comparison exists before any repeat starts.
    """
    step = first_step
    for seed in range(seeds):
        for method in methods:
            ws.run_step(step_name("train", method, seed),
                        f"[{step}/{total_steps}] train {method.label}{_seed_note(seed)} ({method.trainer}, "
                        f"{preset.budget.describe()})",
                        lambda m=method, s=seed: train(ws, dataset_id, preset, m, device, s))
            step += 1
        for method in methods:
            ws.run_step(step_name("evaluate", method, seed),
                        f"[{step}/{total_steps}] evaluate {method.label}{_seed_note(seed)} on the test cases "
                        f"under all 15 subsets",
                        lambda m=method, s=seed: evaluate(ws, dataset_id, preset, m, device, s))
            step += 1


def _mean_seconds(seconds: dict[str, float], kind: str, method: Method, seeds: int) -> float:
    values = [seconds[k] for k in (step_name(kind, method, s) for s in range(seeds)) if k in seconds]
    return sum(values) / len(values) if values else float("nan")


def write_results(ws: Workspace, methods: Sequence[Method], preset: Preset, dataset_name: str, stem: str,
                  title: str, data_details: Sequence[str], started: float, step: int,
                  extra: Optional[dict] = None, seeds: int = 1) -> dict[str, Path]:
    """The last step of a run: ``compare``, the subsets x regions x methods table, paired differences, timings.

    ``data_details`` describe the cases; the plans, budget and per-method wall-clock lines are added here.
    ``compare`` shows seed 0; the table averages over the seeds.
    """
    print(f"- [{step}/{step}] compare", flush=True)
    compare(ws, methods, ws.root)
    plans = plans_summary(ws.preprocessed / dataset_name / f"{preset.plans_name}.json", preset.configuration)
    seconds = ws.step_seconds()
    details = [*data_details,
               f"nnU-Net: plans {plans['plans']}, configuration {plans['configuration']}, spacing "
               f"{plans['spacing_mm']} mm, patch {plans['patch_size']}, batch {plans['batch_size']}, "
               f"features {plans['features_per_stage']}",
               f"budget per method: {preset.budget.describe()}; test-time mirroring: {'on' if preset.tta else 'off'}",
               f"wall-clock seconds per method (train / evaluate{', mean over seeds' if seeds > 1 else ''}): "
               + ", ".join(f"{m.label} {_mean_seconds(seconds, 'train', m, seeds):.0f} / "
                           f"{_mean_seconds(seconds, 'evaluate', m, seeds):.0f}" for m in methods)]
    if seeds > 1:
        details.append(f"training seeds: {seeds} per method ({SEED_ENV}=0..{seeds - 1}); values are means over "
                       f"seeds, ± the standard deviation over seeds")
    results = Results([[report_path(ws, m, s) for s in range(seeds)] for m in methods], [m.label for m in methods])
    paths = results.write(ws.root, stem, title, details,
                          extra={"plans": plans, "budget": preset.budget.__dict__, "preset": preset.name,
                                 "step_seconds": seconds, **(extra or {})})
    print()
    print(paths["md"].read_text())
    if len(methods) > 1:
        paired = write_paired_differences(ws.root, [m.key for m in methods], {m.key: m.label for m in methods},
                                          n_seeds=seeds)
        paths.update({f"paired_{ext}": path for ext, path in paired.items()})
        print(paired["md"].read_text())
    elif remove_stale_paired_differences(ws.root):
        print(f"- one method, so no paired differences; removed the earlier run's {ws.root}/paired_differences.*")
    this_run = time.monotonic() - started
    write_json(ws.root / "timings.json", {"this_invocation_seconds": round(this_run, 1),
                                                  "step_seconds": seconds})
    paired_files = "paired_differences.md/.csv/.json/.png, " if "paired_md" in paths else ""
    print(f"this run: {this_run / 60:.1f} min; results in {ws.root}: {stem}.md/.csv/.json/.png, {paired_files}"
          f"missing_modality_comparison.md/.png, reports/<method>/ (per-method heatmaps)")
    return paths
