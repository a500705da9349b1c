"""Paired per-case statistics of a run folder, and training seeds through the pipeline (no real training).

The run folders are synthetic: a ``missing_modality_report.json`` and nnU-Net-style ``summary.json`` files per
subset, with per-case Dice values chosen by the test, so every expected number is known in advance.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from nnunet_gmd.cli import main
from nnunet_gmd.errors import UserError
from nnunet_gmd.demo.paired import (Bootstrap, PairedDifferences, bootstrap_interval, load_methods,
                                    remove_stale_paired_differences, seed_and_case_interval, seeds_of,
                                    write_paired_differences)
from nnunet_gmd.demo.per_case import case_scores
from nnunet_gmd.demo.workspace import reports_root
from nnunet_gmd.subsets import all_subsets

CHANNELS = ["t1", "t1ce", "t2", "flair"]
REGIONS = ["whole tumor", "tumor core", "enhancing tumor"]
REGION_KEYS = ["(1, 2, 3)", "(2, 3)", "(3,)"]          # how nnU-Net's save_summary_json names BraTS regions
CASES = [f"Case_{i:03d}" for i in range(6)]


def write_method(run: Path, key: str, dice, seed: int = 0, cases=CASES) -> Path:
    """A finished evaluation of ``key`` in run folder ``run``: ``dice(case_index, subset, region_index)``."""
    folder = reports_root(run, seed) / key
    entries = []
    for subset in all_subsets(len(CHANNELS)):
        name = "+".join(CHANNELS[i] for i in subset)
        per_case = [{"prediction_file": f"/x/predictions/{name}/{case}.nii.gz",
                     "reference_file": f"/x/gt/{case}.nii.gz",
                     "metrics": {k: {"Dice": dice(c, subset, r), "n_ref": 10} for r, k in enumerate(REGION_KEYS)}}
                    for c, case in enumerate(cases)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # a region undefined on every case stays NaN
            means = [float(np.nanmean([pc["metrics"][k]["Dice"] for pc in per_case])) for k in REGION_KEYS]
        (folder / "predictions" / name).mkdir(parents=True)
        # nnU-Net writes NaN as a bare token; json.dumps does the same.
        (folder / "predictions" / name / "summary.json").write_text(json.dumps({"metric_per_case": per_case}))
        entries.append({"available": [CHANNELS[i] for i in subset],
                        "metrics": {r: {"dice": m} for r, m in zip(REGIONS, means)}})
    report = {"trainer": key, "dataset": "Dataset991_X", "channels": CHANNELS, "regions": REGIONS,
              "cases": list(cases), "subsets": entries, "mean": {}}
    (folder / "missing_modality_report.json").write_text(json.dumps(report))
    return folder


def _full(subset) -> bool:
    return len(subset) == len(CHANNELS)


def test_case_scores_average_the_missing_subsets_and_the_full_set(tmp_path):
    # Case c scores 0.1*c on every missing-modality subset, except ET of T1 alone which is undefined (NaN);
    # with every channel WT 0.9, TC 0.6, ET 0.3.
    def dice(c, subset, r):
        if _full(subset):
            return [0.9, 0.6, 0.3][r]
        return math.nan if (subset == (0,) and r == 2) else 0.1 * c
    scores = case_scores(write_method(tmp_path, "ds", dice))
    assert scores.cases == CASES and scores.n_missing == 14 and scores.regions == REGIONS
    assert [scores.missing[c] for c in CASES] == pytest.approx([0.1 * i for i in range(6)])   # NaN skipped
    assert all(scores.full[c] == pytest.approx(0.6) for c in CASES)


def _noise(c: int) -> float:
    return [0.012, -0.007, 0.004, -0.011, 0.009, -0.003][c]


def test_a_consistent_gain_gets_an_interval_that_excludes_zero(tmp_path):
    base = lambda c, s, r: 0.3 + 0.08 * c                              # noqa: E731
    gain = [0.05 + _noise(c) for c in range(6)]                        # every case gains 0.04 .. 0.062
    write_method(tmp_path, "ds", base)
    write_method(tmp_path, "gmd", lambda c, s, r: base(c, s, r) + (gain[c] if not _full(s) else _noise(c)))
    methods = load_methods(tmp_path, ["ds", "gmd"], {"ds": "DS", "gmd": "GMD"})
    table = PairedDifferences(methods, Bootstrap(10000, 0.95, seed=0))
    missing, full = table.differences["missing"][0], table.differences["full"][0]
    assert (missing.method, missing.versus, missing.n) == ("GMD", "DS", 6)
    assert missing.mean == pytest.approx(np.mean(gain))
    assert 0 < missing.low < missing.mean < missing.high
    assert min(gain) <= missing.low and missing.high <= max(gain)       # a mean never leaves the data's range
    assert missing.excludes_zero and (missing.method_ahead, missing.versus_ahead, missing.ties) == (6, 0, 0)
    # On the full set the difference is pure noise around 0: the interval must include 0, 3 cases each way.
    assert full.mean == pytest.approx(np.mean([_noise(c) for c in range(6)]))
    assert full.low < 0 < full.high and full.excludes_zero is False
    assert (full.method_ahead, full.versus_ahead) == (3, 3)


def test_bootstrap_is_reproducible_with_its_seed_and_matches_the_normal_approximation():
    diff = np.random.default_rng(1).normal(0.02, 0.1, size=400)
    first = bootstrap_interval(diff, Bootstrap(4000, 0.95, seed=7))
    assert bootstrap_interval(diff, Bootstrap(4000, 0.95, seed=7)) == first
    assert bootstrap_interval(diff, Bootstrap(4000, 0.95, seed=8)) != first
    # For many cases the percentile interval approaches mean +- 1.96 standard errors.
    half = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)
    assert first[0] == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert first[1] == pytest.approx(diff.mean() + half, abs=0.15 * half)
    narrower = bootstrap_interval(diff, Bootstrap(4000, 0.5, seed=7))
    assert first[0] < narrower[0] < narrower[1] < first[1]
    for few in ([0.3], [0.3, 0.1]):                                        # one or two cases: no interval
        assert all(math.isnan(x) for x in bootstrap_interval(np.array(few), Bootstrap()))


def test_seeds_are_averaged_per_case_before_resampling(tmp_path):
    # Seed 0: GMD - DS = +0.10 on every case; seed 1: -0.02. Seed-averaged difference: +0.04.
    write_method(tmp_path, "ds", lambda c, s, r: 0.5)
    write_method(tmp_path, "ds", lambda c, s, r: 0.5, seed=1)
    write_method(tmp_path, "gmd", lambda c, s, r: 0.6)
    write_method(tmp_path, "gmd", lambda c, s, r: 0.48, seed=1)
    assert seeds_of(tmp_path, "gmd") == [0, 1]
    methods = load_methods(tmp_path, ["ds", "gmd"], {})
    d = PairedDifferences(methods).differences["missing"][0]
    assert d.mean == pytest.approx(0.04) and d.per_seed == pytest.approx([0.10, -0.02])
    assert d.low == pytest.approx(0.04) and d.high == pytest.approx(0.04)     # no case-to-case spread left
    assert d.excludes_zero
    # Resampling GMD's two seeds gives the seed mixes (0.6, 0.6), (0.6, 0.48) and (0.48, 0.48): the difference is
    # +0.10, +0.04 or -0.02 with probabilities 1/4, 1/2, 1/4, so the seed-and-case interval spans -0.02 .. +0.10.
    assert d.seed_low == pytest.approx(-0.02) and d.seed_high == pytest.approx(0.10)
    assert d.seed_interval_excludes_zero is False
    only_first = PairedDifferences(load_methods(tmp_path, ["ds", "gmd"], {}, n_seeds=1)).differences["missing"][0]
    assert only_first.mean == pytest.approx(0.10)
    with pytest.raises(UserError, match=r"reports_seed2/ds/missing_modality_report.json does not exist.*seed 2"):
        load_methods(tmp_path, ["ds", "gmd"], {}, n_seeds=3)


def test_identical_seeds_leave_only_the_case_interval_and_one_seed_gives_none(tmp_path):
    base = lambda c, s, r: 0.3 + 0.08 * c                              # noqa: E731
    gain = [0.05 + _noise(c) for c in range(6)]
    for seed in (0, 1, 2):                                             # three copies of the same two models
        write_method(tmp_path, "ds", base, seed=seed)
        write_method(tmp_path, "gmd", lambda c, s, r: base(c, s, r) + gain[c], seed=seed)
    write_method(tmp_path, "lw", lambda c, s, r: base(c, s, r) + 0.5 * gain[c])    # one seed only
    table = PairedDifferences(load_methods(tmp_path, ["ds", "gmd", "lw"], {}), Bootstrap(10000, 0.95, seed=0))
    gmd_ds, lw_ds, lw_gmd = table.differences["missing"]
    assert gmd_ds.per_seed == pytest.approx([np.mean(gain)] * 3)
    # Seeds that agree add nothing: both intervals are the same case bootstrap, up to resampling noise.
    assert gmd_ds.seed_low == pytest.approx(gmd_ds.low, abs=0.003)
    assert gmd_ds.seed_high == pytest.approx(gmd_ds.high, abs=0.003)
    assert gmd_ds.seed_interval_excludes_zero
    for d in (lw_ds, lw_gmd):
        assert math.isnan(d.seed_low) and math.isnan(d.seed_high) and d.seed_interval_excludes_zero is None
    md = table.to_markdown()
    assert "interval, seeds and cases resampled" in md
    row = next(line for line in md.splitlines() if line.startswith("| lw − ds |"))
    assert "| n/a | n/a |" in row and "[" not in row.split("|")[5]
    saved = table.to_json()["differences"]["missing"][0]
    assert saved["ci_seeds_low"] == pytest.approx(gmd_ds.seed_low, abs=1e-6)
    assert saved["seed_interval_excludes_zero"] is True


def test_seed_and_case_interval_widens_with_the_seed_spread():
    rng = np.random.default_rng(3)
    cases = rng.normal(0.5, 0.1, size=6)                               # case difficulty, shared by every model
    quiet = cases + rng.normal(0, 0.005, size=(3, 6))
    noisy = cases + rng.normal(0, 0.005, size=(3, 6)) + np.array([[0.07], [0.0], [-0.07]])   # whole-model shifts
    boot = Bootstrap(4000, 0.95, seed=1)
    q_low, q_high = seed_and_case_interval(quiet + 0.03, quiet, boot)
    n_low, n_high = seed_and_case_interval(noisy + 0.03, quiet, boot)
    assert q_low < 0.03 < q_high and n_low < 0.03 < n_high
    assert n_high - n_low > 3 * (q_high - q_low)
    assert seed_and_case_interval(quiet + 0.03, quiet, boot) == (q_low, q_high)        # reproducible
    assert all(math.isnan(x) for x in seed_and_case_interval(quiet[:1], quiet, boot))
    with pytest.raises(ValueError, match="same cases"):
        seed_and_case_interval(quiet, quiet[:, :4], boot)


def test_stats_command_writes_the_table_elsewhere_and_leaves_the_run_alone(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "stats"
    for k, key in enumerate(["stock", "ds", "gmd"]):
        write_method(run, key, lambda c, s, r, k=k: 0.2 + 0.1 * k + 0.01 * c)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["benchmark", "stats", str(run), "-o", str(out), "--resamples", "2000"]) == 0
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    md = (out / "paired_differences.md").read_text()
    assert "percentile bootstrap" in md and "2000 resamples" in md
    assert "| DS − nnUNet (zero-fill) | +0.100 | [+0.100, +0.100] | **yes** | 6 / 0 / 0 of 6 |" in md
    assert "| GMD − DS |" in md and "| Case_005 | 0.250 / 0.250 | 0.350 / 0.350 | 0.450 / 0.450 |" in md
    data = json.loads((out / "paired_differences.json").read_text())
    assert data["bootstrap"]["kind"] == "percentile" and data["bootstrap"]["n_resamples"] == 2000
    assert [(d["method"], d["versus"]) for d in data["differences"]["missing"]] == \
        [("DS", "nnUNet (zero-fill)"), ("GMD", "nnUNet (zero-fill)"), ("GMD", "DS")]
    rows = (out / "paired_differences.csv").read_text().splitlines()
    assert rows[0].startswith("measure,method,versus,n_cases,mean_difference,ci_low,ci_high") and len(rows) == 7
    assert (out / "paired_differences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GMD − DS" in capsys.readouterr().out
    # --methods picks and orders the pair.
    assert main(["benchmark", "stats", str(run), "-o", str(out), "--methods", "gmd", "stock"]) == 0
    assert json.loads((out / "paired_differences.json").read_text())["differences"]["full"][0]["method"] == \
        "nnUNet (zero-fill)"


def test_stats_errors_name_the_file(tmp_path, capsys):
    write_method(tmp_path, "ds", lambda c, s, r: 0.5)
    assert main(["benchmark", "stats", str(tmp_path)]) == 2
    assert "at least two methods" in capsys.readouterr().err
    write_method(tmp_path, "gmd", lambda c, s, r: 0.5, cases=CASES[:5])
    assert main(["benchmark", "stats", str(tmp_path)]) == 2
    assert "paired differences need the same cases" in capsys.readouterr().err
    assert main(["benchmark", "stats", str(tmp_path), "--methods", "ds", "dropout"]) == 2
    assert "reports/dropout/missing_modality_report.json does not exist" in capsys.readouterr().err
    (tmp_path / "reports" / "ds" / "predictions" / "t2" / "summary.json").unlink()
    with pytest.raises(UserError, match=r"predictions/t2/summary.json does not exist"):
        case_scores(tmp_path / "reports" / "ds")
    assert main(["benchmark", "stats", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- seeds, pipeline
def test_seeds_train_into_their_own_folders_and_reuse_a_single_seed_run(tmp_path, monkeypatch):
    """Seed 0 is the single-run layout; more seeds add their own results trees, reports, logs and steps."""
    from nnunet_gmd.demo import pipeline
    from nnunet_gmd.demo.presets import PRESETS
    from nnunet_gmd.demo.results import Results
    from nnunet_gmd.demo.workspace import Workspace

    calls = []

    def fake_tool(command, env, log_path, desc, total_epochs=None, cwd=None):
        seed = int(env["NNUNET_GMD_SEED"])
        kind = "train" if "nnUNetv2_train" in command[0] else "evaluate"
        calls.append((kind, seed, env["nnUNet_results"], Path(log_path).name))
        if "evaluate" in command:
            key = Path(command[command.index("-o") + 1]).name
            shift = {"stock": 0.0, "gmd": 0.1}[key]
            write_method(tmp_path / "run", key, lambda c, s, r: 0.3 + shift + 0.02 * seed + 0.01 * c, seed=seed)

    monkeypatch.setattr(pipeline, "run_tool", fake_tool)
    ws = Workspace(tmp_path / "run", {"command": "test"})
    methods = pipeline.parse_methods(["stock", "gmd"])
    pipeline.train_and_evaluate_all(ws, 991, PRESETS["smoke"], methods, "cpu", 4, 99, seeds=1)
    assert [(c[1], c[2], c[3]) for c in calls] == [
        (0, str(ws.results), "train_stock.log"), (0, str(ws.results), "train_gmd.log"),
        (0, str(ws.results), "evaluate_stock.log"), (0, str(ws.results), "evaluate_gmd.log")]
    assert ws.is_done("train_gmd") and ws.is_done("evaluate_gmd")
    assert (ws.root / "reports" / "gmd" / "missing_modality_report.json").is_file()

    calls.clear()
    again = Workspace(tmp_path / "run", {"command": "test"})        # same settings: --seeds is not a setting
    pipeline.train_and_evaluate_all(again, 991, PRESETS["smoke"], methods, "cpu", 4, 99, seeds=3)
    assert {c[1] for c in calls} == {1, 2} and len(calls) == 8      # seed 0 reused, nothing of it rerun
    assert ("train", 1, str(ws.root / "nnUNet_results_seed1"), "train_stock_seed1.log") in calls
    assert ("evaluate", 2, str(ws.root / "nnUNet_results_seed2"), "evaluate_gmd_seed2.log") in calls
    assert again.is_done("train_gmd_seed2") and again.is_done("evaluate_stock_seed1")
    assert seeds_of(ws.root, "gmd") == [0, 1, 2]

    # The results table averages over the seeds and shows their spread.
    paths = [[pipeline.report_path(again, m, s) for s in range(3)] for m in methods]
    assert paths[1][2] == ws.root / "reports_seed2" / "gmd" / "missing_modality_report.json"
    results = Results(paths, [m.label for m in methods])
    assert results.n_seeds == [3, 3]
    gmd_missing = results.means()["missing modalities"][:, 1]
    assert gmd_missing == pytest.approx([0.4 + 0.02 + 0.025] * 3)      # mean over seeds 0, 1, 2 and cases
    assert results.seed_sd()["missing modalities"][-1, 1] == pytest.approx(0.02)   # sd of 0.425, 0.445, 0.465
    by_count_sd = results.by_count()[2]
    assert by_count_sd[:3, 1] == pytest.approx([0.02] * 3)          # the seed offset is the same on every subset
    written = results.write(tmp_path / "out", "bench", "test")
    assert "0.445 ± 0.020" in written["md"].read_text()
    assert json.loads(written["json"].read_text())["seeds"] == {"nnUNet (zero-fill)": 3, "GMD": 3}


def test_seed_variable_is_validated_and_offsets_our_generators():
    import torch

    from nnunet_gmd.nnunet.trainer_base import derived_seed, seed_everything_from_env, seed_from_env

    assert seed_from_env({}) is None and derived_seed(1234, {}) == 1234 == derived_seed(1234, {"NNUNET_GMD_SEED": "0"})
    assert derived_seed(1234, {"NNUNET_GMD_SEED": "2"}) == 3234
    for bad in ("-1", "x"):
        with pytest.raises(ValueError, match="NNUNET_GMD_SEED"):
            seed_from_env({"NNUNET_GMD_SEED": bad})
    state = torch.get_rng_state()
    try:
        seed_everything_from_env({"NNUNET_GMD_SEED": "5"})
        a = (torch.rand(3), np.random.rand(3))
        seed_everything_from_env({"NNUNET_GMD_SEED": "5"})
        b = (torch.rand(3), np.random.rand(3))
        seed_everything_from_env({"NNUNET_GMD_SEED": "6"})
        c = torch.rand(3)
    finally:
        torch.set_rng_state(state)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not torch.equal(a[0], c)


def test_per_case_script_is_the_stats_command(tmp_path):
    import subprocess

    for key, v in (("ds", 0.4), ("gmd", 0.5)):
        write_method(tmp_path / "run", key, lambda c, s, r, v=v: v)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "per_case.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), "-o", str(tmp_path / "o"),
                           "--resamples", "100"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| GMD − DS | +0.100 |" in proc.stdout and (tmp_path / "o" / "paired_differences.md").is_file()


def test_a_single_method_rerun_removes_the_earlier_paired_table(tmp_path):
    # A reused run folder first compares two methods, then one: the old table must not sit beside the new results.
    write_method(tmp_path, "ds", lambda c, s, r: 0.5)
    write_method(tmp_path, "gmd", lambda c, s, r: 0.5 + _noise(c))
    written = write_paired_differences(tmp_path, ["ds", "gmd"], {"ds": "DS", "gmd": "GMD"})
    (tmp_path / "benchmark_results.md").write_text("this run's table")
    assert sorted(written) == ["csv", "json", "md", "png"] and all(p.is_file() for p in written.values())
    removed = remove_stale_paired_differences(tmp_path)
    assert sorted(removed) == sorted(written.values())
    assert not any(p.exists() for p in written.values()) and (tmp_path / "benchmark_results.md").is_file()
    assert remove_stale_paired_differences(tmp_path) == []
