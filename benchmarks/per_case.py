"""Per test case: mean Dice over the subsets with a missing modality, for every method of a benchmark run.

With a handful of test cases the method means in ``benchmark_results.md`` hide how much they vary from case to
case. This prints, per case, each method's mean over the 14 missing-modality subsets and the 3 regions, and the
paired difference of a chosen method to each other one (the same cases, so the case difficulty cancels).

    python benchmarks/per_case.py benchmark_output [--against gmd]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def per_case_missing_mean(method_dir: Path) -> dict[str, float]:
    """case id -> mean Dice over the subsets with an absent channel and over all regions (NaN-aware)."""
    report = json.loads((method_dir / "missing_modality_report.json").read_text())
    full = "+".join(report["channels"])
    values: dict[str, list[float]] = {}
    for entry in report["subsets"]:
        name = "+".join(entry["available"])
        if name == full:
            continue
        summary = json.loads((method_dir / "predictions" / name / "summary.json").read_text())
        for case in summary["metric_per_case"]:
            case_id = Path(case["prediction_file"]).name.split(".")[0]
            for block in case["metrics"].values():
                dice = block["Dice"]
                values.setdefault(case_id, []).append(math.nan if dice is None else dice)
    return {case_id: float(np.nanmean(v)) for case_id, v in sorted(values.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="output folder of nnunet-gmd benchmark brats")
    parser.add_argument("--against", default="gmd", help="method key the paired differences refer to (gmd)")
    args = parser.parse_args()
    reports = args.run / "reports"
    methods = sorted(p.name for p in reports.iterdir() if (p / "missing_modality_report.json").is_file())
    if args.against not in methods:
        raise SystemExit(f"{args.against!r} is not among the methods of {reports}: {', '.join(methods)}")
    table = {m: per_case_missing_mean(reports / m) for m in methods}
    cases = list(table[args.against])
    print("| case | " + " | ".join(methods) + " |")
    print("|---|" + "---:|" * len(methods))
    for case in cases:
        print(f"| {case} | " + " | ".join(f"{table[m][case]:.3f}" for m in methods) + " |")
    print()
    for m in methods:
        if m == args.against:
            continue
        diff = np.array([table[args.against][c] - table[m][c] for c in cases])
        wins = int((diff > 0).sum())
        print(f"{args.against} - {m}: mean {diff.mean():+.3f}, per case "
              + ", ".join(f"{d:+.3f}" for d in diff) + f" ({args.against} ahead on {wins}/{len(cases)} cases)")


if __name__ == "__main__":
    main()
